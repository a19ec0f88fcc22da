"""`python -m jobs.check_data`, run as a user runs it: exit codes and what it prints."""

from __future__ import annotations

import subprocess

import pytest

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


# ---------------------------------------------------------------- prompt + whole conversations, with the real tokenizer

SMOLLM2 = "builtin:smollm2-135m-instruct"
BINARIZED_ROWS = [  # UltraFeedback-binarized's layout: a string prompt, chosen/rejected repeating it
    {"prompt": r["prompt"][0]["content"], "chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"],
     "messages": r["prompt"] + r["chosen"], "score_chosen": 8.0, "score_rejected": 4.0}
    for r in CONVERSATIONAL_ROWS
]


@pytest.mark.smollm
def test_binarized_feedback_layout_passes_with_the_real_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", BINARIZED_ROWS)
    out = check_data(str(path), "--tokenizer", SMOLLM2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rows, 4 valid (4 conversational), 0 invalid" in out.stdout
    assert f"token lengths ({SMOLLM2})" in out.stdout


def test_binarized_feedback_row_whose_prompt_disagrees_is_named(tmp_path):
    rows = [BINARIZED_ROWS[0], {**BINARIZED_ROWS[1], "prompt": "Your review:"}, BINARIZED_ROWS[2]]
    out = check_data(str(write_jsonl(tmp_path / "mismatch.jsonl", rows)))
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("  row 2, field 'prompt': 'Your review:' differs from the user turn chosen and rejected repeat "
            "('My review:')") in out.stdout.splitlines()


# ---------------------------------------------------------------- max lengths: derived when not given, checked when given


@pytest.mark.smollm
@pytest.mark.parametrize("max_length", [256, 128, 64])
def test_max_length_alone_is_enough(tmp_path, max_length):
    path = write_jsonl(tmp_path / "standard.jsonl", STANDARD_ROWS)
    out = check_data(str(path), "--tokenizer", SMOLLM2, "--max-length", str(max_length))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rows, 4 valid (4 standard), 0 invalid" in out.stdout


def test_max_length_alone_follows_with_a_config_that_leaves_the_prompt_length_out(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: {policy: builtin:tiny}\ndata: {source: x}\nloss: {name: dpo}\n")
    path = write_jsonl(tmp_path / "standard.jsonl", STANDARD_ROWS)
    out = check_data(str(path), "--config", str(config), "--max-length", "64")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "token lengths (builtin:tiny)" in out.stdout


def assert_config_error(out, line: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "pydantic.dev" not in text and "Traceback" not in text and "Value error" not in text, text
    assert out.stderr.startswith("error: invalid configuration ("), text
    assert line in out.stderr.splitlines(), text


@pytest.mark.parametrize("flags,line", [
    (["--max-length", "1"], "  data.max_length: Input should be greater than or equal to 2 (got 1)"),
    (["--max-length", "2000000"], "  data.max_length: Input should be less than or equal to 1000000 (got 2000000)"),
    (["--max-length", "64", "--max-prompt-length", "64"],
     "  data.max_prompt_length: 64 leaves no room for the response: it must be smaller than max_length (64)"),
    (["--max-prompt-length", "-3"], "  data.max_prompt_length: Input should be greater than or equal to 1 (got -3)"),
])
def test_bad_flags_are_config_errors_in_the_project_format(tmp_path, flags, line):
    path = write_jsonl(tmp_path / "standard.jsonl", STANDARD_ROWS)
    out = check_data(str(path), *flags)
    assert_config_error(out, line)
    assert out.stderr.startswith("error: invalid configuration (command-line flags):")


def test_a_prompt_length_the_config_gives_is_kept_and_checked(tmp_path):
    path = write_jsonl(tmp_path / "standard.jsonl", STANDARD_ROWS)
    out = check_data(str(path), "--config", "configs/tiny.yaml", "--max-length", "64")  # tiny.yaml: max_prompt_length 80
    assert_config_error(out, "  data.max_prompt_length: 80 leaves no room for the response: it must be smaller than "
                             "max_length (64)")
    assert out.stderr.startswith("error: invalid configuration (configs/tiny.yaml with command-line flags):")


def test_a_bad_config_file_is_reported_in_the_project_format(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: {policy: builtin:tiny}\ndata: {source: x, max_length: 64, max_prompt_length: 64}\n"
                      "loss: {name: dpo}\ntrain: {max_steps: 2, warmup_steps: 3}\n")
    out = check_data(str(write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS)), "--config", str(config))
    assert_config_error(out, "  data.max_prompt_length: 64 leaves no room for the response: it must be smaller than "
                             "max_length (64)")
    assert "  train.warmup_steps: 3 exceeds max_steps (2)" in out.stderr.splitlines()
