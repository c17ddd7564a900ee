"""How every rank's KV cache holds the same sequences in the same blocks, with rank 0 deciding.

Each rank owns a manager of the same strategy, built from the same spec (its heads' share of the
KV: `TensorParallelShard.num_kv_heads`) and the same budget, so the managers start identical. Rank
0's scheduler talks to `RecordingManager`, which forwards every call to rank 0's manager and logs
the calls that change state (admit, allocate, free, fork, on_tokens_computed, release_free_memory)
with the sequence's state at that moment. The log travels with each step's plan; `ManagerReplica`
on the other ranks replays it on their managers, on stand-in sequences. The strategies are
deterministic (blocks from a FIFO free list, prefix hashes from sha256, slots chosen by fit), so
each replica reaches rank 0's block tables, slots, mapped pages and pending copy-on-write copies,
on storage sized for its own heads. Replaying calls rather than shipping block tables keeps every
strategy's own bookkeeping (virtual's page mapping and sharing, paged's prefix cache) working on
every rank with no strategy-specific code here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmem.memory.base import KVCacheManager, SequenceView


@dataclass
class SequenceState:
    """A sequence as a manager call saw it: the tokens rank 0 had not sent yet, and its counters."""

    seq_id: int
    new_token_ids: list[int]  # token_ids[known:], where `known` is what the receiver already has
    num_known: int  # how many tokens the receiver must already hold (a check)
    num_prompt_tokens: int
    num_computed_tokens: int
    max_tokens: int


@dataclass
class ManagerCall:
    method: str
    seqs: list[SequenceState]
    kwargs: dict[str, Any] = field(default_factory=dict)
    result: Any = None  # what rank 0's manager returned (admit's hit), checked by the replicas


@dataclass
class MirrorSequence:
    """What a manager and the model runner read of a sequence, on a rank that does not schedule."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    max_tokens: int
    params: Any = None  # the runner asks params.prompt_logprobs: replicas compute no logits

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class _NoPromptLogprobs:
    prompt_logprobs = None


class SequenceSync:
    """Rank 0's record of how many tokens of each sequence the other ranks hold."""

    def __init__(self) -> None:
        self.known: dict[int, int] = {}

    def state(self, seq: SequenceView) -> SequenceState:
        known = self.known.get(seq.seq_id, 0)
        self.known[seq.seq_id] = seq.num_tokens
        return SequenceState(seq.seq_id, list(seq.token_ids[known:]), known, seq.num_prompt_tokens,
                             seq.num_computed_tokens, seq.max_tokens)

    def forget(self, seq_id: int) -> None:
        self.known.pop(seq_id, None)


class RecordingManager:
    """Rank 0's manager, as the scheduler and the engine see it: every call goes to `inner`; the
    calls that change its state are logged for the replicas (`take_calls`). Reads pass through
    untouched (`__getattr__`)."""

    def __init__(self, inner: KVCacheManager) -> None:
        self.inner = inner
        self.sync = SequenceSync()
        self.calls: list[ManagerCall] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def take_calls(self) -> list[ManagerCall]:
        calls, self.calls = self.calls, []
        return calls

    def _log(self, method: str, seqs: list[SequenceView], result: Any = None, **kwargs: Any) -> None:
        self.calls.append(ManagerCall(method, [self.sync.state(s) for s in seqs], kwargs, result))

    def admit(self, seq: SequenceView, reuse_prefix: bool = True) -> int:
        state = self.sync.state(seq)  # before the call: the replica replays it from the same state
        hit = self.inner.admit(seq, reuse_prefix)
        self.calls.append(ManagerCall("admit", [state], {"reuse_prefix": reuse_prefix}, hit))
        return hit

    def allocate(self, seq: SequenceView, num_new_tokens: int) -> None:
        self._log("allocate", [seq], num_new_tokens=num_new_tokens)
        self.inner.allocate(seq, num_new_tokens)

    def free(self, seq: SequenceView) -> None:
        self._log("free", [seq])
        self.sync.forget(seq.seq_id)  # a replica drops its stand-in; a resumed sequence is sent whole
        self.inner.free(seq)

    def fork(self, parent: SequenceView, child: SequenceView) -> None:
        self._log("fork", [parent, child])
        self.inner.fork(parent, child)

    def on_tokens_computed(self, seq: SequenceView) -> None:
        self._log("on_tokens_computed", [seq])
        self.inner.on_tokens_computed(seq)

    def release_free_memory(self) -> int:
        self._log("release_free_memory", [])
        return self.inner.release_free_memory()


class ManagerReplica:
    """A non-scheduling rank's manager, driven by rank 0's logged calls."""

    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        self.sequences: dict[int, MirrorSequence] = {}

    def sequence(self, state: SequenceState) -> MirrorSequence:
        seq = self.sequences.get(state.seq_id)
        if seq is None:
            seq = self.sequences[state.seq_id] = MirrorSequence(state.seq_id, [], state.num_prompt_tokens, 0,
                                                                state.max_tokens, _NoPromptLogprobs())
        if len(seq.token_ids) != state.num_known:
            raise RuntimeError(f"tensor-parallel replica out of step: sequence {state.seq_id} has "
                               f"{len(seq.token_ids)} tokens here, rank 0 sent from {state.num_known}")
        seq.token_ids += state.new_token_ids
        seq.num_prompt_tokens, seq.num_computed_tokens = state.num_prompt_tokens, state.num_computed_tokens
        seq.max_tokens = state.max_tokens
        return seq

    def replay(self, calls: list[ManagerCall]) -> None:
        for call in calls:
            seqs = [self.sequence(s) for s in call.seqs]
            result = getattr(self.manager, call.method)(*seqs, **call.kwargs)
            if call.method == "admit" and result != call.result:
                raise RuntimeError(f"tensor-parallel replica out of step: admit() found {result} cached tokens "
                                   f"of sequence {seqs[0].seq_id}, rank 0 found {call.result}")
            if call.method == "free":
                del self.sequences[seqs[0].seq_id]
