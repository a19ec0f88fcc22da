"""Where a single-process training step spends its time, padded against packed.

    python -m bench.profile_step                         # SmolLM2-135M, DPO, 9 batches
    python -m bench.profile_step --widths padded,auto,128,256 --batches 9
    python -m bench.profile_step --torch-profile 15      # also the top operators (torch.profiler)

Phases, each timed per batch (median, first batch excluded), for every packing width in
``--widths`` (padded: no packing; auto: the default, one row of exactly the batch's
tokens; N: rows of N tokens), the variants interleaved batch by batch so machine noise
hits them alike:
    reference   the no-grad reference forward (exact statistics for token-level losses)
    fwd+bwd     policy forward, loss, backward
    clip        gradient clipping
    adamw       the optimizer step; once with torch's default (for-each) AdamW, once fused
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.contenders import MODELS, machine
from pipeline.config import load_config
from pipeline.data.dataset import load_preference_dataset
from pipeline.data.tokenization import collate_pairs
from pipeline.models.loading import load_tokenizer
from pipeline.models.packing import pack_batch
from pipeline.reference.scorer import ReferenceScorer, stats_kind
from pipeline.train.batches import PairBatches
from pipeline.train.setup import load_models
from pipeline.train.step import StepOptions, accumulate_gradients


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--loss", default="dpo")
    p.add_argument("--batches", type=int, default=9)
    p.add_argument("--widths", default="padded,auto", help="packing widths to compare: padded, auto or N")
    p.add_argument("--torch-profile", type=int, default=0, metavar="N", help="print the N costliest operators")
    args = p.parse_args()
    cfg = load_config(args.config, [f"model.policy={MODELS[args.model]}", f"loss.name={args.loss}"])
    tokenizer = load_tokenizer(cfg.model.tokenizer_spec)
    pairs = load_preference_dataset(cfg.data, tokenizer).pairs
    stream = PairBatches(len(pairs), cfg.train.batch_size, cfg.train.seed).iterate()
    batches = [collate_pairs([pairs[i] for i in next(stream)[1]], tokenizer.pad_token_id) for _ in range(args.batches)]
    policy, reference = load_models(cfg)
    options = StepOptions.from_config(cfg.loss)
    widths = args.widths.split(",")
    optimizers = {"adamw": torch.optim.AdamW(policy.parameters(), lr=1e-9),
                  "adamw fused": torch.optim.AdamW(policy.parameters(), lr=1e-9, fused=True)}
    phases: dict[tuple[str, str], list[float]] = {}

    def timed(width: str, phase: str, fn):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        out = fn()
        phases.setdefault((width, phase), []).append(time.perf_counter() - started)
        return out

    for batch in batches:
        for width in widths:
            packing = width != "padded"
            step_batch = pack_batch(batch, None if width == "auto" else int(width)) if packing else batch
            scorer = ReferenceScorer(reference, stats_kind(cfg), packing=packing)
            stats = timed(width, "reference", lambda: scorer.score(step_batch))  # noqa: B023
            timed(width, "fwd+bwd", lambda: accumulate_gradients(policy, [(step_batch, stats)], options))  # noqa: B023
            timed(width, "clip", lambda: torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0))
            for name, optimizer in optimizers.items():
                timed(width, name, optimizer.step)
            policy.zero_grad(set_to_none=False)  # keep the gradients' memory: every variant steps the same way
    real = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    padded = statistics.mean(b["attention_mask"].numel() for b in batches)
    packed = statistics.mean(pack_batch(b)["packed_input_ids"].numel() for b in batches)
    print(f"{MODELS[args.model]}, {args.loss}, batch {cfg.train.batch_size} pairs, max_length {cfg.data.max_length}: "
          f"{real:.0f} real tokens in {padded:.0f} padded positions per batch, {packed:.0f} packed with shared "
          f"prompts; {machine()}")
    names = ["reference", "fwd+bwd", "clip", *optimizers]
    print("| packing width | " + " | ".join(f"{n} s" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for width in widths:
        cells = [f"{statistics.median(phases[width, n][1:]):.3f}" for n in names]
        print(f"| {width} | " + " | ".join(cells) + " |")
    if args.torch_profile:
        profile(policy, reference, batches[1], cfg, options, args.torch_profile)


def profile(policy, reference, batch, cfg, options, top: int) -> None:  # noqa: ANN001
    """The costliest operators of one packed step (forward, backward, fused AdamW)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-9, fused=True)
    step_batch = pack_batch(batch)
    stats = ReferenceScorer(reference, stats_kind(cfg)).score(step_batch)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        accumulate_gradients(policy, [(step_batch, stats)], options)
        optimizer.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


if __name__ == "__main__":
    main()
