"""Prompts for sampling: a builtin set, a text file (one prompt per line) or a dataset with a ``prompt`` field."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataError

BUILTIN_PROMPTS = ("movie-prefixes",)


def load_prompts(source: str, split: str = "all", limit: int | None = None) -> list[str]:
    """The prompts of ``source`` (at most ``limit``); a clear DataError when there are none or one is not text."""
    if source.startswith("builtin:"):
        name = source[len("builtin:") :]
        if name != "movie-prefixes":
            raise DataError(f"unknown builtin prompt set '{source}'; known: "
                            + ", ".join(f"builtin:{b}" for b in BUILTIN_PROMPTS))
        from pipeline.data.builtin import movie_prefixes

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
        prompts = _prompt_field(source, split if split != "all" else "train")
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise DataError(f"no prompts in {source} (split {split})")
    return prompts


def _prompt_field(source: str, split: str) -> list[str]:
    from pipeline.data.sources import Unparseable, read_records

    prompts = []
    for number, record in read_records(source, split):
        if isinstance(record, Unparseable):
            raise DataError(f"{source} row {number}: {record.message}")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source} row {number}: needs a non-empty text field 'prompt' (got {type(prompt).__name__})")
        prompts.append(prompt)
    return prompts
