"""Who can reach what, and what a run writes down.

* The servers the project opens (Ray's dashboard and job API, the MLflow server) listen on loopback
  only. Ray 2.60 binds its own servers to every interface whatever --node-ip-address says: its gRPC
  servers require the cluster's token; its Prometheus metrics servers (the dashboard's, the
  autoscaler's, each node's exporter) answer anyone, with metrics only (docs/reliability.md, known
  limits).
* No secret from the environment or from a credentialed URI reaches MLflow params, tags, metrics,
  artifacts or logs, nor the run's own files.
"""

from __future__ import annotations

import http.client
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import ray

from pipeline.config import load_config
from pipeline.train.local import train_local
from tests.conftest import TINY_CONFIG
from tests.faults.servers import MlflowServer

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listeners(pids: set[int]) -> dict[int, set[tuple[str, int]]]:
    """pid -> {(address, port)} of the TCP sockets those processes listen on."""
    found: dict[int, set[tuple[str, int]]] = {}
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            found.setdefault(c.pid, set()).add((c.laddr.ip, c.laddr.port))
    return found


def cluster_processes(cluster) -> dict[int, str]:
    """Every process of the cluster, with its command line: those whose command line names its state
    folder or whose environment names its token, and all their descendants (the agents and workers,
    whose titles Ray rewrites to 'ray::...', which can also hide their environment)."""
    procs = {}
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            env = p.info["environ"] or {}
        except (psutil.Error, TypeError):
            continue
        if str(cluster.base) in cmd or env.get("RAY_AUTH_TOKEN_PATH") == str(cluster.token_path):
            procs[p.info["pid"]] = cmd
    for pid in list(procs):
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:  # one that ends meanwhile must not hide its siblings
            try:
                procs.setdefault(child.pid, " ".join(child.cmdline()))
            except psutil.Error:
                continue
    return procs


RAY_PROGRAMS = ("/ray/core/src/ray/gcs/gcs_server", "/ray/core/src/ray/raylet/raylet", "ray::",
                "ray/_private/workers/default_worker.py", "ray/dashboard/", "ray/autoscaler/",
                "ray.util.client.server", "ray/_private/log_monitor.py", "ray/_private/runtime_env/agent")


def http_answer(address: str, port: int) -> tuple[int, str] | None:
    """(status, start of the body) of an HTTP GET /metrics sent without any credentials, straight
    (no proxy); None when the server does not speak plain HTTP to a stranger (Ray's gRPC servers)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address.removeprefix("::ffff:"))
    host = f"[{host}]" if ":" in host else host
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/metrics", timeout=5) as reply:
            return reply.status, reply.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read(4096).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return None


def test_the_servers_we_open_listen_on_loopback_and_ray_s_own_are_all_ray(ray_cluster):
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    procs = cluster_processes(ray_cluster)
    bound = listeners(set(procs))
    addresses = {port: {a for pid, items in bound.items() for a, p in items if p == port}
                 for port in (ray_cluster.dashboard_port, ray_cluster.mlflow_port)}
    print(f"\ndashboard, job API and MLflow listen on: {addresses}")
    for port, where in addresses.items():
        assert where and where <= LOOPBACK, (port, where)
    mlflow_pids = {pid for pid, cmd in procs.items() if "mlflow" in cmd}
    assert mlflow_pids and all(a in LOOPBACK for pid in mlflow_pids for a, _ in bound.get(pid, ()))
    # Every other listener is one of Ray's own programs (matched on the whole command line).
    exposed = {(pid, a, p) for pid, items in bound.items() for a, p in items if a not in LOOPBACK}
    print(f"Ray's servers on other interfaces: {len(exposed)}")
    strangers = [(pid, procs[pid][:300], a, p) for pid, a, p in exposed
                 if not any(program in procs[pid] for program in RAY_PROGRAMS)]
    assert not strangers, strangers
    # Of those, the ones that take a request without the token (anything but 401/403) are Ray's
    # Prometheus servers (the dashboard's, the autoscaler's, each node's exporter), and they serve
    # metrics, nothing else. The rest are gRPC and refuse a tokenless client (next test).
    metrics_ports = {DASHBOARD_METRIC_PORT, AUTOSCALER_METRIC_PORT} | {
        node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    answers = {(a, p): http_answer(a, p) for _, a, p in exposed}
    open_to_all = {key: answer for key, answer in answers.items() if answer and answer[0] not in (401, 403)}
    print(f"taking requests without the token: {sorted(open_to_all)}; metrics ports: {sorted(metrics_ports)}")
    assert {p for _, p in open_to_all} <= metrics_ports, sorted(open_to_all)
    for key, (status, text) in open_to_all.items():
        assert status == 200 and text.startswith("# "), (key, status, text[:200])
    # The probe reaches what it should: the dashboard's metrics server, where it is exposed, answered.
    assert all(key in open_to_all for key in answers if key[1] == DASHBOARD_METRIC_PORT)


def test_ray_refuses_a_driver_without_the_token(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")  # no ~/.ray/auth_token to fall back on
    code = f"import ray; ray.init(address={ray_cluster.address!r}); print('CONNECTED', ray.cluster_resources())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout
    assert "token" in proc.stderr.lower()


SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-5e1f0c",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-9b7d2a",
    "HF_TOKEN": "hf_token_c4a81e",
    "RAY_AUTH_TOKEN": "ray-token-77f3b0",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=azure-key-1d9e44",
}
URI_PASSWORD = "uri-pw-3c2b8d"


def test_credentials_in_a_tracking_uri_are_refused_without_being_repeated(tmp_path, monkeypatch):
    """A URI's credentials would be written into config.yaml, sweep state and logs: refused, pointing
    at the environment variables MLflow reads instead; the password is not echoed."""
    from pipeline.errors import ConfigError
    from pipeline.tracking import TrackingError, check_store

    with pytest.raises(ConfigError, match=r"tracking.uri: .*carries credentials.*MLFLOW_TRACKING_PASSWORD") as refused:
        load_config(TINY_CONFIG, [f"tracking.uri=http://alice:{URI_PASSWORD}@127.0.0.1:5000"])
    assert URI_PASSWORD not in str(refused.value) and "http://***@127.0.0.1:5000" in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{URI_PASSWORD}@127.0.0.1:5000")
    with pytest.raises(TrackingError, match=r"MLFLOW_TRACKING_URI \(http://\*\*\*@127.0.0.1:5000\) carries") as refused:
        check_store(load_config(TINY_CONFIG, [f"output.dir={tmp_path}"]))
    assert URI_PASSWORD not in str(refused.value)


def test_no_secret_reaches_mlflow_or_the_run_s_files(tmp_path, monkeypatch, caplog, capfd):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # sent as basic auth; the server ignores it
    server = MlflowServer(tmp_path / "server")
    server.folder.mkdir()
    server.start()
    try:
        cfg = load_config(TINY_CONFIG, ["train.max_steps=2", "train.warmup_steps=0", "data.limit=8",
                                        f"output.dir={tmp_path / 'out'}", f"tracking.uri={server.uri}",
                                        "tracking.log_model=true", "eval.enabled=false",
                                        "tracking.tags={team: nlp}"])
        with caplog.at_level(logging.DEBUG):
            result = train_local(cfg, progress=False)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        [run] = client.search_runs([client.get_experiment_by_name("rayprefopt").experiment_id])
        texts = {"params": repr(run.data.params), "tags": repr(run.data.tags),
                 "metric names": repr(sorted(run.data.metrics)), "logs": caplog.text + "".join(capfd.readouterr())}
    finally:
        server.stop()
    assert run.data.params["tracking.uri"] == server.uri and len(run.data.params) > 50  # the config was logged
    # Every file the run and the server wrote: the run folder, the server's database and artifact store.
    files = [p for root in (result.run_dir, server.folder) for p in Path(root).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "config.yaml" for p in files)
    for name, text in texts.items():
        for secret in SECRETS.values():
            assert secret not in text, (name, secret)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, (path, secret)
    assert os.environ["HF_TOKEN"] == SECRETS["HF_TOKEN"]  # they were there to leak


def test_code_in_a_model_folder_runs_only_when_the_config_trusts_it(tmp_path):
    """A model folder whose config.json points at its own Python (auto_map) is refused by default, and
    that Python is never imported; model.trust_remote_code defaults to false."""
    import json

    from pipeline.errors import ModelLoadError
    from pipeline.models.loading import load_causal_lm

    marker = tmp_path / "pwned"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_causal_lm(str(folder))
    assert not marker.exists()
    assert load_config(TINY_CONFIG).model.trust_remote_code is False
