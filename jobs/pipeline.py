"""The DPO-vs-TDPO comparison end to end, offline by default.

    python -m jobs.pipeline                                   the embedded default (configs/default.yaml)
    python -m jobs.pipeline --config configs/paper/imdb_gpt2.yaml

Pairs from the reference's own samples (labelled by pairs.reward), one training run per
pipeline.runs entry on Ray, each evaluated during training (eval.*), then the reward-KL
Pareto fronts in MLflow. Prints a summary table and where to look in the MLflow UI.
"""

from __future__ import annotations

from jobs.cli import config_parser, run_job
from pipeline.config import load_config


def main() -> int:
    args = config_parser(__doc__).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    from pipeline.stages.pipeline import run_pipeline, summary_table
    from pipeline.tracking import tracking_uri

    result = run_pipeline(cfg)
    print("\n" + summary_table(result, tracking_uri(cfg), cfg.tracking.experiment), flush=True)
    return 0


if __name__ == "__main__":
    run_job(main)
