"""Ray Tune sweeps: the search space, one reference pass per sweep, MLflow parent/child runs, resume,
and the notebook."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.eval.pareto import Point
from pipeline.tune.space import check_space, flat_space, parse_space
from pipeline.tune.sweep import best_configs, check_sweep
from tests.conftest import REPO, TINY_CONFIG

# A tiny sweep: 16 pairs in chunks of 8 (one reference batch each), 4 steps, evaluated at steps 2 and 4.
TINY_SWEEP = ["eval.num_prompts=4", "eval.generation.max_new_tokens=8", "eval.every_steps=2", "data.limit=16",
              "data.max_length=64", "data.max_prompt_length=32", "train.batch_size=2", "reference.chunk_size=8",
              "reference.batch_size=8", "reference.cpus_per_actor=0.5", "distributed.cpus_per_worker=1",
              "sweep.space={loss.name: [dpo, tdpo2], loss.beta: [0.1, 0.5]}"]


# --- the search space (no Ray) ------------------------------------------------------------------


def test_space_forms_and_what_each_search_makes_of_a_list():
    space = {"loss.name": ["dpo", "tdpo2"], "loss.beta": {"loguniform": [0.01, 1.0]},
             "train": {"learning_rate": {"uniform": [1e-4, 1e-3]}, "seed": {"randint": [0, 3]}}}
    dims = {d.key: d for d in parse_space(space, "grid")}
    assert dims["loss.name"].kind == "grid" and dims["loss.name"].values == ("dpo", "tdpo2")
    assert dims["loss.beta"].kind == "loguniform" and dims["loss.beta"].values == (0.01, 1.0)
    assert dims["train.learning_rate"].kind == "uniform"  # nested sections are dotted keys
    assert dims["train.seed"].candidates() == (0, 2)  # randint's high is exclusive
    assert {d.key: d.kind for d in parse_space(space, "optuna")}["loss.name"] == "choice"
    assert flat_space({"loss.beta": [0.1], "loss": {"beta": [0.2]}}) == {"loss.beta": [0.2]}  # later wins


@pytest.mark.parametrize("space,message", [
    ({"loss.betta": [0.1]}, r"(?s)sweep.space.loss.betta=0.1.*loss.betta: unknown key"),
    ({"loss.beta": [0.1, -1.0]}, r"(?s)sweep.space.loss.beta=-1.0.*loss.beta: Input should be greater than 0"),
    ({"loss.beta": {"uniform": [0.5, 0.1]}}, r"sweep.space.loss.beta.uniform: low \(0.5\) must be below"),
    ({"loss.beta": {"loguniform": [0, 1]}}, r"loguniform: low must be > 0"),
    ({"loss.beta": {"normal": [0, 1]}}, r"sweep.space.loss.beta.normal=.*not a section"),
    ({"loss.beta": []}, r"non-empty list"),
    ({"tracking.uri": ["x"]}, r"cannot vary tracking.uri"),
    ({"loss.name": ["dpo", "tdpo3"]}, r"sweep.space.loss.name='tdpo3'"),
])
def test_a_bad_space_names_the_key_before_any_work(space, message):
    cfg = load_config(TINY_CONFIG)
    with pytest.raises(ConfigError, match=message):
        check_space(cfg, parse_space(space, "grid"))


def test_a_sweep_needs_tracking_and_ray_train():
    with pytest.raises(ConfigError, match="tracking.enabled"):
        check_sweep(load_config(TINY_CONFIG, ["tracking.enabled=false"]))
    with pytest.raises(ConfigError, match="distributed.enabled"):
        check_sweep(load_config(TINY_CONFIG, ["distributed.enabled=false"]))


def test_optuna_maximises_reward_and_minimises_kl_and_asha_stops_on_steps():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.tune.sweep import search_and_scheduler

    assert search_and_scheduler(load_config(TINY_CONFIG)) == (None, None)  # grid, FIFO
    cfg = load_config(TINY_CONFIG, ["sweep.search=optuna", "sweep.asha.enabled=true", "sweep.asha.metric=eval/kl",
                                    "sweep.asha.mode=min", "sweep.asha.grace_period=2"])
    search, scheduler = search_and_scheduler(cfg)
    assert isinstance(search, OptunaSearch) and isinstance(scheduler, ASHAScheduler)
    assert (search.metric, search.mode) == (["eval/reward", "eval/kl"], ["max", "min"])
    assert (scheduler.metric, scheduler._mode) == ("eval/kl", "min")  # noqa: SLF001
    assert scheduler._time_attr == "step" and scheduler._max_t == cfg.train.max_steps  # noqa: SLF001
    with pytest.raises(ConfigError, match="sweep.asha.metric: 'eval/rewrd' is not a metric"):
        check_sweep(load_config(TINY_CONFIG, ["sweep.asha.enabled=true", "sweep.asha.metric=eval/rewrd"]))
    with pytest.raises(ConfigError, match="must be an eval/\\* metric with sweep.search=optuna"):
        check_sweep(load_config(TINY_CONFIG, ["sweep.asha.enabled=true", "sweep.asha.metric=loss",
                                              "sweep.search=optuna"]))


def test_sweep_cli_refuses_bad_input_with_exit_2(tmp_path):
    from tests.conftest import run_module

    bad_space = run_module("jobs.sweep", "--config", str(TINY_CONFIG), f"output.dir={tmp_path}",
                           "sweep.space={loss.beta: {uniform: [1, 0]}}")
    assert bad_space.returncode == 2 and "sweep.space.loss.beta.uniform" in bad_space.stderr
    assert "Traceback" not in bad_space.stderr
    not_a_sweep = run_module("jobs.sweep", "--resume", str(tmp_path))
    assert not_a_sweep.returncode == 2 and "sweep.json is missing" in not_a_sweep.stderr
    with_overrides = run_module("jobs.sweep", "--resume", str(tmp_path), "loss.beta=0.2")
    assert with_overrides.returncode == 2 and "overrides are not allowed" in with_overrides.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_trials_get_absolute_local_paths_and_the_sweeps_storage(tmp_path, monkeypatch):
    """Tune runs each trial in a working directory of its own: relative paths must not reach it."""
    from pipeline.tracking import tracking_uri
    from pipeline.tune.sweep import _trial_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    cfg = load_config(TINY_CONFIG, ["data.source=pairs.jsonl", "output.dir=out", "eval.reward.source=vader"])
    base = _trial_base(cfg, tmp_path / "sw" / "trials")
    assert base.data.source == str(tmp_path / "pairs.jsonl")
    assert (base.eval.reward.source, base.model.policy) == ("vader", "builtin:tiny")  # not local files
    assert base.output.dir == base.distributed.storage_path == str(tmp_path / "sw" / "trials")
    assert base.tracking.uri == tracking_uri(cfg) == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert base.eval.enabled


def test_strict_metric_checking_is_off_only_while_tune_runs(monkeypatch):
    from pipeline.tune.sweep import _trial_metrics_unchecked

    monkeypatch.delenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", raising=False)
    with _trial_metrics_unchecked():
        assert os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] == "1"
    assert "TUNE_DISABLE_STRICT_METRIC_CHECKING" not in os.environ


def test_best_config_per_method_is_the_highest_reward_on_its_front_within_the_budget():
    points = [Point("dpo", "a", 2, 1.0, 0.3), Point("dpo", "a", 4, 3.0, 0.5), Point("dpo", "b", 4, 2.0, 0.2),
              Point("tdpo2", "c", 4, 0.5, 0.4), Point("reference", "r", 0, 0.0, 0.1)]
    configs = {"a": {"loss.beta": 0.1}, "b": {"loss.beta": 0.5}, "c": {"loss.beta": 0.1}}
    best = best_configs(points, configs, None)
    assert set(best) == {"dpo", "tdpo2"}
    assert (best["dpo"]["run"], best["dpo"]["step"], best["dpo"]["reward"]) == ("a", 4, 0.5)
    assert best["dpo"]["config"] == {"loss.beta": 0.1}
    within = best_configs(points, configs, 2.5)  # (3.0, 0.5) is over budget; (2.0, 0.2) is dominated
    assert (within["dpo"]["step"], within["dpo"]["reward"]) == (2, 0.3)
    assert best_configs(points, configs, 0.1) == {}


def test_dpo_reads_the_sums_of_a_token_level_cache_exactly(tiny_tokenizer, tmp_path):
    """One reference pass serves DPO and TDPO: a DPO run finds the exact cache and reads only its sums,
    which equal a sequence-kind pass to the last bit."""
    from pipeline.data.dataset import load_preference_dataset
    from pipeline.models.loading import load_causal_lm
    from pipeline.reference.cache import ChunkPlan, ReferenceCache, cache_key, usable_cache
    from pipeline.reference.scorer import ReferenceScorer

    cfg = load_config(TINY_CONFIG, ["data.limit=10"])
    pairs = load_preference_dataset(cfg.data, tiny_tokenizer).pairs
    model = load_causal_lm("builtin:tiny")
    plan = ChunkPlan(len(pairs), 4)
    assert usable_cache(cfg, pairs, "sequence", plan, tmp_path, range(3)).kind == "sequence"  # nothing yet
    fingerprint, meta = cache_key(cfg, pairs, "exact")
    exact = ReferenceCache(tmp_path, fingerprint, "exact", plan).create(meta)
    for chunk in range(plan.num_chunks):
        exact.write(chunk, ReferenceScorer(model, "exact").score_pairs(
            [pairs[i] for i in plan.pairs(chunk)], tiny_tokenizer.pad_token_id, 3))
    shared = usable_cache(cfg, pairs, "sequence", plan, tmp_path, range(plan.num_chunks))
    assert (shared.kind, shared.view, shared.fingerprint) == ("exact", "sequence", fingerprint)
    sequence = ReferenceScorer(model, "sequence")
    for chunk in range(plan.num_chunks):
        read = shared.read(chunk)
        own = sequence.score_pairs([pairs[i] for i in plan.pairs(chunk)], tiny_tokenizer.pad_token_id, 3)
        assert read.kind == "sequence" and read.positions == {}
        assert torch.equal(read.logps, own.logps) and torch.equal(read.lengths, own.lengths)
    exact.path(2).unlink()  # incomplete: the DPO run makes its own
    assert usable_cache(cfg, pairs, "sequence", plan, tmp_path, range(3)).kind == "sequence"
    assert usable_cache(cfg, pairs, "sequence", plan, tmp_path, range(2)).kind == "exact"  # a short run


# --- real sweeps on the session's Ray cluster -----------------------------------------------------


def _client(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rayprefopt")
    return client, experiment


def _children(out: Path, parent_id: str):
    client, experiment = _client(out)
    return client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_an_optuna_sweep_with_asha_runs_on_eval_reports(ray_cluster, tmp_path):
    """Multi-objective Optuna and ASHA in a real sweep: trials report every step, evaluations every 2;
    the search gets both objectives from every finished trial, ASHA reads eval/reward at its rungs."""
    from pipeline.tune.sweep import run_sweep

    cfg = load_config(TINY_CONFIG, [*TINY_SWEEP, f"output.dir={tmp_path}", "output.run_name=opt",
                                    f"eval.reward.source={_reward(tmp_path)}", "sweep.search=optuna",
                                    "sweep.num_samples=2", "sweep.asha.enabled=true", "sweep.asha.grace_period=2",
                                    "sweep.evaluate_reference=false",
                                    "sweep.space={loss.name: [dpo, tdpo2], loss.beta: {loguniform: [0.05, 1.0]}}"])
    result = run_sweep(cfg, progress=False)
    assert len(result.trials) == 2
    for row in result.trials:
        assert row["loss.name"] in ("dpo", "tdpo2") and 0.05 <= row["loss.beta"] <= 1.0
        assert row["eval/reward"] is not None and row["eval/kl"] is not None
    children = _children(tmp_path, result.parent_run_id)
    assert len(children) == 2
    for run in children:
        finished = run.info.status == "FINISHED"
        assert finished or run.data.tags.get("sweep.stopped_early") == "true"  # ASHA's, ended and tagged
    assert "TUNE_DISABLE_STRICT_METRIC_CHECKING" not in os.environ


def test_the_notebook_runs_to_the_end(ray_cluster, tmp_path, monkeypatch):
    """notebooks/sweep_dpo_vs_tdpo.ipynb, executed by a real kernel in its tiny mode on this session's cluster."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    monkeypatch.setenv("RAYPREFOPT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("RAYPREFOPT_NOTEBOOK_OUTPUT", str(tmp_path))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # this venv's kernel
    path = REPO / "notebooks" / "sweep_dpo_vs_tdpo.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the front, inline
    text = "".join(o.get("text", "") for o in outputs)
    assert "mlflow ui --backend-store-uri" in text and "hypervolume" in text
    parents = [p for p in (tmp_path).glob("sweep-*/sweep.json")]
    assert len(parents) == 1
    parent_id = json.loads(parents[0].read_text())["parent_run_id"]
    assert len(_children(tmp_path, parent_id)) == 2
    assert f"/runs/{parent_id}" in text  # the link to the parent run


def _reward(out: Path) -> Path:
    from pipeline.models.tiny import save_tiny_reward_model

    folder = out / "tiny-reward"
    save_tiny_reward_model(folder)
    return folder
