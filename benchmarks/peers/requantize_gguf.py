"""Requantize a GGUF with llama.cpp's own quantizer (llama-cpp-python): the embedded Q4_1 SmolLM2 as
Q8_0 or Q4_0, to measure every block type kvmem keeps on the same model. Run with the llama.cpp venv:

    benchmarks/peers/run_llamacpp.sh requantize_gguf.py IN.gguf OUT.gguf Q8_0|Q4_0|Q4_1|Q4_K_M|Q5_K_M|Q6_K

(From Q4_1 the weights are already rounded once; the new file is still a valid test of each format.)
"""
import ctypes
import sys

import llama_cpp

FTYPES = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
          "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
          # K-quant mixes: llama.cpp falls back to Q5_0/Q5_1/Q8_0 for tensors whose rows are not
          # whole 256-value super-blocks (SmolLM2's K = 576 layers), so these files mix types.
          "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
          "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}


def main() -> None:
    src, dst, kind = sys.argv[1:4]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    print(f"wrote {dst} ({kind})")


if __name__ == "__main__":
    main()
