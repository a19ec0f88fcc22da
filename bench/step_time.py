"""Seconds per optimizer step of the single-process trainer, DPO against TDPO2, same pairs, same order.

    python -m bench.step_time                      # SmolLM2-135M, the default config, 8 steps each
    python -m bench.step_time --steps 4 model.policy=builtin:tiny

Steps of the two losses alternate (dpo, tdpo2, dpo, ...) so that machine noise
hits both alike; the first step of each is excluded from the median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from pipeline.config import load_config
from pipeline.data.dataset import load_preference_dataset
from pipeline.data.tokenization import collate_pairs
from pipeline.models.loading import load_tokenizer
from pipeline.reference.scorer import ReferenceScorer
from pipeline.train.batches import PairBatches
from pipeline.train.local import load_models
from pipeline.train.step import StepOptions, optimizer_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--losses", default="dpo,tdpo2")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model.tokenizer_spec)
    data = load_preference_dataset(cfg.data, tokenizer)
    batches = PairBatches(len(data.pairs), cfg.train.batch_size, cfg.train.seed)
    losses = args.losses.split(",")
    runs = {}
    for loss in losses:
        policy, reference = load_models(cfg)
        runs[loss] = (policy, reference, torch.optim.AdamW(policy.parameters(), lr=cfg.train.learning_rate))
    seconds: dict[str, list[float]] = {loss: [] for loss in losses}
    tokens = []
    stream = batches.iterate()
    for _ in range(args.steps):
        _, indices = next(stream)
        batch = collate_pairs([data.pairs[i] for i in indices], tokenizer.pad_token_id)
        tokens.append(int(batch["attention_mask"].sum()))
        for loss in losses:
            policy, reference, optimizer = runs[loss]
            options = StepOptions.from_config(cfg.loss.model_copy(update={"name": loss}))
            start = time.perf_counter()
            reference_stats = ReferenceScorer(reference, "exact").score(batch)
            optimizer_step(policy, optimizer, [(batch, reference_stats)], options,
                           max_grad_norm=cfg.train.max_grad_norm)
            seconds[loss].append(time.perf_counter() - start)
    print(f"model {cfg.model.policy}, batch {cfg.train.batch_size} pairs, max_length {cfg.data.max_length}, "
          f"mean {statistics.mean(tokens):.0f} tokens per batch, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| loss | median s/step | pairs/s | steps timed |")
    print("|---|---|---|---|")
    for loss in losses:
        med = statistics.median(seconds[loss][1:])
        print(f"| {loss} | {med:.2f} | {cfg.train.batch_size / med:.2f} | {len(seconds[loss]) - 1} |")


if __name__ == "__main__":
    main()
