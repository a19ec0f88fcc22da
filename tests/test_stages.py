"""The RLHF stages and the end-to-end pipeline on the shared local Ray cluster, with the tiny model.

Reward sources: a tiny random classifier (its scores vary with any text, which VADER's do not on a
random model's byte soup) and, for the reward-model test, a model this project trains.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.config import RewardConfig, load_config
from pipeline.data.dataset import load_preference_dataset
from pipeline.eval.rewards import ClassifierReward
from tests.conftest import TINY_CONFIG, run_module, write_jsonl

pytestmark = pytest.mark.usefixtures("ray_cluster")


def mlflow_runs(out: Path, filter_string: str = ""):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rayprefopt")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id], filter_string)}


def pairs_cfg(out: Path, reward: Path, name: str, *extra: str):
    return load_config(TINY_CONFIG, [f"output.dir={out}", f"output.run_name={name}", "pairs.num_prompts=6",
                                     "pairs.samples_per_prompt=3", "pairs.generation.max_new_tokens=10",
                                     "pairs.generation.batch_size=2", f"pairs.reward.source={reward}",
                                     "pairs.cpus_per_actor=0.5", *extra])


def test_make_pairs_keeps_best_and_worst_whatever_the_actor_count(tmp_path, tiny_reward_dir, tiny_tokenizer):
    from pipeline.stages.pairs import run_make_pairs

    one = run_make_pairs(pairs_cfg(tmp_path, tiny_reward_dir, "one", "pairs.num_actors=1"), progress=False)
    two = run_make_pairs(pairs_cfg(tmp_path, tiny_reward_dir, "two", "pairs.num_actors=2"), progress=False)
    assert one.output.read_text() == two.output.read_text()  # seeds follow prompts, not actors
    pairs = [json.loads(line) for line in one.output.read_text().splitlines()]
    samples = [json.loads(line) for line in (one.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["completions"]) == 3 for s in samples)
    assert len(pairs) == one.metrics["pairs"] >= 5  # a tie on a random model is possible, not likely
    reward = ClassifierReward(RewardConfig(source=str(tiny_reward_dir)))
    for pair, sample in zip(pairs, samples, strict=False):
        assert pair["prompt"] == sample["prompt"]
        assert pair["chosen_reward"] == max(sample["rewards"]) > pair["rejected_reward"] == min(sample["rewards"])
        rescored = reward.score([pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]])
        assert rescored == pytest.approx([pair["chosen_reward"], pair["rejected_reward"]], abs=1e-4)
    # The file is TRL standard format: preference training reads it as it is.
    cfg = load_config(TINY_CONFIG, [f"data.source={one.output}"])
    assert len(load_preference_dataset(cfg.data, tiny_tokenizer).pairs) == len(pairs)
    _, runs = mlflow_runs(tmp_path)
    assert runs["one"].data.metrics["pairs"] == len(pairs)
    assert runs["one"].data.tags["stage"] == "make_pairs"


def separable_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A toy preference set a reward model can separate: the chosen review ends in praise."""
    rng = random.Random(seed)
    words = ["plot", "actors", "music", "story", "camera", "script", "ending", "scenes"]
    rows = []
    for _ in range(n):
        body = " ".join(rng.sample(words, 3))
        rows.append({"prompt": "Review:", "chosen": f" {body}, loved it", "rejected": f" {body}, hated it"})
    return rows


def test_reward_model_beats_chance_on_held_out_pairs_and_serves_as_a_reward(tmp_path):
    from pipeline.stages.reward_model import run_reward_model

    data = write_jsonl(tmp_path / "toy.jsonl", separable_pairs(60))
    cfg = load_config(TINY_CONFIG, [f"output.dir={tmp_path}", "output.run_name=rm", f"reward_model.source={data}",
                                    "reward_model.max_steps=30", "reward_model.batch_size=4",
                                    "reward_model.num_workers=2", "reward_model.learning_rate=3e-3",
                                    "reward_model.eval_fraction=0.25", "reward_model.cpus_per_worker=1"])
    result = run_reward_model(cfg, progress=False)
    assert result.metrics["eval/accuracy"] >= 0.9, result.metrics  # 15 held-out pairs; chance is 0.5
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 0.2
    reward = ClassifierReward(RewardConfig(source=str(result.model_dir)))
    good, bad = reward.score(["Review: music plot story, loved it", "Review: music plot story, hated it"])
    assert good > bad
    _, runs = mlflow_runs(tmp_path)
    assert runs["rm"].data.metrics["eval/accuracy"] == result.metrics["eval/accuracy"]
    assert runs["rm"].data.params["reward_model.eval_pairs"] == "15"


def test_sft_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.stages.sft import run_sft

    cfg = load_config(TINY_CONFIG, [f"output.dir={tmp_path}", "output.run_name=sft", "sft.limit=16",
                                    "sft.max_steps=8", "sft.batch_size=4", "sft.learning_rate=3e-3",
                                    "sft.max_length=96"])
    result = run_sft(cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.num_parameters() > 0 and (result.model_dir / "tokenizer.json").is_file()
    _, runs = mlflow_runs(tmp_path)
    assert runs["sft"].data.metrics["loss"] == pytest.approx(losses[-1])


def test_sft_rejects_bad_rows_before_ray_work(tmp_path):
    from pipeline.errors import DataError
    from pipeline.stages.sft import run_sft

    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"prompt": "no response"}, {"text": 3}])
    cfg = load_config(TINY_CONFIG, [f"output.dir={tmp_path}", f"sft.source={data}"])
    with pytest.raises(DataError) as err:
        run_sft(cfg, progress=False)
    assert "row 2" in str(err.value) and "row 3" in str(err.value)


PIPELINE = ["pairs.num_prompts=8", "pairs.samples_per_prompt=3", "pairs.generation.max_new_tokens=12",
            "pairs.generation.batch_size=4", "pairs.cpus_per_actor=0.5", "eval.num_prompts=4",
            "eval.generation.max_new_tokens=8", "eval.every_steps=2", "data.max_length=64",
            "data.max_prompt_length=32", "train.batch_size=2", "reference.cpus_per_actor=0.5",
            "pipeline.runs=[{loss.name: dpo, loss.beta: 0.1}, {loss.name: tdpo2, loss.beta: 0.1}]"]


def test_pipeline_end_to_end_and_jobs_evaluate(tmp_path, tiny_reward_dir):
    from pipeline.stages.pipeline import run_pipeline, summary_table

    cfg = load_config(TINY_CONFIG, [*PIPELINE, f"output.dir={tmp_path}", "output.run_name=pipe",
                                    f"pairs.reward.source={tiny_reward_dir}", f"eval.reward.source={tiny_reward_dir}"])
    result = run_pipeline(cfg, progress=False)
    client, runs = mlflow_runs(tmp_path, "tags.pipeline = 'pipe'")
    assert set(runs) == {"pipe-make-pairs", "pipe-reference", "pipe-0-dpo-b0.1", "pipe-1-tdpo2-b0.1-a0.5",
                         "pipe-pareto"}
    assert runs["pipe-reference"].data.metrics["eval/kl"] == 0.0  # the reference against itself
    for name, method in [("pipe-0-dpo-b0.1", "dpo"), ("pipe-1-tdpo2-b0.1-a0.5", "tdpo2")]:
        run = runs[name]
        assert run.data.tags["method"] == method
        history = client.get_metric_history(run.info.run_id, "eval/kl")
        assert [m.step for m in history] == [2, 4]  # every 2 steps and at the end (4 steps)
        assert {"eval/reward", "eval/entropy", "eval/distinct_1", "eval/distinct_2"} <= run.data.metrics.keys()
        assert run.data.params["data.source"] == str(result.pairs_file)
    pareto = runs["pipe-pareto"]
    assert {a.path for a in client.list_artifacts(pareto.info.run_id, "pareto")} == {
        "pareto/pareto.png", "pareto/pareto_points.csv", "pareto/pareto_summary.csv"}
    assert "summary.json" in {a.path for a in client.list_artifacts(pareto.info.run_id)}
    assert {"pareto/hypervolume/dpo", "pareto/hypervolume/tdpo2"} <= pareto.data.metrics.keys()
    points = (result.folder / "pareto" / "pareto_points.csv").read_text().splitlines()
    assert len(points) == 1 + 1 + 2 * 2  # header, the reference, two points per run
    table = summary_table(result, f"sqlite:///{tmp_path / 'mlflow.db'}", "rayprefopt")
    assert "pipe-0-dpo-b0.1" in table and "mlflow ui --backend-store-uri" in table and "hypervolume" in table

    # jobs.evaluate recomputes the same fronts from what is in MLflow.
    done = run_module("jobs.evaluate", "--config", str(TINY_CONFIG), f"output.dir={tmp_path}",
                      "--filter", "tags.pipeline = 'pipe'", "--name", "again")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    again = {m["method"]: m["hypervolume"] for m in report["methods"]}
    assert again == pytest.approx({s.method: s.hypervolume for s in result.pareto["summary"]})
    _, all_runs = mlflow_runs(tmp_path)
    assert "again" in all_runs


def test_pipeline_refuses_a_bad_run_entry_before_any_work(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.stages.pipeline import run_pipeline

    cfg = load_config(TINY_CONFIG, [f"output.dir={tmp_path}", "pipeline.runs=[{loss.name: dpo, loss.beta: -1}]"])
    with pytest.raises(ConfigError, match=r"pipeline.runs\[0\].*loss.beta"):
        run_pipeline(cfg, progress=False)
    assert not (tmp_path / "mlflow.db").exists()


def test_evaluate_job_on_a_saved_model(tmp_path, tiny_model_dir, tiny_reward_dir):
    common = ["--config", str(TINY_CONFIG), f"output.dir={tmp_path}", f"eval.reward.source={tiny_reward_dir}",
              "eval.num_prompts=3", "eval.generation.max_new_tokens=6"]
    unnamed = run_module("jobs.evaluate", *common, "--model", str(tiny_model_dir))
    assert unnamed.returncode == 2 and "--method" in unnamed.stderr  # a trained model is not the baseline
    done = run_module("jobs.evaluate", *common, "--model", "builtin:tiny")  # the reference itself
    assert done.returncode == 0, done.stderr
    point = json.loads(done.stdout)
    assert point["eval/samples"] == 3 and point["eval/kl"] == 0.0
    assert torch.isfinite(torch.tensor(point["eval/reward"]))
    _, runs = mlflow_runs(tmp_path)
    assert runs["evaluate-reference"].data.tags["method"] == "reference"


@pytest.mark.parametrize("job", ["jobs.sft", "jobs.reward_model", "jobs.make_pairs", "jobs.evaluate", "jobs.pipeline",
                                 "jobs.sweep"])
def test_job_entry_points_parse_and_refuse_bad_config(job):
    assert run_module(job, "--help").returncode == 0
    bad = run_module(job, "--config", str(TINY_CONFIG), "loss.beta=-1")
    assert bad.returncode == 2 and "loss.beta" in bad.stderr and "Traceback" not in bad.stderr
