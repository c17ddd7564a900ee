"""What the machine can do, in the units the cost model needs: a `HardwareProfile`.

A profile is measured on the machine (`measure`), loaded from a JSON file (`load`), or the documented
default (`DEFAULT_PROFILE`). The cost model reads five rates and two sizes:

- host→device and device→host link bytes/s: how fast the host tier's KV and activation blocks (and,
  when weights are offloaded, the next layer's weights) reach the device, and how fast new K,V or
  activations go back;
- device matmul FLOP/s for the K/V projection's shape `[tokens, hidden] × [hidden, 2·kv_heads·head_dim]`:
  how fast activations turn back into K,V;
- device memory bytes/s: how fast attention reads the K,V it needs and a decode GEMM reads its weights;
- device and host memory bytes: what fits where.

On CPU, "device" and "host" are the same memory: the link is a memcpy between two host tensors, so a
CPU profile describes a machine where recomputing activations never pays (the link is as fast as
memory). It is there so the code path is exercised, not to predict GPU serving.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

GiB = 2**30


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    host_to_device_bytes_per_s: float  # pinned host -> device copies, as the host tier is read
    device_to_host_bytes_per_s: float  # device -> pinned host, as new KV / activations are written back
    device_matmul_flops_per_s: float  # GEMM rate at the K/V projection's shape (matmul_shape)
    device_memory_bytes_per_s: float  # read+write traffic of a device-to-device copy
    device_memory_bytes: int
    host_memory_bytes: int
    dtype: str = "bfloat16"  # the dtype the GEMM was measured in
    matmul_shape: tuple[int, int, int] = (0, 0, 0)  # (tokens, hidden, 2*kv_size) of the measured GEMM; 0 = assumed
    source: str = ""  # where the numbers come from: "measured on ..." or "assumed: ..."

    def __post_init__(self) -> None:
        for f in ("host_to_device_bytes_per_s", "device_to_host_bytes_per_s", "device_matmul_flops_per_s",
                  "device_memory_bytes_per_s", "device_memory_bytes", "host_memory_bytes"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareProfile.{f} must be positive, got {getattr(self, f)!r}")
        object.__setattr__(self, "matmul_shape", tuple(int(x) for x in self.matmul_shape))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["matmul_shape"] = list(self.matmul_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown profile fields {unknown}; a profile has {sorted(known)}")
        return cls(**d)


# The default: an A100-40GB on PCIe 4.0 x16 with a large host, the kind of machine HybridServe and
# FlexGen target (a model whose weights and KV do not fit the GPU). These are assumptions, not the
# paper's numbers: the paper's testbed description was not available to us. PCIe 4.0 x16 peaks at
# 32 GB/s per direction and pinned copies reach about 25 GB/s; A100 bf16 dense tensor-core peak is
# 312 TFLOP/s and large GEMMs reach about 80 % of it; HBM2 peaks at 1,555 GB/s.
DEFAULT_PROFILE = HardwareProfile(
    name="a100-40gb-pcie4",
    host_to_device_bytes_per_s=25e9,
    device_to_host_bytes_per_s=25e9,
    device_matmul_flops_per_s=250e12,
    device_memory_bytes_per_s=1.3e12,
    device_memory_bytes=40 * GiB,
    host_memory_bytes=512 * GiB,
    dtype="bfloat16",
    source="assumed: A100-40GB, PCIe 4.0 x16 (~25 GB/s pinned copies), ~250 TFLOP/s bf16 GEMM, "
           "~1.3 TB/s HBM, 512 GiB host memory",
)


def save(profile: HardwareProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path


def load(path: str | Path) -> HardwareProfile:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no hardware profile at {path}; write one with `kvmem bench hybrid --measure "
                                f"--save-profile {path}` or leave --profile out for the default")
    return HardwareProfile.from_dict(json.loads(path.read_text()))


# --- measuring ----------------------------------------------------------------------------------
def _best_seconds(fn: Callable[[], None], sync: Callable[[], None], budget_s: float, min_reps: int = 3) -> float:
    """The fastest of repeated calls within `budget_s` (at least `min_reps`): on a shared machine the
    minimum is the machine, the rest is the neighbours."""
    fn()
    sync()  # warm-up: first-touch page faults, kernel selection
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < budget_s:
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, reps = min(best, elapsed), spent + elapsed, reps + 1
        if reps >= 1000:
            break
    return best


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: a nominal figure, said so in `source`
        return 16 * GiB


def measure(device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
            matmul_shape: tuple[int, int, int] = (256, 2048, 4096), copy_bytes: int = 64 * 2**20,
            seconds_per_measurement: float = 0.2) -> HardwareProfile:
    """Measure this machine in about a second: link copies, projection-shaped GEMM, memory bandwidth.

    `matmul_shape` is (tokens, hidden, 2*kv_size) of the recompute GEMM; the default is small so the
    measurement stays short on a 2-core CPU (a larger shape is faster per FLOP on a GPU: pass the
    model's). CPU: the link is a memcpy between two host tensors, one direction for both. CUDA: pinned
    host <-> device copies with CUDA events, device bytes from the driver.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens, hidden, out = matmul_shape
    a = torch.randn(tokens, hidden, device=device).to(dtype)
    b = torch.randn(hidden, out, device=device).to(dtype)
    n = copy_bytes
    if device.type == "cuda":
        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        host.fill_(1)
        dev, dev2 = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
        h2d = n / _best_seconds(lambda: dev.copy_(host, non_blocking=True), sync, seconds_per_measurement)
        d2h = n / _best_seconds(lambda: host.copy_(dev, non_blocking=True), sync, seconds_per_measurement)
        dev_bw = 2 * n / _best_seconds(lambda: dev2.copy_(dev), sync, seconds_per_measurement)
        device_bytes = torch.cuda.get_device_properties(device).total_memory
        what = f"measured on {torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        sync = lambda: None  # noqa: E731
        src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        copy_s = _best_seconds(lambda: dst.copy_(src), sync, seconds_per_measurement)
        h2d = d2h = n / copy_s  # host and device are one memory: the "link" is a memcpy
        dev_bw = 2 * n / copy_s
        device_bytes = _physical_memory_bytes()
        what = f"measured on CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        raise ValueError(f"measure() knows cpu and cuda devices, got {device}")
    gemm_s = _best_seconds(lambda: torch.mm(a, b), sync, seconds_per_measurement)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return HardwareProfile(
        name=f"measured-{device.type}",
        host_to_device_bytes_per_s=h2d,
        device_to_host_bytes_per_s=d2h,
        device_matmul_flops_per_s=2 * tokens * hidden * out / gemm_s,
        device_memory_bytes_per_s=dev_bw,
        device_memory_bytes=int(device_bytes),
        host_memory_bytes=_physical_memory_bytes(),
        dtype=str(dtype).removeprefix("torch."),
        matmul_shape=(tokens, hidden, out),
        source=f"{what}, {when}; copies of {n // 2**20} MiB, best of repeats",
    )
