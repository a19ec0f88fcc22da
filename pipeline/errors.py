"""The project's own error types: what a user did wrong, said in their terms.

Jobs catch :class:`PipelineError` and print its message without a traceback;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class PipelineError(Exception):
    """Base class of every error the user can fix (bad config, data, paths)."""


class ConfigError(PipelineError):
    """The configuration file or an override is invalid; the message names the key path."""


class ModelLoadError(PipelineError):
    """A model or tokenizer could not be found or loaded."""


@dataclass(frozen=True)
class RowProblem:
    """One reason one row of a preference dataset cannot be used.

    ``row`` is 1-based: the line number for JSON Lines files, the record
    number otherwise. ``field`` is the column (``prompt``, ``chosen``,
    ``rejected``) or ``(row)`` when the row as a whole is unusable.
    """

    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"row {self.row}, field '{self.field}': {self.message}"


class DataError(PipelineError):
    """A dataset cannot be loaded, or has rows that are invalid under ``on_invalid: error``."""

    def __init__(self, message: str, problems: list[RowProblem] | None = None, source: str | None = None):
        self.problems = list(problems or [])
        self.source = source
        super().__init__(message)

    def __str__(self) -> str:
        lines = [self.args[0]]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)
