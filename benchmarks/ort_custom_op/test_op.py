"""Correctness tests for libsp_ortops.so (SparseLowRankDelta) under onnxruntime.

Run: OMP_NUM_THREADS=1 /work/main/.venv/bin/python test_op.py
"""
import sys
import threading

import numpy as np
import onnxruntime as ort
from common import LIB, const_op_model, random_adapter, reference, session, single_op_model

print("onnxruntime", ort.__version__, "lib", LIB)
rng = np.random.default_rng(0)
failures = []


def check(name, got, want, tol=2e-5):
    err = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
    ok = got.shape == want.shape and got.dtype == np.float32 and err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name:58s} shape={str(got.shape):16s} max_abs_err={err:.3e}")
    if not ok:
        failures.append(name)


def feeds(x, ad):
    return dict(x=x, **ad)


# ---------------------------------------------------------------- shapes
sess2 = session(single_op_model(x_rank=2))
sess3 = session(single_op_model(x_rank=3))
sess2s = session(single_op_model(x_rank=2, scale_rank=0))  # scale declared as rank 0

IN, OUT, R, DENS = 576, 1536, 16, 0.006
cases = [
    ("T=1   in=576 out=1536 r=16 dens=0.6%", 1, IN, OUT, R, DENS),
    ("T=128 in=576 out=1536 r=16 dens=0.6%", 128, IN, OUT, R, DENS),
    ("T=1   in=576 out=576  r=16 dens=0.6%", 1, IN, 576, R, DENS),
    ("T=7   in=1536 out=576 r=64 dens=2%", 7, 1536, 576, 64, 0.02),
    ("T=5   r=300 (heap scratch path)", 5, 96, 80, 300, 0.05),
    ("T=3   in=61 out=37 r=9 (odd sizes: loop tails)", 3, 61, 37, 9, 0.1),
    ("T=2   in=8 out=8 r=8 dens=100% (rows longer than 8)", 2, 8, 8, 8, 1.0),
    ("T=2   in=40 out=16 r=1 dens=60% (long rows, end of nnz)", 2, 40, 16, 1, 0.6),
    ("T=128 r=0 (A=[0,in], B=[out,0])", 128, IN, OUT, 0, DENS),
    ("T=128 nnz=0 (values/col_idx empty)", 128, IN, OUT, R, 0.0),
    ("T=4   r=0 and nnz=0 -> y == 0", 4, IN, OUT, 0, 0.0),
    ("T=0   (no rows)", 0, IN, OUT, R, DENS),
]
print("2-D x:")
for name, T, inp, out, r, dens in cases:
    ad = random_adapter(rng, inp, out, r, dens)
    x = rng.standard_normal((T, inp)).astype(np.float32)
    (y,) = sess2.run(None, feeds(x, ad))
    check(name + f" nnz={ad['values'].size}", y, reference(x, ad))

print("3-D x [B, S, in]:")
ad = random_adapter(rng, IN, OUT, R, DENS)
x = rng.standard_normal((2, 64, IN)).astype(np.float32)
(y,) = sess3.run(None, feeds(x, ad))
check("x=[2,64,576]", y, reference(x, ad))

print("scalar (rank-0) scale:")
ad = random_adapter(rng, IN, OUT, R, DENS, scale=1.7, scalar_scale=True)
x = rng.standard_normal((3, IN)).astype(np.float32)
(y,) = sess2s.run(None, feeds(x, ad))
check("scale=[] (rank 0)", y, reference(x, ad))

print("adapter as initializers (exported-model shape):")
ad = random_adapter(rng, IN, OUT, R, DENS)
sc = session(const_op_model(ad, IN, OUT))
for T in (1, 128):
    x = rng.standard_normal((T, IN)).astype(np.float32)
    (y,) = sc.run(None, {"x": x})
    check(f"initializer weights T={T}", y, reference(x, ad))

# ---------------------------------------------------------------- errors must surface as exceptions
print("invalid inputs (must raise, not crash):")
base_ad = random_adapter(rng, 64, 32, 4, 0.1)
x = rng.standard_normal((2, 64)).astype(np.float32)
bad = {
    "col_idx out of range": dict(col_idx=np.where(np.arange(base_ad["col_idx"].size) == 0, 64,
                                                  base_ad["col_idx"]).astype(np.int64)),
    "negative col_idx": dict(col_idx=np.full_like(base_ad["col_idx"], -1)),
    "row_ptr wrong length": dict(row_ptr=base_ad["row_ptr"][:-1]),
    "row_ptr[out] != nnz": dict(row_ptr=np.concatenate([base_ad["row_ptr"][:-1], [base_ad["row_ptr"][-1] + 5]])),
    "row_ptr decreasing": dict(row_ptr=np.concatenate([[0], base_ad["row_ptr"][1:-1][::-1],
                                                       base_ad["row_ptr"][-1:]]).astype(np.int64)),
    "A inner dim != in": dict(A=np.zeros((4, 63), np.float32)),
    "B second dim != r": dict(B=np.zeros((32, 5), np.float32)),
    "scale has 2 elements": dict(scale=np.ones(2, np.float32)),
}
for name, patch in bad.items():
    ad = dict(base_ad, **patch)
    try:
        sess2.run(None, feeds(x, ad))
        print(f"  FAIL {name}: no exception")
        failures.append(name)
    except Exception as e:  # onnxruntime raises RuntimeException / Fail
        msg = str(e).splitlines()[-1] if str(e) else repr(e)
        ok = "SparseLowRankDelta" in str(e)
        print(f"  {'ok  ' if ok else 'FAIL'} {name:24s} -> {type(e).__name__}: ...{msg[-110:]}")
        if not ok:
            failures.append(name)
bad_types = {
    "A float16, B float32": dict(A=base_ad["A"].astype(np.float16)),
    "A, B float64": dict(A=base_ad["A"].astype(np.float64), B=base_ad["B"].astype(np.float64)),
    "row_ptr int32, col_idx int64": dict(row_ptr=base_ad["row_ptr"].astype(np.int32)),
    "row_ptr, col_idx uint8": dict(row_ptr=base_ad["row_ptr"].astype(np.uint8),
                                   col_idx=base_ad["col_idx"].astype(np.uint8)),
}
_sessions = {}


def typed_session(ad):
    """session whose graph declares A/B/row_ptr/col_idx with the dtypes present in `ad`"""
    key = tuple(ad[k].dtype.name for k in ("A", "B", "row_ptr", "col_idx"))
    if key not in _sessions:
        _sessions[key] = session(single_op_model(a_type=ad["A"].dtype, b_type=ad["B"].dtype,
                                                 rp_type=ad["row_ptr"].dtype, ci_type=ad["col_idx"].dtype))
    return _sessions[key]


for name, patch in bad_types.items():
    try:
        ad = dict(base_ad, **patch)
        typed_session(ad).run(None, feeds(x, ad))
        print(f"  FAIL {name}: no exception")
        failures.append(name)
    except Exception as e:
        ok = "SparseLowRankDelta" in str(e)
        print(f"  {'ok  ' if ok else 'FAIL'} {name:24s} -> {type(e).__name__}: ...{str(e).splitlines()[-1][-100:]}")
        if not ok:
            failures.append(name)
# x / scale / values are declared float32: onnxruntime itself rejects other types before the kernel runs
try:
    sess2.run(None, feeds(x.astype(np.float64), base_ad))
    failures.append("float64 x accepted")
    print("  FAIL float64 x accepted")
except Exception as e:
    print(f"  ok   float64 x (ORT check) -> {type(e).__name__}: {str(e)[:100]}")

# ---------------------------------------------------------------- alternative storage types
print("float16 A/B and/or int32 indices (reference uses the same rounded float16 values):")
for wt in (np.float32, np.float16):
    for it in (np.int64, np.int32):
        for T in (1, 128):
            ad = random_adapter(rng, IN, OUT, R, DENS)
            ad = dict(ad, A=ad["A"].astype(wt), B=ad["B"].astype(wt),
                      row_ptr=ad["row_ptr"].astype(it), col_idx=ad["col_idx"].astype(it))
            x = rng.standard_normal((T, IN)).astype(np.float32)
            (y,) = typed_session(ad).run(None, feeds(x, ad))
            check(f"A,B {np.dtype(wt).name:7s} idx {np.dtype(it).name:5s} T={T}", y, reference(x, ad))
ad = random_adapter(rng, 61, 37, 9, 0.1)  # odd sizes: tails of every blocked loop
ad = dict(ad, A=ad["A"].astype(np.float16), B=ad["B"].astype(np.float16),
          row_ptr=ad["row_ptr"].astype(np.int32), col_idx=ad["col_idx"].astype(np.int32))
x = rng.standard_normal((3, 61)).astype(np.float32)
(y,) = typed_session(ad).run(None, feeds(x, ad))
check("float16/int32 odd sizes in=61 out=37 r=9", y, reference(x, ad))

# ---------------------------------------------------------------- concurrency: one session, two threads
print("concurrent Run() on one session (2 threads x 40 runs, different inputs):")
ad = random_adapter(rng, IN, OUT, R, DENS)
sc = session(const_op_model(ad, IN, OUT))
xs = [rng.standard_normal((8, IN)).astype(np.float32) for _ in range(2)]
refs = [reference(xi, ad) for xi in xs]
errs = [0.0, 0.0]


def worker(i):
    for _ in range(40):
        (y,) = sc.run(None, {"x": xs[i]})
        errs[i] = max(errs[i], float(np.max(np.abs(y - refs[i]))))


th = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
[t.start() for t in th]
[t.join() for t in th]
ok = max(errs) < 2e-5
print(f"  {'ok  ' if ok else 'FAIL'} max_abs_err over both threads = {max(errs):.3e}")
if not ok:
    failures.append("concurrency")

print("RESULT:", "ALL PASSED" if not failures else f"FAILED: {failures}")
sys.exit(1 if failures else 0)
