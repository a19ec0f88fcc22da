"""The MLflow tracking server going away: training goes on, metrics are delivered when it returns,
and what it never took is said, not lost silently. A server down from the start is refused before any
work (tests/test_distributed.py::test_unreachable_tracking_server_fails_before_ray_work)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.tracking import TrackingError
from pipeline.train.local import train_local
from tests.conftest import TINY_CONFIG
from tests.faults.servers import MlflowServer

STEPS = 8


@pytest.fixture
def server(tmp_path, monkeypatch):
    # MLflow's client retries a refused request for minutes by default; the outbox retries on its own.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    s = MlflowServer(tmp_path)
    s.start()
    yield s
    s.stop()


def outage_config(tmp_path: Path, server: MlflowServer, flush_timeout: float):
    return load_config(TINY_CONFIG, [f"train.max_steps={STEPS}", "train.warmup_steps=1", "data.limit=16",
                                     f"output.dir={tmp_path / 'out'}", "output.run_name=outage",
                                     f"tracking.uri={server.uri}", f"tracking.flush_timeout_s={flush_timeout}"])


def logged_steps(uri: str, metric: str = "loss") -> tuple[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("rayprefopt").experiment_id])
    return run.info.status, [m.step for m in client.get_metric_history(run.info.run_id, metric)]


def test_a_server_down_mid_run_gets_every_metric_when_it_returns(tmp_path, server):
    seconds: dict[int, float] = {}
    last = [time.perf_counter()]

    def on_step(step: int) -> None:
        seconds[step] = time.perf_counter() - last[0]
        if step == 2:
            server.stop()
        if step == 6:
            server.start()
        last[0] = time.perf_counter()

    result = train_local(outage_config(tmp_path, server, flush_timeout=120), progress=False, on_step=on_step)
    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    # Training did not wait on the dead server: steps 3-6 (logged while it was down) each took less
    # than one of MLflow's request timeouts.
    assert max(seconds[s] for s in (3, 4, 5, 6)) < 5, seconds
    status, steps = logged_steps(server.uri)
    assert status == "FINISHED"
    assert steps == list(range(1, STEPS + 1))  # every step, once, in order


def test_a_server_that_never_returns_is_reported_with_what_it_missed(tmp_path, server):
    def on_step(step: int) -> None:
        if step == 3:
            server.stop()

    cfg = outage_config(tmp_path, server, flush_timeout=3)
    with pytest.raises(TrackingError, match=rf"{server.uri}.*did not take the metrics of \d step\(s\) \([34]-{STEPS}\)"
                                            r".*flush_timeout_s=3 .*metrics\.jsonl"):
        train_local(cfg, progress=False, on_step=on_step)
    # Training itself finished: the model and every step's metrics are on disk.
    run_dir = tmp_path / "out" / "outage"
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS
    server.start()
    status, steps = logged_steps(server.uri)
    assert steps in ([1, 2], [1, 2, 3])  # what reached it before it died (step 3 was on its way)
    assert status == "RUNNING"  # not marked FINISHED: it did not get the whole run
