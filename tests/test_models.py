"""Model loading: the tiny model through the real from_pretrained path, specs, offline failures."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.errors import ModelLoadError
from pipeline.models.loading import load_causal_lm, load_tokenizer, resolve


def test_tiny_model_is_saved_and_loaded_back(tiny_model_dir, tmp_path):
    assert (tiny_model_dir / "model.safetensors").is_file()
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    via_builtin = load_causal_lm("builtin:tiny")
    via_folder = load_causal_lm(str(copy))
    for (name, a), (_, b) in zip(via_builtin.state_dict().items(), via_folder.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert resolve(str(copy)).identity == f"local:{copy.resolve()}"


def test_tiny_model_is_deterministic(tmp_path):
    from pipeline.models.tiny import save_tiny_model

    save_tiny_model(tmp_path / "a")
    save_tiny_model(tmp_path / "b")
    a, b = load_causal_lm(str(tmp_path / "a")), load_causal_lm(str(tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_dtype_and_tokenizer(tiny_tokenizer):
    model = load_causal_lm("builtin:tiny", dtype="float64")
    assert model.dtype == torch.float64
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert tiny_tokenizer.pad_token_id is not None and tiny_tokenizer.chat_template


def test_builtin_cache_is_rebuilt_in_a_fresh_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPREFOPT_CACHE", str(tmp_path / "cache"))
    location = resolve("builtin:tiny").location
    assert location.startswith(str(tmp_path / "cache"))
    assert load_tokenizer("builtin:tiny").eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("builtin:gpt5", "unknown builtin model 'builtin:gpt5'"),
        ("./no/such/folder", "model folder not found"),
        ("/tmp/definitely-missing.gguf", "GGUF file not found"),
    ],
)
def test_bad_specs(spec, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        load_causal_lm(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_causal_lm(str(tmp_path))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer("nobody/no-such-model")
    text = str(info.value)
    assert "could not load tokenizer 'nobody/no-such-model'" in text and "builtin:smollm2-135m-instruct" in text


def test_remote_code_is_off_by_default(tmp_path, tiny_model_dir):
    """A folder whose config asks for custom code is refused unless trust_remote_code is set."""
    import json

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-model"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError):
        load_causal_lm(str(folder))
