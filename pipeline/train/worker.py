"""The Ray Train worker loop: the policy under DeepSpeed ZeRO, reference statistics from the feed.

Every worker runs :func:`train_loop`. Data parallelism: each micro-step takes one
global batch of ``batch_size * world_size`` pairs from :class:`PairBatches` and
worker r trains on slice r of it, so the pairs of an optimizer step are the
same whatever the number of workers, and a single-process run with
``batch_size * world_size`` pairs per micro-batch sees exactly the same data.

Checkpoints (every ``distributed.checkpoint_every`` steps and at the end) hold
the DeepSpeed state (ZeRO shards, optimizer, LR schedule) and, in its client
state, the step and the :class:`BatchPosition` of the next micro-batch; a
restarted worker group resumes from the newest *good* one (see
:mod:`pipeline.train.checkpoints`), so no pair is skipped or seen twice. Each
rank's ledger of trained pairs travels with the checkpoints and ends in
``trained_pairs.json``, which proves it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cluster import quiet_train_reports, storage_root
from pipeline.config import RunConfig
from pipeline.data.tokenization import collate_pairs
from pipeline.eval.evaluator import all_gather
from pipeline.models.forward import ResponseLogits
from pipeline.models.loading import load_causal_lm
from pipeline.models.packing import pack_batch, packing_supported
from pipeline.tracking import attach_tracker, flush_worker
from pipeline.train import checkpoints
from pipeline.train.batches import BatchPosition, PairBatches
from pipeline.train.setup import adamw, save_policy, warmup_schedule
from pipeline.train.step import StepOptions, add_metrics, micro_batch_loss
from pipeline.train.steplog import StepLog, pair_tokens, progress_bar


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    t, d = cfg.train, cfg.distributed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": d.use_gpu}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": d.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        # The optimizer is the single-process trainer's fused torch AdamW, passed to deepspeed.initialize
        # (DeepSpeed's config builds only the for-each one; its CPU Adam would need a compiled op).
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: RunConfig, world_size: int):
    """The DeepSpeed engine around :class:`ResponseLogits`; ``engine.module.packing`` says whether
    batches go padding-free (checked on the full model, before ZeRO-3 partitions it)."""
    import deepspeed

    m = cfg.model
    # DeepSpeed casts to bf16/fp16 itself and keeps float32 master weights.
    lm = load_causal_lm(m.policy, dtype="float32" if m.dtype in ("bfloat16", "float16") else m.dtype,
                        revision=m.revision, trust_remote_code=m.trust_remote_code)
    model = ResponseLogits(lm)
    model.packing = cfg.train.packing and packing_supported(lm)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=adamw([p for p in model.parameters() if p.requires_grad], cfg),
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=lambda optimizer: warmup_schedule(optimizer, cfg.train.warmup_steps, cfg.train.max_steps),
    )
    if world_size == 1 and cfg.distributed.zero_stage == 0:
        # One worker has nothing to average, but DeepSpeed would still flatten every gradient into
        # one buffer, all-reduce it with itself and copy it back, every step.
        engine.enable_backward_allreduce = False
    return engine


def state_bytes(engine: Any) -> int:
    """Bytes this rank holds for model and optimizer state: parameters (ZeRO-3: this rank's partition),
    gradients, optimizer state and ZeRO's flat partitions, each storage counted once (ZeRO's
    flat buffers alias parameters and gradients)."""
    storages: dict[int, int] = {}

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel():
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        elif depth and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth - 1)
        elif depth and isinstance(value, dict):
            for item in value.values():
                visit(item, depth - 1)

    for p in engine.module.parameters():
        visit(getattr(p, "ds_tensor", p.data), 0)
        visit(p.grad, 0)
    for holder in (engine.optimizer, getattr(engine.optimizer, "optimizer", None)):
        if holder is not None:
            visit(list(vars(holder).values()), 4)
    return sum(storages.values())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def next_position(batches: PairBatches, position: BatchPosition) -> BatchPosition:
    if position.batch + 1 < batches.batches_per_epoch:
        return BatchPosition(position.epoch, position.batch + 1)
    return BatchPosition(position.epoch + 1, 0)


def export_model(engine: Any, cfg: RunConfig, folder: Path, rank: int) -> None:
    """The policy as a Hugging Face folder (safetensors); ZeRO-3 shards are gathered first."""
    import deepspeed

    lm = engine.module.lm
    gathered = deepspeed.zero.GatheredParameters(list(lm.parameters()), modifier_rank=None,
                                                 enabled=cfg.distributed.zero_stage == 3)
    with gathered:
        if rank == 0:
            save_policy(lm, cfg, folder)


def _resume(engine: Any, rank: int, world: int, run_folder: Path, num_pairs: int) -> tuple[int, BatchPosition, list[int]]:
    """(steps done, next batch position, this rank's ledger) from the newest good checkpoint, or a fresh start."""
    import ray.train

    restored = checkpoints.restore(engine, ray.train.get_checkpoint(), rank, world, run_folder, num_pairs)
    if restored is None:
        return 0, BatchPosition(), [0] * num_pairs
    step, position, ledger = restored
    return step, BatchPosition(*position), ledger


@dataclass
class WorkerJob:
    """What the driver hands every Ray Train worker (:func:`pipeline.train.distributed.train_distributed`)."""

    cfg: RunConfig
    pairs: Any  # ObjectRef of the run's list[TokenizedPair]
    pad_token_id: int
    make_feed: Callable[[], Any]  # FeedFactory: this worker's reference statistics
    run_folder: Path  # <storage>/<run name>: metrics, checkpoints, the model
    run_id: str | None  # the driver's MLflow run, which rank 0 logs into
    tracking_uri: str | None
    progress: bool = True
    evaluator: Any = None  # an Evaluator, or None: no evaluation during training
    report_steps: bool = False  # report every logged step to Ray Train (a sweep trial's Tune callback reads them)
    # Called as on_step(rank, step, run_folder) before each step; absent unless a fault test installs one.
    on_step: Callable[[int, int, Path], None] | None = None


@dataclass
class _Worker:
    """One worker's state for the length of :func:`train_loop`."""

    job: WorkerJob
    rank: int
    world: int
    engine: Any
    feed: Any
    log: StepLog


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config["job"]`` is the :class:`WorkerJob`."""
    import ray
    import ray.train
    import torch.distributed as dist

    quiet_train_reports()
    job: WorkerJob = config["job"]
    cfg = job.cfg
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.distributed.use_gpu else "cpu")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed)
    pairs = ray.get(job.pairs)
    engine = build_engine(cfg, world)
    feed = job.make_feed()
    options = StepOptions.from_config(cfg.loss)
    start_step, position, ledger = _resume(engine, rank, world, job.run_folder, len(pairs))
    batches = PairBatches(len(pairs), cfg.train.batch_size * world, cfg.train.seed)
    stream = batches.iterate(position)

    tracker = attach_tracker(job.tracking_uri, job.run_id, rank, cfg.tracking.flush_timeout_s)
    b = cfg.train.batch_size
    total = cfg.train.max_steps
    bar = progress_bar("ray", total, start_step, f"{cfg.loss.name} training") if rank == 0 and job.progress else None
    log = StepLog(job.run_folder, tracker, total=total, name=cfg.loss.name, write=rank == 0,
                  log_every=cfg.train.log_every, evaluator=job.evaluator, bar=bar)
    worker = _Worker(job, rank, world, engine, feed, log)
    state_mb = 0.0
    with log:
        for step in range(start_step, total):
            if job.on_step is not None:
                job.on_step(rank, step, job.run_folder)
            log.begin()
            sums: dict[str, torch.Tensor] = {}
            tokens = 0
            for _ in range(cfg.train.gradient_accumulation_steps):
                position, indices = next(stream)
                mine = indices[rank * b : (rank + 1) * b]
                for i in mine:
                    ledger[i] += 1
                tokens += pair_tokens(pairs, mine)
                batch = collate_pairs([pairs[i] for i in mine], job.pad_token_id)
                batch = pack_batch(batch) if engine.module.packing else batch  # on the host: no device sync
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                losses, metrics = micro_batch_loss(engine, batch, feed(mine, batch), options)
                engine.backward(losses.mean())  # DeepSpeed divides by the accumulation steps and averages workers
                # Gradients, parameters and (from the second step) optimizer state all live now: the peak.
                # It is the same every step after the second, so the tensor walk stays off the hot path.
                if step < start_step + 2:
                    state_mb = max(state_mb, state_bytes(engine) / 2**20)
                engine.step()
                add_metrics(sums, metrics)
            metrics = _reduce(sums, b * cfg.train.gradient_accumulation_steps, tokens, dist)
            tokens_all = metrics.pop("tokens")
            metrics.update({"lr": engine.get_lr()[0], "epoch": position.epoch})
            if (grad_norm := engine.get_global_grad_norm()) is not None:
                metrics["grad_norm"] = float(grad_norm)
            metrics.update({"memory/state_mb": state_mb, "memory/peak_rss_mb": peak_rss_mb()})
            done = step + 1
            metrics = log.step(done, metrics, pairs=cfg.pairs_per_step, tokens=tokens_all)
            point = _evaluate(worker, done) if log.evaluation_due(done) else {}
            _report(worker, done, next_position(batches, position), ledger, {**metrics, **point})
    flush_worker(tracker, job.run_folder)
    (job.run_folder / f"trained-{checkpoints.LEDGER.format(rank=rank)}").write_text(json.dumps(ledger), encoding="utf-8")
    if cfg.train.save_model:
        export_model(engine, cfg, job.run_folder / "model", rank)


def _evaluate(worker: _Worker, step: int) -> dict[str, float]:
    """Evaluate now (every rank); rank 0 writes the point to eval.jsonl and MLflow at ``step``.
    Returns the point's metrics (reported to Ray Train with the step's, so a sweep's scheduler sees them)."""
    worker.log.evaluating(step)
    point = evaluate_policy(worker.job.evaluator, worker.engine, worker.feed, worker.job.cfg, worker.rank,
                            worker.world).metrics()
    worker.log.evaluation(step, point)
    return point


def evaluate_policy(evaluator: Any, engine: Any, feed: Any, cfg: RunConfig, rank: int, world: int):
    """One evaluation point of the policy as it is now; every rank takes part (ZeRO-3 gathers)."""
    local = feed.scorer.model if hasattr(feed, "scorer") else None  # colocated reference
    synced = cfg.distributed.zero_stage == 3 and world > 1
    return evaluator.run(engine.module.lm, evaluator.reference_logps(rank, local), rank, world,
                         synced=synced, gather=all_gather)


def _reduce(sums: dict[str, torch.Tensor], pairs: int, tokens: int, dist: Any) -> dict[str, float]:
    """Per-pair means over every worker's pairs: one all-reduce of [metric sums..., pairs, tokens]."""
    keys = sorted(sums)
    vector = torch.stack([sums[k].detach().double().cpu() for k in keys] +
                         [torch.tensor(float(pairs), dtype=torch.float64), torch.tensor(float(tokens), dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(vector)
    values = vector.tolist()
    out = {k: values[i] / values[-2] for i, k in enumerate(keys)}
    out["tokens"] = values[-1]
    return out


def _report(worker: _Worker, step: int, position: BatchPosition, ledger: list[int], metrics: dict[str, float]) -> None:
    """Checkpoints and evaluation points always go to Ray Train; the other logged steps only when
    something reads them (a sweep trial's Tune callback): each report waits for the controller's poll."""
    import ray.train

    cfg = worker.job.cfg
    every = cfg.distributed.checkpoint_every
    if step == cfg.train.max_steps or (every is not None and step % every == 0):
        folder = checkpoints.save(worker.engine, worker.rank, worker.world, step, [position.epoch, position.batch],
                                  ledger)
        try:  # a synchronous report copies the folder to the run storage
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        except (OSError, RuntimeError) as e:
            if (full := checkpoints.out_of_space(e, storage_root(cfg), f"the checkpoint of step {step}")) is not None:
                raise full from e
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    elif "eval/reward" in metrics or (worker.job.report_steps and step % cfg.train.log_every == 0):
        ray.train.report({"step": step, **metrics})
