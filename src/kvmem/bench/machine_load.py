"""Offline throughput runs of any engine: wait for a quiet machine, time one run, and record how
much CPU other processes took meanwhile. Standard library only: benchmarks/peers loads this file
by path inside other engines' virtual environments, and kvmem's own benchmark imports it.
"""

from __future__ import annotations

import os
import platform
import time


def timed(run, wait_quiet_max: float) -> tuple[object, float, dict, dict | None]:
    """Run `run()` once, timed; with the CPU other processes took meanwhile (see `contention`)."""
    quiet = wait_quiet(wait_quiet_max) if wait_quiet_max > 0 else None
    before = cpu_snapshot(os.getpid())
    t0 = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - t0
    return out, elapsed, contention(before, cpu_snapshot(os.getpid()), elapsed), quiet


def cpu_snapshot(root_pid: int) -> dict:
    """System-wide busy CPU seconds and the CPU seconds of root_pid's process tree (Linux /proc).

    The difference over the timed window is CPU taken by *other* processes: on a shared
    2-core machine that is the main source of noise, so each result records it.
    """
    tck = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = int(fields[11]) + int(fields[12])  # utime + stime
    def in_tree(pid: int) -> bool:
        while pid > 1:
            if pid == root_pid:
                return True
            pid = parent.get(pid, 0)
        return False
    own = sum(c for p, c in cpu.items() if in_tree(p))
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    return {"busy_s": busy / tck, "own_s": own / tck, "loadavg1": load}


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.1, window_s: float = 3.0) -> dict:
    """Wait (up to max_wait_s) until other processes use < threshold_cores over a window."""
    t_start = time.perf_counter()
    other = None
    while True:
        a = cpu_snapshot(os.getpid())
        time.sleep(window_s)
        b = cpu_snapshot(os.getpid())
        other = contention(a, b, window_s)["other_cores"]
        waited = time.perf_counter() - t_start
        if other < threshold_cores or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "quiet": other < threshold_cores, "other_cores_last": other}


def contention(before: dict, after: dict, elapsed: float) -> dict:
    busy = (after["busy_s"] - before["busy_s"]) / elapsed
    own = (after["own_s"] - before["own_s"]) / elapsed
    return {
        "system_busy_cores": round(busy, 3),
        "own_cores": round(own, 3),
        "other_cores": round(max(busy - own, 0.0), 3),
        "loadavg1_before": before["loadavg1"],
        "loadavg1_after": after["loadavg1"],
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
