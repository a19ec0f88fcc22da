"""Validate a preference dataset without training.

    python -m jobs.check_data data.jsonl
    python -m jobs.check_data data.jsonl --tokenizer builtin:smollm2-135m-instruct --max-length 256
    python -m jobs.check_data builtin:pang-lee-polarity --config configs/default.yaml

Exit 0: every row is usable; prints rows, valid rows and, with a tokenizer,
token-length statistics. Exit 1: prints every bad row with its number and field.
Exit 2: the source itself cannot be read (missing file, bad config).
"""

from __future__ import annotations

import argparse
from typing import Any

from jobs.cli import run_job
from pipeline.config import DataConfig, read_yaml, validate_config, validate_section
from pipeline.data.dataset import PreferenceDataset, load_preference_dataset
from pipeline.errors import DataError


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a .json/.jsonl/.parquet/.csv file or folder, builtin:NAME, or a Hub dataset")
    p.add_argument("--config", help="take tokenizer and data settings (max lengths, split) from this config")
    p.add_argument("--tokenizer", help="tokenizer spec for token-length checks (default: the config's, if any)")
    p.add_argument("--split", help="dataset split (Hub datasets and folders)")
    p.add_argument("--max-length", type=int, help="prompt + response token budget")
    p.add_argument("--max-prompt-length", type=int, help="prompt token budget (0: never truncate prompts)")
    return p.parse_intermixed_args()


def data_config(args: argparse.Namespace) -> tuple[DataConfig, str | None]:
    section: dict[str, Any] = {}
    tokenizer = args.tokenizer
    origin = "command-line flags"
    if args.config:
        tree = read_yaml(args.config)
        cfg = validate_config(tree, args.config)
        # The section as written, not as resolved: a max_prompt_length the file leaves out follows --max-length.
        section = dict(tree["data"])
        tokenizer = tokenizer or cfg.model.tokenizer_spec
        origin = f"{args.config} with command-line flags"
    section["source"] = args.source
    section["limit"] = None
    for key in ("split", "max_length"):
        if getattr(args, key) is not None:
            section[key] = getattr(args, key)
    if args.max_prompt_length is not None:
        section["max_prompt_length"] = args.max_prompt_length or None
    return validate_section(DataConfig, section, origin, "data"), tokenizer


def print_lengths(dataset: PreferenceDataset, tokenizer: str) -> None:
    print(f"token lengths ({tokenizer}):")
    for column, s in dataset.length_stats().items():
        print(f"  {column:<9} min {s['min']:>5}  median {s['median']:>7.1f}  max {s['max']:>5}")


def print_problems(header: str, problems: list) -> None:
    print(header)
    for problem in problems:
        print(f"  {problem}")


def main() -> int:
    args = parse_args()
    cfg, tokenizer_spec = data_config(args)
    tokenizer = None
    if tokenizer_spec:
        from pipeline.models.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec)
    try:
        dataset = load_preference_dataset(cfg, tokenizer, raise_on_invalid=False)
    except DataError as e:
        if not e.problems:
            raise  # the source itself is unreadable: exit 2 with the message
        print_problems(f"{cfg.source}: no valid rows; {len({p.row for p in e.problems})} invalid:", e.problems)
        return 1
    report = dataset.report
    print(report.summary())
    if tokenizer_spec:
        print_lengths(dataset, tokenizer_spec)
    if report.problems:
        print_problems("invalid rows:", report.problems)
        return 1
    return 0


if __name__ == "__main__":
    run_job(main)
