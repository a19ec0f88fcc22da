"""Reward sources behind one interface: ``score(texts) -> list[float]``, higher is better.

    vader         the VADER lexicon's compound sentiment (-1..1); ships with the vaderSentiment
                  package, so it is a fixed, offline ground truth for the controlled-sentiment task
    <model spec>  a sequence-classification model (a folder, e.g. written by jobs.reward_model, or a
                  Hub name such as a sentiment classifier): a single-output model's score, or the
                  log-odds ``log p(label) - log(1 - p(label))`` of ``reward.label`` for a classifier

Texts are prompt + completion: the whole review, as the papers' classifier sees it. A text longer
than ``reward.max_length`` tokens is cut from the left, so the completion is always scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from pipeline.config import RewardConfig
from pipeline.errors import ConfigError, ModelLoadError
from pipeline.models.loading import resolve


class RewardSource(Protocol):
    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


class VaderReward:
    name = "vader"

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ModelLoadError("reward source 'vader' needs the vaderSentiment package: pip install vaderSentiment") from None
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(t)["compound"]) for t in texts]


class ClassifierReward:
    """A Hugging Face sequence-classification model as a reward."""

    def __init__(self, cfg: RewardConfig, device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        resolved = resolve(cfg.source)
        self.name = cfg.source
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.location, trust_remote_code=cfg.trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolved.location, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32,
                use_safetensors=True if resolved.local else None,
            ).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load reward model '{cfg.source}': {type(e).__name__}: {e}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"  # a text over max_length loses prompt, not completion
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.column = label_column(self.model.config, cfg.label, cfg.source)
        self.batch_size = cfg.batch_size
        self.max_length = cfg.max_length

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()
            scores += log_odds(logits, self.column).tolist()
        return scores


def label_column(config: Any, label: str | None, source: str) -> int | None:
    """The logit column of ``label``; None for a single-output (scalar) model."""
    if config.num_labels == 1:
        return None
    names = {str(v).lower(): int(k) for k, v in config.id2label.items()}
    if label is None:
        raise ConfigError(f"reward model '{source}' has {config.num_labels} labels ({', '.join(names)}): "
                          "set reward.label to the one that is the reward (e.g. reward.label=POSITIVE)")
    if label.lower() not in names:
        raise ConfigError(f"reward.label {label!r} is not a label of '{source}'; its labels: {', '.join(names)}")
    return names[label.lower()]


def log_odds(logits: torch.Tensor, column: int | None) -> torch.Tensor:
    """Scalar models: the score. Classifiers: log p(c) - log(1 - p(c)) = logit_c - logsumexp(other logits)."""
    if column is None:
        return logits[:, 0]
    others = torch.cat([logits[:, :column], logits[:, column + 1 :]], dim=1)
    return logits[:, column] - torch.logsumexp(others, dim=1)


def load_reward(cfg: RewardConfig, device: str | torch.device = "cpu") -> RewardSource:
    return VaderReward() if cfg.source == "vader" else ClassifierReward(cfg, device)


def check_reward(cfg: RewardConfig) -> None:
    """Cheap checks before any expensive work: the package is there, a local model folder exists."""
    if cfg.source == "vader":
        VaderReward()
        return

    resolve(cfg.source)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
