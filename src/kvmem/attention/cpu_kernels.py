"""Native CPU kernels (C++, built on first use with torch's extension builder): attention over the
KV cache for decode and prompt rows (csrc/cpu_decode.cpp) and the decoder layer's fused small ops (csrc/cpu_fused.cpp, used through
`kvmem.models.fused`).

Decode attention is the one place where plain torch costs more than it should on the CPU: bmm
needs each (head, sequence) key matrix packed, so paged blocks are gathered and even a virtual slot
read "in place" is copied by bfloat16 bmm (its oneDNN path packs strided batches). The kernel in
csrc/cpu_decode.cpp reads keys and values where they lie, through the block table, never past a
sequence's length.

Built once per machine into torch's extension cache (~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR) with -march=native, so the cache key includes this CPU's model and flags, and
a hash of the sources.
Without a C++ compiler or ninja, or with KVMEM_CPU_KERNELS=0, `decode_attention_kernel()` returns
None and attention falls back to the torch paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("cpu_decode.cpp", "cpu_fused.cpp")]
_lock = threading.Lock()
_module = None
_tried = False


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _source_tag() -> str:
    """A hash of every file in csrc/: torch's builder notices a changed .cpp but not a changed header."""
    digest = hashlib.sha1()
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


def enabled() -> bool:
    return os.environ.get("KVMEM_CPU_KERNELS", "1") != "0"


def has_vector_kernel() -> bool:
    """Whether the built kernel has its AVX-512 path (head dims 64 and 128) on this CPU."""
    module = load()
    return module is not None and module.has_vector_kernel()


def decode_attention_kernel():
    """The compiled `decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)`, or None."""
    module = load()
    return None if module is None else module.decode_attention


def load():
    """The compiled extension module (built on first call), or None where it can't be built or is off."""
    global _module, _tried
    if _tried:  # every layer asks, every step: no environment lookup on this path
        return _module
    with _lock:
        if not _tried and not enabled():  # decided once per process, like the build
            _module, _tried = None, True
        if not _tried:
            try:
                from torch.utils.cpp_extension import load as build_extension

                _module = build_extension(
                    name=f"kvmem_cpu_kernels_{_cpu_tag()}_{_source_tag()}", sources=[str(p) for p in _SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"],
                    verbose=False)
            except Exception as e:  # no compiler, no ninja, an exotic platform: the torch paths still work
                logger.warning("kvmem: native CPU kernels unavailable (%s); using torch ops",
                               str(e).splitlines()[0] if str(e) else type(e).__name__)
                _module = None
            _tried = True
    return _module
