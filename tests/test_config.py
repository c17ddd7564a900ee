"""Engine configuration: memory sizes, dtype resolution, validation."""

import pytest
import torch

from kvmem import config as config_module
from kvmem.config import EngineConfig, parse_memory_size


@pytest.mark.parametrize("value,expected", [
    (1024, 1024), ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5 GiB", int(1.5 * 2**30)), (0.25, 0.25),
    ("0.5", 0.5), ("100", 100),
])
def test_memory_sizes(value, expected):
    assert parse_memory_size(value) == expected


@pytest.mark.parametrize("value", [0, -5, 1.5, 0.0, "lots", "2 parsecs", True, "", "-1GiB"])
def test_bad_memory_sizes_name_the_parameter(value):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_memory_size(value)


def test_auto_dtype_follows_the_cpu(monkeypatch):
    cfg = EngineConfig(device="cpu")
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: True)
    assert cfg.torch_dtype("float32") is torch.bfloat16
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: False)
    assert cfg.torch_dtype("bfloat16") is torch.float32
    assert EngineConfig(device="cpu", dtype="fp16").torch_dtype("float32") is torch.float16
    assert EngineConfig(device="cuda", dtype="auto").torch_dtype("float16") is torch.float16


@pytest.mark.parametrize("kwargs,param", [
    ({"kv_cache": "virtual-ish"}, "kv_cache"), ({"attention_backend": "magic"}, "attention_backend"),
    ({"max_model_len": 1}, "max_model_len"), ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"device": "tpu"}, "device"), ({"block_size": True}, "block_size"),
])
def test_invalid_settings_raise_naming_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        EngineConfig(**kwargs)


def test_gpu_memory_utilization_is_a_share_of_all_memory_less_the_weights(monkeypatch):
    monkeypatch.setattr(config_module, "total_memory_bytes", lambda device: 10 * 2**30)
    cfg = EngineConfig(device="cpu", gpu_memory_utilization=0.5)
    assert cfg.resolve_kv_budget(torch.device("cpu"), 2 * 2**30) == 3 * 2**30
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.1 .* nothing is left for the KV cache"):
        EngineConfig(device="cpu", gpu_memory_utilization=0.1).resolve_kv_budget(torch.device("cpu"), 2 * 2**30)
    # without it, kv_cache_memory as before
    assert EngineConfig(device="cpu", kv_cache_memory="1GiB").resolve_kv_budget(torch.device("cpu"), 2**30) == 2**30


@pytest.mark.parametrize("kwargs,message", [
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"gpu_memory_utilization": 0}, "gpu_memory_util"),
    ({"gpu_memory_utilization": 0.5, "kv_cache_memory": "1GiB"}, "both size the KV cache"),
    ({"tensor_parallel_size": 2, "kv_cache": "hybrid"}, "tensor_parallel_size 2 does not work with kv_cache='hybrid'"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"kv_cache_dtype": "fp4"}, "kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, int8"),
    ({"chat_template": "no-such-file.jinja"}, "neither a file nor a Jinja template"),
    ({"chat_template": "{% if %}"}, "chat_template is not a valid Jinja template"),
])
def test_vllm_options_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    assert EngineConfig(chat_template=str(path)).chat_template_text() == "{{ messages[0]['content'] }}"
    assert EngineConfig(chat_template="{{ 'x' }}").chat_template_text() == "{{ 'x' }}"
    assert EngineConfig().chat_template_text() is None
