"""Prompts for sampling: a builtin set, a text file (one prompt per line), or a dataset (local or Hub).

Dataset rows give their prompt as a ``prompt`` field; preference rows without one (e.g. Anthropic
HH: chosen/rejected sharing the conversation) give the shared leading text, as preference
training infers it; rows with only ``text`` (e.g. IMDb reviews) give their first ``words`` words:
the DPO paper's review prefixes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.builtin import movie_prefixes
from pipeline.data.normalize import normalize_record
from pipeline.data.sources import Unparseable, read_records
from pipeline.errors import DataError

BUILTIN_PROMPTS = ("movie-prefixes",)


def load_prompts(source: str, split: str = "all", limit: int | None = None, words: int | None = None) -> list[str]:
    """The prompts of ``source`` (at most ``limit``); a clear DataError when there are none or one is not text."""
    if source.startswith("builtin:"):
        name = source[len("builtin:") :]
        if name != "movie-prefixes":
            raise DataError(f"unknown builtin prompt set '{source}'; known: "
                            + ", ".join(f"builtin:{b}" for b in BUILTIN_PROMPTS))

        prompts = movie_prefixes(split)
    elif source.lower().endswith(".txt"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"prompt file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"prompt file {path} is not UTF-8 text: {e}") from None
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = _prompt_field(source, split if split != "all" else "train", limit, words)
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise DataError(f"no prompts in {source} (split {split})")
    return prompts


def _prompt_field(source: str, split: str, limit: int | None, words: int | None) -> list[str]:
    prompts = []
    for number, record in read_records(source, split, limit):
        if isinstance(record, Unparseable):
            raise DataError(f"{source} row {number}: {record.message}")
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if prompt is None and isinstance(record, dict) and "chosen" in record:
            example = normalize_record(number, record)
            prompt = example.prompt if not isinstance(example, list) else None
        if prompt is None and isinstance(record, dict) and isinstance(record.get("text"), str):
            prompt = " ".join(record["text"].split()[:words]) if words else record["text"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source} row {number}: needs a text field 'prompt' (or chosen/rejected sharing a "
                            f"prompt, or 'text'); got keys {sorted(record) if isinstance(record, dict) else record!r}")
        prompts.append(prompt)
    return prompts
