"""Reward-KL Pareto fronts of runs already in MLflow, or the evaluation of a saved model.

    python -m jobs.evaluate --config configs/default.yaml                       every run of the experiment
    python -m jobs.evaluate --config configs/default.yaml --runs ID1 ID2        these runs
    python -m jobs.evaluate --config configs/default.yaml --filter "tags.pipeline = 'X'"
    python -m jobs.evaluate --config configs/default.yaml --model outputs/dpo-1/model --method dpo

Fronts: each run's eval/kl and eval/reward points, grouped by method (the run's `method` tag);
the plot, the tables and the hypervolume per method go to a new MLflow run (stage=pareto).
--model: sample from that model on eval.prompts, score it (eval.reward; KL against model.reference
or model.policy) and log the point as a run of method --method (required unless the model is the
reference itself).
"""

from __future__ import annotations

import json

from jobs.cli import config_parser, run_job
from pipeline.config import load_config


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--runs", nargs="+", metavar="RUN_ID", help="MLflow run ids (default: the whole experiment)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.pipeline = 'abc'\"")
    parser.add_argument("--model", help="evaluate this model spec instead of reading runs")
    parser.add_argument("--method", help="--model: the method tag of its run (dpo, tdpo1, ...); "
                                         "'reference' only for the untrained reference")
    parser.add_argument("--name", help="name of the MLflow run to create")
    args = parser.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    if args.model:
        from pipeline.errors import ConfigError
        from pipeline.eval.runs import evaluate_model

        if args.method is None:
            if args.model != cfg.model.reference_spec:
                raise ConfigError("--model: say which method trained it with --method (dpo, tdpo1, tdpo2, ...); "
                                  "'reference' is for the untrained reference, the fronts' baseline")
            args.method = "reference"
        point, run_id = evaluate_model(cfg, args.model, args.name or f"evaluate-{args.method}", method=args.method)
        print(json.dumps({"run_id": run_id, **point.metrics()}, indent=2))
        return 0
    from pipeline.eval.runs import experiment_points, log_pareto

    points = experiment_points(cfg, args.runs, args.filter)
    report = log_pareto(cfg, points, args.name)
    print(json.dumps({"run_id": report["run_id"], "reference_point": report["reference_point"],
                      "methods": [s.__dict__ for s in report["summary"]], "files": report["files"]}, indent=2))
    return 0


if __name__ == "__main__":
    run_job(main)
