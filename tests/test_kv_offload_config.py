"""--kv-offload-memory / --kv-offload-dir / --kv-offload-disk-bytes: parsed, validated (ValueError naming
the flag), refused where they do not apply."""

from __future__ import annotations

import argparse

import pytest

from kvmem.cli import add_engine_args, engine_kwargs
from kvmem.config import DEFAULT_KV_OFFLOAD_DISK_BYTES, EngineConfig


def test_flags_reach_the_config(tmp_path):
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(["--kv-offload-memory", "2GiB", "--kv-offload-dir", str(tmp_path),
                         "--kv-offload-disk-bytes", "1000000"])
    config = EngineConfig(**engine_kwargs(args))
    assert config.offloads_kv
    assert config.kv_offload_bytes() == (2 * 2**30, 1000000)


def test_defaults():
    assert not EngineConfig().offloads_kv
    config = EngineConfig(kv_offload_dir="/tmp/kv-somewhere")
    assert config.kv_offload_bytes() == (0, DEFAULT_KV_OFFLOAD_DISK_BYTES)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"kv_offload_memory": "lots"}, "kv_offload_memory"),
    ({"kv_offload_memory": -1}, "kv_offload_memory"),
    ({"kv_offload_dir": ""}, "kv_offload_dir"),
    ({"kv_offload_dir": 3}, "kv_offload_dir"),
    ({"kv_offload_disk_bytes": "1GiB"}, "kv_offload_disk_bytes"),  # without a directory
    ({"kv_offload_dir": "/tmp/x", "kv_offload_disk_bytes": 0.5}, "kv_offload_disk_bytes"),
    ({"kv_offload_dir": "/tmp/x", "kv_offload_disk_bytes": "big"}, "kv_offload_disk_bytes"),
    ({"kv_offload_memory": "1GiB", "kv_cache": "static"}, "kv_offload_memory"),
    ({"kv_offload_memory": "1GiB", "kv_cache": "hybrid"}, "kv_offload_memory"),
    ({"kv_offload_dir": "/tmp/x", "kv_cache": "static"}, "kv_offload_dir"),
    ({"kv_offload_memory": "1GiB", "enable_prefix_caching": False}, "kv_offload_memory"),
    ({"kv_offload_memory": "1GiB", "tensor_parallel_size": 2}, "kv_offload_memory"),
])
def test_bad_values_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        EngineConfig(**kwargs)


def test_a_file_is_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="kv_offload_dir"):
        EngineConfig(kv_offload_dir=str(f))
