"""One evaluation of a policy during training (or of a saved model): built on the driver, run by workers.

Each worker samples completions for its share of the held-out prompts, scores them (its own reward
source; reference log-probs from the reference actor group or a colocated reference), and the
per-sample scores are gathered so that every rank returns the same :class:`EvalPoint`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import EvalConfig, RunConfig
from pipeline.eval.generation import encode_prompts
from pipeline.eval.metrics import EvalPoint, ReferenceLogps, SampleScores, sample_and_score, shard, summarize
from pipeline.eval.prompts import load_prompts
from pipeline.eval.rewards import check_reward, load_reward
from pipeline.reference.group import EVALUATION_GROUP
from pipeline.reference.scorer import ReferenceScorer


@dataclass
class Evaluator:
    cfg: EvalConfig
    prompts: list[str]
    prompt_ids: list[list[int]]
    tokenizer: Any
    reference_actors: list[Any] = field(default_factory=list)  # ReferenceActor handles; empty: colocated
    _reward: Any = field(default=None, repr=False)

    def due(self, step: int, max_steps: int) -> bool:
        every = self.cfg.every_steps
        return step == max_steps or (every is not None and step % every == 0)

    def reward(self) -> Any:
        if self._reward is None:
            self._reward = load_reward(self.cfg.reward, "cuda" if torch.cuda.is_available() else "cpu")
        return self._reward

    def reference_logps(self, rank: int, local: torch.nn.Module | None = None) -> ReferenceLogps:
        """Summed reference log-probs of a batch's labelled tokens: from actor ``rank % n``, or ``local``."""
        if local is not None:
            scorer = ReferenceScorer(local, "sequence")
            return lambda batch: scorer.score(batch).logps
        if not self.reference_actors:
            raise RuntimeError("evaluation needs the reference: no actor handle and no colocated model")
        import ray

        method = self.reference_actors[rank % len(self.reference_actors)].score_sequences
        return lambda batch: ray.get(method.options(concurrency_group=EVALUATION_GROUP).remote(batch))

    def run(self, policy: Any, reference_logps: ReferenceLogps, rank: int = 0, world: int = 1,
            synced: bool = False, gather: Callable[[SampleScores], list[SampleScores]] | None = None) -> EvalPoint:
        start, end = shard(len(self.prompt_ids), rank, world)
        # ZeRO-3: a rank with fewer batches runs dummy ones up to the most any rank has (lockstep)
        batches = math.ceil(math.ceil(len(self.prompt_ids) / world) / self.cfg.generation.batch_size)
        scores = sample_and_score(policy, self.tokenizer, self.prompts, self.prompt_ids[start:end], self.cfg,
                                  self.reward(), reference_logps, first_index=start, synced=synced,
                                  batches=batches if synced else None)
        if gather is not None:
            merged = SampleScores()
            for part in gather(scores):
                merged.extend(part)
            scores = merged
        return summarize(scores)


def build_evaluator(cfg: RunConfig, tokenizer: Any, reference_actors: Sequence[Any] = ()) -> Evaluator:
    """Load and tokenize the prompts and check the reward source: cheap, before any training."""

    e = cfg.eval
    check_reward(e.reward)
    prompts = load_prompts(e.prompts, e.split, e.num_prompts, e.prompt_words)
    return Evaluator(e, prompts, encode_prompts(tokenizer, prompts), tokenizer, list(reference_actors))


def all_gather(scores: SampleScores) -> list[SampleScores]:
    """Every rank's scores, on every rank (torch.distributed, any backend)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [scores]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, scores)
    return parts
