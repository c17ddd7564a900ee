"""The synchronous engine: requests in, one scheduled step at a time, outputs out.

`step()` = schedule → run the model → advance computed tokens → sample → append, detokenize,
check stops → free what finished. Everything that decides memory lives in the manager, everything
that decides what runs lives in the scheduler; this file wires them and owns the requests.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from kvmem.attention import cpu_kernels
from kvmem.config import EngineConfig
from kvmem.engine.detokenizer import IncrementalDetokenizer
from kvmem.engine.host_allocator import keep_freed_memory
from kvmem.engine.kv_events import KVEventsConfig, KVEventStream, make_publisher
from kvmem.engine.sampler import SampledToken, SamplingRow, prompt_logprobs, sample
from kvmem.engine.scheduler import Scheduler
from kvmem.engine.sequence import Sequence, SequenceStatus
from kvmem.attention.kv_quant import storage_dtype
from kvmem.memory.base import KVCacheManager, KVCacheSpec, MemoryStats
from kvmem.memory.registry import build_manager, strategy_class
from kvmem.memory.tiers.fingerprint import weights_fingerprint
from kvmem.memory.tiers.store import build_tier_store
from kvmem.models import gguf_blocks, int8_weights, kv_scales, quant_kernels
from kvmem.models.llama import LlamaForCausalLM
from kvmem.models.loader import load_model
from kvmem.models.source import ModelSource
from kvmem.outputs import CompletionOutput, Logprob, RequestOutput
from kvmem.progress import human_bytes, say
from kvmem.sampling_params import SamplingParams
from kvmem.structured_outputs.compiler import GrammarCompiler, new_matcher

logger = logging.getLogger(__name__)

PromptInput = str | dict[str, Any] | list[int]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, a shared storage once (oneDNN-packed weights are
    opaque tensors without a storage: their elements count)."""
    seen: dict[int, int] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except NotImplementedError:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def describe_quantized(plan: dict[str, int]) -> str:
    """"Q4_1 x210, Q8_0 x1": the block formats of the weights kept quantized, by count."""
    counts = collections.Counter(gguf_blocks.format_of(t).name for t in plan.values())
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def describe_kv_cache(manager: KVCacheManager, max_model_len: int) -> str:
    """One line a user reads at start: how many tokens the KV cache holds, in how much memory, and
    how many full-length requests that is."""
    stats = manager.stats()
    budget = stats.bytes_capacity or stats.bytes_reserved
    tokens = budget // manager.spec.bytes_per_token
    stored = manager.spec.storage_dtype
    kind = "" if stored == manager.spec.dtype else f" as {str(stored).removeprefix('torch.')}"
    return (f"KV cache: {manager.name}{kind}, {human_bytes(budget)} for {tokens:,} tokens "
            f"({manager.spec.bytes_per_token:,} bytes each); max_model_len {max_model_len:,}, "
            f"{tokens / max_model_len:.1f}x that in all")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]  # ordered by sample index once all forks happened
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    error: str | None = None
    # With params.prompt_logprobs: per prompt token (None for the first), filled as prefill goes.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_left: int = 0  # entries still to fill
    grammar: Future | None = None  # structured outputs: the compiled grammar, once the compiler is done

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


@dataclass(frozen=True)
class EngineLoad:
    """How busy the engine is now (what /metrics, a router and a benchmark read)."""

    num_requests: int
    num_running: int  # sequences scheduled to run
    num_waiting: int  # sequences queued (new or preempted)
    num_preemptions: int  # since the engine started


@dataclass
class EngineCounters:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0


class LLMEngine:
    @staticmethod
    def _quantized_plan(config: EngineConfig, source: ModelSource) -> dict[str, int]:
        """HF weight name -> GGML type of the weights to keep in their GGUF blocks (see
        `EngineConfig.quantization`); empty to dequantize everything at load."""
        if not config.keeps_quantized_weights():
            return {}
        if config.quantization == "int8":
            if source.quantized_weights is not None:
                raise ValueError(f"quantization 'int8' quantizes a Hugging Face checkpoint at load; {source.path} "
                                 "is a GGUF: use quantization 'gguf' to keep its own blocks")
            return LlamaForCausalLM.quantized_plan(source.config, int8_weights.int8_types(source.config))
        if config.quantization == "gguf" and source.quantized_weights is None:
            raise ValueError(f"quantization 'gguf' needs a GGUF model; {source.path} is not a .gguf file")
        if source.quantized_weights is None:
            return {}
        if config.quantization == "auto" and quant_kernels.load() is None:
            return {}  # without the native kernels a quantized layer dequantizes at every call: do it once
        plan = LlamaForCausalLM.quantized_plan(source.config, source.quantized_types)
        if not plan and config.quantization == "gguf":
            say("quantization gguf: no weight of %s is in a block format kvmem keeps (%s); dequantizing at load",
                source.path.name, ", ".join(f.name for f in gguf_blocks.FORMATS.values()))
        return plan

    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        self.tp = None  # tensor_parallel_size > 1: the other ranks (kvmem.distributed.executor)
        try:
            self._build(config, source)
        except BaseException:
            if self.tp is not None:  # a failed start must not leave worker processes behind
                self.tp.close()
            raise

    def _build(self, config: EngineConfig, source: ModelSource | None) -> None:
        if source is not None and config.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 loads the model on every rank from config.model; give the "
                             "model's path or Hub id there instead of a ModelSource")
        self.config = config
        # Process-wide settings, only where an option asks: torch's thread count, glibc's malloc.
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        if config.tune_host_allocator:
            keep_freed_memory()  # no page faults on every step's temporaries (see host_allocator)
        # The RNG of requests that set no seed of their own: the engine's, not torch's global one.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        started = time.monotonic()
        source = source or load_model(config.model, revision=config.revision, download_dir=config.download_dir,
                                      gguf_file=config.gguf_file)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        if config.chat_template is not None:  # --chat-template: instead of the model's
            self.tokenizer.set_chat_template(config.chat_template_text())
        self.dtype = config.torch_dtype(self.model_config.torch_dtype)

        trained_len = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > trained_len:
            raise ValueError(f"max_model_len ({config.max_model_len}) is longer than the model's context "
                             f"({trained_len} positions in its config)")
        max_model_len = config.max_model_len or trained_len
        # tensor_parallel_size > 1: the other ranks start now and load their shards beside ours.
        if config.tensor_parallel_size > 1:
            from kvmem.distributed.executor import TensorParallelExecutor
            from kvmem.distributed.shard import check_divisible

            check_divisible(self.model_config, config.tensor_parallel_size)  # before starting anything
            self.tp = TensorParallelExecutor(config)
        # --quantization gguf|auto: which weights stay in their GGUF blocks (none for other checkpoints,
        # nor for tensor-parallel ranks, which slice full-width weights).
        quantized = self._quantized_plan(config, source) if self.tp is None else {}
        # offload_weights (hybrid only): the layers stay in host memory and stream to the device per layer.
        if quantized:
            say("keeping %d weight matrices quantized (%s), the rest as %s (%d layers)", len(quantized),
                describe_quantized(quantized), str(self.dtype).removeprefix("torch."),
                self.model_config.num_hidden_layers)
        else:
            say("%s the weights to %s (%d layers)", "dequantizing" if source.path.suffix == ".gguf" else "loading",
                str(self.dtype).removeprefix("torch."), self.model_config.num_hidden_layers)
        # fp8 KV scales a checkpoint carries: used by fp8, folded into the projections (kv_scales).
        scales, scales_note = kv_scales.resolve(source.kv_scale_tensors, self.model_config.num_hidden_layers,
                                                config.kv_cache_dtype)
        if scales_note:
            say("%s", scales_note)
        weights = kv_scales.weights_with_scales(source.weights, scales)
        if self.tp is not None:  # this rank's heads and MLP columns, row-parallel projections all-reduced
            self.model = self.tp.build_model(self.model_config, max_model_len, self.dtype, weights(),
                                             config.batch_invariant)
        else:
            self.model = LlamaForCausalLM.build(self.model_config, max_model_len, self.dtype,
                                                torch.device("cpu") if config.offload_weights else self.device,
                                                quantized=quantized)
            if quantized and config.quantization == "int8":
                self.model.load_weights(int8_weights.quantize_at_load(weights(), quantized))
            else:
                self.model.load_weights(source.quantized_weights(quantized) if quantized else weights())
            # Prefix-cache tiers: what the stored KV depends on, from the weights as loaded (before packing).
            weights_fp = weights_fingerprint(self.model.state_dict().items()) if config.offloads_kv else None
            if self.device.type == "cpu":
                self.model.pack_linear_weights_for_cpu(batch_invariant=config.batch_invariant)
        if self.device.type == "cpu":
            # Now rather than inside the first request: a first build takes a minute and says so.
            cpu_kernels.load()
            if quantized:
                quant_kernels.load()
        # A quantized GGUF dequantized at load becomes full-width weights: say what they take in
        # memory, each tensor once (a tied lm_head's packed copy counts: it is memory).
        weight_bytes = model_bytes(self.model)
        say("weights: %s in memory as %s (the checkpoint: %s)", human_bytes(weight_bytes),
            f"{describe_quantized(quantized)} blocks + {str(self.dtype).removeprefix('torch.')}" if quantized
            else str(self.dtype).removeprefix("torch."),
            human_bytes(source.path.stat().st_size) if source.path.is_file() else "a directory")

        # The KV budget is what is available once the weights are in memory.
        c = self.model_config
        # Tensor parallel: each rank's cache holds its own KV heads, with the whole budget per rank.
        kv_heads = self.tp.shard.num_kv_heads if self.tp is not None else c.num_key_value_heads
        cache_dtype = storage_dtype(config.kv_cache_dtype, self.dtype)
        spec = KVCacheSpec(c.num_hidden_layers, kv_heads, c.head_dim, self.dtype, self.device,
                           None if cache_dtype == self.dtype else cache_dtype)
        strategy = strategy_class(config.kv_cache)
        options = strategy.resolve_options(config, c, spec, max_model_len)
        budget = config.resolve_kv_budget(self.device, weight_bytes)
        self.manager = build_manager(config.kv_cache, spec, budget, max_model_len, options)
        if config.offloads_kv:  # prefix blocks the budget evicts go to host memory / disk (kvmem.memory.tiers)
            try:
                self.manager.attach_tiers(build_tier_store(config, weights_fp, c, spec, options.block_size))
            except BaseException:
                self.manager.close()
                raise
        if self.tp is not None:  # the other ranks build the same manager; ours logs its decisions for them
            self.manager = self.tp.start_replicas(self.manager, self.dtype, max_model_len, budget)
        self.kv_events: KVEventStream | None = None  # vLLM's KV events, when kv_events_config asks for them
        try:
            publisher = make_publisher(KVEventsConfig.parse(config.kv_events_config))
        except BaseException:
            self.manager.close()  # an endpoint in use: give back what the manager holds
            raise
        if publisher is not None:
            self.kv_events = KVEventStream(publisher)
            self.manager.set_event_sink(self.kv_events.sink)
        # A sequence can never hold more than the KV budget: cap the context to it.
        self.max_model_len = min(max_model_len, self.manager.max_tokens_per_sequence)
        say("%s", describe_kv_cache(self.manager, self.max_model_len))
        self.scheduler = Scheduler(self.manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = self.manager.make_runner(self.model, self.device, config.attention_backend, options)
        self.runner.cascade_attention = not config.disable_cascade_attn
        if self.tp is not None:
            self.runner = self.tp.wrap_runner(self.runner)
        self.requests: dict[str, Request] = {}
        self.counters = EngineCounters()
        self.eos_token_ids = list(dict.fromkeys(self.tokenizer.eos_token_ids + self.model_config.eos_token_ids))
        # Structured outputs: grammars compile on the compiler's thread; a request waits here (not in
        # the scheduler) until its grammar is ready, so no step ever waits on a compile.
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._awaiting_grammar: list[Sequence] = []
        self._request_counter = itertools.count()
        self._seq_ids = itertools.count()
        self.closed = False
        say("engine ready in %.1f s", time.monotonic() - started)

    # --- requests -----------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise ValueError("prompt dict must hold 'prompt' (a string) or 'prompt_token_ids' (a list of ints)")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, prompt: PromptInput, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        self._check_open()
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.check_params(params)
        text, token_ids = self.tokenize_prompt(prompt)
        self.check_prompt(token_ids)
        max_tokens = self.max_model_len - len(token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seq = self._new_sequence(request_id, 0, token_ids, len(token_ids), params, max_tokens)
        seq.pending_forks = params.n - 1
        request = Request(request_id, text, token_ids, params, [seq])
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(token_ids)
            request.prompt_logprobs_left = len(token_ids) - 1
        if params.structured_outputs is not None:
            request.grammar = self.grammars.submit(params.structured_outputs)
            self.requests[request_id] = request
            self._awaiting_grammar.append(seq)
            return request_id
        self.requests[request_id] = request
        self.scheduler.add(seq)
        return request_id

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against this model's vocabulary and
        what the runner supports. Messages start with the parameter's name."""
        vocab = self.model_config.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias holds token id {max(params.logit_bias)}, outside this model's "
                             f"vocabulary [0, {vocab})")
        if params.prompt_logprobs is not None and not self.runner.supports_prompt_logprobs:
            raise ValueError(f"prompt_logprobs is not supported with the {self.manager.name} KV cache")

    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens, but max_model_len is {self.max_model_len}: "
                             f"it must be shorter to leave room for at least one generated token")

    def _new_sequence(self, request_id: str, index: int, token_ids: list[int], num_prompt_tokens: int,
                      params: SamplingParams, max_tokens: int) -> Sequence:
        generator = None
        if params.seed is not None and not params.greedy:
            # Sample i of a request draws from its own stream, so its tokens do not depend on
            # the batch it runs in or on the other samples.
            generator = torch.Generator(device=self.device).manual_seed((params.seed + 7919 * index) % 2**63)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids[:num_prompt_tokens], params)
        return Sequence(request_id=request_id, index=index, token_ids=list(token_ids),
                        num_prompt_tokens=num_prompt_tokens, params=params, max_tokens=max_tokens,
                        detokenizer=detok, generator=generator, seq_id=next(self._seq_ids),
                        logprobs=[] if params.logprobs is not None else None)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                if seq in self._awaiting_grammar:
                    self._awaiting_grammar.remove(seq)
                self.scheduler.remove(seq)
                self._finish(seq, "abort")
        if self.tp is not None and not self.closed:
            self.tp.flush()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of the requests that produced tokens or finished."""
        self._check_open()
        try:
            if self.kv_events is None:
                return self._step()
            try:
                return self._step()
            finally:
                self.kv_events.flush()  # what the step did to memory: one batch
        finally:
            if self.tp is not None:
                self.tp.flush()  # sequences that ended: every rank frees their memory now

    def _step(self) -> list[RequestOutput]:
        grammar_failures = self._admit_grammar_ready() if self._awaiting_grammar else []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.manager.has_pending_loads():  # prefix blocks coming from a tier: wait for one, not spin
                self.manager.wait_for_loads(0.05)
                return grammar_failures
            if self._awaiting_grammar and not grammar_failures:
                # Idle but for compiles: wait a little for one, rather than spin on empty steps.
                wait_futures([self.requests[s.request_id].grammar for s in self._awaiting_grammar],
                             timeout=0.05, return_when=FIRST_COMPLETED)
            return grammar_failures + self._fail_unschedulable()
        self.counters.num_steps += 1
        result = self.runner.execute(sched.scheduled)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.manager.on_tokens_computed(s.seq)

        if result.prompt_logits:
            self._add_prompt_logprobs(result.prompt_logits)

        rows: list[SamplingRow] = []
        row_seqs: list[Sequence] = []
        logits_rows: list[int] = []
        for i, seq in enumerate(result.sampled_seqs):
            family = [seq] + self._fork(seq) if seq.pending_forks else [seq]
            for member in family:
                rows.append(SamplingRow(member.params, member.prompt_token_ids, member.output_token_ids,
                                        member.generator, member.grammar))
                row_seqs.append(member)
                logits_rows.append(i)
        if not rows:
            return grammar_failures
        with torch.inference_mode():  # the logits are inference tensors, which the sampler may mask in place
            logits = result.logits if len(logits_rows) == len(result.sampled_seqs) else result.logits[logits_rows]
            sampled = sample(logits, rows, self.eos_token_ids, self.generator)

        touched: dict[str, Request] = {}
        now = time.monotonic()
        outputs = grammar_failures
        for seq, token in zip(row_seqs, sampled):
            request = self.requests[seq.request_id]
            request.first_token_time = request.first_token_time or now
            self._append_token(seq, token)
            touched[seq.request_id] = request
        for request in touched.values():
            outputs.append(self._output(request))
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _add_prompt_logprobs(self, prompt_logits: list[tuple[Sequence, int, torch.Tensor]]) -> None:
        """Fill the prompt logprobs of positions this step computed (a recomputed chunk, after a
        preemption, fills nothing twice)."""
        texts: dict[int, str] = {}  # one decode per distinct token id: the top tokens repeat a lot

        def decode(token_id: int) -> str:
            text = texts.get(token_id)
            if text is None:
                text = texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return text

        for seq, start, logits in prompt_logits:
            request = self.requests.get(seq.request_id)
            if request is None or not request.prompt_logprobs_left:
                continue
            entries = request.prompt_logprobs
            next_ids = seq.token_ids[start + 1:start + 1 + logits.shape[0]]
            with torch.inference_mode():
                scored = prompt_logprobs(logits, next_ids, seq.params.prompt_logprobs)
            for j, (token_id, (lp, rank, top)) in enumerate(zip(next_ids, scored)):
                if entries[start + 1 + j] is not None:
                    continue
                ranked = sorted(top.items(), key=lambda kv: -kv[1])
                entry = {tid: Logprob(tlp, r, decode(tid)) for r, (tid, tlp) in enumerate(ranked, start=1)}
                entry[token_id] = Logprob(lp, rank, decode(token_id))
                entries[start + 1 + j] = entry
                request.prompt_logprobs_left -= 1
            if not request.prompt_logprobs_left:  # complete: from now on never written, so shared by outputs
                request.prompt_logprobs = list(entries)

    def _admit_grammar_ready(self) -> list[RequestOutput]:
        """Requests whose grammar compiled go to the scheduler, each sequence with its own matcher;
        those whose grammar failed to compile end with that error (their outputs are returned)."""
        failed: list[RequestOutput] = []
        still: list[Sequence] = []
        for seq in self._awaiting_grammar:
            request = self.requests[seq.request_id]
            if not request.grammar.done():
                still.append(seq)
                continue
            error = request.grammar.exception()
            if error is None:
                seq.grammar = new_matcher(request.grammar.result())
                self.scheduler.add(seq)
                continue
            request.error = str(error)
            for s in request.seqs:
                self._finish(s, "abort")
            del self.requests[request.request_id]
            failed.append(self._output(request))
        self._awaiting_grammar = still
        return failed

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The prompt is computed: make the request's other n - 1 samples share it."""
        request = self.requests[parent.request_id]
        children = []
        for index in range(1, parent.pending_forks + 1):
            child = self._new_sequence(parent.request_id, index, parent.token_ids, parent.num_prompt_tokens,
                                       parent.params, parent.max_tokens)
            child.num_computed_tokens = parent.num_computed_tokens
            if parent.grammar is not None:  # each sample follows the grammar on its own
                child.grammar = parent.grammar.fork()
            self.manager.fork(parent, child)
            if child.num_computed_tokens == parent.num_computed_tokens:
                self.scheduler.add_running(child, after=children[-1] if children else parent)
            else:  # the manager could not share: the child recomputes its prompt
                self.scheduler.add(child)
            children.append(child)
        parent.pending_forks = 0
        request.seqs.extend(children)
        return children

    def _append_token(self, seq: Sequence, token: SampledToken) -> None:
        seq.token_ids.append(token.token_id)
        self.counters.num_generation_tokens += 1
        if seq.num_output_tokens == 1:
            self.counters.num_prompt_tokens += seq.num_prompt_tokens
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprobs(token))
            seq.cumulative_logprob += token.logprob
        params, t = seq.params, token.token_id
        is_eos = t in self.eos_token_ids and not params.ignore_eos
        if seq.grammar is not None and not self._advance_grammar(seq, t):
            return
        if seq.num_output_tokens >= params.min_tokens and (is_eos or t in params.stop_token_ids):
            # The stopping token's text is not part of the output (as in vLLM) unless asked for.
            if params.include_stop_str_in_output:
                seq.detokenizer.add_token(t)
            self._finish(seq, "stop", t if t in params.stop_token_ids else None)
        elif (stop_string := seq.detokenizer.add_token(t)) is not None:
            self._finish(seq, "stop", stop_string)
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")
        if seq.is_finished:
            self.scheduler.remove(seq)

    def _advance_grammar(self, seq: Sequence, token_id: int) -> bool:
        """Feed the token to the sequence's matcher; False when that ended the sequence: the grammar
        terminated on an end token that would not stop it otherwise (ignore_eos), or refused the
        token (which the mask rules out; kept as a guard so a bug cannot emit invalid output)."""
        if not seq.grammar.accept_token(token_id):
            logger.error("request %s: the grammar refused token %d; ending the sequence", seq.request_id, token_id)
            self._finish(seq, "abort")
        elif seq.grammar.is_terminated() and not (token_id in self.eos_token_ids and not seq.params.ignore_eos):
            self._finish(seq, "stop", token_id if token_id in seq.params.stop_token_ids else None)
        else:
            return True
        self.scheduler.remove(seq)
        return False

    def _logprobs(self, token: SampledToken) -> dict[int, Logprob]:
        """vLLM's shape: the top tokens with their ranks, plus the chosen token with its own rank."""
        ranked = sorted(token.top_logprobs.items(), key=lambda kv: -kv[1])
        return {tid: Logprob(lp, token.rank if tid == token.token_id else rank,
                             self.tokenizer.decode([tid], skip_special_tokens=False))
                for rank, (tid, lp) in enumerate(ranked, start=1)}

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _fail_unschedulable(self) -> list[RequestOutput]:
        """Nothing could run although requests wait: the head of the queue can never fit."""
        if not self.scheduler.waiting or self.scheduler.running:
            return []
        seq = self.scheduler.waiting[0]
        request = self.requests[seq.request_id]
        request.error = (f"request {seq.request_id} needs {seq.num_tokens} tokens of KV cache, "
                         f"more than the {self.manager.max_tokens_per_sequence} the cache can ever give it")
        logger.error(request.error)
        for s in request.seqs:
            self.scheduler.remove(s)
            self._finish(s, "abort")
        del self.requests[request.request_id]
        return [self._output(request)]

    def _output(self, request: Request) -> RequestOutput:
        # Every field is a snapshot (new lists, immutable values): the async engine hands outputs
        # to another thread while this one goes on appending to the sequences.
        completions = []
        for seq in sorted(request.seqs, key=lambda s: s.index):
            text_delta = seq.detokenizer.take_delta(seq.is_finished)  # first: a finished one flushes
            completions.append(CompletionOutput(
                index=seq.index,
                text=seq.detokenizer.output_text,
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                text_delta=text_delta,
            ))
        metrics = {"arrival_time": request.arrival_time, "first_token_time": request.first_token_time}
        if request.error:
            metrics["error"] = request.error
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             finished=request.finished or request.error is not None,
                             num_cached_tokens=request.seqs[0].num_cached_tokens,
                             prompt_logprobs=request.prompt_logprobs if not request.prompt_logprobs_left else None,
                             metrics=metrics)

    # --- what callers read ---------------------------------------------------------------
    @property
    def kv_cache_strategy(self) -> str:
        return self.manager.name

    def load(self) -> EngineLoad:
        return EngineLoad(len(self.requests), len(self.scheduler.running),
                          len(self.scheduler.waiting) + len(self._awaiting_grammar),
                          self.scheduler.counters.num_preemptions)

    # --- memory -------------------------------------------------------------------------
    def stats(self) -> MemoryStats:
        stats = self.manager.stats()
        # A runner that moves memory itself (hybrid: staging copies, streamed weights) adds its counters.
        stats.extra.update(self.runner.stats_extra())
        return stats

    def release_free_memory(self) -> int:
        released = self.manager.release_free_memory()
        if self.kv_events is not None:
            self.kv_events.flush()
        return released

    # --- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Abort what is in flight, then stop the runner's and the manager's threads and give back
        their mappings (virtual's reservation, hybrid's copy worker, CUDA VMM handles). Idempotent;
        the engine refuses new work afterwards. Without it those live until the garbage collector
        finds the engine, which a notebook or a server building several engines never waits for."""
        if self.closed:
            return
        self.closed = True
        for request_id in list(self.requests):
            self.abort_request(request_id)
        self.runner.close()  # first: its views of the caches would keep the mappings alive
        self.manager.close()
        self.grammars.close()  # the compile worker thread
        if self.kv_events is not None:
            self.kv_events.close()  # the aborts' events, then the publisher's thread and sockets

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine is closed; build a new one")
