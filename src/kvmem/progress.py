"""What kvmem is doing while it starts (reading the model, dequantizing, building kernels, sizing
the KV cache), said as it happens so that nobody presses Ctrl-C on a silent terminal.

Messages go to the `kvmem.progress` logger at INFO, like any library's. The commands
(`kvmem serve|generate|chat`) show them on stderr with `show_progress()`; a program using `LLM`
sees them by configuring logging as usual.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

logger = logging.getLogger("kvmem.progress")


def say(message: str, *args: object) -> None:
    logger.info(message, *args)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a test or a REPL may replace it)."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def show_progress() -> None:
    """Print progress messages as `kvmem: ...` lines on stderr (once, however often called)."""
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("kvmem: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not a second time through a root handler the command configured


def human_bytes(n: float) -> str:
    """Bytes as a person reads them (binary units): "311.1 MiB", "64.0 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
