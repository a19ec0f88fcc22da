"""The loss family against hand-computed numbers, an independent naive implementation, and its limits."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline import config
from pipeline.losses import (
    LOSSES,
    LossParams,
    PreferenceStats,
    compute_loss,
    get_loss,
    loss_from_logits,
    stats_from_logits,
)

ALL = list(LOSSES)


def stats(pc, pr, rc, rr, lc=(1,), lr=(1,), kc=None, kr=None) -> PreferenceStats:
    t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PreferenceStats(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr), t(kc), t(kr))


# ---------------------------------------------------------------- hand-computed values


def test_dpo_by_hand():
    # m_c = -1 - (-2) = 1, m_r = -3 - (-1) = -2, h = 3; beta 0.5: -log sigmoid(1.5)
    s = stats([-1.0], [-3.0], [-2.0], [-1.0])
    loss = get_loss("dpo").fn(s, LossParams(beta=0.5))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-12)


def test_cdpo_by_hand():
    s = stats([-1.0], [-3.0], [-2.0], [-1.0])  # h = 3
    loss = get_loss("cdpo").fn(s, LossParams(beta=0.5, label_smoothing=0.2))
    expected = 0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(1.5))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ipo_by_hand_averages_per_token():
    # chosen: ratio 1 over 2 tokens -> 0.5; rejected: ratio -2 over 4 tokens -> -0.5; h' = 1
    s = stats([-1.0], [-3.0], [-2.0], [-1.0], lc=[2], lr=[4])
    loss = get_loss("ipo").fn(s, LossParams(beta=0.25))  # 1/(2 beta) = 2
    assert loss.item() == pytest.approx((1 - 2) ** 2, rel=1e-12)


def test_hinge_by_hand():
    s = stats([-1.0, -1.0], [-3.0, -1.0], [-2.0, -1.0], [-1.0, -1.5])  # h = 3 and -0.5
    loss = get_loss("hinge").fn(s, LossParams(beta=0.5))
    assert loss.tolist() == pytest.approx([0.0, 1.25], rel=1e-12)


def test_tdpo1_by_hand():
    # h = 3; SeqKL_r - SeqKL_c = 0.7 - 0.2 = 0.5; beta 0.5: -log sigmoid(0.5 * 2.5)
    s = stats([-1.0], [-3.0], [-2.0], [-1.0], kc=[0.2], kr=[0.7])
    loss = get_loss("tdpo1").fn(s, LossParams(beta=0.5))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.25)), rel=1e-12)


def test_tdpo2_by_hand():
    # h = 3; alpha 0.4 * 0.5 = 0.2; beta 0.5: -log sigmoid(0.5 * 2.8)
    s = stats([-1.0], [-3.0], [-2.0], [-1.0], kc=[0.2], kr=[0.7])
    loss = get_loss("tdpo2").fn(s, LossParams(beta=0.5, alpha=0.4))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.4)), rel=1e-12)


def test_tdpo_gradient_through_kl_terms():
    """TDPO1 pushes on both KLs; TDPO2 stops the gradient of the chosen KL (TDPO eq. 20)."""
    kc = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    kr = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    s = PreferenceStats(t([-1.0]), t([-3.0]), t([-2.0]), t([-1.0]), t([1]), t([1]), kc, kr)
    beta, alpha = 0.5, 0.4
    get_loss("tdpo2").fn(s, LossParams(beta=beta, alpha=alpha)).sum().backward()
    z = beta * (3 - alpha * 0.5)
    assert kc.grad is None  # no path from the loss to the chosen KL
    # d/dkr -log sigmoid(beta (h - alpha (kr - kc))) = beta * alpha * sigmoid(-z)
    assert kr.grad.item() == pytest.approx(beta * alpha / (1 + math.exp(z)), rel=1e-12)
    kc.grad, kr.grad = None, None
    get_loss("tdpo1").fn(s, LossParams(beta=beta)).sum().backward()
    z1 = beta * (3 - 0.5)
    assert kc.grad.item() == pytest.approx(-beta / (1 + math.exp(z1)), rel=1e-12)
    assert kr.grad.item() == pytest.approx(beta / (1 + math.exp(z1)), rel=1e-12)


# ---------------------------------------------------------------- limiting cases


def test_tdpo_with_zero_kl_equals_dpo():
    s = stats([-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.5], [-1.0, -2.5], kc=[0.0, 0.0], kr=[0.0, 0.0])
    p = LossParams(beta=0.3, alpha=0.7)
    dpo = get_loss("dpo").fn(s, p)
    assert_close(get_loss("tdpo1").fn(s, p), dpo, rtol=0, atol=0)
    assert_close(get_loss("tdpo2").fn(s, p), dpo, rtol=0, atol=0)


def test_tdpo2_with_alpha_zero_equals_dpo():
    s = stats([-1.0], [-3.0], [-2.0], [-1.0], kc=[0.3], kr=[0.9])
    assert_close(get_loss("tdpo2").fn(s, LossParams(beta=0.3, alpha=0.0)), get_loss("dpo").fn(s, LossParams(beta=0.3)))


def test_cdpo_with_eps_zero_equals_dpo():
    s = stats([-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.5], [-1.0, -2.5])
    p = LossParams(beta=0.3, label_smoothing=0.0)
    assert_close(get_loss("cdpo").fn(s, p), get_loss("dpo").fn(s, p), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_policy_equal_to_reference(name):
    """At initialisation (policy == reference) every log-ratio and KL is zero."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, 8, 0, 7]])
    loss = loss_from_logits(name, policy_chosen_logits=logits, policy_rejected_logits=logits.flip(0),
                            reference_chosen_logits=logits, reference_rejected_logits=logits.flip(0),
                            chosen_labels=labels, rejected_labels=labels.flip(0), beta=0.25)
    expected = {"ipo": (1 / 0.5) ** 2, "hinge": 1.0}.get(name, math.log(2))
    assert_close(loss, torch.full((2,), expected, dtype=torch.float64))


# ---------------------------------------------------------------- loss_from_logits vs a naive implementation


def naive_sequence_stats(policy: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor):
    """Loops over every position; log-probs via logsumexp; no packing, no log_softmax."""
    rows = []
    for b in range(labels.shape[0]):
        pol_sum = ref_sum = kl = policy.new_zeros(())
        n = 0
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            lp = policy[b, t] - torch.logsumexp(policy[b, t], dim=0)
            lr = (reference[b, t] - torch.logsumexp(reference[b, t], dim=0)).detach()
            pol_sum = pol_sum + lp[y]
            ref_sum = ref_sum + lr[y]
            kl = kl + (lr.exp() * (lr - lp)).sum()
            n += 1
        rows.append((pol_sum, ref_sum, n, kl))
    return rows


def naive_loss(name, pc, pr, rc, rr, labels_c, labels_r, beta, alpha, eps):
    out = []
    for (p_c, r_c, n_c, k_c), (p_r, r_r, n_r, k_r) in zip(
        naive_sequence_stats(pc, rc, labels_c), naive_sequence_stats(pr, rr, labels_r), strict=True
    ):
        h = (p_c - r_c) - (p_r - r_r)
        if name == "dpo":
            out.append(F.softplus(-beta * h))
        elif name == "cdpo":
            out.append((1 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h))
        elif name == "ipo":
            out.append(((p_c - r_c) / n_c - (p_r - r_r) / n_r - 1 / (2 * beta)) ** 2)
        elif name == "hinge":
            out.append(torch.clamp(1 - beta * h, min=0))
        elif name == "tdpo1":
            out.append(F.softplus(-beta * (h - (k_r - k_c))))
        elif name == "tdpo2":
            out.append(F.softplus(-beta * (h - alpha * (k_r - k_c.detach()))))
    return torch.stack(out)


def random_case(seed: int, scale: float, B=3, T=9, V=13):
    g = torch.Generator().manual_seed(seed)
    logits = [scale * torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(4)]
    labels = []
    for _ in range(2):
        ids = torch.randint(0, V, (B, T), generator=g)
        lab = ids.clone()
        for b in range(B):
            start = int(torch.randint(1, T - 2, (1,), generator=g))  # prompt length
            end = int(torch.randint(start + 1, T + 1, (1,), generator=g))  # then padding
            lab[b, :start] = -100
            lab[b, end:] = -100
        labels.append(lab)
    return logits, labels


@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["random", "extreme"])
@pytest.mark.parametrize("name", ALL)
def test_loss_from_logits_matches_formulas(name, scale):
    beta, alpha, eps = 0.1, 0.6, 0.15
    for seed in range(3):
        (pc, pr, rc, rr), (lc, lr) = random_case(seed, scale)
        pc.requires_grad_(True)
        pr.requires_grad_(True)
        ours = loss_from_logits(name, policy_chosen_logits=pc, policy_rejected_logits=pr,
                                reference_chosen_logits=rc, reference_rejected_logits=rr,
                                chosen_labels=lc, rejected_labels=lr, beta=beta, alpha=alpha, label_smoothing=eps)
        assert ours.shape == (3,) and torch.isfinite(ours).all()
        grads = torch.autograd.grad(ours.sum(), (pc, pr))
        ref = naive_loss(name, pc, pr, rc, rr, lc, lr, beta, alpha, eps)
        ref_grads = torch.autograd.grad(ref.sum(), (pc, pr))
        assert_close(ours, ref, rtol=1e-6, atol=1e-12)
        for g, rg in zip(grads, ref_grads, strict=True):
            assert torch.isfinite(g).all()
            assert_close(g, rg, rtol=1e-6, atol=1e-10)


def test_no_gradient_reaches_the_reference():
    (pc, pr, rc, rr), (lc, lr) = random_case(0, 1.0)
    for t in (pc, pr, rc, rr):
        t.requires_grad_(True)
    loss = loss_from_logits("tdpo1", policy_chosen_logits=pc, policy_rejected_logits=pr,
                            reference_chosen_logits=rc, reference_rejected_logits=rr,
                            chosen_labels=lc, rejected_labels=lr, beta=0.1)
    loss.sum().backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad.abs().sum() > 0


# ---------------------------------------------------------------- metrics and registry


def test_metrics_are_the_same_keys_for_every_loss():
    (pc, pr, rc, rr), (lc, lr) = random_case(1, 1.0)
    s = stats_from_logits(policy_chosen_logits=pc, policy_rejected_logits=pr, reference_chosen_logits=rc,
                          reference_rejected_logits=rr, chosen_labels=lc, rejected_labels=lr)
    keys = None
    for name in ALL:
        _, metrics = compute_loss(name, s, LossParams(beta=0.2))
        assert keys is None or set(metrics) == keys
        keys = set(metrics)
    assert keys == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "kl/chosen", "kl/rejected", "kl/margin", "logps/chosen", "logps/rejected"}
    _, m = compute_loss("dpo", s, LossParams(beta=0.2))
    assert_close(m["rewards/chosen"], 0.2 * (s.policy_chosen_logps - s.reference_chosen_logps))
    assert_close(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"])
    assert_close(m["kl/margin"], s.rejected_seq_kl - s.chosen_seq_kl)
    assert (m["kl/chosen"] >= 0).all()


def test_token_level_loss_without_kl_is_an_error():
    s = stats([-1.0], [-3.0], [-2.0], [-1.0])
    with pytest.raises(ValueError, match="sequential KL"):
        get_loss("tdpo2").fn(s, LossParams(beta=0.1))


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        get_loss("kto")


def test_registry_matches_config_names():
    assert set(typing.get_args(config.LossName)) == set(LOSSES)
    assert {n for n, spec in LOSSES.items() if spec.token_level} == config.TOKEN_LEVEL_LOSSES
