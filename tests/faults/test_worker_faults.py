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
from pipeline.errors import PipelineError
from pipeline.train.distributed import RunHooks, consumption_order, train_distributed
from tests.conftest import TINY_CONFIG
from tests.faults.injection import Each, KillWorker

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


def test_workers_sigkilled_at_three_random_steps_resume_exactly_each_time(tmp_path, clean):
    """Three kills in one run, at seeded random distinct steps (any rank, with or without a delay before
    the kill): after each, the group resumes from a checkpoint at or before the step it died in (none
    before step 2: from scratch), and the run still ends as the uninterrupted one did."""
    rng = random.Random(0)
    kills = [KillWorker(rng.randrange(2), step, delay_s=rng.choice([0.0, 1.5]))
             for step in sorted(rng.sample(range(1, STEPS), 3))]
    cfg = load_config(TINY_CONFIG, [*COMMON, "distributed.max_failures=3", f"output.dir={tmp_path}",
                                    "output.run_name=killed"])
    killed = train_distributed(cfg, progress=False, hooks=RunHooks(worker_step=Each(kills)))
    print("\n" + "; ".join(f"rank {k.rank} killed at the start of step {k.step + 1} after {k.delay_s} s" for k in kills)
          + f"; restores: {[r['step'] for r in restores(killed)]}")
    assert all(k.marker(killed.run_dir).exists() for k in kills)  # each did die
    done = restores(killed)
    assert len(done) == len(kills)
    for kill, restore in zip(kills, done, strict=True):
        assert restore["step"] <= kill.step and restore["step"] % 2 == 0 and not restore["skipped"], restore
    assert_same_training(killed, clean, cfg)


def test_a_truncated_checkpoint_is_passed_over_for_the_previous_good_one(tmp_path, clean):
    cfg = config(tmp_path, "truncated")
    # At the start of step 6 (checkpoints of steps 2 and 4 stored): cut step 4's model file, then die.
    result = train_distributed(cfg, progress=False, hooks=RunHooks(
        worker_step=KillWorker(rank=0, step=5, delay_s=2.0, truncate_latest=True)))
    [restore] = restores(result)
    assert restore["step"] == 2
    [skipped] = restore["skipped"]
    assert "mp_rank_00_model_states.pt is truncated" in skipped["problem"], skipped
    assert_same_training(result, clean, cfg)


def test_a_finished_run_keeps_its_model_drops_its_checkpoints_and_a_rerun_trains_nothing(clean):
    """distributed.keep_final_checkpoint=false (the default): the exported model stays, the DeepSpeed state
    goes. Rerunning the same command is then a no-op that returns the same result; asking that run to
    train further is refused before any work, since the state it would resume from is gone."""
    assert [p for p in clean.run_dir.glob("checkpoint_*") if p.is_dir()] == [] and clean.checkpoint is None
    assert (clean.run_dir / "finished.json").is_file() and (clean.model_dir / "model.safetensors").is_file()
    cfg = config(clean.run_dir.parent, "clean")
    before = weights(clean)
    again = train_distributed(cfg, progress=False)
    assert again.history == clean.history and again.trained_pairs == clean.trained_pairs
    assert again.reference_forward_passes == 0
    after = weights(again)
    assert all(torch.equal(before[k], after[k]) for k in before)
    longer = load_config(TINY_CONFIG, [*COMMON, f"output.dir={clean.run_dir.parent}", "output.run_name=clean",
                                       f"train.max_steps={STEPS + 2}"])
    with pytest.raises(PipelineError, match=rf"run clean in .* finished at step {STEPS} and dropped its final "
                                            rf"checkpoint .*train.max_steps={STEPS + 2}"):
        train_distributed(longer, progress=False)
