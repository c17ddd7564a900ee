"""Native CPU kernels (C++): attention over the KV cache for decode and prompt rows
(csrc/cpu_decode.cpp) and the decoder layer's fused small ops (csrc/cpu_fused.cpp, used through
`kvmem.models.fused`).

Decode attention is the one place where plain torch costs more than it should on the CPU: bmm
needs each (head, sequence) key matrix packed, so paged blocks are gathered and even a virtual slot
read "in place" is copied by bfloat16 bmm (its oneDNN path packs strided batches). The kernel in
csrc/cpu_decode.cpp reads keys and values where they lie, through the block table, never past a
sequence's length.

Built at install (`make setup` runs `python -m kvmem.attention.cpu_kernels`; `build()` is the same)
with -march=native, into a directory of this Python environment (`kernel_build.kernel_dir`:
<venv>/share/kvmem/kernels, else a user cache dir keyed by the environment and torch;
KVMEM_KERNEL_DIR overrides), named by this CPU's model and flags and a hash of csrc/. At run time
the built module is imported directly; only where it is missing (csrc/ edited in a checkout) is it
built then, under a lock that dies with its holder and a bounded wait (`kernel_build`).
Without a C++ compiler or ninja, or with KVMEM_CPU_KERNELS=0, `decode_attention_kernel()` returns
None and attention falls back to the torch paths.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from kvmem.attention import kernel_build

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("cpu_decode.cpp", "cpu_fused.cpp")]
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module = None
_tried = False


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


def cascade_attention_kernel():
    """The compiled `cascade_attention(q, k_cache, v_cache, block_tables, context_lens, scale, group_rows,
    group_starts, prefix_lens)` (decode_attention with shared prefixes read once per group; equal to it
    bit for bit), or None."""
    module = load()
    return None if module is None else module.cascade_attention


def quantized_attention(q, k_cache, v_cache, k_scales, v_scales, block_tables, context_lens, scale: float,
                        use_vector_kernel: bool = True):
    """The compiled attention over an int8 / float8 cache (`kv_quant`); callers check `load()` first.
    `use_vector_kernel=False` forces the portable loops (tests compare the two)."""
    from kvmem.attention import kv_quant

    if not kv_quant.is_quantized(k_cache.dtype) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"kv_cache_dtype: the native kernel reads int8 or float8 caches here, not {k_cache.dtype}")
    return load().quantized_attention(q, k_cache, v_cache, k_scales, v_scales, block_tables, context_lens, scale,
                                      kv_quant.FP8_SCALE, use_vector_kernel)


def _name() -> str:
    return f"kvmem_cpu_kernels_{kernel_build.cpu_tag()}_{kernel_build.source_tag(_CSRC)}"


def _load_or_build():
    name = _name()
    return kernel_build.load_or_build(name, _SOURCES, kernel_build.kernel_dir(name), _CFLAGS, _LDFLAGS)


def _unavailable(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load():
    """The compiled extension module (built on first call if not at install), or None where it can't be
    built or is off."""
    global _module, _tried
    if _tried:  # every layer asks, every step: no environment lookup on this path
        return _module
    with _lock:
        if not _tried and not enabled():  # decided once per process, like the build
            _module, _tried = None, True
        if not _tried:
            try:
                _module = _load_or_build()
            except Exception as e:  # no compiler, no ninja, an exotic platform: the torch paths still work
                logger.warning("kvmem: native CPU kernels unavailable (%s); using torch ops", _unavailable(e))
                _module = None
            _tried = True
    return _module


def build(verbose: bool = True) -> Path | None:
    """Build the kernels for this environment now (a no-op where built). Returns the built library's
    path, or None where there is none: off, no compiler, or another build held the lock too long."""
    name = _name()
    path = kernel_build.library_path(name, kernel_build.kernel_dir(name))
    reason = None
    if not enabled():
        reason = "KVMEM_CPU_KERNELS=0"
    else:
        try:
            if _load_or_build() is None:
                reason = "another process held the build lock too long"
        except Exception as e:
            reason = _unavailable(e)
    if verbose:
        if reason is None:
            print(f"kvmem: native CPU kernels for this environment: {path}")
        else:
            print(f"kvmem: native CPU kernels not built ({reason}); kvmem will use torch ops", file=sys.stderr)
    return None if reason else path


if __name__ == "__main__":
    # Run as `python -m`, this file is a second copy of the module: build through the package's own.
    from kvmem.attention import cpu_kernels

    cpu_kernels.build()
