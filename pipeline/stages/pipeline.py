"""The whole comparison end to end: pairs from the reference, one training run per method, fronts.

    1. every run's config is built and validated, prompts and reward sources checked (cheap, first)
    2. make_pairs: pairs.samples_per_prompt samples per prompt from model.policy, best/worst by pairs.reward
    3. the untrained reference is evaluated once: the common origin of every front
    4. one DPO/TDPO training run per pipeline.runs entry, on the pairs, evaluated during training
    5. the Pareto fronts of all their evaluation points: plot, tables, hypervolumes in MLflow

Every MLflow run of one pipeline carries the tag ``pipeline=<id>``; the Pareto run is ``pareto-<id>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cluster import connect_ray, storage_root
from pipeline.config import RunConfig, apply_overrides, validate_config
from pipeline.errors import ConfigError
from pipeline.eval.evaluator import build_evaluator
from pipeline.eval.rewards import check_reward
from pipeline.eval.runs import evaluate_model, experiment_points, log_pareto
from pipeline.models.loading import load_tokenizer
from pipeline.stages.pairs import run_make_pairs
from pipeline.tracking import attach_tracker, tracking_uri, ui_command
from pipeline.train.distributed import train_distributed
from pipeline.train.local import train_local


@dataclass
class PipelineResult:
    pipeline_id: str
    pairs_file: Path
    reference: dict[str, float]
    runs: list[dict[str, Any]] = field(default_factory=list)
    pareto: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    seconds: float = 0.0


def run_label(run: RunConfig) -> str:
    label = f"{run.loss.name}-b{run.loss.beta:g}"
    return label + (f"-a{run.loss.alpha:g}" if run.loss.name == "tdpo2" else "")


def run_configs(cfg: RunConfig, pipeline_id: str, pairs_file: Path) -> list[RunConfig]:
    """One validated training config per ``pipeline.runs`` entry: evaluation on, data = the pairs."""
    base = cfg.model_dump(mode="json")
    configs = []
    for i, overrides in enumerate(cfg.pipeline.runs):
        items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
        tree = apply_overrides(base, [*items, f"data.source={json.dumps(str(pairs_file))}", "eval.enabled=true"])
        tree["tracking"]["tags"] = {**tree["tracking"].get("tags", {}), "pipeline": pipeline_id}
        run = validate_config(tree, f"pipeline.runs[{i}] {overrides}")
        if run.pipeline.runs != cfg.pipeline.runs:
            raise ConfigError(f"pipeline.runs[{i}] may not change pipeline.* itself")
        run.output.run_name = f"{pipeline_id}-{i}-{run_label(run)}"
        configs.append(run)
    return configs


def run_pipeline(cfg: RunConfig, *, progress: bool = True) -> PipelineResult:
    if not cfg.tracking.enabled:
        raise ConfigError("jobs.pipeline needs tracking.enabled=true: the fronts are built from the MLflow runs")
    started = time.perf_counter()
    pipeline_id = cfg.output.run_name or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = storage_root(cfg) / pipeline_id
    pairs_file = Path(cfg.pairs.output).expanduser().resolve() if cfg.pairs.output else folder / "pairs.jsonl"
    tagged = cfg.model_copy(deep=True)
    tagged.tracking.tags = {**cfg.tracking.tags, "pipeline": pipeline_id}
    runs = run_configs(cfg, pipeline_id, pairs_file)
    check_reward(cfg.pairs.reward)
    m = cfg.model
    build_evaluator(cfg, load_tokenizer(m.tokenizer_spec, revision=m.revision, trust_remote_code=m.trust_remote_code))
    connect_ray(cfg.distributed.address)

    step_cfg = tagged.model_copy(deep=True)
    step_cfg.output.run_name = f"{pipeline_id}-make-pairs"
    step_cfg.pairs.output = str(pairs_file)
    pairs = run_make_pairs(step_cfg, progress=progress)
    reference: dict[str, float] = {}
    if cfg.pipeline.evaluate_reference:
        point, _ = evaluate_model(tagged, m.reference_spec, f"{pipeline_id}-reference")
        reference = point.metrics()
        if progress:
            print(f"reference: reward {point.reward:.4f}  KL {point.kl:.4f}  entropy {point.entropy:.3f}", flush=True)
    result = PipelineResult(pipeline_id, pairs.output or pairs_file, reference, folder=folder)
    for run in runs:
        trained = train_distributed(run, progress=progress) if run.distributed.enabled else train_local(run, progress=progress)
        final = trained.evaluations[-1] if trained.evaluations else {}
        result.runs.append({"run": run.output.run_name, "method": run.loss.name, "beta": run.loss.beta,
                            "alpha": run.loss.alpha if run.loss.name == "tdpo2" else None,
                            "final_loss": trained.history[-1]["loss"], "seconds_per_step": trained.seconds_per_step,
                            **final})
    points = experiment_points(cfg, filter_string=f"tags.pipeline = '{pipeline_id}'")
    result.pareto = log_pareto(tagged, points, f"{pipeline_id}-pareto", folder=folder / "pareto")
    result.seconds = time.perf_counter() - started
    summary = folder / "summary.json"
    summary.write_text(json.dumps(summary_record(result), indent=2, default=str), encoding="utf-8")
    attach_tracker(tracking_uri(cfg), result.pareto["run_id"], 0).log_artifact(summary)
    return result


def summary_record(result: PipelineResult) -> dict[str, Any]:
    return {"pipeline": result.pipeline_id, "seconds": result.seconds, "pairs_file": str(result.pairs_file),
            "reference": result.reference, "runs": result.runs,
            "pareto": {"reference_point": result.pareto.get("reference_point"),
                       "methods": [s.__dict__ for s in result.pareto.get("summary", [])],
                       "files": result.pareto.get("files")}}


def summary_table(result: PipelineResult, uri: str, experiment: str) -> str:
    """The table printed at the end, with where to look in the MLflow UI."""
    lines = [f"pipeline {result.pipeline_id}: {result.seconds / 60:.1f} min", "",
             f"{'run':<40} {'reward':>8} {'KL':>8} {'entropy':>8} {'distinct-2':>10}"]
    if result.reference:
        r = result.reference
        lines.append(f"{'reference (untrained)':<40} {r['eval/reward']:>8.4f} {r['eval/kl']:>8.4f} "
                     f"{r['eval/entropy']:>8.3f} {r['eval/distinct_2']:>10.3f}")
    for run in result.runs:
        lines.append(f"{run['run']:<40} {run.get('eval/reward', float('nan')):>8.4f} {run.get('eval/kl', float('nan')):>8.4f} "
                     f"{run.get('eval/entropy', float('nan')):>8.3f} {run.get('eval/distinct_2', float('nan')):>10.3f}")
    ref_kl, ref_reward = result.pareto["reference_point"]
    lines += ["", f"hypervolume (reference point: KL {ref_kl:.4g}, reward {ref_reward:.4g}):"]
    for s in result.pareto["summary"]:
        lines.append(f"  {s.method:<6} {s.hypervolume:.5f}   best reward {s.best_reward:.4f} at KL {s.kl_at_best:.4f}"
                     f"  ({s.front} of {s.points} points on the front)")

    ui = ui_command(uri)
    lines += ["", f"MLflow: {ui}",
              f"  experiment '{experiment}', runs tagged pipeline={result.pipeline_id}; compare their eval/reward and "
              "eval/kl charts;",
              f"  the fronts: run '{result.pipeline_id}-pareto', artifacts pareto/pareto.png and pareto/*.csv",
              f"  local copies: {result.pareto['files']['plot']}"]
    return "\n".join(lines)
