"""The MLflow tracking server going away: training goes on, metrics are delivered when it returns,
and what it never took is said, not lost silently. A server down from the start is refused before any
work (tests/test_distributed.py::test_unreachable_tracking_server_fails_before_ray_work)."""

from __future__ import annotations

import re
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
    with pytest.raises(TrackingError, match=rf"{server.uri}.*did not confirm the metrics of \d step\(s\) \(\d-{STEPS}\)"
                                            r".*flush_timeout_s=3 .*metrics\.jsonl") as failure:
        train_local(cfg, progress=False, on_step=on_step)
    first_missing = int(re.search(rf"\((\d)-{STEPS}\)", str(failure.value)).group(1))
    # Training itself finished: the model and every step's metrics are on disk.
    run_dir = tmp_path / "out" / "outage"
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS
    server.start()
    status, steps = logged_steps(server.uri)
    # What reached it before it died (on a loaded machine the outbox may still have been at step 1 or
    # 2) is what the error did not list, plus at most the first step listed: a server killed while
    # storing a batch may commit it and never reply (seen in CI: step 1 stored, reported unconfirmed).
    assert first_missing <= 4
    assert steps in (list(range(1, first_missing)), list(range(1, first_missing + 1))), (first_missing, steps)
    assert status == "RUNNING"  # not marked FINISHED: it did not get the whole run


def test_a_batch_the_store_refuses_for_good_is_reported_at_once_not_retried(tmp_path):
    """A deleted run refuses every batch (HTTP 400 from a server, INVALID_STATE from SQLite): dropped
    and said when the run ends, instead of blocking later batches until the flush timeout."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import open_tracker

    cfg = load_config(TINY_CONFIG, [f"output.dir={tmp_path}", "tracking.flush_timeout_s=300"])
    tracker = open_tracker(cfg, "refused")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.flush(timeout=30)  # step 1 delivered; the next log_metrics starts a fresh outbox
    client = MlflowClient(tracker.uri)
    run_id = tracker.run_id
    client.delete_run(run_id)
    tracker.log_metrics({"loss": 0.5}, step=2)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"refused the metrics of step\(s\) \[2\]"):
        tracker.end()
    assert time.monotonic() - started < 30  # not the 300 s flush timeout
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]


def test_a_healthy_store_is_drained_whatever_the_timeout(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import open_tracker

    cfg = load_config(TINY_CONFIG, [f"output.dir={tmp_path}", "tracking.flush_timeout_s=0.001"])
    with open_tracker(cfg, "drained") as tracker:
        for step in range(1, 51):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        run_id = tracker.run_id
    run = MlflowClient(tracker.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(MlflowClient(tracker.uri).get_metric_history(run_id, "loss")) == 50
