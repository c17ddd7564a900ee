"""kv_cache_dtype int8 / fp8 end to end: every strategy stores K,V quantized, generates, gives all
its memory back, and holds about twice the tokens of bf16 in the same budget; greedy tokens do not
depend on the batch or the tier; copy-on-write and prefix hits carry int8's scales; bad settings
are refused naming kv_cache_dtype. (Quality against float32 is measured, not asserted:
docs/benchmarks.md.)"""

from __future__ import annotations

import pytest
import torch

from kvmem import LLM, SamplingParams
from kvmem.cli import main as cli_main
from kvmem.config import EngineConfig
from kvmem.hybrid.cost_model import ModelShape
from kvmem.memory import registry
from kvmem.memory.base import KVCacheSpec, StrategyOptions
from kvmem.memory.hybrid import HybridOptions
from kvmem.memory.virtual import VirtualKVCacheManager
from tests.oracle import make_tiny_model

STORED = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW)


def prompts() -> list[list[int]]:
    shared = [(5 * j) % 300 + 2 for j in range(24)]  # a shared prefix: prefix hits where cached
    lengths = [3, 11, 40, 70]
    return [[(7 * i + 3 * j) % 300 + 2 for j in range(n)] for i, n in enumerate(lengths)] + \
        [shared + [9, 10], shared + [11]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kvq") / "llama", "llama3-gqa")


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kvq") / "mha", "llama-mha")


def ids(llm: LLM, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def engine(path, strategy: str, kv_cache_dtype: str, **kw) -> LLM:
    if strategy == "hybrid":
        kw.setdefault("device_memory", "1MiB")
        kw.setdefault("host_memory", "2MiB")
    else:
        kw.setdefault("kv_cache_memory", "1MiB")
    return LLM(str(path), dtype="float32", kv_cache=strategy, kv_cache_dtype=kv_cache_dtype, block_size=4,
               max_model_len=128, max_num_batched_tokens=32, **kw)


def assert_memory_back(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_sequences == 0 and stats.bytes_allocated == 0 and stats.bytes_live == 0, stats
    llm.release_free_memory()
    assert llm.stats().bytes_cached == 0


# --- every strategy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("strategy", ["paged", "static", "virtual", "hybrid"])
def test_every_strategy_generates_batch_invariant_tokens_and_frees_everything(tiny, strategy, kv_cache_dtype):
    batch = prompts()
    with engine(tiny, strategy, kv_cache_dtype) as llm:
        manager = llm.engine.manager
        k_cache = manager.layer_cache(0)[0]
        assert k_cache.dtype == STORED[kv_cache_dtype]
        assert (manager.layer_scales(0) is not None) == (kv_cache_dtype == "int8")
        together = ids(llm, batch)
        assert all(len(t) == NEW for t in together)
        alone = [ids(llm, [p])[0] for p in batch]
        assert alone == together  # greedy output does not depend on the rest of the batch
        assert_memory_back(llm)
        if strategy == "virtual":
            # The kernel's count, int8's scale pages included: nothing left but a shared edge page
            # between two slots' scale ranges.
            assert manager.kernel_resident_bytes() <= 2 * manager.max_chunks * 4096


def test_hybrid_host_tier_gives_the_tokens_of_the_device_tier(mha):
    """int8 KV blocks moved to the host, staged back and written back with their scales, and
    activation blocks recomputed into the quantized staging cache: the same greedy tokens as paged."""
    batch = [(p * 3)[:100] for p in prompts()]
    with engine(mha, "paged", "int8", kv_cache_memory="8MiB") as llm:
        expected = ids(llm, batch)
    with engine(mha, "hybrid", "int8", device_memory=110_000, host_memory="4MiB", act_ratio=0.5) as llm:
        assert llm.engine.manager.host_kv.dtype == torch.int8 and llm.engine.manager.host_act.dtype == torch.float32
        assert ids(llm, batch) == expected
        extra = llm.stats().extra
        assert extra["num_host_admitted"] >= 2 and extra["num_recomputed_tokens"] > 0, extra
        assert_memory_back(llm)


def test_copy_on_write_and_prefix_hits_carry_the_scales(tiny):
    """n=2 shares every block and copies the partial last one (with its scales) on the first
    write; a second run of a prompt reads its prefix from cached int8 blocks. Scales left behind
    would read as zeros and change the tokens."""
    prompt = prompts()[2]  # 40 tokens: 10 full blocks
    with engine(tiny, "paged", "int8") as llm:
        single = ids(llm, [prompt])[0]
        outs = llm.generate([{"prompt_token_ids": prompt + [7]}], SamplingParams(n=2, temperature=0, max_tokens=NEW,
                                                                                 min_tokens=NEW), use_tqdm=False)
        forked = [o.token_ids for o in outs[0].outputs]
        hits_before = llm.stats().prefix_cache_hits
        again = ids(llm, [prompt])[0]
        assert llm.stats().prefix_cache_hits > hits_before
        plain = ids(llm, [prompt + [7]])[0]
    assert again == single
    assert forked == [plain, plain]


# --- capacity ------------------------------------------------------------------------------------------
def spec(dtype: torch.dtype, cache_dtype: torch.dtype | None) -> KVCacheSpec:
    """SmolLM2-135M's KV shape: 30 layers, 3 KV heads of 64."""
    return KVCacheSpec(30, 3, 64, dtype, torch.device("cpu"), cache_dtype)


def token_capacity(name: str, s: KVCacheSpec, budget: int, max_num_seqs: int = 256) -> int:
    """Tokens the strategy's manager holds at `budget` (hybrid: as much again in the host tier);
    sequences of up to 256 tokens. benchmarks/kv_cache_dtype.py reports it too."""
    options = StrategyOptions(block_size=16, max_num_seqs=max_num_seqs)
    if name == "hybrid":
        shape = ModelShape("smol", 30, 576, 9, 3, 64, 1536, 49152, dtype_bytes=s.dtype.itemsize,
                           kv_token_head_bytes=s.token_head_bytes)
        options = HybridOptions(block_size=16, max_num_seqs=max_num_seqs, host_budget_bytes=budget, act_ratio=0.0,
                                shape=shape)
    manager = registry.build_manager(name, s, budget, 256, options)
    try:
        if name == "paged":
            return manager.pool.num_blocks * manager.block_size
        if name == "static":
            return manager.kv.shape[3] * manager.block_size
        if name == "virtual":
            return manager.max_chunks * manager.layout.page_tokens
        return manager.device_tier.pool.num_blocks * manager.block_size + manager.plan.capacity_tokens
    finally:
        manager.close()


@pytest.mark.parametrize("name", ["paged", "static", "virtual", "hybrid"])
def test_the_same_budget_holds_about_twice_the_tokens_of_bf16(name):
    budget = 64 * 2**20
    bf16 = token_capacity(name, spec(torch.bfloat16, None), budget)
    fp32 = token_capacity(name, spec(torch.float32, None), budget)
    int8 = token_capacity(name, spec(torch.bfloat16, torch.int8), budget)
    fp8 = token_capacity(name, spec(torch.bfloat16, torch.float8_e4m3fn), budget)
    # int8 pays 4 bytes of scale per 64 elements: 128 / 68 = 1.88x bf16; fp8 exactly 2x (less rounding).
    assert 1.8 <= int8 / bf16 <= 1.95, (bf16, int8)  # static: whole slots round either way
    assert 1.9 <= fp8 / bf16 <= 2.05, (bf16, fp8)
    assert int8 / fp32 >= 3.6 and fp8 / fp32 >= 3.8, (fp32, int8, fp8)


def test_bytes_per_token_count_the_scales():
    assert spec(torch.bfloat16, None).bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert spec(torch.bfloat16, torch.float8_e5m2).bytes_per_token == 2 * 30 * 3 * 64
    int8 = spec(torch.bfloat16, torch.int8)
    assert int8.bytes_per_token == 2 * 30 * 3 * (64 + 4) and int8.scale_bytes_per_token == 2 * 30 * 3 * 4


def test_virtual_pages_hold_twice_the_tokens():
    """Head-major 4 KiB pages: 32 bf16 tokens of one head, 64 quantized ones."""
    for cache_dtype, tokens in ((None, 32), (torch.int8, 64), (torch.float8_e4m3fn, 64)):
        manager = VirtualKVCacheManager(spec(torch.bfloat16, cache_dtype), 2, 128, 2**24)
        try:
            assert manager.layout.page_tokens == tokens
        finally:
            manager.close()


# --- bad settings ------------------------------------------------------------------------------------
def test_an_unknown_kv_cache_dtype_is_refused_by_name(capsys):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, int8"):
        EngineConfig(kv_cache_dtype="fp16")
    assert cli_main(["generate", "--prompt", "x", "--kv-cache-dtype", "int4"]) == 2
    assert "kv_cache_dtype" in capsys.readouterr().err


def test_int8_virtual_on_cuda_is_refused_naming_kv_cache_dtype():
    # Refused before any driver is opened, so this runs without a GPU.
    with pytest.raises(ValueError, match="kv_cache_dtype='int8'"):
        VirtualKVCacheManager(KVCacheSpec(2, 2, 16, torch.float16, torch.device("cuda"), torch.int8), 2, 64, 2**20)


@pytest.mark.parametrize("strategy", ["paged", "virtual"])
def test_the_torch_paths_read_what_the_native_kernel_reads(tiny, strategy, monkeypatch):
    """Without the native kernel, decodes gather blocks (paged), read slot runs in place or gather
    chunks of a ragged batch (virtual, its int8 scales token-major in their own reservation), and
    prefills gather their cached prefix: the same greedy tokens."""
    batch = prompts() + [p[:5] for p in prompts()]  # ragged: many runs of slots
    with engine(tiny, strategy, "int8", kv_cache_memory="4MiB", max_num_seqs=16) as llm:
        native = ids(llm, batch)
    from kvmem.attention import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "decode_attention_kernel", lambda: None)
    with engine(tiny, strategy, "int8", kv_cache_memory="4MiB", max_num_seqs=16) as llm:
        assert ids(llm, batch) == native
        assert_memory_back(llm)
    if strategy == "virtual":  # every decode batch gathers chunks instead of reading runs in place
        monkeypatch.setattr("kvmem.attention.metadata.IN_PLACE_MAX_RUNS", 0)
        with engine(tiny, strategy, "int8", kv_cache_memory="4MiB", max_num_seqs=16) as llm:
            assert ids(llm, batch) == native
