"""Prefix-cache tiers below the KV budget: host memory and disk.

Full prefix blocks that the budget evicts are kept here (`TierStore`) and brought back on a later
prefix hit instead of being recomputed; the disk tier survives restarts. A block's key is the
prefix cache's own block hash (hash(parent hash, token ids)); every stored block is also bound to a
`KVFingerprint` (weights, dtypes, KV layout, block size, shape), so another model, dtype or layout
can never read it. Modules: `fingerprint` (what a block's bytes depend on), `payload` (a block's
bytes in one canonical layout), `host` (the host-memory tier), `disk` (files, crash-safe), `store`
(both, the background writer and loader, counters), `policy` (when loading beats recomputing).
"""
