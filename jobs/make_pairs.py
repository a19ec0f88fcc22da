"""Generate preference pairs: k samples per prompt from a policy, best and worst by a reward source.

    python -m jobs.make_pairs --config configs/default.yaml pairs.samples_per_prompt=4 pairs.num_prompts=64

Writes a TRL-format JSONL (prompt, chosen, rejected) that data.source can name. Runs on Ray actors.
"""

from __future__ import annotations

import json

from jobs.cli import config_parser, run_job
from pipeline.config import load_config


def main() -> int:
    args = config_parser(__doc__).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    from pipeline.stages.pairs import run_make_pairs

    result = run_make_pairs(cfg)
    print(json.dumps({"pairs_file": str(result.output), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    run_job(main)
