"""Faults a test installs into a distributed run through :class:`pipeline.train.distributed.RunHooks`.

Production code carries none of this: each loop calls its hook only when one is installed. The
hooks run inside Ray Train workers and reference actors, so they are pickled by value (a worker
need not import this module).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ray import cloudpickle

from pipeline.cluster import actor_restarted

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class KillWorker:
    """SIGKILL worker ``rank`` once, at the start of step ``step`` (0-based), after ``delay_s`` seconds
    (Ray Train registers a reported checkpoint when its controller next polls the workers, every
    0.5 s here: a crash sooner resumes from the checkpoint before) and, with ``truncate_latest``,
    after cutting the newest checkpoint's model file in half."""

    rank: int
    step: int
    delay_s: float = 0.0
    truncate_latest: bool = False

    def marker(self, run_folder: Path) -> Path:
        return run_folder / f".fault-kill-worker-{self.rank}-{self.step}"

    def __call__(self, rank: int, step: int, run_folder: Path) -> None:
        if (rank, step) != (self.rank, self.step) or self.marker(run_folder).exists():
            return  # not this one, or already killed once: the restarted run goes on
        self.marker(run_folder).touch()
        time.sleep(self.delay_s)
        if self.truncate_latest:
            newest = max(p for p in run_folder.glob("checkpoint_*") if p.is_dir())
            target = next(newest.rglob("*model_states.pt"))
            with target.open("r+b") as f:
                f.truncate(target.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Each:
    """Several worker-step hooks in one run, called in order."""

    hooks: list

    def __call__(self, rank: int, step: int, run_folder: Path) -> None:
        for hook in self.hooks:
            hook(rank, step, run_folder)


@dataclass(frozen=True)
class FillStorage:
    """Rank 0 fills the storage's disk at the start of step ``step``, leaving ``leave_bytes``, as another
    tenant would."""

    step: int
    leave_bytes: int

    def __call__(self, rank: int, step: int, run_folder: Path) -> None:
        filler = run_folder.parent / ".fault-filler"
        if rank != 0 or step != self.step or filler.exists():
            return
        with filler.open("wb") as f:
            while (free := shutil.disk_usage(run_folder).free) > self.leave_bytes:
                f.write(bytes(min(free - self.leave_bytes, 2**20)))
                f.flush()


@dataclass(frozen=True)
class KillReference:
    """SIGKILL reference actor ``actor`` once, when it starts its task number ``task`` (from 0)."""

    actor: int
    task: int

    def __call__(self, actor: int, task: int) -> None:
        if (actor, task) == (self.actor, self.task) and not actor_restarted():
            os.kill(os.getpid(), signal.SIGKILL)
