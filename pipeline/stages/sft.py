"""Supervised fine-tuning on Ray Train: next-token loss on responses, or on whole texts.

Rows: ``{"text": str}`` (every token is learned), ``{"prompt": str, "completion": str}``, or a
preference row in any TRL format (its chosen response is learned, rendered as preference training
renders it, chat template included); the prompt is context only, its tokens carry no loss. Every response ends with EOS. Bad rows are
listed with their numbers before any model loads.

Outputs (``<storage>/<run name>/``): metrics.jsonl, model/ (safetensors + tokenizer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.cluster import connect_ray, storage_root
from pipeline.config import RunConfig, save_config
from pipeline.data.normalize import normalize_record
from pipeline.data.sources import Unparseable, read_records
from pipeline.data.tokenization import PairTokenizer, collate_sequences
from pipeline.errors import DataError, RowProblem
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.stages.common import (
    StageJob,
    StageLog,
    all_mean,
    apply_gradients,
    check_batches,
    check_cluster,
    fit_stage,
    prepare_worker,
    read_jsonl,
    unwrap,
    worker_batches,
)
from pipeline.tracking import flatten, open_tracker, raise_undelivered


@dataclass
class StageResult:
    run_dir: Path
    model_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    output: Path | None = None  # make_pairs: the pairs file


def sft_examples(cfg: RunConfig, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per row; raises DataError listing every bad row."""

    s = cfg.sft
    renderer = PairTokenizer(tokenizer, s.max_length)
    examples, problems = [], []
    eos = tokenizer.eos_token_id
    for number, record in read_records(s.source, s.split, s.limit):
        if isinstance(record, Unparseable):
            problems.append(RowProblem(number, "(row)", record.message))
            continue
        text, prompt, response = record.get("text"), record.get("prompt"), record.get("completion")
        special = True  # plain text gets the tokenizer's special tokens (e.g. BOS); a chat template has its own
        if response is None and "chosen" in record:  # a preference row: learn its chosen response
            example = normalize_record(number, record)
            if isinstance(example, list):
                problems.extend(example)
                continue
            prompt, response, _ = renderer.render(example)
            special = not example.conversational
        if isinstance(text, str) and text.strip():
            prompt_ids, response_ids = [], tokenizer(text, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, str) and isinstance(response, str) and response.strip():
            prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        else:
            problems.append(RowProblem(number, "(row)", "needs a text field 'text', 'prompt' with 'completion', "
                                                        "or a preference row (its chosen response is learned)"))
            continue
        examples.append(fit(list(prompt_ids), list(response_ids) + [eos], s.max_length))
    if problems:
        raise DataError(f"{len(problems)} bad row(s) in SFT data", problems, source=s.source)
    if not examples:
        raise DataError(f"no rows in SFT data {s.source}")
    return examples


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut an example to ``max_length`` tokens: the prompt loses its start, down to what the response
    leaves or half the budget, whichever is more; the response then loses its end."""
    budget = max(max_length // 2, max_length - len(response))
    if len(prompt) > budget:
        prompt = prompt[-budget:]
    return prompt, response[: max_length - len(prompt)]


def run_sft(cfg: RunConfig, *, progress: bool = True) -> StageResult:
    """Validate the data, then fine-tune ``model.policy`` on Ray Train workers; returns where the model is."""
    import ray

    m = cfg.model
    name = cfg.output.run_name or f"sft-{time.strftime('%Y%m%d-%H%M%S')}"
    run_folder = storage_root(cfg) / name
    run_folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_folder)
    tokenizer = load_tokenizer(m.tokenizer_spec, revision=m.revision, trust_remote_code=m.trust_remote_code)
    examples = sft_examples(cfg, tokenizer)
    check_batches(len(examples), cfg.sft, "SFT examples")
    with open_tracker(cfg, name, tags={"stage": "sft"}) as tracker:
        tracker.log_params(flatten({"model": cfg.model.model_dump(mode="json"), "sft": cfg.sft.model_dump(mode="json")}))
        tracker.log_params({"sft.examples": len(examples)})
        tracker.log_artifact(run_folder / "config.yaml")
        connect_ray(cfg.distributed.address)
        check_cluster(cfg.sft)
        job = StageJob(cfg, ray.put(examples), tokenizer.pad_token_id, run_folder, tracker.run_id, tracker.uri,
                       progress)
        fit_stage(name, _sft_loop, {"job": job}, cfg.sft, storage_root(cfg))
        model_dir = run_folder / "model"
        tokenizer.save_pretrained(model_dir)
        if cfg.tracking.log_model:
            tracker.log_artifact(model_dir, "model")
        history = read_jsonl(run_folder / "metrics.jsonl")
        raise_undelivered(run_folder)  # metrics the workers could not deliver, said once the model is saved
        return StageResult(run_folder, model_dir, history, {"final_loss": history[-1]["loss"]}, tracker.run_id)


def _sft_loop(config: dict[str, Any]) -> None:
    import ray

    job: StageJob = config["job"]
    cfg = job.cfg
    s = cfg.sft
    torch.manual_seed(s.seed)
    examples = ray.get(job.examples)
    rank, world, model, optimizer, scheduler = prepare_worker(s, load_causal_lm(
        cfg.model.policy, dtype=cfg.model.dtype, revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code))
    batches = worker_batches(len(examples), s, rank, world)
    log = StageLog(job, rank, s.max_steps, "sft")
    device = next(model.parameters()).device
    model.train()
    for step in range(s.max_steps):
        log.begin()
        members = [examples[i] for i in next(batches)]
        batch = collate_sequences([e[0] for e in members], [e[1] for e in members], job.pad_token_id)
        loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss  # this worker's token mean
        grad_norm = apply_gradients(loss, model, optimizer, scheduler, cfg.train.max_grad_norm)
        log.step(step + 1, {"loss": all_mean(loss), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm})
    log.close()
    if rank == 0:
        unwrap(model).save_pretrained(job.run_folder / "model")
