"""One typed configuration tree, loaded from YAML with dotted overrides, validated once.

    cfg = load_config("configs/default.yaml", ["loss.beta=0.2", "loss.name=tdpo2"])

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
whose message lists every problem with its key path (``loss.beta: ...``).
Library code reads fields directly (``cfg.loss.beta``); defaults live here and
nowhere else.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

Section = TypeVar("Section", bound=BaseModel)

# Kept in sync with pipeline.losses.LOSSES (a test checks it); listed here so
# validating a config never imports torch.
LossName = Literal["dpo", "cdpo", "ipo", "hinge", "tdpo1", "tdpo2"]
TOKEN_LEVEL_LOSSES = frozenset({"tdpo1", "tdpo2"})
# numpy's and Optuna's seed range (torch takes more, but a seed must work everywhere it is passed).
MAX_SEED = 2**32 - 1
# YAML aliases let a few lines stand for a huge tree (a "billion laughs") or one that contains itself;
# copying, validating or saving such a tree would hang, so a config is refused past this many values.
MAX_CONFIG_VALUES = 100_000
# Where tracking credentials belong: a URI's user:password@ would be written into run folders, sweep
# state and logs.
CREDENTIALS_ADVICE = ("give them as $MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD (or "
                      "$MLFLOW_TRACKING_TOKEN) in the environment of every process that logs")
DEFAULT_MAX_LENGTH = 512


class FieldProblem(ValueError):
    """What a validator that compares fields raises: ``key`` is the field to blame, so the message
    names its full key path (``data.max_prompt_length: ...``) instead of the section's."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key


class _Strict(BaseModel):
    # NaN passes no bound check it meets and slips through unbounded fields; inf is never a meaningful setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Which models to load. A spec is ``builtin:NAME``, a local folder, a ``.gguf`` file or a Hub name."""

    policy: str = Field(description="model to train (also the reference unless `reference` is set)")
    reference: str | None = Field(None, description="frozen reference model; defaults to the policy's spec")
    tokenizer: str | None = Field(None, description="tokenizer spec; defaults to the policy's")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for Hub specs")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    trust_remote_code: bool = Field(False, description="run model code from the Hub; off unless you trust it")

    @property
    def reference_spec(self) -> str:
        return self.reference or self.policy

    @property
    def tokenizer_spec(self) -> str:
        return self.tokenizer or self.policy


class DataConfig(_Strict):
    """Where preference pairs come from and how they are tokenized."""

    source: str = Field(description="builtin:NAME, a .json/.jsonl/.parquet/.csv file or folder, or a Hub dataset")
    split: str = "train"
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=2, le=1_000_000, description="prompt + response tokens, per sequence")
    max_prompt_length: int | None = Field(
        DEFAULT_MAX_LENGTH // 2, ge=1,
        description="prompts longer than this are truncated; not given: max_length // 2; null: never truncate prompts",
    )
    prompt_truncation: Literal["left", "right"] = Field(
        "left", description="which end of a long prompt is cut (left keeps the end, next to the response)"
    )
    on_invalid: Literal["error", "skip"] = Field(
        "error", description="error: one bad row stops the run; skip: bad rows are dropped and reported"
    )

    @model_validator(mode="before")
    @classmethod
    def _prompt_length_follows(cls, data: Any) -> Any:
        """Not given, max_prompt_length is half of max_length (256 for the default 512), so that setting
        max_length alone is enough. The value is resolved here, once: it is what save_config writes."""
        if isinstance(data, dict) and "max_prompt_length" not in data:
            max_length = data.get("max_length", DEFAULT_MAX_LENGTH)
            # An invalid max_length is left to its own field check; the default then stands, unused.
            if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 2:
                data = {**data, "max_prompt_length": max_length // 2}
        return data

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise FieldProblem("max_prompt_length", f"{self.max_prompt_length} leaves no room for the response: "
                               f"it must be smaller than max_length ({self.max_length})")
        return self


class LossConfig(_Strict):
    """The preference loss. Formulas: pipeline/losses.py."""

    name: LossName
    beta: float = Field(0.1, gt=0, le=1e4, description="inverse temperature of the implicit reward")
    alpha: float = Field(0.5, ge=0, le=1e4, description="TDPO2 weight of the sequential-KL difference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cdpo: probability that a label is flipped")

    @property
    def token_level(self) -> bool:
        return self.name in TOKEN_LEVEL_LOSSES


class TrainConfig(_Strict):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    learning_rate: float = Field(5e-6, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1, description="preference pairs per micro-batch (per worker when distributed)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null: no clipping")
    log_every: int = Field(1, ge=1)
    packing: bool = Field(True, description="padding-free forward passes: a batch's sequences packed end to end "
                          "(pipeline.models.packing); a model (policy or reference) that fails the packing check runs padded")
    save_model: bool = Field(True, description="export the trained policy as safetensors at the end")
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the exported policy's weights; null: model.dtype (as trained)")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise FieldProblem("warmup_steps", f"{self.warmup_steps} exceeds max_steps ({self.max_steps})")
        return self

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


class OutputConfig(_Strict):
    dir: str = Field("outputs", description="runs are written to DIR/RUN_NAME")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="default: <loss>-<timestamp>")


class TrackingConfig(_Strict):
    """MLflow. uri: null means $MLFLOW_TRACKING_URI, else an embedded SQLite store in output.dir."""

    enabled: bool = True
    uri: str | None = Field(None, description="e.g. http://127.0.0.1:5000 or sqlite:///path/mlflow.db")
    experiment: str = Field("rayprefopt", min_length=1)
    log_model: bool = Field(False, description="also upload the exported model as a run artifact")
    tags: dict[str, str] = Field(default_factory=dict, description="extra tags on every run (jobs.pipeline adds `pipeline`)")
    flush_timeout_s: float = Field(120.0, gt=0, description="at the end of a run, how long to wait for a tracking "
                                   "server that went away to take the metrics still queued for it")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri is not None and hide_uri_credentials(uri) != uri:
            raise ValueError("carries credentials (user:password@), which would be written into run folders, "
                             f"sweep state and logs; {CREDENTIALS_ADVICE}")
        return uri


class ReferenceConfig(_Strict):
    """How the frozen reference model serves its statistics to the training workers.

    mode: what a token-level loss (TDPO) gets per response position
      exact      the full reference log-probs (V numbers per position, stored in `dtype`)
      topk       the `topk` largest log-probs, their ids and the tail mass (a coarse-grained KL)
      colocated  the reference runs inside each training worker, no actors, no cache
    The DPO family only ever needs one summed log-prob per sequence, whatever the mode.
    """

    mode: Literal["exact", "topk", "colocated"] = "exact"
    topk: int = Field(64, ge=1, description="tokens kept per position in topk mode")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="storage dtype of exact per-position log-probs (KL is always computed in float32)"
    )
    num_actors: int = Field(1, ge=1, description="reference actors (each holds one copy of the model)")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="pairs per reference forward pass")
    chunk_size: int = Field(32, ge=1, description="pairs per cached chunk (the unit of work and of the cache)")
    cache: bool = Field(True, description="reuse reference outputs stored under the storage path")
    max_restarts: int = Field(3, ge=-1, description="times a dead reference actor is replaced (-1: always)")


class DistributedConfig(_Strict):
    """Ray Train + DeepSpeed. ``enabled: false`` runs the single-process reference trainer instead."""

    enabled: bool = True
    address: str | None = Field(None, description="Ray cluster address; null: $RAY_ADDRESS, else start Ray locally")
    num_workers: int = Field(1, ge=1, description="data-parallel training workers")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; otherwise CPU and gloo")
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3 parameters in CPU memory")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints; null: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    keep_final_checkpoint: bool = Field(
        False, description="keep a finished run's last checkpoint (weights and optimizer state, to train it further "
        "under the same run name); false: dropped once the policy is exported (train.save_model)")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: always)")
    storage_path: str | None = Field(
        None, description="checkpoints and the reference cache; null: output.dir. Shared storage on multi-node clusters"
    )

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DistributedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise FieldProblem("offload_params", f"needs zero_stage 3 (got zero_stage {self.zero_stage})")
        return self


class GenerationConfig(_Strict):
    """Sampling from a policy. The defaults (temperature 1, no top-k, no top-p) sample from the policy
    itself, which is what makes the KL measured on the samples an unbiased estimate of KL(policy || ref)."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(1.0, gt=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")
    batch_size: int = Field(32, ge=1, description="prompts per generate call")


class RewardConfig(_Strict):
    """A reward source. ``vader``: the VADER lexicon's compound sentiment score (-1..1) of prompt + completion.
    Anything else is a sequence-classification model spec (a folder, e.g. one written by jobs.reward_model,
    or a Hub name): a single-output model's score, or the log-odds of ``label`` for a classifier."""

    source: str = Field("vader", min_length=1)
    label: str | None = Field(None, description="classifier label whose log-odds is the reward, e.g. POSITIVE")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=2, le=1_000_000, description="tokens of prompt + completion the model reads")
    trust_remote_code: bool = False


class EvalConfig(_Strict):
    """Generation-based evaluation: sample completions for held-out prompts and measure the reward,
    KL(policy || reference) on the samples, the policy's token entropy and distinct-n."""

    enabled: bool = Field(False, description="evaluate during training (every_steps and at the end)")
    prompts: str = Field("builtin:movie-prefixes", description="builtin:NAME, a .txt (one per line) or .jsonl file")
    split: str = Field("eval", description="dataset split; builtin:movie-prefixes has train, eval and all")
    num_prompts: int | None = Field(32, ge=1, description="use the first N prompts; null: all")
    prompt_words: int | None = Field(None, ge=1, description="rows with only `text`: its first N words are the prompt")
    every_steps: int | None = Field(None, ge=1, description="also evaluate every N optimizer steps")
    seed: int = Field(1234, ge=0, le=MAX_SEED, description="sampling seed; every evaluation draws with the same seed")
    generation: GenerationConfig = GenerationConfig()
    reward: RewardConfig = RewardConfig()


class PairsConfig(_Strict):
    """jobs.make_pairs: k samples per prompt from model.policy, the best and worst by a reward source
    become a preference pair (the DPO paper's IMDb protocol)."""

    prompts: str = "builtin:movie-prefixes"
    split: str = Field("train", description="dataset split; builtin:movie-prefixes has train, eval and all")
    num_prompts: int | None = Field(64, ge=1)
    prompt_words: int | None = Field(None, ge=1, description="rows with only `text`: its first N words are the prompt")
    samples_per_prompt: int = Field(4, ge=2, le=1024)
    min_margin: float = Field(0.0, ge=0, description="drop prompts whose best and worst rewards differ by no more")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    generation: GenerationConfig = GenerationConfig()
    reward: RewardConfig = RewardConfig()
    num_actors: int = Field(1, ge=1, description="generator actors (each holds the policy and the reward source)")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    output: str | None = Field(None, description="JSONL file to write; null: <output.dir>/<run name>/pairs.jsonl")


class StageTrainConfig(_Strict):
    """Knobs shared by the supervised stages (SFT, reward model), trained with DDP on Ray Train."""

    learning_rate: float = Field(1e-5, gt=0, le=1.0)
    batch_size: int = Field(8, ge=1, description="examples per worker per step")
    max_steps: int = Field(50, ge=1)
    warmup_steps: int = Field(0, ge=0)
    max_length: int = Field(256, ge=2, le=1_000_000, description="tokens per example")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False

    @model_validator(mode="after")
    def _warmup_fits(self) -> StageTrainConfig:
        if self.warmup_steps > self.max_steps:  # the schedule would never reach its peak learning rate
            raise FieldProblem("warmup_steps", f"{self.warmup_steps} exceeds max_steps ({self.max_steps})")
        return self


class SFTConfig(StageTrainConfig):
    """jobs.sft: next-token loss on responses (prompt/completion or prompt/chosen rows: the prompt is masked)
    or on whole texts (rows with a ``text`` field)."""

    source: str = Field("builtin:movie-reviews", description="builtin:NAME, a local file, or a Hub dataset")
    split: str = "train"
    limit: int | None = Field(None, ge=1)


class RewardModelConfig(StageTrainConfig):
    """jobs.reward_model: a scalar head on a causal LM or an encoder, Bradley-Terry loss on preference pairs."""

    base: str | None = Field(None, description="model spec to start from; null: model.policy")
    source: str | None = Field(None, description="preference pairs; null: data.source")
    split: str = "train"
    limit: int | None = Field(None, ge=1)
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="pairs held out for the accuracy")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)


class ParetoConfig(_Strict):
    """The hypervolume's reference point (worst corner): null values are taken from the points
    (KL: the largest KL measured; reward: the reference policy's reward, else the lowest measured)."""

    reference_kl: float | None = Field(None, gt=0)
    reference_reward: float | None = None


class PipelineConfig(_Strict):
    """jobs.pipeline: make pairs from the reference, then one training run per entry of ``runs``
    (each a mapping of dotted overrides), each evaluated during training; then the Pareto fronts."""

    runs: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"loss.name": "dpo", "loss.beta": 0.1}, {"loss.name": "tdpo2", "loss.beta": 0.1}],
        min_length=1,
    )
    evaluate_reference: bool = Field(True, description="evaluate the untrained reference once: the fronts' origin")
    pareto: ParetoConfig = ParetoConfig()


class AshaConfig(_Strict):
    """Early stopping of sweep trials (Ray Tune's ASHA) on one scalar the trials report."""

    enabled: bool = False
    metric: str = Field("eval/reward", min_length=1, description="a metric the trials report, e.g. eval/reward, loss")
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1, description="optimizer steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(_Strict):
    """jobs.sweep: Ray Tune over dotted config keys, one full training run per trial.

    space maps a dotted key to its candidates:
      [a, b, ...]              grid search values (search: grid), a categorical choice otherwise
      {choice: [a, b, ...]}    a categorical choice
      {uniform: [low, high]}   {loguniform: [low, high]}   {randint: [low, high]}  (high exclusive)
    """

    space: dict[str, Any] = Field(
        default_factory=lambda: {"loss.name": ["dpo", "tdpo2"], "loss.beta": [0.1, 0.5]},
        min_length=1,
    )
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="optuna: multi-objective TPE (maximise eval/reward, minimise eval/kl)")
    num_samples: int = Field(1, ge=1, description="grid: repeats of the whole grid; random/optuna: trials")
    max_concurrent_trials: int = Field(1, ge=1)
    trial_cpus: float = Field(0.0, ge=0, description="CPUs of each trial's driver; its workers and actors ask for their own")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random and optuna searches")
    kl_budget: float | None = Field(None, gt=0, description="best config per method: highest reward at KL <= this")
    evaluate_reference: bool = Field(True, description="evaluate the untrained reference once, on the parent run")
    asha: AshaConfig = AshaConfig()


class RunConfig(_Strict):
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    train: TrainConfig = TrainConfig()
    reference: ReferenceConfig = ReferenceConfig()
    distributed: DistributedConfig = DistributedConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    pairs: PairsConfig = PairsConfig()
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    pipeline: PipelineConfig = PipelineConfig()
    sweep: SweepConfig = SweepConfig()

    @property
    def workers(self) -> int:
        return self.distributed.num_workers if self.distributed.enabled else 1

    @property
    def pairs_per_step(self) -> int:
        """Preference pairs in one optimizer step, over all workers."""
        return self.train.pairs_per_step * self.workers


def config_error(err: ValidationError, origin: str, section: str = "") -> ConfigError:
    """The project's message for a pydantic ValidationError: ``invalid configuration (ORIGIN):`` and
    one ``key.path: reason`` line per problem; never pydantic's URLs. ``section`` is the key path of
    the model that was validated when it is not the whole tree (``data`` for a DataConfig)."""
    lines = [f"invalid configuration ({origin}):"]
    lines += [f"  {_problem_line(e, section)}" for e in err.errors()]
    return ConfigError(hide_uri_credentials("\n".join(lines)))


def _problem_line(e: Any, section: str) -> str:
    loc = [section] if section else []
    loc += [str(p) for p in e["loc"]]
    msg, got, hide = e["msg"], e.get("input"), e["type"] in ("missing", "extra_forbidden")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key is missing"
    cause = e.get("ctx", {}).get("error")
    if e["type"] == "value_error" and isinstance(cause, ValueError):
        msg = str(cause)  # a validator's own words, without pydantic's "Value error, "
        if isinstance(cause, FieldProblem):
            loc.append(cause.key)
            hide = True  # its input is the whole section; the reason already quotes the values
    hide = hide or isinstance(got, dict | BaseModel)
    suffix = "" if hide else f" (got {_short_repr(got)})"
    return f"{'.'.join(loc) or '(root)'}: {msg}{suffix}"


def config_error_of(err: ValidationError) -> ConfigError | None:
    """A ConfigError for a config model's ValidationError that arose outside :func:`validate_config`
    (a value assigned to a validated config, a section built in code); None for any other model's,
    which is a bug and keeps its traceback."""
    paths = _section_paths().get(err.title)
    if paths is None:
        return None
    if len(paths) == 1:
        return config_error(err, f"{paths[0] or 'the config'}, as set by the job", paths[0])
    return config_error(err, f"{err.title} ({' or '.join(sorted(paths))}), as set by the job")


def _section_paths() -> dict[str, list[str]]:
    """Config model name -> the key paths where it sits in RunConfig (GenerationConfig sits in two)."""
    paths: dict[str, list[str]] = {RunConfig.__name__: [""]}
    stack: list[tuple[type[BaseModel], str]] = [(RunConfig, "")]
    while stack:
        model, prefix = stack.pop()
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, _Strict):
                paths.setdefault(kind.__name__, []).append(prefix + name)
                stack.append((kind, f"{prefix}{name}."))
    return paths


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short_repr(value: Any) -> str:
    """repr, cut short: an offending value may be a megabyte string or a large nested list."""
    return _REPR.repr(value)


def safe_load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose every failure is a :class:`ConfigError` naming ``where``.

    Besides ``YAMLError``, PyYAML's constructors raise ValueError (``2020-13-01``, ``!!int x``),
    KeyError (``!!bool x``), IndexError (``!!int ``) and more, and its composer RecursionError on deep
    nesting. ``safe_load`` of a string has no side effects, so any failure is the text's.
    """
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where} is not valid YAML: nested too deeply") from None
    except Exception as e:
        raise ConfigError(f"{where} is not valid YAML: a value cannot be read ({type(e).__name__}: {e})") from None
    count, stack = 0, [tree]
    while stack:  # iterative: a self-containing tree never ends, it only counts up
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where} holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are "
                              "expanded, or an alias refers to itself")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"loss.beta=0.2"`` -> ``(["loss", "beta"], 0.2)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    path = key.strip().split(".")
    if any(not p for p in path):
        raise ConfigError(f"override {text!r} has an empty component in its key path")
    value = safe_load_yaml(raw, f"override {_short_repr(text)}: the value") if raw.strip() else ""
    return path, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (a copy); unknown keys are caught later by validation."""
    tree = _deep_copy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    tree = safe_load_yaml(text, f"config file {path}")
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(tree).__name__}")
    return tree


def validate_config(tree: dict[str, Any], origin: str = "config") -> RunConfig:
    return validate_section(RunConfig, tree, origin)


def validate_section(model: type[Section], tree: Any, origin: str, section: str = "") -> Section:
    """``model.model_validate(tree)`` whose failure is a :class:`ConfigError` in the project's format;
    ``section`` is where the model sits in the tree (``data`` for a DataConfig), for the key paths."""
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise config_error(e, origin, section) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or start empty), apply ``key.path=value`` overrides, validate."""
    tree = read_yaml(path) if path is not None else {}
    tree = apply_overrides(tree, list(overrides))
    origin = f"{path}" + (f" with overrides [{', '.join(map(_short_repr, overrides))}]" if overrides else "")
    return validate_config(tree, origin)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved config next to a run's outputs; reloading it gives the same config, except
    that credentials written into a URI (scheme://user:password@host) are replaced by ``***``: give
    them through the environment (e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hide_uri_credentials(dump_config(cfg)), encoding="utf-8")
    return path


def hide_uri_credentials(text: str) -> str:
    """``scheme://user:pass@host`` -> ``scheme://***@host``, anywhere in ``text``; up to the last ``@``
    before whitespace or a quote, so a password holding ``@`` or ``/`` is hidden whole."""
    return re.sub(r"(://)[^\s'\"]*@", r"\1***@", text)
