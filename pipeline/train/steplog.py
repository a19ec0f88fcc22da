"""One training loop's bookkeeping, written once for every loop of the project.

The single-process trainer, the Ray Train worker and the supervised stages (SFT, the reward model)
all keep the same record of a step: its seconds and throughput (pairs and tokens per second), a line
in ``metrics.jsonl`` and MLflow every ``log_every`` steps and at the last, evaluation points in
``eval.jsonl`` and MLflow when the evaluator says one is due, and a progress bar. Only the writing
rank (rank 0; the single process) writes anything; the others hold a :class:`StepLog` that counts
time and writes nothing, so a loop reads the same on every rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.tokenization import TokenizedPair


def pair_tokens(pairs: Sequence[TokenizedPair], indices: Sequence[int]) -> int:
    """Tokens of the pairs ``indices`` (prompt + chosen and prompt + rejected each: the rows a padded
    batch holds), counted on the host: no device sync."""
    return sum(pairs[i].chosen_length + pairs[i].rejected_length for i in indices)


def progress_bar(where: str, total: int, start: int, desc: str) -> Any:
    """A progress bar from step ``start`` of ``total``: tqdm in this process (``where="local"``) or Ray's
    tqdm, which a worker's driver draws (``where="ray"``)."""
    if where == "ray":
        from ray.experimental.tqdm_ray import tqdm
    else:
        from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="step")
    if start:
        bar.update(start)
    return bar


class StepLog:
    """The record of one loop in ``folder``. ``write``: this rank writes (files, MLflow, the bar).
    ``append``: a resumed run adds to the files of the run before it."""

    def __init__(self, folder: Path, tracker: Any, *, total: int, name: str, write: bool, log_every: int = 1,
                 evaluator: Any = None, bar: Any = None, append: bool = True, postfix: Sequence[str] = ("loss",)):
        self.tracker = tracker
        self.total = total
        self.name = name
        self.log_every = log_every
        self.evaluator = evaluator
        self.bar = bar if write else None
        self.postfix = tuple(postfix)
        mode = "a" if append else "w"
        self.metrics_file = (folder / "metrics.jsonl").open(mode, encoding="utf-8") if write else None
        self.eval_file = (folder / "eval.jsonl").open(mode, encoding="utf-8") if write and evaluator else None
        self.history: list[dict[str, float]] = []  # every step's record, logged or not (this process)
        self.evaluations: list[dict[str, float]] = []
        self.started = time.perf_counter()

    def begin(self) -> None:
        """A step starts now: its seconds count from here."""
        self.started = time.perf_counter()

    def step(self, step: int, metrics: dict[str, float], *, pairs: int | None = None,
             tokens: int | float | None = None) -> dict[str, float]:
        """Record step ``step`` (1-based) as done: ``metrics`` gains seconds and, when counts are given,
        ``throughput/pairs_per_s`` and ``throughput/tokens_per_s``; written when due. Returns them."""
        seconds = time.perf_counter() - self.started
        metrics = {**metrics, "seconds": seconds}
        if pairs is not None:
            metrics["throughput/pairs_per_s"] = pairs / seconds
        if tokens is not None:
            metrics["throughput/tokens_per_s"] = tokens / seconds
        self.history.append({"step": step, **metrics})
        if self.metrics_file is not None and (step % self.log_every == 0 or step == self.total):
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics_file.flush()
            self.tracker.log_metrics(metrics, step=step)
        if self.bar is not None:
            shown = " ".join(f"{k.split('/')[-1]} {metrics[k]:.4f}" for k in self.postfix if k in metrics)
            self.bar.set_description(f"{self.name} {shown}".strip())
            self.bar.update(1)
        return metrics

    def evaluation_due(self, step: int) -> bool:
        return self.evaluator is not None and self.evaluator.due(step, self.total)

    def evaluating(self, step: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.name} evaluating at step {step}")

    def evaluation(self, step: int, point: dict[str, float]) -> None:
        """One evaluation point at ``step``: eval.jsonl and MLflow."""
        self.evaluations.append({"step": step, **point})
        if self.eval_file is not None:
            self.eval_file.write(json.dumps({"step": step, **point}) + "\n")
            self.eval_file.flush()
            self.tracker.log_metrics(point, step=step)

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in (self.metrics_file, self.eval_file):
            if handle is not None:
                handle.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
