"""Ray plumbing every floor above uses: connecting, resource checks, Ray Train defaults, storage.

The trainers, the supervised stages, evaluation and sweeps all join one Ray cluster and start
Ray Train runs; what they share about that lives here, below all of them. Ray is imported inside
each function: importing this module stays cheap (no Ray behind ``pipeline``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import PipelineError


def storage_root(cfg: RunConfig) -> Path:
    """Where runs keep checkpoints and the reference cache: distributed.storage_path, else output.dir."""
    return Path(cfg.distributed.storage_path or cfg.output.dir).expanduser().resolve()


def connect_ray(address: str | None) -> None:
    """Join the configured cluster, else $RAY_ADDRESS, else a running `ray start` cluster on this machine,
    else start Ray here. Ray's defaults stand: token authentication on, dashboard on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PipelineError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from None


def require_resources(groups: list[tuple[int, dict[str, float]]], what: str) -> None:
    """Fail now, naming the settings, when the cluster can never hold ``groups``, each (how many, one
    actor's resources): together they must fit in the cluster, and each actor on one node. Ray would
    otherwise wait for resources forever."""
    import ray

    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for count, res in groups:
        for k, v in res.items():
            need[k] = need.get(k, 0) + count * v
    short = {k: v for k, v in need.items() if v > have.get(k, 0) + 1e-9}
    if short:
        raise PipelineError("the Ray cluster is too small for this run: needs "
                            + ", ".join(f"{v:g} {k} (has {have.get(k, 0):g})" for k, v in short.items())
                            + f" for {what}")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for count, res in groups:
        res = {k: v for k, v in res.items() if v > 0}
        if count and res and not any(all(node.get(k, 0) + 1e-9 >= v for k, v in res.items()) for node in nodes):
            largest = max(nodes, key=lambda node: tuple(node.get(k, 0) for k in res), default={})
            raise PipelineError("the Ray cluster is too small for this run: no one node has "
                                + ", ".join(f"{v:g} {k}" for k, v in res.items()) + " (the largest has "
                                + ", ".join(f"{largest.get(k, 0):g} {k}" for k in res) + f") for {what}")


def check_resources(cfg: RunConfig, actors: int, *, workers: int | None = None, driver_cpus: float = 0.0) -> None:
    """``workers`` training workers (default: distributed.num_workers), ``actors`` reference actors and
    ``driver_cpus`` more (a sweep trial's own) must fit in the cluster."""
    d, r = cfg.distributed, cfg.reference
    workers = d.num_workers if workers is None else workers
    require_resources(
        [(1, {"CPU": driver_cpus}), (workers, {"CPU": d.cpus_per_worker, "GPU": float(d.use_gpu)}),
         (actors, {"CPU": r.cpus_per_actor, "GPU": r.gpus_per_actor})],
        (f"sweep.trial_cpus={driver_cpus:g}, " if driver_cpus else "")
        + f"{workers} worker(s) x distributed.cpus_per_worker={d.cpus_per_worker:g} (use_gpu={d.use_gpu})"
        f" and {actors} reference actor(s) x reference.cpus_per_actor={r.cpus_per_actor:g},"
        f" gpus_per_actor={r.gpus_per_actor:g}")


def ray_train_defaults() -> None:
    """Ray Train settings for every TorchTrainer the pipeline starts, unless the user set them. Ray Train
    passes them on from the process that calls ``fit`` to its controller and workers."""
    # The controller takes a worker's report (and notices failures and the end) when it polls, every
    # 2 s by default; a worker reporting faster waits. Polled every 0.5 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The print patch sends each of tqdm_ray's state lines to stdout *and* to Ray Train's logger
    # (stderr): the driver then sees a bar's closing state twice and re-creates the bar it had just
    # closed, which stays drawn for the rest of the driver's life. Off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray Train 2.60 starts a PreemptionWatcher actor per worker group, polling the GCS for node
    # drains (a cloud autoscaler reclaiming spot/preemptible nodes). It is created with
    # max_restarts=-1 and the workers' actor handles as arguments, so the controller's core worker
    # logs an ERROR for it at every fit ("... constructor arguments in the object store and
    # max_restarts > 0", core_worker.cc), though nothing is wrong. No node of ours is preemptible:
    # off. A cluster of spot nodes sets RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def quiet_train_reports() -> None:
    """Ray Train V2 logs every ``ray.train.report`` call (the whole metrics dict) at INFO from each
    worker; progress bars and MLflow already carry those numbers. Its logger is named by file path."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # "Checkpoint successfully created at: ..." at INFO from every worker, for every checkpoint.
    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)


def actor_restarted() -> bool:
    """In a Ray actor: whether it is a restart of one that died (the GCS's restart count is not 0).
    ``RuntimeContext.was_current_actor_reconstructed`` asks the same but reads Ray's own deprecated
    ``actor_id`` property on the way (ray/runtime_context.py:468 in Ray 2.60), printing a
    RayDeprecationWarning in every actor that asks; this asks by ``get_actor_id()``."""
    import ray
    from ray._private.state import actors  # what was_current_actor_reconstructed calls

    actor_id = ray.get_runtime_context().get_actor_id()
    if actor_id is None:
        raise RuntimeError("actor_restarted() called outside a Ray actor")
    info = actors(actor_id=actor_id)
    return bool(info) and info["NumRestarts"] != 0
