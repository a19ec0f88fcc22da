"""The reference actor group, and how training workers read what it produces.

Data flow:
    driver     ReferenceGroup.submit(chunks in the order training first needs them)
                 -> one task per chunk, round-robin over the actors; all are queued at once,
                    so the reference works ahead of the policy instead of in step with it
    actor      ReferenceActor.score_chunk: forward passes on the chunk's pairs, write the
               chunk to the cache (atomic), return it through the object store
    worker     ChunkFeed(pair indices) -> SequenceStats of a micro-batch, from the object
               store (chunks computed in this run) or the cache (chunks computed before)

Actors are created with ``max_restarts`` and unlimited task retries: an actor that
dies is replaced by Ray and its queued and in-flight chunks run again on the new
one. Scoring is deterministic, so the run's result does not change.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.cluster import actor_restarted
from pipeline.config import RunConfig
from pipeline.data.tokenization import TokenizedPair
from pipeline.models.loading import load_causal_lm
from pipeline.reference.cache import ChunkPlan, ReferenceCache
from pipeline.reference.scorer import ReferenceScorer, batch_order
from pipeline.reference.stats import SequenceStats

EVALUATION_GROUP = "evaluation"


class ReferenceActor:
    """Holds one copy of the frozen reference model. Plain class; :class:`ReferenceGroup` makes it an actor."""

    def __init__(self, cfg: dict[str, Any], kind: str, pad_token_id: int, cache: ReferenceCache | None,
                 index: int, on_task: Callable[[int, int], None] | None = None):
        run = RunConfig.model_validate(cfg)
        model = load_causal_lm(run.model.reference_spec, dtype=run.model.dtype, revision=run.model.revision,
                               trust_remote_code=run.model.trust_remote_code)
        if torch.cuda.is_available() and run.reference.gpus_per_actor > 0:
            model = model.cuda()
        self.scorer = ReferenceScorer(model, kind, topk=run.reference.topk, dtype=run.reference.dtype,
                                      packing=run.train.packing)
        self.batch_size = run.reference.batch_size
        self.pad_token_id = pad_token_id
        self.cache = cache
        self.index = index
        self.on_task = on_task  # on_task(actor index, task number): a fault test's hook, else None
        self.tasks = 0

    def score_chunk(self, chunk: int, pairs: list[TokenizedPair]) -> tuple[dict[str, torch.Tensor], int]:
        """(the chunk's statistics as tensors, forward passes it took)."""
        if self.on_task is not None:
            self.on_task(self.index, self.tasks)
        self.tasks += 1
        before = self.scorer.forward_passes
        stats = self.scorer.score_pairs(pairs, self.pad_token_id, self.batch_size)
        stats = SequenceStats(stats.kind, stats.logps.cpu(), stats.lengths.cpu(),
                              {k: v.cpu() for k, v in stats.positions.items()})
        if self.cache is not None:
            self.cache.write(chunk, stats)
        return stats.to_tensors(), self.scorer.forward_passes - before

    def score_sequences(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reference log-probs of each row's labelled tokens (evaluation samples' KL)."""
        return ReferenceScorer(self.scorer.model, "sequence", packing=self.scorer.packing).score(batch).logps.cpu()

    def pid(self) -> int:
        return os.getpid()

    def restarted(self) -> bool:
        return actor_restarted()


class ReferenceGroup:
    """``reference.num_actors`` Ray actors scoring chunks of pairs; owned by the driver."""

    def __init__(self, cfg: RunConfig, kind: str, pairs: Sequence[TokenizedPair], pad_token_id: int,
                 cache: ReferenceCache | None, plan: ChunkPlan, on_task: Callable[[int, int], None] | None = None):
        import ray

        r = cfg.reference
        restarts = r.max_restarts
        # Evaluation calls (score_sequences) get their own thread: every chunk of the run is queued on
        # the default group at the start, and an evaluation must not wait behind all of them.
        actor_cls = ray.remote(concurrency_groups={EVALUATION_GROUP: 1})(ReferenceActor).options(
            num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor, max_restarts=restarts,
            max_task_retries=-1 if restarts != 0 else 0,
            # Outside any placement group: inside a Tune trial Ray would otherwise place the actors in
            # the trial's own (tiny) bundle, where they do not fit.
            scheduling_strategy="DEFAULT",
        )
        self.actors = [actor_cls.remote(cfg.model_dump(mode="json"), kind, pad_token_id, cache, i, on_task)
                       for i in range(r.num_actors)]
        self.pairs = pairs
        self.plan = plan
        self._counts: list[Any] = []

    def submit(self, chunks: Sequence[int]) -> dict[int, Any]:
        """Queue every chunk now (round-robin); returns chunk -> ObjectRef of its statistics."""
        refs = {}
        for n, chunk in enumerate(chunks):
            actor = self.actors[n % len(self.actors)]
            members = [self.pairs[i] for i in self.plan.pairs(chunk)]
            stats_ref, count_ref = actor.score_chunk.options(num_returns=2).remote(chunk, members)
            refs[chunk] = stats_ref
            self._counts.append(count_ref)
        return refs

    def forward_passes(self) -> int:
        """Reference forward passes of every submitted chunk (waits for them)."""
        import ray

        return int(sum(ray.get(self._counts)))

    def restarts(self) -> int:
        """How many of the actors are replacements of ones that died."""
        import ray

        return sum(ray.get([a.restarted.remote() for a in self.actors]))

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


class ChunkFeed:
    """Worker side: reference statistics of a micro-batch's pairs, from the object store or the cache."""

    def __init__(self, kind: str, plan: ChunkPlan, refs: dict[int, Any], cache: ReferenceCache | None,
                 keep_chunks: int = 64):
        self.kind = kind
        self.plan = plan
        self.refs = refs
        self.cache = cache
        self._chunks: OrderedDict[int, SequenceStats] = OrderedDict()
        self._keep = keep_chunks
        self.bytes_read = 0

    def chunk(self, chunk: int) -> SequenceStats:
        if chunk in self._chunks:
            self._chunks.move_to_end(chunk)
            return self._chunks[chunk]
        if chunk in self.refs:
            import ray

            stats = SequenceStats.from_tensors(self.kind, ray.get(self.refs[chunk]))
        elif self.cache is not None:
            stats = self.cache.read(chunk)
        else:
            raise RuntimeError(f"reference statistics of chunk {chunk} are neither computed nor cached")
        self.bytes_read += stats.nbytes
        self._chunks[chunk] = stats
        if len(self._chunks) > self._keep:
            self._chunks.popitem(last=False)
        return stats

    def __call__(self, pairs: Sequence[int], batch: dict[str, torch.Tensor] | None = None) -> SequenceStats:
        """Statistics of ``pairs`` in collated-batch order: every chosen response, then every rejected."""
        parts = []
        for sequence in batch_order(len(pairs)):
            chunk, slot = self.plan.locate(pairs[sequence // 2])
            parts.append(self.chunk(chunk).select([2 * slot + sequence % 2]))
        return SequenceStats.cat(parts)


class LiveFeed:
    """The ``colocated`` mode: the reference model runs in the training worker, on each micro-batch."""

    def __init__(self, scorer: ReferenceScorer):
        self.scorer = scorer

    def __call__(self, pairs: Sequence[int], batch: dict[str, torch.Tensor]) -> SequenceStats:
        return self.scorer.score(batch)
