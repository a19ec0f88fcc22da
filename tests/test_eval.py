"""Evaluation pieces without Ray: prompts, sampling, KL/entropy on samples, rewards, Pareto fronts."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from pipeline.config import EvalConfig, GenerationConfig, RewardConfig
from pipeline.errors import ConfigError, DataError
from pipeline.eval.generation import encode_prompts, sample
from pipeline.eval.metrics import distinct_n, sample_and_score, shard, summarize
from pipeline.eval.pareto import (
    REFERENCE_METHOD,
    Point,
    dominates,
    hypervolume,
    pareto_front,
    reference_point,
    write_report,
)
from pipeline.eval.prompts import load_prompts
from pipeline.eval.rewards import ClassifierReward, VaderReward, label_column, log_odds
from tests.conftest import write_jsonl


def P(kl, reward, method="dpo", step=1):
    return Point(method, f"{method}-run", step, kl, reward)


# --- Pareto fronts and hypervolume, checked by hand --------------------------------------------

def test_front_keeps_only_non_dominated_points_in_kl_order():
    a, b, c, d, e = P(1.0, 0.2), P(2.0, 0.5), P(1.5, 0.1), P(3.0, 0.5), P(0.5, 0.2)
    # c is dominated by a (more KL, less reward); d by b (same reward, more KL); a by e (same reward, less KL)
    assert pareto_front([a, b, c, d, e]) == [e, b]
    assert dominates(e, a) and dominates(b, d) and not dominates(a, b) and not dominates(b, a)
    assert pareto_front([]) == []


def test_hypervolume_by_hand():
    front = [P(1.0, 0.2), P(2.0, 0.5)]
    # box up to KL 3 above reward 0: [1,2) x 0.2 + [2,3) x 0.5
    assert hypervolume(front, 3.0, 0.0) == pytest.approx(0.7)
    # a dominated point adds nothing
    assert hypervolume([*front, P(2.5, 0.3)], 3.0, 0.0) == pytest.approx(0.7)
    # reference reward 0.3: only the second point counts, [2,3) x 0.2
    assert hypervolume(front, 3.0, 0.3) == pytest.approx(0.2)
    # reference KL 2: the second point is outside, [1,2) x 0.2
    assert hypervolume(front, 2.0, 0.0) == pytest.approx(0.2)
    assert hypervolume([P(0.0, 1.0)], 1.0, 0.0) == pytest.approx(1.0)  # a unit square
    assert hypervolume([P(0.5, -0.1)], 1.0, 0.0) == 0.0


def test_reference_point_defaults_are_stated_rules():
    points = [P(1.0, 0.2), P(2.0, 0.5, "tdpo2"), P(0.0, 0.1, REFERENCE_METHOD, 0)]
    assert reference_point(points) == (pytest.approx(2.2), pytest.approx(0.1))  # 1.1 x max KL, reference reward
    assert reference_point(points[:2]) == (pytest.approx(2.2), pytest.approx(0.2))  # no reference: lowest reward
    assert reference_point(points, 5.0, -1.0) == (5.0, -1.0)
    with pytest.raises(ValueError):
        reference_point(points[2:])


def test_report_files(tmp_path):
    points = [P(1.0, 0.2), P(2.0, 0.5), P(1.5, 0.1), P(0.5, 0.4, "tdpo2"), P(0.0, 0.0, REFERENCE_METHOD, 0)]
    paths = write_report(points, tmp_path, 3.0, 0.0)
    rows = list(csv.DictReader(paths["points"].open()))
    assert len(rows) == 5
    assert {(r["method"], r["kl"], r["on_front"]) for r in rows} >= {("dpo", "1.5", "0"), ("dpo", "2", "1"),
                                                                      ("tdpo2", "0.5", "1"), ("reference", "0", "0")}
    summary = {r["method"]: r for r in csv.DictReader(paths["summary"].open())}
    assert summary.keys() == {"dpo", "tdpo2"}
    assert float(summary["dpo"]["hypervolume"]) == pytest.approx(0.7)
    assert float(summary["tdpo2"]["hypervolume"]) == pytest.approx(2.5 * 0.4)
    assert summary["dpo"]["front_points"] == "2" and summary["dpo"]["reference_kl"] == "3"
    assert paths["plot"].stat().st_size > 10_000 and paths["plot"].read_bytes()[:4] == b"\x89PNG"


# --- small measurements -----------------------------------------------------------------------

def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b c over 7 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc -> {ab, ba, bc} of 5
    assert distinct_n(["one"], 2) == 0.0


def test_shards_cover_prompts_once():
    for n, world in [(10, 3), (4, 2), (2, 4)]:
        spans = [shard(n, r, world) for r in range(world)]
        assert [i for s, e in spans for i in range(s, e)] == list(range(n))


def test_log_odds_is_log_p_over_one_minus_p():
    logits = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 1.0]])
    p = logits.softmax(-1)[:, 2]
    torch.testing.assert_close(log_odds(logits, 2), torch.log(p / (1 - p)))
    torch.testing.assert_close(log_odds(logits[:, :1], None), logits[:, 0])


def test_label_column_names_the_problem():
    class Two:
        num_labels = 2
        id2label = {0: "NEGATIVE", 1: "POSITIVE"}

    assert label_column(Two, "positive", "m") == 1
    with pytest.raises(ConfigError, match="set reward.label"):
        label_column(Two, None, "m")
    with pytest.raises(ConfigError, match="negative, positive"):
        label_column(Two, "happy", "m")


def test_vader_scores_sentiment():
    good, bad, flat = VaderReward().score(["A wonderful, moving film.", "A dull, awful mess.", "It is a film."])
    assert good > 0.3 and bad < -0.3 and flat == 0.0


def test_classifier_reward_is_the_models_score(tiny_reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = ClassifierReward(RewardConfig(source=str(tiny_reward_dir)))
    texts = ["a fine film", "no"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir)
    with torch.no_grad():
        direct = [float(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]) for t in texts]
    assert reward.score(texts) == pytest.approx(direct, abs=1e-5)  # padding does not change a score


# --- prompts ----------------------------------------------------------------------------------

def test_builtin_prefixes_split_held_out_prompts():
    train, held = load_prompts("builtin:movie-prefixes", "train"), load_prompts("builtin:movie-prefixes", "eval")
    assert len(train) == 168 and len(held) == 42
    assert len(load_prompts("builtin:movie-prefixes", "all")) == 210
    assert all(1 <= len(p.split()) <= 6 for p in train + held)  # 3-6 words, fewer when the text is shorter
    assert load_prompts("builtin:movie-prefixes", "eval", 5) == held[:5]


def test_prompt_files_and_their_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second"]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"text": 3}])
    with pytest.raises(DataError, match="row 2"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown builtin prompt set"):
        load_prompts("builtin:nope")


# --- sampling and what is measured on the samples ---------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from pipeline.models.loading import load_causal_lm, load_tokenizer
    from pipeline.models.tiny import tiny_llama

    tokenizer = load_tokenizer("builtin:tiny")
    policy = load_causal_lm("builtin:tiny", dtype="float64")
    other = tiny_llama(len(tokenizer), seed=1).double().eval()
    return tokenizer, policy, other


def test_sampling_is_seeded_complete_and_leaves_the_rng_alone(tiny):
    tokenizer, policy, _ = tiny
    ids = encode_prompts(tokenizer, ["The film", "A much longer prompt here"])
    gen = GenerationConfig(max_new_tokens=12, batch_size=2)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    first = sample(policy, tokenizer, ids, gen, seed=7, samples_per_prompt=3)
    assert torch.equal(torch.rand(3), expected_next)  # sampling restored the global RNG
    again = sample(policy, tokenizer, ids, gen, seed=7, samples_per_prompt=3)
    assert first.completion_ids == again.completion_ids
    assert first.prompt_index == [0, 0, 0, 1, 1, 1]
    assert first.prompt_ids[3] == ids[1]
    eos = tokenizer.eos_token_id
    for c in first.completion_ids:
        assert 1 <= len(c) <= 12 and eos not in c[:-1]  # stops at the first EOS
    # batching does not change samples when batches start at the same prompt index
    one_by_one = sample(policy, tokenizer, ids, gen.model_copy(update={"batch_size": 1}), seed=7)
    assert one_by_one.completion_ids[0] == sample(policy, tokenizer, ids[:1], gen, seed=7).completion_ids[0]


def direct_logps_and_entropy(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logps = model(input_ids=ids).logits.double().log_softmax(-1)[0, len(prompt) - 1 : -1]
    token = logps.gather(1, torch.tensor(completion).unsqueeze(1)).sum()
    entropy = -(logps.exp() * logps).sum()
    return float(token), float(entropy)


@pytest.mark.parametrize("same_reference", [True, False])
def test_kl_and_entropy_on_samples_match_a_direct_computation(tiny, same_reference):
    tokenizer, policy, other = tiny
    reference = policy if same_reference else other
    prompts = ["The film was", "In short,", "Verdict:"]
    ids = encode_prompts(tokenizer, prompts)
    cfg = EvalConfig(generation=GenerationConfig(max_new_tokens=10, batch_size=2))

    from pipeline.reference.scorer import ReferenceScorer

    scorer = ReferenceScorer(reference, "sequence")
    scores = sample_and_score(policy, tokenizer, prompts, ids, cfg, VaderReward(), lambda b: scorer.score(b).logps)
    samples = sample(policy, tokenizer, ids, cfg.generation, seed=cfg.seed)
    assert len(scores.kl) == 3
    with torch.no_grad():
        for i in range(3):
            pol, entropy = direct_logps_and_entropy(policy, samples.prompt_ids[i], samples.completion_ids[i])
            ref, _ = direct_logps_and_entropy(reference, samples.prompt_ids[i], samples.completion_ids[i])
            assert scores.kl[i] == pytest.approx(pol - ref, abs=1e-8)
            assert scores.entropy[i] == pytest.approx(entropy, abs=1e-8)
    point = summarize(scores)
    if same_reference:
        assert point.kl == 0.0
    else:
        assert max(abs(k) for k in scores.kl) > 0.1  # the models disagree on the sampled tokens
    assert point.samples == 3 and point.length == pytest.approx(sum(scores.tokens) / 3)
    assert point.entropy == pytest.approx(sum(scores.entropy) / sum(scores.tokens))
    assert math.isfinite(point.reward)


def test_reward_model_backbone_is_a_causal_lm_or_an_encoder(tmp_path, tiny_model_dir):
    """jobs.reward_model puts a one-output head on either kind of model, and the result is a reward source."""
    from transformers import BertConfig, BertModel

    from pipeline.config import RunConfig
    from pipeline.models.tiny import byte_level_tokenizer
    from pipeline.stages.reward_model import load_reward_backbone, pad_rows

    tokenizer = byte_level_tokenizer()
    encoder = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(encoder)
    tokenizer.save_pretrained(encoder)
    cfg = RunConfig.model_validate({"model": {"policy": "builtin:tiny"}, "data": {"source": "x"},
                                    "loss": {"name": "dpo"}})
    batch = pad_rows([[5, 6, 7], [8, 9]], tokenizer.pad_token_id)
    for base in (str(tiny_model_dir), str(encoder)):
        model = load_reward_backbone(base, cfg, tokenizer.pad_token_id)
        assert model.config.num_labels == 1
        assert model(**batch).logits.shape == (2, 1)
        model.save_pretrained(tmp_path / "saved")
        tokenizer.save_pretrained(tmp_path / "saved")
        assert len(ClassifierReward(RewardConfig(source=str(tmp_path / "saved"))).score(["a", "bc"])) == 2


def test_sft_examples_fit_max_length():
    from pipeline.stages.sft import fit

    assert fit([1, 2, 3], [4, 5, 9], 10) == ([1, 2, 3], [4, 5, 9])  # fits: untouched
    assert fit(list(range(8)), [20, 21, 9], 8) == ([3, 4, 5, 6, 7], [20, 21, 9])  # prompt loses its start
    prompt, response = fit(list(range(10)), list(range(20, 40)), 10)  # both long: prompt keeps half
    assert prompt == [5, 6, 7, 8, 9] and response == [20, 21, 22, 23, 24]


def test_generation_ignores_the_models_own_sampling_defaults(tiny):
    tokenizer, policy, _ = tiny
    ids = encode_prompts(tokenizer, ["The film"])
    gen = GenerationConfig(max_new_tokens=12)
    plain = sample(policy, tokenizer, ids, gen, seed=3, samples_per_prompt=4).completion_ids
    saved = policy.generation_config.repetition_penalty
    policy.generation_config.repetition_penalty = 5.0
    try:
        assert sample(policy, tokenizer, ids, gen, seed=3, samples_per_prompt=4).completion_ids == plain
    finally:
        policy.generation_config.repetition_penalty = saved
