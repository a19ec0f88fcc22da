"""Padding-free packing: the layout is exact, and a packed step equals a padded one."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from pipeline import tokenstats
from pipeline.data.normalize import normalize_record
from pipeline.data.tokenization import PairTokenizer, collate_pairs
from pipeline.losses import LossParams
from pipeline.models.forward import response_logits
from pipeline.models.loading import load_causal_lm
from pipeline.models.packing import pack_batch, packing_supported
from pipeline.reference.scorer import ReferenceScorer
from pipeline.train.step import StepOptions, accumulate_gradients, mean_metrics
from tests.conftest import STANDARD_ROWS


@pytest.fixture
def batch(tiny_tokenizer):
    tok = PairTokenizer(tiny_tokenizer, max_length=64)
    pairs = [tok(normalize_record(i + 1, r)) for i, r in enumerate(STANDARD_ROWS)]
    return collate_pairs(pairs, tiny_tokenizer.pad_token_id)


def test_layout_shares_each_pairs_prompt_and_masks_the_other_response():
    # rows 0 and 2 are a pair with prompt [1, 2]; rows 1 and 3 have different prompts: units of their own
    ids = torch.tensor([[1, 2, 3, 4, 0], [9, 8, 7, 6, 5], [1, 2, 5, 0, 0], [9, 4, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, -100, 6, 5],
                           [-100, -100, 5, -100, -100], [-100, 4, -100, -100, -100]])
    packed = pack_batch({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}, width=8)
    # units [1 2 3 4 | 5] (5), [9 8 7 6 5] (5), [9 4] (2), first-fit decreasing in rows of 8
    assert packed["packed_input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 4, 0], [9, 8, 7, 6, 5, 0, 0, 0]]
    # the rejected response continues from the prompt's end, as in its padded row; filler counts on
    assert packed["packed_position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert packed["packed_slots"].tolist() == [[0, 1, 2, 3, -1], [8, 9, 10, 11, 12], [0, 1, 4, -1, -1],
                                               [5, 6, -1, -1, -1]]
    allowed = packed["packed_attention_mask"][0, 0].int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1, 0, 0, 0]  # rejected token: the prompt and itself, never chosen
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # chosen token: prompt and chosen so far
    assert allowed[6] == [0, 0, 0, 0, 0, 1, 1, 0]  # another unit: nothing of the first
    assert allowed[7] == [0, 0, 0, 0, 0, 0, 0, 1]  # filler: itself only
    real = ids != 0
    flat = packed["packed_input_ids"].view(-1)
    assert torch.equal(flat[packed["packed_slots"][real]], ids[real])


def test_default_packing_computes_each_prompt_once_in_one_row_without_filler(batch):
    packed = pack_batch(batch)
    pairs = batch["input_ids"].shape[0] // 2
    prompts = (batch["labels"][:pairs] == -100).logical_and(batch["attention_mask"][:pairs].bool()).sum()
    filler = int((packed["packed_slots"] >= 0).sum())  # real (row, token) places, prompts counted twice
    distinct = int(torch.unique(packed["packed_slots"][packed["packed_slots"] >= 0]).numel())
    assert distinct == filler - int(prompts)  # each pair's prompt tokens sit in one slot, shared
    assert packed["packed_input_ids"].shape == (1, distinct)  # one row, every position a real token
    capped = pack_batch(batch, max_width=distinct // 2)
    rows, width = capped["packed_input_ids"].shape
    assert rows >= 2 and width >= distinct // 2


def test_left_padding_is_refused():
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch({"input_ids": ids, "attention_mask": (ids != 0).long()})


@pytest.mark.parametrize("width", [None, 1])  # one row; a row per unit (width = the longest unit)
def test_packed_response_logits_equal_padded(batch, width):
    policy = load_causal_lm("builtin:tiny", dtype="float64")
    index = tokenstats.response_index(batch["labels"])
    packed = pack_batch(batch, width)
    assert packed["packed_input_ids"].shape[0] < batch["input_ids"].shape[0]  # sequences really share rows
    with torch.no_grad():
        assert_close(response_logits(policy, packed, index.mask), response_logits(policy, batch, index.mask))


@pytest.mark.parametrize("loss", ["dpo", "tdpo2"])
def test_packed_step_equals_padded_step(batch, loss):
    """Same losses, metrics and gradients (float64; a shared prompt's gradient is summed in one pass
    instead of two, so agreement is to rounding, not bit for bit)."""
    policy = load_causal_lm("builtin:tiny", dtype="float64")
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    options = StepOptions(loss=loss, params=LossParams(beta=0.1, alpha=0.5))
    results = []
    for packing in (False, True):
        model = copy.deepcopy(policy)
        scorer = ReferenceScorer(reference, "exact", packing=packing)
        step_batch = pack_batch(batch) if packing else batch
        metrics = accumulate_gradients(model, [(step_batch, scorer.score(step_batch))], options)
        results.append((mean_metrics(metrics), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (padded_metrics, padded_grads), (packed_metrics, packed_grads) = results
    assert packed_metrics.keys() == padded_metrics.keys()
    for key in padded_metrics:
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], rel=1e-9, abs=1e-12), key
    assert float(padded_grads.abs().max()) > 1e-3  # a real gradient, not zeros
    assert_close(packed_grads, padded_grads, rtol=1e-6, atol=1e-7)  # gradients reach ~0.1


class _LeakyLM(torch.nn.Module):
    """Each position's logits depend on every earlier token in its row, whatever position_ids say."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)
        self.config = SimpleNamespace()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        hidden = self.embed(input_ids).cumsum(dim=1)
        return SimpleNamespace(logits=self.head(hidden))


def test_packing_check_accepts_the_tiny_model_and_rejects_a_leaky_one():
    assert packing_supported(load_causal_lm("builtin:tiny", dtype="float32"))
    leaky = _LeakyLM()
    assert not packing_supported(leaky)
    assert leaky.training  # the check restores the model's mode
    scorer = ReferenceScorer(leaky, "sequence")
    assert not scorer.packing


def test_a_reference_that_fails_the_check_scores_a_packed_batch_padded(batch):
    """The policy packs the batch; a reference whose attention would leak must still see it padded."""
    leaky = _LeakyLM()
    ids = batch["input_ids"].remainder(32)
    small = {**batch, "input_ids": ids, "labels": torch.where(batch["labels"] >= 0, ids, batch["labels"])}
    scorer = ReferenceScorer(leaky, "sequence")
    assert_close(scorer.score(pack_batch(small)).logps, scorer.score(small).logps)


def test_sliding_window_models_run_padded():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    assert not packing_supported(MistralForCausalLM(config))
    config.sliding_window = None
    assert packing_supported(MistralForCausalLM(config))
