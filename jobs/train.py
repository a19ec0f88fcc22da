"""Train a policy with DPO / TDPO: Ray Train workers under DeepSpeed, a reference actor group.

    python -m jobs.train --config configs/default.yaml loss.name=tdpo2 loss.beta=0.1
    ray job submit --working-dir . -- python -m jobs.train --config configs/default.yaml output.dir=/shared/runs

Joins the Ray cluster named by distributed.address or $RAY_ADDRESS (set by `ray job submit`),
otherwise starts Ray on this machine. distributed.enabled=false trains on one process, no Ray.
"""

from __future__ import annotations

import json

from jobs.cli import config_parser, run_job
from pipeline.config import load_config
from pipeline.train.local import train_local
from pipeline.train.setup import summarize


def main() -> int:
    args = config_parser(__doc__).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.distributed.enabled:
        from pipeline.train.distributed import train_distributed

        result = train_distributed(cfg)
    else:
        result = train_local(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), **summarize(result)}, indent=2))
    return 0


if __name__ == "__main__":
    run_job(main)
