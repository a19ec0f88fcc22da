"""Preference pairs from a policy's own samples (the DPO paper's IMDb protocol), on Ray actors.

For every prompt, ``pairs.samples_per_prompt`` completions are sampled from ``model.policy``
and scored by ``pairs.reward``; the best and the worst become a pair (standard TRL format:
prompt, chosen, rejected, plus their rewards). Prompts whose best and worst rewards differ
by no more than ``pairs.min_margin`` give no pair. Prompts are split into chunks of
``generation.batch_size`` and spread over ``pairs.num_actors`` generator actors; chunk c
samples with seed ``pairs.seed + its first prompt's index``, so the output does not depend
on the number of actors.

Outputs: the pairs JSONL (``pairs.output`` or ``<storage>/<run name>/pairs.jsonl``), and
``samples.jsonl`` beside it with every completion and its reward.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.cluster import connect_ray, storage_root
from pipeline.config import RunConfig, save_config
from pipeline.errors import DataError
from pipeline.eval.generation import encode_prompts, sample
from pipeline.eval.metrics import completion_rewards
from pipeline.eval.prompts import load_prompts
from pipeline.eval.rewards import check_reward, load_reward, mean_std
from pipeline.models.loading import load_causal_lm, load_tokenizer
from pipeline.stages.sft import StageResult
from pipeline.tracking import flatten, open_tracker


class PairGenerator:
    """Holds the policy and the reward source. Plain class; :func:`run_make_pairs` makes it an actor."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        run = RunConfig.model_validate(cfg)
        m = run.model
        device = "cuda" if torch.cuda.is_available() and run.pairs.gpus_per_actor > 0 else "cpu"
        self.model = load_causal_lm(m.policy, dtype=m.dtype, revision=m.revision,
                                    trust_remote_code=m.trust_remote_code).to(device)
        self.tokenizer = load_tokenizer(m.tokenizer_spec, revision=m.revision, trust_remote_code=m.trust_remote_code)
        self.reward = load_reward(run.pairs.reward, device)
        self.pairs = run.pairs

    def generate(self, first: int, prompts: list[str], prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
        """Every prompt's completions and rewards: [{"index", "prompt", "completions", "rewards"}, ...]."""

        k = self.pairs.samples_per_prompt
        samples = sample(self.model, self.tokenizer, prompt_ids, self.pairs.generation, seed=self.pairs.seed,
                         samples_per_prompt=k, first_index=first)
        texts, rewards = completion_rewards(self.tokenizer, samples, prompts, self.reward, first)
        out = []
        for j, prompt in enumerate(prompts):
            rows = range(j * k, (j + 1) * k)
            out.append({"index": first + j, "prompt": prompt, "completions": [texts[r] for r in rows],
                        "rewards": [rewards[r] for r in rows]})
        return out


def best_and_worst(row: dict[str, Any], min_margin: float) -> dict[str, Any] | None:
    """The pair of one prompt, or None when the rewards do not separate or the texts are equal."""
    rewards = row["rewards"]
    best = max(range(len(rewards)), key=lambda i: rewards[i])
    worst = min(range(len(rewards)), key=lambda i: rewards[i])
    chosen, rejected = row["completions"][best], row["completions"][worst]
    if rewards[best] - rewards[worst] <= min_margin or chosen == rejected:
        return None
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
            "chosen_reward": rewards[best], "rejected_reward": rewards[worst]}


def run_make_pairs(cfg: RunConfig, *, progress: bool = True) -> StageResult:
    """Validate prompts and reward source, then sample on Ray actors and write the pairs."""
    import ray
    from tqdm.auto import tqdm

    p, m = cfg.pairs, cfg.model
    name = cfg.output.run_name or f"make-pairs-{time.strftime('%Y%m%d-%H%M%S')}"
    run_folder = storage_root(cfg) / name
    output = Path(p.output).expanduser() if p.output else run_folder / "pairs.jsonl"
    run_folder.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_folder)
    check_reward(p.reward)
    prompts = load_prompts(p.prompts, p.split, p.num_prompts, p.prompt_words)
    tokenizer = load_tokenizer(m.tokenizer_spec, revision=m.revision, trust_remote_code=m.trust_remote_code)
    prompt_ids = encode_prompts(tokenizer, prompts)
    with open_tracker(cfg, name, tags={"stage": "make_pairs"}) as tracker:
        tracker.log_params(flatten({"model.policy": m.policy, "pairs": p.model_dump(mode="json")}))
        connect_ray(cfg.distributed.address)
        actor = ray.remote(PairGenerator).options(num_cpus=p.cpus_per_actor, num_gpus=p.gpus_per_actor, max_restarts=1,
                                                  max_task_retries=2)
        actors = [actor.remote(cfg.model_dump(mode="json")) for _ in range(p.num_actors)]
        size = p.generation.batch_size
        pending = {actors[n % len(actors)].generate.remote(s, prompts[s : s + size], prompt_ids[s : s + size]): s
                   for n, s in enumerate(range(0, len(prompts), size))}
        rows: list[dict[str, Any]] = []
        try:
            with tqdm(total=len(prompts), desc="make pairs", unit="prompt", disable=not progress) as bar:
                while pending:
                    [done], _ = ray.wait(list(pending), num_returns=1)
                    pending.pop(done)
                    chunk = ray.get(done)
                    rows.extend(chunk)
                    bar.update(len(chunk))
        finally:
            for a in actors:
                ray.kill(a)
        rows.sort(key=lambda r: r["index"])
        pairs = [pair for pair in (best_and_worst(r, p.min_margin) for r in rows) if pair is not None]
        if not pairs:
            raise DataError(f"no pairs: the {len(rows)} prompts' samples all had reward spreads <= {p.min_margin}")
        tmp = output.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
        tmp.replace(output)
        samples_path = run_folder / "samples.jsonl"
        samples_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        all_rewards = [x for r in rows for x in r["rewards"]]
        metrics = {"pairs": len(pairs), "prompts": len(rows), "samples": len(all_rewards),
                   "reward_mean": mean_std(all_rewards)[0],
                   "chosen_reward_mean": mean_std([q["chosen_reward"] for q in pairs])[0],
                   "rejected_reward_mean": mean_std([q["rejected_reward"] for q in pairs])[0]}
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(output, "pairs")
        tracker.log_artifact(samples_path, "pairs")
        return StageResult(run_folder, None, [], metrics, tracker.run_id, output)
