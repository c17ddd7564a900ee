"""Rank 0's side of tensor parallelism: it starts the other ranks, sends them each step's plan, and
notices when one of them dies.

Rank 0 is the engine's own process: it runs the scheduler, decides memory (its manager, wrapped in
`RecordingManager`, logs the decisions), samples, and computes its own shard. Per step it broadcasts
one small pickled plan, (the manager calls since the last plan, each scheduled sequence's state and
token count), then runs its forward pass; the other ranks replay the calls on their managers and run
theirs, and the all-reduces of the row-parallel projections keep the ranks in lockstep.

A rank that dies: its sockets close, so a step in flight raises at once; between steps a monitor
thread sees the worker process exit. Either way the executor is marked failed (`failure`), every
later step raises `TensorParallelError`, and the callbacks in `on_failure` run (the server uses one
to exit non-zero instead of serving a broken engine).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable

import torch

from kvmem.distributed.group import GroupAddress, TensorParallelGroup, free_local_init_method, uses_shared_memory
from kvmem.distributed.launch import node_ranks, placements, resolve_init_method, spawn_workers
from kvmem.distributed.mirror import RecordingManager
from kvmem.distributed.parallel_model import build_parallel_model
from kvmem.distributed.shard import TensorParallelShard, check_divisible
from kvmem.distributed.worker import Hello, KVCacheSetup
from kvmem.memory.base import MemoryStats

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.2
# Largest tensor the shared-memory all-reduce carries (larger ones: gloo): 2 x ranks such slots in /dev/shm.
SHM_SLOT_CAP = 16 * 2**20


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine failed; the engine cannot go on."""


class TensorParallelExecutor:
    def __init__(self, config) -> None:
        """Start the other ranks of this node and meet every rank (those of other nodes connect to
        `distributed_init_method` on their own, started with `--node-rank`)."""
        if config.node_rank != 0:
            raise ValueError(f"node_rank {config.node_rank} hosts workers only; rank 0 (node_rank 0) runs the "
                             "engine (`kvmem serve --node-rank N` runs a worker node)")
        self.config = config
        self.world_size = config.tensor_parallel_size
        init_method = resolve_init_method(config)
        if init_method is None:
            if config.nnodes > 1:
                raise ValueError("nnodes > 1 needs distributed_init_method (tcp://HOST:PORT that every node "
                                 "reaches), or MASTER_ADDR and MASTER_PORT")
            init_method = free_local_init_method()
        self.init_method = init_method
        places = placements(config)
        self.device = torch.device(places[0].device)
        self._threads_before = torch.get_num_threads()  # given back on close
        if self.device.type == "cpu" and config.num_threads is None:
            torch.set_num_threads(len(places[0].cores))  # rank 0's share of the cores (not pinned: see launch)
        self.failure: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self.closed = False
        self.processes = spawn_workers(config, init_method)
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="kvmem-tp-monitor", daemon=True)
        self._monitor.start()
        try:
            self.group = TensorParallelGroup(GroupAddress(init_method, self.world_size, 0), self.device,
                                             peers_failed=lambda: self._dead_ranks() or None)
            self.group.broadcast_object(Hello(config))
        except Exception as e:
            self._stop.set()
            self._kill_workers()
            raise TensorParallelError(f"tensor-parallel start-up failed: {self.failure or e}") from e
        self.shard: TensorParallelShard | None = None
        self.manager: RecordingManager | None = None

    # --- building rank 0's parts ------------------------------------------------------------
    def build_model(self, model_config, max_positions: int, dtype: torch.dtype, weights, batch_invariant: bool):
        check_divisible(model_config, self.world_size)
        self.shard = TensorParallelShard(model_config, 0, self.world_size)
        if uses_shared_memory(self.config, self.device):  # a row-parallel output, in float32 at most
            slot_bytes = min(self.config.max_num_batched_tokens * model_config.hidden_size * 4, SHM_SLOT_CAP)
            self._collective(lambda: self.group.enable_shared_memory(slot_bytes, lambda: self._dead_ranks() or None))
        return build_parallel_model(self.shard, self.group, max_positions, dtype, self.device, weights,
                                    pack_for_cpu=self.device.type == "cpu", batch_invariant=batch_invariant)

    def start_replicas(self, manager, dtype: torch.dtype, max_model_len: int, budget_bytes: int) -> RecordingManager:
        """Have every rank build its manager and runner as rank 0 did; returns rank 0's manager, wrapped
        so that its decisions are logged for them. Raises what a rank's setup raised."""
        self._send(KVCacheSetup(str(dtype).removeprefix("torch."), max_model_len, budget_bytes))
        errors = self._collective(lambda: self.group.gather_objects(None))
        if any(errors):
            raise TensorParallelError("; ".join(e for e in errors if e))
        self.manager = RecordingManager(manager)
        return self.manager

    def wrap_runner(self, runner) -> TensorParallelRunner:
        return TensorParallelRunner(runner, self)

    # --- per step ---------------------------------------------------------------------------
    def send_step(self, scheduled) -> None:
        sync = self.manager.sync
        plan = ("step", self.manager.take_calls(), [(sync.state(s.seq), s.num_new_tokens) for s in scheduled])
        self._send(plan)

    def flush(self) -> None:
        """Send the manager calls no plan carried yet (sequences that ended after the last step), so
        that every rank gives their memory back now."""
        if self.manager is not None and self.manager.calls and self.failure is None:
            self._send(("calls", self.manager.take_calls()))

    def rank_stats(self) -> list[tuple[MemoryStats, int | None]]:
        """Every rank's (manager stats, physical KV bytes by the kernel's count where the strategy
        measures it), rank 0 first."""
        self.flush()
        self._send(("stats",))
        inner = self.manager.inner
        mine = (inner.stats(), inner.kernel_resident_bytes() if hasattr(inner, "kernel_resident_bytes") else None)
        return self._collective(lambda: self.group.gather_objects(mine))

    def run(self, fn: Callable[[], object]) -> object:
        """Run rank 0's part of a collective step (its forward pass). Whatever fails in it fails the
        group: the other ranks are somewhere inside the same step, and no later plan could meet them."""
        self.check()
        try:
            return fn()
        except TensorParallelError:
            raise
        except BaseException as e:
            self._fail(f"a tensor-parallel step failed on rank 0 ({self._dead_ranks() or 'no rank exited'}): "
                       f"{type(e).__name__}: {e}")
            raise TensorParallelError(self.failure) from e

    def _send(self, message: object) -> None:
        self._collective(lambda: self.group.broadcast_object(message))

    def _collective(self, fn: Callable[[], object]) -> object:
        self.check()
        try:
            return fn()
        except TensorParallelError:
            raise
        except RuntimeError as e:  # gloo / NCCL: a peer closed its connection or timed out
            self._fail(f"a tensor-parallel collective failed ({self._dead_ranks() or 'no rank exited'}): {e}")
            raise TensorParallelError(self.failure) from e

    def check(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        if self.closed:
            raise TensorParallelError("the tensor-parallel group is closed")

    # --- failure --------------------------------------------------------------------------
    def _dead_ranks(self) -> str:
        first = node_ranks(self.config).start
        return ", ".join(f"rank {first + 1 + i} exited with code {p.returncode}"
                         for i, p in enumerate(self.processes) if p.poll() is not None)

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            dead = self._dead_ranks()
            if dead:
                self._fail(f"tensor-parallel {dead}")
                return

    def _fail(self, reason: str) -> None:
        if self.failure is not None or self.closed:
            return
        self.failure = reason
        logger.error("%s; the engine cannot continue", reason)
        for callback in list(self.on_failure):
            try:
                callback(reason)
            except Exception:
                logger.exception("an on_failure callback failed")

    # --- lifetime ---------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> None:
        """Tell the ranks to close (when they still can), wait for the worker processes, kill those
        that do not exit, and stop the monitor. Idempotent."""
        if self.closed:
            return
        if self.failure is None:
            try:
                self.flush()
                self._send(("close",))
            except Exception:
                logger.exception("could not tell the tensor-parallel ranks to close")
        self.closed = True
        self._stop.set()
        if self._monitor is not threading.current_thread():
            self._monitor.join()
        if self.failure is None:  # told to close: give them the time to; after a failure, no one listens
            for p in self.processes:
                try:
                    p.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
        self._kill_workers()
        if hasattr(self, "group"):
            self.group.close()  # also what tells another machine's ranks that rank 0 is gone
        if self.device.type == "cpu" and self.config.num_threads is None:
            torch.set_num_threads(self._threads_before)

    def _kill_workers(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.processes = []


class TensorParallelRunner:
    """Rank 0's model runner: sends the step's plan to the other ranks, then runs the local runner
    (whose model's all-reduces meet theirs)."""

    def __init__(self, local, executor: TensorParallelExecutor) -> None:
        self.local = local
        self.executor = executor
        self.supports_prompt_logprobs = local.supports_prompt_logprobs

    def execute(self, scheduled):
        self.executor.send_step(scheduled)
        return self.executor.run(lambda: self.local.execute(scheduled))

    def stats_extra(self) -> dict:
        return {**self.local.stats_extra(), "tensor_parallel_size": self.executor.world_size}

    def close(self) -> None:
        self.local.close()
        self.executor.close()
