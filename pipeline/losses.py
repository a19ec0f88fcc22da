"""The DPO / TDPO loss family as pure functions of per-sequence statistics, behind a registry.

Notation (per preference pair, shapes (B,)):
    m_c = log pi(y_c|x) - log pi_ref(y_c|x)      summed over response tokens
    m_r = the same for the rejected response
    h   = m_c - m_r
    SeqKL_c = sum_t KL(pi_ref(.|x, y_c<t) || pi(.|x, y_c<t))   (TDPO eq. 17)

    dpo    -log sigmoid(beta h)                                   DPO, arXiv 2305.18290, eq. 7
    cdpo   -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  conservative DPO (label smoothing eps)
    ipo    (h' - 1/(2 beta))^2, h' from per-token averaged log-ratios  IPO, arXiv 2310.12036, eq. 17
    hinge  relu(1 - beta h)                                       SLiC-HF, arXiv 2305.10425
    tdpo1  -log sigmoid(beta (h - (SeqKL_r - SeqKL_c)))           TDPO, arXiv 2404.11999, eq. 18
    tdpo2  -log sigmoid(beta (h - alpha (SeqKL_r - sg(SeqKL_c)))) TDPO, eq. 20 (sg = stop-gradient)

Every loss returns per-example losses (B,); the caller reduces. Metrics are
per-example too (detached), so micro-batches and workers can be merged exactly.
Only ``torch`` is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import tokenstats


@dataclass(frozen=True)
class PreferenceStats:
    """What a preference loss needs for one batch of B pairs. All tensors are (B,).

    The ``*_seq_kl`` fields are SeqKL(ref || policy) and are only needed by the
    token-level losses; they may be ``None`` for the DPO family.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_seq_kl: torch.Tensor | None = None
    rejected_seq_kl: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen_logps - self.reference_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected_logps - self.reference_rejected_logps


@dataclass(frozen=True)
class LossParams:
    beta: float
    alpha: float = 0.5
    label_smoothing: float = 0.0


LossFn = Callable[[PreferenceStats, LossParams], torch.Tensor]


def dpo_loss(s: PreferenceStats, p: LossParams) -> torch.Tensor:
    h = s.chosen_logratios - s.rejected_logratios
    return -F.logsigmoid(p.beta * h)


def cdpo_loss(s: PreferenceStats, p: LossParams) -> torch.Tensor:
    h = s.chosen_logratios - s.rejected_logratios
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(p.beta * h) - eps * F.logsigmoid(-p.beta * h)


def ipo_loss(s: PreferenceStats, p: LossParams) -> torch.Tensor:
    # Per-token averages keep the squared loss from scaling with response length.
    h = s.chosen_logratios / s.chosen_lengths.clamp(min=1) - s.rejected_logratios / s.rejected_lengths.clamp(min=1)
    return (h - 1 / (2 * p.beta)) ** 2


def hinge_loss(s: PreferenceStats, p: LossParams) -> torch.Tensor:
    h = s.chosen_logratios - s.rejected_logratios
    return torch.relu(1 - p.beta * h)


def _require_kl(s: PreferenceStats, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if s.chosen_seq_kl is None or s.rejected_seq_kl is None:
        raise ValueError(f"loss '{name}' needs the sequential KL of chosen and rejected responses")
    return s.chosen_seq_kl, s.rejected_seq_kl


def tdpo1_loss(s: PreferenceStats, p: LossParams) -> torch.Tensor:
    kl_c, kl_r = _require_kl(s, "tdpo1")
    h = s.chosen_logratios - s.rejected_logratios
    return -F.logsigmoid(p.beta * (h - (kl_r - kl_c)))


def tdpo2_loss(s: PreferenceStats, p: LossParams) -> torch.Tensor:
    kl_c, kl_r = _require_kl(s, "tdpo2")
    h = s.chosen_logratios - s.rejected_logratios
    return -F.logsigmoid(p.beta * (h - p.alpha * (kl_r - kl_c.detach())))


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    token_level: bool  # needs per-position KL(ref || policy), i.e. the reference's full distribution


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, token_level=False),
    "cdpo": LossSpec(cdpo_loss, token_level=False),
    "ipo": LossSpec(ipo_loss, token_level=False),
    "hinge": LossSpec(hinge_loss, token_level=False),
    "tdpo1": LossSpec(tdpo1_loss, token_level=True),
    "tdpo2": LossSpec(tdpo2_loss, token_level=True),
}


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}") from None


def preference_metrics(s: PreferenceStats, beta: float) -> dict[str, torch.Tensor]:
    """Per-example (B,) metrics, the same for every loss so that runs compare.

    rewards/* are DPO's implicit rewards beta * log(pi / pi_ref) (DPO eq. 5
    without the partition function); kl/* are SeqKL(ref || policy) when known.
    """
    with torch.no_grad():
        chosen = beta * s.chosen_logratios
        rejected = beta * s.rejected_logratios
        m = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
            "rewards/margins": chosen - rejected,
            "logps/chosen": s.policy_chosen_logps,
            "logps/rejected": s.policy_rejected_logps,
        }
        if s.chosen_seq_kl is not None and s.rejected_seq_kl is not None:
            m["kl/chosen"] = s.chosen_seq_kl
            m["kl/rejected"] = s.rejected_seq_kl
            m["kl/margin"] = s.rejected_seq_kl - s.chosen_seq_kl
        return {k: v.detach() for k, v in m.items()}


def compute_loss(name: str, stats: PreferenceStats, params: LossParams) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses (B,) and per-example metrics for the named loss."""
    losses = get_loss(name).fn(stats, params)
    metrics = preference_metrics(stats, params.beta)
    metrics["loss"] = losses.detach()
    return losses, metrics


def stats_from_logits(
    *,
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    reference_chosen_logits: torch.Tensor,
    reference_rejected_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    with_kl: bool = True,
) -> PreferenceStats:
    """PreferenceStats from full causal-LM logits (B, T, V) and labels (B, T) (-100 off the response)."""
    chosen = tokenstats.response_index(chosen_labels)
    rejected = tokenstats.response_index(rejected_labels)

    def logps(logits: torch.Tensor, index: tokenstats.ResponseIndex) -> torch.Tensor:
        return tokenstats.segment_sum(tokenstats.token_logps(tokenstats.pack(logits, index), index.targets), index)

    def seq_kl(ref: torch.Tensor, pol: torch.Tensor, index: tokenstats.ResponseIndex) -> torch.Tensor:
        kl = tokenstats.position_kl(tokenstats.pack(ref, index).detach(), tokenstats.pack(pol, index))
        return tokenstats.segment_sum(kl, index)

    return PreferenceStats(
        policy_chosen_logps=logps(policy_chosen_logits, chosen),
        policy_rejected_logps=logps(policy_rejected_logits, rejected),
        reference_chosen_logps=logps(reference_chosen_logits, chosen).detach(),
        reference_rejected_logps=logps(reference_rejected_logits, rejected).detach(),
        chosen_lengths=chosen.lengths,
        rejected_lengths=rejected.lengths,
        chosen_seq_kl=seq_kl(reference_chosen_logits, policy_chosen_logits, chosen) if with_kl else None,
        rejected_seq_kl=seq_kl(reference_rejected_logits, policy_rejected_logits, rejected) if with_kl else None,
    )


def loss_from_logits(
    name: str,
    *,
    policy_chosen_logits: torch.Tensor,
    policy_rejected_logits: torch.Tensor,
    reference_chosen_logits: torch.Tensor,
    reference_rejected_logits: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    beta: float,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-example loss (B,) of the named loss, straight from Hugging Face causal-LM logits.

    Logits are (B, T, V) where position t predicts token t+1; labels (B, T) are the
    input ids with -100 on every non-response position (the shift happens here).
    Log-probs are summed over response tokens (ipo: averaged per token). The
    reference logits are treated as constants; gradients flow to the policy logits.
    """
    spec = get_loss(name)
    stats = stats_from_logits(
        policy_chosen_logits=policy_chosen_logits,
        policy_rejected_logits=policy_rejected_logits,
        reference_chosen_logits=reference_chosen_logits,
        reference_rejected_logits=reference_rejected_logits,
        chosen_labels=chosen_labels,
        rejected_labels=rejected_labels,
        with_kl=spec.token_level,
    )
    return spec.fn(stats, LossParams(beta=beta, alpha=alpha, label_smoothing=label_smoothing))
