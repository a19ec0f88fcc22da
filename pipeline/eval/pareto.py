"""Reward-KL Pareto fronts: which method buys more reward for the KL it spends.

A point is one evaluation (a run's policy at one step): ``kl`` (lower is better) and ``reward``
(higher is better). Point p dominates q when p.kl <= q.kl and p.reward >= q.reward, one strictly.
A method's front is its non-dominated points; its hypervolume is the area those points dominate
inside the box bounded by the reference point (worst corner) ``(ref_kl, ref_reward)``:

    HV = sum_i (kl_{i+1} - kl_i) * (reward_i - ref_reward)   front sorted by KL, kl_{n+1} = ref_kl,

over front points with kl < ref_kl and reward > ref_reward. By default the reference point is
(1.1 x the largest KL measured, the untrained reference policy's reward): the hypervolume is then
the reward gained over the starting policy, integrated over the KL budget. Two objectives make this exact and
a few lines long, so no multi-objective library is needed for it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

METHOD_COLOURS = {"dpo": "tab:blue", "tdpo1": "tab:orange", "tdpo2": "tab:green",
                  "cdpo": "tab:purple", "ipo": "tab:brown", "hinge": "tab:pink"}
REFERENCE_METHOD = "reference"


@dataclass(frozen=True)
class Point:
    method: str
    run: str
    step: int
    kl: float
    reward: float
    label: str = ""  # e.g. "beta=0.1"


def dominates(p: Point, q: Point) -> bool:
    return p.kl <= q.kl and p.reward >= q.reward and (p.kl < q.kl or p.reward > q.reward)


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points, by increasing KL (and so increasing reward); duplicates kept once."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.kl, -p.reward)):
        if not front or p.reward > front[-1].reward:
            front.append(p)
    return front


def hypervolume(front: Sequence[Point], ref_kl: float, ref_reward: float) -> float:
    """Area dominated by ``front`` (any points; dominated ones add nothing) within the reference box."""
    inside = [p for p in pareto_front(front) if p.kl < ref_kl and p.reward > ref_reward]
    area = 0.0
    for i, p in enumerate(inside):
        right = inside[i + 1].kl if i + 1 < len(inside) else ref_kl
        area += (right - p.kl) * (p.reward - ref_reward)
    return area


def by_method(points: Iterable[Point]) -> dict[str, list[Point]]:
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    return groups


def reference_point(points: Sequence[Point], ref_kl: float | None = None,
                    ref_reward: float | None = None) -> tuple[float, float]:
    """The stated worst corner: given values win; else 1.1 x the largest KL measured (so the
    highest-KL point still counts) and the reference policy's reward (the untrained model's, when it
    was evaluated), else the lowest reward measured."""
    trained = [p for p in points if p.method != REFERENCE_METHOD]
    if not trained:
        raise ValueError("no evaluation points of trained policies")
    if ref_kl is None:
        ref_kl = max(1.1 * max(p.kl for p in trained), 1e-6)
    if ref_reward is None:
        baseline = [p.reward for p in points if p.method == REFERENCE_METHOD]
        ref_reward = sum(baseline) / len(baseline) if baseline else min(p.reward for p in trained)
    return ref_kl, ref_reward


@dataclass(frozen=True)
class MethodSummary:
    method: str
    points: int
    front: int
    hypervolume: float
    best_reward: float
    kl_at_best: float
    best_run: str


def summarize(points: Sequence[Point], ref_kl: float, ref_reward: float) -> list[MethodSummary]:
    rows = []
    for method, group in sorted(by_method(points).items()):
        if method == REFERENCE_METHOD:
            continue
        best = max(group, key=lambda p: (p.reward, -p.kl))
        rows.append(MethodSummary(method, len(group), len(pareto_front(group)),
                                  hypervolume(group, ref_kl, ref_reward), best.reward, best.kl, best.run))
    return rows


def write_report(points: Sequence[Point], folder: Path, ref_kl: float | None = None,
                 ref_reward: float | None = None, title: str = "Reward vs KL") -> dict[str, Path]:
    """pareto.png, pareto_points.csv (every point, on_front flag) and pareto_summary.csv (per method)."""
    folder.mkdir(parents=True, exist_ok=True)
    kl_ref, reward_ref = reference_point(points, ref_kl, ref_reward)
    fronts = {m: set(pareto_front(g)) for m, g in by_method(points).items()}
    paths = {"points": folder / "pareto_points.csv", "summary": folder / "pareto_summary.csv",
             "plot": folder / "pareto.png"}
    with paths["points"].open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["method", "run", "label", "step", "kl", "reward", "on_front"])
        for p in sorted(points, key=lambda p: (p.method, p.run, p.step)):
            out.writerow([p.method, p.run, p.label, p.step, f"{p.kl:.6g}", f"{p.reward:.6g}",
                          int(p.method != REFERENCE_METHOD and p in fronts[p.method])])
    summary = summarize(points, kl_ref, reward_ref)
    with paths["summary"].open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["method", "points", "front_points", "hypervolume", "best_reward", "kl_at_best_reward",
                      "best_run", "reference_kl", "reference_reward"])
        for s in summary:
            out.writerow([s.method, s.points, s.front, f"{s.hypervolume:.6g}", f"{s.best_reward:.6g}",
                          f"{s.kl_at_best:.6g}", s.best_run, f"{kl_ref:.6g}", f"{reward_ref:.6g}"])
    plot(points, paths["plot"], kl_ref, reward_ref, title)
    return paths


def plot(points: Sequence[Point], path: Path, ref_kl: float, ref_reward: float, title: str) -> None:
    """One colour per method; its front drawn as a step line, its dominated points faded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for method, group in sorted(by_method(points).items()):
        if method == REFERENCE_METHOD:
            ax.scatter([p.kl for p in group], [p.reward for p in group], marker="*", s=160, c="black",
                       label="reference (untrained)", zorder=4)
            continue
        colour = METHOD_COLOURS.get(method, "tab:gray")
        front = pareto_front(group)
        dominated = [p for p in group if p not in set(front)]
        ax.scatter([p.kl for p in dominated], [p.reward for p in dominated], c=colour, alpha=0.25, s=28)
        ax.scatter([p.kl for p in front], [p.reward for p in front], c=colour, s=40, zorder=3,
                   label=f"{method.upper()} front")
        xs = [p.kl for p in front] + [ref_kl]
        ys = [p.reward for p in front] + [front[-1].reward]
        ax.step(xs, ys, where="post", c=colour, lw=1.5)
    ax.axhline(ref_reward, c="gray", lw=0.8, ls=":")
    ax.axvline(ref_kl, c="gray", lw=0.8, ls=":")
    ax.set_xlabel("KL(policy || reference), nats per sample")
    ax.set_ylabel("reward")
    ax.set_title(f"{title}\nhypervolume reference point: KL {ref_kl:.3g}, reward {ref_reward:.3g}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
