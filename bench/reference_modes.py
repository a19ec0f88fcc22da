"""What each reference-statistics mode costs and how far top-k is from exact, on a real model.

    python -m bench.reference_modes --config configs/default.yaml            # both parts
    python -m bench.reference_modes --part accuracy                          # no Ray
    python -m bench.reference_modes --part speed --steps 8

accuracy: bytes per pair the reference sends in each mode, and the error of the
          top-k (k = 16, 64, 256) SeqKL and TDPO losses against exact, for a policy
          trained a few TDPO2 steps away from the reference (at step 0 both are 0; --train-lr sets how far).
speed:    seconds per optimizer step (median, first step excluded) of distributed
          training with 1 worker and the reference exact / topk (actors) / colocated,
          cold (reference streamed) and warm (reference cache hit).
Writes the tables to --out as markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from pipeline import tokenstats
from pipeline.config import load_config
from pipeline.data.dataset import load_preference_dataset
from pipeline.data.tokenization import collate_pairs
from pipeline.losses import LossParams, compute_loss
from pipeline.models.forward import response_logits
from pipeline.models.loading import load_tokenizer
from pipeline.reference.scorer import ReferenceScorer, batch_order
from pipeline.train.setup import load_models
from pipeline.train.step import StepOptions, optimizer_step, policy_stats

KS = (16, 64, 256)


def accuracy(cfg, pairs_n: int, train_steps: int, lr: float) -> list[str]:
    tokenizer = load_tokenizer(cfg.model.tokenizer_spec)
    data = load_preference_dataset(cfg.data, tokenizer)
    pairs = data.pairs[:pairs_n]
    policy, reference = load_models(cfg)
    exact = ReferenceScorer(reference, "exact")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    options = StepOptions(loss="tdpo2", params=LossParams(beta=cfg.loss.beta, alpha=cfg.loss.alpha))
    for step in range(train_steps):  # move the policy away from the reference
        batch = collate_pairs(pairs[(4 * step) % len(pairs):][:4], tokenizer.pad_token_id)
        optimizer_step(policy, optimizer, [(batch, exact.score(batch))], options, max_grad_norm=1.0)
    policy.eval()
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    index = tokenstats.response_index(batch["labels"])
    with torch.no_grad():
        logits = response_logits(policy, batch, index.mask)
    modes = [("sequence (DPO family)", "sequence", {}), ("exact float32", "exact", {}),
             ("exact bfloat16", "exact", {"dtype": "bfloat16"})]
    modes += [(f"topk k={k}", "topk", {"topk": k}) for k in KS]
    rows = ["| mode | bytes per pair | SeqKL rel. error (mean / max) | TDPO1 loss abs. error | TDPO2 loss abs. error |",
            "|---|---|---|---|---|"]
    truth = None
    for label, kind, kw in modes:
        stats = ReferenceScorer(reference, kind, **kw).score_pairs(pairs, tokenizer.pad_token_id, 8)
        per_pair = stats.nbytes / len(pairs)
        if kind == "sequence":
            rows.append(f"| {label} | {per_pair:,.0f} | n/a | n/a | n/a |")
            continue
        ordered = stats.select(batch_order(len(pairs)))
        with torch.no_grad():
            s = policy_stats(logits, index, ordered, token_level=True)
            seq_kl = torch.cat([s.chosen_seq_kl, s.rejected_seq_kl])
            losses = {n: compute_loss(n, s, LossParams(beta=cfg.loss.beta, alpha=cfg.loss.alpha))[0]
                      for n in ("tdpo1", "tdpo2")}
        if truth is None:
            truth = (seq_kl, losses)
            rows.append(f"| {label} | {per_pair:,.0f} | 0 (SeqKL mean {seq_kl.mean():.4f} nats) | 0 | 0 |")
            continue
        rel = ((seq_kl - truth[0]).abs() / truth[0].abs().clamp(min=1e-12))
        err = {n: (losses[n] - truth[1][n]).abs().max().item() for n in losses}
        rows.append(f"| {label} | {per_pair:,.0f} | {rel.mean():.2e} / {rel.max():.2e} | {err['tdpo1']:.2e} | "
                    f"{err['tdpo2']:.2e} |")
    return rows


def speed(cfg_path: str, overrides: list[str], steps: int, out_dir: Path) -> list[str]:
    import shutil

    import ray

    from pipeline.train.distributed import train_distributed

    shutil.rmtree(out_dir / "reference-cache", ignore_errors=True)  # "cold" must mean cold
    ray.init(num_cpus=os.cpu_count())
    runs = [("dpo", "exact", "cold"), ("dpo", "exact", "warm"), ("dpo", "colocated", "-"),
            ("tdpo2", "exact", "cold"), ("tdpo2", "exact", "warm"),
            ("tdpo2", "topk", "cold"), ("tdpo2", "topk", "warm"), ("tdpo2", "colocated", "-")]
    rows = ["| loss | reference | cache | s/step (median) | pairs/s | reference forward passes | wall s |",
            "|---|---|---|---|---|---|---|"]
    cpus = os.cpu_count() or 2
    for loss, mode, cache in runs:
        # The worker gets every core when no actor runs beside it (colocated, or a warm cache);
        # while actors stream, the cores are split between them and the worker.
        worker_cpus = cpus if mode == "colocated" or cache == "warm" else max(1, cpus // 2)
        cfg = load_config(cfg_path, [*overrides, f"loss.name={loss}", f"reference.mode={mode}",
                                     f"train.max_steps={steps}", f"output.dir={out_dir}",
                                     f"output.run_name={loss}-{mode}-{cache}", "train.save_model=false",
                                     f"distributed.cpus_per_worker={worker_cpus}",
                                     f"reference.cpus_per_actor={cpus - worker_cpus or 1}", "reference.topk=64"])
        started = time.perf_counter()
        result = train_distributed(cfg, progress=False)
        wall = time.perf_counter() - started
        pairs = cfg.pairs_per_step / result.seconds_per_step
        rows.append(f"| {loss} | {mode} | {cache} | {result.seconds_per_step:.2f} | {pairs:.2f} | "
                    f"{result.reference_forward_passes} | {wall:.0f} |")
        print(rows[-1], flush=True)
    ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--part", choices=["accuracy", "speed", "all"], default="all")
    parser.add_argument("--pairs", type=int, default=16, help="pairs scored for the accuracy table")
    parser.add_argument("--train-steps", type=int, default=6, help="TDPO2 steps before the accuracy table")
    parser.add_argument("--train-lr", type=float, default=2e-5, help="learning rate of those steps")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per speed run")
    parser.add_argument("--out", default="bench/results/reference_modes.md")
    parser.add_argument("--work", default="outputs/bench-reference-modes", help="runs and cache of the speed part")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    lines = [f"# Reference modes: {cfg.model.policy}, max_length {cfg.data.max_length}",
             f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}",
             ""]
    if args.part in ("accuracy", "all"):
        torch.manual_seed(0)
        lines += [f"## Bytes per pair and top-k error ({args.pairs} pairs, policy after {args.train_steps} "
                  f"TDPO2 steps at lr {args.train_lr:g})", "",
                  *accuracy(cfg, args.pairs, args.train_steps, args.train_lr), ""]
        print("\n".join(lines), flush=True)
    if args.part in ("speed", "all"):
        lines += [f"## Seconds per step, 1 worker, batch {cfg.train.batch_size} pairs, {args.steps} steps", "",
                  *speed(args.config, args.overrides, args.steps, Path(args.work).resolve()), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
