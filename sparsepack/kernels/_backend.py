"""Which implementation of a kernel runs, and the only place that imports triton.

Three backends, one name each:

==========  ==========================================================================================
reference   plain torch, the definition every other path is tested against (any device, any dtype)
cpu         the fast CPU path: torch ops plus numba kernels compiled on first use (``cache=True``)
triton      Triton kernels for CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests)
==========  ==========================================================================================

The choice, first match wins: an explicit ``backend=`` argument, then the ``SPARSEPACK_BACKEND`` environment
variable, then the device of the tensors (cpu -> ``cpu``, cuda -> ``triton``, anything else -> ``reference``).
Nothing here imports triton or numba at import time: :func:`import_triton` and :func:`kernel_module` do it on
first use, so ``import sparsepack`` stays cheap and works where neither is installed.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "SPARSEPACK_BACKEND"


def resolve(device: torch.device, backend: str | None = None) -> str:
    """The backend to use for tensors on ``device``.

    Args:
        device: where the operands live.
        backend: an explicit choice (one of :data:`BACKENDS`); None defers to the environment and the device.

    Returns:
        One of :data:`BACKENDS`.

    Raises:
        ValueError: an unknown backend name, or ``cpu`` asked for CUDA tensors.
        RuntimeError: ``triton`` needed but not importable.
    """
    choice = backend or os.environ.get(ENV_VAR) or None
    if choice is None:
        choice = {"cpu": "cpu", "cuda": "triton"}.get(device.type, "reference")
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r}; expected one of {BACKENDS} (from {ENV_VAR} or backend=)")
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got {device}")
    if choice == "triton":
        import_triton()
        if device.type == "cpu" and not interpreting():
            raise ValueError("the triton backend runs CPU tensors only in the interpreter: set TRITON_INTERPRET=1")
    return choice


@functools.cache
def import_triton() -> tuple[ModuleType, ModuleType]:
    """``(triton, triton.language)``, or a RuntimeError saying how to get them."""
    try:
        import triton
        import triton.language as tl
    except ImportError as err:  # pragma: no cover - triton is installed wherever these tests run
        raise RuntimeError(
            "sparsepack's CUDA kernels need Triton: `pip install triton` (it ships with CUDA builds of torch), "
            f"or set {ENV_VAR}=reference to run the plain-torch kernels"
        ) from err
    return triton, tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``), as the tests do."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def kernel_module(name: str) -> ModuleType:
    """Import ``sparsepack.kernels.<name>`` on first use (the numba and triton kernel modules).

    Cached: callers look their kernel up on every call (per layer per decoded token on the decode path), where
    even ``import_module``'s lookup of an imported module shows.
    """
    if name.startswith("_cpu"):
        _configure_numba()
    return importlib.import_module(f"sparsepack.kernels.{name}")


@functools.cache
def _configure_numba() -> None:
    """Use numba's own ``workqueue`` threads instead of its default OpenMP layer (unless the user chose one).

    numba's ``omp`` layer loads the system libgomp beside torch's OpenMP runtime; on a small busy machine the
    two pools spin-wait against each other, several times slower (``docs/BENCHMARKS.md``, Kernels). Must run
    before the first parallel launch.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    import numba

    numba.config.THREADING_LAYER = "workqueue"


_numba_threads: dict[int, int] = {}  # calling thread -> the torch thread count last mirrored into numba


def match_torch_threads() -> None:
    """Run numba's parallel kernels on as many threads as torch's intra-op pool (``torch.set_num_threads``).

    numba otherwise starts one thread per core whatever torch was told: with ``torch.set_num_threads(1)`` a
    compiled product beside torch's single-threaded ops took two cores (and more CPU time than torch's own
    CSR product). numba's setting is per calling thread, so it is mirrored per thread; a dict lookup per call
    once set.
    """
    n = torch.get_num_threads()
    key = threading.get_ident()
    if _numba_threads.get(key) != n:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _numba_threads[key] = n
