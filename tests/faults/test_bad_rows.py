"""Bad data, read from files as a user would hand them over: every bad row named by its line and
field, the right rows counted, and nothing from a bad row in what training would see.

tests/test_data.py holds the core catalogue (null, missing, wrong type, empty, identical, unknown
role in a response, empty message list, response not from the assistant, no shared prefix, non-object
row, unparseable line, prompt with no room left); this file adds the rest of it and the hostile cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data.dataset import load_preference_dataset
from pipeline.errors import DataError
from tests.conftest import STANDARD_ROWS, write_jsonl

MB = 1_000_000
USER = {"role": "user", "content": "Review it."}


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def conversation(prompt: list, chosen: str = "Lovely.", rejected: str = "Dull.") -> dict:
    return {"prompt": prompt, "chosen": assistant(chosen), "rejected": assistant(rejected)}


# (line of a JSONL file, field named, fragment of the reason); each line is one bad row.
CATALOGUE = [
    ("null", "(row)", "got null"),
    ("42", "(row)", "got int"),
    ('"just a string"', "(row)", "got str"),
    ('{"prompt": NaN, "chosen": "c", "rejected": "r"}', "prompt", "expected a string, got float"),
    ({"prompt": ["hi"], "chosen": "c", "rejected": "r"}, "prompt", "expected a string, got list"),
    ({"prompt": [USER], "chosen": assistant("c"), "rejected": "r"}, "rejected", "expected a list of messages"),
    (conversation(["hi"]), "prompt", "message 0 is str, not an object"),
    (conversation([{"content": "hi"}]), "prompt", "message 0 has role None; expected one of system, user"),
    (conversation([{"role": "narrator", "content": "hi"}]), "prompt", "message 0 has role 'narrator'"),
    (conversation([{"role": "User", "content": "hi"}]), "prompt", "message 0 has role 'User'"),
    (conversation([{"role": 7, "content": "hi"}]), "prompt", "message 0 has role 7"),
    (conversation([USER, {"role": ["user"], "content": "more"}]), "prompt", "message 1 has role ['user']"),
    (conversation([{"role": "user"}]), "prompt", "message 0 content is null"),
    (conversation([{"role": "user", "content": " \t"}]), "prompt", "message 0 content is empty"),
    (conversation([USER], rejected="  "), "rejected", "message 0 content is empty"),
    ({"chosen": [USER, *assistant("a")], "rejected": [USER, *assistant("a"), USER, *assistant("b")]}, "prompt",
     "share no leading text"),  # chosen is a prefix of rejected: nothing is left of the chosen response
    ({"chosen": " a", "rejected": " b"}, "prompt", "share no leading text"),  # only whitespace is shared
    # A string prompt with whole conversations (UltraFeedback-binarized): the string must be the user turn they repeat.
    ({"prompt": "Rate it.", "chosen": [USER, *assistant("a")], "rejected": [USER, *assistant("b")]}, "prompt",
     "'Rate it.' differs from the user turn chosen and rejected repeat ('Review it.')"),
    ({"prompt": "Review it.", "chosen": assistant("a"), "rejected": assistant("b")}, "prompt",
     "is a string, but chosen and rejected share no leading messages"),
    ({"prompt": "Review it.", "chosen": [{"role": "system", "content": "Be brief."}, *assistant("a")],
      "rejected": [{"role": "system", "content": "Be brief."}, *assistant("b")]}, "prompt", "hold no user turn"),
    ({"prompt": "Review it.", "chosen": [USER, *assistant("a")], "rejected": [USER]}, "rejected",
     "is empty once the messages shared with the other response are removed"),
    ({"chosen": "Q: same A: same", "rejected": "Q: same A: same"}, "rejected", "identical to chosen"),
    ({"prompt": "p", "chosen": "c\ud800", "rejected": "r"}, "chosen", "not valid Unicode (unpaired surrogate"),
    (conversation([{"role": "user", "content": "\udfff"}]), "prompt", "message 0 content is not valid Unicode"),
    ("1" * 5_000, "(row)", "not usable JSON: Exceeds the limit"),  # Python's int-from-string limit
    ("[" * 100_000, "(row)", "not usable JSON: nested too deeply"),
    (b"\xff\xfe{}", "(row)", "line is not valid UTF-8"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', "(row)", "not valid JSON"),
]


def write_lines(path: Path, lines: list) -> Path:
    """One JSONL line per entry: bytes as they are, str as they are, anything else as JSON."""
    with path.open("wb") as f:
        for line in lines:
            raw = line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line))
            f.write((raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")) + b"\n")
    return path


@pytest.fixture
def catalogue_file(tmp_path) -> Path:
    """Good row, then the catalogue, then another good row: the bad rows are lines 2..N+1."""
    return write_lines(tmp_path / "catalogue.jsonl", [STANDARD_ROWS[0], *(c[0] for c in CATALOGUE), STANDARD_ROWS[1]])


def test_catalogue_under_on_invalid_error_names_every_line_and_field(catalogue_file):
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(catalogue_file), on_invalid="error"))
    problems = info.value.problems
    assert [(p.row, p.field) for p in problems] == [(i, c[1]) for i, c in enumerate(CATALOGUE, start=2)]
    for problem, (_, _, fragment) in zip(problems, CATALOGUE, strict=True):
        assert fragment in problem.message, (problem, fragment)
    text = str(info.value)
    assert text.startswith(f"{catalogue_file}: {len(CATALOGUE)} of {len(CATALOGUE) + 2} rows are invalid")
    assert f"row 9, field 'prompt': {problems[7].message}" in text  # every problem is printed with its line


def test_catalogue_under_on_invalid_skip_keeps_only_the_good_rows(catalogue_file):
    ds = load_preference_dataset(DataConfig(source=str(catalogue_file), on_invalid="skip"))
    assert [e.row for e in ds.examples] == [1, len(CATALOGUE) + 2]
    assert (ds.report.rows, ds.report.bad_rows, ds.report.valid_rows) == (len(CATALOGUE) + 2, len(CATALOGUE), 2)


# ---------------------------------------------------------------- encodings


def test_non_utf8_line_is_named_by_file_and_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [
        STANDARD_ROWS[0],
        json.dumps({"prompt": "Caf\u00e9 review:", "chosen": " tasty", "rejected": " bland"}, ensure_ascii=False).encode("latin-1"),
        STANDARD_ROWS[1],
    ])
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(path)))
    assert str(info.value).splitlines() == [
        f"{path}: 1 of 3 rows are invalid (set data.on_invalid=skip to drop them):",
        "  row 2, field '(row)': line is not valid UTF-8 (invalid continuation byte at byte 15)",
    ]
    assert info.value.source == str(path)
    skipped = load_preference_dataset(DataConfig(source=str(path), on_invalid="skip"))
    assert [e.row for e in skipped.examples] == [1, 3] and [p.row for p in skipped.report.problems] == [2]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_non_utf8_whole_file_formats_are_refused_naming_the_file(tmp_path, suffix):
    """JSON and CSV are decoded whole (a JSON document has no lines to blame), so the file is named."""
    path = tmp_path / f"latin1{suffix}"
    text = (json.dumps([{"prompt": "Caf\u00e9", "chosen": " a", "rejected": " b"}], ensure_ascii=False) if suffix == ".json"
            else "prompt,chosen,rejected\nCaf\u00e9,a,b\n")
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=f"^{path} is not valid UTF-8"):
        load_preference_dataset(DataConfig(source=str(path), on_invalid="skip"))


@pytest.mark.parametrize("document,fragment", [("[" * 100_000, "nested too deeply"),
                                               ("[" + "1" * 5_000 + "]", "Exceeds the limit (4300 digits)")])
def test_unusable_json_documents_are_refused_naming_the_file(tmp_path, document, fragment):
    path = tmp_path / "hostile.json"
    path.write_text(document)
    with pytest.raises(DataError, match=f"^{path} is not usable JSON: ") as info:
        load_preference_dataset(DataConfig(source=str(path)))
    assert fragment in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix):
    """Windows editors and Excel start UTF-8 files with a BOM. Left in, it hid a CSV's prompt column
    (its header read '\\ufeffprompt'), and the prompt was silently inferred from the responses."""
    rows = [{"prompt": "Verdict:", "chosen": "the film works", "rejected": "the film drags"}]
    path = tmp_path / f"bom{suffix}"
    if suffix == ".jsonl":
        text = json.dumps(rows[0]) + "\n"
    elif suffix == ".json":
        text = json.dumps(rows)
    else:
        text = "prompt,chosen,rejected\nVerdict:,the film works,the film drags\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    ds = load_preference_dataset(DataConfig(source=str(path)))
    ex = ds.examples[0]
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Verdict:", "the film works", "the film drags")


# ---------------------------------------------------------------- a megabyte in one field


@pytest.mark.timeout(60)
def test_a_megabyte_response_is_truncated_to_max_length(tmp_path, tiny_tokenizer):
    long = " " + "spoiler " * (MB // 8)
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Review:", "chosen": long, "rejected": " short."}])
    ds = load_preference_dataset(DataConfig(source=str(path), max_length=64, max_prompt_length=16), tiny_tokenizer)
    (pair,) = ds.pairs
    assert pair.chosen_length == 64 and pair.truncated and ds.report.truncated == 1
    assert long.startswith(tiny_tokenizer.decode(pair.chosen_ids))  # the head of the response, cut at the budget
    assert tiny_tokenizer.decode(pair.rejected_ids) == " short." + tiny_tokenizer.eos_token  # the other one intact


@pytest.mark.timeout(60)
def test_a_megabyte_prompt_is_cut_or_refused_as_configured(tmp_path, tiny_tokenizer):
    prompt = "intro " * (MB // 6) + "The verdict:"
    path = write_jsonl(tmp_path / "long.jsonl", [STANDARD_ROWS[0], {"prompt": prompt, "chosen": " yes", "rejected": " no"}])
    cut = load_preference_dataset(DataConfig(source=str(path), max_length=64, max_prompt_length=12), tiny_tokenizer)
    assert tiny_tokenizer.decode(cut.pairs[1].prompt_ids) == "The verdict:"  # left truncation keeps the end
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(path), max_length=64, max_prompt_length=None), tiny_tokenizer)
    (problem,) = info.value.problems
    assert (problem.row, problem.field) == (2, "prompt") and "leaves no room for the response" in problem.message
    assert len(str(info.value)) < 1_000  # the message names the row; it does not echo the megabyte


@pytest.mark.timeout(60)
def test_megabyte_responses_that_differ_only_past_the_cut_are_not_a_pair(tmp_path, tiny_tokenizer):
    """Cut to max_length they are the same text: training on it would push a response up and down at once."""
    shared = " " + "same " * (MB // 5)
    path = write_jsonl(tmp_path / "twins.jsonl", [{"prompt": "p", "chosen": shared + "good", "rejected": shared + "bad"}])
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(path), max_length=64, max_prompt_length=16), tiny_tokenizer)
    (problem,) = info.value.problems
    assert (problem.row, problem.field) == (1, "rejected") and "identical to chosen after tokenization" in problem.message


def test_a_megabyte_role_is_refused_with_a_short_message(tmp_path):
    path = write_jsonl(tmp_path / "role.jsonl", [conversation([{"role": "r" * MB, "content": "hi"}])])
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(path)))
    (problem,) = info.value.problems
    assert (problem.row, problem.field) == (1, "prompt") and "message 0 has role 'rrr" in problem.message
    assert len(str(info.value)) < 1_000


# ---------------------------------------------------------------- 10,000 rows, 3 of them bad

ROWS = 10_000
BAD_LINES = (17, 5_003, 9_999)


def ten_thousand_rows(path: Path) -> Path:
    """Rows i = 1..10000 each with their own text; the 3 bad ones all carry the word GARBAGE."""
    lines: list = [{"prompt": f"Review {i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(1, ROWS + 1)]
    lines[BAD_LINES[0] - 1] = b'{"prompt": "GARBAGE \xff\xfe", "chosen": " GARBAGE", "rejected": " x"}'  # not UTF-8
    lines[BAD_LINES[1] - 1] = {"prompt": "GARBAGE", "chosen": " GARBAGE twin", "rejected": " GARBAGE twin"}
    lines[BAD_LINES[2] - 1] = {"prompt": [{"role": "narrator", "content": "GARBAGE"}],
                               "chosen": assistant("GARBAGE a"), "rejected": assistant("GARBAGE b")}
    return write_lines(path, lines)


@pytest.mark.timeout(120)
def test_ten_thousand_rows_three_bad_skip_keeps_9997_and_reports_the_three(tmp_path, tiny_tokenizer):
    from pipeline.train.setup import write_data_report

    path = ten_thousand_rows(tmp_path / "big.jsonl")
    ds = load_preference_dataset(DataConfig(source=str(path), on_invalid="skip", max_length=64, max_prompt_length=32),
                                 tiny_tokenizer)
    assert len(ds) == len(ds.pairs) == ROWS - 3
    assert (ds.report.rows, ds.report.valid_rows, ds.report.bad_rows) == (ROWS, ROWS - 3, 3)
    assert [(p.row, p.field) for p in ds.report.problems] == [(17, "(row)"), (5_003, "rejected"), (9_999, "prompt")]
    assert [p.row for p in ds.pairs] == [i for i in range(1, ROWS + 1) if i not in BAD_LINES]

    # What training would see: every token of every kept pair. None of it comes from a bad row.
    trained_on = tiny_tokenizer.batch_decode([p.prompt_ids + p.chosen_ids + p.rejected_ids for p in ds.pairs])
    assert not any("GARBAGE" in text for text in trained_on)
    assert trained_on[16].startswith("Review 18:")  # row 18 moved up into the place of skipped row 17

    write_data_report(ds, tmp_path)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert (report["rows"], report["valid_rows"]) == (ROWS, ROWS - 3)
    assert [s["row"] for s in report["skipped"]] == list(BAD_LINES)


def test_ten_thousand_rows_three_bad_error_stops_and_lists_the_three(tmp_path):
    path = ten_thousand_rows(tmp_path / "big.jsonl")
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(path), on_invalid="error"))
    assert [p.row for p in info.value.problems] == list(BAD_LINES)
    assert str(info.value).startswith(f"{path}: 3 of {ROWS} rows are invalid")
