import numpy as np
import pytest
import torch

from kvmem.models import quant_kernels
from kvmem.models.quantized_embedding import QuantizedEmbedding
from tests.models.test_gguf_blocks import TYPES, quantized


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_lookup_equals_dequantized_table(qtype, native, monkeypatch):
    if not native:
        monkeypatch.setattr(quant_kernels, "load", lambda: None)
    elif quant_kernels.load() is None:
        pytest.skip("no C++ toolchain for the native kernels")
    blocks, table = quantized(50, 256, qtype)
    emb = QuantizedEmbedding(50, 256, int(qtype), torch.bfloat16)
    emb.qweight.copy_(blocks)
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    out = emb(ids)
    assert out.shape == (2, 3, 256) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(table)[ids].bfloat16())
