"""Native CPU kernels (C++) for linear layers over GGUF-quantized weights (csrc/quant_matmul.cpp),
used by `kvmem.models.quantized_linear`.

Built and loaded like the attention kernels (`kvmem.attention.cpu_kernels`, whose build helper
`kernel_build` this shares): at install (`make setup` runs `python -m kvmem.models.quant_kernels`)
with -march=native into this environment's kernel directory (KVMEM_KERNEL_DIR overrides), named by
this CPU's model and flags and a hash of csrc/; at run time imported directly, built then only where
missing, under a lock that dies with its holder and a bounded wait. Without a C++ compiler, or with
KVMEM_CPU_KERNELS=0, `load()` returns None and quantized layers dequantize with torch ops instead.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from kvmem.attention import cpu_kernels, kernel_build

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "quant_matmul.cpp"]
# -ffp-contract=off: a block's dequantization stays a multiply then an add, as the gguf package's.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module = None
_tried = False


def _name() -> str:
    return f"kvmem_quant_kernels_{kernel_build.cpu_tag()}_{kernel_build.source_tag(_CSRC)}"


def _load_or_build():
    name = _name()
    return kernel_build.load_or_build(name, _SOURCES, kernel_build.kernel_dir(name), _CFLAGS, _LDFLAGS,
                                      what="the quantized-weight kernels")


def load():
    """The compiled module (`quant_linear`, `dequantize`, `has_vector_kernel`), or None where it can't
    be built or native kernels are off."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            if cpu_kernels.enabled():
                try:
                    _module = _load_or_build()
                except Exception as e:  # no compiler, no ninja: quantized layers use torch ops
                    logger.warning("kvmem: quantized-weight kernels unavailable (%s); using torch ops",
                                   cpu_kernels._unavailable(e))
                    _module = None
            _tried = True
    return _module


def build(verbose: bool = True) -> Path | None:
    """Build the kernels for this environment now (a no-op where built); the library's path or None."""
    name = _name()
    path = kernel_build.library_path(name, kernel_build.kernel_dir(name))
    reason = None
    if not cpu_kernels.enabled():
        reason = "KVMEM_CPU_KERNELS=0"
    else:
        try:
            if _load_or_build() is None:
                reason = "another process held the build lock too long"
        except Exception as e:
            reason = cpu_kernels._unavailable(e)
    if verbose:
        if reason is None:
            print(f"kvmem: quantized-weight kernels for this environment: {path}")
        else:
            print(f"kvmem: quantized-weight kernels not built ({reason}); quantized layers will use torch ops",
                  file=sys.stderr)
    return None if reason else path


if __name__ == "__main__":
    from kvmem.models import quant_kernels

    quant_kernels.build()
