"""Distributed DPO / TDPO: Ray Train workers (DeepSpeed ZeRO) fed by a reference actor group.

    driver:  config, tokenizer, every row of the data        (cheap checks first, nothing loaded yet)
             MLflow run opened (an unreachable server fails here)
             Ray connected or started; reference chunks not in the cache queued on the actor group
             TorchTrainer.fit(): N workers run pipeline.train.worker.train_loop
             reference forward passes counted, exported model logged, actors released

Outputs (``<storage>/<run name>/``, storage = distributed.storage_path or output.dir):
    config.yaml, data_report.json, metrics.jsonl   as the single-process trainer
    checkpoint_*/                                  DeepSpeed state + data position (Ray Train); a
                                                   finished run drops them once its model is exported,
                                                   unless distributed.keep_final_checkpoint
    model/                                         the policy, safetensors, loadable by from_pretrained
    finished.json                                  written when the final checkpoint is dropped
and ``<storage>/reference-cache/<fingerprint>/`` (see pipeline.reference.cache).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cluster import check_resources, connect_ray, ray_train_defaults, storage_root
from pipeline.config import RunConfig, save_config
from pipeline.data.tokenization import TokenizedPair
from pipeline.errors import PipelineError
from pipeline.eval.evaluator import Evaluator, build_evaluator
from pipeline.reference.cache import ChunkPlan, ReferenceCache, cache_key, usable_cache
from pipeline.reference.group import ChunkFeed, LiveFeed, ReferenceGroup
from pipeline.reference.scorer import ReferenceScorer, stats_kind
from pipeline.tracking import check_store, clear_undelivered, flatten, open_tracker, raise_undelivered
from pipeline.train.batches import PairBatches
from pipeline.train.checkpoints import check_space, merge_ledgers, out_of_space
from pipeline.train.setup import TrainResult, load_reference, prepare_data, run_name, steady_median
from pipeline.train.worker import WorkerJob, train_loop

log = logging.getLogger(__name__)

FINISHED = "finished.json"  # a run that finished and dropped its final checkpoint: {"max_steps": ...}


class TrainingFailed(PipelineError):
    """The worker group failed more often than ``distributed.max_failures`` allows."""


@dataclass
class FeedFactory:
    """Built on the driver, called in each worker: where that worker's reference statistics come from."""

    kind: str
    cfg: dict[str, Any]
    plan: ChunkPlan | None = None
    refs: dict[int, Any] | None = None
    cache: ReferenceCache | None = None

    def __call__(self):
        if self.plan is None:  # colocated: a reference model in this worker

            cfg = RunConfig.model_validate(self.cfg)
            model = load_reference(cfg)
            if torch.cuda.is_available() and cfg.distributed.use_gpu:
                model = model.cuda()
            return LiveFeed(ReferenceScorer(model, self.kind, topk=cfg.reference.topk, dtype=cfg.reference.dtype,
                                             packing=cfg.train.packing))
        return ChunkFeed(self.kind, self.plan, self.refs or {}, self.cache)


def consumption_order(cfg: RunConfig, num_pairs: int) -> list[int]:
    """Pair indices in the order the run will train on them (every worker, every micro-step)."""
    batches = PairBatches(num_pairs, cfg.train.batch_size * cfg.workers, cfg.train.seed)
    stream = batches.iterate()
    order: list[int] = []
    for _ in range(cfg.train.max_steps * cfg.train.gradient_accumulation_steps):
        order.extend(next(stream)[1])
    return order


def run_chunks(cfg: RunConfig, num_pairs: int) -> tuple[ChunkPlan, list[int]]:
    """The chunk plan of ``num_pairs`` pairs, and the chunks a run of cfg trains on, in first-need order."""
    plan = ChunkPlan(num_pairs, cfg.reference.chunk_size)
    return plan, plan.first_need(consumption_order(cfg, num_pairs))


@dataclass
class RunHooks:
    """Callables a test installs into a run; absent otherwise, and then the loops call nothing.
    ``worker_step(rank, step, run_folder)``: in every worker before each step (0-based);
    ``reference_task(actor, task)``: in a reference actor as it starts its task number ``task``."""

    worker_step: Callable[[int, int, Path], None] | None = None
    reference_task: Callable[[int, int], None] | None = None


@dataclass
class _Run:
    """One distributed run as the driver holds it between its checks and the end of training."""

    cfg: RunConfig
    pairs: list[TokenizedPair]
    tokenizer: Any
    storage: Path  # distributed.storage_path or output.dir
    folder: Path  # <storage>/<run name>: what the workers write
    tracker: Any
    progress: bool
    evaluator: Evaluator | None
    hooks: RunHooks
    callbacks: list[Any] | None  # Ray Train callbacks (a sweep trial's)


def train_distributed(cfg: RunConfig, *, progress: bool = True, run_dir: Path | None = None,
                      hooks: RunHooks | None = None, mlflow_run_id: str | None = None,
                      callbacks: list[Any] | None = None) -> TrainResult:
    """Validate everything cheap, then train on Ray. ``hooks``: what a fault test injects.
    ``mlflow_run_id``: log into that existing run (a resumed sweep trial); ``callbacks``: Ray Train
    callbacks (a sweep trial's TuneReportCallback)."""
    storage = storage_root(cfg)
    name = run_dir.name if run_dir is not None else run_name(cfg)
    run_dir = run_dir or Path(cfg.output.dir).expanduser().resolve() / name
    run_folder = storage / name
    check_finished(cfg, run_folder)  # asked to train further a run that kept no checkpoint: said now
    for folder in (run_dir, run_folder):
        folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    tokenizer, dataset = prepare_data(cfg, run_dir)
    assert dataset.pairs is not None
    PairBatches(len(dataset.pairs), cfg.train.batch_size * cfg.workers, cfg.train.seed)  # enough pairs?
    evaluator = build_evaluator(cfg, tokenizer) if cfg.eval.enabled else None

    # The tracking server answers and the workers alone fit, before an MLflow run is opened: a
    # refused run leaves no FAILED run behind. (The reference actors are counted in _fit, once the
    # cache says whether they are needed.)
    check_space(cfg, storage)  # room for the checkpoints the run keeps, before any of them is written
    check_store(cfg)
    connect_ray(cfg.distributed.address)
    check_resources(cfg, 0)

    tags = {"loss": cfg.loss.name, "method": cfg.loss.name, "trainer": "ray", "reference.mode": cfg.reference.mode}
    with open_tracker(cfg, name, tags=tags, run_id=mlflow_run_id) as tracker:
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "data_report.json")
        result = _fit(_Run(cfg, dataset.pairs, tokenizer, storage, run_folder, tracker, progress, evaluator,
                           hooks or RunHooks(), callbacks))
        result.run_id = tracker.run_id  # end() forgets it
        tracker.log_metrics({"reference/forward_passes": result.reference_forward_passes,
                             "reference/cached_chunks": result.reference_cached_chunks,
                             **({} if result.trained_pairs is None else
                                {"train/pairs_trained": sum(result.trained_pairs)})}, step=cfg.train.max_steps)
        if result.model_dir is not None:
            tokenizer.save_pretrained(result.model_dir)
            if cfg.tracking.log_model:
                tracker.log_artifact(result.model_dir, "model")
        # Metrics a worker could not deliver to MLflow: said now that the outputs are saved, and the
        # run is not marked FINISHED.
        raise_undelivered(run_folder)
    result.run_dir = run_dir
    return result


def _feed(run: _Run) -> tuple[FeedFactory, ReferenceGroup | None, int]:
    """Where the workers' reference statistics come from, the actor group serving them (None: colocated,
    or everything cached and no evaluation), and how many chunks the cache already held."""
    cfg, kind = run.cfg, stats_kind(run.cfg)
    cfg_tree = cfg.model_dump(mode="json")
    if cfg.reference.mode == "colocated":  # no actors: train_distributed has checked the workers
        return FeedFactory(kind, cfg_tree), None, 0
    plan, todo = run_chunks(cfg, len(run.pairs))
    cache, cached_chunks, group, refs = None, 0, None, {}
    if cfg.reference.cache:
        cache = usable_cache(cfg, run.pairs, kind, plan, run.storage, todo)
        needed, todo = todo, cache.missing(todo)
        cached_chunks = len(needed) - len(todo)
    # Everything cached and no evaluation: no actor, no model load.
    need_actors = bool(todo) or run.evaluator is not None
    check_resources(cfg, cfg.reference.num_actors if need_actors else 0)
    if need_actors:
        group = ReferenceGroup(cfg, kind, run.pairs, run.tokenizer.pad_token_id, cache, plan,
                               run.hooks.reference_task)
        refs = group.submit(todo)
        if run.evaluator is not None:
            run.evaluator.reference_actors = list(group.actors)
    return FeedFactory(kind, cfg_tree, plan, refs, cache), group, cached_chunks


def _fit(run: _Run) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, d = run.cfg, run.cfg.distributed
    if check_finished(cfg, run.folder):  # rerun after it finished: nothing left to train
        ledger = run.folder / "trained_pairs.json"
        return _result(run, json.loads(ledger.read_text(encoding="utf-8")) if ledger.is_file() else None)
    clear_undelivered(run.folder)  # a report left by an earlier run of this name (a resumed trial) is not ours
    factory, group, cached_chunks = _feed(run)
    job = WorkerJob(cfg=cfg, pairs=ray.put(run.pairs), pad_token_id=run.tokenizer.pad_token_id, make_feed=factory,
                    run_folder=run.folder, run_id=run.tracker.run_id, tracking_uri=run.tracker.uri,
                    progress=run.progress, evaluator=run.evaluator, report_steps=bool(run.callbacks),
                    on_step=run.hooks.worker_step)
    ray_train_defaults()
    trainer = TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=run.folder.name, storage_path=str(run.storage),
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.keep_checkpoints),
            callbacks=run.callbacks,
        ),
    )
    try:
        fit = trainer.fit()
        forward_passes = group.forward_passes() if group is not None else 0
        restarts = group.restarts() if group is not None else 0
    except Exception as e:
        full = out_of_space(e, run.storage, "checkpoints")  # Ray Train's controller writes there too
        raise TrainingFailed(f"training failed: {full or f'{type(e).__name__}: {e}'}") from e
    finally:
        if group is not None:
            group.shutdown()
    ledger = merge_ledgers(run.folder, d.num_workers)
    checkpoint = None if fit.checkpoint is None else fit.checkpoint.path
    if cfg.train.save_model and not d.keep_final_checkpoint:
        for folder in run.folder.glob("checkpoint_*"):  # the exported model holds what a user needs
            if folder.is_dir():  # (not Ray Train's checkpoint_manager_snapshot.json)
                shutil.rmtree(folder)
        checkpoint = None
        (run.folder / FINISHED).write_text(json.dumps({"max_steps": cfg.train.max_steps}), encoding="utf-8")
    return _result(run, ledger, reference_forward_passes=forward_passes, reference_cached_chunks=cached_chunks,
                   reference_restarts=restarts, checkpoint=checkpoint)


def _result(run: _Run, ledger: dict[str, Any] | None, **counts: Any) -> TrainResult:
    history = _read_history(run.folder / "metrics.jsonl")
    return TrainResult(run_dir=run.folder, history=history, evaluations=_read_history(run.folder / "eval.jsonl"),
                       seconds_per_step=steady_median([h["seconds"] for h in history]), trainer="ray",
                       trained_pairs=None if ledger is None else ledger["counts"],
                       model_dir=run.folder / "model" if run.cfg.train.save_model else None, **counts)


def check_finished(cfg: RunConfig, run_folder: Path) -> bool:
    """True when ``run_folder`` holds a run that finished and dropped its final checkpoint: rerun, it is
    done already. Refused when asked to train it further, which that checkpoint would have needed."""
    marker = run_folder / FINISHED
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text(encoding="utf-8"))["max_steps"]
    if done != cfg.train.max_steps:
        raise PipelineError(
            f"run {run_folder.name} in {run_folder.parent} finished at step {done} and dropped its final checkpoint "
            f"(distributed.keep_final_checkpoint=false): it cannot be trained on to train.max_steps="
            f"{cfg.train.max_steps}. Train under another output.run_name, or keep the final checkpoint next time")
    return True


def reference_pass(cfg: RunConfig, pairs: list, pad_token_id: int, kind: str, root: Path) -> dict[str, Any]:
    """Fill ``root``'s reference cache with the chunks of ``pairs`` a run of ``cfg`` trains on, for ``kind``
    (one pass, before any training: a sweep's trials then read it; a trial whose swept train.* settings
    need more chunks computes those itself). Returns forward passes run and chunks computed / cached."""

    plan, needed = run_chunks(cfg, len(pairs))
    fingerprint, meta = cache_key(cfg, pairs, kind)
    cache = ReferenceCache(root, fingerprint, kind, plan).create(meta)
    todo = cache.missing(needed)
    forward_passes = 0
    if todo:
        check_resources(cfg, cfg.reference.num_actors, workers=0)
        group = ReferenceGroup(cfg, kind, pairs, pad_token_id, cache, plan)
        try:
            group.submit(todo)
            forward_passes = group.forward_passes()
        finally:
            group.shutdown()
    return {"forward_passes": forward_passes, "computed_chunks": len(todo),
            "cached_chunks": len(needed) - len(todo), "fingerprint": fingerprint}


def _read_history(path: Path) -> list[dict[str, float]]:
    """metrics.jsonl, with steps logged again after a restart keeping their last value."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]
