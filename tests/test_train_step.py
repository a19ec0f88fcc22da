"""The single-process step: the correctness reference for the distributed trainer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.testing import assert_close

from pipeline import tokenstats
from pipeline.config import load_config
from pipeline.data.normalize import normalize_record
from pipeline.data.tokenization import PairTokenizer, collate_pairs
from pipeline.losses import LossParams, PreferenceStats, loss_from_logits
from pipeline.models.forward import response_logits
from pipeline.models.loading import load_causal_lm
from pipeline.reference.scorer import ReferenceScorer
from pipeline.train.batches import BatchPosition, PairBatches
from pipeline.train.local import train_local
from pipeline.train.step import StepOptions, optimizer_step, policy_stats
from tests.conftest import STANDARD_ROWS, TINY_CONFIG, run_module


@pytest.fixture
def pairs(tiny_tokenizer):
    tok = PairTokenizer(tiny_tokenizer, max_length=64)
    return [tok(normalize_record(i + 1, r)) for i, r in enumerate(STANDARD_ROWS)]


def with_reference(reference, batches):
    """(batch, live exact reference statistics) for each batch, as the single-process trainer does."""
    scorer = ReferenceScorer(reference, "exact")
    return [(b, scorer.score(b)) for b in batches]


def models(dtype="float64"):
    policy = load_causal_lm("builtin:tiny", dtype=dtype)
    return policy, copy.deepcopy(policy).eval().requires_grad_(False)



def batch_stats(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    token_level: bool,
    log_kl: bool = True,
) -> PreferenceStats:
    """Policy (with gradient) and live reference (exact, float32) statistics of one collated batch: the
    step's statistics assembled by hand, to check them against the loss computed from full logits."""
    index = tokenstats.response_index(batch["labels"])
    kind = "exact" if token_level or log_kl else "sequence"
    return policy_stats(response_logits(policy, batch, index.mask), index,
                        ReferenceScorer(reference, kind).score(batch), token_level, log_kl)


def test_packed_head_equals_full_logits(pairs, tiny_tokenizer):
    policy, _ = models()
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    index = tokenstats.response_index(batch["labels"])
    full = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_close(response_logits(policy, batch, index.mask), tokenstats.pack(full, index))


@pytest.mark.parametrize("loss", ["dpo", "tdpo2"])
def test_batch_stats_agree_with_loss_from_logits(loss, pairs, tiny_tokenizer):
    policy, reference = models()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    from pipeline.losses import compute_loss

    stats = batch_stats(policy, reference, batch, token_level=loss == "tdpo2")
    ours, _ = compute_loss(loss, stats, LossParams(beta=0.1))
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    pol, ref = policy(**kw).logits, reference(**kw).logits
    b, labels = len(pairs), batch["labels"]
    expected = loss_from_logits(loss, policy_chosen_logits=pol[:b], policy_rejected_logits=pol[b:],
                                reference_chosen_logits=ref[:b], reference_rejected_logits=ref[b:],
                                chosen_labels=labels[:b], rejected_labels=labels[b:], beta=0.1)
    assert_close(ours, expected)


@pytest.mark.parametrize("loss", ["dpo", "tdpo2"])
def test_loss_decreases_on_the_tiny_model(loss, pairs, tiny_tokenizer):
    policy, reference = models("float32")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    options = StepOptions(loss=loss, params=LossParams(beta=0.5, alpha=0.5))
    history = [optimizer_step(policy, optimizer, with_reference(reference, [batch]), options, max_grad_norm=1.0) for _ in range(15)]
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: -log sigmoid(0)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["rewards/accuracies"] == 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


@pytest.mark.parametrize("loss", ["dpo", "tdpo2"])
def test_accumulation_1x4_equals_4x1(loss, pairs, tiny_tokenizer):
    """One micro-batch of 4 pairs and four of 1 pair give the same weights (float64, 2 AdamW steps)."""
    options = StepOptions(loss=loss, params=LossParams(beta=0.5))
    one_by_four = [collate_pairs(pairs, tiny_tokenizer.pad_token_id)]
    four_by_one = [collate_pairs([p], tiny_tokenizer.pad_token_id) for p in pairs]  # each padded differently
    results = []
    for micro in (one_by_four, four_by_one):
        policy, reference = models()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        for _ in range(2):
            metrics = optimizer_step(policy, optimizer, with_reference(reference, micro), options, max_grad_norm=1.0)
        results.append((policy, metrics))
    (a, ma), (b, mb) = results
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(x, y, rtol=1e-9, atol=1e-12, msg=name)
    for key in ma:
        assert ma[key] == pytest.approx(mb[key], rel=1e-9, abs=1e-12), key


def test_batches_resume_at_any_position():
    batches = PairBatches(num_pairs=10, batch_size=3, seed=4)
    stream = batches.iterate()
    full = [next(stream) for _ in range(8)]
    assert full[3][0] == BatchPosition(epoch=1, batch=0)  # 3 batches per epoch, the 10th pair waits
    resumed = batches.iterate(full[5][0])
    assert [next(resumed) for _ in range(3)] == full[5:8]
    epoch0 = sum((ix for _, ix in full[:3]), [])
    assert len(set(epoch0)) == 9  # within an epoch no pair repeats
    assert [ix for _, ix in full[:3]] != [ix for _, ix in full[3:6]]  # each epoch has its own order
    with pytest.raises(ValueError, match="fewer than one batch"):
        PairBatches(num_pairs=2, batch_size=3, seed=0)


def test_train_local_writes_its_outputs(tmp_path):
    cfg = load_config(TINY_CONFIG,
                      [f"output.dir={tmp_path}", "output.run_name=t", "loss.name=tdpo2", "train.max_steps=3"])
    result = train_local(cfg, progress=False)
    run = tmp_path / "t"
    assert result.run_dir == run
    assert load_config(run / "config.yaml") == cfg
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"loss", "rewards/margins", "kl/chosen", "kl/margin", "lr", "grad_norm"} <= set(lines[0])
    report = json.loads((run / "data_report.json").read_text())
    assert report["rows"] == 100 and report["valid_rows"] == 100
    reloaded = load_causal_lm(str(run / "model"))
    state = reloaded.state_dict()
    assert (run / "model" / "model.safetensors").is_file() and len(state) > 0


def run_job(*args):
    return run_module("jobs.train", *args)


def test_train_job_end_to_end(tmp_path):
    out = run_job("--config", "configs/tiny.yaml", f"output.dir={tmp_path}", "train.max_steps=2", "train.save_model=false",
                  "distributed.enabled=false")  # the Ray path: tests/test_job_submit.py
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["steps"] == 2 and summary["seconds_per_step"] > 0


def test_train_job_bad_config_fails_before_work(tmp_path):
    out = run_job("--config", "configs/tiny.yaml", f"output.dir={tmp_path}", "loss.beta=-1", "loss.nme=x")
    assert out.returncode == 2
    assert "loss.beta: Input should be greater than 0" in out.stderr and "loss.nme: unknown key" in out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_train_job_bad_data_fails_before_models_load(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    out = run_job("--config", "configs/tiny.yaml", f"output.dir={tmp_path / 'out'}", f"data.source={bad}")
    assert out.returncode == 2
    assert "row 1, field 'rejected': missing" in out.stderr and "Traceback" not in out.stderr
