"""`kvmem fleet`: several `kvmem serve` replicas behind an existing cache-aware router (vLLM's
`vllm-router`), each replica pinned to its own cores. See launcher.py."""
