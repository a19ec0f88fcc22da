"""Token-level statistics of causal LMs on response tokens.

Conventions (Hugging Face causal LMs): ``logits[:, t]`` predicts token
``t + 1``; ``labels`` are the input ids with ``-100`` on every position that is
not a response token. Only response positions matter, so they are *packed*:
the ``N`` response positions of a batch are gathered into one dimension, and
per-sequence sums use the ``segments`` index (which row each position is in).
Packing lets the training step apply the LM head to response positions only,
which on a small model is most of the FLOPs.

KL(ref || policy) at a position is ``sum_v p_ref(v) (log p_ref(v) - log p_pol(v))``
(TDPO, arXiv 2404.11999, eq. 4 / SeqKL in eq. 17). Log-probabilities always come
from ``log_softmax``; ``softmax().log()`` underflows to ``0 * -inf = NaN``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ResponseIndex:
    """Where the response tokens of a batch are, after the causal shift.

    mask:     (B, T-1) bool, True where shifted position t predicts a response token
    targets:  (N,) the token each response position predicts
    segments: (N,) the batch row of each response position
    lengths:  (B,) response tokens per row
    """

    mask: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor
    lengths: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])


def response_index(labels: torch.Tensor) -> ResponseIndex:
    """Index the response positions of ``labels`` (B, T), shifting for next-token prediction."""
    shifted = labels[:, 1:]  # (B, T-1): the token predicted at each position
    mask = shifted != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shifted)
    return ResponseIndex(mask=mask, targets=shifted[mask], segments=rows[mask], lengths=mask.sum(dim=1))


def pack(logits: torch.Tensor, index: ResponseIndex) -> torch.Tensor:
    """(B, T, V) full-sequence logits -> (N, V) logits at response positions."""
    return logits[:, :-1][index.mask]


def segment_sum(values: torch.Tensor, index: ResponseIndex) -> torch.Tensor:
    """(N,) per-position values -> (B,) per-sequence sums."""
    out = values.new_zeros(index.batch_size)
    return out.index_add(0, index.segments, values)


def at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are upcast before log_softmax: in bf16 a per-token log-prob is off by
    ~0.05 nats and the KL between close distributions by more than its own size (measured)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the vocabulary in at least float32: (..., V) -> (..., V)."""
    return F.log_softmax(at_least_fp32(logits), dim=-1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under ``logits``, computed in at least float32: (..., V), (...) -> (...)."""
    return log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def position_kl(reference_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || policy) over the vocabulary at each position: (..., V), (..., V) -> (...).

    Differentiable with respect to ``policy_logits``; the reference is treated as constant data.
    Computed in at least float32.
    """
    ref_logps, pol_logps = log_probs(reference_logits), log_probs(policy_logits)
    return (ref_logps.exp() * (ref_logps - pol_logps)).sum(dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the response tokens: (B, T, V), (B, T) -> (B,)."""
    index = response_index(labels)
    return segment_sum(token_logps(pack(logits, index), index.targets), index)


@dataclass(frozen=True)
class TopK:
    """A reference distribution compressed to its k most likely tokens plus one tail bucket.

    ids:      (..., k) token ids
    logps:    (..., k) their reference log-probs
    tail_logp:(...)    log of the mass outside the top k; -inf when none is left
    """

    ids: torch.Tensor
    logps: torch.Tensor
    tail_logp: torch.Tensor


def topk_compress(reference_logits: torch.Tensor, k: int) -> TopK:
    """Keep the top-k reference log-probs per position and the tail mass: (..., V) -> TopK."""
    if not 1 <= k <= reference_logits.shape[-1]:
        raise ValueError(f"k must be in [1, {reference_logits.shape[-1]}], got {k}")
    logps = log_probs(reference_logits)
    top_logps, top_ids = logps.topk(k, dim=-1)
    return TopK(ids=top_ids, logps=top_logps, tail_logp=_tail_logsumexp(logps, top_ids))


def topk_position_kl(reference: TopK, policy_logits: torch.Tensor) -> torch.Tensor:
    """Coarse-grained KL(ref || policy) on the partition {top-k tokens} + {tail}: (..., V) -> (...).

    The policy's tail mass is everything outside the reference's top-k ids. By
    the data-processing inequality this is a lower bound of :func:`position_kl`,
    equal to it when the tail is empty.
    """
    pol_logps = log_probs(policy_logits)
    pol_top = pol_logps.gather(-1, reference.ids)  # (..., k)
    pol_tail = _tail_logsumexp(pol_logps, reference.ids)
    top_term = (reference.logps.exp() * (reference.logps - pol_top)).sum(dim=-1)
    ref_tail_p = reference.tail_logp.exp()
    # 0 * log(0 / q) = 0: a position whose reference tail is empty contributes nothing there.
    tail_term = torch.where(ref_tail_p > 0, ref_tail_p * (reference.tail_logp - pol_tail), torch.zeros_like(ref_tail_p))
    return top_term + tail_term


def _tail_logsumexp(logps: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``top_ids``: (..., V), (..., k) -> (...).

    Summed directly over the tail rather than as log(1 - sum(top)), which cancels
    catastrophically when the top-k hold nearly all the mass; -inf when k == V.
    """
    return torch.logsumexp(logps.scatter(-1, top_ids, float("-inf")), dim=-1)
