"""Load, validate and tokenize a preference dataset in one pass, with a report of every bad row."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import DataConfig
from pipeline.data.normalize import PreferenceExample, normalize_record
from pipeline.data.sources import read_records
from pipeline.data.tokenization import PairTokenizer, TokenizedPair
from pipeline.errors import DataError, RowProblem


@dataclass
class ValidationReport:
    source: str
    rows: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    @property
    def bad_rows(self) -> int:
        return len({p.row for p in self.problems})

    @property
    def valid_rows(self) -> int:
        return self.rows - self.bad_rows

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.formats.items())) or "none"
        text = f"{self.source}: {self.rows} rows, {self.valid_rows} valid ({kinds}), {self.bad_rows} invalid"
        if self.truncated:
            text += f", {self.truncated} truncated to fit max lengths"
        return text


@dataclass
class PreferenceDataset:
    examples: list[PreferenceExample]
    report: ValidationReport
    pairs: list[TokenizedPair] | None = None  # set when a tokenizer was given

    def __len__(self) -> int:
        return len(self.pairs if self.pairs is not None else self.examples)

    def length_stats(self) -> dict[str, dict[str, float]]:
        """min / median / max tokens of prompt, chosen and rejected sequences (needs a tokenizer)."""
        if not self.pairs:
            return {}
        columns = {
            "prompt": [len(p.prompt_ids) for p in self.pairs],
            "chosen": [len(p.chosen_ids) for p in self.pairs],
            "rejected": [len(p.rejected_ids) for p in self.pairs],
        }
        return {
            k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in columns.items()
        }


def load_preference_dataset(
    cfg: DataConfig, tokenizer: Any | None = None, *, raise_on_invalid: bool | None = None
) -> PreferenceDataset:
    """Read ``cfg.source``, normalise and validate every row, and tokenize when a tokenizer is given.

    With ``on_invalid: error`` (or ``raise_on_invalid=True``) any bad row raises one
    :class:`DataError` listing *all* bad rows; with ``skip`` they are dropped and
    listed in the report. No valid row at all is always an error.
    """
    report = ValidationReport(source=cfg.source)
    pair_tokenizer = (
        PairTokenizer(tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.prompt_truncation)
        if tokenizer is not None
        else None
    )
    examples: list[PreferenceExample] = []
    pairs: list[TokenizedPair] = []
    for row, record in read_records(cfg.source, cfg.split, cfg.limit):
        report.rows += 1
        result = normalize_record(row, record)
        if isinstance(result, list):
            report.problems.extend(result)
            continue
        if pair_tokenizer is not None:
            tokenized = pair_tokenizer(result)
            if isinstance(tokenized, RowProblem):
                report.problems.append(tokenized)
                continue
            pairs.append(tokenized)
            report.truncated += tokenized.truncated
        examples.append(result)
        kind = "conversational" if result.conversational else "standard"
        report.formats[kind] = report.formats.get(kind, 0) + 1

    must_raise = cfg.on_invalid == "error" if raise_on_invalid is None else raise_on_invalid
    if report.problems and must_raise:
        raise DataError(
            f"{cfg.source}: {report.bad_rows} of {report.rows} rows are invalid "
            "(set data.on_invalid=skip to drop them):",
            report.problems,
            source=cfg.source,
        )
    if not examples:
        raise DataError(f"{cfg.source}: no valid rows (read {report.rows})", report.problems, source=cfg.source)
    return PreferenceDataset(examples=examples, report=report, pairs=pairs if pair_tokenizer else None)
