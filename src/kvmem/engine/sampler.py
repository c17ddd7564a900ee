"""Turns a batch of next-token logits into tokens, one row per sequence, with vLLM's semantics.

Order of operations for each row (same as vLLM):
  0. rows under a grammar (structured outputs): tokens the grammar forbids next become -inf;
  1. logprobs, if asked for, from the *raw* logits (before penalties and temperature);
  2. repetition penalty over prompt + output tokens, presence/frequency penalties over output tokens;
  3. logit_bias added (OpenAI's: greedy rows too);
  4. while fewer than `min_tokens` tokens exist, EOS and `stop_token_ids` are masked to -inf;
  5. greedy rows: argmax. Others: / temperature, top-k, top-p, min-p, then one draw.

The draw: rows without a seed take one uniform number each from the engine's generator and pick the
first token whose running probability passes it (inverse CDF, vectorized over rows); a seeded row
runs an "exponential race" (argmax(p / q) with q ~ Exp(1) i.i.d. is a sample from p) on exactly
`vocab` numbers from its own generator per step, so its tokens depend only on its seed and its own
logits -- not on the batch it ran in or its index there. (Every op on a row's
logits is row-wise, so the row's probabilities are the same in any batch.)

Speed: the common all-greedy batch without penalties or logprobs is one argmax. Otherwise the work
is vectorized over the rows that need it; Python loops only touch per-row token lists (to build the
penalty tensors) and per-row generators.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvmem.attention import cpu_kernels
from kvmem.sampling_params import SAMPLING_EPS, SamplingParams
from kvmem.structured_outputs.bitmask import apply_grammar_masks


@dataclass
class SamplingRow:
    """One sequence that needs a token this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # per sequence, seeded when params.seed is set; None: global RNG
    grammar: Any = None  # an xgrammar GrammarMatcher when the row is under structured outputs


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


def sample(logits: torch.Tensor, rows: list[SamplingRow], eos_token_ids: Sequence[int],
           generator: torch.Generator | None = None) -> list[SampledToken]:
    """Pick one token per row. `logits` is [len(rows), vocab] straight from the model, in the model's
    dtype; the caller hands it over (it may be modified in place). Rows without a generator of their
    own draw from `generator` (the engine's; None: torch's global one).

    Greedy rows need no arithmetic: -inf masking and argmax give the same token in any dtype (widening
    bf16 to float32 is exact and order-preserving). Everything else (penalties, temperature,
    logprobs) runs in float32, as in vLLM."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
    if not rows:
        return []

    # One pass over the params decides which stages run at all.
    all_greedy = True
    needs_processing = False  # penalties or min_tokens masking
    wants_logprobs = False
    constrained = False
    for row in rows:
        p = row.params
        all_greedy &= p.greedy
        wants_logprobs |= p.logprobs is not None
        needs_processing |= (p.has_penalties or p.logit_bias is not None
                             or len(row.output_token_ids) < p.min_tokens)
        constrained |= row.grammar is not None

    if constrained:
        # First, as in vLLM: what the grammar forbids is -inf for everything after (logprobs too).
        index = [i for i, row in enumerate(rows) if row.grammar is not None]
        apply_grammar_masks(logits, index, [rows[i].grammar for i in index])

    if all_greedy and not needs_processing and not wants_logprobs:
        # Fast path: one argmax, one device->host copy.
        return [SampledToken(t) for t in _argmax(logits).tolist()]

    only_masking = all_greedy and not wants_logprobs and not any(
        r.params.has_penalties or r.params.logit_bias is not None for r in rows)
    if not only_masking:  # -inf masking and argmax are exact in any dtype; arithmetic is float32
        logits = logits.float()
    raw = logits
    if needs_processing:
        if wants_logprobs:
            logits = logits.clone()  # the penalties write in place; `raw` must stay raw for logprobs
        apply_penalties(logits, rows)
        apply_logit_bias(logits, rows)
        apply_min_tokens(logits, rows, eos_token_ids)

    random_idx = [] if all_greedy else [i for i, row in enumerate(rows) if not row.params.greedy]
    if len(random_idx) == len(rows):
        token_ids = _sample_random(logits, rows, generator)
    else:
        # Greedy rows take the argmax of the processed logits; random rows are overwritten.
        token_ids = _argmax(logits)
        if random_idx:
            index = torch.tensor(random_idx, device=logits.device)
            token_ids[index] = _sample_random(logits.index_select(0, index), [rows[i] for i in random_idx],
                                            generator)

    token_list = token_ids.tolist()
    if not wants_logprobs:
        return [SampledToken(t) for t in token_list]
    return _with_logprobs(raw, rows, token_ids, token_list)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax, first index on ties. On CPU torch's bfloat16 argmax is a slow scalar loop
    (6.3 ms for [64, 49152] here, vs 1.8 ms for widening to float32 and taking that argmax); the
    native pass reads bfloat16 as float32 in place."""
    if logits.device.type == "cpu":
        native = cpu_kernels.load()
        if native is not None and logits.dim() == 2 and logits.stride(-1) == 1:
            return native.argmax_rows(logits)
        if logits.dtype != torch.float32:
            logits = logits.float()
    return logits.argmax(dim=-1)


# --- logits processing -----------------------------------------------------------------------------

def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place. Repetition penalty (prompt + output tokens): positive logits are divided by it,
    negative ones multiplied. Then frequency (times each output token's count) and presence (once
    per distinct output token) penalties are subtracted. Rows without penalties are untouched.

    Only the (row, token) entries of tokens a row has seen change, so the work is gather / compute /
    scatter on those entries -- O(tokens in the rows), never O(rows x vocab)."""
    vocab = logits.shape[1]
    device = logits.device

    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        row_idx, ids = _flatten(
            rep, [itertools.chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep], device
        )
        # Duplicate (row, token) pairs all compute the same value from the same original logit, so
        # writing them all is harmless.
        penalty = torch.tensor([r.params.repetition_penalty for r in rows], dtype=logits.dtype,
                               device=device)[row_idx]
        values = logits[row_idx, ids]
        logits[row_idx, ids] = torch.where(values > 0, values / penalty, values * penalty)

    freq_pres = [i for i, r in enumerate(rows)
                 if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if freq_pres:
        row_idx, ids = _flatten(freq_pres, [rows[i].output_token_ids for i in freq_pres], device)
        keys, counts = torch.unique(row_idx * vocab + ids, return_counts=True)
        row_idx, ids = keys // vocab, keys % vocab
        freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=logits.dtype, device=device)
        pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=logits.dtype, device=device)
        logits[row_idx, ids] -= freq[row_idx] * counts.to(logits.dtype) + pres[row_idx]


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place: each row's `logit_bias` added to its tokens' logits (ids past the logits' width,
    which the engine refuses, are skipped)."""
    vocab = logits.shape[1]
    row_idx: list[int] = []
    col_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for t, bias in (row.params.logit_bias or {}).items():
            if t < vocab:
                row_idx.append(i)
                col_idx.append(t)
                values.append(bias)
    if row_idx:
        device = logits.device
        logits.index_put_((torch.tensor(row_idx, device=device), torch.tensor(col_idx, device=device)),
                          torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True)


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


# Top-p without top-k first looks for its cut among this many best tokens: a top-k of the row is
# far cheaper than sorting the whole vocabulary, and the cut is usually there. Rows whose top-p set
# is larger (flat distributions) fall back to a full sort, so the result is exact either way.
_TOP_P_CANDIDATES = 1024


def apply_top_k_top_p(logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """Returns `logits` with everything outside each row's top-k / top-p set at -inf.

    top_k <= 0 and top_p == 1 turn the filter off for that row. Top-p keeps the smallest set of most
    likely tokens whose probability adds up to >= top_p, computed on the distribution renormalized
    after top-k, so the most likely token always survives. The filter becomes a per-row cutoff
    value: tokens tied with the last kept one are kept too (as in vLLM)."""
    vocab = logits.shape[1]
    device = logits.device
    k_list = [k if 0 < k < vocab else vocab for k in top_k]
    p_only = [k == vocab and p < 1.0 for k, p in zip(k_list, top_p)]
    # Every row's kept set must lie within the K best tokens we look at.
    num_candidates = max((k for k in k_list if k < vocab), default=1)
    if any(p_only):
        num_candidates = max(num_candidates, _TOP_P_CANDIDATES)
    num_candidates = min(num_candidates, vocab)

    k = torch.tensor(k_list, device=device)
    p = torch.tensor(list(top_p), dtype=logits.dtype, device=device)
    # top-p needs probabilities of the whole row; log-normalizer of the full row (batch-invariant)
    lse = logits.logsumexp(dim=-1) if any(x < 1.0 for x in top_p) else None
    candidates = logits.topk(num_candidates, dim=-1, sorted=True).values
    cutoff, complete = _cutoffs(candidates, lse, k, p, vocab)

    if any(p_only) and num_candidates < vocab:
        incomplete = (~complete).nonzero().flatten()
        if incomplete.numel():
            full = logits.index_select(0, incomplete).sort(dim=-1, descending=True).values
            sub_lse = lse.index_select(0, incomplete) if lse is not None else None
            full_cutoff, _ = _cutoffs(full, sub_lse, k[incomplete], p[incomplete], vocab)
            cutoff[incomplete] = full_cutoff

    filtered = torch.tensor([kk < vocab or pp < 1.0 for kk, pp in zip(k_list, top_p)], device=device)
    cutoff = cutoff.masked_fill(~filtered, float("-inf"))
    return logits.masked_fill(logits < cutoff.unsqueeze(1), float("-inf"))


def _cutoffs(sorted_vals: torch.Tensor, lse: torch.Tensor | None, k: torch.Tensor, top_p: torch.Tensor,
             vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's best logits (descending, [rows, K]): the smallest logit the filters keep, and
    whether the top-p cut surely lies within these K (always true for rows without top-p, or with
    top-k, since K >= k)."""
    num = sorted_vals.shape[1]
    positions = torch.arange(num, device=sorted_vals.device).unsqueeze(0)
    keep = positions < k.unsqueeze(1)  # top-k
    complete = torch.ones(sorted_vals.shape[0], dtype=torch.bool, device=sorted_vals.device)
    if lse is not None:
        vals = sorted_vals.masked_fill(~keep, float("-inf"))
        probs = (vals - lse.unsqueeze(1)).exp()  # probabilities under the full distribution
        cum = probs.cumsum(dim=-1)
        # Top-p applies after top-k: compare against top_p of the mass top-k left, not of 1.
        kept_mass = torch.where(k < vocab, cum.gather(1, (k.clamp(max=num) - 1).unsqueeze(1)).squeeze(1),
                                torch.ones_like(top_p))
        threshold = (top_p * kept_mass).unsqueeze(1)
        # A token is dropped once the more likely ones already reach top_p. Rows with top_p == 1
        # are exempt: rounding could push the mass before the tail to 1.0.
        keep &= ((cum - probs) < threshold) | (top_p >= 1.0).unsqueeze(1)
        complete = (top_p >= 1.0) | (k < vocab) | (num == vocab) | (cum[:, -1] >= top_p)
    num_kept = keep.sum(dim=-1).clamp(min=1)
    return sorted_vals.gather(1, (num_kept - 1).unsqueeze(1)).squeeze(1), complete


def min_p_mask(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """True where a token's probability is below min_p times the row's most likely token's."""
    return probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution non-greedy rows draw from: softmax(logits / temperature) restricted by
    top-k, top-p and min-p. Unnormalized after min-p (only ratios matter to the draw). `logits` is
    not modified."""
    device, dtype = logits.device, logits.dtype
    if any(p.temperature != 1.0 for p in params):
        # Rows below SAMPLING_EPS are greedy and never get here; the clamp makes sure no caller
        # (say, params mutated after validation) divides by a temperature that overflows float32.
        temperature = torch.tensor([max(p.temperature, SAMPLING_EPS) for p in params], dtype=dtype, device=device)
        logits = logits / temperature.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        logits = apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    # The same softmax runs whatever the other rows asked for, so a row's probabilities (and hence
    # its seeded draws) do not depend on the batch.
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=dtype, device=device)
        probs = probs.masked_fill(min_p_mask(probs, min_p), 0.0)
    return probs


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row; `logits` is not modified."""
    probs = sampling_probs(logits, [r.params for r in rows])
    seeded = [i for i, r in enumerate(rows) if r.generator is not None]
    if not seeded:
        return _inverse_cdf_draw(probs, generator)
    token_ids = torch.empty(len(rows), dtype=torch.long, device=probs.device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        index = torch.tensor(unseeded, device=probs.device)
        token_ids[index] = _inverse_cdf_draw(probs.index_select(0, index), generator)
    index = torch.tensor(seeded, device=probs.device)
    # Seeded rows: the exponential race, argmax(p / q) with q = -log(u) ~ Exp(1) i.i.d. is distributed
    # as p. (rand + log is ~2.5x faster than exponential_ on CPU.) u in [0, 1), so q is in (0, inf]: a
    # token with p = 0 can never win, and u = 0 merely gives that token p / inf = 0.
    p = probs.index_select(0, index)
    u = torch.empty_like(p)
    for j, i in enumerate(seeded):
        # Each seeded row draws exactly `vocab` numbers from its own generator per step.
        u[j].uniform_(generator=rows[i].generator)
    token_ids[index] = p.div_(u.log_().neg_()).argmax(dim=-1)
    return token_ids


def _inverse_cdf_draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of unnormalized `probs` from one uniform number per row: the first token whose
    running sum exceeds u * total. The exponential race needs `vocab` numbers per row, and the CPU's
    generator (mt19937) makes them one at a time: at 128 rows x 49,152 that was ~30 ms of a step. A
    token with p = 0 adds nothing to the running sum, so it is never the first to pass the threshold."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=probs.device, generator=generator)
    token_ids = torch.searchsorted(cdf, u * total, right=True).squeeze(1)
    past_end = token_ids >= probs.shape[1]
    if past_end.any():  # u * total rounded up to the total: the last token with p > 0
        last = probs.shape[1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
        token_ids = torch.where(past_end, last, token_ids)
    return token_ids


# --- logprobs --------------------------------------------------------------------------------------

def _with_logprobs(raw: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor,
                   token_list: list[int]) -> list[SampledToken]:
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if len(want) == len(rows):
        logprobs, chosen = raw.log_softmax(dim=-1), token_ids.unsqueeze(1)
    else:
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


def prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int],
                    k: int) -> list[tuple[float, int, dict[int, float]]]:
    """Logprobs of prompt tokens: row j of `logits` (raw, one per prompt position) scores
    `next_token_ids[j]`, the token that follows. Per row: (that token's logprob under
    log_softmax in float32, its rank as vLLM counts it, the k most likely tokens -> logprob)."""
    if not len(next_token_ids):
        return []
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = torch.tensor(list(next_token_ids), dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen_lp = logprobs.gather(1, chosen)
    ranks = ((logprobs > chosen_lp).sum(dim=-1) + 1).tolist()
    chosen_list = chosen_lp.squeeze(1).tolist()
    k = min(k, logprobs.shape[1])
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        tops = [dict(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lp.tolist())]
    else:
        tops = [{} for _ in next_token_ids]
    return list(zip(chosen_list, ranks, tops))


# --- helpers ---------------------------------------------------------------------------------------

def _flatten(row_numbers: list[int], token_lists: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) for every token of every list, as two 1-D long tensors; list j belongs to
    row row_numbers[j]."""
    lists = [list(ids) for ids in token_lists]
    lengths = torch.tensor([len(ids) for ids in lists], device=device)
    ids = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long, device=device)
    row_idx = torch.repeat_interleave(torch.tensor(row_numbers, dtype=torch.long, device=device), lengths)
    return row_idx, ids
