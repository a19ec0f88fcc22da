"""Shared fixtures. Everything runs offline: a test that reaches for the Hub fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from pipeline.models.loading import load_tokenizer

    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from pipeline.models.loading import resolve

    return Path(resolve("builtin:tiny").location)


STANDARD_ROWS = [
    {"prompt": "The film was", "chosen": " a delight from start to finish.", "rejected": " a chore to sit through."},
    {"prompt": "My review:", "chosen": " warm, funny and wise.", "rejected": " loud and empty."},
    {"prompt": "In short,", "chosen": " see it twice.", "rejected": " skip it."},
    {"prompt": "Verdict:", "chosen": " a small miracle.", "rejected": " a large mistake."},
]

CONVERSATIONAL_ROWS = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
    }
    for r in STANDARD_ROWS
]
