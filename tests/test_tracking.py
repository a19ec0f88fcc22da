"""MLflow tracking through the one logger: a real embedded store, redaction, a dead server, ranks."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.config import load_config
from pipeline.tracking import REDACTED, TrackingError, open_tracker, redact, tracking_uri
from pipeline.train.local import train_local
from tests.conftest import TINY_CONFIG as TINY


def test_training_run_lands_in_the_embedded_store(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config(TINY, [f"output.dir={tmp_path}", "output.run_name=r1", "loss.name=tdpo2", "train.max_steps=3"])
    train_local(cfg, progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri(cfg) == uri
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rayprefopt")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.data.params["loss.name"] == "tdpo2" and run.data.params["loss.beta"] == "0.1"
    assert run.data.tags["loss"] == "tdpo2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    for key in ("rewards/margins", "kl/chosen", "throughput/pairs_per_s", "throughput/tokens_per_s"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_report.json"} <= artifacts


def test_failed_training_marks_the_run_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import pipeline.train.local as local

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(local, "load_models", explode)
    cfg = load_config(TINY, [f"output.dir={tmp_path}", "output.run_name=r2"])
    with pytest.raises(RuntimeError, match="boom"):
        train_local(cfg, progress=False)
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name("rayprefopt").experiment_id])
    assert run.info.status == "FAILED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_before_training(tmp_path):
    cfg = load_config(TINY, [f"output.dir={tmp_path}", "output.run_name=r3",
                             f"tracking.uri=http://127.0.0.1:{free_port()}"])
    start = time.monotonic()
    with pytest.raises(TrackingError, match="is unreachable"):
        train_local(cfg, progress=False)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "r3" / "metrics.jsonl").exists()  # no step ran


def test_environment_uri_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    cfg = load_config(TINY, [f"output.dir={tmp_path / 'out'}"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'env.db'}"


def test_non_zero_ranks_and_disabled_tracking_write_nothing(tmp_path):
    cfg = load_config(TINY, [f"output.dir={tmp_path}"])
    with open_tracker(cfg, "x", rank=1) as tracker:
        assert not tracker.active
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_params({"a": 1})
    off = load_config(TINY, [f"output.dir={tmp_path}", "tracking.enabled=false"])
    with open_tracker(off, "y") as tracker:
        assert not tracker.active
    assert not (tmp_path / "mlflow.db").exists()


def test_secrets_are_redacted():
    params = {
        "tracking.uri": "https://alice:s3cret@mlflow.example.com",
        "cluster.auth_token": "abc",
        "cloud.api_key": "k",
        "db.password": "p",
        "loss.beta": 0.1,
    }
    out = redact(params)
    assert out["tracking.uri"] == f"https://{REDACTED}@mlflow.example.com"
    assert out["cluster.auth_token"] == out["cloud.api_key"] == out["db.password"] == REDACTED
    assert out["loss.beta"] == 0.1
