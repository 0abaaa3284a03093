"""Native CPU kernels (C++ with AVX2/FMA/F16C), compiled on first use.

The sources in ``csrc/`` are built once per source digest and torch version
with ``torch.utils.cpp_extension`` into ``$TOKENLOOM_HOME/kernels`` and
register their ops under ``torch.ops.tokenloom``. A later start only loads
the built library (well under a second). ``make install`` builds them ahead
of time so neither the first ``serve`` nor the tests pay for the compile.

The quantized GEMMs pick their instruction set at run time (AVX-512 VNNI
where the CPU has it, else AVX2; ``gemm_isa``), so one build runs on any
x86-64 machine with AVX2. ``available()`` is False where they cannot run (no compiler, a CPU without
AVX2/FMA, a non-x86 machine) or where ``TOKENLOOM_KERNELS=0`` turns them off;
callers then use plain PyTorch paths, or fail with ``KernelsUnavailable``
when the user explicitly asked for a kernel-only feature.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from tokenloom.model_files import tokenloom_home

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
_lock = threading.Lock()
_state: dict[str, object] = {}


class KernelsUnavailable(RuntimeError):
    """The native kernels cannot be built or run on this machine."""


def ops():
    """``torch.ops.tokenloom``, building the library first if needed.

    Raises KernelsUnavailable with the reason when it cannot be built."""
    loaded = _state.get("ops")
    if loaded is not None:  # every matmul asks: skip the lock once built
        return loaded
    with _lock:
        if "error" in _state:
            raise KernelsUnavailable(_state["error"])
        if "ops" not in _state:
            try:
                _build_and_load()
            except Exception as exc:  # noqa: BLE001 - the reason is kept and re-raised
                _state["error"] = f"native kernels unavailable: {exc}"
                raise KernelsUnavailable(_state["error"]) from exc
            _state["ops"] = torch.ops.tokenloom
            isa = os.environ.get("TOKENLOOM_GEMM_ISA")
            if isa:
                torch.ops.tokenloom.gemm_isa(isa)
        return _state["ops"]


def gemm_isa(choice: str = "") -> str:
    """The instruction set the quantized GEMMs run on ("avx512_vnni" or "avx2"), chosen
    at run time from the CPU; ``choice`` ("auto", "avx2", "avx512_vnni") changes it for
    the process (TOKENLOOM_GEMM_ISA sets it at load)."""
    return ops().gemm_isa(choice)


def available() -> bool:
    try:
        ops()
    except KernelsUnavailable as exc:
        if not _state.get("warned"):
            logger.warning("%s; using the plain PyTorch paths", exc)
            _state["warned"] = True
        return False
    return True


def _build_and_load() -> None:
    if os.environ.get("TOKENLOOM_KERNELS") == "0":
        raise RuntimeError("turned off by TOKENLOOM_KERNELS=0")
    missing = [flag for flag in _REQUIRED_CPU_FLAGS if not _cpu_has(flag)]
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(missing)}")
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    sources = sorted(_CSRC.glob("*.cpp"))
    name = f"tokenloom_kernels_{_digest(sources + sorted(_CSRC.glob('*.h')))}"
    build_dir = _kernels_home() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(build_dir):
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            build_directory=str(build_dir),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("TOKENLOOM_KERNELS_VERBOSE") == "1",
        )


@contextlib.contextmanager
def _exclusive(build_dir: Path) -> Iterator[None]:
    """One process at a time in ``build_dir``, under an OS lock that dies with its holder.

    torch's builder guards the directory with a plain ``lock`` file and waits
    forever while one exists; a process killed while holding it (Ctrl-C on a
    starting server) left every later start hanging. Under our flock no other
    tokenloom process is building, so a ``lock`` file found there is such a
    leftover and goes.
    """
    with open(build_dir / "tokenloom.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("removing %s, left by a kernel build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH. The ``ninja`` wheel (a dependency)
    installs it next to this interpreter, which is not on PATH when the venv is
    not activated; where it is there, it goes first, ahead of any system ninja.
    Two ninja versions disagree on the format of the build log, so alternating
    between them (an activated venv, then a plain ``.venv/bin/python``) rebuilt
    every kernel, ~55 s, at each switch."""
    here = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if Path(here, "ninja").exists() or shutil.which("ninja") is None:
        if path.split(os.pathsep)[0] != here:
            os.environ["PATH"] = os.pathsep.join([here, path]) if path else here


def _digest(sources: list[Path]) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for source in sources:
        h.update(source.name.encode())
        h.update(source.read_bytes())
    return h.hexdigest()[:12]


def _kernels_home() -> Path:
    return tokenloom_home() / "kernels"


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return False
