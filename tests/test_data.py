"""Preference data: formats, sources, validation with row numbers, tokenization with prompt masking."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DataConfig
from pipeline.data.dataset import load_preference_dataset
from pipeline.data.normalize import PreferenceExample, normalize_record
from pipeline.data.sources import read_records
from pipeline.data.tokenization import PairTokenizer, collate_pairs
from pipeline.errors import DataError, RowProblem
from tests.conftest import CONVERSATIONAL_ROWS, STANDARD_ROWS, write_jsonl

# ---------------------------------------------------------------- normalisation


def test_standard_and_conversational_rows():
    ex = normalize_record(1, STANDARD_ROWS[0])
    assert isinstance(ex, PreferenceExample) and not ex.conversational
    assert ex.prompt == "The film was"
    conv = normalize_record(2, CONVERSATIONAL_ROWS[0])
    assert isinstance(conv, PreferenceExample) and conv.conversational
    assert conv.chosen == [{"role": "assistant", "content": "a delight from start to finish."}]


def test_extra_keys_are_ignored():
    ex = normalize_record(1, {**STANDARD_ROWS[0], "score_chosen": 9, "source": "x"})
    assert isinstance(ex, PreferenceExample)


def test_implicit_prompt_text():
    ex = normalize_record(1, {"chosen": "Q: is it good? A: yes, very", "rejected": "Q: is it good? A: yawn"})
    assert isinstance(ex, PreferenceExample)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: is it good? A:", " yes, very", " yawn")


def test_implicit_prompt_conversational():
    user = {"role": "user", "content": "Review it."}
    ex = normalize_record(1, {
        "chosen": [user, {"role": "assistant", "content": "Lovely."}],
        "rejected": [user, {"role": "assistant", "content": "Dull."}],
    })
    assert isinstance(ex, PreferenceExample)
    assert ex.prompt == [user] and ex.chosen == [{"role": "assistant", "content": "Lovely."}]


@pytest.mark.parametrize(
    "record,field,fragment",
    [
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "is null"),
        ({"prompt": "p", "rejected": "r"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "expected a string, got int"),
        ({"prompt": "p", "chosen": "c", "rejected": "  \n"}, "rejected", "is empty"),
        ({"prompt": "", "chosen": "c", "rejected": "r"}, "prompt", "is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
        ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}, "prompt",
         "expected a list of messages"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "robot", "content": "c"}],
          "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "role 'robot'"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": 5}],
          "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "content is int"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [],
          "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "empty list of messages"),
        ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "c"}],
          "rejected": [{"role": "assistant", "content": "r"}]}, "chosen", "must start with an assistant message"),
        ({"chosen": "abc", "rejected": "xyz"}, "prompt", "share no leading text"),
        (["not", "an", "object"], "(row)", "expected an object"),
    ],
)
def test_bad_rows_name_field_and_reason(record, field, fragment):
    problems = normalize_record(7, record)
    assert isinstance(problems, list) and problems
    assert problems[0].row == 7 and problems[0].field == field
    assert fragment in problems[0].message


def test_all_bad_fields_of_a_row_are_reported():
    problems = normalize_record(3, {"prompt": None, "chosen": 1})
    assert {(p.field, p.message) for p in problems} == {
        ("prompt", "is null"), ("chosen", "expected a string, got int"), ("rejected", "missing")
    }


# ---------------------------------------------------------------- sources


def test_jsonl_reports_unparseable_lines_by_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": \n\xff\xfe\n')
    rows = list(read_records(str(path)))
    assert [n for n, _ in rows] == [1, 3, 4]  # blank line 2 skipped, numbering kept
    assert "not valid JSON" in rows[1][1].message
    assert "not valid UTF-8" in rows[2][1].message


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_local_format_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, STANDARD_ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps({"train": STANDARD_ROWS}))
    elif suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(STANDARD_ROWS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(STANDARD_ROWS), path)
    assert [r for _, r in read_records(str(path))] == STANDARD_ROWS


def test_conversational_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist(CONVERSATIONAL_ROWS), path)
    cfg = DataConfig(source=str(path))
    assert load_preference_dataset(cfg).report.formats == {"conversational": 4}


def test_hub_style_folder_goes_through_load_dataset(tmp_path):
    """A folder is what `datasets.load_dataset` reads for a Hub repo; offline, a local one stands in."""
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train.jsonl", STANDARD_ROWS)
    ds = load_preference_dataset(DataConfig(source=str(folder), split="train"))
    assert len(ds) == 4
    with pytest.raises(DataError, match="split"):
        load_preference_dataset(DataConfig(source=str(folder), split="test"))


def test_unreachable_hub_name_is_a_clear_error():
    with pytest.raises(DataError, match="could not load dataset 'nobody/no-such-dataset'"):
        load_preference_dataset(DataConfig(source="nobody/no-such-dataset"))


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_preference_dataset(DataConfig(source=str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match="unknown builtin dataset 'builtin:nope'; known: builtin:pang-lee"):
        load_preference_dataset(DataConfig(source="builtin:nope"))


def test_builtin_pang_lee_pairs():
    ds = load_preference_dataset(DataConfig(source="builtin:pang-lee-polarity"))
    assert len(ds) == 100 and ds.report.formats == {"conversational": 100}
    text = load_preference_dataset(DataConfig(source="builtin:pang-lee-polarity-text"))
    assert text.report.formats == {"standard": 100}
    assert text.examples[0].rejected == "Simplistic, silly and tedious."


# ---------------------------------------------------------------- validation policy


def mixed_file(tmp_path):
    return write_jsonl(tmp_path / "mixed.jsonl", [
        STANDARD_ROWS[0],
        {"prompt": "p", "chosen": None, "rejected": "r"},
        STANDARD_ROWS[1],
        '{"prompt": "p", "chosen": "c", "rejected": ',
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ])


def test_on_invalid_error_lists_every_bad_row(tmp_path):
    with pytest.raises(DataError) as info:
        load_preference_dataset(DataConfig(source=str(mixed_file(tmp_path)), on_invalid="error"))
    assert [(p.row, p.field) for p in info.value.problems] == [(2, "chosen"), (4, "(row)"), (5, "rejected")]
    assert "3 of 5 rows are invalid" in str(info.value)


def test_on_invalid_skip_drops_and_counts(tmp_path):
    ds = load_preference_dataset(DataConfig(source=str(mixed_file(tmp_path)), on_invalid="skip"))
    assert len(ds) == 2 and ds.report.rows == 5 and ds.report.bad_rows == 3
    assert [e.row for e in ds.examples] == [1, 3]


def test_no_valid_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match="no valid rows"):
        load_preference_dataset(DataConfig(source=str(path), on_invalid="skip"))


# ---------------------------------------------------------------- tokenization


def tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_is_masked_and_eos_appended(tiny_tokenizer):
    tok = PairTokenizer(tiny_tokenizer, max_length=64)
    pair = tok(normalize_record(1, {"prompt": "Hi", "chosen": " yes", "rejected": " no"}))
    eos = tiny_tokenizer.eos_token_id
    assert pair.chosen_ids == tokens(tiny_tokenizer, " yes") + [eos]
    assert pair.rejected_ids == tokens(tiny_tokenizer, " no") + [eos]
    batch = collate_pairs([pair], tiny_tokenizer.pad_token_id)
    n_prompt = len(pair.prompt_ids)
    assert batch["input_ids"].shape == (2, n_prompt + 5)  # 2 rows: chosen, rejected; padded to " yes"+eos
    assert (batch["labels"][:, :n_prompt] == -100).all()
    assert batch["labels"][0, n_prompt:].tolist() == pair.chosen_ids
    assert batch["labels"][1].tolist() == [-100] * n_prompt + pair.rejected_ids + [-100]  # padding masked
    assert batch["attention_mask"][1].tolist() == [1] * (n_prompt + 4) + [0]


def test_conversational_rows_use_the_chat_template(tiny_tokenizer):
    pair = PairTokenizer(tiny_tokenizer, max_length=128)(normalize_record(1, CONVERSATIONAL_ROWS[2]))
    prompt = tiny_tokenizer.decode(pair.prompt_ids)
    chosen = tiny_tokenizer.decode(pair.chosen_ids)
    assert prompt == "<|im_start|>user\nIn short,<|im_end|>\n<|im_start|>assistant\n"
    assert chosen.startswith("see it twice.<|im_end|>")


def test_truncation_sides(tiny_tokenizer):
    row = normalize_record(1, {"prompt": "abcdefghij", "chosen": " 0123456789", "rejected": " zyx"})
    left = PairTokenizer(tiny_tokenizer, max_length=10, max_prompt_length=4, prompt_truncation="left")(row)
    right = PairTokenizer(tiny_tokenizer, max_length=10, max_prompt_length=4, prompt_truncation="right")(row)
    assert tiny_tokenizer.decode(left.prompt_ids) == "ghij"
    assert tiny_tokenizer.decode(right.prompt_ids) == "abcd"
    assert tiny_tokenizer.decode(left.chosen_ids) == " 01234"  # responses lose their end
    assert left.truncated and left.chosen_length == 10


def test_prompt_leaving_no_room_is_a_row_problem(tiny_tokenizer):
    row = normalize_record(9, {"prompt": "x" * 20, "chosen": " a", "rejected": " b"})
    problem = PairTokenizer(tiny_tokenizer, max_length=20, max_prompt_length=None)(row)
    assert isinstance(problem, RowProblem) and problem.row == 9 and problem.field == "prompt"
    assert "leaves no room for the response" in problem.message


def test_dataset_length_stats(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS)
    ds = load_preference_dataset(DataConfig(source=str(path), max_length=64, max_prompt_length=32), tiny_tokenizer)
    stats = ds.length_stats()
    assert stats["prompt"]["min"] == len("Verdict:") and stats["prompt"]["max"] == len("The film was")


# ---------------------------------------------------------------- prompt + whole conversations (UltraFeedback-binarized)

SYSTEM = {"role": "system", "content": "You review films."}


def binarized(row: dict, system: bool = False) -> dict:
    """An explicit-prompt conversational row rewritten the way binarized-feedback sets ship it: the
    prompt a string, chosen and rejected whole conversations that repeat it."""
    turns = [SYSTEM] if system else []
    return {"prompt": row["prompt"][0]["content"], "chosen": [*turns, *row["prompt"], *row["chosen"]],
            "rejected": [*turns, *row["prompt"], *row["rejected"]], "score_chosen": 8.0, "score_rejected": 3.0}


def test_string_prompt_with_whole_conversations_is_the_explicit_row():
    for i, row in enumerate(CONVERSATIONAL_ROWS, start=1):
        assert normalize_record(i, binarized(row)) == normalize_record(i, row)


def test_the_prompt_is_every_shared_leading_message():
    ex = normalize_record(1, binarized(CONVERSATIONAL_ROWS[0], system=True))
    assert ex.prompt == [SYSTEM, {"role": "user", "content": "The film was"}]
    assert ex.chosen == [{"role": "assistant", "content": "a delight from start to finish."}]


def test_multi_turn_conversation_matches_the_last_user_turn():
    history = [{"role": "user", "content": "Seen Alien?"}, {"role": "assistant", "content": "Yes."},
               {"role": "user", "content": "Worth it?"}]
    record = {"prompt": "Worth it?", "chosen": [*history, {"role": "assistant", "content": "Very."}],
              "rejected": [*history, {"role": "assistant", "content": "No."}]}
    ex = normalize_record(1, record)
    assert isinstance(ex, PreferenceExample) and ex.prompt == history
    assert ex.rejected == [{"role": "assistant", "content": "No."}]
    problems = normalize_record(4, {**record, "prompt": "Seen Alien?"})  # the first user turn is not the prompt
    assert [(p.row, p.field) for p in problems] == [(4, "prompt")]
    assert "'Seen Alien?' differs from the user turn chosen and rejected repeat ('Worth it?')" in problems[0].message


def test_a_string_prompt_that_disagrees_with_the_conversation_is_a_row_problem():
    record = {**binarized(CONVERSATIONAL_ROWS[0]), "prompt": "The book was"}
    (problem,) = normalize_record(7, record)
    assert (problem.row, problem.field) == (7, "prompt")
    assert problem.message == "'The book was' differs from the user turn chosen and rejected repeat ('The film was')"
    assert isinstance(normalize_record(7, {**record, "prompt": "  The film was\n"}), PreferenceExample)  # spacing


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from pipeline.models.loading import load_tokenizer

    return load_tokenizer("builtin:smollm2-135m-instruct")


@pytest.mark.smollm
def test_whole_conversations_tokenize_to_the_explicit_rows_ids(tmp_path, smollm2_tokenizer):
    explicit = write_jsonl(tmp_path / "explicit.jsonl", CONVERSATIONAL_ROWS)
    whole = write_jsonl(tmp_path / "binarized.jsonl", [binarized(r) for r in CONVERSATIONAL_ROWS])
    a, b = (load_preference_dataset(DataConfig(source=str(p)), smollm2_tokenizer) for p in (explicit, whole))
    assert b.pairs == a.pairs and len(b.pairs) == 4
    assert b.report.formats == a.report.formats == {"conversational": 4}
    assert smollm2_tokenizer.decode(b.pairs[0].prompt_ids).endswith("user\nThe film was<|im_end|>\n<|im_start|>assistant\n")
