"""The storage path's disk filling up: refused before training when the run's checkpoints cannot fit,
and a clear error, never a half-written checkpoint taken for a good one, when it fills mid-run.

The storage is a small tmpfs mounted for the test (as root, which CI is); elsewhere the test skips.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.train.checkpoints import CheckpointError, verify
from pipeline.train.distributed import RunHooks, TrainingFailed, train_distributed
from tests.conftest import TINY_CONFIG
from tests.faults.injection import FillStorage


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked for; unmounted afterwards."""
    mounted = []

    def mount(megabytes: int) -> Path:
        point = tmp_path / f"disk-{megabytes}m"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def config(tmp_path: Path, storage: Path, name: str):
    return load_config(TINY_CONFIG, ["train.max_steps=6", "train.warmup_steps=1", "data.limit=16",
                                     "distributed.checkpoint_every=2", "distributed.keep_checkpoints=2",
                                     "reference.cpus_per_actor=0.5", f"output.dir={tmp_path / 'out'}",
                                     f"output.run_name={name}", f"distributed.storage_path={storage}"])


def test_storage_too_small_for_the_checkpoints_is_refused_before_training(tmp_path, small_disk):
    storage = small_disk(3)  # the tiny model's 3 checkpoints and export need about 5.6 MiB
    with pytest.raises(CheckpointError, match=rf"storage {storage} has 3.0 MiB free; this run needs about 5.\d MiB"
                                              r".*keep_checkpoints=2 \+ 1 being written"):
        train_distributed(config(tmp_path, storage, "too-small"), progress=False)
    assert not (tmp_path / "out" / "mlflow.db").exists()  # refused before MLflow, Ray or a model load


@pytest.mark.usefixtures("ray_cluster")
def test_a_disk_filling_mid_run_is_a_clear_error_and_leaves_only_good_checkpoints(tmp_path, small_disk):
    storage = small_disk(12)
    with pytest.raises(TrainingFailed, match=rf"no space left on the device of {storage} \(0\.\d MiB free\)"):
        train_distributed(config(tmp_path, storage, "filled"), progress=False,
                          hooks=RunHooks(worker_step=FillStorage(step=3, leave_bytes=100_000)))
    run = storage / "filled"
    folders = sorted(run.glob("checkpoint_*"))
    verdicts = []
    for folder in folders:
        try:
            verdicts.append(verify(folder, world=1))
        except CheckpointError as e:  # whatever the failed write left behind is not taken for good
            verdicts.append(str(e))
    assert [v for v in verdicts if isinstance(v, int)] == [2], verdicts
