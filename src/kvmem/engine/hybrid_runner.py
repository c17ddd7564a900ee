"""The model runner of kv_cache="hybrid": layer-major steps over device- and host-resident sequences.

A step with no host-resident sequence (and resident weights) is the ordinary `ModelRunner` step on
the device tier. Otherwise the step's sequences form groups: the device-resident ones (reading the
device tier's caches) and mini-batches of the host-resident ones (`form_minibatches`: balanced
transfer bytes and recompute FLOPs, as few as fit a staging buffer). All rows go through each layer
as one flat batch through the model's own forward pass, so every GEMM reads the layer's weights once;
only attention runs group by group (the grouped attention function below stands in for the backend,
and the step, handed over as the model's `LayerHooks`, says which buffer holds each layer's weights
and keeps the captured activations). HybridServe's pipeline:

    copy worker:  [weights j+1]  stage(j, mb0)  stage(j, mb1)  stage(j+1, mb0) ...
    compute:      qkv(j) | attn(j, device) | recompute + attn(j, mb0), write back | attn(j, mb1) ... | mlp(j)

`stage` moves a mini-batch's host KV blocks and activations of layer j into one of two staging
buffers, so the worker fills one while attention reads the other (double buffering; with one
mini-batch the next *layer's* staging overlaps this layer's MLP). Before a mini-batch's attention,
its staged activations are turned back into K,V (`recompute_kv`: the layer's own K,V rows of qkv_proj,
bias and RoPE at the tokens' positions) in the staging cache, which the attention backend then reads
as ordinary paged blocks. `DecoderLayer`'s capture hook hands over the normed input of the q,k,v
projection; after a mini-batch's attention, its new tokens' K,V (KV blocks) or activations (ACT
blocks) go back to the host.

Weight streaming (`offload_weights`): the layers' weights stay in host memory; two device buffers
take turns, layer j+1's weights copied by the worker while layer j computes (FlexGen's schedule).

On CPU the worker is a thread doing memcpys (device and host are one memory): the schedule and the
results are those of a GPU run, the speed is not. On two cores the thread competes with the compute
thread's OpenMP team; `KVMEM_HYBRID_INLINE_COPIES=1` runs the same jobs, in the same order, on the
compute thread (measured in docs/benchmarks.md). On CUDA the worker issues its copies on a side
stream and waits for them; events order buffer reuse against the compute stream. The CUDA path has
not been run on a GPU yet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import write_kv
from kvmem.engine.model_runner import ModelRunner, StepResult, append_tokens, is_decode
from kvmem.engine.scheduler import ScheduledSequence
from kvmem.hybrid.cost_model import ModelShape
from kvmem.hybrid.policy import RequestLoad, form_minibatches
from kvmem.hybrid.recompute import KVProjection, recompute_kv
from kvmem.memory.base import cdiv
from kvmem.memory.hybrid import HybridKVCacheManager, MinibatchTransfers
from kvmem.models.llama import DecoderLayer, LlamaForCausalLM, OneDNNLinear


@dataclass
class HybridRunnerCounters:
    """What the runner moved and recomputed (in `stats().extra`, beside the manager's residency counts)."""

    num_recomputed_tokens: int = 0  # ACT tokens turned back into K,V, once per step (x layers = K,V rows)
    num_minibatches: int = 0  # host-tier mini-batches run, summed over steps
    max_minibatches_per_step: int = 0
    bytes_to_device: int = 0  # host -> device: KV blocks and activations staged (all layers)
    bytes_to_host: int = 0  # device -> host: new tokens' K,V or activations written back
    weight_bytes_streamed: int = 0  # offload_weights: layer weights copied host -> device


class CopyWorker:
    """One thread for host<->device copies, in submission order (the link is one FIFO)."""

    def __init__(self, device: torch.device, threaded: bool = True) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmem-hybrid-copy") if threaded else None

    def submit(self, fn, after: torch.cuda.Event | None = None) -> Future:
        """Run `fn` on the worker; on CUDA its copies go on the side stream after `after` (an event of
        the compute stream: the buffer they overwrite is no longer read) and are complete when the
        future is."""
        def job() -> None:
            with torch.inference_mode(), (torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()):
                if after is not None:
                    self.stream.wait_event(after)
                fn()
                if self.stream is not None:
                    self.stream.synchronize()
        if self.pool is None:  # inline: the same order on the compute thread
            future: Future = Future()
            job()
            future.set_result(None)
            return future
        return self.pool.submit(job)

    def mark(self) -> torch.cuda.Event | None:
        """An event on the compute stream at this point (None on CPU, where compute is synchronous)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in a fixed order (names sorted), oneDNN-packed ones included."""
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    return [named[k] for k in sorted(named) if named[k] is not None]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class LayerWeightStreamer:
    """Layer weights in host memory (pinned on CUDA), two device buffers that take turns."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device, worker: CopyWorker) -> None:
        self.worker = worker
        self.host_layers = list(model.layers)
        dtype = model.embed_tokens.weight.dtype
        if device.type == "cuda":  # the model was built on the host; the rest goes to the device
            for layer in self.host_layers:
                for t in _tensors(layer):
                    t.data = t.data.pin_memory()
            for module in (model.embed_tokens, model.norm, model.lm_head, model.rope):
                module.to(device)
        self.buffers = [self._empty_like(self.host_layers[0], model.config, dtype, device) for _ in range(2)]
        self.buffer_tensors = [_tensors(b) for b in self.buffers]
        self.host_tensors = [_tensors(layer) for layer in self.host_layers]
        assert all(len(h) == len(self.buffer_tensors[0]) for h in self.host_tensors)
        self.layer_bytes = [sum(_nbytes(t) for t in h) for h in self.host_tensors]
        self.pending: dict[int, Future] = {}

    @staticmethod
    def _empty_like(layer: DecoderLayer, config, dtype: torch.dtype, device: torch.device) -> DecoderLayer:
        with torch.device("meta"):
            buffer = DecoderLayer(config)
        buffer = buffer.to_empty(device=device).to(dtype).eval()
        for name, module in layer.named_modules():  # same layout as the host layer (oneDNN-packed linears)
            if isinstance(module, OneDNNLinear):
                parent_name, _, leaf = name.rpartition(".")
                parent = buffer.get_submodule(parent_name) if parent_name else buffer
                packed = OneDNNLinear(getattr(parent, leaf), batch_invariant=False)  # nothing to measure: empty
                packed.pad_lone_row = module.pad_lone_row
                setattr(parent, leaf, packed)
        return buffer

    @property
    def buffer_bytes(self) -> int:
        return 2 * self.layer_bytes[0]

    def prefetch(self, j: int, after: torch.cuda.Event | None, counters: HybridRunnerCounters) -> None:
        """Copy layer j's weights into buffer j % 2 (the caller guarantees layer j - 2 is done)."""
        def copy() -> None:
            for dst, src in zip(self.buffer_tensors[j % 2], self.host_tensors[j]):
                dst.copy_(src, non_blocking=True)
            counters.weight_bytes_streamed += self.layer_bytes[j]
        self.pending[j] = self.worker.submit(copy, after)

    def wait(self, j: int) -> DecoderLayer:
        self.pending.pop(j).result()
        return self.buffers[j % 2]


@dataclass
class _Group:
    """Sequences whose attention reads one cache: the device-resident ones (the device tier), or one
    host mini-batch (a staging buffer). Rows [start, end) of the step's flat batch."""

    scheduled: list[ScheduledSequence]
    on_host: bool = False
    transfers: MinibatchTransfers | None = None  # the mini-batch's staging and write-back (host groups)
    meta: AttentionMetadata | None = None  # in the group's own rows and block addressing
    start: int = 0
    end: int = 0


@dataclass
class _Step:
    """One step through the layers: the model's `LayerHooks` (which module holds layer j's weights;
    the captured activations) and what the grouped attention reads in place of the metadata."""

    runner: HybridModelRunner
    groups: list[_Group]
    jobs: list[tuple[int, _Group]]  # host (layer, mini-batch) jobs in execution order; job k uses buffer k % 2
    staged: dict[int, Future] = field(default_factory=dict)
    buffer_free: list = field(default_factory=lambda: [None, None])  # CUDA events: buffer no longer read
    next_job: int = 0
    layer: int = 0
    projection: KVProjection | None = None
    layer_module: DecoderLayer | None = None
    layer_done: torch.cuda.Event | None = None  # CUDA: the compute stream past the last layer run
    activations: torch.Tensor | None = None  # this layer's captured q,k,v projection input, all rows
    capture: Callable[[torch.Tensor], None] | None = None  # LayerHooks.capture

    def __post_init__(self) -> None:
        if any(g.on_host for g in self.groups):  # their new tokens' activations go back to ACT blocks
            self.capture = self._keep_activations

    def _keep_activations(self, a: torch.Tensor) -> None:
        self.activations = a

    def before_layer(self, j: int) -> DecoderLayer:
        """The resident layer j, or the buffer its streamed weights were copied into; then layer j + 1's
        copy starts, into the buffer layer j - 1 used (done: `layer_done`)."""
        runner, weights = self.runner, self.runner.weights
        self.layer = j
        if weights is None:
            self.layer_module, self.projection = runner.model.layers[j], runner.projections[j]
        else:
            self.layer_module, self.projection = weights.wait(j), None  # made from the buffer when needed
            if j + 1 < len(runner.model.layers):
                weights.prefetch(j + 1, self.layer_done, runner.counters)
        return self.layer_module

    def after_layer(self, j: int) -> None:
        self.layer_done = self.runner.worker.mark()


class HybridModelRunner(ModelRunner):
    supports_prompt_logprobs = False  # it builds its own batch, without the prompt rows' logits (yet)

    def __init__(self, model: LlamaForCausalLM, manager: HybridKVCacheManager, device: torch.device,
                 attention_backend: str = "torch", offload_weights: bool = False) -> None:
        super().__init__(model, manager, device, attention_backend)
        self.manager: HybridKVCacheManager = manager
        # KVMEM_HYBRID_INLINE_COPIES=1: the copy jobs run on the compute thread, in the same order.
        self.worker = CopyWorker(device, threaded=os.environ.get("KVMEM_HYBRID_INLINE_COPIES") != "1")
        self.weights = LayerWeightStreamer(model, device, self.worker) if offload_weights else None
        self.counters = HybridRunnerCounters()
        # Resident weights: each layer's K,V projection rows, made once (views, or a dense copy of
        # oneDNN-packed weights). Streamed weights: made from the buffer holding the layer.
        self.projections = None if offload_weights else [KVProjection.from_attention(l.self_attn) for l in model.layers]
        self.shape = ModelShape.from_model_config(model.config, dtype_bytes=manager.host_act.element_size(),
                                                  kv_token_head_bytes=manager.spec.token_head_bytes)

    def close(self) -> None:
        self.worker.close()
        super().close()

    def stats_extra(self) -> dict:
        """The runner's own counters, which the engine adds to the manager's `stats().extra`."""
        return dict(device_weight_buffer_bytes=self.weights.buffer_bytes if self.weights is not None else 0,
                    **asdict(self.counters))

    # --- the step -------------------------------------------------------------------------
    def execute(self, scheduled: list[ScheduledSequence]) -> StepResult:
        host = [s for s in scheduled if self.manager.is_host_resident(s.seq)]
        if not host and self.weights is None:
            return super().execute(scheduled)
        if self.manager.pending_copies:  # copy-on-write in the device tier, before any write
            self.manager.copy_blocks(self.manager.pending_copies)
            self.manager.pending_copies.clear()
        groups = []
        device = [s for s in scheduled if not self.manager.is_host_resident(s.seq)]
        if device:
            groups.append(_Group(device))
        for minibatch in self._minibatches(host):
            groups.append(_Group(minibatch, on_host=True))
        input_ids, positions, logits_rows, sampled = [], [], [], []
        for g in groups:
            g.scheduled.sort(key=lambda s: not is_decode(s))  # stable: decodes first, as the metadata wants
            g.start = len(input_ids)
            append_tokens(g.scheduled, input_ids, positions, logits_rows, sampled)
            g.end = len(input_ids)
            if g.on_host:
                g.transfers = self.manager.plan_minibatch(
                    [(s.seq, s.seq.num_computed_tokens, s.num_new_tokens) for s in g.scheduled])
            tables = (g.transfers.block_tables if g.on_host
                      else [self.manager.block_table(s.seq) for s in g.scheduled])
            g.meta = AttentionMetadata.build(
                block_tables=tables, num_computed=[s.seq.num_computed_tokens for s in g.scheduled],
                query_lens=[s.num_new_tokens for s in g.scheduled], block_size=self.manager.block_size,
                device=self.device, native_kernel=self.row_tables)
        host_groups = [g for g in groups if g.on_host]
        c = self.counters
        c.num_minibatches += len(host_groups)
        c.max_minibatches_per_step = max(c.max_minibatches_per_step, len(host_groups))
        c.num_recomputed_tokens += sum(g.transfers.num_act_tokens for g in host_groups)
        step = _Step(self, groups, [(j, g) for j in range(len(self.model.layers)) for g in host_groups])
        if self.weights is not None:
            self.weights.prefetch(0, None, c)
        for k in range(min(2, len(step.jobs))):
            self._stage(step, k)
        logits = self.model(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                            torch.tensor(positions, dtype=torch.long, device=self.device),
                            self.caches, step, self._attention,
                            torch.tensor(logits_rows, dtype=torch.long, device=self.device), hooks=step)
        return StepResult(sampled, logits)

    def _minibatches(self, host: list[ScheduledSequence]) -> list[list[ScheduledSequence]]:
        """`form_minibatches` over the host-resident sequences (their staged KV bytes and recompute
        FLOPs), with the fewest mini-batches whose contexts each fit one staging buffer."""
        if not host:
            return []
        bs = self.manager.block_size
        capacity = self.manager.staging[0].num_blocks
        loads, needs = [], []
        for i, s in enumerate(host):
            computed, table = s.seq.num_computed_tokens, self.manager.host_table(s.seq)
            act = kv = 0
            for b in range(cdiv(computed, bs)):
                n = min(bs, computed - b * bs)
                act, kv = (act + n, kv) if table[b].is_act else (act, kv + n)
            loads.append(RequestLoad.of(i, self.shape, kv, act))
            needs.append(cdiv(computed + s.num_new_tokens, bs))
        for count in range(max(1, cdiv(sum(needs), capacity)), len(host) + 1):
            minibatches = form_minibatches(loads, count)
            if all(sum(needs[r.request_id] for r in mb) <= capacity for mb in minibatches):
                break
        return [[host[r.request_id] for r in mb] for mb in minibatches]

    def _stage(self, step: _Step, k: int) -> None:
        j, g = step.jobs[k]
        buffer = self.manager.staging[k % 2]

        def copy() -> None:
            self.counters.bytes_to_device += self.manager.stage(j, g.transfers, buffer)
        step.staged[k] = self.worker.submit(copy, step.buffer_free[k % 2])

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, step: _Step, scale: float, *kv_scales: torch.Tensor) -> torch.Tensor:
        """The attention call of layer `step.layer`, group by group: the device group on the device
        tier's cache; each host mini-batch on its staging buffer once its transfer is in, after the
        staged activations were turned back into K,V; then its new tokens go back to the host."""
        manager, j = self.manager, step.layer
        out = torch.empty_like(q)
        for g in step.groups:
            rows = slice(g.start, g.end)
            if not g.on_host:
                out[rows] = self.attention(q[rows], k[rows], v[rows], k_cache, v_cache, g.meta, scale, *kv_scales)
                continue
            job = step.next_job
            step.staged.pop(job).result()
            buffer, t = manager.staging[job % 2], g.transfers
            if t.num_act_tokens:
                if step.projection is None:
                    step.projection = KVProjection.from_attention(step.layer_module.self_attn)
                key, value = recompute_kv(buffer.act[:t.num_act_tokens], step.projection, t.act_positions_dev,
                                          self.model.rope)
                write_kv(key, value, *buffer.cache, t.act_dst_dev, *buffer.scales)
            out[rows] = self.attention(q[rows], k[rows], v[rows], *buffer.cache, g.meta, scale, *buffer.scales)
            self.counters.bytes_to_host += manager.write_back(j, t, buffer, step.activations[rows])
            step.buffer_free[job % 2] = self.worker.mark()
            step.next_job += 1
            if job + 2 < len(step.jobs):
                self._stage(step, job + 2)
        return out
