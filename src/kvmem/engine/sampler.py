"""Turns a batch of next-token logits into tokens, one row per sequence, with vLLM's semantics.

Order of operations for each row (same as vLLM):
  1. logprobs, if asked for, from the *raw* logits (before penalties and temperature);
  2. repetition penalty over prompt + output tokens, presence/frequency penalties over output tokens;
  3. while fewer than `min_tokens` tokens exist, EOS and `stop_token_ids` are masked to -inf;
  4. greedy rows: argmax. Others: / temperature, top-k, top-p, min-p, then one draw.

The draw is an "exponential race": argmax(p / q) with q ~ Exp(1) i.i.d. is a sample from p. Unlike
torch.multinomial it vectorizes over rows whose noise comes from the global RNG, and a seeded row
draws exactly `vocab` numbers from its own generator per step, so its tokens depend only on its
seed and its own logits -- not on the batch it ran in or its index there.

Speed: the common all-greedy batch without penalties or logprobs is one argmax. Otherwise the work
is vectorized over the rows that need it; Python loops only touch per-row token lists (to build the
penalty tensors) and per-row generators.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmem.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence that needs a token this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # per sequence, seeded when params.seed is set; None: global RNG


@dataclass
class SampledToken:
    token_id: int
    # The chosen token under log_softmax(raw logits); None unless params.logprobs is not None.
    logprob: float | None = None
    # params.logprobs most likely tokens -> logprob, plus the chosen token; None unless asked for.
    top_logprobs: dict[int, float] | None = None
    # 1-based rank of the chosen token under the raw logits (1 = most likely); None unless asked for.
    # Needed because the chosen token may sit outside the top-k in `top_logprobs`.
    rank: int | None = None


def sample(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: Sequence[int]) -> list[SampledToken]:
    """Pick one token per row. `logits` is float32 [len(rows), vocab], straight from the model; it is
    not modified."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
    if not rows:
        return []

    # One pass over the params decides which stages run at all.
    all_greedy = True
    needs_processing = False  # penalties or min_tokens masking
    wants_logprobs = False
    for row in rows:
        p = row.params
        all_greedy &= p.greedy
        wants_logprobs |= p.logprobs is not None
        needs_processing |= p.has_penalties or len(row.output_token_ids) < p.min_tokens

    if all_greedy and not needs_processing and not wants_logprobs:
        # Fast path: one kernel, one device->host copy.
        return [SampledToken(t) for t in logits.argmax(dim=-1).tolist()]

    raw = logits
    if needs_processing:
        logits = logits.clone()  # the penalties write in place; `raw` must stay raw for logprobs
        apply_penalties(logits, rows)
        apply_min_tokens(logits, rows, eos_token_ids)

    # Greedy rows take the argmax of the processed logits; random rows are overwritten below.
    token_ids = logits.argmax(dim=-1)
    if not all_greedy:
        random_idx = [i for i, row in enumerate(rows) if not row.params.greedy]
        random_rows = [rows[i] for i in random_idx]
        index = torch.tensor(random_idx, device=logits.device)
        sub = logits.index_select(0, index)  # a copy: free to modify
        token_ids[index] = _sample_random(sub, random_rows)

    token_list = token_ids.tolist()
    if not wants_logprobs:
        return [SampledToken(t) for t in token_list]
    return _with_logprobs(raw, rows, token_ids, token_list)


# --- logits processing -----------------------------------------------------------------------------

def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place. Repetition penalty (prompt + output tokens): positive logits are divided by it,
    negative ones multiplied. Then frequency (times each output token's count) and presence (once
    per distinct output token) penalties are subtracted. Rows without penalties are untouched."""
    vocab = logits.shape[1]
    device = logits.device

    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = _token_mask(
            [itertools.chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep], vocab, device
        )
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in rep],
                               dtype=logits.dtype, device=device).unsqueeze(1)
        index = torch.tensor(rep, device=device)
        sub = logits.index_select(0, index)
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits[index] = torch.where(seen, penalized, sub)

    freq_pres = [i for i, r in enumerate(rows)
                 if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if freq_pres:
        counts = _token_counts([rows[i].output_token_ids for i in freq_pres], vocab, device, logits.dtype)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in freq_pres],
                            dtype=logits.dtype, device=device).unsqueeze(1)
        pres = torch.tensor([rows[i].params.presence_penalty for i in freq_pres],
                            dtype=logits.dtype, device=device).unsqueeze(1)
        index = torch.tensor(freq_pres, device=device)
        sub = logits.index_select(0, index)
        logits[index] = sub - freq * counts - pres * (counts > 0).to(logits.dtype)


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: Sequence[int]) -> None:
    """In place. Until a row has `min_tokens` outputs it may not end: its EOS ids and stop token ids
    become -inf. This holds even with ignore_eos (which only says "don't stop on EOS")."""
    vocab = logits.shape[1]
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            for t in itertools.chain(eos_token_ids, row.params.stop_token_ids):
                if 0 <= t < vocab:  # a stop id past the model's vocab can never be sampled anyway
                    row_idx.append(i)
                    col_idx.append(t)
    if row_idx:
        logits[torch.tensor(row_idx, device=logits.device),
               torch.tensor(col_idx, device=logits.device)] = float("-inf")


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Returns `logits` with everything outside each row's top-k / top-p set at -inf.

    `top_k`: int [rows], <= 0 = off. `top_p`: float [rows], 1 = off. Top-p keeps the smallest set
    of most likely tokens whose probability adds up to >= top_p (computed after top-k), so the most
    likely token always survives. Works on a descending sort so that top-k keeps exactly k tokens
    even with ties."""
    vocab = logits.shape[1]
    # stable: ties are broken by token id, so the result never depends on the batch.
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(positions >= k, float("-inf"))

    probs = sorted_logits.softmax(dim=-1)
    # Probability mass strictly before each token: it is dropped once that already reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p == 1 are exempt: rounding could push mass_before to 1.0 on the tail.
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def min_p_mask(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """True where a token's probability is below min_p times the row's most likely token's."""
    return probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution non-greedy rows draw from: softmax(logits / temperature) restricted by
    top-k, top-p and min-p. Unnormalized after min-p (only ratios matter to the draw). `logits` is
    not modified."""
    device, dtype = logits.device, logits.dtype
    if any(p.temperature != 1.0 for p in params):
        temperature = torch.tensor([p.temperature for p in params], dtype=dtype, device=device)
        logits = logits / temperature.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=dtype, device=device)
        logits = apply_top_k_top_p(logits, top_k, top_p)
    # The same softmax op runs whatever the other rows asked for, so a row's probabilities (and
    # hence its seeded draws) are bit-identical in any batch.
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=dtype, device=device)
        probs = probs.masked_fill(min_p_mask(probs, min_p), 0.0)
    return probs


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    probs = sampling_probs(logits, [r.params for r in rows])
    # Exponential race: argmax(p / q), q ~ Exp(1), is distributed as p.
    q = torch.empty_like(probs)
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if not seeded:
        q.exponential_()
    elif len(seeded) < len(rows):
        unseeded = torch.tensor([i for i, r in enumerate(rows) if r.generator is None], device=probs.device)
        q[unseeded] = torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype,
                                  device=probs.device).exponential_()
    for i in seeded:
        q[i].exponential_(generator=rows[i].generator)
    # exponential_ may return exactly 0 in float32; p / 0 would be inf (or NaN for a masked p = 0),
    # letting a masked token win. Clamping keeps masked tokens at 0.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


# --- logprobs --------------------------------------------------------------------------------------

def _with_logprobs(raw: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor,
                   token_list: list[int]) -> list[SampledToken]:
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    index = torch.tensor(want, device=raw.device)
    logprobs = raw.index_select(0, index).log_softmax(dim=-1)
    chosen = token_ids.index_select(0, index).unsqueeze(1)
    chosen_lp = logprobs.gather(1, chosen)
    # Rank as vLLM counts it: 1 + how many tokens are strictly more likely.
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
    k = min(max(rows[i].params.logprobs for i in want), logprobs.shape[1])
    top_lp_list: list[list[float]] = []
    top_ids_list: list[list[int]] = []
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        top_lp_list, top_ids_list = top_lp.tolist(), top_ids.tolist()
    chosen_lp_list = chosen_lp.squeeze(1).tolist()
    ranks_list = ranks.tolist()

    out = [SampledToken(t) for t in token_list]
    for j, i in enumerate(want):
        token = out[i]
        n = rows[i].params.logprobs
        token.logprob = chosen_lp_list[j]
        token.rank = ranks_list[j]
        top = dict(zip(top_ids_list[j][:n], top_lp_list[j][:n])) if n else {}
        top[token.token_id] = token.logprob
        token.top_logprobs = top
    return out


# --- helpers ---------------------------------------------------------------------------------------

def _flatten(token_lists: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for every token of every list, as two 1-D tensors."""
    lists = [list(ids) for ids in token_lists]
    lengths = torch.tensor([len(ids) for ids in lists], device=device)
    ids = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(lists), device=device), lengths)
    return rows, ids


def _token_mask(token_lists: list, vocab: int, device: torch.device) -> torch.Tensor:
    rows, ids = _flatten(token_lists, device)
    mask = torch.zeros(len(token_lists), vocab, dtype=torch.bool, device=device)
    mask[rows, ids] = True
    return mask


def _token_counts(token_lists: list, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    rows, ids = _flatten(token_lists, device)
    counts = torch.zeros(len(token_lists), vocab, dtype=dtype, device=device)
    counts.index_put_((rows, ids), torch.ones_like(ids, dtype=dtype), accumulate=True)
    return counts
