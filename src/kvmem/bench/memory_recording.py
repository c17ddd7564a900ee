"""`kvmem bench memory --record FILE`: the simulated run as a recording /dashboard plays back.

The file is JSON lines: a header, then one frame per recorded step of each strategy, each frame the
same state a live server streams to the page (`kvmem.engine.memory_picture`), tagged with the
strategy's label and the step. Open it with `kvmem dashboard --replay FILE` (no model needed), or
with the page of any running server ("Replay a recording…"): the page then plays the strategies
side by side, step for step.

Size: a frame holds the whole map (a paged block is a character, a virtual chunk too, plus which
sequence holds which blocks), so at most `max_frames` frames are kept per strategy: when a run
records more, every other frame is dropped and the interval doubles (the kept frames stay evenly
spaced whatever the run's length, which is not known in advance).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from kvmem.bench.report_json import finite
from kvmem.engine.memory_picture import dashboard_state, memory_picture
from kvmem.memory.base import KVCacheManager

FORMAT = "kvmem-memory-recording"
VERSION = 1
# Simulated steps have no wall time; the page's time axis is the step times this nominal duration
# (a decode step of a small model on a CPU), so its "last 5 minutes" spans 6,000 steps.
STEP_SECONDS = 0.05


class MemoryRecorder:
    def __init__(self, path: str | Path, max_frames: int = 200) -> None:
        if max_frames < 2:
            raise ValueError(f"record frames must be at least 2, got {max_frames}")
        self.path = Path(path)
        self.max_frames = max_frames
        self.labels: list[str] = []
        self.frames: list[str] = []  # encoded, of the strategy being recorded
        self.every = 1
        self.settings: dict = {}
        self._file = None

    def open(self, settings: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self.settings = settings

    def start(self, label: str) -> None:
        self.labels.append(label)
        self.frames, self.every = [], 1

    def wants(self, step: int) -> bool:
        return step % self.every == 0

    def frame(self, label: str, step: int, manager: KVCacheManager, seqs: Iterable, snapshot) -> None:
        """Record step `step` (call only when `wants(step)`): `snapshot` an `EngineSnapshot`."""
        state = dashboard_state({"snapshot": snapshot, "map": memory_picture(manager, seqs)})
        state.update(label=label, step=step)
        # finite(): a browser's JSON.parse has no Infinity or NaN
        self.frames.append(json.dumps(finite(state), separators=(",", ":"), allow_nan=False))
        if len(self.frames) >= 2 * self.max_frames:
            self.frames = self.frames[::2]
            self.every *= 2

    def finish(self, label: str) -> None:
        """Write the strategy's frames (the header before the first strategy's)."""
        if self._file is None:
            raise RuntimeError("MemoryRecorder.open() first")
        if len(self.labels) == 1:
            header = {"format": FORMAT, "version": VERSION, "step_seconds": STEP_SECONDS,
                      "settings": finite(self.settings)}
            self._file.write(json.dumps(header, allow_nan=False) + "\n")
        for line in self.frames:
            self._file.write(line + "\n")
        self.frames = []
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_recording(path: str | Path) -> tuple[dict, list[dict]]:
    """The header and the frames of a recording; a ValueError naming the file when it is not one."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kvmem memory recording (kvmem bench memory --record FILE writes one)")
    return header, [json.loads(line) for line in lines[1:] if line.strip()]
