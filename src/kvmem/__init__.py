"""kvmem: an LLM inference engine built around how it manages KV-cache memory.

The public names are imported lazily, so that `import kvmem.memory.paged` (or the CLI's --help)
does not pay for loading the whole engine.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "kvmem.llm",
    "SamplingParams": "kvmem.sampling_params",
    "RequestOutput": "kvmem.outputs",
    "CompletionOutput": "kvmem.outputs",
    "Logprob": "kvmem.outputs",
    "MemoryStats": "kvmem.memory.base",
    "StructuredOutputsParams": "kvmem.structured_outputs.params",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kvmem' has no attribute {name!r}")
