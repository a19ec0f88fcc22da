"""Train a policy with DPO / TDPO on one process.

    python -m jobs.train --config configs/default.yaml loss.name=tdpo2 loss.beta=0.1
"""

from __future__ import annotations

import json

from jobs.cli import config_parser, run_job
from pipeline.config import load_config
from pipeline.train.local import summarize, train_local


def main() -> int:
    args = config_parser(__doc__).parse_args()
    cfg = load_config(args.config, args.overrides)
    result = train_local(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), **summarize(result)}, indent=2))
    return 0


if __name__ == "__main__":
    run_job(main)
