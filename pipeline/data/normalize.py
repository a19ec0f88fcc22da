"""Normalise a raw record in any TRL preference format to one :class:`PreferenceExample`, or say why not.

Accepted formats (TRL's dataset-format guide):
    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}
                    msg = {"role": "system" | "user" | "assistant" | "tool", "content": str}
    implicit prompt {"chosen": ..., "rejected": ...} with no "prompt": the prompt is the
                    shared leading messages (conversational) or text (standard)
    prompt + whole conversations (UltraFeedback-binarized and most binarized-feedback sets)
                    {"prompt": str, "chosen": [msg, ...], "rejected": [msg, ...]}: chosen and rejected
                    repeat the user turn(s) and end with the answers; the prompt is their shared
                    leading messages (TRL's maybe_extract_prompt), and the string must be the last
                    user turn among them
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

    if _is_prompt_and_conversations(record):
        return _from_conversations(row, record)
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
    return _example(row, values["prompt"], values["chosen"], values["rejected"])


def _example(row: int, prompt: Any, chosen: Any, rejected: Any) -> PreferenceExample | list[RowProblem]:
    """The checks every format ends with, once prompt and responses are apart."""
    if isinstance(chosen, list):
        for field, response in (("chosen", chosen), ("rejected", rejected)):
            role = response[0]["role"]
            if role != "assistant":
                return [RowProblem(row, field, f"response must start with an assistant message, not '{role}'")]
    if chosen == rejected:
        return [RowProblem(row, "rejected", "identical to chosen")]
    return PreferenceExample(row=row, prompt=prompt, chosen=chosen, rejected=rejected)


def _is_prompt_and_conversations(record: dict[str, Any]) -> bool:
    return isinstance(record.get("prompt"), str) and all(isinstance(record.get(f), list) for f in ("chosen", "rejected"))


def _from_conversations(row: int, record: dict[str, Any]) -> PreferenceExample | list[RowProblem]:
    """A string prompt with chosen and rejected as whole conversations that repeat it: the prompt
    becomes the messages the two share, which must end in a user turn saying the same as the string."""
    prompt, issue = _check_field(record["prompt"], conversational=False)
    problems = [RowProblem(row, "prompt", issue)] if issue else []
    values, response_problems = _check_fields(row, {f: record[f] for f in ("chosen", "rejected")}, True)
    if problems or response_problems:
        return problems + response_problems
    chosen, rejected = values["chosen"], values["rejected"]
    if chosen == rejected:
        return [RowProblem(row, "rejected", "identical to chosen")]
    n = _shared_length(chosen, rejected)
    if n == 0:
        return [RowProblem(row, "prompt", "is a string, but chosen and rejected share no leading messages to hold "
                           "it: give the prompt as a list of messages, or chosen and rejected as whole "
                           "conversations that begin with it")]
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if n == len(messages):
            return [RowProblem(row, field, "is empty once the messages shared with the other response are removed")]
    users = [m["content"] for m in chosen[:n] if m["role"] == "user"]
    if not users:
        return [RowProblem(row, "prompt", "the messages chosen and rejected share hold no user turn to match it")]
    if users[-1].strip() != prompt.strip():
        return [RowProblem(row, "prompt", f"{reprlib.repr(prompt)} differs from the user turn chosen and rejected "
                           f"repeat ({reprlib.repr(users[-1])})")]
    return _example(row, chosen[:n], chosen[n:], rejected[n:])


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


def _shared_length(a: Any, b: Any) -> int:
    """How many leading items (messages or characters) ``a`` and ``b`` have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any] | None:
    """Split an implicit-prompt pair into (prompt, chosen, rejected), or None when nothing is shared."""
    n = _shared_length(chosen, rejected)
    if isinstance(chosen, list):
        if n == 0 or n == len(chosen) or n == len(rejected):
            return None
        return chosen[:n], chosen[n:], rejected[n:]
    # Cut at the last whitespace of the shared text, so no word is split between prompt and
    # response and each response starts with the separator, as tokenizers expect.
    cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
    if cut <= 0 or not chosen[:cut].strip():
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]
