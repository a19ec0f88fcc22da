"""Supervised fine-tuning on Ray Train (DDP): responses, or whole texts.

    python -m jobs.sft --config configs/default.yaml sft.max_steps=100 sft.source=data/sft.jsonl

Fine-tunes model.policy on sft.source and writes <output.dir>/<run name>/model (safetensors),
which model.policy can then name. Logs to MLflow.
"""

from __future__ import annotations

from jobs.cli import run_job, stage_main


def main() -> int:
    from pipeline.stages.sft import run_sft

    return stage_main(__doc__, run_sft)


if __name__ == "__main__":
    run_job(main)
