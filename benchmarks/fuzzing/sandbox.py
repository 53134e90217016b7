"""What every fuzz case runs under: the outcomes, a per-case alarm, a memory cap, no unpickling, a sandbox snapshot.

Shared by ``benchmarks/fuzz_packs.py`` and ``benchmarks/fuzz_outputs.py``. A case's outcome is ``ok`` or
``typed`` (good), or one of the bad ones; :class:`CaseTimeout` and :class:`Unpickled` are ``BaseException``s so
that no ``except Exception`` in the code under test swallows them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

GOOD = ("ok", "typed")
BAD = ("untyped", "missed", "timeout", "wrote", "unpickled")


class CaseTimeout(BaseException):
    """Raised by the per-case alarm; a BaseException so that no ``except Exception`` in the reader swallows it."""


class Unpickled(BaseException):
    """Raised by the patched ``torch.load`` / ``pickle.load(s)``."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` after ``seconds`` (main thread only; elsewhere a no-op)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(_signum, _frame):
        raise CaseTimeout(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def memory_cap(headroom: int) -> Iterator[None]:
    """Cap the address space at its current size + ``headroom`` bytes: any large allocation fails at once.

    The packs fuzzed here are ~150 KB, so a reader that tries to allocate more than the headroom is acting on
    a size it read from the file without checking it. The soft limit is restored afterwards.
    """
    vm = _vm_size()
    if headroom <= 0 or vm is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """``torch.load`` and ``pickle.load(s)`` raise :class:`Unpickled`, except when numba reads its own JIT cache.

    numba's ``cache=True`` keeps compiled kernels as pickles in the package's ``__pycache__``: files written by
    this installation, as trusted as its ``.pyc`` files, never a file of the pack (see docs/RELIABILITY.md).
    """
    import torch

    real_load, real_loads = pickle.load, pickle.loads

    def from_numba() -> bool:
        return sys._getframe(2).f_globals.get("__name__", "").startswith("numba.")

    def load(f, *a, **k):
        if from_numba():
            return real_load(f, *a, **k)
        raise Unpickled(f"pickle.load({getattr(f, 'name', '?')}) was called")

    def loads(data, *a, **k):
        if from_numba():
            return real_loads(data, *a, **k)
        raise Unpickled("pickle.loads was called")

    def refuse(*_a, **_k):
        raise Unpickled("torch.load was called")

    saved = (torch.load, pickle.load, pickle.loads)
    torch.load, pickle.load, pickle.loads = refuse, load, loads
    try:
        yield
    finally:
        torch.load, pickle.load, pickle.loads = saved


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (symlinks not followed) with its type, size and mtime."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
