"""Single-process DPO / TDPO training: the reference trainer the distributed one must match.

Order of work: everything cheap that can fail (config, paths, tokenizer, every
row of the dataset) is checked before the models are loaded and before any
step runs. Outputs of a run (``output.dir/<run name>/``):
    config.yaml      the resolved configuration
    data_report.json rows read, valid, skipped (with row numbers and reasons)
    metrics.jsonl    one line per logged optimizer step (also sent to MLflow, see pipeline.tracking)
    model/           the trained policy and tokenizer (safetensors), if train.save_model
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig, save_config
from pipeline.data.dataset import PreferenceDataset
from pipeline.data.tokenization import collate_pairs
from pipeline.eval.evaluator import Evaluator, build_evaluator
from pipeline.models.packing import pack_batch, packing_supported
from pipeline.reference.scorer import ReferenceScorer, stats_kind
from pipeline.tracking import Tracker, flatten, open_tracker
from pipeline.train.batches import PairBatches
from pipeline.train.setup import (
    TrainResult,
    adamw,
    load_models,
    prepare_data,
    run_dir_for,
    save_policy,
    steady_median,
    warmup_schedule,
)
from pipeline.train.step import StepOptions, optimizer_step
from pipeline.train.steplog import StepLog, pair_tokens, progress_bar


def train_local(cfg: RunConfig, *, progress: bool = True, run_dir: Path | None = None,
                on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Validate everything cheap, then train on one process; MLflow gets params, metrics, artifacts.
    ``on_step(step)`` is called after each optimizer step is logged (a notebook's hook; the fault
    tests stop a tracking server from it)."""
    torch.manual_seed(cfg.train.seed)
    run_dir = run_dir or run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)

    tokenizer, dataset = prepare_data(cfg, run_dir)
    assert dataset.pairs is not None
    batches = PairBatches(len(dataset.pairs), cfg.train.batch_size, cfg.train.seed)
    evaluator = build_evaluator(cfg, tokenizer) if cfg.eval.enabled else None

    with open_tracker(cfg, run_dir.name, tags={"loss": cfg.loss.name, "method": cfg.loss.name, "trainer": "local"}) as tracker:
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "data_report.json")
        result = _train(cfg, run_dir, dataset, batches, tokenizer, tracker, progress, evaluator, on_step)
        if result.model_dir is not None and cfg.tracking.log_model:
            tracker.log_artifact(result.model_dir, "model")
    return result


def _train(cfg: RunConfig, run_dir: Path, dataset: PreferenceDataset, batches: PairBatches, tokenizer: Any,
           tracker: Tracker, progress: bool, evaluator: Evaluator | None = None,
           on_step: Callable[[int], None] | None = None) -> TrainResult:
    policy, reference = load_models(cfg)
    scorer = ReferenceScorer(reference, stats_kind(cfg), topk=cfg.reference.topk, dtype=cfg.reference.dtype,
                             packing=cfg.train.packing)
    packing = cfg.train.packing and packing_supported(policy)
    optimizer = adamw(policy.parameters(), cfg)
    scheduler = warmup_schedule(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
    options = StepOptions.from_config(cfg.loss)
    stream = batches.iterate()
    total = cfg.train.max_steps
    bar = progress_bar("local", total, 0, f"{cfg.loss.name} training") if progress else None
    with StepLog(run_dir, tracker, total=total, name=cfg.loss.name, write=True, log_every=cfg.train.log_every,
                 evaluator=evaluator, bar=bar, append=False, postfix=("loss", "rewards/accuracies")) as log:
        for step in range(1, total + 1):
            log.begin()
            micro, tokens = [], 0
            for _ in range(cfg.train.gradient_accumulation_steps):
                position, indices = next(stream)
                tokens += pair_tokens(dataset.pairs, indices)
                batch = collate_pairs([dataset.pairs[i] for i in indices], tokenizer.pad_token_id)
                batch = pack_batch(batch) if packing else batch
                micro.append((batch, scorer.score(batch)))
            metrics = optimizer_step(
                policy, optimizer, micro, options,
                scheduler=scheduler, max_grad_norm=cfg.train.max_grad_norm,
            )
            metrics.update(epoch=position.epoch, lr=scheduler.get_last_lr()[0])
            log.step(step, metrics, pairs=cfg.pairs_per_step, tokens=tokens)
            if log.evaluation_due(step):
                log.evaluating(step)
                log.evaluation(step, evaluator.run(policy, evaluator.reference_logps(0, reference)).metrics())
            if on_step is not None:
                on_step(step)

    result = TrainResult(run_dir=run_dir, history=log.history, evaluations=log.evaluations,
                         seconds_per_step=steady_median([h["seconds"] for h in log.history]))
    if cfg.train.save_model:
        result.model_dir = run_dir / "model"
        save_policy(policy, cfg, result.model_dir)
        tokenizer.save_pretrained(result.model_dir)
    return result
