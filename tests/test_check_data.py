"""`python -m jobs.check_data`, run as a user runs it: exit codes and what it prints."""

from __future__ import annotations

import subprocess

from tests.conftest import CONVERSATIONAL_ROWS, STANDARD_ROWS, run_module, write_jsonl


def check_data(*args: str) -> subprocess.CompletedProcess:
    return run_module("jobs.check_data", *args)


BAD_ROWS = [
    STANDARD_ROWS[0],                                                   # 1 ok
    {"prompt": "p", "rejected": "r"},                                   # 2 chosen missing
    {"prompt": "p", "chosen": None, "rejected": "r"},                   # 3 chosen null
    {"prompt": "p", "chosen": "c", "rejected": ["r"]},                  # 4 rejected not a string
    {"prompt": "   ", "chosen": "c", "rejected": "r"},                  # 5 prompt empty
    {"prompt": "p", "chosen": "twin", "rejected": "twin"},              # 6 identical
    '{"prompt": "p", "chosen": "c"',                                    # 7 unparseable
    {"prompt": "long " * 40, "chosen": " c", "rejected": " r"},         # 8 no room for the response
    STANDARD_ROWS[1],                                                   # 9 ok
]
EXPECTED = [(2, "chosen", "missing"), (3, "chosen", "is null"), (4, "rejected", "expected a string, got list"),
            (5, "prompt", "is empty"), (6, "rejected", "identical to chosen"), (7, "(row)", "not valid JSON"),
            (8, "prompt", "leaves no room for the response")]


def test_mixed_file_names_every_bad_row_and_exits_1(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", BAD_ROWS)
    out = check_data(str(path), "--tokenizer", "builtin:tiny", "--max-length", "64", "--max-prompt-length", "0")
    assert out.returncode == 1, out.stderr
    assert "9 rows, 2 valid" in out.stdout
    for row, field, fragment in EXPECTED:
        line = next((ln for ln in out.stdout.splitlines() if ln.strip().startswith(f"row {row}, field '{field}'")), None)
        assert line is not None and fragment in line, (row, field, out.stdout)
    assert "Traceback" not in out.stdout + out.stderr


def test_valid_standard_file_exits_0_with_summary(tmp_path):
    path = write_jsonl(tmp_path / "standard.jsonl", STANDARD_ROWS)
    out = check_data(str(path), "--tokenizer", "builtin:tiny")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rows, 4 valid (4 standard), 0 invalid" in out.stdout
    assert "token lengths (builtin:tiny)" in out.stdout and "median" in out.stdout


def test_valid_conversational_file_exits_0(tmp_path):
    path = write_jsonl(tmp_path / "conversational.jsonl", CONVERSATIONAL_ROWS)
    out = check_data(str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rows, 4 valid (4 conversational), 0 invalid" in out.stdout


def test_missing_path_is_a_clear_error(tmp_path):
    out = check_data(str(tmp_path / "nowhere.jsonl"))
    assert out.returncode == 2
    assert f"error: dataset file not found: {tmp_path / 'nowhere.jsonl'}" in out.stderr
    assert "Traceback" not in out.stderr


def test_all_rows_bad_still_lists_them(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, "{oops"])
    out = check_data(str(path))
    assert out.returncode == 1
    assert "row 1, field 'chosen': missing" in out.stdout and "row 2, field '(row)'" in out.stdout


def test_uses_the_config_tokenizer_and_limits():
    out = check_data("builtin:pang-lee-polarity", "--config", "configs/tiny.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "100 rows, 100 valid (100 conversational)" in out.stdout
    assert "token lengths (builtin:tiny)" in out.stdout
