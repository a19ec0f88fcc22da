"""Train a Bradley-Terry reward model on preference pairs, on Ray Train (DDP).

    python -m jobs.reward_model --config configs/default.yaml reward_model.source=pairs.jsonl

Starts from reward_model.base (default model.policy) with a new scalar head, holds out
reward_model.eval_fraction of the pairs and reports their accuracy. The saved model
(<output.dir>/<run name>/model) is a reward source: eval.reward.source=<that folder>.
"""

from __future__ import annotations

from jobs.cli import run_job, stage_main


def main() -> int:
    from pipeline.stages.reward_model import run_reward_model

    return stage_main(__doc__, run_reward_model)


if __name__ == "__main__":
    run_job(main)
