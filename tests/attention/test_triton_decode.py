"""The Triton decode kernel against the reference attention, for the paged and the contiguous
(virtual) layouts. Runs on a GPU when there is one, else through Triton's interpreter on CPU;
skipped where Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernel is defined
pytest.importorskip("triton")

from kvmem.attention.metadata import AttentionMetadata  # noqa: E402
from kvmem.attention.torch_attention import reference_attention  # noqa: E402
from kvmem.attention.triton_decode import triton_decode_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(q, k_cache, v_cache, tables, lens):
    """reference_attention on the same caches (its write of this step's K,V is made a no-op by
    writing the values already there)."""
    kv_heads, _, block_size, dim = k_cache.shape
    meta = AttentionMetadata.build(tables, [n - 1 for n in lens], [1] * len(lens), block_size, DEVICE)
    flat_k, flat_v = k_cache.view(kv_heads, -1, dim), v_cache.view(kv_heads, -1, dim)
    k_new = flat_k[:, meta.slot_mapping].transpose(0, 1).clone()
    v_new = flat_v[:, meta.slot_mapping].transpose(0, 1).clone()
    return reference_attention(q, k_new, v_new, k_cache, v_cache, meta, dim ** -0.5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_layout(heads, kv_heads, dtype):
    torch.manual_seed(0)
    dim, block_size, num_blocks = 16, 8, 40
    lens = [1, 9, 33, 70]
    k_cache = torch.randn(kv_heads, num_blocks, block_size, dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in lens:
        need = -(-n // block_size)
        tables.append(perm[used:used + need])
        used += need
    q = torch.randn(len(lens), heads, dim, dtype=dtype, device=DEVICE)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    got = triton_decode_attention(q, k_cache, v_cache, padded, torch.tensor(lens, device=DEVICE), dim ** -0.5,
                                  block_n=16)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), reference(q, k_cache, v_cache, tables, lens).float(), atol=tol, rtol=tol)


def test_contiguous_slots_never_read_past_the_length():
    """Virtual layout: one block of max_len per slot. Keys past each length are NaN: reading any of
    them would poison the output."""
    torch.manual_seed(1)
    heads, kv_heads, dim, slots, max_len = 6, 3, 32, 5, 96
    lens = [96, 1, 40, 77]
    table = [[3], [0], [4], [1]]
    k_cache = torch.full((kv_heads, slots, max_len, dim), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    for (slot,), n in zip(table, lens):
        k_cache[:, slot, :n] = torch.randn(kv_heads, n, dim, device=DEVICE)
        v_cache[:, slot, :n] = torch.randn(kv_heads, n, dim, device=DEVICE)
    q = torch.randn(len(lens), heads, dim, device=DEVICE)
    got = triton_decode_attention(q, k_cache, v_cache, torch.tensor(table, device=DEVICE),
                                  torch.tensor(lens, device=DEVICE), dim ** -0.5, block_n=32)
    assert not got.isnan().any()
    torch.testing.assert_close(got, reference(q, k_cache, v_cache, table, lens), atol=1e-5, rtol=1e-5)


def test_bad_head_counts_are_refused():
    q = torch.zeros(1, 5, 8, device=DEVICE)
    cache = torch.zeros(2, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="heads"):
        triton_decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                                torch.ones(1, dtype=torch.int32, device=DEVICE), 1.0)


@pytest.mark.parametrize("kv_cache", ["paged", "virtual"])
def test_engine_on_the_triton_backend_gives_transformers_greedy_tokens(tmp_path, kv_cache):
    # Every row, prompt chunks included, goes through the kernel: chunked prefill on top of a cached
    # prefix (max_num_batched_tokens=8) and decodes of sequences of several lengths in one batch.
    from transformers import AutoModelForCausalLM

    from kvmem import LLM, SamplingParams
    from tests.oracle import hf_greedy, make_tiny_model

    tiny = make_tiny_model(tmp_path / "llama", "llama3-gqa")
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    prompts = [[5, 17, 42, 99, 3, 250, 8, 11, 12, 13, 14], [7, 8, 9], [5, 17, 42, 99, 3, 250, 8, 100]]
    with LLM(str(tiny), dtype="float32", kv_cache=kv_cache, kv_cache_memory="4MiB", block_size=4,
             max_num_batched_tokens=8, attention_backend="triton", device=str(DEVICE)) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, min_tokens=6, max_tokens=6), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 6) for p in prompts]


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantized_caches_are_widened_in_the_kernel(dtype):
    """int8 (per-token scales) and float8 caches (decoded from their bits): the kernel gives attention
    over the values they hold, as the reference computes it on a float32 copy."""
    from kvmem.attention import kv_quant

    torch.manual_seed(2)
    heads, kv_heads, dim, block_size, num_blocks = 6, 2, 16, 8, 12
    full = torch.randn(2, kv_heads, num_blocks, block_size, dim, device=DEVICE) * 4
    full[0, 0, 0, 0, :4] = torch.tensor([1e-3, -3e-5, 0.0, 500.0])  # subnormal, zero and clamped values
    stored, scales = kv_quant.quantize(full, dtype)
    plain = kv_quant.dequantize(stored, scales, torch.float32)
    lens, tables = [1, 9, 40], [[0], [3, 5], [1, 2, 4, 6, 7]]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    q = torch.randn(len(lens), heads, dim, device=DEVICE)
    ks, vs = (None, None) if scales is None else (scales[0], scales[1])
    got = triton_decode_attention(q, stored[0], stored[1], padded, torch.tensor(lens, device=DEVICE), dim ** -0.5,
                                  block_n=16, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(got, reference(q, plain[0].clone(), plain[1].clone(), tables, lens), atol=1e-5,
                               rtol=1e-5)


def test_a_cache_dtype_the_kernel_cannot_read_is_refused_naming_kv_cache_dtype():
    q = torch.zeros(1, 2, 8, device=DEVICE)
    cache = torch.zeros(2, 1, 4, 8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        triton_decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                                torch.ones(1, dtype=torch.int32, device=DEVICE), 1.0)
