"""The reference cache: reference statistics stored under the run storage, keyed by what determines them.

    <storage>/reference-cache/<fingerprint>/meta.json
    <storage>/reference-cache/<fingerprint>/chunk-00000.safetensors   pairs [0, chunk_size)
    ...

The fingerprint hashes the tokenized pairs themselves (so dataset content,
tokenizer, max lengths and truncation are all in it), the reference model's
identity and weight files, its dtype, and the statistics kind (sequence /
exact with storage dtype / top-k with k). A second run, a resumed run, or
another sweep trial with the same key reads the chunks instead of running the
reference model. Token-level chunks (exact, topk) also hold every sequence's summed
log-prob, computed exactly as the sequence kind computes it, so a DPO-family run
reads the sums of a complete token-level cache instead of a pass of its own
(:func:`usable_cache`): one reference pass serves a sweep over DPO and TDPO. Chunks are written to a temporary name and renamed, so a
crash never leaves a partial chunk under a valid name; a chunk that does not
read back is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.data.tokenization import TokenizedPair
from pipeline.models.loading import resolve
from pipeline.reference.stats import SequenceStats

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


def weights_signature(location: str) -> list[list[Any]]:
    """(name, size, mtime) of a local model folder's config and weight files: changes when the weights do."""
    folder = Path(location)
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"} and p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(cfg: RunConfig, pairs: Sequence[TokenizedPair], kind: str) -> tuple[str, dict[str, Any]]:
    """(fingerprint, what it was computed from) for a run's reference statistics."""

    model = resolve(cfg.model.reference_spec, cfg.model.revision)
    meta = {
        "format": FORMAT_VERSION,
        "reference": model.identity,
        "weights": weights_signature(model.location) if model.local else None,
        "model_dtype": cfg.model.dtype,
        "tokenizer": cfg.model.tokenizer_spec,
        "data": {"source": cfg.data.source, "split": cfg.data.split, "limit": cfg.data.limit,
                 "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
                 "prompt_truncation": cfg.data.prompt_truncation, "pairs": len(pairs)},
        "kind": kind,
        "topk": cfg.reference.topk if kind == "topk" else None,
        "dtype": cfg.reference.dtype if kind in ("exact", "topk") else None,
        "chunk_size": cfg.reference.chunk_size,
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for pair in pairs:  # the token ids themselves: any change to data, tokenizer or truncation changes the key
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return digest.hexdigest()[:32], meta


@dataclass(frozen=True)
class ChunkPlan:
    """Pairs are grouped into fixed chunks by index: chunk c holds pairs [c * size, (c + 1) * size)."""

    num_pairs: int
    size: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_pairs // self.size)

    def pairs(self, chunk: int) -> range:
        return range(chunk * self.size, min((chunk + 1) * self.size, self.num_pairs))

    def locate(self, pair: int) -> tuple[int, int]:
        """(chunk, position within the chunk) of a pair."""
        return divmod(pair, self.size)

    def first_need(self, pair_order: Sequence[int]) -> list[int]:
        """The chunks a run needs, in the order it first needs them (a short run skips the rest)."""
        seen: dict[int, None] = {}
        for pair in pair_order:
            seen.setdefault(pair // self.size)
        return list(seen)


class ReferenceCache:
    """One fingerprint's directory of chunks. Safe to share between processes on a shared filesystem."""

    def __init__(self, root: str | Path, fingerprint: str, kind: str, plan: ChunkPlan, view: str | None = None):
        self.dir = Path(root) / "reference-cache" / fingerprint
        self.fingerprint = fingerprint
        self.kind = kind
        self.plan = plan
        self.view = view or kind  # "sequence": read only the summed log-probs of a token-level cache

    def create(self, meta: dict[str, Any]) -> ReferenceCache:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return self

    def path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:05d}.safetensors"

    def valid(self, chunk: int) -> bool:
        """The chunk exists, its header parses and covers the whole file, and it holds the right
        number of sequences. Only the header is read: exact chunks are hundreds of MB."""
        from safetensors import safe_open

        path = self.path(chunk)
        if not path.is_file():
            return False
        try:
            with safe_open(path, "pt") as f:
                sequences = f.get_slice("lengths").get_shape()[0]
        except Exception as e:  # truncated or corrupted file: recompute it
            log.warning("reference cache chunk %s is unreadable (%s); it will be recomputed", path, e)
            return False
        return sequences == 2 * len(self.plan.pairs(chunk))

    def missing(self, chunks: Sequence[int] | None = None) -> list[int]:
        """Of ``chunks`` (default: all), in their order, those not (validly) in the cache."""
        return [c for c in (range(self.plan.num_chunks) if chunks is None else chunks) if not self.valid(c)]

    def write(self, chunk: int, stats: SequenceStats) -> None:
        from safetensors.torch import save

        tensors = {k: v.contiguous() for k, v in stats.to_tensors().items()}
        _atomic_write(self.path(chunk), save(tensors, metadata={"kind": stats.kind, "fingerprint": self.fingerprint}))

    def read(self, chunk: int) -> SequenceStats:
        from safetensors import safe_open
        from safetensors.torch import load_file

        if self.view == self.kind:
            return SequenceStats.from_tensors(self.kind, load_file(self.path(chunk)))
        with safe_open(self.path(chunk), "pt") as f:  # the sums only: exact chunks are hundreds of MB
            return SequenceStats(self.view, f.get_tensor("logps"), f.get_tensor("lengths"))


def token_level_kind(cfg: RunConfig) -> str:
    """The statistics a token-level loss would need under cfg's reference mode."""
    return "topk" if cfg.reference.mode == "topk" else "exact"


def usable_cache(cfg: RunConfig, pairs: Sequence[TokenizedPair], kind: str, plan: ChunkPlan, root: str | Path,
                 chunks: Sequence[int]) -> ReferenceCache:
    """The cache a run reads: for the sequence kind, a token-level cache of the same pairs and reference
    that already holds every chunk in ``chunks`` (read as sums); otherwise the run's own kind."""
    if kind == "sequence":
        wide = token_level_kind(cfg)
        fingerprint, _ = cache_key(cfg, pairs, wide)
        shared = ReferenceCache(root, fingerprint, wide, plan, view="sequence")
        if shared.dir.is_dir() and all(shared.valid(c) for c in chunks):
            return shared
    fingerprint, meta = cache_key(cfg, pairs, kind)
    return ReferenceCache(root, fingerprint, kind, plan).create(meta)


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, rename: readers see all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
