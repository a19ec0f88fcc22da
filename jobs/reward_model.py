"""Train a Bradley-Terry reward model on preference pairs, on Ray Train (DDP).

    python -m jobs.reward_model --config configs/default.yaml reward_model.source=pairs.jsonl

Starts from reward_model.base (default model.policy) with a new scalar head, holds out
reward_model.eval_fraction of the pairs and reports their accuracy. The saved model
(<output.dir>/<run name>/model) is a reward source: eval.reward.source=<that folder>.
"""

from __future__ import annotations

import json

from jobs.cli import config_parser, run_job
from pipeline.config import load_config


def main() -> int:
    args = config_parser(__doc__).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    from pipeline.stages.reward_model import run_reward_model

    result = run_reward_model(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), "model_dir": str(result.model_dir), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    run_job(main)
