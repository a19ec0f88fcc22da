"""Wall time of a Ray Tune sweep against the same trials run as separate training jobs.

    python -m bench.sweep_vs_jobs                       # configs/default.yaml: SmolLM2, 2 losses x 2 betas
    python -m bench.sweep_vs_jobs --config configs/tiny.yaml eval.enabled=true ...

Both sides run as a user would, one after the other on this machine: ``python -m jobs.sweep``
(one Ray start, one reference pass, trials one at a time), then one ``python -m jobs.train`` per
grid point of ``sweep.space``, each in its own output folder (its own Ray start and its own,
cold, reference cache). The sweep's extra reference evaluation is switched off, so both sides do
the same training and evaluation work. Writes bench/results/sweep_vs_jobs.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.tune.space import parse_space


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def reference_passes(out: Path) -> int:
    """Reference forward passes on training pairs logged by every run under ``out`` (MLflow)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rayprefopt")
    total = 0
    for run in client.search_runs([experiment.experiment_id]):
        total += sum(m.value for m in client.get_metric_history(run.info.run_id, "reference/forward_passes"))
    return int(total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--keep", action="store_true", help="keep the runs' outputs (several GB with SmolLM2)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    dims = parse_space(cfg.sweep.space, "grid")
    if any(d.kind != "grid" for d in dims):
        raise SystemExit("bench.sweep_vs_jobs needs a grid-only sweep.space")
    grid = [dict(zip([d.key for d in dims], values, strict=True))
            for values in itertools.product(*[d.values for d in dims])]
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-", dir="outputs" if Path("outputs").is_dir() else None))
    common = ["--config", args.config, *args.overrides]
    rows = []
    try:
        sweep_s = timed(["jobs.sweep", *common, f"output.dir={root / 'sweep'}", "output.run_name=sweep",
                         "sweep.evaluate_reference=false"])
        rows.append(("jobs.sweep", len(grid), sweep_s, reference_passes(root / "sweep")))
        job_s, job_passes = 0.0, 0
        for i, point in enumerate(grid):
            out = root / f"job-{i}"
            job_s += timed(["jobs.train", *common, f"output.dir={out}",
                            *[f"{k}={json.dumps(v)}" for k, v in point.items()]])
            job_passes += reference_passes(out)
        rows.append(("jobs.train x N", len(grid), job_s, job_passes))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    lines = [f"# A {len(grid)}-trial sweep against {len(grid)} separate jobs: {args.config}",
             f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores; "
             f"overrides: {' '.join(args.overrides) or 'none'}; space: {json.dumps(cfg.sweep.space)}", "",
             "| how | runs | wall s | s per run | reference forward passes |", "|---|---|---|---|---|"]
    for how, n, seconds, passes in rows:
        lines.append(f"| {how} | {n} | {seconds:.0f} | {seconds / n:.0f} | {passes} |")
    lines += ["", f"sweep / separate jobs: {rows[0][2] / rows[1][2]:.2f}x the wall time",
              f"command: python -m bench.sweep_vs_jobs --config {args.config} {' '.join(args.overrides)}".rstrip()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "sweep_vs_jobs.md"
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
