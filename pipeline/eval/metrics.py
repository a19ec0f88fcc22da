"""Measurements on samples from a policy: reward, KL(policy || reference), entropy, distinct-n.

KL is the sequence-level Monte-Carlo estimate the TDPO paper plots: for each sample y ~ policy(. | x),
``sum_t log policy(y_t | x, y_<t) - log reference(y_t | x, y_<t)`` over the sampled tokens, averaged
over samples. It is unbiased when sampling is from the policy itself (temperature 1, no top-k/top-p,
the defaults); with other settings it is the policy's log-ratio on samples from a sharpened policy.
Entropy is the policy's full-vocabulary entropy at each sampled position, averaged over tokens.
Distinct-n is unique n-grams over all n-grams of the completions' words (Li et al., 2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline import tokenstats
from pipeline.config import EvalConfig
from pipeline.data.tokenization import collate_sequences
from pipeline.eval.generation import Samples, sample_batches
from pipeline.eval.rewards import RewardSource, mean_std
from pipeline.models.forward import response_logits

ReferenceLogps = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class SampleScores:
    """Per-sample measurements; the parts of several workers are merged with :meth:`extend`."""

    reward: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)  # summed over the sample's tokens
    tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # completions, decoded

    def extend(self, other: SampleScores) -> None:
        for name, values in asdict(other).items():
            getattr(self, name).extend(values)


@dataclass(frozen=True)
class EvalPoint:
    reward: float
    reward_std: float
    kl: float
    kl_std: float
    entropy: float
    distinct_1: float
    distinct_2: float
    length: float
    samples: int

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


@torch.no_grad()
def policy_scores(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (B,), summed token entropies (B,)) of the labelled tokens of ``batch``."""
    index = tokenstats.response_index(batch["labels"])
    logps = tokenstats.log_probs(response_logits(model, batch, index.mask))  # (N, V)
    token = logps.gather(1, index.targets.unsqueeze(1)).squeeze(1)
    entropy = -(logps.exp() * logps).sum(dim=1)
    return tokenstats.segment_sum(token, index), tokenstats.segment_sum(entropy, index)


def completion_rewards(tokenizer: Any, samples: Samples, prompts: Sequence[str], reward: RewardSource,
                       first_index: int = 0) -> tuple[list[str], list[float]]:
    """(decoded completions, their rewards on prompt + completion); sample i continues
    ``prompts[samples.prompt_index[i] - first_index]``."""
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in samples.completion_ids]
    rewards = reward.score([prompts[i - first_index] + t for i, t in zip(samples.prompt_index, texts, strict=True)])
    return texts, rewards


def _policy_on(policy: Any, tokenizer: Any, samples: Samples) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The samples collated (on CPU), and the policy's summed log-probs and entropies on them."""
    device = next(policy.parameters()).device
    batch = collate_sequences(samples.prompt_ids, samples.completion_ids, tokenizer.pad_token_id)
    return (batch, *policy_scores(policy, {k: v.to(device) for k, v in batch.items()}))


def score_samples(policy: Any, tokenizer: Any, samples: Samples, prompts: Sequence[str],
                  reward: RewardSource, reference_logps: ReferenceLogps) -> SampleScores:
    batch, logps, entropy = _policy_on(policy, tokenizer, samples)
    kl = logps.double().cpu() - reference_logps(batch).double().cpu()
    texts, rewards = completion_rewards(tokenizer, samples, prompts, reward)
    return SampleScores(reward=rewards, kl=kl.tolist(), entropy=entropy.double().cpu().tolist(),
                        tokens=[len(c) for c in samples.completion_ids], texts=texts)


def sample_and_score(policy: Any, tokenizer: Any, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
                     cfg: EvalConfig, reward: RewardSource, reference_logps: ReferenceLogps, *,
                     first_index: int = 0, synced: bool = False, batches: int | None = None,
                     samples_per_prompt: int = 1) -> SampleScores:
    """Sample completions of ``prompt_ids`` (this worker's share, starting at global prompt
    ``first_index``; ``prompts`` is the full list of prompt texts) and score every sample."""
    scores = SampleScores()
    for samples, real in sample_batches(policy, tokenizer, prompt_ids, cfg.generation, seed=cfg.seed,
                                        samples_per_prompt=samples_per_prompt, synced=synced, batches=batches,
                                        first_index=first_index):
        if real:
            scores.extend(score_samples(policy, tokenizer, samples, prompts, reward, reference_logps))
        else:  # keep ZeRO-3 ranks in lockstep: the same number of policy forwards everywhere
            _policy_on(policy, tokenizer, samples)
    return scores


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams over all word n-grams of ``texts`` (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(scores: SampleScores) -> EvalPoint:
    if not scores.reward:
        raise ValueError("no samples to summarize")
    reward, reward_std = mean_std(scores.reward)
    kl, kl_std = mean_std(scores.kl)
    tokens = sum(scores.tokens)
    return EvalPoint(reward=reward, reward_std=reward_std, kl=kl, kl_std=kl_std,
                     entropy=sum(scores.entropy) / tokens if tokens else math.nan,
                     distinct_1=distinct_n(scores.texts, 1), distinct_2=distinct_n(scores.texts, 2),
                     length=tokens / len(scores.tokens), samples=len(scores.reward))


def shard(num_prompts: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of worker ``rank``'s contiguous share of the prompts."""
    per, extra = divmod(num_prompts, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)
