"""The one MLflow logger: rank-aware, explicit run ids, secrets redacted.

Every MLflow call of the project goes through :class:`Tracker`. Only rank 0
writes; on other ranks every method is a no-op, so worker code can call it
unconditionally. It uses ``MlflowClient`` with an explicit run id rather than
MLflow's global "active run", so several runs (sweep trials, workers) never
write into each other.

Where runs go: ``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else an
embedded SQLite store under the output directory (``<output.dir>/mlflow.db``,
artifacts beside it). A server URI that does not answer is a
:class:`TrackingError` raised by :func:`open_tracker` before any training.

Metrics go through an :class:`Outbox`: a background thread delivers them in
order, so a tracking server that stops mid-run never stalls training. Batches it
cannot deliver stay queued and are retried with backoff; when the run ends the
tracker waits up to ``tracking.flush_timeout_s`` for them, then raises a
:class:`TrackingError` that says what did not reach the server (every metric is
also in the run's ``metrics.jsonl``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pipeline.config import CREDENTIALS_ADVICE, RunConfig, hide_uri_credentials
from pipeline.errors import PipelineError

SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential|auth", re.IGNORECASE)
REDACTED = "***"

log = logging.getLogger(__name__)


class TrackingError(PipelineError):
    """The tracking store cannot be reached or written."""


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        if _safe(uri) != uri:  # it would be written into sweep state, printed by MLflow, passed to workers
            raise TrackingError(f"$MLFLOW_TRACKING_URI ({_safe(uri)}) carries credentials; " + CREDENTIALS_ADVICE)
        return uri
    root = Path(cfg.output.dir).expanduser().resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values whose key names a secret, and credentials embedded in URIs."""
    out = {}
    for key, value in params.items():
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = _safe(value)
        else:
            out[key] = value
    return out


class Outbox:
    """Metric batches on their way to one MLflow run, delivered in order by a daemon thread: the caller
    never waits on the store. A batch the store cannot take now (server down, store locked) stays at
    the head of the queue and is retried after ``retry_s`` seconds, doubling up to ``max_retry_s``; one
    it refuses for good (an HTTP 4xx: a deleted run, an invalid value) is dropped and counted."""

    def __init__(self, client: Any, run_id: str, retry_s: float = 1.0, max_retry_s: float = 10.0):
        self.client, self.run_id = client, run_id
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.pending: deque[tuple[int, list[Any]]] = deque()  # (step, metrics)
        self.failures = 0  # failed delivery attempts so far
        self.failing = False  # the last attempt failed
        self.last_error: str | None = None
        self.refused: list[int] = []  # steps whose batch the store refused for good
        self._wake = threading.Condition()
        self._stop = threading.Event()  # set when close() gives up: the thread ends
        self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, step: int, metrics: list[Any]) -> None:
        with self._wake:
            self.pending.append((step, metrics))
            self._wake.notify()

    def close(self, timeout: float) -> list[tuple[int, list[Any]]]:
        """Wait for the queue to drain: as long as the store takes batches, and at most ``timeout``
        seconds once it fails. Returns what is still undelivered; the thread then stops."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self.pending and (not self.failing or time.monotonic() < deadline):
                self._wake.wait(0.2)
            left = list(self.pending)
            self._stop.set()
            self._wake.notify_all()
        return left

    def _run(self) -> None:
        delay = self.retry_s
        while not self._stop.is_set():
            with self._wake:
                while not self.pending and not self._stop.is_set():
                    self._wake.wait()
                if self._stop.is_set():
                    return
                step, metrics = self.pending[0]
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as e:  # noqa: BLE001 - anything the store says is retried or reported at close
                self.last_error = _describe(e)
                if _refused_for_good(e):
                    log.error("MLflow refused the metrics of step %d: %s", step, self.last_error[:300])
                    self._done(refused=step)
                    continue
                self.failures += 1
                self.failing = True
                if self.failures == 1:
                    log.warning("MLflow did not take the metrics of step %d; training goes on and they are "
                                "retried in the background: %s", step, self.last_error[:300])
                self._stop.wait(delay)  # new batches do not cut the backoff short; giving up does
                delay = min(delay * 2, self.max_retry_s)
                continue
            delay = self.retry_s
            self._done()

    def _done(self, refused: int | None = None) -> None:
        with self._wake:
            self.pending.popleft()
            self.failing = False
            if refused is not None:
                self.refused.append(refused)
            self._wake.notify_all()


def _refused_for_good(error: Exception) -> bool:
    """An HTTP 4xx other than 429 (too many requests): sending the same batch again cannot help."""
    status = getattr(error, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class Tracker:
    """One MLflow run. Construct with :func:`open_tracker`; use as a context manager."""

    def __init__(self, client: Any, run_id: str | None, uri: str, owner: bool = True, flush_timeout_s: float = 120.0):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.owner = owner  # the process that opened the run ends it; attached workers only log
        self.flush_timeout_s = flush_timeout_s
        self.outbox: Outbox | None = None  # started by the first log_metrics

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in redact(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queued for the outbox: returns at once whether or not the store answers."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if self.outbox is None:
            self.outbox = Outbox(self.client, self.run_id)
        self.outbox.put(step, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as e:  # noqa: BLE001 - the store's error, said with the URI's credentials hidden
            raise TrackingError(f"MLflow at {_safe(self.uri)} did not take the artifact {path}: "
                                f"{_describe(e)[:500]}") from None

    def flush(self, timeout: float | None = None) -> None:
        """Deliver every queued metric, waiting up to ``flush_timeout_s``; a TrackingError says what the
        store did not take (``timeout``: instead of ``flush_timeout_s``). The outbox is closed: call once,
        when the run's logging is over."""
        if self.outbox is None:
            return
        outbox, self.outbox = self.outbox, None
        undelivered = outbox.close(self.flush_timeout_s if timeout is None else timeout)
        if undelivered:
            steps = sorted({step for step, _ in undelivered})
            waited = f"tracking.flush_timeout_s={self.flush_timeout_s:g} s" if timeout is None else f"{timeout:g} s"
            raise TrackingError(
                f"MLflow at {_safe(self.uri)} did not confirm the metrics of {len(steps)} step(s) "
                f"({steps[0]}-{steps[-1]}) within {waited}, after "
                f"{outbox.failures} failed attempt(s); last error: {(outbox.last_error or '?')[:300]}. "
                f"(Step {steps[0]} may have been stored if the connection broke before the reply.) "
                "Training itself finished: every metric is in the run's metrics.jsonl")
        if outbox.refused:
            raise TrackingError(
                f"MLflow at {_safe(self.uri)} refused the metrics of step(s) {outbox.refused}: "
                f"{(outbox.last_error or '?')[:300]}. Every metric is in the run's metrics.jsonl")

    def end(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Flush, then mark the run ``status`` (the owner only). An undeliverable flush marks it FAILED
        if the store answers again, and raises."""
        if not self.active:
            return
        try:
            self.flush(timeout)
        except TrackingError:
            if self.owner:
                try:  # FAILED if the store answers again by now; left RUNNING there otherwise
                    self._terminate("FAILED")
                except TrackingError as e:
                    log.error("%s", e)
            raise
        if self.owner:
            self._terminate(status)

    def _terminate(self, status: str) -> None:
        run_id, self.run_id = self.run_id, None
        try:
            if self.uri.startswith(("http://", "https://")):
                check_server(self.uri)
            self.client.set_terminated(run_id, status)
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow run {run_id} at {_safe(self.uri)} could not be marked {status} "
                                f"(it stays RUNNING there): {_describe(e)}") from None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        if exc_type is None:
            self.end(status)
            return
        try:  # the error in flight is the one to see, soon; the store's trouble is logged beside it
            self.end(status, timeout=min(self.flush_timeout_s, 10.0))
        except TrackingError as e:
            log.error("%s", e)


def open_tracker(cfg: RunConfig, run_name: str, *, rank: int = 0, tags: dict[str, str] | None = None,
                 run_id: str | None = None) -> Tracker:
    """Start the run on rank 0 (checking the store answers first); a no-op tracker elsewhere or when disabled.
    ``run_id``: reopen that run instead (a resumed sweep trial or sweep), marked RUNNING again."""
    uri = tracking_uri(cfg)
    if rank != 0 or not cfg.tracking.enabled:
        return Tracker(None, None, uri)
    timeout = cfg.tracking.flush_timeout_s

    database = _sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        # "Creating initial MLflow database tables..." at INFO, on a store's first use: not news.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    client = _client(uri, database)
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
        except Exception as e:
            raise TrackingError(f"MLflow run {run_id} at {_safe(uri)} cannot be reopened: "
                                f"{_describe(e)}") from None
        return Tracker(client, run_id, uri, flush_timeout_s=timeout)
    try:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_root(uri))
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags={**cfg.tracking.tags, **(tags or {})})
    except Exception as e:  # connection refused, bad URI, read-only store: all fatal here, before training
        raise TrackingError(f"MLflow tracking store at {_safe(uri)} cannot be used: "
                            f"{_describe(e)}") from None
    return Tracker(client, run.info.run_id, uri, flush_timeout_s=timeout)


def experiment_client(cfg: RunConfig) -> tuple[Any, Any | None]:
    """(an MlflowClient on cfg's tracking store, cfg's experiment, or None where it does not exist yet)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    return client, client.get_experiment_by_name(cfg.tracking.experiment)


def ui_command(uri: str) -> str:
    """How to look at the runs: the command serving an embedded store on loopback, or the server's URI."""
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" if uri.startswith("sqlite") else _safe(uri)


def find_run(cfg: RunConfig, tags: dict[str, str]) -> Any | None:
    """The one live run of cfg's experiment carrying all ``tags`` (a sweep's parent, a trial), or None."""
    client, experiment = experiment_client(cfg)
    if experiment is None:
        return None
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment.experiment_id], query, max_results=2)
    if len(runs) > 1:
        raise TrackingError(f"{len(runs)} MLflow runs carry the tags {tags}; expected at most one")
    return runs[0] if runs else None


def attach_tracker(uri: str, run_id: str | None, rank: int, flush_timeout_s: float = 120.0) -> Tracker:
    """A worker's handle on a run the driver opened: rank 0 logs into it, every other rank is a no-op.
    The worker calls :meth:`Tracker.flush` when its logging is over."""
    if rank != 0 or run_id is None:
        return Tracker(None, None, uri)
    from mlflow.tracking import MlflowClient

    return Tracker(MlflowClient(tracking_uri=uri), run_id, uri, owner=False, flush_timeout_s=flush_timeout_s)


UNDELIVERED = "mlflow-undelivered.txt"


def flush_worker(tracker: Tracker, folder: Path) -> None:
    """A Ray worker's end of logging. What the store did not take goes to ``folder``/UNDELIVERED for the
    driver to raise (:func:`raise_undelivered`): raising here would fail, and restart, the worker group."""
    try:
        tracker.flush()
    except TrackingError as e:
        log.error("%s", e)
        (folder / UNDELIVERED).write_text(str(e), encoding="utf-8")


def clear_undelivered(folder: Path) -> None:
    """Before a run starts in ``folder``: a report an earlier run left there is not this run's."""
    (folder / UNDELIVERED).unlink(missing_ok=True)


def raise_undelivered(folder: Path) -> None:
    """The driver's side of :func:`flush_worker`, once training has finished and its outputs are saved."""
    report = folder / UNDELIVERED
    if report.is_file():
        raise TrackingError(report.read_text(encoding="utf-8"))


def _client(uri: str, database: Path | None) -> Any:
    """An MlflowClient; a new embedded SQLite store is created under a file lock, since two processes
    creating it at once break MLflow's schema migration (seen with two jobs on one output dir)."""
    from mlflow.tracking import MlflowClient

    if database is None:
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    with FileLock(str(database) + ".lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates and migrates the schema now, inside the lock
    return client


def check_store(cfg: RunConfig) -> None:
    """Before any other work: a configured tracking server must answer (an embedded store always can)."""
    uri = tracking_uri(cfg)
    if cfg.tracking.enabled and uri.startswith(("http://", "https://")):
        check_server(uri)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on a tracking server that does not answer: MLflow's own client retries for minutes."""
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {_safe(uri)} is unreachable: "
                            f"{_describe(e)}") from None
    if response.status_code != 200:
        raise TrackingError(f"MLflow tracking server {_safe(uri)} answered /health with HTTP {response.status_code}")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _artifact_root(uri: str) -> str | None:
    """Artifacts of the embedded store live beside its database; servers choose their own."""
    database = _sqlite_path(uri)
    return None if database is None else (database.parent / "mlartifacts").as_uri()


def _safe(text: str) -> str:
    """Hide credentials embedded in a URI (scheme://user:pass@host)."""
    return hide_uri_credentials(text)


def _describe(error: BaseException) -> str:
    """``Type: message`` of a store's error, credentials hidden (MLflow's messages carry the request URL)."""
    return _safe(f"{type(error).__name__}: {error}")
