"""Generate preference pairs: k samples per prompt from a policy, best and worst by a reward source.

    python -m jobs.make_pairs --config configs/default.yaml pairs.samples_per_prompt=4 pairs.num_prompts=64

Writes a TRL-format JSONL (prompt, chosen, rejected) that data.source can name. Runs on Ray actors.
"""

from __future__ import annotations

from jobs.cli import run_job, stage_main


def main() -> int:
    from pipeline.stages.pairs import run_make_pairs

    return stage_main(__doc__, run_make_pairs)


if __name__ == "__main__":
    run_job(main)
