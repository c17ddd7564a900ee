"""Build a C++ extension once per environment and import it, without ever waiting forever.

torch's JIT builder (`torch.utils.cpp_extension.load`) has two traps this module steps around:
- its cross-process lock is a file's existence (FileBaton `lock`): a process killed mid-build leaves
  it behind and every later `load` waits on it forever, silently;
- its cache dir (~/.cache/torch_extensions) is shared by every Python environment, so two venvs with
  the same sources rewrite each other's build.ninja (different include paths) and rebuild in turn.

So each extension lives in a directory owned by one environment (`kernel_dir`):

    <dir>/<name>.so    the finished module, published atomically (copied, then renamed into place)
    <dir>/build.lock   our lock: an flock, which the kernel drops when its holder dies
    <dir>/build/       torch's build directory (build.ninja, objects, its FileBaton `lock`)

A process whose `<name>.so` exists imports it directly and never calls torch's builder. Otherwise it
takes the flock (waiting a bounded time, with a message), and builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_WAIT_S = 600.0  # a cold build of the real kernels takes about a minute on two cores


def cpu_tag() -> str:
    """What -march=native depends on: the CPU model and its flags (part of a kernel's name)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def source_tag(csrc: Path) -> str:
    """A hash of every file in `csrc` (part of a kernel's name): torch's builder notices a changed
    .cpp but not a changed header."""
    digest = hashlib.sha1()
    for path in sorted(csrc.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


def kernel_dir(name: str, prefix: str | None = None) -> Path:
    """Where extension `name` lives for the environment at `prefix` (default: this one's sys.prefix).

    `KVMEM_KERNEL_DIR` (a base directory) wins. Else `<prefix>/share/kvmem/kernels`, which belongs to
    the venv, where it is built already or can be written; else a user cache dir keyed by what the
    build links against: the environment, torch's location and version, the Python ABI.
    """
    if base := os.environ.get("KVMEM_KERNEL_DIR"):
        return Path(base) / name
    prefix = sys.prefix if prefix is None else prefix
    own = Path(prefix) / "share" / "kvmem" / "kernels" / name
    if library_path(name, own).exists() or _writable(own):  # built there at install, or ours to build in
        return own
    import torch

    key = "\n".join([os.path.realpath(prefix), os.path.dirname(os.path.realpath(torch.__file__)),
                     torch.__version__, sys.implementation.cache_tag])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kvmem" / "kernels" / hashlib.sha1(key.encode()).hexdigest()[:12] / name


def _writable(path: Path) -> bool:
    """Whether `path` exists writable or could be created: its nearest existing ancestor is writable."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def library_path(name: str, directory: Path) -> Path:
    return Path(directory) / f"{name}.so"


def lock_path(directory: Path) -> Path:
    return Path(directory) / "build.lock"


def build_directory(directory: Path) -> Path:
    return Path(directory) / "build"


def import_built(name: str, directory: Path):
    """The published module in `directory`, or None where there is none yet."""
    path = library_path(name, directory)
    if not path.exists():
        return None
    import torch  # noqa: F401  the .so links libtorch, which must be loaded first

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_or_build(name: str, sources, directory: Path, cflags=(), ldflags=(), wait_s: float | None = None,
                  what: str = "the native CPU kernels"):
    """Import extension `name` from `directory`, building it first if needed.

    Returns None (with a warning) when another process holds the build lock past `wait_s` seconds
    (default `KVMEM_KERNEL_BUILD_WAIT`, else 600). A failed build raises (no compiler, no ninja).
    """
    if (module := import_built(name, directory)) is not None:
        return module
    if wait_s is None:
        wait_s = float(os.environ.get("KVMEM_KERNEL_BUILD_WAIT", DEFAULT_WAIT_S))
    directory = Path(directory)
    build_dir = build_directory(directory)
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(lock_path(directory), wait_s, what)
    if fd is None:
        logger.warning("kvmem: gave up after %.0f s waiting for another kvmem process building %s in %s; "
                       "using torch ops", wait_s, what, directory)
        return None
    try:
        if (module := import_built(name, directory)) is not None:  # the holder we waited for finished it
            return module
        # We hold the flock, so nobody is building here: a FileBaton file is a killed build's leftover,
        # on which torch would wait forever.
        (build_dir / "lock").unlink(missing_ok=True)
        logger.warning("kvmem: building %s for this environment (once, about a minute) in %s", what, directory)
        from torch.utils import cpp_extension

        module = cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                                    extra_ldflags=list(ldflags), build_directory=str(build_dir), verbose=False)
        # Publish by rename, so that a process starting now finds either nothing or the whole file.
        tmp = directory / f".{name}.so.{os.getpid()}"
        shutil.copyfile(library_path(name, build_dir), tmp)
        os.replace(tmp, library_path(name, directory))
        return module
    finally:
        os.close(fd)  # drops the flock


def _lock(path: Path, wait_s: float, what: str) -> int | None:
    """An fd holding an exclusive flock on `path`, or None after `wait_s` seconds of someone else holding it.

    Polled without blocking, so that the wait is bounded and says once what it waits for.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        if not warned:
            logger.warning("kvmem: waiting up to %.0f s for %s: another kvmem process is building %s there "
                           "(KVMEM_KERNEL_BUILD_WAIT sets the bound)", wait_s, path, what)
            warned = True
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        time.sleep(0.1)
