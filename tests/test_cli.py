"""The command line: generate prints the answer and its speed; bench throughput writes its JSON."""

import json

import pytest

from kvmem.cli import main
from tests.oracle import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli") / "llama", "llama-mha")


def test_generate_prints_text_and_tokens_per_second(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "5",
               "--dtype", "float32", "--kv-cache-memory", "4MiB"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.strip()
    assert "tokens/s" in err and "kv_cache=paged" in err


def test_generate_says_what_it_does_while_it_starts(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "2",
                 "--dtype", "float32", "--kv-cache-memory", "4MiB"]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("kvmem: ")]
    assert said[0].startswith(f"kvmem: reading the model {tiny_dir}")
    assert any("KV cache: paged, 4.0 MiB for" in line for line in said), said
    assert any(line.startswith("kvmem: engine ready in") for line in said), said


def test_bench_throughput_writes_the_documented_keys(tiny_dir, tmp_path, capsys):
    path = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--model", str(tiny_dir), "--num-prompts", "4", "--input-len", "8",
               "--output-len", "4", "--kv-cache", "static", "--kv-cache-memory", "4MiB", "--dtype", "float32",
               "--max-model-len", "64", "--json", str(path)])
    assert rc == 0
    result = json.loads(path.read_text())
    for key in ("requests_per_s", "total_tokens_per_s", "output_tokens_per_s"):
        assert result[key] > 0
    assert result["settings"]["kv_cache"] == "static"
    assert "output tokens/s" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"]) == 2
