"""Read raw preference records from a builtin source, a local file or folder, or the Hugging Face Hub.

Every reader yields ``(row_number, record)`` where ``record`` is a dict, or a
:class:`Unparseable` carrying why that row could not be read. Local JSON Lines
and CSV are read here, row by row, so that one bad line is reported with its
number instead of failing the whole file; folders and Hub names go through
``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.builtin import builtin_records
from pipeline.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
BUILTIN_PREFIX = "builtin:"
# UTF-8 that drops a leading byte-order mark, which Windows editors and Excel write: left in, it
# turns a CSV header's first column into "\ufeffprompt" (so every row's prompt goes missing) and
# makes the first JSON line unparseable.
UTF8_SIG = "utf-8-sig"


@dataclass(frozen=True)
class Unparseable:
    message: str


Record = dict[str, Any] | Unparseable


def looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or source.lower().endswith(LOCAL_SUFFIXES + (".json.gz", ".jsonl.gz"))
        or Path(source).expanduser().exists()
    )


def read_records(source: str, split: str = "train", limit: int | None = None) -> Iterator[tuple[int, Record]]:
    """Rows of ``source`` as ``(1-based row number, record)``, at most ``limit`` of them."""
    rows = _dispatch(source, split)
    for i, (number, record) in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield number, record


def _dispatch(source: str, split: str) -> Iterator[tuple[int, Record]]:
    if source.startswith(BUILTIN_PREFIX):
        return enumerate(builtin_records(source[len(BUILTIN_PREFIX) :]), start=1)
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"dataset file not found: {path}", source=source)
        if path.is_dir():
            return _read_hub_or_folder(str(path), split)
        return _read_local_file(path)
    return _read_hub_or_folder(source, split)


def _read_local_file(path: Path) -> Iterator[tuple[int, Record]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"unsupported dataset file type '{suffix}' for {path}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Record]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode(UTF8_SIG if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, Unparseable(f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, Unparseable(f"line is not valid JSON: {e.msg} at character {e.pos}")
            except RecursionError:
                yield number, Unparseable("line is not usable JSON: nested too deeply")
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                yield number, Unparseable(f"line is not usable JSON: {e}")


def _read_json(path: Path) -> Iterator[tuple[int, Record]]:
    try:
        tree = json.loads(path.read_bytes().decode(UTF8_SIG))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{path} is not usable JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{path} is not usable JSON: {e}") from None
    # {"train": [...], "test": [...]} and {"data": [...]} are common wrappings of a list of rows.
    if isinstance(tree, dict) and len(tree) == 1 and isinstance(next(iter(tree.values())), list):
        tree = next(iter(tree.values()))
    if not isinstance(tree, list):
        raise DataError(f"{path} must hold a JSON list of rows (or one key mapping to such a list)")
    return enumerate(tree, start=1)


def _read_csv(path: Path) -> Iterator[tuple[int, Record]]:
    try:
        text = path.read_bytes().decode(UTF8_SIG)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    for number, row in enumerate(reader, start=1):
        if None in row:  # more cells than header columns
            yield number, Unparseable(f"row has {len(fields) + len(row[None])} cells, header has {len(fields)}")
            continue
        # csv cannot say null: a missing cell (short row) is None, an empty one is "".
        yield number, {k: v for k, v in row.items() if v is not None}


def _read_parquet(path: Path) -> Iterator[tuple[int, Record]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
    return enumerate(table.to_pylist(), start=1)


def _read_hub_or_folder(name: str, split: str) -> Iterator[tuple[int, Record]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"dataset '{name}' has no split '{split}': {e}") from None
        raise DataError(f"could not load dataset '{name}': {e}") from None
    except Exception as e:  # network, missing repo, offline mode: all one message for the user
        raise DataError(
            f"could not load dataset '{name}' (not a local file; tried the Hugging Face Hub): "
            f"{type(e).__name__}: {e}"
        ) from None
    return enumerate(ds, start=1)
