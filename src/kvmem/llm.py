"""`LLM`: offline batch generation, the way vLLM's `LLM` class is used."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kvmem.config import EngineConfig
from kvmem.engine.llm_engine import LLMEngine, PromptInput
from kvmem.memory.base import MemoryStats
from kvmem.outputs import RequestOutput
from kvmem.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model and generate from it.

    `model`: a Hub id ("org/name", "org/name:Q4_K_M"), a Hugging Face directory or a .gguf file;
    None = the embedded SmolLM2-135M-Instruct.
    `kv_cache`: "paged" (default), "static", "virtual" or "hybrid". `kv_cache_memory`: bytes, a size
    like "2GiB", or a fraction of the memory available after the weights. The other keywords are
    `EngineConfig`'s; "hybrid" takes `device_memory`, `host_memory`, `act_ratio` (None: the cost
    model decides) and `offload_weights` (see `kvmem.memory.hybrid`).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (strings or `{"prompt_token_ids": [...]}`); outputs come back
        in the order of the prompts."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")
        # Tokenize and validate every prompt before queueing any, so a bad one leaves the engine untouched.
        tokenized = []
        for prompt in prompts:
            text, token_ids = self.engine.tokenize_prompt(prompt)
            self.engine.check_prompt(token_ids)
            tokenized.append({"prompt": text, "prompt_token_ids": token_ids})
        # Likewise every grammar (structured outputs): one that does not compile is a ValueError
        # naming it, before anything is queued. Compiles are cached; the engine reuses them.
        grammars = [self.engine.grammars.submit(sp.structured_outputs) for sp in params_list
                    if sp.structured_outputs is not None]
        for grammar in grammars:
            grammar.result()
        request_ids = [self.engine.add_request(p, sp) for p, sp in zip(tokenized, params_list)]
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        tokenizer = self.engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 **(chat_template_kwargs or {}))
            # The template already wrote any BOS; do not add another.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req", dynamic_ncols=True,
                   disable=not use_tqdm)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        try:
            while len(finished) < len(wanted):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        in_tokens += len(out.prompt_token_ids)
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"input: {in_tokens / elapsed:.0f} tok/s, "
                                            f"output: {out_tokens / elapsed:.0f} tok/s", refresh=False)
                        bar.update(1)
                if not self.engine.has_unfinished_requests() and len(finished) < len(wanted):
                    raise RuntimeError("engine stopped with requests unfinished")
        except BaseException:
            for request_id in wanted - finished.keys():  # e.g. Ctrl-C: give their memory back
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        errors = [o.metrics["error"] for o in finished.values() if "error" in o.metrics]
        if errors:
            raise RuntimeError(errors[0])
        return [finished[r] for r in request_ids]

    def stats(self) -> MemoryStats:
        return self.engine.stats()

    def close(self) -> None:
        """Give back everything the engine holds beyond Python objects: its threads are joined and
        its mappings released. Idempotent; `with LLM(...) as llm:` calls it on leaving the block."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def release_free_memory(self) -> int:
        """Give back idle KV memory (cached prefixes; for `virtual`, every idle mapped page, which
        really returns to the OS); returns the bytes released."""
        return self.engine.release_free_memory()
