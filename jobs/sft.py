"""Supervised fine-tuning on Ray Train (DDP): responses, or whole texts.

    python -m jobs.sft --config configs/default.yaml sft.max_steps=100 sft.source=data/sft.jsonl

Fine-tunes model.policy on sft.source and writes <output.dir>/<run name>/model (safetensors),
which model.policy can then name. Logs to MLflow.
"""

from __future__ import annotations

import json

from jobs.cli import config_parser, run_job
from pipeline.config import load_config


def main() -> int:
    args = config_parser(__doc__).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    from pipeline.stages.sft import run_sft

    result = run_sft(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), "model_dir": str(result.model_dir), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    run_job(main)
