"""What the supervised stages share: a Ray Train (DDP) run, a step loop, and where outputs go.

SFT and the reward model are small supervised jobs: plain data parallelism (torch DDP, gloo on
CPU, NCCL on GPU, through ``ray.train.torch.prepare_model``) is all they need. Each worker takes
slice ``rank`` of every global batch of ``batch_size x workers`` examples from the seeded
:class:`PairBatches` sampler; rank 0 logs to the MLflow run the driver opened and saves the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cluster import quiet_train_reports, ray_train_defaults, require_resources
from pipeline.config import RunConfig, StageTrainConfig
from pipeline.errors import PipelineError
from pipeline.tracking import attach_tracker, clear_undelivered, flush_worker
from pipeline.train.batches import PairBatches
from pipeline.train.setup import warmup_schedule
from pipeline.train.steplog import StepLog, progress_bar


class StageFailed(PipelineError):
    """A stage's Ray Train run failed."""


def fit_stage(name: str, loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
              stage: StageTrainConfig, storage: Path) -> None:
    """Run ``loop`` on ``stage.num_workers`` Ray Train workers (DDP) and wait for it."""
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_train_defaults()
    trainer = TorchTrainer(
        train_loop_per_worker=loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=stage.num_workers, use_gpu=stage.use_gpu,
                                     resources_per_worker={"CPU": stage.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if stage.use_gpu else "gloo"),
        run_config=RayRunConfig(name=name, storage_path=str(storage)),
    )

    clear_undelivered(storage / name)  # not ours: an earlier run of this name left it
    try:
        trainer.fit()
    except Exception as e:
        raise StageFailed(f"{name} failed: {type(e).__name__}: {e}") from e


def check_cluster(stage: StageTrainConfig) -> None:
    """Refuse a stage the cluster can never hold (Ray would wait for resources forever)."""
    require_resources([(stage.num_workers, {"CPU": stage.cpus_per_worker, "GPU": float(stage.use_gpu)})],
                      f"{stage.num_workers} worker(s) x {stage.cpus_per_worker:g} CPU (use_gpu={stage.use_gpu})")


def check_batches(num_examples: int, stage: StageTrainConfig, what: str) -> None:
    """On the driver, before any model loads: one global batch must fit in the data."""
    need = stage.batch_size * stage.num_workers
    if num_examples < need:
        raise PipelineError(f"{num_examples} {what} are fewer than one global batch "
                            f"(batch_size {stage.batch_size} x num_workers {stage.num_workers} = {need})")


def prepare_worker(stage: StageTrainConfig, model: torch.nn.Module) -> tuple[int, int, Any, Any, Any]:
    """(rank, world size, the model under DDP, AdamW, the warm-up/decay schedule) in a Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.learning_rate)
    return (context.get_world_rank(), context.get_world_size(), model, optimizer,
            warmup_schedule(optimizer, stage.warmup_steps, stage.max_steps))


def apply_gradients(loss: torch.Tensor, model: Any, optimizer: Any, scheduler: Any, max_grad_norm: float | None) -> float:
    """Backward (DDP averages the workers' gradients), clip, step; returns the gradient norm."""
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def worker_batches(num_examples: int, stage: StageTrainConfig, rank: int, world: int) -> Iterator[list[int]]:
    """This worker's example indices of each global batch, forever (epochs reshuffled by seed)."""

    b = stage.batch_size
    for _, indices in PairBatches(num_examples, b * world, stage.seed).iterate():
        yield indices[rank * b : (rank + 1) * b]


@dataclass
class StageJob:
    """What a stage's driver hands each of its Ray Train workers."""

    cfg: RunConfig
    examples: Any  # ObjectRef of the training examples (SFT: (prompt ids, response ids); reward model: pairs)
    pad_token_id: int
    run_folder: Path  # <storage>/<stage run name>: metrics and the model
    run_id: str | None  # the driver's MLflow run, which rank 0 logs into
    tracking_uri: str | None
    progress: bool = True
    held_out: Any = None  # reward model: ObjectRef of the held-out pairs
    base: str | None = None  # reward model: the resolved backbone spec


class StageLog(StepLog):
    """A stage worker's :class:`StepLog`: rank 0 writes metrics.jsonl, logs every step into the driver's
    MLflow run, draws a bar; what MLflow has not taken is flushed when it closes."""

    def __init__(self, job: StageJob, rank: int, total: int, name: str):
        quiet_train_reports()
        tracker = attach_tracker(job.tracking_uri, job.run_id, rank, job.cfg.tracking.flush_timeout_s)
        bar = progress_bar("ray", total, 0, name) if rank == 0 and job.progress else None
        super().__init__(job.run_folder, tracker, total=total, name=name, write=rank == 0, bar=bar,
                         postfix=("loss", "accuracy"))
        self.folder = job.run_folder

    def close(self) -> None:
        writing = self.metrics_file is not None
        super().close()
        if writing:
            flush_worker(self.tracker, self.folder)


def all_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over workers."""
    import torch.distributed as dist

    value = value.detach().double().cpu().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
