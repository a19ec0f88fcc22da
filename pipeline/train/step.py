"""The single-process preference-optimisation step: plain functions, no Ray, no DeepSpeed.

    batch -> policy and reference statistics -> loss -> backward -> optimizer step

This is the correctness reference the distributed trainer must agree with, and
the fast path of the unit tests. A batch holds B pairs as 2B rows, chosen rows
first (see :func:`pipeline.data.tokenization.collate_pairs`), so one forward
pass scores both responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline import tokenstats
from pipeline.config import LossConfig
from pipeline.losses import LossParams, PreferenceStats, compute_loss, get_loss

# Config attributes of architectures whose logits are not just `lm_head(hidden)`.
_HEAD_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier",
)


def head_is_plain(model: torch.nn.Module) -> bool:
    """True when logits == lm_head(last hidden state), so the head may be applied to a subset of positions."""
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], index: tokenstats.ResponseIndex) -> torch.Tensor:
    """Logits (N, V) at the N response positions of ``batch``.

    The LM head runs on response positions only: on a small model the vocabulary
    projection of prompt and padding positions is most of the work and is never used.
    """
    if not head_is_plain(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return tokenstats.pack(logits, index)
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (2B, T, H)
    return model.get_output_embeddings()(hidden[:, :-1][index.mask])  # (N, V)


@dataclass(frozen=True)
class StepOptions:
    loss: str
    params: LossParams
    log_kl: bool = True  # report kl/* for the DPO family too (computed without gradient)

    @classmethod
    def from_config(cls, loss: LossConfig) -> StepOptions:
        params = LossParams(beta=loss.beta, alpha=loss.alpha, label_smoothing=loss.label_smoothing)
        return cls(loss=loss.name, params=params)


def batch_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    token_level: bool,
    log_kl: bool = True,
) -> PreferenceStats:
    """Policy (with gradient) and reference (without) statistics of one collated batch."""
    index = tokenstats.response_index(batch["labels"])
    policy_logits = response_logits(policy, batch, index)  # (N, V)
    with torch.no_grad():
        reference_logits = response_logits(reference, batch, index)  # (N, V)
    policy_logps = tokenstats.segment_sum(tokenstats.token_logps(policy_logits, index.targets), index)  # (2B,)
    reference_logps = tokenstats.segment_sum(tokenstats.token_logps(reference_logits, index.targets), index)
    seq_kl = None
    if token_level:
        seq_kl = tokenstats.segment_sum(tokenstats.position_kl(reference_logits, policy_logits), index)
    elif log_kl:
        with torch.no_grad():
            seq_kl = tokenstats.segment_sum(tokenstats.position_kl(reference_logits, policy_logits), index)
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


def accumulate_gradients(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    options: StepOptions,
) -> dict[str, torch.Tensor]:
    """Backward over all micro-batches of one optimizer step; returns summed per-example metrics.

    Each micro-batch's summed loss is divided by the pairs in the *whole* step,
    so the gradient is the mean over pairs however the step is split:
    1 micro-batch of 4 pairs and 4 of 1 give the same update.
    """
    token_level = get_loss(options.loss).token_level
    total_pairs = sum(mb["input_ids"].shape[0] // 2 for mb in micro_batches)
    sums: dict[str, torch.Tensor] = {}
    for mb in micro_batches:
        stats = batch_stats(policy, reference, mb, token_level, options.log_kl)
        losses, metrics = compute_loss(options.loss, stats, options.params)
        (losses.sum() / total_pairs).backward()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0) + value.sum()
    sums["pairs"] = torch.tensor(float(total_pairs))
    return sums


def optimizer_step(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    options: StepOptions,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = None,
) -> dict[str, float]:
    """One optimizer step with gradient accumulation; returns metrics averaged over the step's pairs."""
    policy.train()
    sums = accumulate_gradients(policy, reference, micro_batches, options)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # One host sync per step, here, rather than one per metric per micro-batch.
    pairs = sums.pop("pairs")
    values = torch.stack([v.detach().float() for v in sums.values()]) / pairs
    metrics = dict(zip(sums.keys(), values.tolist(), strict=True))
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics
