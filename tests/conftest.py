"""Shared fixtures. Everything runs offline: a test that reaches for the Hub fails."""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every Ray in the session runs with token authentication, as a user's would. Set before Ray is
# imported anywhere: Ray reads the mode once per process.
# Guarded: test modules import this file again as ``tests.conftest``.
if "RAYPREFOPT_TEST_RAY_BASE" not in os.environ:
    _base = Path(tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (_base / "auth_token").write_text(secrets.token_hex(32))
    (_base / "auth_token").chmod(0o600)
    os.environ.update(RAYPREFOPT_TEST_RAY_BASE=str(_base), RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN_PATH=str(_base / "auth_token"))
    os.environ.pop("RAY_ADDRESS", None)
    atexit.register(shutil.rmtree, _base, True)
RAY_BASE = Path(os.environ["RAYPREFOPT_TEST_RAY_BASE"])
RAY_TOKEN = RAY_BASE / "auth_token"

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from pipeline.models.loading import load_tokenizer

    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from pipeline.models.loading import resolve

    return Path(resolve("builtin:tiny").location)


STANDARD_ROWS = [
    {"prompt": "The film was", "chosen": " a delight from start to finish.", "rejected": " a chore to sit through."},
    {"prompt": "My review:", "chosen": " warm, funny and wise.", "rejected": " loud and empty."},
    {"prompt": "In short,", "chosen": " see it twice.", "rejected": " skip it."},
    {"prompt": "Verdict:", "chosen": " a small miracle.", "rejected": " a large mistake."},
]

CONVERSATIONAL_ROWS = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": r["rejected"].strip()}],
    }
    for r in STANDARD_ROWS
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """The cluster ``cluster/local.sh`` starts, as a user would: a Ray head node, a Ray worker node and
    an MLflow tracking server, token authentication on, everything on loopback, on free ports."""

    SCRIPT = REPO / "cluster" / "local.sh"

    def __init__(self, base: Path, token_path: Path, head_cpus: int = 4, worker_cpus: int = 4):
        self.base = base
        self.token_path = token_path
        self.port, self.dashboard_port, self.client_port, self.mlflow_port = (_free_port() for _ in range(4))
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.mlflow_uri = f"http://127.0.0.1:{self.mlflow_port}"
        # PATH as in an activated venv: a submitted job's `python` is this environment's.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "PATH": path}
        self.env.pop("RAY_ADDRESS", None)
        self.script_env = {**self.env, "STATE_DIR": str(base / "state"), "RAY_PORT": str(self.port),
                           "DASHBOARD_PORT": str(self.dashboard_port), "CLIENT_PORT": str(self.client_port),
                           "MLFLOW_PORT": str(self.mlflow_port), "HEAD_CPUS": str(head_cpus),
                           "WORKER_CPUS": str(worker_cpus)}
        self.num_cpus = head_cpus + worker_cpus

    def script(self, command: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.SCRIPT), command], env=self.script_env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> LocalCluster:
        proc = self.script("start")
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"cluster/local.sh start failed:\n{proc.stdout}\n{proc.stderr}")
        return self

    def stop(self) -> None:
        self.script("stop", timeout=120)


@pytest.fixture(scope="session")
def ray_cluster():
    """The test session's one Ray instance (``cluster/local.sh``): this process joins it as a driver."""
    import ray

    cluster = LocalCluster(RAY_BASE, RAY_TOKEN).start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    """A tiny random one-output classifier: a reward source whose scores vary with any text."""
    from pipeline.models.tiny import save_tiny_reward_model

    out = tmp_path_factory.mktemp("tiny-reward")
    save_tiny_reward_model(out)
    return out
