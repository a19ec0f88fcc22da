"""Fuzzing the two front doors, the data normaliser and the config loader: whatever comes in, they
answer with their own documented result or error type, and what they accept is well-formed.

    normalize_record   never raises; returns a PreferenceExample or the row's list of RowProblem
    PairTokenizer      a TokenizedPair within the budgets, a RowProblem, or DataError (the tokenizer)
    load_config        a RunConfig, or ConfigError

Deterministic (derandomize) and without an example database, so a run is the same on every machine.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pipeline.config import RunConfig, load_config, save_config
from pipeline.data.normalize import ROLES, PreferenceExample, normalize_record
from pipeline.data.sources import Unparseable
from pipeline.data.tokenization import PairTokenizer, TokenizedPair
from pipeline.errors import ConfigError, DataError, RowProblem

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- strategies: data

# Pieces real data gets wrong: lone surrogates (JSON's \ud800 escapes), NUL, bidi overrides,
# chat-template and special-token look-alikes, whitespace only.
NASTY = ["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "<|im_end|>", "<|im_start|>assistant\n", "{{ x }}",
         "{% if %}", " ", "\n", "\t", "a", "b", "\u00e9", "\U0001f642"]
texts = st.text(max_size=12) | st.lists(st.sampled_from(NASTY) | st.text(max_size=3), max_size=6).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_like = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(ROLES) | st.sampled_from(["User", "narrator", "", "assistant "]) | json_like
message = st.fixed_dictionaries({}, optional={"role": roles, "content": texts | json_like, "name": json_like})
messages = st.lists(message | json_like, max_size=4)
good_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts})
field_values = texts | messages | st.lists(good_message, min_size=1, max_size=3) | json_like
records = (
    st.fixed_dictionaries({}, optional={"prompt": field_values, "chosen": field_values, "rejected": field_values,
                                        "score": json_like})
    | json_like
    | st.builds(Unparseable, st.text(min_size=1, max_size=20))  # sources always say why
)
# Mostly valid rows, so the tokenizer sees many examples: shared prefixes (implicit prompts) come from a
# small alphabet; conversational responses start with an assistant turn.
small = st.text(alphabet=" ab\n", max_size=8)
words = st.text(min_size=1, max_size=60) | small | texts
assistant_turns = st.lists(good_message, max_size=2).map(lambda m: [{"role": "assistant", "content": "x"}, *m])
usable_records = (
    st.fixed_dictionaries({"prompt": words.map("P".__add__), "chosen": words.map("C".__add__),
                           "rejected": words.map("R".__add__)})
    | st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words})
    | st.fixed_dictionaries({"chosen": small | words, "rejected": small | words})
    | st.fixed_dictionaries({"prompt": st.lists(good_message, min_size=1, max_size=2),
                             "chosen": assistant_turns, "rejected": assistant_turns})
)


def assert_well_formed(row: int, result: Any) -> None:
    """What the normaliser promises about what it returns."""
    if isinstance(result, list):
        assert result and all(isinstance(p, RowProblem) for p in result), result
        assert all(p.row == row and p.field in ("prompt", "chosen", "rejected", "(row)") and p.message for p in result)
        return
    assert isinstance(result, PreferenceExample) and result.row == row, result
    fields = (result.prompt, result.chosen, result.rejected)
    assert result.chosen != result.rejected
    if result.conversational:
        assert all(isinstance(f, list) and f for f in fields)
        for turns in fields:
            for m in turns:
                assert set(m) == {"role", "content"} and m["role"] in ROLES
                assert isinstance(m["content"], str) and m["content"].strip()
                m["content"].encode("utf-8")  # no lone surrogates: a tokenizer could not encode them
        assert result.chosen[0]["role"] == result.rejected[0]["role"] == "assistant"
    else:
        assert all(isinstance(f, str) and f.strip() for f in fields), fields
        for f in fields:
            f.encode("utf-8")


@FUZZ
@given(row=st.integers(min_value=1, max_value=10**6), record=records)
def test_normalize_record_returns_an_example_or_problems_for_anything(row, record):
    assert_well_formed(row, normalize_record(row, record))


@FUZZ
@given(row=st.integers(min_value=1, max_value=10**6), record=usable_records)
def test_normalize_record_on_nearly_valid_rows(row, record):
    assert_well_formed(row, normalize_record(row, record))


@FUZZ
@given(record=usable_records)
def test_whatever_normalises_tokenizes_within_budget_or_is_a_row_problem(tiny_tokenizer, record):
    example = normalize_record(5, record)
    if not isinstance(example, PreferenceExample):
        return
    tokenize = PairTokenizer(tiny_tokenizer, max_length=32, max_prompt_length=16)
    try:
        pair = tokenize(example)
    except DataError:
        return  # documented: a tokenizer that cannot render the row at all (no chat template)
    if isinstance(pair, RowProblem):
        assert pair.row == 5 and pair.field in ("prompt", "rejected")
        return
    assert isinstance(pair, TokenizedPair) and pair.row == 5
    assert len(pair.prompt_ids) <= 16 and max(pair.chosen_length, pair.rejected_length) <= 32
    assert pair.chosen_ids and pair.rejected_ids and pair.chosen_ids != pair.rejected_ids


# ---------------------------------------------------------------- strategies: config

SEGMENTS = sorted(set(RunConfig.model_fields) | {
    "beta", "name", "policy", "source", "max_length", "max_prompt_length", "generation", "top_p", "seed",
    "batch_size", "runs", "space", "tags", "pareto", "asha", "zero_stage", "on_invalid", "mode", "topk",
})
YAML_BITS = ["model:", "data:", "loss:", " name: dpo", "\n", "  ", "- ", "[", "]", "{", "}", ",", ": ", "&a ", "*a",
             "? ", "'", '"', "# c", "|", ">", "\t", "%YAML 1.1\n", "---\n", "...\n", "\x00", "\ufeff", "=", "."]
# Lines of `key: value` whose values carry YAML's tags and the scalars its resolvers treat specially.
TAGS = ["", "", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!str ", "!!null ", "!!set ",
        "!!omap ", "!!pairs ", "!!python/tuple ", "!!map ", "!!seq ", "!local "]
SCALARS = ["", "x", "0", "-1", "1_000", "0x1F", "0o17", "0b101", "2020-13-01", "2020-02-30", "2001-12-14t21:59:43.10-05:00",
           "1.0e+400", ".nan", "-.inf", "~", "yes", "190:20:30", "abc", "'q'", '"\\ud800"', "9" * 5000, "[a, b]",
           "{a: 1}", "[[]]", "*a", "&a [x, *a]", "&a {k: v}"]
values = st.tuples(st.sampled_from(TAGS), st.sampled_from(SCALARS)).map("".join)
lines = st.tuples(st.sampled_from(["model", "data", "loss", "train", "beta", "<<", "? x", "- x", "seed"]),
                  st.sampled_from([": ", ":\n  beta: ", ":\n  - "]), values).map("".join)
yaml_texts = (
    st.lists(lines, min_size=1, max_size=5).map("\n".join)
    | values
    | st.lists(st.sampled_from(YAML_BITS) | values | st.text(max_size=4), max_size=12).map("".join)
    | st.text()
)


def leaf_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        nested = isinstance(kind, type) and issubclass(kind, BaseModel)
        paths += leaf_paths(kind, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return paths


# Values a real key plausibly gets, right or wrong, and the YAML oddities above.
plausible = st.sampled_from(["0", "1", "-1", "2", "3", "0.5", "1e-5", "1.0e-5", "null", "true", "no", "dpo", "tdpo2",
                             "skip", "[]", "{}", "[{}]", "{a: b}", ".nan", "4294967296", "''", "x"])
key_paths = st.lists(st.sampled_from(SEGMENTS) | st.text(max_size=5), max_size=4).map(".".join)
real_overrides = st.tuples(
    st.sampled_from(leaf_paths()), plausible | scalars.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n"))
).map("=".join)
overrides = real_overrides | st.tuples(key_paths, yaml_texts).map("=".join) | st.text(max_size=20)
trees = st.recursive(
    scalars, lambda inner: st.dictionaries(st.sampled_from(SEGMENTS) | st.text(max_size=5), inner, max_size=5)
    | st.lists(inner, max_size=3), max_leaves=20,
)

BASE = "model: {policy: builtin:tiny}\ndata: {source: pairs.jsonl}\nloss: {name: dpo}\n"


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="fuzz-config-") as name:
        yield Path(name)


def load_or_config_error(path: Path | None, extra: list[str], folder: Path) -> RunConfig | None:
    """load_config's answer; an accepted config must also survive being saved and loaded again."""
    try:
        cfg = load_config(path, extra)
    except ConfigError as e:
        assert str(e)
        return None
    assert isinstance(cfg, RunConfig)
    assert load_config(save_config(cfg, folder / "saved")) == cfg
    return cfg


@FUZZ
@given(text=yaml_texts | yaml_texts.map(lambda junk: BASE + junk))
def test_any_yaml_file_loads_or_is_a_config_error(folder, text):
    path = folder / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    load_or_config_error(path, [], folder)


@FUZZ
@given(tree=trees)
def test_any_yaml_tree_of_real_and_junk_keys_loads_or_is_a_config_error(folder, tree):
    path = folder / "tree.yaml"
    base = yaml.safe_load(BASE)
    path.write_text(yaml.safe_dump({**base, **tree} if isinstance(tree, dict) else tree, allow_unicode=False))
    load_or_config_error(path, [], folder)


@FUZZ
@given(extra=st.lists(real_overrides, min_size=1, max_size=3) | st.lists(overrides, min_size=1, max_size=3))
def test_any_override_applies_or_is_a_config_error(folder, extra):
    path = folder / "base.yaml"
    path.write_text(BASE)
    cfg = load_or_config_error(path, extra, folder)
    if cfg is not None:  # every typed number accepted is finite: no NaN or inf sneaks in
        assert all(math.isfinite(v) for v in _floats(cfg))


def _floats(section: BaseModel) -> list[float]:
    """The float fields of a config tree (not the free-form override lists of pipeline.runs and sweep.space)."""
    found = []
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            found += _floats(value)
        elif isinstance(value, float):
            found.append(value)
    return found
