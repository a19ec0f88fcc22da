"""Checkpoint files that were cut short, corrupted, planted or never finished (no Ray, no training):
each is refused with a message naming the file, and a pickled payload is never executed."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoints
from pipeline.train.checkpoints import CheckpointError, verify, write_manifest


def fake_checkpoint(folder: Path, ranks: int = 2, step: int = 4) -> Path:
    """Files as two ranks leave them after Ray Train merges their folders, each rank's manifest last."""
    for rank in range(ranks):
        part = folder / f"part{rank}"
        (part / "state").mkdir(parents=True)
        torch.save({"w": torch.arange(1000.0) * (rank + 1)}, part / "state" / f"zero_pp_rank_{rank}_optim_states.pt")
        write_manifest(part, rank, step, world=ranks)
        for path in part.rglob("*"):
            if path.is_file():
                target = folder / path.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
    return folder


def test_a_complete_checkpoint_verifies_with_its_step(tmp_path):
    assert verify(fake_checkpoint(tmp_path), world=2) == 4


def test_a_truncated_file_is_named(tmp_path):
    folder = fake_checkpoint(tmp_path)
    target = folder / "state" / "zero_pp_rank_1_optim_states.pt"
    with target.open("r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=rf"{target} is truncated or overwritten: 100 bytes"):
        verify(folder, world=2)


def test_a_flipped_byte_is_named(tmp_path):
    folder = fake_checkpoint(tmp_path)
    target = folder / "state" / "zero_pp_rank_0_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{target} is corrupted: its SHA-256 differs"):
        verify(folder, world=2)


def test_a_checkpoint_cut_short_before_a_rank_finished_is_not_taken_for_good(tmp_path):
    """A rank that died or ran out of space mid-write never wrote its manifest (it is written last)."""
    folder = fake_checkpoint(tmp_path)
    (folder / "manifest-rank1.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest-rank1.json is missing: the checkpoint was not completely"):
        verify(folder, world=2)
    (folder / "manifest-rank0.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest-rank0.json is unreadable"):
        verify(folder, world=2)


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def planted(folder: Path, marker: Path) -> Path:
    path = folder / "mp_rank_00_model_states.pt"
    with path.open("wb") as f:
        pickle.dump({"module": Payload(marker)}, f, protocol=2)  # torch.save's protocol
    return path


def test_a_pickle_payload_in_a_checkpoint_is_not_executed(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    path = planted(tmp_path, marker)
    # DeepSpeed's own loader, as engine.load_checkpoint calls it (torch.load with weights_only=False) ...
    with checkpoints.data_only_unpickling(), pytest.raises(pickle.UnpicklingError, match="unsupported GLOBAL posix.system"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards
    # ... which, unguarded, runs the payload (then fails on what it returned): a real attack.
    with pytest.raises(RuntimeError, match="magic number"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert marker.exists()


def test_restore_refuses_a_planted_checkpoint_and_lists_every_bad_one(tmp_path):
    """Through :func:`checkpoints.restore`: the newest checkpoint has a payload behind a valid manifest
    (an attacker rewrote both), the older one is truncated."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from ray.train import Checkpoint

    class Engine:
        """DeepSpeed's engine as far as restore sees it: load_checkpoint reads state/<file> with
        DeepSpeed's checkpoint engine (torch.load, weights_only=False)."""

        def load_checkpoint(self, folder, tag):
            return folder, TorchCheckpointEngine().load(str(Path(folder) / tag / "mp_rank_00_model_states.pt"))

    marker = tmp_path / "pwned"
    old, new = tmp_path / "run" / "checkpoint_2026-01-01_00-00-01", tmp_path / "run" / "checkpoint_2026-01-01_00-00-02"
    for folder in (old, new):
        (folder / "state").mkdir(parents=True)
    torch.save({"step": 2, "position": [0, 0]}, old / "state" / "mp_rank_00_model_states.pt")
    write_manifest(old, 0, 2)
    with (old / "state" / "mp_rank_00_model_states.pt").open("r+b") as f:
        f.truncate(10)
    planted(new / "state", marker)
    write_manifest(new, 0, 4)
    with pytest.raises(CheckpointError, match="holds pickled objects that are not plain data; refusing"):
        checkpoints.restore(Engine(), Checkpoint(str(new)), 0, 1, tmp_path, num_pairs=4)
    assert not marker.exists()
    # Without the planted one, the truncated one is passed over and nothing is left to trust.
    import shutil

    shutil.rmtree(new)
    with pytest.raises(CheckpointError, match=rf"no checkpoint of this run can be trusted:\n  {old}: checkpoint file "
                                              r".*mp_rank_00_model_states.pt is truncated"):
        checkpoints.restore(Engine(), Checkpoint(str(old)), 0, 1, tmp_path, num_pairs=4)


def test_a_model_folder_with_a_pickled_payload_is_not_executed(tmp_path, tiny_model_dir):
    """Weights load with safetensors or torch's weights-only unpickler: a pytorch_model.bin payload is refused."""
    from pipeline.errors import ModelLoadError
    from pipeline.models.loading import load_causal_lm

    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with (folder / "pytorch_model.bin").open("wb") as f:
        pickle.dump(Payload(marker), f, protocol=2)
    with pytest.raises((ModelLoadError, OSError, pickle.UnpicklingError, RuntimeError)):
        load_causal_lm(str(folder))
    assert not marker.exists()


def test_the_ledger_of_every_rank_is_summed(tmp_path):
    for rank, counts in enumerate(([1, 0, 2], [0, 1, 1])):
        (tmp_path / f"trained-pairs-rank{rank}.json").write_text(json.dumps(counts))
    record = checkpoints.merge_ledgers(tmp_path, 2)
    assert record["counts"] == [1, 1, 3] and record["trained"] == 5 and record["never"] == 0
    assert json.loads((tmp_path / "trained_pairs.json").read_text())["counts"] == [1, 1, 3]
