"""A Bradley-Terry reward model on Ray Train: a scalar head on a causal LM or an encoder.

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

The pairs go through the same loading, validation and tokenization as preference training
(pipeline.data); a seeded ``reward_model.eval_fraction`` of them is held out, and the held-out
pair accuracy (r_chosen > r_rejected) is measured at the end. The model is saved as a
sequence-classification folder with one output, which ``eval.reward.source`` / ``pairs.reward.source``
take as a reward source. The trailing EOS of each response is dropped, so training scores the
same token sequence the reward source sees when it tokenizes prompt + completion.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.cluster import connect_ray, storage_root
from pipeline.config import RunConfig, save_config
from pipeline.data.dataset import load_preference_dataset
from pipeline.errors import DataError, ModelLoadError
from pipeline.models.loading import load_tokenizer, resolve
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
from pipeline.stages.sft import StageResult
from pipeline.tracking import flatten, open_tracker, raise_undelivered

Pair = tuple[list[int], list[int]]  # (chosen ids, rejected ids), prompt included
TRAIN_ACCURACY_PAIRS = 1024  # the training accuracy is measured on the first (shuffled) pairs, not all


def reward_pairs(cfg: RunConfig, tokenizer: Any) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out) token pairs; the data is validated like preference-training data."""

    r = cfg.reward_model
    data = cfg.data.model_copy(update={"source": r.source or cfg.data.source, "split": r.split, "limit": r.limit,
                                       "max_length": r.max_length,
                                       "max_prompt_length": min(cfg.data.max_prompt_length or r.max_length // 2,
                                                                r.max_length - 1)})
    dataset = load_preference_dataset(data, tokenizer)
    assert dataset.pairs is not None
    eos = tokenizer.eos_token_id

    def strip(ids: list[int]) -> list[int]:
        return ids[:-1] if len(ids) > 1 and ids[-1] == eos else ids

    pairs = [(p.prompt_ids + strip(p.chosen_ids), p.prompt_ids + strip(p.rejected_ids)) for p in dataset.pairs]
    order = list(range(len(pairs)))
    random.Random(r.seed).shuffle(order)
    held = max(1, round(len(pairs) * r.eval_fraction))
    if len(pairs) - held < 1:
        raise DataError(f"{len(pairs)} pair(s) leave nothing to train on after holding out {held} "
                        f"(reward_model.eval_fraction={r.eval_fraction})")
    return [pairs[i] for i in order[held:]], [pairs[i] for i in order[:held]]


def load_reward_backbone(spec: str, cfg: RunConfig, pad_token_id: int) -> Any:
    """A one-output sequence-classification model on ``spec`` (its score head is new)."""
    from transformers import AutoModelForSequenceClassification

    resolved = resolve(spec, cfg.model.revision)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved.location, num_labels=1, revision=cfg.model.revision, dtype=torch.float32,
            trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True if resolved.local else None)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load reward-model base '{spec}': {type(e).__name__}: {e}") from None
    model.config.pad_token_id = pad_token_id
    return model


def pad_rows(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pair_rewards(model: Any, pairs: list[Pair], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of a batch of pairs, one forward over the 2B sequences."""
    device = next(model.parameters()).device
    batch = pad_rows([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id)
    scores = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float()
    return scores[: len(pairs)], scores[len(pairs) :]


@torch.no_grad()
def accuracy(model: Any, pairs: list[Pair], pad_token_id: int, batch_size: int) -> float:
    was = model.training
    model.eval()
    correct = 0
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = pair_rewards(model, pairs[start : start + batch_size], pad_token_id)
        correct += int((chosen > rejected).sum())
    model.train(was)
    return correct / len(pairs)


def run_reward_model(cfg: RunConfig, *, progress: bool = True) -> StageResult:
    import ray

    r = cfg.reward_model
    base = r.base or cfg.model.policy
    name = cfg.output.run_name or f"reward-model-{time.strftime('%Y%m%d-%H%M%S')}"
    run_folder = storage_root(cfg) / name
    run_folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_folder)
    tokenizer = load_tokenizer(cfg.model.tokenizer if cfg.model.tokenizer else base, revision=cfg.model.revision,
                               trust_remote_code=cfg.model.trust_remote_code)
    train, held_out = reward_pairs(cfg, tokenizer)
    check_batches(len(train), r, "training pairs")
    with open_tracker(cfg, name, tags={"stage": "reward_model"}) as tracker:
        tracker.log_params(flatten({"reward_model": r.model_dump(mode="json"), "data.source": r.source or cfg.data.source}))
        tracker.log_params({"reward_model.base_resolved": base, "reward_model.train_pairs": len(train),
                            "reward_model.eval_pairs": len(held_out)})
        tracker.log_artifact(run_folder / "config.yaml")
        connect_ray(cfg.distributed.address)
        check_cluster(r)
        job = StageJob(cfg, ray.put(train), tokenizer.pad_token_id, run_folder, tracker.run_id, tracker.uri,
                       progress, held_out=ray.put(held_out), base=base)
        fit_stage(name, _reward_loop, {"job": job}, r, storage_root(cfg))
        model_dir = run_folder / "model"
        tokenizer.save_pretrained(model_dir)
        history = read_jsonl(run_folder / "metrics.jsonl")
        final = read_jsonl(run_folder / "final.jsonl")[-1]
        tracker.log_metrics(final, step=r.max_steps)
        raise_undelivered(run_folder)  # metrics the workers could not deliver, said once the model is saved
        return StageResult(run_folder, model_dir, history, final, tracker.run_id)


def _reward_loop(config: dict[str, Any]) -> None:
    import json

    import ray

    job: StageJob = config["job"]
    cfg = job.cfg
    r = cfg.reward_model
    torch.manual_seed(r.seed)
    train, held_out = ray.get(job.examples), ray.get(job.held_out)
    pad = job.pad_token_id
    rank, world, model, optimizer, scheduler = prepare_worker(r, load_reward_backbone(job.base, cfg, pad))
    batches = worker_batches(len(train), r, rank, world)
    log = StageLog(job, rank, r.max_steps, "reward model")
    model.train()
    for step in range(r.max_steps):
        log.begin()
        chosen, rejected = pair_rewards(model, [train[i] for i in next(batches)], pad)
        loss = -F.logsigmoid(chosen - rejected).mean()
        apply_gradients(loss, model, optimizer, scheduler, cfg.train.max_grad_norm)
        log.step(step + 1, {"loss": all_mean(loss), "accuracy": all_mean((chosen > rejected).float().mean()),
                            "margin": all_mean((chosen - rejected).mean()), "lr": scheduler.get_last_lr()[0]})
    log.close()
    if rank == 0:
        plain = unwrap(model)
        final = {"eval/accuracy": accuracy(plain, held_out, pad, r.batch_size),
                 "train/accuracy": accuracy(plain, train[:TRAIN_ACCURACY_PAIRS], pad, r.batch_size)}
        folder = job.run_folder
        (folder / "final.jsonl").write_text(json.dumps(final) + "\n", encoding="utf-8")
        plain.save_pretrained(folder / "model")
