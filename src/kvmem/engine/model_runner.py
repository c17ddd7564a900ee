"""Turns a scheduled step into one flat token batch, runs the model, returns the logits to sample."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvmem.attention.metadata import AttentionMetadata
from kvmem.attention.torch_attention import BACKENDS, ROW_TABLE_BACKENDS, check_backend
from kvmem.engine.scheduler import ScheduledSequence
from kvmem.engine.sequence import Sequence
from kvmem.memory.base import KVCacheManager
from kvmem.models.llama import LlamaForCausalLM


@dataclass
class StepResult:
    sampled_seqs: list[Sequence]  # sequences whose every token is now computed: they sample
    logits: torch.Tensor  # [len(sampled_seqs), vocab] in the model dtype
    # Sequences asking for prompt logprobs: (seq, first prompt position p, logits [m, vocab]) where
    # row j holds the logits at position p + j (scoring prompt token p + j + 1).
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)


def is_decode(s: ScheduledSequence) -> bool:
    return s.num_new_tokens == 1 and s.seq.num_computed_tokens > 0


def append_tokens(batch: list[ScheduledSequence], input_ids: list[int], positions: list[int],
                  logits_rows: list[int], sampled: list[Sequence]) -> None:
    """Append this step's tokens of `batch`, in order, to the flat batch being built; a sequence that
    catches up with its last token samples from that row's logits."""
    for s in batch:
        seq, start = s.seq, s.seq.num_computed_tokens
        end = start + s.num_new_tokens
        input_ids += seq.token_ids[start:end]
        positions += range(start, end)
        if end == seq.num_tokens:  # caught up: the last position's logits give the next token
            logits_rows.append(len(input_ids) - 1)
            sampled.append(seq)


def prompt_rows(batch: list[ScheduledSequence]) -> list[tuple[Sequence, int, list[int]]]:
    """For the sequences of `batch` (in the flat batch's order) that want prompt logprobs: (seq,
    first position, flat-batch rows) of this step's positions p with p + 1 still in the prompt."""
    out, offset = [], 0
    for s in batch:
        seq, start = s.seq, s.seq.num_computed_tokens
        end = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
        if seq.params.prompt_logprobs is not None and start < end:
            out.append((seq, start, list(range(offset, offset + end - start))))
        offset += s.num_new_tokens
    return out


class ModelRunner:
    # Whether `execute` returns prompt rows' logits (`StepResult.prompt_logits`).
    supports_prompt_logprobs = True

    def __init__(self, model: LlamaForCausalLM, manager: KVCacheManager, device: torch.device,
                 attention_backend: str = "torch") -> None:
        self.model = model
        self.manager = manager
        self.device = device
        check_backend(attention_backend)
        self.attention = BACKENDS[attention_backend]
        # None: per-row tables where the native CPU kernel runs (AttentionMetadata.build decides).
        self.row_tables = True if attention_backend in ROW_TABLE_BACKENDS else None
        self.caches = [manager.layer_kv(i) for i in range(model.config.num_hidden_layers)]
        # Rows sharing a prefix's KV read it once per group (`kvmem.attention.cascade`; results
        # unchanged bit for bit). The engine turns it off with --disable-cascade-attn.
        self.cascade_attention = True

    def close(self) -> None:
        """Drop the views of the manager's caches, so that closing the manager can unmap them."""
        self.caches = []

    def stats_extra(self) -> dict:
        """Counters of memory this runner moves itself (hybrid: staging copies, streamed weights)."""
        return {}

    def _prefix_ids(self, batch: list[ScheduledSequence]) -> dict:
        """AttentionMetadata.build's cascade arguments: where each sequence's leading KV lies."""
        tokens = self.manager.prefix_id_tokens
        if not self.cascade_attention or tokens is None or len(batch) < 2 and batch and batch[0].num_new_tokens < 2:
            return {}
        return {"prefix_ids": [self.manager.shared_prefix_ids(s.seq) for s in batch], "prefix_id_tokens": tokens}

    def execute(self, scheduled: list[ScheduledSequence]) -> StepResult:
        """Compute the scheduled tokens (KV goes into the caches). Does not advance
        `num_computed_tokens`; the engine does, after sampling."""
        if self.manager.pending_copies:  # copy-on-write of shared partial blocks, before any write
            self.manager.copy_blocks(self.manager.pending_copies)
            self.manager.pending_copies.clear()

        decodes = [s for s in scheduled if is_decode(s)]
        contiguous = self.manager.contiguous_slots
        if contiguous:  # neighbouring slots next to each other: attention reads them as one view
            decodes.sort(key=lambda s: self.manager.block_table(s.seq)[0])
        batch = decodes + [s for s in scheduled if not is_decode(s)]
        input_ids: list[int] = []
        positions: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        append_tokens(batch, input_ids, positions, logits_rows, sampled)
        prompt = prompt_rows(batch)
        num_sampled = len(logits_rows)
        for _, _, rows in prompt:
            logits_rows += rows

        meta = AttentionMetadata.build(
            block_tables=[self.manager.block_table(s.seq) for s in batch],
            num_computed=[s.seq.num_computed_tokens for s in batch],
            query_lens=[s.num_new_tokens for s in batch],
            block_size=self.manager.block_size,
            device=self.device,
            in_place_decode=contiguous,
            chunk_tokens=self.manager.chunk_tokens,
            readable_lens=[self.manager.readable_tokens(s.seq) for s in decodes] if contiguous else None,
            native_kernel=self.row_tables,
            **self._prefix_ids(batch),
        )
        logits = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.caches, meta, self.attention,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        if not prompt:
            return StepResult(sampled, logits)
        prompt_logits, at = [], num_sampled
        for seq, start, rows in prompt:
            prompt_logits.append((seq, start, logits[at:at + len(rows)]))
            at += len(rows)
        return StepResult(sampled, logits[:num_sampled], prompt_logits)
