"""ReferenceScorer: the frozen reference model turned into what a loss needs. A plain class, no Ray.

The Ray actor group (:mod:`pipeline.reference.group`) wraps it; the single-process
trainer and the ``colocated`` mode call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline import tokenstats
from pipeline.config import RunConfig
from pipeline.data.tokenization import TokenizedPair, collate_pairs
from pipeline.models.forward import response_logits  # the policy's head-on-responses path
from pipeline.models.packing import KEYS as PACKED_KEYS
from pipeline.models.packing import pack_batch, packing_supported
from pipeline.reference.stats import SequenceStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stats_kind(cfg: RunConfig) -> str:
    """What the reference must send for this run's loss: see pipeline.reference.stats."""
    if not cfg.loss.token_level:
        return "sequence"
    return "topk" if cfg.reference.mode == "topk" else "exact"


class ReferenceScorer:
    """Scores batches with a frozen reference model.

    kind:  "sequence", "exact" or "topk" (see :mod:`pipeline.reference.stats`)
    topk:  k for "topk"
    dtype: storage dtype of "exact" and "topk" log-probs; computed in at least float32 either way
    packing: score padding-free when the model passes the packing check (pipeline.models.packing)
    """

    def __init__(self, model: torch.nn.Module, kind: str, *, topk: int = 64, dtype: str = "float32",
                 packing: bool = True):
        self.model = model.eval().requires_grad_(False)
        self.packing = packing and packing_supported(self.model)
        self.kind = kind
        self.topk = topk
        self.dtype = DTYPES[dtype]
        self.forward_passes = 0

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> SequenceStats:
        """Statistics of every row of a collated batch, in row order."""
        device = next(self.model.parameters()).device
        if not self.packing:  # a batch the policy packed: this model runs it padded
            batch = {k: v for k, v in batch.items() if k not in PACKED_KEYS}
        elif "packed_slots" not in batch:
            batch = pack_batch({k: v.cpu() for k, v in batch.items()})  # the layout is built on the host
        batch = {k: v.to(device) for k, v in batch.items()}
        index = tokenstats.response_index(batch["labels"])
        logits = response_logits(self.model, batch, index.mask)  # (N, V)
        self.forward_passes += 1
        token_logps = tokenstats.token_logps(logits, index.targets)  # (N,) float32
        positions: dict[str, torch.Tensor] = {}
        if self.kind == "exact":
            positions["logps"] = self._stored(tokenstats.log_probs(logits))
        elif self.kind == "topk":
            top = tokenstats.topk_compress(logits, self.topk)
            positions = {"ids": top.ids.to(torch.int32), "logps": self._stored(top.logps), "tail_logp": top.tail_logp}
        return SequenceStats(self.kind, tokenstats.segment_sum(token_logps, index), index.lengths, positions)

    def _stored(self, logps: torch.Tensor) -> torch.Tensor:
        """float32 storage keeps float64 as it is (tests run in float64); bf16/fp16 halve the bytes."""
        return logps if self.dtype == torch.float32 else logps.to(self.dtype)

    def score_pairs(self, pairs: Sequence[TokenizedPair], pad_token_id: int, batch_size: int) -> SequenceStats:
        """Statistics of ``pairs`` in pair order: sequence 2i is pair i's chosen response, 2i+1 its rejected.

        Pairs are scored longest first in batches of ``batch_size`` so that padding is small.
        """
        order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
        parts, position = [], {}
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]
            stats = self.score(collate_pairs([pairs[i] for i in members], pad_token_id))
            for slot, i in enumerate(members):  # rows: chosen of each member, then rejected of each
                position[2 * i] = (len(parts), slot)
                position[2 * i + 1] = (len(parts), len(members) + slot)
            parts.append(stats)
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + len(p))
        merged = SequenceStats.cat(parts)
        return merged.select([offsets[position[s][0]] + position[s][1] for s in range(2 * len(pairs))])


def batch_order(num_pairs: int) -> list[int]:
    """Sequences of pair-ordered stats (c0, r0, c1, r1, ...) in collated-batch order (c0, c1, ..., r0, r1, ...)."""
    return [2 * i for i in range(num_pairs)] + [2 * i + 1 for i in range(num_pairs)]
