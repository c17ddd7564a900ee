"""Structured outputs: generation constrained by a JSON schema, a regex, a list of choices or a
grammar, through xgrammar (vLLM's default backend).

- `params`: `StructuredOutputsParams`, what a request asks for (vLLM's names), validated.
- `compiler`: `GrammarCompiler`, compiles those into xgrammar grammars for one tokenizer, off the
  step's path (a worker thread), cached.
- `bitmask`: fills the allowed-token bitmask of the constrained rows of a batch and applies it to
  their logits (rows without a grammar cost nothing).

xgrammar is imported only when a grammar is first compiled: it pulls in transformers, which takes
seconds, and an engine that never sees a constrained request should not pay for it.
"""

from kvmem.structured_outputs.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
