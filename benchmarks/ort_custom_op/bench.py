"""Per-node overhead of SparseLowRankDelta in a 210-node chain (decode shape), 1 intra-op thread.

Run: OMP_NUM_THREADS=1 /work/main/.venv/bin/python bench.py [--T 1] [--nodes 210] [--reps 7] [--iters 20]

Variants (each a chain of N "layers" h -> h', in = out = 576):
  matmul          h' = MatMul(h, W_i)                                    (base-model stand-in)
  matmul+custom   h' = Add(MatMul(h, W_i), SparseLowRankDelta(h, adapter_i))
  matmul+add      h' = Add(MatMul(h, W_i), c_i)                          (isolates the Add)
  matmul+stdops   h' = MatMul(h,W_i) + MatMul(MatMul(h,A_i^T), s*B_i^T) + MatMul(h, dense(S_i)^T)
                                                                         (same math in standard ops)
  custom          h' = h + SparseLowRankDelta(h, adapter_i)              (op + Add, no MatMul)
  custom-shared   h' = h + SparseLowRankDelta(h, adapter_0)              (one adapter for all nodes: cache-hot)
  custom-empty    h' = h + SparseLowRankDelta(h, r=0, nnz=0)             (dispatch/API overhead only)
  add             h' = Add(h, c_i)                                       (cheapest standard op)
Every layer has its own weights (W_i distinct, adapters distinct), as in a real model.
Timing: all sessions built first + warm-up; then `reps` rounds, each running every variant `iters` times;
per-run thread CPU time (main metric; excludes preemption by other jobs) and wall time; min / p10 / median.
A variant name may end in "@tag" to use libsp_ortops_<tag>.so (e.g. "@plain": simple reference loops),
and carry storage tags: "matmul+custom/f16/i32" stores A,B as float16 and row_ptr,col_idx as int32.
"""
import argparse
import json
import os
import subprocess
import time

import numpy as np
import onnxruntime as ort
from common import DOMAIN, HERE, IR_VERSION, LIB, OP, OPSETS, random_adapter, session
from onnx import TensorProto, helper, numpy_helper

p = argparse.ArgumentParser()
p.add_argument("--T", type=int, default=1)
p.add_argument("--nodes", type=int, default=210)
p.add_argument("--dim", type=int, default=576)
p.add_argument("--r", type=int, default=16)
p.add_argument("--density", type=float, default=0.006)
p.add_argument("--reps", type=int, default=7)
p.add_argument("--iters", type=int, default=20)
p.add_argument("--variants", default="matmul,matmul+custom,matmul+add,matmul+stdops,custom,custom-empty,add")
p.add_argument("--json", default="")
args = p.parse_args()

D, N, T = args.dim, args.nodes, args.T
rng = np.random.default_rng(0)
W = [(rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for _ in range(N)]
ADS = [random_adapter(rng, D, D, args.r, args.density, scale=0.5) for _ in range(N)]
EMPTY = random_adapter(rng, D, D, 0, 0.0)
C = [(rng.standard_normal(D) * 1e-3).astype(np.float32) for _ in range(N)]
nnz_mean = float(np.mean([a["values"].size for a in ADS]))


def dense_S(ad):
    S = np.zeros((D, D), np.float32)
    rp, ci, v = ad["row_ptr"], ad["col_idx"], ad["values"]
    for o in range(D):
        S[o, ci[rp[o]:rp[o + 1]]] = v[rp[o]:rp[o + 1]]
    return S


def build(variant, storage=()):
    """storage: subset of {"f16", "i32"}: store A/B as float16, row_ptr/col_idx as int32"""
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr, name=name))
        return name

    def add_adapter(i, ad, tag):
        if "f16" in storage:
            ad = dict(ad, A=ad["A"].astype(np.float16), B=ad["B"].astype(np.float16))
        if "i32" in storage:
            ad = dict(ad, row_ptr=ad["row_ptr"].astype(np.int32), col_idx=ad["col_idx"].astype(np.int32))
        return [init(f"{tag}{k}_{i}", v) for k, v in ad.items()]

    h = "x"
    for i in range(N):
        o = f"h{i}"
        if variant == "matmul":
            nodes.append(helper.make_node("MatMul", [h, init(f"W{i}", W[i])], [o]))
        elif variant == "matmul+custom":
            nodes.append(helper.make_node("MatMul", [h, init(f"W{i}", W[i])], [f"y{i}"]))
            nodes.append(helper.make_node(OP, [h] + add_adapter(i, ADS[i], "a"), [f"d{i}"], domain=DOMAIN))
            nodes.append(helper.make_node("Add", [f"y{i}", f"d{i}"], [o]))
        elif variant == "matmul+add":
            nodes.append(helper.make_node("MatMul", [h, init(f"W{i}", W[i])], [f"y{i}"]))
            nodes.append(helper.make_node("Add", [f"y{i}", init(f"c{i}", C[i])], [o]))
        elif variant == "matmul+stdops":
            ad = ADS[i]
            nodes.append(helper.make_node("MatMul", [h, init(f"W{i}", W[i])], [f"y{i}"]))
            nodes.append(helper.make_node("MatMul", [h, init(f"At{i}", np.ascontiguousarray(ad["A"].T))], [f"u{i}"]))
            nodes.append(helper.make_node("MatMul", [f"u{i}", init(f"sBt{i}", np.ascontiguousarray(
                (ad["scale"][0] * ad["B"]).T))], [f"l{i}"]))
            nodes.append(helper.make_node("MatMul", [h, init(f"St{i}", np.ascontiguousarray(dense_S(ad).T))],
                                          [f"s{i}"]))
            nodes.append(helper.make_node("Add", [f"y{i}", f"l{i}"], [f"yl{i}"]))
            nodes.append(helper.make_node("Add", [f"yl{i}", f"s{i}"], [o]))
        elif variant == "custom":
            # h + delta(h): keeps h at a constant scale (a bare delta chain decays into denormals)
            nodes.append(helper.make_node(OP, [h] + add_adapter(i, ADS[i], "a"), [f"d{i}"], domain=DOMAIN))
            nodes.append(helper.make_node("Add", [h, f"d{i}"], [o]))
        elif variant == "custom-shared":
            # one adapter shared by all nodes (cache resident): isolates memory traffic
            if i == 0:
                add_adapter("", ADS[0], "s")  # initializers s<name>_ shared by every node
            nodes.append(helper.make_node(OP, [h] + [f"s{k}_" for k in ADS[0]], [f"d{i}"], domain=DOMAIN))
            nodes.append(helper.make_node("Add", [h, f"d{i}"], [o]))
        elif variant == "custom-empty":
            # output is all zeros; add h back so the chain stays data-dependent and finite
            nodes.append(helper.make_node(OP, [h] + add_adapter(i, EMPTY, "e"), [f"d{i}"], domain=DOMAIN))
            nodes.append(helper.make_node("Add", [h, f"d{i}"], [o]))
        elif variant == "add":
            nodes.append(helper.make_node("Add", [h, init(f"c{i}", C[i])], [o]))
        else:
            raise ValueError(variant)
        h = o
    g = helper.make_graph(nodes, variant, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, D])],
                          [helper.make_tensor_value_info(h, TensorProto.FLOAT, [T, D])], initializer=inits)
    return helper.make_model(g, opset_imports=OPSETS, ir_version=IR_VERSION)


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


print(f"onnxruntime {ort.__version__}; nodes={N} T={T} in=out={D} r={args.r} nnz~{nnz_mean:.0f} "
      f"(density {args.density:.2%}); 1 intra-op thread; {args.reps} interleaved rounds x {args.iters} runs")
print("load before:", uptime())
x = rng.standard_normal((T, D)).astype(np.float32) * 0.1
# A variant may carry a library suffix, e.g. "matmul+custom@plain" -> libsp_ortops_plain.so
sessions, n_nodes = {}, {}
for v in args.variants.split(","):
    base_v, _, libtag = v.partition("@")
    base_v, *storage = base_v.split("/")
    lib = os.path.join(HERE, f"libsp_ortops_{libtag}.so") if libtag else LIB
    m = build(base_v, storage)
    n_nodes[v] = len(m.graph.node)
    sessions[v] = session(m, lib=lib)
    del m
    for _ in range(5):
        sessions[v].run(None, {"x": x})
# Per-run samples, variants interleaved run by run, so load drifts hit all variants alike.
# The machine's 2 cores are shared with other jobs: wall time includes preemption, so the
# main metric is the calling thread's CPU time (time.thread_time). With intra_op_num_threads=1
# onnxruntime runs every kernel on the calling thread, so that is the whole inference.
cpu = {v: [] for v in sessions}
wall = {v: [] for v in sessions}
for _ in range(args.reps):
    for v, sess in sessions.items():
        for _ in range(args.iters):
            c0, w0 = time.thread_time(), time.perf_counter()
            sess.run(None, {"x": x})
            cpu[v].append((time.thread_time() - c0) * 1e3)
            wall[v].append((time.perf_counter() - w0) * 1e3)
res = {}
for v in sessions:
    c, w = np.array(cpu[v]), np.array(wall[v])
    res[v] = dict(cpu_min_ms=float(c.min()), cpu_p10_ms=float(np.percentile(c, 10)),
                  cpu_median_ms=float(np.median(c)), wall_min_ms=float(w.min()),
                  wall_median_ms=float(np.median(w)), samples=len(c), graph_nodes=n_nodes[v])
    print(f"  {v:24s} nodes={n_nodes[v]:5d}  cpu: min {c.min():8.3f}  p10 {np.percentile(c, 10):8.3f}  "
          f"median {np.median(c):8.3f} ms | wall: min {w.min():8.3f}  median {np.median(w):8.3f} ms")
print("load after:", uptime())


def diff(a, b):
    if a in res and b in res:
        d10 = res[a]["cpu_p10_ms"] - res[b]["cpu_p10_ms"]
        dmed = res[a]["cpu_median_ms"] - res[b]["cpu_median_ms"]
        dmin = res[a]["cpu_min_ms"] - res[b]["cpu_min_ms"]
        print(f"  {a:>24s} - {b:<14s}: cpu p10 {d10:+7.3f} ms  median {dmed:+7.3f} ms  min {dmin:+7.3f} ms"
              f"  = {d10 / N * 1e3:+6.2f} us/node (p10)")


print("differences (per token, whole chain; thread CPU time):")
diff("matmul+custom", "matmul")
diff("matmul+custom@plain", "matmul")
diff("matmul+custom@nopf", "matmul")
diff("matmul+custom/f16", "matmul")
diff("matmul+custom/i32", "matmul")
diff("matmul+custom/f16/i32", "matmul")
diff("matmul+add", "matmul")
diff("matmul+custom", "matmul+add")
diff("matmul+stdops", "matmul")
diff("custom", "add")
diff("custom-shared", "add")
diff("custom-empty", "add")
for v in [k for k in res if k.startswith("matmul+custom")]:
    base = res["matmul"]["cpu_p10_ms"] if "matmul" in res else None
    if base:
        extra = res[v]["cpu_p10_ms"] - base
        print(f"  {v:24s}: +{extra:.3f} ms/token = {extra / base:.1%} of this synthetic base, "
              f"{extra / 16.0:.1%} of a 16 ms/token model")
if args.json:
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), nnz_mean=nnz_mean, results=res), f, indent=1)
