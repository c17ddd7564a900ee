"""CPU time of a process tree, per process and thread, from /proc (Linux): where a server's cores
went during a run. `snap PID OUT.json` records utime + stime of every thread of PID and of its
descendants; `diff BEFORE.json AFTER.json` prints the CPU seconds each used in between, grouped by
process (command line) and thread (id and OS name; `py-spy dump` names Python's threads), largest first.

    python cpu_split.py snap 1234 before.json; ...run the client...; python cpu_split.py snap 1234 after.json
    python cpu_split.py diff before.json after.json [--wall SECONDS]
"""

import json
import os
import sys
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def snap(pid: int) -> dict[str, float]:
    """'<pid> <cmdline> | <tid> <thread name>' -> CPU seconds."""
    times: dict[str, float] = {}
    for p in tree(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
            for task in Path(f"/proc/{p}/task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                name = (task / "comm").read_text().strip()
                key = f"{p} {cmd} | {task.name} {name}"  # tid: Python 3.11 leaves OS thread names alone
                times[key] = times.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError):
            continue
    return times


def diff(before: dict[str, float], after: dict[str, float], wall: float | None) -> None:
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    total = sum(used.values())
    per_proc: dict[str, float] = {}
    for k, v in used.items():
        per_proc[k.split(" | ")[0]] = per_proc.get(k.split(" | ")[0], 0.0) + v
    print(f"total CPU s: {total:.2f}" + (f" over {wall:.2f} s wall = {total / wall:.2f} cores" if wall else ""))
    for proc, v in sorted(per_proc.items(), key=lambda kv: -kv[1]):
        if v < 0.05:
            continue
        print(f"  {v:8.2f} s  {proc}")
        for k, tv in sorted(used.items(), key=lambda kv: -kv[1]):
            if k.startswith(proc + " | ") and tv >= 0.05:
                print(f"      {tv:8.2f} s  thread {k.split(' | ', 1)[1]}")


if __name__ == "__main__":
    if sys.argv[1] == "snap":
        Path(sys.argv[3]).write_text(json.dumps(snap(int(sys.argv[2]))))
    else:
        wall = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--wall" else None
        diff(json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text()), wall)
