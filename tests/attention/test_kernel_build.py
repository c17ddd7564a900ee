"""Building and importing the native kernels never hangs: a finished build is imported without torch's
builder, a killed build's leftovers (torch's FileBaton `lock`, our flock) don't stall the next process,
and a live builder is waited for a bounded time. A tiny Python.h module stands in for the kernels."""

import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from torch.utils import cpp_extension

from kvmem.attention import kernel_build

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or not cpp_extension.is_ninja_available(),
                                reason="no C++ toolchain")

BOUND_S = 300  # generous: a step that works takes seconds even on a loaded machine; one that hangs never ends


def tiny_source(tmp_path):
    """A fresh module name (torch's builder renames a name built twice in one process) and its source."""
    name = f"kvmem_test_ext_{uuid.uuid4().hex[:8]}"
    source = tmp_path / f"{name}.cpp"
    source.write_text(textwrap.dedent(f"""
        #include <Python.h>
        static PyObject* answer(PyObject*, PyObject*) {{ return PyLong_FromLong(42); }}
        static PyMethodDef methods[] = {{{{"answer", answer, METH_NOARGS, nullptr}}, {{nullptr, nullptr, 0, nullptr}}}};
        static PyModuleDef def = {{PyModuleDef_HEAD_INIT, "{name}", nullptr, -1, methods}};
        PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&def); }}
    """))
    return name, source


def bounded(fn, timeout=BOUND_S):
    """fn() run on a thread, failing the test instead of hanging it."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still waiting after {timeout} s"
    return result["value"]


def wait_for(path, proc, timeout=BOUND_S):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"helper process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} not created after {timeout} s"
        time.sleep(0.05)


def no_builder(**kwargs):
    raise AssertionError("torch's builder was called")


def test_a_built_module_is_imported_without_torchs_builder(tmp_path, monkeypatch):
    name, source = tiny_source(tmp_path)
    directory = tmp_path / "kernels" / name
    assert bounded(lambda: kernel_build.load_or_build(name, [source], directory)).answer() == 42
    assert kernel_build.library_path(name, directory).exists()

    monkeypatch.setattr(cpp_extension, "load", no_builder)
    assert kernel_build.load_or_build(name, [source], directory).answer() == 42


def test_a_stale_torch_lock_file_does_not_stall_the_build(tmp_path):
    name, source = tiny_source(tmp_path)
    directory = tmp_path / name
    stale = kernel_build.build_directory(directory) / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    assert bounded(lambda: kernel_build.load_or_build(name, [source], directory)).answer() == 42


HANGING_BUILD = """
import pathlib, sys, time
from torch.utils import cpp_extension
from kvmem.attention import kernel_build

name, source, directory, marker = sys.argv[1:]

def hang(**kwargs):  # where a real build is: torch's FileBaton taken, compiling
    pathlib.Path(kwargs["build_directory"], "lock").touch()
    pathlib.Path(marker).touch()
    time.sleep(3600)

cpp_extension.load = hang
kernel_build.load_or_build(name, [source], pathlib.Path(directory))
"""


def test_a_build_killed_midway_leaves_nothing_that_stalls_the_next(tmp_path):
    name, source = tiny_source(tmp_path)
    directory, marker = tmp_path / name, tmp_path / "building"
    proc = subprocess.Popen([sys.executable, "-c", HANGING_BUILD, name, str(source), str(directory), str(marker)])
    try:
        wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(BOUND_S)
    assert (kernel_build.build_directory(directory) / "lock").exists()  # what torch would wait on forever
    assert bounded(lambda: kernel_build.load_or_build(name, [source], directory)).answer() == 42


HOLDER = """
import fcntl, os, pathlib, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
pathlib.Path(sys.argv[2]).touch()
time.sleep(3600)
"""


def test_a_live_builder_is_waited_for_a_bounded_time_then_torch_ops(tmp_path, monkeypatch, caplog):
    name, source = tiny_source(tmp_path)
    directory, marker = tmp_path / name, tmp_path / "holding"
    directory.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(kernel_build.lock_path(directory)), str(marker)])
    try:
        wait_for(marker, proc)
        monkeypatch.setattr(cpp_extension, "load", no_builder)
        with caplog.at_level(logging.WARNING, logger=kernel_build.__name__):
            assert bounded(lambda: kernel_build.load_or_build(name, [source], directory, wait_s=1.0)) is None
    finally:
        proc.kill()
        proc.wait(BOUND_S)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("another kvmem process is building" in m and str(directory) in m for m in warnings)
    assert any("using torch ops" in m for m in warnings)


def test_each_environment_has_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("KVMEM_KERNEL_DIR", raising=False)
    a, b = tmp_path / "venv-a", tmp_path / "venv-b"
    assert kernel_build.kernel_dir("k", str(a)) == a / "share" / "kvmem" / "kernels" / "k"
    assert kernel_build.kernel_dir("k", str(a)) != kernel_build.kernel_dir("k", str(b))

    # Read-only environments: a user cache dir, still one per environment.
    monkeypatch.setattr(kernel_build, "_writable", lambda path: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached_a, cached_b = kernel_build.kernel_dir("k", "/usr"), kernel_build.kernel_dir("k", "/opt/py")
    assert cached_a != cached_b
    assert cached_a.is_relative_to(tmp_path / "cache") and cached_a.name == "k"

    monkeypatch.setenv("KVMEM_KERNEL_DIR", str(tmp_path / "mine"))
    assert kernel_build.kernel_dir("k", str(a)) == tmp_path / "mine" / "k"
