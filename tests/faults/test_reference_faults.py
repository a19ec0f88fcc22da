"""A reference actor killed mid-stream, on the session's Ray cluster: Ray replaces it, its in-flight
chunks are computed again, and the run's result is unchanged to the last bit."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.distributed import RunHooks, train_distributed
from tests.faults.injection import KillReference
from tests.test_distributed import distributed_cfg, losses, weights

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_reference_actor_killed_mid_run_is_replaced(tmp_path):
    common = ("loss.name=tdpo2", "reference.cache=false")
    clean = train_distributed(distributed_cfg(tmp_path, "clean", *common), progress=False)
    killed = train_distributed(distributed_cfg(tmp_path, "killed", *common), progress=False,
                               hooks=RunHooks(reference_task=KillReference(actor=0, task=1)))
    assert killed.reference_restarts == 1
    assert clean.reference_restarts == 0
    assert losses(killed) == losses(clean)
    a, b = weights(clean.model_dir), weights(killed.model_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
