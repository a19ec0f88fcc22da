"""`ray job submit` against a real `ray start --head` cluster with token authentication on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def ray_cli(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("ray")), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_train_job_runs_through_ray_job_submit(ray_cluster, tmp_path):
    out = tmp_path / "runs"
    proc = ray_cli("job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", ".", "--",
                   "python", "-m", "jobs.train", "--config", "configs/tiny.yaml", f"output.dir={out}",
                   "output.run_name=submitted", "loss.name=tdpo2", "train.max_steps=3", "data.limit=16",
                   "distributed.num_workers=2", "reference.cpus_per_actor=0.5", env=ray_cluster.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"): proc.stdout.index("\n}") + 2])
    assert summary["steps"] == 3
    assert (out / "submitted" / "model" / "model.safetensors").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("rayprefopt").experiment_id])
    assert run.info.run_name == "submitted" and run.info.status == "FINISHED"
    assert {"loss", "kl/chosen", "throughput/pairs_per_s"} <= run.data.metrics.keys()


def test_the_cluster_refuses_a_client_without_the_token(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = ray_cli("job", "list", "--address", ray_cluster.dashboard_url, env=env, timeout=120)
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()
