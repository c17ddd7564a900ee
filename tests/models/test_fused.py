"""The native fused ops against their torch references (which round where HF's Llama rounds)."""

import pytest
import torch

from kvmem.attention import cpu_kernels
from kvmem.models import fused

native = cpu_kernels.load()
pytestmark = pytest.mark.skipif(native is None, reason="no C++ toolchain for the native CPU kernels")
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)]


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm(dtype, tol, rows):
    x, w = randn(rows, 576, dtype=dtype), randn(576, dtype=dtype, seed=1)
    out = native.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, fused.rms_norm_reference(x, w, 1e-5), atol=tol, rtol=tol)
    # A strided input (a slice of wider rows) is read correctly.
    wide = randn(rows, 1000, dtype=dtype, seed=2)
    torch.testing.assert_close(native.rms_norm(wide[:, :576], w, 1e-5), native.rms_norm(wide[:, :576].contiguous(), w, 1e-5))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_add_rms_norm_adds_into_the_residual(dtype, tol):
    x, res, w = randn(9, 64, dtype=dtype), randn(9, 64, dtype=dtype, seed=1), randn(64, dtype=dtype, seed=2)
    expected_h = res + x
    expected = fused.rms_norm_reference(expected_h, w, 1e-6)
    h, out = fused.add_rms_norm(x, res, w, 1e-6)
    assert h.data_ptr() == res.data_ptr()  # in place
    assert torch.equal(h, expected_h)  # one rounded add, as torch's
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "portable"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_silu_mul(dtype, tol, vector):
    gate_up = randn(5, 2 * 1539, dtype=dtype) * 4  # large gates too (silu's tails), a ragged tail of lanes
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(gate_up, vector=vector), torch.nn.functional.silu(gate) * up,
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_inside_the_qkv_projection(dtype):
    """q and k are rotated where they lie in the fused projection's output; v is left alone."""
    T, heads, kv_heads, dim = 6, 4, 2, 16
    qkv = randn(T, (heads + 2 * kv_heads) * dim, dtype=dtype)
    angles = randn(T, 1, dim, dtype=torch.float32, seed=3)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qk_view = qkv[:, : (heads + kv_heads) * dim].view(T, heads + kv_heads, dim)
    expected = fused.apply_rope_reference(qk_view.clone(), cos, sin)
    v_before = qkv[:, (heads + kv_heads) * dim:].clone()
    out = fused.apply_rope_(qk_view, cos, sin)
    assert out.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qk_view, expected, atol=1e-6, rtol=0 if dtype == torch.float32 else 1e-2)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v_before)


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_first_index_on_ties_and_nan(dtype, vector):
    logits = randn(4, 1001, dtype=dtype)
    logits[1, 10] = logits[1, 900] = 50  # a tie: the first wins
    logits[2, 333] = float("nan")  # torch counts NaN as the largest
    logits[3] = float("-inf")
    logits[3, 1000] = 0
    assert native.argmax_rows(logits, vector=vector).tolist() == logits.float().argmax(-1).tolist() == [
        int(logits[0].float().argmax()), 10, 333, 1000]
