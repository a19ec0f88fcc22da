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
    """A real Ray cluster started with ``ray start --head``: token authentication on, loopback only."""

    def __init__(self, base: Path, token_path: Path, num_cpus: int = 8):
        self.base = base
        self.token_path = token_path
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # PATH as in an activated venv: a submitted job's `python` is this environment's.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path), "PATH": path}
        self.env.pop("RAY_ADDRESS", None)
        self.num_cpus = num_cpus

    def start(self) -> LocalCluster:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        subprocess.run(
            [ray_cli, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.base / 'tmp'}",
             "--disable-usage-stats"],
            env=self.env, check=True, capture_output=True, text=True, timeout=180,
        )
        return self

    def stop(self) -> None:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray_cli, "stop", "--force"], env=self.env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def ray_cluster():
    """The test session's one Ray instance: a real head node this process joins as a driver."""
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
