"""sparsepack's onnxruntime custom-op library: ``sparsepack::SparseLowRankDelta``, built from C on first use.

The op computes one adapter slot's correction ``y = scale * (x A^T) B^T + x S^T`` with ``S`` in CSR, in one node
(inputs ``x, A [r, in], B [out, r], scale, values [nnz], row_ptr [out + 1], col_idx [nnz]``; r = 0 / nnz = 0
allowed; the CSR structure is checked on every call). The standard-op graph needs about a dozen nodes per slot
for the same maths; see ``csrc/sp_ortops.c`` and ``benchmarks/ort_custom_op/REPORT.md`` for the kernels and the
C API facts they rely on. The op runs on the calling thread: its per-row tasks are too short for onnxruntime's
intra-op pool (``KernelContext_ParallelFor``) to pay off (``docs/BENCHMARKS.md``, ONNX export).

The PyPI onnxruntime wheel ships no C headers, so the library declares the few API entries it uses itself and
links against nothing but libc. It is compiled here with the system C compiler (gcc >= 12 or clang >= 15) for the
host CPU (``-march=native``), once per source, compiler and CPU, into ``$SPARSEPACK_CACHE/ortops/<key>/`` (written
to a temporary name and renamed into place, so concurrent first uses are safe).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from sparsepack.formats.staging import staged_file

DOMAIN = "sparsepack"
OP = "SparseLowRankDelta"
OP_VERSION = 1  # the opset version of DOMAIN in exported graphs
CUSTOM_ADAPTER_OPS = ("custom", "custom-fp16")  # the export's `adapter_op` values that run this op (fp32 / fp16 A, B)
ADAPTER_OPS = ("standard", *CUSTOM_ADAPTER_OPS)  # every `--adapter-op` (standard: ONNX ops only, no library)
SOURCE = Path(__file__).resolve().with_name("csrc") / "sp_ortops.c"  # absolute: it includes itself by __FILE__
LIBRARY = "libsp_ortops.so"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared")
COMPILERS = ("gcc", "cc", "clang")


class OrtOpsBuildError(RuntimeError):
    """The custom-op library cannot be built or loaded here (no C compiler, a compile error, not Linux/x86-64)."""


def _compiler() -> str:
    env = os.environ.get("CC")
    for name in ([env] if env else []) + list(COMPILERS):
        path = shutil.which(name)
        if path:
            return path
    raise OrtOpsBuildError(
        "--adapter-op custom needs a C compiler to build sparsepack's onnxruntime op (tried "
        f"{', '.join(([env] if env else []) + list(COMPILERS))}); install gcc >= 12, or export with the default "
        "--adapter-op standard"
    )


def _cpu_signature() -> str:
    """The host CPU's feature flags: ``-march=native`` code must not be reused on a CPU that lacks some of them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout


def _build_key(cc: str) -> str:
    h = hashlib.sha256()
    parts = (SOURCE.read_bytes(), " ".join(FLAGS).encode(), _compiler_version(cc).encode(), _cpu_signature().encode())
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def library_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the compiled library for this host, building it first if needed.

    Raises:
        OrtOpsBuildError: not Linux, no C compiler, or the compiler failed (its output is in the message).
    """
    if platform.system() != "Linux":
        raise OrtOpsBuildError(f"--adapter-op custom is built for Linux only (this is {platform.system()})")
    if cache_dir is None:
        from sparsepack.runtime.sample import default_cache_dir

        cache_dir = default_cache_dir()
    cc = _compiler()
    out_dir = Path(cache_dir) / "ortops" / _build_key(cc)
    lib = out_dir / LIBRARY
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with staged_file(lib, mode=0o755) as tmp:  # concurrent first uses each build, the last rename wins
        res = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise OrtOpsBuildError(f"{cc} failed to build {SOURCE} (exit {res.returncode}):\n{res.stderr[-2000:]}")
    return lib


def register(session_options, cache_dir: str | Path | None = None) -> Path:
    """Register the library with ``onnxruntime.SessionOptions`` (building it if needed); returns its path."""
    lib = library_path(cache_dir)
    session_options.register_custom_ops_library(str(lib))
    return lib
