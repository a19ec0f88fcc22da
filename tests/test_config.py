"""The config tree: YAML + dotted overrides, every error naming its key path, round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
        ("data.max_prompt_length=200", "data.max_prompt_length: 200 leaves no room for the response: it must be smaller "
                                        "than max_length (160)"),
        ("data.on_invalid=ignore", "data.on_invalid: Input should be 'error' or 'skip'"),
        ("train.warmup_steps=10", "train.warmup_steps: 10 exceeds max_steps (4)"),
        ("sft.warmup_steps=51", "sft.warmup_steps: 51 exceeds max_steps (50)"),
        ("reward_model.warmup_steps=51", "reward_model.warmup_steps: 51 exceeds max_steps (50)"),
        ("loss.betta=0.1", "loss.betta: unknown key"),
        ("trainer.steps=3", "trainer: unknown key"),
        ("output.run_name=../escape", "output.run_name: String should match pattern"),
        ("distributed.num_workers=0", "distributed.num_workers: Input should be greater than or equal to 1"),
        ("distributed.zero_stage=4", "distributed.zero_stage: Input should be 0, 1, 2 or 3"),
        ("distributed.offload_params=true", "distributed.offload_params: needs zero_stage 3 (got zero_stage 2)"),
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
    assert "Value error" not in str(info.value) and "pydantic" not in str(info.value)


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


# ---------------------------------------------------------------- data.max_prompt_length follows data.max_length

REQUIRED = ["model.policy=builtin:tiny", "data.source=pairs.jsonl", "loss.name=dpo"]


@pytest.mark.parametrize("max_length,prompt", [(None, 256), (512, 256), (256, 128), (128, 64), (64, 32), (3, 1), (2, 1)])
def test_max_prompt_length_not_given_is_half_of_max_length(max_length, prompt):
    given = [] if max_length is None else [f"data.max_length={max_length}"]
    assert load_config(None, [*REQUIRED, *given]).data.max_prompt_length == prompt


def test_max_prompt_length_given_is_kept_or_refused():
    assert load_config(None, [*REQUIRED, "data.max_length=128", "data.max_prompt_length=100"]).data.max_prompt_length == 100
    assert load_config(None, [*REQUIRED, "data.max_length=128", "data.max_prompt_length=null"]).data.max_prompt_length is None
    with pytest.raises(ConfigError) as info:
        load_config(None, [*REQUIRED, "data.max_length=128", "data.max_prompt_length=128"])
    assert "  data.max_prompt_length: 128 leaves no room for the response: it must be smaller than max_length (128)" \
        in str(info.value).splitlines()
    with pytest.raises(ConfigError) as info:  # a bad max_length is reported alone, not with a derived complaint
        load_config(None, [*REQUIRED, "data.max_length=1"])
    assert str(info.value).splitlines()[1:] == ["  data.max_length: Input should be greater than or equal to 2 (got 1)"]


def test_the_resolved_max_prompt_length_is_saved_and_reloads(tmp_path):
    cfg = load_config(None, [*REQUIRED, "data.max_length=128"])
    path = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text())["data"]["max_prompt_length"] == 64
    assert load_config(path) == cfg
    assert load_config(path, ["data.max_length=512"]).data.max_prompt_length == 64  # saved: no longer follows


def test_reference_cache_key_is_the_same_for_given_and_derived_prompt_lengths():
    """The cache fingerprint reads the resolved values: a config giving both is keyed as before, and one
    leaving max_prompt_length out is keyed like the config that gives the value it resolves to."""
    from pipeline.reference.cache import cache_key

    explicit = load_config(TINY)
    key, meta = cache_key(explicit, [], "exact")
    assert (meta["data"]["max_length"], meta["data"]["max_prompt_length"]) == (160, 80)
    derived = load_config(TINY, ["data.max_prompt_length=80"])
    assert cache_key(derived, [], "exact")[0] == key
    both = load_config(None, [*REQUIRED, "data.max_length=256", "data.max_prompt_length=128"])
    assert cache_key(both, [], "exact") == cache_key(load_config(None, [*REQUIRED, "data.max_length=256"]), [], "exact")


# ---------------------------------------------------------------- every entry point prints the project's format

# Three kinds of problem at once: a field bound, a model validator (warmup vs max_steps) and the
# cross-field data check, each to be named by its own key path.
BAD = ["loss.beta=-1", "train.warmup_steps=10", "data.max_prompt_length=200"]
EXPECTED_LINES = ["  loss.beta: Input should be greater than 0 (got -1)", "  train.warmup_steps: 10 exceeds max_steps (4)",
                  "  data.max_prompt_length: 200 leaves no room for the response: it must be smaller than max_length (160)"]
ENTRY_POINTS = ["jobs.train", "jobs.sweep", "jobs.pipeline", "jobs.sft", "jobs.reward_model", "jobs.make_pairs",
                "jobs.evaluate"]


def assert_project_format(out, *lines: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "pydantic.dev" not in text and "Traceback" not in text and "Value error" not in text, text
    assert out.stderr.startswith("error: invalid configuration ("), text
    for line in lines:
        assert line in out.stderr.splitlines(), (line, text)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_prints_config_errors_in_the_project_format(module):
    from tests.conftest import run_module

    assert_project_format(run_module(module, "--config", str(TINY), *BAD), *EXPECTED_LINES)


def test_training_with_max_length_alone_validates(tmp_path):
    """A config without max_prompt_length and a smaller max_length: accepted up to the data itself."""
    from tests.conftest import run_module

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"policy": "builtin:tiny"}, "loss": {"name": "dpo"},
                                      "data": {"source": str(tmp_path / "missing.jsonl")}}))
    out = run_module("jobs.train", "--config", str(config), "data.max_length=128", "distributed.enabled=false",
                     f"output.dir={tmp_path}", "output.run_name=r", "tracking.enabled=false")
    assert out.returncode == 2 and "dataset file not found" in out.stderr, out.stdout + out.stderr
    assert "invalid configuration" not in out.stderr
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data"]  # written before the data is read
    assert (saved["max_length"], saved["max_prompt_length"]) == (128, 64)


def test_a_config_value_a_job_sets_is_reported_in_the_project_format(tmp_path):
    """jobs.sweep --resume assigns the tracking URI saved in sweep.json to the validated config; a
    hand-edited one carrying a password used to escape as a raw pydantic ValidationError."""
    import json

    from tests.conftest import run_module

    folder = tmp_path / "sweep-1"
    save_config(load_config(TINY), folder)
    (folder / "sweep.json").write_text(json.dumps({"sweep_id": "sweep-1", "parent_run_id": "0" * 32,
                                                   "tracking_uri": "http://user:s3cret@127.0.0.1:1"}))
    out = run_module("jobs.sweep", "--resume", str(folder))
    assert_project_format(out, "  tracking.uri: carries credentials (user:password@), which would be written into "
                               "run folders, sweep state and logs; give them as $MLFLOW_TRACKING_USERNAME and "
                               "$MLFLOW_TRACKING_PASSWORD (or $MLFLOW_TRACKING_TOKEN) in the environment of every "
                               "process that logs (got 'http://***@127.0.0.1:1')")
    assert "s3cret" not in out.stdout + out.stderr


def test_a_validation_error_outside_validate_config_is_formatted_or_left_alone():
    from pydantic import BaseModel, ValidationError

    from pipeline.config import config_error_of

    cfg = load_config(TINY)
    with pytest.raises(ValidationError) as info:
        cfg.data.max_length = 64  # configs/tiny.yaml gives max_prompt_length 80
    assert str(config_error_of(info.value)).splitlines() == [
        "invalid configuration (data, as set by the job):",
        "  data.max_prompt_length: 80 leaves no room for the response: it must be smaller than max_length (64)",
    ]
    with pytest.raises(ValidationError) as info:
        cfg.eval.generation.top_p = 2.0  # a section that sits in two places is named by its type
    assert str(config_error_of(info.value)).splitlines() == [
        "invalid configuration (GenerationConfig (eval.generation or pairs.generation), as set by the job):",
        "  top_p: Input should be less than or equal to 1 (got 2.0)",
    ]

    class NotAConfig(BaseModel):
        x: int

    with pytest.raises(ValidationError) as info:
        NotAConfig(x="a")
    assert config_error_of(info.value) is None  # someone else's model: a bug, left to its traceback
