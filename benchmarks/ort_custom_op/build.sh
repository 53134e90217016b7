#!/bin/sh
# Build the custom-op library (default) and the variants used by the tests/benchmarks.
set -e
cd "$(dirname "$0")"
SRC="$(cd ../.. && pwd)/sparsepack/runtime/csrc/sp_ortops.c"  # absolute: the file includes itself (__FILE__); the library sparsepack builds on first use (runtime/ort_ops.py)
CFLAGS="-O3 -march=native -fopenmp-simd -fPIC -shared -Wall -Wextra"
gcc $CFLAGS -o libsp_ortops.so "$SRC"                       # default ("stream" kernel, prefetch on)
gcc $CFLAGS -DSP_PREFETCH=0 -o libsp_ortops_nopf.so "$SRC"   # no software prefetch
gcc $CFLAGS -DSP_BLOCKED -o libsp_ortops_blocked.so "$SRC"   # earlier blocked kernel
gcc $CFLAGS -DSP_PLAIN -o libsp_ortops_plain.so "$SRC"       # plain reference loops
gcc $CFLAGS -DSP_OP_VERSION=13 -o libsp_ortops_v13.so "$SRC" # legacy OrtCustomOp (void KernelCompute)
gcc $CFLAGS -DSP_OP_VERSION=33 -o libsp_ortops_v33.so "$SRC" # newer than the runtime (must be refused)
gcc -O1 -Wall -o abi_check abi_check.c -ldl
gcc -O3 -march=native -fopenmp-simd -Wall -Wno-aggressive-loop-optimizations -I "$(dirname "$SRC")" -o bench_core bench_core.c
echo built: libsp_ortops*.so abi_check bench_core
