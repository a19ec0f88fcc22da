"""The end of a sweep: fronts over every trial's evaluation points, hypervolumes and the best
configuration per method on the MLflow parent run, the trial table, and what jobs.sweep prints."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.eval.pareto import REFERENCE_METHOD, Point, by_method, pareto_front
from pipeline.eval.runs import experiment_points, log_pareto
from pipeline.tracking import experiment_client, ui_command
from pipeline.tune.space import flat_space


def report_sweep(cfg: RunConfig, result: Any, parent: Any, trials: set[str]) -> None:
    """Fronts over the evaluation points of the sweep's ``trials`` (Tune trial ids), hypervolumes, best
    configs and the trial table. Child runs of trials Tune no longer knows (an Optuna trial started
    after Tune last saved its state, before the driver died) are ended and left out."""

    keys = flat_space(cfg.sweep.space)
    by_trial = {row["trial"]: {k: v for k, v in row.items() if k in keys} for row in result.trials}
    swept = {}
    for run in _child_runs(cfg, result):
        trial = run.data.tags.get("trial")
        if trial in trials:
            swept[run.info.run_name] = by_trial.get(trial, {})
        if run.info.status == "RUNNING":  # Tune ended the trial (ASHA stopped it), or forgot it
            parent.client.set_tag(run.info.run_id, "sweep.stopped_early" if trial in trials else "sweep.orphaned",
                                  "true")
            parent.client.set_terminated(run.info.run_id, "KILLED")
    points = [p for p in experiment_points(cfg, filter_string=f"tags.sweep = '{result.sweep_id}' and "
                                                              f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
              if p.run in swept]
    if result.reference:
        points.append(Point(REFERENCE_METHOD, f"{result.sweep_id}-reference", 0,
                            result.reference["eval/kl"], result.reference["eval/reward"]))
    result.pareto = log_pareto(cfg, points, tracker=parent, folder=result.folder / "pareto")
    result.kl_budget = cfg.sweep.kl_budget
    result.best = best_configs(points, swept, cfg.sweep.kl_budget)
    (result.folder / "best_configs.json").write_text(json.dumps(result.best, indent=2), encoding="utf-8")
    parent.log_artifact(result.folder / "best_configs.json")
    parent.log_params({f"best.{method}.{key}": value for method, best in result.best.items()
                       for key, value in best["config"].items()})
    table = result.folder / "trials.csv"
    _write_rows(table, result.trials)
    parent.log_artifact(table)


def _child_runs(cfg: RunConfig, result: Any) -> list[Any]:
    client, experiment = experiment_client(cfg)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
                              max_results=10_000)


def best_configs(points: list, configs: dict[str, dict[str, Any]], kl_budget: float | None) -> dict[str, Any]:
    """Per method: the point on its front with the highest reward whose KL is within ``kl_budget``
    (no budget: the front's highest reward), and the swept values of the trial it came from."""

    best = {}
    for method, group in sorted(by_method(points).items()):
        if method == REFERENCE_METHOD:
            continue
        eligible = [p for p in pareto_front(group) if kl_budget is None or p.kl <= kl_budget]
        if not eligible:
            continue
        p = max(eligible, key=lambda p: p.reward)
        best[method] = {"run": p.run, "step": p.step, "reward": p.reward, "kl": p.kl,
                        "config": configs.get(p.run, {})}
    return best


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=keys)
        out.writeheader()
        out.writerows(rows)


def summary_table(result: Any, uri: str, experiment: str) -> str:
    """What jobs.sweep prints at the end, with where to look in the MLflow UI."""
    lines = [f"sweep {result.sweep_id}: {len(result.trials)} trials in {result.seconds / 60:.1f} min", ""]
    rp = result.reference_pass
    if rp:
        lines.append(f"reference pass: {rp['forward_passes']} forward passes ({rp['kind']} statistics), "
                     f"{rp['computed_chunks']} chunks computed, {rp['cached_chunks']} already cached")
    if result.reference:
        lines.append(f"reference (untrained): reward {result.reference['eval/reward']:.4f}")
    keys = [k for k in (result.trials[0] if result.trials else {}) if k not in ("trial", "mlflow_run_id")]
    lines += ["", "  ".join(f"{k:>12}" for k in ["trial", *keys])]
    for row in result.trials:
        cells = [row["trial"]] + [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    ref_kl, ref_reward = result.pareto["reference_point"]
    lines += ["", f"hypervolume (reference point: KL {ref_kl:.4g}, reward {ref_reward:.4g}):"]
    for s in result.pareto["summary"]:
        lines.append(f"  {s.method:<6} {s.hypervolume:.5f}   ({s.front} of {s.points} points on the front)")
    lines.append("best configuration per method" + (f" (KL <= {result.kl_budget:g})" if result.kl_budget else "") + ":")
    for method, best in result.best.items():
        lines.append(f"  {method:<6} {best['config']}  reward {best['reward']:.4f} at KL {best['kl']:.4f} "
                     f"(step {best['step']})")

    ui = ui_command(uri)
    lines += ["", f"MLflow: {ui}",
              f"  experiment '{experiment}', parent run '{result.sweep_id}' (expand it: one child run per trial);",
              "  the fronts: the parent's artifacts pareto/pareto.png, pareto/*.csv, best_configs.json, trials.csv"]
    return "\n".join(lines)

