"""The single-process preference-optimisation step: plain functions, no Ray, no DeepSpeed.

    batch -> policy and reference statistics -> loss -> backward -> optimizer step

This is the correctness reference the distributed trainer must agree with, and
the fast path of the unit tests. A batch holds B pairs as 2B rows, chosen rows
first (see :func:`pipeline.data.tokenization.collate_pairs`), so one forward
pass scores both responses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline import tokenstats
from pipeline.config import LossConfig
from pipeline.losses import LossParams, PreferenceStats, compute_loss, get_loss
from pipeline.models.forward import ResponseLogits
from pipeline.models.packing import KEYS as PACKED_KEYS
from pipeline.reference.stats import SequenceStats


@dataclass(frozen=True)
class StepOptions:
    loss: str
    params: LossParams
    log_kl: bool = True  # report kl/* for the DPO family too (computed without gradient)

    @classmethod
    def from_config(cls, loss: LossConfig) -> StepOptions:
        params = LossParams(beta=loss.beta, alpha=loss.alpha, label_smoothing=loss.label_smoothing)
        return cls(loss=loss.name, params=params)


def policy_stats(
    policy_logits: torch.Tensor,
    index: tokenstats.ResponseIndex,
    reference: SequenceStats,
    token_level: bool,
    log_kl: bool = True,
) -> PreferenceStats:
    """Combine the policy's response logits (N, V) with the reference's statistics of the same rows.

    ``reference`` holds the batch's 2B sequences in row order (chosen first). The
    per-position KL is differentiable for token-level losses and detached
    otherwise (a metric); it needs per-position reference statistics.
    """
    if not torch.equal(reference.lengths.to(index.lengths.device), index.lengths):
        raise ValueError("reference statistics do not line up with the batch's response positions")
    policy_logps = tokenstats.segment_sum(tokenstats.token_logps(policy_logits, index.targets), index)  # (2B,)
    reference_logps = reference.logps.to(policy_logps.device)
    seq_kl = None
    if token_level:
        seq_kl = tokenstats.segment_sum(reference.position_kl(policy_logits), index)
    elif log_kl and reference.positions:
        with torch.no_grad():
            seq_kl = tokenstats.segment_sum(reference.position_kl(policy_logits), index)
    b = index.batch_size // 2
    return PreferenceStats(
        policy_chosen_logps=policy_logps[:b],
        policy_rejected_logps=policy_logps[b:],
        reference_chosen_logps=reference_logps[:b],
        reference_rejected_logps=reference_logps[b:],
        chosen_lengths=index.lengths[:b],
        rejected_lengths=index.lengths[b:],
        chosen_seq_kl=None if seq_kl is None else seq_kl[:b],
        rejected_seq_kl=None if seq_kl is None else seq_kl[b:],
    )


def micro_batch_loss(
    policy: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    batch: dict[str, torch.Tensor],
    reference: SequenceStats,
    options: StepOptions,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and per-pair metrics of one micro-batch against given reference statistics.

    ``policy`` is a :class:`ResponseLogits` or a DeepSpeed engine wrapping one.
    """
    index = tokenstats.response_index(batch["labels"])
    packed = {k: batch[k] for k in PACKED_KEYS if k in batch}
    logits = policy(batch["input_ids"], batch["attention_mask"], index.mask, **packed)
    stats = policy_stats(logits, index, reference, get_loss(options.loss).token_level, options.log_kl)
    return compute_loss(options.loss, stats, options.params)


def accumulate_gradients(
    policy: torch.nn.Module,
    micro_batches: Sequence[tuple[dict[str, torch.Tensor], SequenceStats]],
    options: StepOptions,
) -> dict[str, torch.Tensor]:
    """Backward over all (batch, reference statistics) micro-batches of one optimizer step.

    Each micro-batch's summed loss is divided by the pairs in the *whole* step,
    so the gradient is the mean over pairs however the step is split:
    1 micro-batch of 4 pairs and 4 of 1 give the same update. Returns summed
    per-pair metrics and the pair count.
    """
    total_pairs = sum(mb["input_ids"].shape[0] // 2 for mb, _ in micro_batches)
    forward = ResponseLogits(policy)
    sums: dict[str, torch.Tensor] = {}
    for mb, reference in micro_batches:
        losses, metrics = micro_batch_loss(forward, mb, reference, options)
        (losses.sum() / total_pairs).backward()
        add_metrics(sums, metrics)
    sums["pairs"] = torch.tensor(float(total_pairs))
    return sums


def add_metrics(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Accumulate per-pair metrics (B,) into running sums (in place)."""
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0) + value.detach().sum()


def mean_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Summed metrics and their pair count -> per-pair means, with one host sync."""
    sums = dict(sums)
    pairs = sums.pop("pairs")
    values = torch.stack([torch.as_tensor(v).detach().float() for v in sums.values()]) / pairs
    return dict(zip(sums.keys(), values.tolist(), strict=True))


def optimizer_step(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[dict[str, torch.Tensor], SequenceStats]],
    options: StepOptions,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = None,
) -> dict[str, float]:
    """One optimizer step with gradient accumulation; returns metrics averaged over the step's pairs."""
    policy.train()
    sums = accumulate_gradients(policy, micro_batches, options)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = mean_metrics(sums)  # one host sync per step, not one per metric per micro-batch
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics
