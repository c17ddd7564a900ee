"""Compiles `StructuredOutputsParams` into xgrammar grammars for one tokenizer, off the step's path.

`submit(params)` returns a future at once; one worker thread compiles (xgrammar's own compile is
milliseconds for common schemas, but a large schema or grammar can take much longer, and the engine
thread must never wait on it). Futures are cached by what they compile (`GrammarKey`), so a schema
sent by many requests compiles once, and a request arriving while the same grammar compiles waits on
the same future. A spec that does not compile fails its future with a ValueError whose message starts
with the parameter's name (`structured_outputs.regex: ...`).

The vocabulary xgrammar matches against is the model's (logits width), built from the Rust
tokenizer's token strings; the vocabulary type (byte-level BPE, byte-fallback SentencePiece) is
detected by xgrammar from the tokenizer's JSON, as it does for a Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kvmem.structured_outputs.params import GrammarKey, StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar
    from kvmem.tokenizer import Tokenizer

# Compiled grammars kept (each holds a per-token cache: for a 50k vocabulary, tens of KB to a few MB).
CACHE_SIZE = 256


class GrammarCompiler:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._lock = threading.Lock()  # the cache is used from the engine thread and the server's
        self._executor: ThreadPoolExecutor | None = None
        self._compiler: xgrammar.GrammarCompiler | None = None  # built on the worker, on first use
        self.closed = False

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (`xgrammar.CompiledGrammar`); cached."""
        key = params.key
        with self._lock:
            if self.closed:
                raise RuntimeError("the grammar compiler is closed")
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvmem-grammar")
            future = self._executor.submit(self._compile, key)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def compile(self, params: StructuredOutputsParams, timeout: float | None = None) -> Any:
        """Compile and wait; raises ValueError naming the parameter when the spec does not compile."""
        return self.submit(params).result(timeout)

    def close(self) -> None:
        """Stop the worker (a compile in progress finishes first); idempotent."""
        with self._lock:
            self.closed = True
            executor, self._executor = self._executor, None
            self._cache.clear()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # --- the worker thread ----------------------------------------------------------------
    def _xgr_compiler(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            import xgrammar as xgr

            backend = self.tokenizer.backend
            # The mask covers the logits' width: tokens past the model's vocabulary are never sampled,
            # and ids past the tokenizer's (padding rows of the embedding) are never allowed.
            size = min(self.tokenizer.vocab_size, self.vocab_size)
            vocab = [backend.id_to_token(i) or "" for i in range(size)]
            meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
            info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=self.vocab_size,
                                     stop_token_ids=self.stop_token_ids, add_prefix_space=meta["add_prefix_space"])
            # One thread: the engine's threads already use the cores; xgrammar's own cache is on.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def _compile(self, key: GrammarKey) -> Any:
        compiler = self._xgr_compiler()
        try:
            if key.kind == "json":
                return compiler.compile_json_schema(key.spec, any_whitespace=key.any_whitespace)
            if key.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=key.any_whitespace)
            if key.kind == "regex":
                return compiler.compile_regex(key.spec)
            if key.kind == "choice":
                choices = json.loads(key.spec)
                # EBNF string literals take JSON's escapes; non-ASCII stays as is.
                ebnf = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
                return compiler.compile_grammar(ebnf)
            if key.kind == "grammar":
                if "::=" in key.spec:
                    return compiler.compile_grammar(key.spec)
                return compiler.compile_lark(key.spec)  # Lark's "rule: ..." syntax, as vLLM accepts
        except Exception as e:  # xgrammar raises RuntimeError, ValueError and its own errors
            # xgrammar's messages start with "[time] /path/file.cc:line: "; keep what follows.
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = message.split(": ", 1)[1] if message.startswith("[") and ": " in message else message
            raise ValueError(f"structured_outputs.{key.kind}: cannot compile: {message}") from None
        raise ValueError(f"structured_outputs: unknown kind {key.kind!r}")


def new_matcher(compiled: Any) -> Any:
    """A fresh `xgrammar.GrammarMatcher` for one sequence."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled)
