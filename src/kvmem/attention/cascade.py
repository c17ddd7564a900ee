"""Cascade (shared-prefix) attention: rows whose contexts start with the same KV memory read it once.

When many running sequences share a cached prefix (paged: the same physical blocks at the start of
their block tables; virtual: the same shared pages, `memory/shared_chunks`), every decode row and
every prompt-chunk row reads the prefix's keys and values again. `find_cascade_groups` finds, per
step, groups of rows whose first P tokens (P a multiple of `PREFIX_GRAIN`) lie in the same memory;
the native CPU kernel (`cpu_kernels.cascade_attention`) then takes each 16-key tile of a group's
prefix once for all its rows' query heads.

Unlike GPU cascade kernels, which compute the prefix part as a separate softmax and merge it with the
suffix part by log-sum-exp, the native kernel keeps every row's arithmetic exactly that of
`decode_attention` (same dot products, one softmax over the whole context, values accumulated in
token order): a row's result is bit-identical whether it was grouped, and with whom, which keeps
greedy output independent of the batch. `merged_attention` is the log-sum-exp formulation in plain
torch: the reference the shared-prefix math is checked against (prefix once as one matrix product
over all rows' queries, suffix per row, merged), not an engine path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A shared prefix is cut to a multiple of this many tokens: the kernel's score tiles (16 keys) and
# bfloat16 value pairs (2 tokens) must start at the same positions whether a row is grouped or not.
PREFIX_GRAIN = 32
# Below this many shared tokens a group saves less than its bookkeeping costs.
MIN_PREFIX = 64


@dataclass
class CascadeGroups:
    """Rows `rows[starts[j]:starts[j + 1]]` of the flat batch share their first `prefix_lens[j]` tokens'
    KV; the kernel reads it through the first of them's table."""

    rows: torch.Tensor  # int64 [n]
    starts: torch.Tensor  # int64 [groups + 1]
    prefix_lens: torch.Tensor  # int64 [groups]

    @property
    def num_groups(self) -> int:
        return self.prefix_lens.numel()


def _common_ids(a: list[int], b: list[int], n: int) -> int:
    """How many of the first n ids a and b have in common."""
    n = min(n, len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, in one comparison
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_cascade_groups(prefix_ids: list[list[int]], id_tokens: int, num_computed: list[int],
                        query_lens: list[int], device: torch.device, min_prefix: int = MIN_PREFIX,
                        min_rows: int = 2) -> CascadeGroups | None:
    """Groups of the flat batch's rows (sequence i has rows for positions num_computed[i] ..
    num_computed[i] + query_lens[i] - 1, row length position + 1) that share a prefix.

    `prefix_ids[i]`: ids of the memory holding sequence i's tokens, one per `id_tokens` tokens, such
    that equal leading ids mean the same KV memory (`KVCacheManager.shared_prefix_ids`). Sequences are
    grouped by their first id; a group's prefix is the longest run of ids it shares with the group's
    first sequence that pays most (prefix tokens x rows that can take it), cut to PREFIX_GRAIN; a row
    joins when its length reaches the prefix. None when no group has min_rows rows and min_prefix
    tokens."""
    if id_tokens is None or id_tokens < 1:
        return None
    by_first: dict[int, list[int]] = {}
    for i, ids in enumerate(prefix_ids):
        if ids and num_computed[i] + query_lens[i] >= min_prefix:
            by_first.setdefault(ids[0], []).append(i)
    row_start, at = [], 0
    for q in query_lens:
        row_start.append(at)
        at += q
    rows: list[int] = []
    starts = [0]
    prefix_lens: list[int] = []
    for members in by_first.values():
        if sum(query_lens[i] for i in members) < min_rows:
            continue
        leader = prefix_ids[members[0]]
        # Tokens each member shares with the leader (no more than it holds), cut to the grain.
        shared = []
        for i in members:
            ids = prefix_ids[i]
            tokens = _common_ids(leader, ids, max(len(leader), len(ids))) * id_tokens
            shared.append(min(tokens, num_computed[i] + query_lens[i]) // PREFIX_GRAIN * PREFIX_GRAIN)

        def rows_reaching(i: int, prefix: int) -> range:  # positions whose row length is >= prefix
            return range(max(num_computed[i], prefix - 1), num_computed[i] + query_lens[i])

        best_prefix, best_gain = 0, 0
        # Candidates: each member's whole shared run, and the length of each member's first row
        # (the longest prefix all of a prompt chunk's rows reach).
        candidates = set(shared) | {min(s, (num_computed[i] + 1) // PREFIX_GRAIN * PREFIX_GRAIN)
                                    for i, s in zip(members, shared)}
        for prefix in sorted(candidates):
            if prefix < min_prefix:
                continue
            n = sum(len(rows_reaching(i, prefix)) for i, s in zip(members, shared) if s >= prefix)
            if n >= min_rows and prefix * n > best_gain:
                best_prefix, best_gain = prefix, prefix * n
        if not best_gain:
            continue
        for i, s in zip(members, shared):
            if s >= best_prefix:
                rows += [row_start[i] + p - num_computed[i] for p in rows_reaching(i, best_prefix)]
        starts.append(len(rows))
        prefix_lens.append(best_prefix)
    if not prefix_lens:
        return None
    return CascadeGroups(torch.tensor(rows, dtype=torch.long, device=device),
                         torch.tensor(starts, dtype=torch.long, device=device),
                         torch.tensor(prefix_lens, dtype=torch.long, device=device))


def merged_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                     suffix_k: list[torch.Tensor], suffix_v: list[torch.Tensor], scale: float) -> torch.Tensor:
    """Shared-prefix attention in the log-sum-exp form, in float32: q [rows, heads, dim]; the shared
    prefix prefix_k / prefix_v [prefix_len, kv_heads, dim], attended once as one matrix product over
    every row's queries; row i's own keys suffix_k[i] / suffix_v[i] [n_i, kv_heads, dim] (no causal
    mask: each row sees all of its own). The two partial softmaxes are merged by their maxima and
    sums. Returns [rows, heads, dim] float32."""
    rows, heads, dim = q.shape
    group = heads // prefix_k.shape[1]
    qf = q.float() * scale
    kp = prefix_k.float().repeat_interleave(group, dim=1)  # [P, heads, dim]
    vp = prefix_v.float().repeat_interleave(group, dim=1)
    s_prefix = torch.einsum("rhd,phd->rhp", qf, kp)  # every row's queries against the prefix at once
    m_prefix = s_prefix.amax(-1)
    e_prefix = torch.exp(s_prefix - m_prefix[..., None])
    l_prefix = e_prefix.sum(-1)
    o_prefix = torch.einsum("rhp,phd->rhd", e_prefix, vp)
    out = torch.empty(rows, heads, dim, dtype=torch.float32, device=q.device)
    for i in range(rows):
        if suffix_k[i].shape[0] == 0:
            out[i] = o_prefix[i] / l_prefix[i][:, None]
            continue
        ks = suffix_k[i].float().repeat_interleave(group, dim=1)
        vs = suffix_v[i].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,khd->hk", qf[i], ks)
        m_s = s.amax(-1)
        e_s = torch.exp(s - m_s[:, None])
        m = torch.maximum(m_prefix[i], m_s)
        a, b = torch.exp(m_prefix[i] - m), torch.exp(m_s - m)  # rescale both partials to the joint max
        num = o_prefix[i] * a[:, None] + torch.einsum("hk,khd->hd", e_s, vs) * b[:, None]
        out[i] = num / (l_prefix[i] * a + e_s.sum(-1) * b)[:, None]
    return out
