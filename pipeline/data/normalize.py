"""Normalise a raw record in any TRL preference format to one :class:`PreferenceExample`, or say why not.

Accepted formats (TRL's dataset-format guide):
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}
                    msg = {"role": "system" | "user" | "assistant" | "tool", "content": str}
    implicit prompt {"chosen": ..., "rejected": ...} with no "prompt": the prompt is the
                    shared leading messages (conversational) or text (standard)
Other keys are ignored. :func:`normalize_record` never raises on bad input: it
returns the list of :class:`RowProblem` for the row.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

from pipeline.data.sources import Unparseable
from pipeline.errors import RowProblem

ROLES = ("system", "user", "assistant", "tool")
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair. Text fields are str (standard) or message lists (conversational)."""

    row: int
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def normalize_record(row: int, record: Any) -> PreferenceExample | list[RowProblem]:
    if isinstance(record, Unparseable):
        return [RowProblem(row, "(row)", record.message)]
    if not isinstance(record, dict):
        return [RowProblem(row, "(row)", f"expected an object with prompt/chosen/rejected, got {_kind(record)}")]

    # The chosen response decides the format; the other fields must agree with it.
    conversational = isinstance(record.get("chosen"), list)
    values, problems = _check_fields(row, record, conversational)
    if problems:
        return problems

    if "prompt" not in values:
        split = _split_implicit_prompt(values["chosen"], values["rejected"])
        if split is None:
            return [RowProblem(row, "prompt", "no prompt given and chosen/rejected share no leading text to infer one")]
        values["prompt"], values["chosen"], values["rejected"] = split
        for field in ("chosen", "rejected"):
            if not conversational and not values[field].strip():  # e.g. chosen "0 ", rejected "0"
                return [RowProblem(row, field, "is empty once the prompt shared with the other response is removed")]
    if conversational:
        for field in ("chosen", "rejected"):
            role = values[field][0]["role"]
            if role != "assistant":
                return [RowProblem(row, field, f"response must start with an assistant message, not '{role}'")]

    if values["chosen"] == values["rejected"]:
        return [RowProblem(row, "rejected", "identical to chosen")]
    return PreferenceExample(row=row, prompt=values["prompt"], chosen=values["chosen"], rejected=values["rejected"])


def _check_fields(row: int, record: dict[str, Any], conversational: bool) -> tuple[dict[str, Any], list[RowProblem]]:
    fields = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    values: dict[str, Any] = {}
    problems: list[RowProblem] = []
    for field in fields:
        if field not in record:
            problems.append(RowProblem(row, field, "missing"))
            continue
        value, issue = _check_field(record[field], conversational)
        if issue:
            problems.append(RowProblem(row, field, issue))
        else:
            values[field] = value
    return values, problems


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_field(value: Any, conversational: bool) -> tuple[Any, str | None]:
    """(value, None) when usable, else (None, why)."""
    if value is None:
        return None, "is null"
    if conversational:
        if not isinstance(value, list):
            return None, f"expected a list of messages (the row is conversational), got {_kind(value)}"
        return _check_messages(value)
    if not isinstance(value, str):
        return None, f"expected a string, got {_kind(value)}"
    if not value.strip():
        return None, "is empty"
    issue = _unicode_issue(value)
    return (None, issue) if issue else (value, None)


def _check_messages(messages: list[Any]) -> tuple[Any, str | None]:
    if not messages:
        return None, "is an empty list of messages"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return None, f"message {i} is {_kind(msg)}, not an object with role and content"
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            # reprlib: the role quoted short, whatever it is (a megabyte string, a nested list)
            return None, f"message {i} has role {reprlib.repr(role)}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return None, f"message {i} content is {_kind(content)}, not a string"
        if not content.strip():
            return None, f"message {i} content is empty"
        if issue := _unicode_issue(content):
            return None, f"message {i} content {issue}"
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


def _unicode_issue(text: str) -> str | None:
    """JSON's \\ud800-style escapes can spell lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode (unpaired surrogate {text[e.start]!r} at character {e.start})"
    return None


def _split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | None:
    """Split an implicit-prompt pair into (prompt, chosen, rejected), or None when nothing is shared."""
    if isinstance(chosen, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0 or n == len(chosen) or n == len(rejected):
            return None
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # Cut at the last whitespace of the shared text, so no word is split between prompt and
    # response and each response starts with the separator, as tokenizers expect.
    cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
    if cut <= 0 or not chosen[:cut].strip():
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]
