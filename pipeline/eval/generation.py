"""Batched sampling from a causal LM with its KV cache.

Prompts are left-padded so that every row's completion starts at the same column;
a completion ends with the first EOS it draws (kept) or at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import GenerationConfig


@dataclass
class Samples:
    """Completions, one row per sample; ``prompt_index`` says which prompt each one continues."""

    prompt_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def extend(self, other: Samples) -> None:
        self.prompt_index += other.prompt_index
        self.prompt_ids += other.prompt_ids
        self.completion_ids += other.completion_ids


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (e.g. BOS), as training sees them."""
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def generation_config(gen: GenerationConfig, tokenizer: Any, samples_per_prompt: int = 1):
    """A complete transformers GenerationConfig: the model's own defaults (a top-k of 50, a repetition
    penalty) would otherwise change the distribution sampled from."""
    from transformers import GenerationConfig as HFGenerationConfig

    return HFGenerationConfig(
        do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens, num_return_sequences=samples_per_prompt,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )


def sample(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, *,
           seed: int, samples_per_prompt: int = 1, first_index: int = 0) -> Samples:
    """``samples_per_prompt`` completions of every prompt (see :func:`sample_batches`)."""
    out = Samples()
    for batch, real in sample_batches(model, tokenizer, prompt_ids, gen, seed=seed,
                                      samples_per_prompt=samples_per_prompt, first_index=first_index):
        if real:
            out.extend(batch)
    return out


@torch.no_grad()
def sample_batches(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], gen: GenerationConfig, *,
                   seed: int, samples_per_prompt: int = 1, synced: bool = False, batches: int | None = None,
                   first_index: int = 0) -> Iterator[tuple[Samples, bool]]:
    """Yield ``(samples of one generate call, real)``, ``gen.batch_size`` prompts per call.

    seed:    batch b draws with torch seed ``seed + first_index + b * batch_size`` (global RNG state
             is restored afterwards, so sampling never disturbs training).
    synced:  ZeRO-3 with several workers: every rank must run the same number of forward passes;
             ``batches`` (the most any rank has) makes a rank with fewer prompts run dummy batches
             (``real`` False: its first prompt, or a lone EOS) that the caller must also score and drop.
    """
    device = next(model.parameters()).device
    config = generation_config(gen, tokenizer, samples_per_prompt)
    size = gen.batch_size
    starts = list(range(0, len(prompt_ids), size))
    was_training = model.training
    model.eval()
    try:
        for b in range(max(len(starts), batches or 0)):
            real = b < len(starts)
            members = list(range(starts[b], min(starts[b] + size, len(prompt_ids)))) if real else [0]
            rows = [prompt_ids[i] for i in members] if prompt_ids else [[tokenizer.eos_token_id]]
            ids, mask = left_pad(rows, tokenizer.pad_token_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _bare_defaults(model):
                torch.manual_seed(seed + first_index + b * size)
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, synced_gpus=synced)
            out = Samples()
            for row, sequence in enumerate(generated[:, ids.shape[1] :].tolist()):
                i = members[row // samples_per_prompt]
                out.prompt_index.append(first_index + i)
                out.prompt_ids.append(list(rows[row // samples_per_prompt]))
                out.completion_ids.append(_until_eos(sequence, tokenizer.eos_token_id))
            yield out, real
    finally:
        model.train(was_training)


@contextmanager
def _bare_defaults(model: Any) -> Iterator[None]:
    """transformers fills every field our config leaves at its default (repetition_penalty,
    no_repeat_ngram_size, suppress_tokens, ...) from the model's own generation_config; with a bare
    one in its place for the call, only what :func:`generation_config` sets shapes the samples."""
    from transformers import GenerationConfig as HFGenerationConfig

    saved = getattr(model, "generation_config", None)
    if saved is None:
        yield
        return
    model.generation_config = HFGenerationConfig(eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id,
                                                 bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
