"""DPO side by side: this project (1 process, Ray Train), TRL's DPOTrainer and a bare PyTorch loop.

    python -m bench.contenders                          # SmolLM2-135M, every contender, 12 steps each
    python -m bench.contenders --model tiny --steps 20  # the tiny test model
    python -m bench.contenders --only bare,trl          # some contenders
    python -m bench.contenders --only ray-1w-z0,ray-1w-z0@tdpo2,ray-1w-z0-topk@tdpo2,ray-1w-colocated@tdpo2

Every contender trains on the same model, the same tokenized preference pairs in the same
batches (this project's PairBatches order: TRL gets the token ids, not text, and a sequential
sampler), the same batch size, max length, learning rate and clipping. Each runs in its own
process, so a peak RSS is that contender's alone (Ray workers report their own). Figures:
    s/step     median seconds per optimizer step, the first step excluded
    pairs/s    batch size / s/step
    one-time   wall time of the whole contender minus its timed steps: start-up, model loading,
               DeepSpeed / Ray Train set-up, a reference pass where there is one
    peak RSS   of the process that trains (a Ray worker's, from its metrics)
    state MB   model + gradient + optimizer state one worker holds (Ray contenders)
Writes bench/results/contenders-<model>-<loss>.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = {"smollm2": "builtin:smollm2-135m-instruct", "tiny": "builtin:tiny"}
RESULTS = Path(__file__).parent / "results"


def config(args: argparse.Namespace, overrides: list[str] = ()):  # noqa: ANN201
    from pipeline.config import load_config

    base = [f"model.policy={MODELS[args.model]}", f"loss.name={args.loss}", f"train.max_steps={args.steps}",
            "train.warmup_steps=0", "train.log_every=1", "train.save_model=false", "eval.enabled=false",
            "tracking.enabled=false"]
    return load_config(args.config, base + list(args.set) + list(overrides))


def pairs_and_batches(cfg: Any, steps: int) -> tuple[Any, list, list[list[int]]]:
    """(tokenizer, tokenized pairs, the first ``steps`` batches of pair indices)."""
    from pipeline.data.dataset import load_preference_dataset
    from pipeline.models.loading import load_tokenizer
    from pipeline.train.batches import PairBatches

    tokenizer = load_tokenizer(cfg.model.tokenizer_spec)
    pairs = load_preference_dataset(cfg.data, tokenizer).pairs
    stream = PairBatches(len(pairs), cfg.train.batch_size, cfg.train.seed).iterate()
    return tokenizer, pairs, [next(stream)[1] for _ in range(steps)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- contenders: each returns {"seconds": [per step], "notes": str, ...} ----------------------------


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    """The least a DPO step does: one padded forward of chosen+rejected through the policy (LM head on
    response positions only), one no-grad reference forward, the loss, backward, clipping, AdamW."""
    import torch
    import torch.nn.functional as F

    from pipeline.data.tokenization import collate_pairs
    from pipeline.train.setup import load_models

    cfg = config(args)
    tokenizer, pairs, batches = pairs_and_batches(cfg, args.steps)
    policy, reference = load_models(cfg)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.train.learning_rate)
    beta, b = cfg.loss.beta, cfg.train.batch_size

    def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["labels"][:, 1:] != -100  # (2B, T-1) positions predicting a response token
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logps = model.lm_head(hidden[:, :-1][mask]).log_softmax(-1)  # (N, V)
        token = logps.gather(-1, batch["labels"][:, 1:][mask].unsqueeze(-1)).squeeze(-1)  # (N,)
        rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask]
        return torch.zeros(mask.shape[0], dtype=token.dtype).index_add(0, rows, token)  # (2B,)

    seconds = []
    for indices in batches:
        started = time.perf_counter()
        batch = collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id)
        with torch.no_grad():
            ref = sequence_logps(reference, batch)
        pol = sequence_logps(policy, batch)
        margin = (pol[:b] - ref[:b]) - (pol[b:] - ref[b:])
        loss = -F.logsigmoid(beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the step is done when its loss is known
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds}


def run_trl(args: argparse.Namespace, precompute: bool = False) -> dict[str, Any]:
    """TRL's DPOTrainer with its defaults (gradient checkpointing on, reference forward every step),
    or with ``precompute_ref_log_probs=True`` (a reference pass before training, none during it)."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pipeline.train.setup import load_models

    cfg = config(args)
    tokenizer, pairs, batches = pairs_and_batches(cfg, args.steps)
    order = [i for indices in batches for i in indices]
    rows = [{"prompt_ids": pairs[i].prompt_ids, "chosen_ids": pairs[i].chosen_ids,
             "rejected_ids": pairs[i].rejected_ids} for i in order]
    policy, reference = load_models(cfg)

    class SamePairs(DPOTrainer):
        """Our tokenized pairs as they are, in our order."""

        def _prepare_dataset(self, dataset, *_args, **_kwargs):  # noqa: ANN001, ANN202
            return dataset

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
            self.started = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
            seconds.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as out:
        trl_args = DPOConfig(
            output_dir=out, per_device_train_batch_size=cfg.train.batch_size, max_length=cfg.data.max_length,
            learning_rate=cfg.train.learning_rate, lr_scheduler_type="constant", max_grad_norm=cfg.train.max_grad_norm,
            beta=cfg.loss.beta, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, dataloader_num_workers=0, seed=cfg.train.seed, precompute_ref_log_probs=precompute,
            disable_tqdm=True,
        )
        trainer = SamePairs(model=policy, ref_model=reference, args=trl_args,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                            callbacks=[StepTimer()])
        trainer.train()
    return {"seconds": seconds, "gradient_checkpointing": trl_args.gradient_checkpointing}


def run_local(args: argparse.Namespace) -> dict[str, Any]:
    """This project's single-process trainer (jobs.train without Ray): live reference, packed batches."""
    from pipeline.train.local import train_local

    with tempfile.TemporaryDirectory() as out:
        result = train_local(config(args, [f"output.dir={out}", "output.run_name=bench"]), progress=False)
    return {"seconds": [h["seconds"] for h in result.history]}


def run_ray(args: argparse.Namespace, workers: int, zero: int, mode: str = "exact", warm: bool = True) -> dict[str, Any]:
    """This project on Ray Train. ``warm``: a first run fills the reference cache and the timed run
    reads it; cold: the timed run streams the reference from its actors while it trains."""
    import ray

    from pipeline.train.distributed import train_distributed

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"output.dir={out}", f"distributed.num_workers={workers}", f"distributed.zero_stage={zero}",
                     f"distributed.cpus_per_worker={cpus / workers}", f"train.batch_size={args.batch_size // workers}",
                     f"reference.mode={mode}", "reference.cpus_per_actor=0"]
        runs = ["fill", "timed"] if warm and mode != "colocated" else ["timed"]
        for name in runs:
            started = time.perf_counter()
            result = train_distributed(config(args, overrides + [f"output.run_name={name}"]), progress=False)
            wall = time.perf_counter() - started
        moved = reference_bytes_per_pair(Path(out))
    last = result.history[-1]
    return {"seconds": [h["seconds"] for h in result.history], "wall": wall,
            "worker_peak_rss_mb": last.get("memory/peak_rss_mb"), "state_mb": last.get("memory/state_mb"),
            "reference_forward_passes": result.reference_forward_passes,
            "reference_cached_chunks": result.reference_cached_chunks, "reference_bytes_per_pair": moved}


def reference_bytes_per_pair(storage: Path) -> float | None:
    """Bytes of reference statistics per pair, as the cache stores them (what actors send per pair)."""
    from safetensors import safe_open

    size = pairs = 0
    for chunk in storage.glob("reference-cache/*/chunk-*.safetensors"):
        size += chunk.stat().st_size
        with safe_open(chunk, "pt") as f:
            pairs += f.get_slice("lengths").get_shape()[0] // 2
    return size / pairs if pairs else None


CONTENDERS = {
    "bare": run_bare,
    "trl": run_trl,
    "trl-precompute": lambda a: run_trl(a, precompute=True),
    "ours-1process": run_local,
    "ray-1w-z0": lambda a: run_ray(a, 1, 0),
    "ray-1w-z0-streamed": lambda a: run_ray(a, 1, 0, warm=False),
    "ray-1w-z2": lambda a: run_ray(a, 1, 2),
    "ray-2w-z0": lambda a: run_ray(a, 2, 0),
    "ray-2w-z2": lambda a: run_ray(a, 2, 2),
    "ray-2w-z3": lambda a: run_ray(a, 2, 3),
    "ray-1w-z0-topk": lambda a: run_ray(a, 1, 0, mode="topk"),
    "ray-1w-colocated": lambda a: run_ray(a, 1, 0, mode="colocated"),
}
DEFAULT = ["bare", "trl", "trl-precompute", "ours-1process", "ray-1w-z0", "ray-1w-z0-streamed", "ray-2w-z0",
           "ray-2w-z2"]


def one(args: argparse.Namespace) -> None:
    """Child process: run one contender, print one JSON line."""
    started = time.perf_counter()
    name, _, loss = args.one.partition("@")
    args.loss = loss or args.loss
    out = CONTENDERS[name](args)
    out["wall"] = out.get("wall", time.perf_counter() - started)
    out["peak_rss_mb"] = peak_rss_mb()
    print("BENCH " + json.dumps(out), flush=True)


def summary(name: str, out: dict[str, Any], batch_size: int) -> dict[str, Any]:
    steady = out["seconds"][1:] or out["seconds"]
    s_step = statistics.median(steady)
    return {"contender": name, "s/step": round(s_step, 3), "pairs/s": round(batch_size / s_step, 3),
            "steps timed": len(steady), "one-time s": round(out["wall"] - sum(out["seconds"]), 1),
            "peak RSS MB": round(out.get("worker_peak_rss_mb") or out["peak_rss_mb"]),
            "state MB": round(out["state_mb"]) if out.get("state_mb") else "",
            "ref. bytes/pair": round(out["reference_bytes_per_pair"]) if out.get("reference_bytes_per_pair") else ""}


def machine() -> str:
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, trl {trl.__version__}, python {platform.python_version()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--loss", default="dpo")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="dpo", help="results file suffix: RESULTS/contenders-MODEL-OUT.{md,csv}")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files (default bench/results)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step, all workers together")
    p.add_argument("--only", help=f"comma-separated contenders, NAME or NAME@LOSS (default: {','.join(DEFAULT)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every contender, e.g. --set model.dtype=bfloat16 (repeatable)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    names = args.only.split(",") if args.only else DEFAULT
    unknown = sorted({n.partition("@")[0] for n in names} - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contenders {unknown}; known: {sorted(CONTENDERS)}")
    rows = []
    for name in names:
        command = [sys.executable, "-m", "bench.contenders", "--one", name, "--model", args.model, "--loss", args.loss,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--config", args.config,
                   *(f"--set={s}" for s in args.set)]
        print(f"... {name}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
        if done.returncode or line is None:
            sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        rows.append(summary(name, json.loads(line[6:]), args.batch_size))
        print("    " + json.dumps(rows[-1]), flush=True)
    write(rows, args)


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    header = list(rows[0])
    lines = [f"# Contenders: {MODELS[args.model]}, loss {args.loss} (NAME@LOSS: LOSS), batch {args.batch_size} pairs, "
             f"{args.steps} steps each" + "".join(f", {s}" for s in args.set), "", f"machine: {machine()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"contenders-{args.model}-{args.out}"
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    with stem.with_suffix(".csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
