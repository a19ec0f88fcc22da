"""The driver of a sweep SIGKILLed mid-sweep, on the session's Ray cluster: ``jobs.sweep --resume``
(Tuner.restore) finishes it; no finished trial runs again; no MLflow run is duplicated."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from tests.test_tune import TINY_SWEEP, _children, _client, _reward


def _wait_for_a_finished_trial(out: Path, proc: subprocess.Popen, timeout: float) -> str:
    """The sweep's parent run id once one child run is FINISHED (polling MLflow, as a user would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        state = out / "sweep" / "sweep.json"
        if state.is_file() and (out / "mlflow.db").is_file():
            parent = json.loads(state.read_text())["parent_run_id"]
            if any(r.info.status == "FINISHED" for r in _children(out, parent)):
                return parent
        time.sleep(1)
    raise AssertionError("no trial finished in time")


def test_a_killed_sweep_resumes_without_rerunning_or_duplicating(ray_cluster, tmp_path):
    """2 losses x 2 betas via `python -m jobs.sweep` on the session's cluster: the driver is SIGKILLed
    once the first trial has finished, then `--resume` finishes the sweep. One reference pass in all,
    4 child runs under one parent, the first trial not run again, the fronts on the parent."""
    from tests.conftest import TINY_CONFIG as config

    args = [sys.executable, "-m", "jobs.sweep", "--config", str(config), f"output.dir={tmp_path}",
            "output.run_name=sweep", f"eval.reward.source={_reward(tmp_path)}", *TINY_SWEEP]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            parent_id = _wait_for_a_finished_trial(tmp_path, proc, timeout=420)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    first = [r for r in _children(tmp_path, parent_id) if r.info.status == "FINISHED"]
    assert len(first) == 1
    done = subprocess.run([sys.executable, "-m", "jobs.sweep", "--resume", str(tmp_path / "sweep")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hypervolume" in done.stdout and "best configuration per method" in done.stdout

    client, _ = _client(tmp_path)
    children = _children(tmp_path, parent_id)
    assert len(children) == 4  # no duplicate of the interrupted trial's run
    assert len({r.data.tags["trial"] for r in children}) == 4
    assert sorted((r.data.params["loss.name"], float(r.data.params["loss.beta"])) for r in children) == [
        ("dpo", 0.1), ("dpo", 0.5), ("tdpo2", 0.1), ("tdpo2", 0.5)]
    assert all(r.info.status == "FINISHED" and r.data.tags["method"] == r.data.params["loss.name"] for r in children)
    again = client.get_run(first[0].info.run_id)
    assert again.info.end_time == first[0].info.end_time  # the finished trial was not run again
    for run in children:  # each trial evaluated at steps 2 and 4, once
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/kl")] == [2, 4]

    # One reference pass for the whole sweep: 2 chunks of 8 pairs, one forward pass each, by the first
    # driver; the resumed driver found them cached; no trial ran the reference on training pairs.
    passes = client.get_metric_history(parent_id, "reference/forward_passes")
    assert [m.value for m in passes] == [2.0, 0.0]
    assert [m.value for m in client.get_metric_history(parent_id, "reference/cached_chunks")] == [0.0, 2.0]
    for run in children:
        assert run.data.metrics["reference/forward_passes"] == 0
        assert run.data.metrics["reference/cached_chunks"] == 2

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "sweep"
    artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "pareto")}
    assert {"pareto/pareto.png", "pareto/pareto_points.csv", "pareto/pareto_summary.csv", "best_configs.json",
            "trials.csv", "config.yaml"} <= artifacts
    assert {"pareto/hypervolume/dpo", "pareto/hypervolume/tdpo2", "eval/reward"} <= parent.data.metrics.keys()
    assert {"best.dpo.loss.beta", "best.tdpo2.loss.beta"} <= parent.data.params.keys()
    with (tmp_path / "sweep" / "pareto" / "pareto_points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + 4 * 2  # the reference, two evaluations per trial
    trials = (tmp_path / "sweep" / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 4
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr  # a finished sweep is not overwritten
    resumed = subprocess.run([sys.executable, "-m", "jobs.sweep", "--resume", str(tmp_path / "sweep")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 2 and "has finished" in resumed.stderr  # nor reported twice
