"""SIMD 8 x 8 block transposes for the numba CPU kernels (imported by ``_cpu_sparse``).

The sparse kernels compute on feature-major rows (``[features, T]``) while activations arrive and leave
token-major (``[T, features]``), so each call transposes its input and writes its product back transposed.
Element by element, the write-back alone took longer than the sparse product itself, and torch's own
transposing copy is no faster. Numba's auto-vectorizer does not turn a scalar transpose into shuffles, so these
helpers emit them directly: eight 8-wide row loads, three rounds of ``shufflevector`` (swap 4 x 4, then 2 x 2,
then 1 x 1 blocks), eight 8-wide stores (figures in ``docs/BENCHMARKS.md``, Kernels).

``tr8_copy(src, i, j, dst, k, l)`` sets ``dst[k + a, l + b] = src[i + b, j + a]`` for ``a, b < 8``;
``tr8_add`` adds instead. Both arrays are C-contiguous 2-D fp32 or fp64 arrays of one dtype; the caller keeps
the 8 x 8 blocks in bounds (no checks: these run inside compiled loops) and handles ragged edges itself.
Note for developers: numba's on-disk cache keys on the calling kernel's file, so after editing this file clear
``__pycache__`` of ``kernels/`` (or touch ``_cpu_sparse.py``).
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
_B = 8  # block edge: eight fp32 lanes (one AVX register), eight fp64 lanes (one AVX-512 register)


def _lane_mask(b: int, high: bool) -> ir.Constant:
    """Shuffle mask combining rows ``u`` and ``v`` (lanes 0-7 of ``u``, then 8-15 of ``v``) in round ``b``.

    Lane ``j`` of the low result takes ``u[j]`` when bit ``b`` of ``j`` is clear, else ``v[j - b]``; the high
    result takes ``u[j + b]`` or ``v[j]``. Rounds b = 4, 2, 1 over row pairs ``(i, i + b)`` transpose 8 x 8.
    """
    if high:
        lanes = [j + b if not j & b else _B + j for j in range(_B)]
    else:
        lanes = [j if not j & b else _B + j - b for j in range(_B)]
    return ir.Constant(ir.VectorType(ir.IntType(32), _B), lanes)


def _typer(add: bool):
    def typer(typingctx, src, i0, j0, dst, k0, l0):
        ok = (
            isinstance(src, types.Array)
            and isinstance(dst, types.Array)
            and src.ndim == dst.ndim == 2
            and src.layout == dst.layout == "C"
            and src.dtype == dst.dtype
            and src.dtype in (types.float32, types.float64)
        )
        if not ok:
            return None  # numba reports a typing error naming the argument types
        sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            src_v, i0_v, j0_v, dst_v, k0_v, l0_v = args
            src_t, dst_t = signature.args[0], signature.args[3]
            vec = ir.VectorType(context.get_data_type(src_t.dtype), _B)

            def row_ptr(ary_t, ary_v, row, col, a):
                ary = context.make_array(ary_t)(context, builder, ary_v)
                p = cgutils.get_item_pointer2(
                    context, builder, ary.data, cgutils.unpack_tuple(builder, ary.shape),
                    cgutils.unpack_tuple(builder, ary.strides), ary_t.layout,
                    [builder.add(row, ir.Constant(row.type, a)), col],
                )  # fmt: skip
                return builder.bitcast(p, vec.as_pointer())

            rows = [builder.load(row_ptr(src_t, src_v, i0_v, j0_v, a), align=4) for a in range(_B)]
            for b in (4, 2, 1):
                for i in range(_B):
                    if not i & b:
                        u, v = rows[i], rows[i + b]
                        rows[i] = builder.shuffle_vector(u, v, _lane_mask(b, high=False))
                        rows[i + b] = builder.shuffle_vector(u, v, _lane_mask(b, high=True))
            for a in range(_B):
                p = row_ptr(dst_t, dst_v, k0_v, l0_v, a)
                out = builder.fadd(builder.load(p, align=4), rows[a]) if add else rows[a]
                builder.store(out, p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return typer


tr8_copy = intrinsic(_typer(add=False))
tr8_add = intrinsic(_typer(add=True))


@numba.njit(**_JIT)
def transpose_rows_into(x, t0, n, xT):  # pragma: no cover - compiled
    # xT[k, t] = x[t0 + t, k] for t < n: rows t0 .. t0 + n of x into the first n columns of xT.  x (T, K),
    # xT (K, >= n), both C-contiguous, one dtype.  Feature blocks outside, tokens inside: each block fills eight
    # output rows front to back (with tokens outside, every block of T touched all K output rows: slower)
    K = x.shape[1]
    n8, K8 = n - n % _B, K - K % _B
    for k in range(0, K8, _B):
        for t in range(0, n8, _B):
            tr8_copy(x, t0 + t, k, xT, k, t)
    for k in range(K8, K):
        for t in range(n8):
            xT[k, t] = x[t0 + t, k]
    for t in range(n8, n):
        for k in range(K):
            xT[k, t] = x[t0 + t, k]


@numba.njit(**_JIT)
def write_back(acc, R, T, y, r0, t0, accumulate):  # pragma: no cover - compiled
    # y[t0 + t, r0 + r] (+)= acc[r, t] for the first R rows and T tokens of the block acc (rows, >= T).  y (T, out)
    R8, T8 = R - R % _B, T - T % _B
    for t in range(0, T8, _B):
        for r in range(0, R8, _B):
            if accumulate:
                tr8_add(acc, r, t, y, t0 + t, r0 + r)
            else:
                tr8_copy(acc, r, t, y, t0 + t, r0 + r)
        for i in range(t, t + _B):
            for r in range(R8, R):
                if accumulate:
                    y[t0 + i, r0 + r] += acc[r, i]
                else:
                    y[t0 + i, r0 + r] = acc[r, i]
    for i in range(T8, T):
        for r in range(R):
            if accumulate:
                y[t0 + i, r0 + r] += acc[r, i]
            else:
                y[t0 + i, r0 + r] = acc[r, i]
