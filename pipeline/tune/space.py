"""A sweep's search space: dotted config keys and their candidates, checked before any trial starts.

    sweep.space:
      loss.name: [dpo, tdpo2]                     grid values (search: grid), a categorical choice otherwise
      loss.beta: {loguniform: [0.01, 1.0]}        choice / uniform / loguniform / randint (high exclusive)

Every candidate (each listed value, both ends of a range) is applied to the base config and the
result validated as a whole, so a typo in a key or an out-of-range bound fails here with the
key named, not in trial 7 an hour later. This module imports Ray only to build the Tune domains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import TOKEN_LEVEL_LOSSES, RunConfig, apply_overrides, validate_config
from pipeline.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# Keys a trial may not change: they say where the sweep itself lives and what it is.
FIXED_SECTIONS = ("sweep", "pipeline", "output", "tracking", "distributed.storage_path", "distributed.enabled")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, e.g. "loss.beta"
    kind: str  # "grid" or one of DISTRIBUTIONS
    values: tuple[Any, ...]  # candidates; (low, high) for uniform, loguniform, randint

    def candidates(self) -> tuple[Any, ...]:
        """Values that every trial's config must accept: the list, or a range's extreme values."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values


def flat_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"loss": {"beta": [..]}} (e.g. from the override
    ``sweep.space.loss.beta=[..]``) is {"loss.beta": [..]}; a later spelling of a key wins."""
    flat: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, dict) and not (len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            flat.update(flat_space(spec, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = spec
    return flat


def parse_space(space: dict[str, Any], search: str) -> list[Dimension]:
    dims = []
    for key, spec in flat_space(space).items():
        where = f"sweep.space.{key}"
        if any(key == s or key.startswith(s + ".") for s in FIXED_SECTIONS):
            raise ConfigError(f"{where}: a sweep cannot vary {key} (it says where and what the sweep is)")
        if isinstance(spec, list):
            kind, values = ("grid" if search == "grid" else "choice"), spec
        elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
            kind, values = next(iter(spec.items()))
        else:
            raise ConfigError(f"{where}: expected a list of values or one of "
                              f"{{{', '.join(DISTRIBUTIONS)}: ...}}, got {json.dumps(spec, default=str)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            _check_range(where, kind, values)
        dims.append(Dimension(key, kind, tuple(values)))
    return dims


def _check_range(where: str, kind: str, values: list[Any]) -> None:
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0 (got {low})")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}.randint: bounds must be integers, got {values!r}")


def check_space(cfg: RunConfig, dims: list[Dimension]) -> None:
    """Every candidate of every dimension, applied alone to cfg, is a valid config."""
    base = cfg.model_dump(mode="json")
    for dim in dims:
        for value in dim.candidates():
            trial_config(base, {dim.key: value}, f"sweep.space.{dim.key}={value!r}")


def trial_config(base: dict[str, Any], params: dict[str, Any], origin: str = "sweep trial") -> RunConfig:
    """The base config tree with a trial's values at their dotted keys, validated."""
    try:
        tree = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in params.items()])
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    return validate_config(tree, origin)


def losses(cfg: RunConfig, dims: list[Dimension]) -> set[str]:
    """Every loss a trial of this sweep can train with."""
    for dim in dims:
        if dim.key == "loss.name":
            return set(dim.values)
    return {cfg.loss.name}


def any_token_level(cfg: RunConfig, dims: list[Dimension]) -> bool:
    return bool(losses(cfg, dims) & TOKEN_LEVEL_LOSSES)


def tune_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's param_space: one domain per dotted key (keys stay flat, dots and all)."""
    from ray import tune

    build = {"grid": tune.grid_search, "choice": tune.choice,
             "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
             "randint": lambda v: tune.randint(*v)}
    return {dim.key: build[dim.kind](list(dim.values)) for dim in dims}
