"""Agreement with TRL's DPOTrainer for the loss types it shares with us (TRL is a test-only dependency).

TRL computes its loss inside the trainer, so a real DPOTrainer is built on the
tiny model and its ``compute_loss`` is compared, value and parameter gradients,
with ``loss_from_logits`` on the same batch and the same models.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from pipeline.losses import loss_from_logits

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

SHARED = {"dpo": "sigmoid", "hinge": "hinge", "ipo": "ipo"}


@pytest.fixture
def models():
    """Fresh models per test: a DPOTrainer patches `forward` of the models it is given, and
    patching the same model objects again (a second trainer) changed TRL's values by ~2e-4.
    float32 because TRL's fused LM head computes log-probs in float32 whatever the model dtype."""
    from pipeline.models.loading import load_causal_lm

    policy = load_causal_lm("builtin:tiny", dtype="float32")
    reference = load_causal_lm("builtin:tiny", dtype="float32")
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference so the ratios are not zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


@pytest.mark.parametrize("ours,theirs", SHARED.items())
def test_matches_trl(ours, theirs, models, tiny_tokenizer, tmp_path):
    policy, reference = models
    rows = [
        {"prompt": "The film was", "chosen": " a delight.", "rejected": " a long, loud chore."},
        {"prompt": "Verdict:", "chosen": " see it", "rejected": " skip"},
        {"prompt": "In short,", "chosen": " warm and wise.", "rejected": " cold."},
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path), report_to=[], loss_type=[theirs], beta=0.3, use_cpu=True,
        per_device_train_batch_size=len(rows), max_length=64, gradient_checkpointing=False,
    )
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tiny_tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])

    policy.zero_grad()
    trl_loss = trainer.compute_loss(policy, batch)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    pol = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        ref = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b = len(rows)
    losses = loss_from_logits(ours, policy_chosen_logits=pol[:b], policy_rejected_logits=pol[b:],
                              reference_chosen_logits=ref[:b], reference_rejected_logits=ref[b:],
                              chosen_labels=labels[:b], rejected_labels=labels[b:], beta=0.3)
    losses.mean().backward()

    assert_close(losses.mean(), trl_loss.detach(), rtol=1e-5, atol=0)
    # Both sides carry float32 rounding: compare the gradients as whole vectors at that precision.
    ours_g = torch.cat([p.grad.flatten() for p in policy.parameters()])
    trl_g = torch.cat([g.flatten() for g in trl_grads])
    assert trl_g.norm() > 0
    assert ((ours_g - trl_g).norm() / trl_g.norm()).item() < 1e-4
