"""What the reference model sends per sequence: summed log-probs and, for TDPO, per-position statistics.

A :class:`SequenceStats` holds S sequences. Per-position tensors hold the
response positions of all S sequences concatenated in sequence order (the
packed layout of :mod:`pipeline.tokenstats`), so a collated batch of B pairs
(2B rows, chosen first) maps to one SequenceStats whose positions line up with
``response_index(batch["labels"])``.

Per-position fields by statistics kind:
    "sequence"  none (the DPO family)
    "exact"     logps (N, V): the reference's full log-distribution at each position
    "topk"      ids (N, k) int, logps (N, k), tail_logp (N,): see tokenstats.TopK
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline import tokenstats

KINDS = ("sequence", "exact", "topk")


@dataclass
class SequenceStats:
    kind: str
    logps: torch.Tensor  # (S,) summed reference log-prob of each response, float32
    lengths: torch.Tensor  # (S,) response positions of each sequence
    positions: dict[str, torch.Tensor] = field(default_factory=dict)  # each (N, ...) with N = lengths.sum()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown reference statistics kind {self.kind!r}; known: {KINDS}")
        total = int(self.lengths.sum())
        for name, tensor in self.positions.items():
            if tensor.shape[0] != total:
                raise ValueError(f"positions[{name!r}] has {tensor.shape[0]} rows for {total} response positions")

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def select(self, order: Sequence[int]) -> SequenceStats:
        """The sequences at ``order``, in that order (positions follow their sequences)."""
        index = torch.as_tensor(list(order), dtype=torch.long)
        positions = {}
        if self.positions:
            ends = self.lengths.cumsum(0)
            starts = ends - self.lengths
            rows = torch.cat([torch.arange(int(starts[i]), int(ends[i])) for i in index.tolist()] or
                             [torch.zeros(0, dtype=torch.long)])
            positions = {name: t.index_select(0, rows) for name, t in self.positions.items()}
        return SequenceStats(self.kind, self.logps[index], self.lengths[index], positions)

    @staticmethod
    def cat(parts: Sequence[SequenceStats]) -> SequenceStats:
        if not parts:
            raise ValueError("nothing to concatenate")
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot concatenate reference statistics of different kinds {sorted(kinds)}")
        names = parts[0].positions.keys()
        return SequenceStats(
            parts[0].kind,
            torch.cat([p.logps for p in parts]),
            torch.cat([p.lengths for p in parts]),
            {n: torch.cat([p.positions[n] for p in parts]) for n in names},
        )

    def topk(self) -> tokenstats.TopK:
        return tokenstats.TopK(self.positions["ids"].long(), tokenstats.at_least_fp32(self.positions["logps"]),
                               tokenstats.at_least_fp32(self.positions["tail_logp"]))

    def position_kl(self, policy_logits: torch.Tensor) -> torch.Tensor:
        """KL(ref || policy) at each response position, (N, V) -> (N,); exact or coarse-grained (topk)."""
        if self.kind == "exact":
            # Stored log-probs may be bf16/fp16; log_softmax in float32 renormalises their rounding.
            return tokenstats.position_kl(self.positions["logps"], policy_logits)
        if self.kind == "topk":
            return tokenstats.topk_position_kl(self.topk(), policy_logits)
        raise ValueError("sequence-level reference statistics carry no per-position distribution")

    @property
    def nbytes(self) -> int:
        tensors = [self.logps, self.lengths, *self.positions.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping for safetensors."""
        return {"logps": self.logps, "lengths": self.lengths, **{f"positions.{k}": v for k, v in self.positions.items()}}

    @classmethod
    def from_tensors(cls, kind: str, tensors: dict[str, torch.Tensor]) -> SequenceStats:
        positions = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("positions.")}
        return cls(kind, tensors["logps"], tensors["lengths"], positions)
