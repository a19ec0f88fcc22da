"""Evaluation points in MLflow: evaluate a saved model on Ray, read runs' points back, log Pareto reports.

Every evaluation is logged as the metrics ``eval/kl``, ``eval/reward`` (and entropy, distinct-n, ...)
at the step it was taken. A run's method is its ``method`` tag (training runs: the loss name;
the untrained reference: ``reference``); its label is its beta (and alpha for TDPO2).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline.cluster import connect_ray
from pipeline.config import RunConfig
from pipeline.errors import PipelineError
from pipeline.eval.evaluator import build_evaluator
from pipeline.eval.metrics import EvalPoint
from pipeline.eval.pareto import REFERENCE_METHOD, Point, reference_point, summarize, write_report
from pipeline.models.loading import load_causal_lm, load_tokenizer, resolve
from pipeline.tracking import experiment_client, flatten, open_tracker, tracking_uri


class EvaluationActor:
    """Policy, reference and reward source in one Ray actor (a saved model's evaluation)."""

    def __init__(self, cfg: dict[str, Any], policy: str):
        run = RunConfig.model_validate(cfg)
        m = run.model
        load = dict(dtype=m.dtype, revision=m.revision, trust_remote_code=m.trust_remote_code)
        self.tokenizer = load_tokenizer(m.tokenizer_spec, revision=m.revision, trust_remote_code=m.trust_remote_code)
        self.policy = load_causal_lm(policy, **load)
        self.reference = self.policy if policy == m.reference_spec else load_causal_lm(m.reference_spec, **load)
        import torch

        if torch.cuda.is_available() and run.reference.gpus_per_actor > 0:
            self.policy, self.reference = self.policy.cuda(), self.reference.cuda()
        self.evaluator = build_evaluator(run, self.tokenizer)

    def evaluate(self) -> EvalPoint:
        return self.evaluator.run(self.policy, self.evaluator.reference_logps(0, self.reference))


def evaluate_model(cfg: RunConfig, policy: str, name: str, *, method: str = REFERENCE_METHOD,
                   step: int = 0, tracker: Any = None) -> tuple[EvalPoint, str | None]:
    """Evaluate ``policy`` (a model spec) against cfg's reference on a Ray actor; log one MLflow run,
    or log the point into ``tracker``'s run (a sweep's parent run holds its reference point)."""

    m = cfg.model
    resolve(policy)  # a missing folder fails here, before Ray
    build_evaluator(cfg, load_tokenizer(m.tokenizer_spec, revision=m.revision, trust_remote_code=m.trust_remote_code))
    own = tracker is None
    with open_tracker(cfg, name, tags={"method": method, "stage": "evaluate"}) if own else nullcontext(tracker) as run:
        if own:
            run.log_params(flatten({"policy": policy, "model": m.model_dump(mode="json"),
                                    "eval": cfg.eval.model_dump(mode="json")}))
        connect_ray(cfg.distributed.address)
        point = _evaluate_on_actor(cfg, policy)
        run.log_metrics(point.metrics(), step=step)
        return point, run.run_id


def _evaluate_on_actor(cfg: RunConfig, policy: str) -> EvalPoint:
    import ray

    actor = ray.remote(EvaluationActor).options(num_cpus=cfg.reference.cpus_per_actor,
                                                num_gpus=cfg.reference.gpus_per_actor)
    handle = actor.remote(cfg.model_dump(mode="json"), policy)
    try:
        return ray.get(handle.evaluate.remote())
    finally:
        ray.kill(handle)


def run_label(params: dict[str, str], method: str) -> str:
    if method == REFERENCE_METHOD:
        return ""
    label = f"beta={params.get('loss.beta', '?')}"
    return label + (f" alpha={params['loss.alpha']}" if method == "tdpo2" and "loss.alpha" in params else "")


def collect_points(client: Any, experiment_ids: Sequence[str], run_ids: Sequence[str] | None = None,
                   filter_string: str = "") -> list[Point]:
    """Every (eval/kl, eval/reward) pair logged at the same step, of the chosen runs."""
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        runs = client.search_runs(list(experiment_ids), filter_string, max_results=10_000)
    points = []
    for run in runs:
        if "eval/kl" not in run.data.metrics or "eval/reward" not in run.data.metrics:
            continue
        method = run.data.tags.get("method") or run.data.tags.get("loss") or "unknown"
        kl = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/kl")}
        reward = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/reward")}
        label = run_label(run.data.params, method)
        for step in sorted(kl.keys() & reward.keys()):
            points.append(Point(method, run.info.run_name or run.info.run_id, step, kl[step], reward[step], label))
    return points


def experiment_points(cfg: RunConfig, run_ids: Sequence[str] | None = None, filter_string: str = "") -> list[Point]:
    """:func:`collect_points` over the configured tracking store and experiment."""

    client, experiment = experiment_client(cfg)
    if experiment is None:
        raise PipelineError(f"no MLflow experiment {cfg.tracking.experiment!r} at {tracking_uri(cfg)}")
    return collect_points(client, [experiment.experiment_id], run_ids, filter_string)


def log_pareto(cfg: RunConfig, points: Sequence[Point], name: str | None = None, *,
               tracker: Any = None, folder: Path | None = None) -> dict[str, Any]:
    """Fronts, hypervolumes, plot and tables as artifacts (under ``pareto/``) and metrics
    ``pareto/hypervolume/<method>`` of ``tracker``'s run, or of a new run ``name``."""

    if not any(p.method != REFERENCE_METHOD for p in points):
        raise PipelineError("no evaluation points of trained policies to compare (runs need eval/kl and eval/reward)")
    pareto = cfg.pipeline.pareto
    ref_kl, ref_reward = reference_point(points, pareto.reference_kl, pareto.reference_reward)
    summary = summarize(points, ref_kl, ref_reward)
    folder = folder or Path(tempfile.mkdtemp(prefix="rayprefopt-pareto-"))
    paths = write_report(points, folder, ref_kl, ref_reward)
    own = tracker is None
    if own:
        tracker = open_tracker(cfg, name or f"pareto-{time.strftime('%Y%m%d-%H%M%S')}", tags={"stage": "pareto"})
    try:
        tracker.log_params({"pareto.reference_kl": ref_kl, "pareto.reference_reward": ref_reward,
                            "pareto.points": len(points)})
        tracker.log_metrics({f"pareto/hypervolume/{s.method}": s.hypervolume for s in summary}, step=0)
        tracker.log_artifact(folder, "pareto")
        run_id = tracker.run_id
    finally:
        if own:
            tracker.end()
    return {"run_id": run_id, "summary": summary, "reference_point": (ref_kl, ref_reward),
            "files": {k: str(v) for k, v in paths.items()}}
