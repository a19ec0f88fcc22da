"""The reference scorer, its statistics container and the cache, without Ray."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from pipeline.config import load_config
from pipeline.data.dataset import load_preference_dataset
from pipeline.data.tokenization import collate_pairs
from pipeline.models.loading import load_causal_lm
from pipeline.reference.cache import ChunkPlan, ReferenceCache, cache_key
from pipeline.reference.group import ChunkFeed
from pipeline.reference.scorer import ReferenceScorer
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    cfg = load_config(TINY_CONFIG, ["data.limit=10"])
    data = load_preference_dataset(cfg.data, tiny_tokenizer)
    model = load_causal_lm("builtin:tiny", dtype="float64")
    return cfg, data.pairs, model


@pytest.mark.parametrize("kind,kw", [("sequence", {}), ("exact", {}), ("topk", {"topk": 5})])
def test_chunked_pair_statistics_equal_scoring_the_batch(kind, kw, setup, tiny_tokenizer, tmp_path):
    """Scored in chunks (sorted by length, padded differently), cached and gathered back: the same numbers."""
    cfg, pairs, model = setup
    scorer = ReferenceScorer(model, kind, **kw)
    plan = ChunkPlan(len(pairs), 4)  # chunks of 4, 4, 2
    cache = ReferenceCache(tmp_path, "key", kind, plan).create({})
    for chunk in range(plan.num_chunks):
        cache.write(chunk, scorer.score_pairs([pairs[i] for i in plan.pairs(chunk)], tiny_tokenizer.pad_token_id, 3))
    feed = ChunkFeed(kind, plan, {}, cache)
    members = [7, 2, 9, 4]  # across all three chunks, out of order
    direct = scorer.score(collate_pairs([pairs[i] for i in members], tiny_tokenizer.pad_token_id))
    gathered = feed(members)
    assert_close(gathered.logps, direct.logps, rtol=1e-9, atol=1e-9)
    assert torch.equal(gathered.lengths, direct.lengths)
    assert gathered.positions.keys() == direct.positions.keys()
    for name in direct.positions:
        if name == "ids":  # ties may order differently; the log-probs they carry must agree
            continue
        assert_close(gathered.positions[name], direct.positions[name], rtol=1e-9, atol=1e-9)


def test_fingerprint_follows_what_determines_the_statistics(setup, tiny_tokenizer):
    cfg, pairs, _ = setup
    base, _ = cache_key(cfg, pairs, "topk")
    assert cache_key(cfg, pairs, "topk")[0] == base  # stable
    assert cache_key(cfg, pairs, "exact")[0] != base
    assert cache_key(cfg.model_copy(update={"reference": cfg.reference.model_copy(update={"topk": 8})}),
                     pairs, "topk")[0] != base
    assert cache_key(cfg, pairs[:-1], "topk")[0] != base  # dataset content
    shifted = [p.__class__(p.row, p.prompt_ids[1:], p.chosen_ids, p.rejected_ids, p.truncated) for p in pairs]
    assert cache_key(cfg, shifted, "topk")[0] != base  # tokenization / truncation
    # Settings that do not change the statistics keep the key (another trial of a sweep).
    other = load_config(TINY_CONFIG, ["data.limit=10", "loss.beta=0.5", "train.learning_rate=0.1"])
    assert cache_key(other, pairs, "topk")[0] == base


def test_a_truncated_chunk_is_recomputed_not_trusted(setup, tiny_tokenizer, tmp_path):
    cfg, pairs, model = setup
    plan = ChunkPlan(len(pairs), 5)
    cache = ReferenceCache(tmp_path, "key", "exact", plan).create({})
    scorer = ReferenceScorer(model, "exact")
    for chunk in range(plan.num_chunks):
        cache.write(chunk, scorer.score_pairs([pairs[i] for i in plan.pairs(chunk)], tiny_tokenizer.pad_token_id, 8))
    assert cache.missing() == []
    path = cache.path(1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cache.missing() == [1]
    assert not list(cache.dir.glob("*.tmp"))  # writes leave no temporaries behind
