"""The config tree: YAML + dotted overrides, every error naming its key path, round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import RunConfig, load_config, save_config
from pipeline.errors import ConfigError
from tests.conftest import REPO
from tests.conftest import TINY_CONFIG as TINY


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig), path


def test_overrides_are_typed():
    cfg = load_config(TINY, ["loss.beta=0.2", "loss.name=tdpo2", "train.max_steps=7", "data.max_prompt_length=null"])
    assert cfg.loss.beta == 0.2 and cfg.loss.name == "tdpo2" and cfg.loss.token_level
    assert cfg.train.max_steps == 7 and cfg.data.max_prompt_length is None


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("loss.beta=0", "loss.beta: Input should be greater than 0"),
        ("loss.beta=-1", "loss.beta: Input should be greater than 0"),
        ("loss.alpha=-0.1", "loss.alpha: Input should be greater than or equal to 0"),
        ("loss.name=kto", "loss.name: Input should be 'dpo', 'cdpo', 'ipo', 'hinge', 'tdpo1' or 'tdpo2'"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing: Input should be less than 0.5"),
        ("train.batch_size=abc", "train.batch_size: Input should be a valid integer"),
        ("train.batch_size=2.5", "train.batch_size: Input should be a valid integer"),
        ("train.learning_rate=fast", "train.learning_rate: Input should be a valid number"),
        ("data.max_prompt_length=200", "data: Value error, max_prompt_length (200) must be smaller than max_length (160)"),
        ("data.on_invalid=ignore", "data.on_invalid: Input should be 'error' or 'skip'"),
        ("train.warmup_steps=10", "train: Value error, warmup_steps (10) exceeds max_steps (4)"),
        ("sft.warmup_steps=51", "sft: Value error, warmup_steps (51) exceeds max_steps (50)"),
        ("reward_model.warmup_steps=51", "reward_model: Value error, warmup_steps (51) exceeds max_steps (50)"),
        ("loss.betta=0.1", "loss.betta: unknown key"),
        ("trainer.steps=3", "trainer: unknown key"),
        ("output.run_name=../escape", "output.run_name: String should match pattern"),
        ("distributed.num_workers=0", "distributed.num_workers: Input should be greater than or equal to 1"),
        ("distributed.zero_stage=4", "distributed.zero_stage: Input should be 0, 1, 2 or 3"),
        ("distributed.offload_params=true", "distributed: Value error, offload_params needs zero_stage 3 (got 2)"),
        ("distributed.checkpoint_every=0", "distributed.checkpoint_every: Input should be greater than or equal to 1"),
        ("reference.mode=remote", "reference.mode: Input should be 'exact', 'topk' or 'colocated'"),
        ("reference.topk=0", "reference.topk: Input should be greater than or equal to 1"),
        ("reference.dtype=int8", "reference.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_bad_values_name_their_key_path(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert fragment in str(info.value)


def config_error(tmp_path, yaml_text: str) -> str:
    """The ConfigError message for a config file holding ``yaml_text``."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    text = config_error(
        tmp_path, "model: {policy: builtin:tiny}\ndata: {source: x, max_length: 1}\nloss: {name: dpo, beta: -2}\n"
    )
    assert "data.max_length" in text and "loss.beta" in text


def test_required_keys(tmp_path):
    text = config_error(tmp_path, "loss: {beta: 0.1}\n")
    for key in ("model: required key is missing", "data: required key is missing", "loss.name: required key"):
        assert key in text


@pytest.mark.parametrize("override", ["loss.beta", "=3", "loss..beta=1", "loss.beta=[unclosed"])
def test_malformed_overrides(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(TINY, [override])


def test_override_into_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="loss.beta is not a section"):
        load_config(TINY, ["loss.beta.x=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(listy)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["loss.name=tdpo1", "loss.beta=0.05"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config(path) == cfg


PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_validate_with_every_pipeline_run(path):
    """The GPU-cluster configs are not run here; they must still be valid, run entries included."""
    from pipeline.stages.pipeline import run_configs

    cfg = load_config(path)
    assert cfg.distributed.use_gpu and cfg.eval.enabled
    assert not cfg.model.policy.startswith("builtin:")  # real Hub models
    runs = run_configs(cfg, "p", Path("/tmp/pairs.jsonl"))
    assert len(runs) == len(cfg.pipeline.runs) >= 3
    assert {r.loss.name for r in runs} >= {"dpo", "tdpo2"}
    assert all(r.data.source == "/tmp/pairs.jsonl" and r.eval.enabled for r in runs)
    assert all(r.tracking.tags["pipeline"] == "p" for r in runs)


def test_paper_configs_exist():
    assert {p.name for p in PAPER_CONFIGS} >= {"imdb_gpt2.yaml", "hh_pythia28b.yaml"}


def test_default_pipeline_compares_the_three_methods():
    from pipeline.stages.pipeline import run_configs

    cfg = load_config(REPO / "configs" / "default.yaml")
    runs = run_configs(cfg, "p", Path("/tmp/pairs.jsonl"))
    assert [r.loss.name for r in runs].count("dpo") >= 2  # at least two betas
    assert {r.loss.name for r in runs} == {"dpo", "tdpo1", "tdpo2"}
    assert len({r.output.run_name for r in runs}) == len(runs)


@pytest.mark.parametrize("override", ["eval.generation.top_p=0", "eval.generation.top_p=1.5",
                                      "eval.generation.temperature=0", "eval.every_steps=0",
                                      "pairs.samples_per_prompt=1", "reward_model.eval_fraction=1",
                                      "pipeline.runs=[]", "eval.num_prompts=0"])
def test_evaluation_and_stage_bounds(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, ["model.policy=x", "data.source=y", "loss.name=dpo", override])
