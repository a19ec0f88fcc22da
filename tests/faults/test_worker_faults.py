"""Training workers dying and checkpoints going bad, on a real local Ray cluster (2 DeepSpeed workers).

The promise: a run that loses a worker at any step resumes from its newest good checkpoint and ends
with the same weights as an uninterrupted run, having trained on every scheduled pair exactly as
often as scheduled (``trained_pairs.json``, each rank's ledger carried in the checkpoints).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.train.distributed import consumption_order, train_distributed
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.usefixtures("ray_cluster")

STEPS, PAIRS = 8, 16
COMMON = [f"train.max_steps={STEPS}", "train.warmup_steps=1", f"data.limit={PAIRS}", "loss.name=dpo",
          "distributed.num_workers=2", "distributed.checkpoint_every=2", "distributed.max_failures=2",
          "reference.num_actors=1", "reference.cpus_per_actor=0.5"]


def config(tmp_path: Path, name: str):
    return load_config(TINY_CONFIG, [*COMMON, f"output.dir={tmp_path}", f"output.run_name={name}"])


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return train_distributed(config(out, "clean"), progress=False)


def assert_same_training(result, clean, cfg) -> None:
    """Same weights as the uninterrupted run, and every scheduled pair trained exactly as often as
    scheduled: none skipped, none repeated."""
    scheduled = Counter(consumption_order(cfg, PAIRS))
    assert result.trained_pairs == [scheduled[i] for i in range(PAIRS)]
    assert sum(result.trained_pairs) == STEPS * 8  # 2 workers x 4 pairs a step
    a, b = weights(clean), weights(result)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in clean.history], abs=1e-6)


def restores(result) -> list[dict]:
    path = result.run_dir / "restores.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_the_uninterrupted_run_counts_its_pairs(clean):
    cfg = config(clean.run_dir.parent, "clean")
    assert_same_training(clean, clean, cfg)
    assert restores(clean) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_worker_sigkilled_at_a_random_step_resumes_exactly(seed, tmp_path, clean):
    rng = random.Random(seed)
    step, rank, delay = rng.randrange(1, STEPS), rng.randrange(2), rng.choice([0.0, 1.5])
    cfg = config(tmp_path, f"killed-{seed}")
    killed = train_distributed(cfg, progress=False,
                               faults={"kill_worker": {"rank": rank, "step": step, "delay_s": delay}})
    print(f"\nseed {seed}: rank {rank} killed at the start of step {step + 1} after {delay} s; restores: "
          f"{[r['step'] for r in restores(killed)]}")
    assert (killed.run_dir / f".fault-kill-worker-{rank}-{step}").exists()  # it did die
    # Resumed from a checkpoint at or before the step it died in (none before step 2: from scratch).
    assert all(r["step"] <= step and r["step"] % 2 == 0 and not r["skipped"] for r in restores(killed))
    assert_same_training(killed, clean, cfg)


def test_a_truncated_checkpoint_is_passed_over_for_the_previous_good_one(tmp_path, clean):
    cfg = config(tmp_path, "truncated")
    # At the start of step 6 (checkpoints of steps 2 and 4 stored): cut step 4's model file, then die.
    result = train_distributed(cfg, progress=False, faults={
        "kill_worker": {"rank": 0, "step": 5, "delay_s": 2.0, "truncate_latest": True}})
    [restore] = restores(result)
    assert restore["step"] == 2
    [skipped] = restore["skipped"]
    assert "mp_rank_00_model_states.pt is truncated" in skipped["problem"], skipped
    assert_same_training(result, clean, cfg)
