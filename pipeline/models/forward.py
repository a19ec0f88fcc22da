"""The response-position forward: a causal LM's logits at response positions only.

Used alike by the policy in training, the reference scorer and evaluation: the LM head runs on
the N response positions of a batch, never on prompt or padding positions, and a packed batch
(:func:`pipeline.models.packing.pack_batch`) runs padding-free, each pair's prompt once.
"""

from __future__ import annotations

import torch

from pipeline.models.packing import packed_hidden_index, packed_inputs

# Config attributes of architectures whose logits are not just `lm_head(hidden)`.
_HEAD_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier",
)


def head_is_plain(model: torch.nn.Module) -> bool:
    """True when logits == lm_head(last hidden state), so the head may be applied to a subset of positions."""
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _HEAD_TRANSFORMS):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) at the N response positions of ``batch``; ``mask`` is ResponseIndex.mask (2B, T-1).

    The LM head runs on response positions only: on a small model the vocabulary
    projection of prompt and padding positions is most of the work and is never used.
    A batch carrying a packed layout (:func:`pipeline.models.packing.pack_batch`) runs
    padding-free, each pair's prompt once.
    """
    packed = "packed_slots" in batch
    if packed:
        inputs = packed_inputs(batch, model.get_input_embeddings().weight.dtype)
        rows = packed_hidden_index(batch, mask)  # (N,) into the flattened (R*T) layout
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if not head_is_plain(model):
        logits = model(**inputs, use_cache=False).logits  # (R, T, V) or (2B, T, V)
        return logits.reshape(-1, logits.shape[-1])[rows] if packed else logits[:, :-1][mask]
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (R, T, H) or (2B, T, H)
    hidden = hidden.reshape(-1, hidden.shape[-1])[rows] if packed else hidden[:, :-1][mask]
    return model.get_output_embeddings()(hidden)  # (N, V)


class ResponseLogits(torch.nn.Module):
    """A causal LM as the training step calls it: (input ids, attention mask, response mask) -> logits (N, V).

    The distributed trainer gives this module to DeepSpeed, so the forward goes
    through the engine (ZeRO-3 gathers, hooks) while the LM head still runs on
    response positions only; the single-process trainer wraps its policy the same way.
    ``packed`` holds the batch's packed layout tensors (:data:`pipeline.models.packing.KEYS`), if any.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                **packed: torch.Tensor) -> torch.Tensor:
        return response_logits(self.lm, {"input_ids": input_ids, "attention_mask": attention_mask, **packed}, mask)
