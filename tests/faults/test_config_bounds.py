"""Out-of-range configs, derived from the pydantic models themselves.

Every field of RunConfig is walked; each numeric bound (ge/gt/le/lt), length bound, pattern and
Literal choice found there becomes test cases: the value just outside is refused with a ConfigError
naming the full dotted key path, the value at the bound is accepted. A field added later with a
bound is covered without editing this file.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import MAX_CONFIG_VALUES, RunConfig, load_config
from pipeline.errors import ConfigError

REQUIRED = {"model": {"policy": "builtin:tiny"}, "data": {"source": "pairs.jsonl"}, "loss": {"name": "dpo"}}


@dataclass(frozen=True)
class Leaf:
    """One field of the config tree."""

    path: str  # dotted key path, e.g. "eval.generation.top_p"
    kind: Any  # int, float, bool, str, dict, list, a section's model class, or "literal"
    nullable: bool
    choices: tuple = ()  # a Literal's allowed values
    metadata: tuple = field(default=(), compare=False)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, f"the walk does not know the union {annotation}; teach it"
        return args[0], True
    return annotation, False


def walk(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[Leaf]:
    leaves = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation, nullable = _unwrap(info.annotation)
        origin = typing.get_origin(annotation)
        if origin is typing.Literal:
            leaves.append(Leaf(path, "literal", nullable, typing.get_args(annotation), tuple(info.metadata)))
        elif origin in (dict, list):
            leaves.append(Leaf(path, origin, nullable, (), tuple(info.metadata)))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves.append(Leaf(path, annotation, nullable, (), tuple(info.metadata)))
            leaves += walk(annotation, path + ".")
        elif annotation in (int, float, bool, str):
            leaves.append(Leaf(path, annotation, nullable, (), tuple(info.metadata)))
        else:
            raise AssertionError(f"{path}: the walk does not know the type {annotation}; teach it")
    return leaves


LEAVES = walk()
SECTIONS = [""] + [leaf.path for leaf in LEAVES if isinstance(leaf.kind, type) and issubclass(leaf.kind, BaseModel)]

# A bound whose at-bound value a cross-field validator forbids on its own gets the companion
# overrides that make it legal, so the bound itself is still tested rather than skipped. None is
# needed today: data.max_prompt_length, when not given, follows max_length (1 at max_length 2).
COMPANIONS: dict[tuple[str, Any], list[str]] = {}

NUMERIC_BOUNDS = {at.Ge: ("ge", "greater than or equal to"), at.Gt: ("gt", "greater than"),
                  at.Le: ("le", "less than or equal to"), at.Lt: ("lt", "less than")}


@dataclass(frozen=True)
class Bound:
    leaf: Leaf
    op: str  # ge gt le lt min_length max_length
    limit: Any
    phrase: str  # pydantic's wording when the bound is broken

    @property
    def id(self) -> str:
        return f"{self.leaf.path}-{self.op}-{self.limit}"


def bounds() -> list[Bound]:
    found = []
    for leaf in LEAVES:
        for meta in leaf.metadata:
            for cls, (op, phrase) in NUMERIC_BOUNDS.items():
                if isinstance(meta, cls):
                    found.append(Bound(leaf, op, getattr(meta, op), phrase))
            if isinstance(meta, at.MinLen):
                found.append(Bound(leaf, "min_length", meta.min_length, "at least"))
            if isinstance(meta, at.MaxLen):
                found.append(Bound(leaf, "max_length", meta.max_length, "at most"))
    return found


BOUNDS = bounds()
NUMERIC = [b for b in BOUNDS if b.op in ("ge", "gt", "le", "lt")]
LENGTHS = [b for b in BOUNDS if b.op in ("min_length", "max_length")]
PATTERNS = [(leaf, meta.pattern) for leaf in LEAVES for meta in leaf.metadata if getattr(meta, "pattern", None)]
LITERALS = [leaf for leaf in LEAVES if leaf.kind == "literal"]
FLOATS = [leaf for leaf in LEAVES if leaf.kind is float]


def step(leaf: Leaf, value: Any, direction: int) -> Any:
    """The next representable value of the field's type beyond ``value`` (direction +1 or -1)."""
    if leaf.kind is int:
        return value + direction
    return math.nextafter(float(value), direction * math.inf)


def outside_and_at(b: Bound) -> tuple[Any, Any]:
    """(the value just outside the bound, the nearest value inside it: the bound itself when inclusive)."""
    cast = int if b.leaf.kind is int else float
    limit = cast(b.limit)
    down, up = -1, +1
    return {
        "ge": (step(b.leaf, limit, down), limit),
        "gt": (limit, step(b.leaf, limit, up)),
        "le": (step(b.leaf, limit, up), limit),
        "lt": (limit, step(b.leaf, limit, down)),
    }[b.op]


def sized(leaf: Leaf, n: int) -> Any:
    """A value of the field's container type with ``n`` elements (characters, items, keys)."""
    if leaf.kind is str:
        return "x" * n
    if leaf.kind is list:
        return [{} for _ in range(n)]
    if leaf.kind is dict:
        return {f"k{i}": "v" for i in range(n)}
    raise AssertionError(f"{leaf.path}: a length bound on {leaf.kind}; teach sized() this type")


def as_yaml(value: Any) -> str:
    """The override text for ``value``, checked to parse back to exactly it (PyYAML reads 1e-5 as a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()
    assert yaml.safe_load(text) == value and type(yaml.safe_load(text)) is type(value), (value, text)
    return text


def read_back(cfg: RunConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A minimal valid config file: only the required keys."""
    path = tmp_path_factory.mktemp("config") / "base.yaml"
    path.write_text(yaml.safe_dump(REQUIRED))
    return path


def refused(base: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(base, list(overrides))
    return str(info.value)


def names_path(message: str, path: str) -> bool:
    """Whether one line of a ConfigError message reports ``path`` itself (not a parent or a child)."""
    return any(line.startswith(f"  {path}: ") for line in message.splitlines())


# ---------------------------------------------------------------- the walk itself


def test_the_walk_sees_the_whole_tree_and_its_bounds():
    """If the walk broke, every parametrized test below would silently shrink to nothing."""
    paths = {leaf.path for leaf in LEAVES}
    assert {"loss.beta", "eval.generation.top_p", "sweep.asha.reduction_factor", "pipeline.pareto.reference_kl",
            "sft.learning_rate", "reward_model.eval_fraction", "model.policy"} <= paths
    assert ("loss.beta", "gt", 0) in {(b.leaf.path, b.op, b.limit) for b in BOUNDS}
    assert ("distributed.zero_stage", (0, 1, 2, 3)) in {(leaf.path, leaf.choices) for leaf in LITERALS}
    assert len(NUMERIC) >= 70 and len(LITERALS) >= 9 and len(LENGTHS) >= 4 and PATTERNS


def test_every_count_and_seed_has_a_floor():
    """An integer count or seed without a lower bound is a bound someone forgot (0 workers, seed -1)."""
    ints = [leaf for leaf in LEAVES if leaf.kind is int]
    floored = {b.leaf.path for b in NUMERIC if b.op in ("ge", "gt")}
    assert ints and [leaf.path for leaf in ints if leaf.path not in floored] == []
    seeds = [leaf.path for leaf in ints if leaf.path.endswith(".seed")]
    ceilinged = {b.leaf.path for b in NUMERIC if b.op == "le"}
    assert len(seeds) >= 5 and set(seeds) <= ceilinged  # numpy and Optuna refuse seeds >= 2**32


# ---------------------------------------------------------------- numeric bounds


@pytest.mark.parametrize("bound", NUMERIC, ids=lambda b: b.id)
def test_just_outside_a_numeric_bound_is_refused_with_the_key_path(base, bound):
    outside, _ = outside_and_at(bound)
    message = refused(base, f"{bound.leaf.path}={as_yaml(outside)}")
    line = next((ln for ln in message.splitlines() if ln.startswith(f"  {bound.leaf.path}: ")), None)
    assert line is not None, message
    assert f"Input should be {bound.phrase} " in line, line


@pytest.mark.parametrize("bound", NUMERIC, ids=lambda b: b.id)
def test_at_a_numeric_bound_is_accepted(base, bound):
    _, at_bound = outside_and_at(bound)
    companions = COMPANIONS.get((bound.leaf.path, at_bound), [])
    cfg = load_config(base, [*companions, f"{bound.leaf.path}={as_yaml(at_bound)}"])
    value = read_back(cfg, bound.leaf.path)
    assert value == at_bound and type(value) is type(at_bound)


@pytest.mark.parametrize("leaf", FLOATS, ids=lambda leaf: leaf.path)
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_no_float_field_takes_nan_or_infinity(base, leaf, text):
    """NaN fails no comparison it is not put to, so an unbounded float would take it; inf means nothing."""
    assert names_path(refused(base, f"{leaf.path}={text}"), leaf.path)


# ---------------------------------------------------------------- lengths, patterns, choices


@pytest.mark.parametrize("bound", LENGTHS, ids=lambda b: b.id)
def test_length_bounds(base, bound):
    n = bound.limit
    outside, inside = (n - 1, n) if bound.op == "min_length" else (n + 1, n)
    message = refused(base, f"{bound.leaf.path}={as_yaml(sized(bound.leaf, outside))}")
    assert names_path(message, bound.leaf.path) and bound.phrase in message, message
    cfg = load_config(base, [f"{bound.leaf.path}={as_yaml(sized(bound.leaf, inside))}"])
    assert len(read_back(cfg, bound.leaf.path)) == inside


@pytest.mark.parametrize("leaf,pattern", PATTERNS, ids=lambda x: getattr(x, "path", "pattern"))
def test_patterns(base, leaf, pattern):
    bad = next(s for s in ("../escape", "has space", "a/b", "\u00e9t\u00e9", "x;rm -rf") if not re.search(pattern, s))
    message = refused(base, f"{leaf.path}={as_yaml(bad)}")
    assert names_path(message, leaf.path) and "should match pattern" in message, message
    good = next(s for s in ("run-1.a_b", "run", "1") if re.search(pattern, s))
    assert read_back(load_config(base, [f"{leaf.path}={as_yaml(good)}"]), leaf.path) == good


@pytest.mark.parametrize("leaf", LITERALS, ids=lambda leaf: leaf.path)
def test_every_choice_is_accepted_and_no_other(base, leaf):
    for choice in leaf.choices:
        assert read_back(load_config(base, [f"{leaf.path}={as_yaml(choice)}"]), leaf.path) == choice
    strings = all(isinstance(c, str) for c in leaf.choices)
    bad = "not-a-choice" if strings else max(leaf.choices) + 1
    for wrong in (bad, bad.upper() if strings else -1):
        message = refused(base, f"{leaf.path}={as_yaml(wrong)}")
        assert names_path(message, leaf.path), message
        assert all(repr(c) in message or str(c) in message for c in leaf.choices), message  # says what is allowed


# ---------------------------------------------------------------- types, nulls, unknown keys

WRONG_TYPES = {
    int: ["abc", 2.5, [1], {"a": 1}],
    float: ["abc", [1.0], {"a": 1}],
    bool: ["maybe", [True]],
    str: [5, ["a"], {"a": "b"}],
    "literal": [[1], {"a": 1}],
    dict: ["abc", [1]],
    list: ["abc", {"a": 1}],
}


def wrong_values(leaf: Leaf) -> list[Any]:
    if isinstance(leaf.kind, type) and issubclass(leaf.kind, BaseModel):
        return [5, "abc", [1]]  # a section given a scalar or a list
    return WRONG_TYPES[leaf.kind]


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.path)
def test_wrong_types_are_refused_with_the_key_path(base, leaf):
    for value in wrong_values(leaf):
        message = refused(base, f"{leaf.path}={as_yaml(value)}")
        assert names_path(message, leaf.path), (value, message)


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.path)
def test_null_is_accepted_exactly_where_the_field_is_optional(base, leaf):
    if leaf.nullable:
        assert read_back(load_config(base, [f"{leaf.path}=null"]), leaf.path) is None
    else:
        assert names_path(refused(base, f"{leaf.path}=null"), leaf.path)


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s or "(root)")
def test_unknown_keys_are_refused_in_every_section(base, section):
    key = f"{section}.no_such_key" if section else "no_such_key"
    assert f"  {key}: unknown key" in refused(base, f"{key}=1")


def test_a_huge_offending_value_is_quoted_short(base):
    message = refused(base, "train.batch_size=" + "9x" * 500_000)
    assert names_path(message, "train.batch_size") and len(message) < 2_000


# ---------------------------------------------------------------- the file itself


@pytest.mark.parametrize("text,kind", [("42\n", "int"), ("just some words\n", "str"), ("- a\n- b\n", "list"),
                                       ("true\n", "bool")])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    message = refused(path)
    assert str(path) in message and f"mapping at the top level, not {kind}" in message


LAUGHS = 10  # each level repeats the one before ten times: 10**9 strings from 9 short lines
BOMB = ["a: &a [" + ", ".join(["lol"] * LAUGHS) + "]"] + [
    f"{c}: &{c} [" + ", ".join([f"*{p}"] * LAUGHS) + "]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
]

# name: (a config file's text, an override's value, what the message must say)
BAD_YAML = {
    "unclosed flow": ("model: {policy: x\n", "{policy: x", "not valid YAML"),
    "tab indentation": ("model:\n\tpolicy: x\n", "\t[a", "not valid YAML"),
    "impossible date": ("data: {source: 2020-13-45}\n", "2020-13-45", "a value cannot be read (ValueError"),
    "bad !!int": ("train: {seed: !!int abc}\n", "!!int abc", "a value cannot be read (ValueError"),
    "bad !!bool": ("train: {packing: !!bool maybe}\n", "!!bool maybe", "a value cannot be read (KeyError"),
    "python tag": ("model: !!python/object/apply:os.system [echo hi]\n", "!!python/object/apply:os.system [echo hi]",
                   "could not determine a constructor"),
    "unhashable key": ("? [a, b]\n: 1\n", "{[a, b]: 1}", "unhashable key"),
    "deep nesting": ("a: " + "[" * 5_000 + "]" * 5_000 + "\n", "[" * 5_000 + "]" * 5_000, "nested too deeply"),
    "self-reference": ("model: &m {policy: x, again: *m}\n", "&m [x, *m]", f"more than {MAX_CONFIG_VALUES} values"),
    "billion laughs": ("\n".join(BOMB) + "\n", "{" + ", ".join(BOMB) + "}", f"more than {MAX_CONFIG_VALUES} values"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(BAD_YAML))
def test_bad_yaml_is_a_config_error_naming_the_file(tmp_path, name):
    text, _, fragment = BAD_YAML[name]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    message = refused(path)
    assert f"config file {path} " in message and fragment in message, message


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(BAD_YAML))
def test_bad_yaml_in_an_override_is_a_config_error_naming_it(base, name):
    _, value, fragment = BAD_YAML[name]
    message = refused(base, f"data.source={value}")
    assert message.startswith("override 'data.source=") and fragment in message, message


def test_non_utf8_file_and_missing_or_directory_paths(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {policy: caf\u00e9}\n".encode("latin-1"))
    assert f"config file {path} cannot be read" in refused(path)
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in refused(tmp_path / "nope.yaml")
    assert f"config file not found: {tmp_path}" in refused(tmp_path)


def test_non_string_keys_are_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(REQUIRED) + "1: one\nnull: nothing\n")
    message = refused(path)
    assert "  1: Keys should be strings" in message and "  None: Keys should be strings" in message


def test_an_empty_file_lists_the_required_keys(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    message = refused(path)
    assert all(f"  {key}: required key is missing" in message for key in ("model", "data", "loss"))
