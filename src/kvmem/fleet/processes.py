"""The fleet's child processes: started so that none outlives the launcher, pinned to their cores,
their output prefixed with their name, and stopped with SIGTERM, then SIGKILL.

No orphans, however the launcher ends:
- a normal stop or a SIGTERM/SIGINT: the launcher signals every child and waits for it (`stop_all`);
- the launcher killed outright (SIGKILL, a crash): each child asked the kernel, before it started,
  for a SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), and checks that the parent had not
  already died in between.
Children run in their own session, so a Ctrl-C in the terminal reaches only the launcher, which
then stops them in order (replicas drain first) instead of every process getting SIGINT at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded here, not between fork and exec: the child may then only call it (no dlopen, no locks that
# another thread of the parent might have held at the fork).
_LIBC = ctypes.CDLL(None, use_errno=True)
_TAIL_LINES = 40  # lines of a child's output kept, to say why it died


def _child_setup(parent_pid: int, cores: Sequence[int] | None) -> None:
    """Runs in the child between fork and exec: die with the parent; pin to `cores`."""
    _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would signal us
        os._exit(1)
    if cores:
        os.sched_setaffinity(0, cores)


@dataclass
class Child:
    """A started process, its name (log prefix) and the last lines it printed."""

    name: str
    proc: subprocess.Popen
    cores: list[int] | None = None
    tail: list[str] = field(default_factory=list)
    _pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def last_lines(self) -> str:
        if self._pump is not None:
            self._pump.join(timeout=2)  # what it printed before exiting
        return "\n".join(self.tail)


def spawn(name: str, argv: Sequence[str], cores: Sequence[int] | None = None, env: dict[str, str] | None = None,
          echo: bool = True) -> Child:
    """Start `argv` as a child that dies with this process, pinned to `cores` (None: not pinned);
    its stdout and stderr go to ours line by line, prefixed with `(name)` (or only to its tail when
    `echo` is false)."""
    parent = os.getpid()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, text=True, errors="replace", bufsize=1,
                            preexec_fn=lambda: _child_setup(parent, cores))
    child = Child(name, proc, list(cores) if cores else None)

    def pump() -> None:
        for line in proc.stdout:  # ends when the child closes its output (exits)
            line = line.rstrip("\n")
            child.tail.append(line)
            del child.tail[:-_TAIL_LINES]
            if echo:
                print(f"({name}) {line}", file=sys.stderr, flush=True)

    child._pump = threading.Thread(target=pump, name=f"output of {name}", daemon=True)
    child._pump.start()
    return child


def stop_all(children: Sequence[Child], timeout: float) -> None:
    """SIGTERM every child still running, wait up to `timeout` seconds for all, SIGKILL the rest,
    and reap them all."""
    for c in children:
        if c.alive():
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in children:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not stop within %.0f s of SIGTERM: killing it", c.name, c.pid, timeout)
            c.proc.kill()
            c.proc.wait()
