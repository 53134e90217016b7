"""Shared helpers: ONNX graph builders, random adapters, numpy reference."""
import os

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.environ.get("SP_LIB", os.path.join(HERE, "libsp_ortops.so"))
DOMAIN = "sparsepack"
OP = "SparseLowRankDelta"
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
IR_VERSION = 9


def random_csr(rng, out, inp, density):
    """CSR (row_ptr, col_idx int64; values float32) with ~density*out*inp nonzeros."""
    nnz = int(round(density * out * inp))
    flat = np.sort(rng.choice(out * inp, size=nnz, replace=False)) if nnz else np.zeros(0, np.int64)
    rows, cols = flat // inp, flat % inp
    row_ptr = np.zeros(out + 1, np.int64)
    np.add.at(row_ptr, rows + 1, 1)
    row_ptr = np.cumsum(row_ptr).astype(np.int64)
    values = rng.standard_normal(nnz).astype(np.float32) * 0.05
    return values, row_ptr, cols.astype(np.int64)


def random_adapter(rng, inp, out, r, density, scale=0.5, scalar_scale=False):
    A = (rng.standard_normal((r, inp)) / np.sqrt(inp)).astype(np.float32)
    B = (rng.standard_normal((out, r)) * 0.1).astype(np.float32)
    s = np.array(scale, np.float32) if scalar_scale else np.array([scale], np.float32)
    values, row_ptr, col_idx = random_csr(rng, out, inp, density)
    return dict(A=A, B=B, scale=s, values=values, row_ptr=row_ptr, col_idx=col_idx)


def reference(x, ad):
    """float64 numpy reference of y = scale*(x A^T) B^T + x S^T."""
    x64 = x.astype(np.float64)
    out, inp = ad["B"].shape[0], x.shape[-1]
    S = np.zeros((out, inp), np.float64)
    rp, ci, v = ad["row_ptr"], ad["col_idx"], ad["values"]
    for o in range(out):
        S[o, ci[rp[o]:rp[o + 1]]] += v[rp[o]:rp[o + 1]]
    low = (x64 @ ad["A"].astype(np.float64).T) @ ad["B"].astype(np.float64).T
    scale = float(ad["scale"].reshape(-1)[0]) if ad["scale"].size else 0.0
    return scale * low + x64 @ S.T


def session(model, lib=LIB, threads=1, opt=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = opt
    so.log_severity_level = 3
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


NP2ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
           np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64,
           np.dtype(np.int32): TensorProto.INT32, np.dtype(np.uint8): TensorProto.UINT8}


def single_op_model(x_rank=2, scale_rank=None, a_type=np.float32, b_type=None, rp_type=np.int64, ci_type=None):
    """scale_rank None -> scale declared with unknown rank (accepts [] / [1] / anything)."""
    """All seven op inputs are graph inputs (dynamic shapes) -> one model covers every test shape."""
    x_shape = [f"d{i}" for i in range(x_rank - 1)] + ["in"]
    y_shape = [f"d{i}" for i in range(x_rank - 1)] + ["out"]
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
        helper.make_tensor_value_info("A", NP2ONNX[np.dtype(a_type)], ["r", "in"]),
        helper.make_tensor_value_info("B", NP2ONNX[np.dtype(b_type or a_type)], ["out", "r"]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT,
                                      None if scale_rank is None else ([1] if scale_rank else [])),
        helper.make_tensor_value_info("values", TensorProto.FLOAT, ["nnz"]),
        helper.make_tensor_value_info("row_ptr", NP2ONNX[np.dtype(rp_type)], ["outp1"]),
        helper.make_tensor_value_info("col_idx", NP2ONNX[np.dtype(ci_type or rp_type)], ["nnz"]),
    ]
    node = helper.make_node(OP, [i.name for i in ins], ["y"], domain=DOMAIN, name="delta")
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    g = helper.make_graph([node], "sp_single", ins, outs)
    return helper.make_model(g, opset_imports=OPSETS, ir_version=IR_VERSION)


def const_op_model(ad, inp, out):
    """Op with its adapter as initializers (the shape an exported model would have)."""
    inits = [numpy_helper.from_array(v, name=k) for k, v in ad.items()]
    node = helper.make_node(OP, ["x", "A", "B", "scale", "values", "row_ptr", "col_idx"], ["y"], domain=DOMAIN)
    g = helper.make_graph(
        [node], "sp_const",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out])],
        initializer=inits)
    return helper.make_model(g, opset_imports=OPSETS, ir_version=IR_VERSION)
