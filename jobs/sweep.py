"""A Ray Tune sweep: one distributed DPO/TDPO training run per trial, the fronts on an MLflow parent run.

    python -m jobs.sweep                                 sweep.space of configs/default.yaml (2 losses x 2 betas)
    python -m jobs.sweep sweep.search=optuna sweep.num_samples=12 \\
        'sweep.space={loss.name: [dpo, tdpo2], loss.beta: {loguniform: [0.01, 1.0]}}'
    python -m jobs.sweep --resume outputs/sweep-20261121-120000     finish an interrupted sweep

The reference statistics are computed once per sweep; each trial is a TorchTrainer with its
periodic evaluation (eval.*). Prints the trials, the hypervolumes, the best configuration per
method, and where to look in the MLflow UI.
"""

from __future__ import annotations

from jobs.cli import config_parser, run_job
from pipeline.errors import ConfigError


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--resume", metavar="SWEEP_DIR",
                        help="a sweep folder (<storage>/<sweep id>) to finish with Tuner.restore; "
                             "its saved config is used, so no --config or overrides")
    args = parser.parse_intermixed_args()
    from pipeline.config import load_config
    from pipeline.tune.sweep import resume_sweep, run_sweep, summary_table

    if args.resume:
        if args.overrides:
            raise ConfigError("--resume takes the sweep's saved config; overrides are not allowed")
        result = resume_sweep(args.resume)
    else:
        result = run_sweep(load_config(args.config, args.overrides))
    cfg = load_config(result.folder / "config.yaml")
    print("\n" + summary_table(result, result.tracking_uri, cfg.tracking.experiment), flush=True)
    return 0


if __name__ == "__main__":
    run_job(main)
