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
from pipeline.models.loading import load_causal_lm
from pipeline.reference.scorer import ReferenceScorer
from pipeline.train.packing import pack_batch, packing_supported
from pipeline.train.step import StepOptions, optimizer_step, response_logits
from tests.conftest import STANDARD_ROWS


@pytest.fixture
def batch(tiny_tokenizer):
    tok = PairTokenizer(tiny_tokenizer, max_length=64)
    pairs = [tok(normalize_record(i + 1, r)) for i, r in enumerate(STANDARD_ROWS)]
    return collate_pairs(pairs, tiny_tokenizer.pad_token_id)


def test_layout_places_every_token_once_with_its_own_positions():
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12], [13, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    packed = pack_batch({"input_ids": ids, "attention_mask": mask}, width=6)
    # first-fit decreasing over lengths [4, 2, 6, 1] in rows of 6: [7..12], [1..4, 5, 6], [13]
    assert packed["packed_input_ids"].tolist() == [[7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6], [13, 0, 0, 0, 0, 0]]
    assert packed["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4]]
    assert packed["packed_slots"].tolist() == [[6, 7, 8, 9, -1, -1], [10, 11, -1, -1, -1, -1],
                                               [0, 1, 2, 3, 4, 5], [12, -1, -1, -1, -1, -1]]
    flat = packed["packed_input_ids"].view(-1)
    real = mask.bool()
    assert torch.equal(flat[packed["packed_slots"][real]], ids[real])


def test_default_width_is_twice_the_padded_width(batch):
    packed = pack_batch(batch)
    width = batch["input_ids"].shape[1]
    assert packed["packed_input_ids"].shape[1] == 2 * width
    assert packed["packed_input_ids"].shape[0] < batch["input_ids"].shape[0]


def test_left_padding_is_refused():
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch({"input_ids": ids, "attention_mask": (ids != 0).long()})


@pytest.mark.parametrize("width", [None, 10_000])
def test_packed_response_logits_equal_padded(batch, width):
    policy = load_causal_lm("builtin:tiny", dtype="float64")
    index = tokenstats.response_index(batch["labels"])
    packed = pack_batch(batch, width)
    assert packed["packed_input_ids"].shape[0] < batch["input_ids"].shape[0]  # sequences really share rows
    with torch.no_grad():
        assert_close(response_logits(policy, packed, index.mask), response_logits(policy, batch, index.mask))


@pytest.mark.parametrize("loss", ["dpo", "tdpo2"])
def test_packed_step_equals_padded_step(batch, loss):
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
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        metrics = optimizer_step(model, optimizer, [(step_batch, scorer.score(step_batch))], options, max_grad_norm=1.0)
        results.append((metrics, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (padded_metrics, padded_params), (packed_metrics, packed_params) = results
    assert packed_metrics.keys() == padded_metrics.keys()
    for key in padded_metrics:
        assert packed_metrics[key] == pytest.approx(padded_metrics[key], rel=1e-9, abs=1e-12), key
    assert_close(packed_params, padded_params, rtol=1e-9, atol=1e-12)


class _LeakyLM(torch.nn.Module):
    """Each position's logits depend on every earlier token in its row, whatever position_ids say."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.head = torch.nn.Linear(8, 32)

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
