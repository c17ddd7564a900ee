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


# --- the flags, generated from EngineConfig -------------------------------------------------------

def _parser_of(*command: str):
    from kvmem.cli import build_parser

    parser = build_parser()
    for name in command:  # down the subparsers
        parser = next(a for a in parser._actions if a.dest in ("command", "bench")).choices[name]
    return parser


@pytest.mark.parametrize("command", [("serve",), ("generate",), ("chat",), ("bench", "throughput")])
def test_every_engine_config_field_has_a_flag_with_help(command):
    import dataclasses

    from kvmem.config import EngineConfig

    parser = _parser_of(*command)
    by_flag = {flag: a for a in parser._actions for flag in a.option_strings}
    for f in dataclasses.fields(EngineConfig):
        if f.name == "seed" and command == ("bench", "throughput"):
            continue  # its --seed is the workload's; the engine keeps its default seed
        flag = "--" + f.name.replace("_", "-")
        action = by_flag.get(flag)
        assert action is not None and action.dest == f.name, f"no {flag} in {command}"
        assert action.help and action.help.strip(), f"{flag} has no help"


def test_help_shows_defaults_and_choices(capsys):
    from kvmem.config import ATTENTION_BACKENDS, KV_CACHE_STRATEGIES

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: 256)" in text and "(default: 2048)" in text and "(default: paged)" in text
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in text
    assert "{" + ",".join(KV_CACHE_STRATEGIES) + "}" in text
    assert "{" + ",".join(ATTENTION_BACKENDS) + "}" in text
    assert "(default: None)" not in text


def test_old_and_vllm_spellings_parse_to_the_same_config():
    from kvmem.cli import build_parser, engine_kwargs
    from kvmem.config import EngineConfig

    def config(*flags: str) -> EngineConfig:
        return EngineConfig(**engine_kwargs(build_parser().parse_args(["serve", *flags])))

    old = config("--no-prefix-caching", "--no-background-mapping", "--no-deferred-reclamation", "--no-eager-mapping",
                 "--no-batch-invariant", "--threads", "2", "--kv-cache-memory", "1048576", "--kv-cache", "virtual")
    assert (old.enable_prefix_caching, old.background_mapping, old.deferred_reclamation, old.eager_mapping,
            old.batch_invariant, old.num_threads, old.kv_cache_memory) == (False, False, False, False, False, 2,
                                                                            2**20)
    new = config("--no-enable-prefix-caching", "--num-threads", "2", "--kv-cache-memory-bytes", "1048576", "--seed",
                 "7", "--tensor-parallel-size", "1", "--kv-cache-dtype", "auto")
    assert (new.enable_prefix_caching, new.num_threads, new.kv_cache_memory, new.seed) == (False, 2, 2**20, 7)
    assert config("--kv-cache-memory", "2GiB").kv_cache_memory == "2GiB"
    assert config("--kv-cache-memory", "0.5").kv_cache_memory == "0.5"
    hybrid = config("--kv-cache", "hybrid", "--offload-weights", "--device-memory", "64MiB", "--host-memory", "1024")
    assert (hybrid.offload_weights, hybrid.device_memory, hybrid.host_memory) == (True, "64MiB", 1024)
    assert config("--gpu-memory-utilization", "0.5").gpu_memory_utilization == 0.5


def test_generate_seed_seeds_the_engine_too_and_bench_seed_does_not():
    from kvmem.cli import build_parser, engine_kwargs

    assert engine_kwargs(build_parser().parse_args(["generate", "--prompt", "x", "--seed", "3"]))["seed"] == 3
    assert "seed" not in engine_kwargs(build_parser().parse_args(["generate", "--prompt", "x"]))
    assert "seed" not in engine_kwargs(build_parser().parse_args(["bench", "throughput", "--seed", "3"]))


def test_unsupported_vllm_options_fail_clearly(capsys):
    # the embedded SmolLM2 has 9 heads: 2 ranks cannot split them
    assert main(["generate", "--prompt", "x", "--tensor-parallel-size", "2"]) == 2
    assert "tensor_parallel_size 2 does not divide the model's 9 attention heads" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--kv-cache-dtype", "fp4"]) == 2
    assert "kv_cache_dtype must be one of" in capsys.readouterr().err


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    from kvmem import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"kvmem {__version__}"
    done = subprocess.run([sys.executable, "-m", "kvmem", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--gpu-memory-utilization" in done.stdout


def test_chat_template_flag_replaces_the_models(tiny_dir, tmp_path, capsys):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    from kvmem.config import EngineConfig
    from kvmem.engine.llm_engine import LLMEngine

    for value in (str(template), template.read_text()):
        engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_memory="4MiB",
                                        chat_template=value))
        try:
            assert engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<<hi>>"
        finally:
            engine.close()
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--chat-template", "no-such-file"]) == 2
    assert "chat_template" in capsys.readouterr().err
