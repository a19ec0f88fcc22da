"""Ray Tune sweeps: one full distributed training run per trial, one reference pass per sweep.

    driver   config + search space checked (every candidate), data tokenized, Ray connected
             MLflow parent run opened (or reopened on resume)
             the reference pass: the chunks a run trains on into the sweep's reference cache, once
             the untrained reference evaluated once (its point goes on the parent run)
             Tuner.fit(): trials run ``run_trial`` with at most sweep.max_concurrent_trials at once
             all trials done: the fronts of their evaluation points, hypervolumes and the best config
             per method on the parent run (pipeline.tune.results); otherwise SweepUnfinished
    trial    a TorchTrainer (Ray Train V2 inside the Tune trial) with its periodic evaluation; its
             reports reach Tune through a TuneReportCallback (ASHA and Optuna read them); one MLflow
             child run (tags: mlflow.parentRunId, sweep, trial), the trial's values as params

Folder ``<storage>/<sweep id>/``: config.yaml, sweep.json (ids), tune/ (Ray Tune's experiment:
what ``Tuner.restore`` reads), trials/ (each trial's Train run, and the shared reference-cache/),
pareto/, trials.csv, best_configs.json.

Resume (Ctrl-C, the driver killed, failed trials): ``resume_sweep(folder)`` reopens the parent run
and calls ``Tuner.restore`` (failed trials run again). Finished trials are not run again. A trial that was running restarts with the
same trial id: it finds its MLflow run by tag and logs into it (no second run), and its Train run
resumes from its last checkpoint (distributed.checkpoint_every). A trial whose MLflow run is
FINISHED but that Tune had not yet recorded as done reports its logged result instead of training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cluster import check_resources, connect_ray, storage_root
from pipeline.config import RunConfig, load_config, save_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.evaluator import build_evaluator
from pipeline.eval.metrics import EvalPoint
from pipeline.eval.runs import evaluate_model
from pipeline.reference.cache import token_level_kind
from pipeline.stages.pipeline import run_label
from pipeline.tracking import find_run, flatten, open_tracker, tracking_uri
from pipeline.train.distributed import reference_pass, train_distributed
from pipeline.train.setup import prepare_data
from pipeline.tune.results import best_configs, report_sweep, summary_table  # noqa: F401 (the public API)
from pipeline.tune.space import (
    Dimension,
    any_token_level,
    check_space,
    parse_space,
    trial_config,
    tune_space,
)

log = logging.getLogger(__name__)
OBJECTIVES = {"eval/reward": "max", "eval/kl": "min"}  # the Optuna search's two objectives


class SweepUnfinished(PipelineError):
    """Trials failed or the sweep was interrupted; ``--resume`` finishes it (failed trials run again)."""


@dataclass
class SweepResult:
    sweep_id: str
    folder: Path
    parent_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, float] = field(default_factory=dict)
    reference_pass: dict[str, Any] = field(default_factory=dict)
    pareto: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    kl_budget: float | None = None
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class SweepSpec:
    """What every trial needs from the driver (passed with tune.with_parameters, so a restore rebuilds it)."""

    base: dict[str, Any]
    sweep_id: str
    parent_run_id: str
    trial_root: str
    progress: bool


def run_sweep(cfg: RunConfig, *, progress: bool = True) -> SweepResult:
    """A new sweep of cfg.sweep.space around cfg."""

    sweep_id = cfg.output.run_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = storage_root(cfg) / sweep_id
    if (folder / "sweep.json").is_file():
        raise PipelineError(f"sweep {sweep_id} already exists in {storage_root(cfg)}: finish it with "
                            f"--resume {folder}, or name a new one with output.run_name")
    return _sweep(cfg, sweep_id, folder, restore=False, progress=progress)


def resume_sweep(folder: str | Path, *, progress: bool = True) -> SweepResult:
    """Finish an interrupted sweep from its folder (``<storage>/<sweep id>``)."""
    folder = Path(folder).expanduser().resolve()
    state = folder / "sweep.json"
    if not state.is_file():
        raise PipelineError(f"{folder} is not a sweep folder: {state.name} is missing")
    ids = json.loads(state.read_text(encoding="utf-8"))
    cfg = load_config(folder / "config.yaml")
    cfg.tracking.uri = ids["tracking_uri"]  # where the parent run is, whatever $MLFLOW_TRACKING_URI says now
    from mlflow.tracking import MlflowClient

    status = MlflowClient(ids["tracking_uri"]).get_run(ids["parent_run_id"]).info.status
    if status == "FINISHED":
        raise PipelineError(f"sweep {ids['sweep_id']} in {folder} has finished: nothing to resume")
    return _sweep(cfg, ids["sweep_id"], folder, restore=True, progress=progress, parent_run_id=ids["parent_run_id"])


def check_sweep(cfg: RunConfig) -> list[Dimension]:
    """Everything cheap that can be wrong with a sweep, before Ray, MLflow or a model is touched."""
    if not cfg.tracking.enabled:
        raise ConfigError("jobs.sweep needs tracking.enabled=true: trials and fronts live in MLflow")
    if not cfg.distributed.enabled:
        raise ConfigError("jobs.sweep runs every trial on Ray Train: set distributed.enabled=true")
    s = cfg.sweep
    dims = parse_space(s.space, s.search)
    if s.search != "grid" and s.num_samples < 2:
        log.warning("sweep.search=%s with num_samples=%d runs a single trial", s.search, s.num_samples)
    if s.asha.enabled:
        from dataclasses import fields

        known = [f"eval/{f.name}" for f in fields(EvalPoint)] + ["loss"]
        if s.asha.metric not in known:  # Tune's strict metric check is off under ASHA: a typo must fail here
            raise ConfigError(f"sweep.asha.metric: {s.asha.metric!r} is not a metric trials report; "
                              f"one of {', '.join(known)}")
        if s.search == "optuna" and not s.asha.metric.startswith("eval/"):
            # A trial ASHA stops on `loss` may have no evaluation yet: Optuna would get no objectives.
            raise ConfigError("sweep.asha.metric must be an eval/* metric with sweep.search=optuna")
    check_space(cfg, dims)
    return dims


def _sweep(cfg: RunConfig, sweep_id: str, folder: Path, *, restore: bool, progress: bool,
           parent_run_id: str | None = None) -> SweepResult:
    started = time.perf_counter()
    dims = check_sweep(cfg)
    trial_root = folder / "trials"
    trial_root.mkdir(parents=True, exist_ok=True)
    base = _trial_base(cfg, trial_root)
    tokenizer, dataset = prepare_data(cfg, folder)
    assert dataset.pairs is not None
    build_evaluator(base, tokenizer)  # prompts and reward source, checked now
    # Killed before Tune wrote its experiment (during the reference pass): the trials start fresh.
    restore_tuner = restore and _can_restore(folder)
    connect_ray(cfg.distributed.address)
    check_resources(base, base.reference.num_actors if base.reference.mode != "colocated" else 0,
                    driver_cpus=base.sweep.trial_cpus)  # one trial must fit

    with open_tracker(cfg, sweep_id, tags={"sweep": sweep_id, "stage": "sweep"}, run_id=parent_run_id) as parent:
        if not restore:
            save_config(cfg, folder)
            ids = {"sweep_id": sweep_id, "parent_run_id": parent.run_id, "tracking_uri": tracking_uri(cfg)}
            (folder / "sweep.json").write_text(json.dumps(ids), encoding="utf-8")
            parent.log_params({**flatten(cfg.model_dump(mode="json")), "sweep.space": json.dumps(cfg.sweep.space)})
            parent.log_artifact(folder / "config.yaml")
        result = SweepResult(sweep_id, folder, parent.run_id, tracking_uri(cfg))
        result.reference_pass = _reference_pass(base, dims, dataset.pairs, tokenizer.pad_token_id, trial_root, parent)
        result.reference = _reference_point(base, sweep_id, parent)
        spec = SweepSpec(base.model_dump(mode="json"), sweep_id, parent.run_id, str(trial_root), progress)
        with _trial_metrics_unchecked():
            grid = _tuner(cfg, dims, spec, folder, restore_tuner).fit()
        result.trials, result.failed = _trial_rows(grid)
        if result.failed or grid.num_terminated + grid.num_errors < len(grid):  # a trial failed; or Ctrl-C
            raise SweepUnfinished(f"sweep {sweep_id} did not finish: {len(result.trials)} of {len(grid)} trials "
                                  f"done; finish it with --resume {folder}" +
                                  "".join(f"\nfailed trial{e}" for e in result.failed))
        report_sweep(cfg, result, parent, {row["trial"] for row in result.trials})
    result.seconds = time.perf_counter() - started
    return result


# Fields that may name local files or folders: Tune runs each trial in a working directory of its own.
LOCAL_PATHS = (("data", "source"), ("eval", "prompts"), ("eval", "reward", "source"), ("model", "policy"),
               ("model", "reference"), ("model", "tokenizer"))


def _trial_base(cfg: RunConfig, trial_root: Path) -> RunConfig:
    """The config every trial starts from: evaluation on, runs and cache under the sweep's folder,
    the tracking store pinned (it would otherwise follow output.dir), local paths made absolute."""

    tree = cfg.model_dump(mode="json")
    for path in LOCAL_PATHS:
        node = tree
        for key in path[:-1]:
            node = node[key]
        spec = node[path[-1]]
        if isinstance(spec, str) and not spec.startswith("builtin:") and Path(spec).expanduser().exists():
            node[path[-1]] = str(Path(spec).expanduser().resolve())
    tree["eval"]["enabled"] = True
    tree["output"]["dir"] = str(trial_root)
    tree["distributed"]["storage_path"] = str(trial_root)
    tree["tracking"]["uri"] = tracking_uri(cfg)
    return RunConfig.model_validate(tree)


def _reference_pass(base: RunConfig, dims: list[Dimension], pairs: list, pad_token_id: int, root: Path,
                    parent: Any) -> dict[str, Any]:
    """Every chunk of the pairs through the reference, once: the trials read the cache. A sweep with
    any token-level loss computes the token-level statistics; its DPO trials read their sums."""

    if base.reference.mode == "colocated" or not base.reference.cache:
        log.warning("reference.mode=colocated or reference.cache=false: every trial runs its own reference")
        return {}
    kind = token_level_kind(base) if any_token_level(base, dims) else "sequence"
    done = reference_pass(base, pairs, pad_token_id, kind, root)
    parent.log_metrics({"reference/forward_passes": done["forward_passes"],
                        "reference/computed_chunks": done["computed_chunks"],
                        "reference/cached_chunks": done["cached_chunks"]}, step=0)
    return {"kind": kind, **done}


def _reference_point(base: RunConfig, sweep_id: str, parent: Any) -> dict[str, float]:
    """The untrained reference's evaluation point, logged on the parent run once (kept on resume)."""

    if not base.sweep.evaluate_reference:
        return {}
    logged = parent.client.get_run(parent.run_id).data.metrics
    if "eval/reward" in logged:
        return {k: v for k, v in logged.items() if k.startswith("eval/")}
    point, _ = evaluate_model(base, base.model.reference_spec, f"{sweep_id}-reference", tracker=parent)
    return point.metrics()


@contextmanager
def _trial_metrics_unchecked():
    """Trials report every step but evaluate every eval.every_steps: most reports carry no eval/*
    metric, which ASHA and Optuna skip but Tune's strict metric check refuses. Off while Tune runs
    (check_sweep validated the metric names instead), restored afterwards."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _tune_state(folder: Path) -> Path:
    return folder / "tune"


def _can_restore(folder: Path) -> bool:
    from ray import tune

    return _tune_state(folder).is_dir() and tune.Tuner.can_restore(str(_tune_state(folder)))


def _tuner(cfg: RunConfig, dims: list[Dimension], spec: SweepSpec, folder: Path, restore: bool):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # The trial only drives its TorchTrainer; its workers and actors ask for their own CPUs. Tune
    # defaults a trial to 1 CPU, which on a 2-core machine leaves no room for a 2-CPU worker, and Ray
    # refuses an empty request: a trial with trial_cpus 0 asks for 1 MiB of memory instead.
    driver = {"CPU": cfg.sweep.trial_cpus} if cfg.sweep.trial_cpus > 0 else {"memory": 2**20}
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), driver)
    if restore:
        return tune.Tuner.restore(str(_tune_state(folder)), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    s = cfg.sweep
    search_alg, scheduler = search_and_scheduler(cfg)
    return tune.Tuner(
        trainable,
        param_space=tune_space(dims),
        # Tune limits a Searcher (Optuna) by max_concurrent_trials, but not a BasicVariantGenerator passed in:
        # that one takes the limit itself.
        tune_config=tune.TuneConfig(
            num_samples=s.num_samples, scheduler=scheduler,
            search_alg=search_alg or BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials),
            max_concurrent_trials=s.max_concurrent_trials if search_alg is not None else None),
        run_config=tune.RunConfig(name=_tune_state(folder).name, storage_path=str(folder),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def search_and_scheduler(cfg: RunConfig) -> tuple[Any, Any]:
    """Ray Tune's search algorithm (None: the grid/random BasicVariantGenerator) and scheduler (None: FIFO)."""
    s = cfg.sweep
    search_alg = None
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), seed=s.seed)
    scheduler = None
    if s.asha.enabled:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", metric=s.asha.metric, mode=s.asha.mode,
                                  max_t=cfg.train.max_steps, grace_period=s.asha.grace_period,
                                  reduction_factor=s.asha.reduction_factor,
                                  # A trial at its last step finishes on its own (export, final report,
                                  # MLflow run ended); ASHA would otherwise stop it at max_t, mid-export.
                                  stop_last_trials=False)
    return search_alg, scheduler


def run_trial(config: dict[str, Any], spec: SweepSpec) -> None:
    """One Tune trial: the trial's config, its MLflow child run (found again on a restart), a
    TorchTrainer whose reports reach Tune, then the final evaluation point as the trial's result."""
    import ray.tune

    from pipeline.tune.callbacks import ReportsBeforeLastStep

    trial_id = ray.tune.get_context().get_trial_id()
    params = dict(config)
    cfg = trial_config(spec.base, params, f"sweep trial {trial_id} {params}")
    cfg.output.run_name = f"{spec.sweep_id}-{trial_id}-{run_label(cfg)}"
    identity = {"sweep": spec.sweep_id, "trial": trial_id}
    cfg.tracking.tags = {**cfg.tracking.tags, **identity, "mlflow.parentRunId": spec.parent_run_id}
    existing = find_run(cfg, identity)
    if existing is not None and existing.info.status == "FINISHED":  # done before the driver died
        ray.tune.report(_logged_result(existing))
        return
    trained = train_distributed(cfg, progress=spec.progress, callbacks=[ReportsBeforeLastStep(cfg.train.max_steps)],
                                mlflow_run_id=existing.info.run_id if existing is not None else None)
    final = trained.evaluations[-1] if trained.evaluations else {}
    ray.tune.report({**{k: v for k, v in final.items() if k != "step"}, "step": cfg.train.max_steps,
                     "loss": trained.history[-1]["loss"], "seconds_per_step": trained.seconds_per_step,
                     "reference/forward_passes": trained.reference_forward_passes,
                     "mlflow_run_id": trained.run_id})


def _logged_result(run: Any) -> dict[str, Any]:
    """A finished trial's result, read back from its MLflow run (the last logged value of each metric)."""
    metrics = run.data.metrics
    keep = {k: v for k, v in metrics.items() if k.startswith("eval/") or k in ("loss", "reference/forward_passes")}
    return {**keep, "step": int(run.data.params.get("train.max_steps", 0)), "mlflow_run_id": run.info.run_id,
            "restored_from_mlflow": True}


def _trial_rows(grid: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(one row per finished trial: its values and final metrics, the failed trials' errors)."""
    rows, failed = [], []
    for result in grid:
        if result.error is not None:
            failed.append(f"  {result.path}: {result.error}")
            continue
        metrics = result.metrics or {}
        rows.append({"trial": metrics.get("trial_id", ""), **result.config,
                     **{k: metrics.get(k) for k in ("eval/reward", "eval/kl", "eval/entropy", "loss",
                                                    "reference/forward_passes", "mlflow_run_id")}})
    return sorted(rows, key=lambda r: r["trial"]), failed
