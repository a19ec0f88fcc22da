"""Token statistics: shift conventions, stable KL, top-k compression."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from pipeline import tokenstats


def test_sequence_logps_by_hand():
    # V = 2; uniform logits everywhere: each response token has log-prob log(1/2).
    logits = torch.zeros(1, 5, 2, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 1, 0, -100]])  # 2 response tokens (positions 2, 3)
    assert sequence_logps_value(logits, labels) == pytest.approx(2 * math.log(0.5))


def sequence_logps_value(logits, labels) -> float:
    return tokenstats.sequence_logps(logits, labels).item()


def test_shift_uses_the_previous_position():
    """Position t predicts token t+1: only the logits *before* a response token matter."""
    labels = torch.tensor([[-100, 1]])
    logits = torch.zeros(1, 2, 2, dtype=torch.float64)
    logits[0, 0, 1] = 5.0  # position 0 predicts token 1 with high probability
    logits[0, 1, 0] = 100.0  # the last position predicts nothing and must be ignored
    expected = 5.0 - math.log(1 + math.exp(5.0))
    assert sequence_logps_value(logits, labels) == pytest.approx(expected, rel=1e-12)


def test_response_index():
    labels = torch.tensor([[-100, 7, 8, -100], [-100, -100, -100, 9]])
    index = tokenstats.response_index(labels)
    assert index.targets.tolist() == [7, 8, 9]
    assert index.segments.tolist() == [0, 0, 1]
    assert index.lengths.tolist() == [2, 1]


def test_position_kl_by_hand():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    expected = (p * (p / q).log()).sum()
    assert_close(tokenstats.position_kl(p.log(), q.log()), expected)


def test_position_kl_properties():
    torch.manual_seed(0)
    a, b = torch.randn(50, 30, dtype=torch.float64), torch.randn(50, 30, dtype=torch.float64)
    kl = tokenstats.position_kl(a, b)
    assert (kl >= 0).all()
    assert_close(tokenstats.position_kl(a, a), torch.zeros(50, dtype=torch.float64))
    assert_close(tokenstats.position_kl(a + 3.0, b - 2.0), kl)  # invariant to logit shifts


def test_position_kl_is_finite_on_peaked_logits():
    """A reference that puts ~all mass on one token: softmax().log() gives 0 * -inf = NaN here."""
    ref = torch.tensor([[0.0, -1e4, -1e4]])
    pol = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    naive = (ref.softmax(-1) * (ref.softmax(-1).log() - pol.log_softmax(-1))).sum(-1)
    assert torch.isnan(naive).all()  # the failure mode this module exists to avoid
    kl = tokenstats.position_kl(ref, pol)
    assert kl.item() == pytest.approx(math.log(3), rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(pol.grad).all()


def test_topk_lower_bounds_exact_kl_and_equals_it_at_full_k():
    torch.manual_seed(1)
    ref, pol = 3 * torch.randn(40, 64, dtype=torch.float64), 3 * torch.randn(40, 64, dtype=torch.float64)
    exact = tokenstats.position_kl(ref, pol)
    for k in (1, 4, 16, 63):
        coarse = tokenstats.topk_position_kl(tokenstats.topk_compress(ref, k), pol)
        assert (coarse <= exact + 1e-9).all(), k
    full = tokenstats.topk_compress(ref, 64)
    assert torch.isneginf(full.tail_logp).all() or (full.tail_logp < -30).all()
    assert_close(tokenstats.topk_position_kl(full, pol), exact)


def test_topk_tail_mass():
    probs = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    top = tokenstats.topk_compress(probs.log(), 2)
    assert top.ids.tolist() == [[0, 1]]
    assert top.tail_logp.exp().item() == pytest.approx(0.1, rel=1e-9)
    with pytest.raises(ValueError):
        tokenstats.topk_compress(probs.log(), 4)


def test_half_precision_logits_are_computed_in_float32():
    """bf16 logits (as a bf16 model emits them) give float32 statistics as exact as those logits allow."""
    torch.manual_seed(2)
    ref = (3 * torch.randn(32, 4096)).bfloat16()
    pol = (ref.float() + 0.05 * torch.randn(32, 4096)).bfloat16()
    targets = torch.randint(0, 4096, (32,))
    kl = tokenstats.position_kl(ref, pol)
    logps = tokenstats.token_logps(pol, targets)
    assert kl.dtype == logps.dtype == torch.float32
    exact_kl = tokenstats.position_kl(ref.double(), pol.double())
    assert_close(kl.double(), exact_kl, rtol=1e-3, atol=0)  # in bf16 arithmetic this was off by 18x
    assert_close(logps.double(), tokenstats.token_logps(pol.double(), targets), rtol=0, atol=1e-4)
