"""End to end on a real local cluster, the one ``cluster/local.sh`` starts (a Ray head and a worker node
with token authentication, an MLflow tracking server with a SQLite backend and a local artifact store,
all on loopback): ``ray job submit`` a DPO and a TDPO2 training job, check through the MLflow client
that the server holds the runs, their metrics and evaluation points, then open the MLflow UI's run
comparison page in headless Chromium and keep a screenshot of it.

The screenshot lands in ``$RAYPREFOPT_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repository)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.conftest import REPO

ARTIFACTS = Path(os.environ.get("RAYPREFOPT_TEST_ARTIFACTS", REPO / "test-artifacts"))
# As the machine's notes say: without the background-networking flags Chromium keeps dialling out.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def ray_cli(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("ray")), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no Chromium for the MLflow UI screenshot: `apt-get install chromium` "
                    "(`make test` does this where it can), or set $CHROMIUM to its path")
    return path


def submit(cluster, submission_id: str, *job_args: str, runtime_env: dict | None = None,
           working_dir: bool = True) -> None:
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    extra += ["--working-dir", "."] if working_dir else []
    if not working_dir:  # no copy of the repository in the job's directory: the config by its path
        job_args = tuple(str(REPO / a) if a.startswith("configs/") else a for a in job_args)
    proc = ray_cli("job", "submit", "--address", cluster.dashboard_url, "--no-wait",
                   "--submission-id", submission_id, *extra, "--", "python", "-m", "jobs.train", *job_args,
                   env=cluster.env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def wait_for(cluster, submission_id: str, timeout_s: float = 900) -> str:
    """Poll ``ray job status`` until the job ends (a followed log stream can drop before that);
    check it succeeded and return its logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = ray_cli("job", "status", "--address", cluster.dashboard_url, submission_id, env=cluster.env)
        state = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", status.stdout)
        if state or time.monotonic() > deadline:
            break
        time.sleep(3)
    logs = ray_cli("job", "logs", "--address", cluster.dashboard_url, submission_id, env=cluster.env).stdout
    assert state and state[1] == "succeeded", status.stdout[-2000:] + logs[-5000:]
    return logs


@pytest.mark.timeout(1200)
def test_jobs_submitted_to_a_local_cluster_land_on_the_mlflow_server_and_its_ui(ray_cluster, tmp_path,
                                                                               tiny_reward_dir):
    browser = chromium()  # before any work: a missing browser is a set-up error
    out = tmp_path / "runs"
    common = ["--config", "configs/tiny.yaml", f"output.dir={out}", "train.max_steps=4", "data.limit=16",
              "distributed.num_workers=1", "distributed.cpus_per_worker=1", "reference.cpus_per_actor=0",
              "eval.enabled=true", "eval.num_prompts=4", "eval.every_steps=2", f"eval.reward.source={tiny_reward_dir}"]
    ids = {loss: f"e2e-{loss}-{tmp_path.name}" for loss in ("dpo", "tdpo2")}
    # The two ways a job finds the server: the config, or MLflow's own variable in the runtime env.
    submit(ray_cluster, ids["dpo"], *common, "loss.name=dpo", "output.run_name=dpo",
           f"tracking.uri={ray_cluster.mlflow_uri}")
    # The second job ships no working dir: it runs the installed package, as an image's jobs do (two
    # jobs sharing one working_dir package raced in Ray 2.60: the second's directory vanished under it,
    # cf. ray-project/ray#47471), and its config by absolute path.
    submit(ray_cluster, ids["tdpo2"], *common, "loss.name=tdpo2", "output.run_name=tdpo2",
           runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": ray_cluster.mlflow_uri}}, working_dir=False)
    for loss, sid in ids.items():
        summary = wait_for(ray_cluster, sid)
        assert '"steps": 4' in summary, summary[-3000:]
        assert (out / loss / "model" / "model.safetensors").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(ray_cluster.mlflow_uri)
    experiment = client.get_experiment_by_name("rayprefopt")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert runs.keys() == {"dpo", "tdpo2"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["loss.name"] == name
        assert {"loss", "rewards/margins", "throughput/pairs_per_s", "eval/reward", "eval/kl"} <= run.data.metrics.keys()
        assert ("kl/chosen" in run.data.metrics) == (name == "tdpo2")  # the sequential KL: token-level losses only
        # The evaluation points: reward and KL at every evaluated step, once each.
        for key in ("eval/reward", "eval/kl"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == [2, 4] and all(math.isfinite(m.value) for m in history)
        # Artifacts go through the server's proxy into its artifact store, not the job's disk.
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        stored = list((ray_cluster.base / "state" / "mlartifacts").rglob(f"{run.info.run_id}/artifacts/config.yaml"))
        assert len(stored) == 1

    shot = screenshot_comparison(browser, ray_cluster.mlflow_uri, experiment.experiment_id,
                                 [r.info.run_id for r in runs.values()], list(runs))
    assert shot.stat().st_size > 20_000


def screenshot_comparison(browser: str, uri: str, experiment_id: str, run_ids: list[str],
                          run_names: list[str]) -> Path:
    """The MLflow UI's compare-runs page for ``run_ids``, as a PNG in ARTIFACTS, once it shows every run's
    name; the scatter plot set to eval/kl against eval/reward."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "mlflow-compare-runs.png"
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=CHROMIUM_ARGS)
        try:
            page = b.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(f"{uri}/#/compare-runs?{query}")
            page.get_by_text(f"Comparing {len(run_ids)} Runs", exact=False).first.wait_for(timeout=60_000)
            # The run-details table: a row "Run Name:" followed by one cell per run.
            row = page.locator("tr", has=page.get_by_text("Run Name:", exact=True)).first
            row.wait_for(timeout=60_000)
            for name in run_names:
                row.get_by_text(name, exact=True).wait_for(timeout=60_000)
            # The reward-for-KL view: a scatter of the last eval/kl against the last eval/reward.
            page.get_by_text("Scatter Plot", exact=True).first.click()
            for axis, metric in (("#x-axis-selector", "eval/kl"), ("#y-axis-selector", "eval/reward")):
                page.locator(axis).click()
                page.get_by_role("option", name=metric, exact=True).click()
            close = page.get_by_role("button", name="Close")  # the assistant side panel, if shown
            if close.count():
                close.first.click()
            page.wait_for_timeout(2_000)  # the plot redraws after the axes change
            page.screenshot(path=str(path), full_page=True)
        finally:
            b.close()
    return path


def test_the_cluster_refuses_a_client_without_the_token(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = ray_cli("job", "list", "--address", ray_cluster.dashboard_url, env=env, timeout=120)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()
