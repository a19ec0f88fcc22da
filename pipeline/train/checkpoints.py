"""Training checkpoints that are checked before they are trusted.

After DeepSpeed's files, each rank writes ``manifest-rank<r>.json``: every file
it wrote, with its size and SHA-256, and the step. Ray Train merges the ranks'
folders when it stores the checkpoint. A checkpoint is *good* when every rank's
manifest is there and every file listed has its recorded size and hash:

* cut short (a crash, a full disk while it was written or copied): a manifest
  or a file is missing, or a file is short;
* corrupted afterwards: a hash differs.

Restoring tries the checkpoint Ray Train hands back, then the older ones in the
same run folder, newest first; each one passed over is logged with the file
that failed and recorded in ``restores.jsonl`` in the run folder. With none
good, :class:`CheckpointError` lists them all.

DeepSpeed unpickles its files with ``weights_only=False``; here they are loaded
with torch's data-only unpickler (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), which
accepts tensors, containers and the three DeepSpeed state classes below: a
pickled payload in a checkpoint is refused, never executed.

Each rank also keeps a ledger, ``pairs-rank<r>.json`` in the checkpoint: how
many times it has trained on each pair. It is restored with the checkpoint, so
at the end it counts exactly the pairs whose gradients are in the final weights.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.loading import resolve

log = logging.getLogger(__name__)

TAG = "state"  # DeepSpeed's tag: the state lives in <checkpoint>/state/
MANIFEST = "manifest-rank{rank}.json"
LEDGER = "pairs-rank{rank}.json"
RESTORES = "restores.jsonl"

# Plain state classes DeepSpeed pickles into its optimizer files (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints; the dynamic loss
# scaler by reading DeepSpeed's ZeRO optimizers' state_dict, float16 being untestable on CPU).
DEEPSPEED_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # float16 runs
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


class CheckpointError(PipelineError):
    """A checkpoint cannot be written, or none that can be trusted can be read."""


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, rank: int, step: int, world: int = 1) -> Path:
    """List every file this rank wrote under ``folder`` (synced to disk first); written last, atomically,
    so a manifest only exists for a checkpoint whose files are all complete."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("manifest-rank")):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    target = folder / MANIFEST.format(rank=rank)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps({"step": step, "rank": rank, "world": world, "files": files}, indent=1),
                       encoding="utf-8")
    _fsync(partial)
    os.replace(partial, target)
    return target


def verify(folder: Path, world: int) -> int:
    """The step of a good checkpoint; a :class:`CheckpointError` naming the first file that is wrong."""
    try:
        return _verify(folder, world)
    except OSError as e:  # unreadable storage: this checkpoint cannot be trusted, an older one may
        raise CheckpointError(f"checkpoint {folder} cannot be read: {e}") from None


def _verify(folder: Path, world: int) -> int:
    step = None
    for rank in range(world):
        manifest = folder / MANIFEST.format(rank=rank)
        if not manifest.is_file():
            raise CheckpointError(f"{manifest} is missing: the checkpoint was not completely written "
                                  "(a crash or a full disk while it was saved)")
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
            files = {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in record["files"].items()}
            written_by = int(record.get("world", world))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{manifest} is unreadable: {type(e).__name__}: {e}") from None
        if written_by != world:
            raise CheckpointError(f"{manifest} was written by {written_by} workers, this run has {world}")
        for name, (size_then, digest) in files.items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing")
            size = path.stat().st_size
            if size != size_then:
                raise CheckpointError(f"checkpoint file {path} is truncated or overwritten: {size} bytes, "
                                      f"{size_then} when it was written")
            if _sha256(path) != digest:
                raise CheckpointError(f"checkpoint file {path} is corrupted: its SHA-256 differs from the one "
                                      "recorded when it was written")
        step = record["step"] if step is None else step
    return int(step or 0)


def save(engine: Any, rank: int, world: int, step: int, position: list[int], ledger: list[int]) -> Path:
    """This rank's part of a checkpoint in a fresh local folder, manifest last. Running out of space is a
    :class:`CheckpointError` naming the folder and what is free; the folder is removed."""
    folder = Path(tempfile.mkdtemp(prefix="rayprefopt-ckpt-"))
    try:
        engine.save_checkpoint(str(folder), tag=TAG, client_state={"step": step, "position": position})
        (folder / LEDGER.format(rank=rank)).write_text(json.dumps(ledger), encoding="utf-8")
        write_manifest(folder, rank, step, world)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        if (full := out_of_space(e, folder.parent, f"the checkpoint of step {step}")) is not None:
            raise full from e
        raise
    return folder


def out_of_space(error: BaseException, where: Path | str, what: str) -> CheckpointError | None:
    """A clear CheckpointError when ``error`` is a full disk (torch reports it as a RuntimeError), else
    None."""
    text = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text \
        or "file write failed" in text
    if not full:
        return None
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"no space left on the device of {where} ({free}) to write {what}; free space, point "
                           f"distributed.storage_path elsewhere or lower distributed.keep_checkpoints: {text}")


@contextmanager
def data_only_unpickling() -> Iterator[None]:
    """Every torch.load inside (DeepSpeed's included) uses the weights-only unpickler."""
    import importlib

    import torch

    classes = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")  # torch refuses both set
    before = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(classes):
            yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def candidates(checkpoint: Any) -> list[Any]:
    """The checkpoint Ray Train reported last, then the older ones beside it, newest first (Ray names
    them checkpoint_<timestamp>). Newer folders are left alone: Ray never registered them (an upload
    cut short, or a previous run's leftovers)."""
    import posixpath

    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    parent = posixpath.dirname(checkpoint.path.rstrip("/"))
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return [checkpoint]
    reported = posixpath.basename(checkpoint.path.rstrip("/"))
    older = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_")
                    and posixpath.basename(i.path.rstrip("/")) < reported), reverse=True)
    return [checkpoint] + [Checkpoint(path=p, filesystem=checkpoint.filesystem) for p in older]


def restore(engine: Any, checkpoint: Any, rank: int, world: int, run_folder: Path,
            num_pairs: int) -> tuple[int, list[int], list[int]] | None:
    """Load the newest good checkpoint from ``checkpoint`` back: (step, batch position, ledger), or None
    for a fresh start. Every checkpoint passed over is logged and recorded in ``restores.jsonl``."""
    if checkpoint is None:
        return None
    skipped = []
    for candidate in candidates(checkpoint):
        with candidate.as_directory() as directory:
            folder = Path(directory)
            try:
                verify(folder, world)
                with data_only_unpickling():
                    path, client = engine.load_checkpoint(str(folder), tag=TAG)
            except CheckpointError as e:
                log.warning("rank %d: passing over checkpoint %s: %s", rank, candidate.path, e)
                skipped.append({"checkpoint": candidate.path, "problem": str(e)})
                continue
            except Exception as e:
                if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
                    raise CheckpointError(f"checkpoint {candidate.path} holds pickled objects that are not plain "
                                          f"data; refusing to load it (a checkpoint is data, never code): {e}") from None
                raise
            if path is None:
                skipped.append({"checkpoint": candidate.path, "problem": f"no DeepSpeed state under tag {TAG!r}"})
                continue
            ledger_file = folder / LEDGER.format(rank=rank)
            ledger = json.loads(ledger_file.read_text(encoding="utf-8")) if ledger_file.is_file() else [0] * num_pairs
        if rank == 0:
            with (run_folder / RESTORES).open("a", encoding="utf-8") as f:
                f.write(json.dumps({"restored": candidate.path, "step": int(client["step"]), "skipped": skipped}) + "\n")
        return int(client["step"]), list(client["position"]), ledger
    raise CheckpointError("no checkpoint of this run can be trusted:\n"
                          + "\n".join(f"  {s['checkpoint']}: {s['problem']}" for s in skipped))


def merge_ledgers(run_folder: Path, world: int) -> dict[str, Any] | None:
    """Every rank's final ledger (``trained-pairs-rank<r>.json``) summed into ``trained_pairs.json``."""
    parts = [run_folder / f"trained-{LEDGER.format(rank=r)}" for r in range(world)]
    if not all(p.is_file() for p in parts):
        return None
    counts = [sum(c) for c in zip(*(json.loads(p.read_text(encoding="utf-8")) for p in parts), strict=True)]
    record = {"pairs": len(counts), "trained": sum(counts), "never": sum(c == 0 for c in counts),
              "max_times": max(counts, default=0), "counts": counts}
    (run_folder / "trained_pairs.json").write_text(json.dumps(record), encoding="utf-8")
    for p in parts:
        p.unlink()
    return record


BYTES_PER_PARAMETER = 16  # DeepSpeed + AdamW: weights, a float32 master copy, two float32 moments


def parameter_count(spec: str, revision: str | None = None) -> int | None:
    """Parameters of a local model, from its safetensors headers (nothing is loaded); None if unknown."""
    from safetensors import safe_open

    resolved = resolve(spec, revision)
    files = list(Path(resolved.location).glob("*.safetensors")) if resolved.local else []
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                total += math.prod(f.get_slice(key).get_shape())
    return total


def check_space(cfg: Any, storage: Path) -> None:
    """Before any training: ``storage`` must hold ``keep_checkpoints`` + 1 checkpoints (Ray Train writes
    the next before it deletes the oldest) and the exported model, estimated from the policy's size."""
    params = parameter_count(cfg.model.policy, cfg.model.revision)
    if params is None:
        return
    each = params * BYTES_PER_PARAMETER
    need = each * (cfg.distributed.keep_checkpoints + 1) + params * 4
    free = shutil.disk_usage(_existing(storage)).free
    if free < need:
        raise CheckpointError(
            f"storage {storage} has {free / 2**20:.1f} MiB free; this run needs about {need / 2**20:.1f} MiB: "
            f"checkpoints of {each / 2**20:.1f} MiB ({params:,} parameters x {BYTES_PER_PARAMETER} bytes) x "
            f"(distributed.keep_checkpoints={cfg.distributed.keep_checkpoints} + 1 being written) and the "
            "exported model. Free space, point distributed.storage_path elsewhere or lower keep_checkpoints")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
