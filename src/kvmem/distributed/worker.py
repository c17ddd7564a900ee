"""A rank other than 0: it holds its shard of the model and of the KV cache, and does what rank 0's
plans say, step by step, until rank 0 says close (or dies, which ends the wait with an error).

The messages (rank 0 broadcasts each on the control group; `executor.TensorParallelExecutor` sends):
- `Hello(config)`: the engine's configuration; load the model's shard.
- `KVCacheSetup(...)`: the KV budget, context length and dtype rank 0 resolved; build the manager
  and the runner exactly as rank 0 did, then report success or the error (`gather_objects`).
- `("step", calls, scheduled)`: replay rank 0's manager calls, then run the step's forward pass.
- `("calls", calls)`: replay only (sequences ended after the last step).
- `("stats",)`: answer with this rank's `MemoryStats` (and the kernel's count, for virtual).
- `("close",)`: close the runner, the manager and the group; return.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass

import torch

from kvmem.attention.kv_quant import storage_dtype
from kvmem.distributed.group import GroupAddress, TensorParallelGroup, uses_shared_memory
from kvmem.distributed.mirror import ManagerReplica
from kvmem.distributed.shard import TensorParallelShard

logger = logging.getLogger(__name__)


@dataclass
class Hello:
    config: object  # kvmem.config.EngineConfig


@dataclass
class KVCacheSetup:
    dtype: str  # e.g. "float32": rank 0's choice (CPU features may differ between nodes)
    max_model_len: int  # before the cap by the budget, as rank 0's manager was built with
    budget_bytes: int  # per rank


@dataclass
class WorkerPlacement:
    """Where a worker runs on its machine: its device and, on CPU, the cores it is pinned to."""

    device: str
    cores: list[int] | None = None
    num_threads: int | None = None


def pin(placement: WorkerPlacement) -> None:
    """Pin this process to its cores and size torch's thread pool to them, before any parallel
    region starts OpenMP's team (which reads the affinity mask once)."""
    if placement.cores:
        os.sched_setaffinity(0, placement.cores)
    threads = placement.num_threads or (len(placement.cores) if placement.cores else None)
    if threads:
        torch.set_num_threads(threads)


class Worker:
    def __init__(self, address: GroupAddress, placement: WorkerPlacement) -> None:
        self.device = torch.device(placement.device)
        self.group = TensorParallelGroup(address, self.device)
        self.rank = address.rank
        self.runner = None
        self.replica: ManagerReplica | None = None

    def setup(self) -> bool:
        """Build this rank's parts; False when rank 0 closes before its KV cache exists."""
        from kvmem.attention import cpu_kernels
        from kvmem.config import DTYPES
        from kvmem.distributed.parallel_model import build_parallel_model
        from kvmem.memory.base import KVCacheSpec
        from kvmem.memory.registry import build_manager, strategy_class
        from kvmem.models import kv_scales
        from kvmem.models.loader import load_model

        hello = self.group.broadcast_object()
        config = hello.config
        error = None
        try:  # a failure here is reported to rank 0 after the setup message, not left to hang it
            source = load_model(config.model, revision=config.revision, download_dir=config.download_dir,
                                gguf_file=config.gguf_file)
            shard = TensorParallelShard(source.config, self.rank, self.group.world_size)
        except Exception as e:
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        if uses_shared_memory(config, self.device):  # rank 0 sets it up while building its model
            parent = os.getppid()
            self.group.enable_shared_memory(None, lambda: "rank 0 exited" if os.getppid() != parent else None)
        setup = self.group.broadcast_object()
        if not isinstance(setup, KVCacheSetup):  # rank 0's engine failed before its KV cache: ("close",)
            return False
        if error is None:
            try:
                dtype = DTYPES[setup.dtype]
                scales, _ = kv_scales.resolve(source.kv_scale_tensors, source.config.num_hidden_layers,
                                              config.kv_cache_dtype)  # as rank 0's (LLMEngine), which says it
                model = build_parallel_model(shard, self.group, setup.max_model_len, dtype, self.device,
                                             kv_scales.weights_with_scales(source.weights, scales)(),
                                             pack_for_cpu=self.device.type == "cpu",
                                             batch_invariant=config.batch_invariant)
                if self.device.type == "cpu":
                    cpu_kernels.load()
                c = source.config
                cache_dtype = storage_dtype(config.kv_cache_dtype, dtype)  # as rank 0's (LLMEngine)
                spec = KVCacheSpec(c.num_hidden_layers, shard.num_kv_heads, c.head_dim, dtype, self.device,
                                   None if cache_dtype == dtype else cache_dtype)
                strategy = strategy_class(config.kv_cache)
                options = strategy.resolve_options(config, c, spec, setup.max_model_len)
                manager = build_manager(config.kv_cache, spec, setup.budget_bytes, setup.max_model_len, options)
                self.replica = ManagerReplica(manager)
                self.runner = manager.make_runner(model, self.device, config.attention_backend, options)
            except Exception as e:
                error = f"rank {self.rank}: {type(e).__name__}: {e}"
                logger.debug("%s", traceback.format_exc())
        errors = self.group.gather_objects(error)
        if any(errors):
            raise RuntimeError("; ".join(e for e in errors if e))
        return True

    def loop(self) -> None:
        from kvmem.engine.scheduler import ScheduledSequence

        while True:
            message = self.group.broadcast_object(idle=True)
            kind = message[0]
            if kind == "step":
                _, calls, scheduled = message
                self.replica.replay(calls)
                batch = [ScheduledSequence(self.replica.sequence(state), n) for state, n in scheduled]
                self.runner.execute(batch)  # its all-reduces meet rank 0's; its logits are empty
            elif kind == "calls":
                self.replica.replay(message[1])
            elif kind == "stats":
                manager = self.replica.manager
                resident = manager.kernel_resident_bytes() if hasattr(manager, "kernel_resident_bytes") else None
                self.group.gather_objects((manager.stats(), resident))
            elif kind == "close":
                return
            else:
                raise RuntimeError(f"unknown tensor-parallel message {kind!r}")

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self.replica is not None:
            self.replica.manager.close()
        self.group.close()


def worker_main(address: GroupAddress, placement: WorkerPlacement) -> None:
    """The entry point of a worker process (`python -m kvmem.distributed.worker`, or a node's own process)."""
    pin(placement)
    worker = None
    try:
        worker = Worker(address, placement)
        if worker.setup():
            worker.loop()
    except BaseException as e:  # rank 0 gone, a failed setup, a bug: say so and exit non-zero
        print(f"kvmem tensor-parallel rank {address.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if worker is not None:
            try:
                worker.close()
            except Exception:
                pass


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy: the messages rank 0 pickles name its classes.
    from kvmem.distributed import worker

    spec = json.loads(sys.argv[1])  # launch.spawn_workers: {"address": {...}, "placement": {...}}
    worker.worker_main(worker.GroupAddress(**spec["address"]), worker.WorkerPlacement(**spec["placement"]))
