"""GPTQ-v1 linear layers as ``com.microsoft::MatMulNBits`` nodes in an exported ONNX graph.

``torch.onnx.export(dynamo=True)`` turns every ``nn.Linear`` into ``MatMul(x, W^T)`` whose second input is an
initializer ``[in, out]`` and whose node metadata (``pkg.torch.onnx.name_scopes``) names the source module. We
export with dense stand-ins for the quantized layers, then :func:`rewrite_linears` swaps each such MatMul for a
MatMulNBits node carrying the GPTQ integers unchanged (no re-quantization).

MatMulNBits layout (onnxruntime contrib op, CPU and CUDA EPs):

- ``B`` uint8 ``[N, K / block, block * bits / 8]``: column ``n``'s quantized values, low bits = lower ``k`` first;
- ``scales`` float ``[N * K / block]`` (``n``-major), same dtype as ``A``;
- ``zero_points`` uint8 ``[N * ceil((K / block) * bits / 8)]`` packed like ``B`` (default ``2**(bits-1)``);
- ``W[k, n] = scales[n, k // block] * (q[k, n] - zero[n, k // block])``.

GPTQ-v1 stores ``zero - 1``; we add the 1 back. Act-order packs (non-monotone ``g_idx``) are exact too: sorting
the rows by group makes the groups contiguous, and a ``Gather`` of the input's last axis applies the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsepack.kernels.packing import pack_matmulnbits, pack_matmulnbits_zeros, unpack_cols, unpack_rows

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
MS_DOMAIN = "com.microsoft"
SUPPORTED_BITS = (2, 4, 8)


class UnsupportedLayerError(ValueError):
    """A layer cannot be expressed as MatMulNBits (bit width, block size, group layout)."""


@dataclass
class NBitsWeight:
    """One quantized linear in MatMulNBits layout (shapes in the module docstring)."""

    B: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N * K/block]
    zero_points: np.ndarray  # uint8 [N * ceil(K/block * bits / 8)]
    perm: np.ndarray | None  # int64 [K]: input order for act-order packs, else None
    K: int
    N: int
    bits: int
    block_size: int


def check_layer(name: str, in_features: int, bits: int, group_size: int) -> None:
    """Raise :class:`UnsupportedLayerError` before any export work for a layer MatMulNBits cannot hold."""
    if bits not in SUPPORTED_BITS:
        raise UnsupportedLayerError(f"{name}: {bits}-bit layers have no MatMulNBits form (supported: 2, 4, 8)")
    block = in_features if group_size == -1 else group_size
    if block < 16 or block & (block - 1) or in_features % block:
        raise UnsupportedLayerError(
            f"{name}: MatMulNBits needs a power-of-two block >= 16 dividing in_features={in_features}, got {block}"
        )


def to_nbits(layer, name: str = "layer") -> NBitsWeight:
    """GPTQ-v1 buffers of a :class:`~sparsepack.layers.quantized_linear.QuantizedLinear` -> MatMulNBits tensors."""
    K, N, bits = layer.in_features, layer.out_features, layer.bits
    check_layer(name, K, bits, layer.group_size)
    block = K if layer.group_size == -1 else layer.group_size
    q = unpack_rows(layer.qweight.cpu(), bits, K)  # (K, N)
    zeros = unpack_cols(layer.qzeros.cpu(), bits, N) + 1  # (G, N) true zero points
    if int(zeros.max()) >= 2**bits:
        raise UnsupportedLayerError(f"{name}: GPTQ-v1 zero point {int(zeros.max())} overflows {bits} bits")
    g_idx = layer.g_idx.cpu().long()
    perm = None
    if not torch.equal(g_idx, torch.arange(K) // block):
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[order], torch.arange(K) // block):
            raise UnsupportedLayerError(f"{name}: g_idx groups are not {block} rows each; cannot reorder into blocks")
        q, perm = q[order], order.numpy().astype(np.int64)
    scales = layer.scales.cpu().float().t().contiguous().reshape(-1)  # (N * G,) n-major
    return NBitsWeight(
        B=pack_matmulnbits(q, bits, block).numpy(),
        scales=scales.numpy(),
        zero_points=pack_matmulnbits_zeros(zeros, bits).numpy(),
        perm=perm, K=K, N=N, bits=bits, block_size=block,
    )  # fmt: skip


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """Reference dequantization of the MatMulNBits tensors: float32 ``[K, N]`` in the *original* input order."""
    per = 8 // w.bits
    shifts = np.arange(per, dtype=np.uint8) * w.bits
    q = ((w.B.reshape(w.N, -1, 1) >> shifts) & (2**w.bits - 1)).reshape(w.N, w.K)  # (N, K)
    G = w.K // w.block_size
    zb = w.zero_points.reshape(w.N, -1, 1)
    z = ((zb >> shifts) & (2**w.bits - 1)).reshape(w.N, -1)[:, :G]  # (N, G)
    s = w.scales.reshape(w.N, G)
    deq = (q.reshape(w.N, G, w.block_size).astype(np.float32) - z[..., None]) * s[..., None]  # (N, G, block)
    wt = deq.reshape(w.N, w.K).T.astype(np.float32)  # (K, N) in sorted order
    if w.perm is not None:
        out = np.empty_like(wt)
        out[w.perm] = wt
        return out
    return wt


def scope_of(node) -> list[str]:
    """The module path list torch.onnx records on a node (empty if none)."""
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            import ast

            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def rewrite_linears(model, weights: dict[str, NBitsWeight], prefix: str = "", float_dtype=np.float32) -> list[str]:
    """Replace the MatMul of every module in ``weights`` by MatMulNBits, in place on a ``ModelProto``.

    Args:
        model: the exported ``onnx.ModelProto``.
        weights: module name (as in the PyTorch model) -> its MatMulNBits tensors.
        prefix: module-path prefix the export wrapper adds (``"m."`` for a wrapper holding the model as ``m``).
        float_dtype: the graph's activation dtype; MatMulNBits wants ``scales`` in the same type as its input.

    Returns:
        The module names rewritten; raises ``UnsupportedLayerError`` if one of ``weights`` was not found.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = {prefix + k: k for k in weights}
    new_nodes, done, dropped = [], [], set()
    for node in graph.node:
        hit = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            hit = next((wanted[s] for s in reversed(scope_of(node)) if s in wanted), None)
        if hit is None or hit in done:
            new_nodes.append(node)
            continue
        w = weights[hit]
        base = f"{hit}.nbits"
        x = node.input[0]
        if w.perm is not None:  # act-order: feed the input features in block order
            perm_name = f"{base}.perm"
            graph.initializer.append(numpy_helper.from_array(w.perm, perm_name))
            new_nodes.append(helper.make_node("Gather", [x, perm_name], [f"{base}.x"], axis=-1, name=f"{base}/Gather"))
            x = f"{base}.x"
        for suffix, arr in (("B", w.B), ("scales", w.scales.astype(float_dtype)), ("zero_points", w.zero_points)):
            graph.initializer.append(numpy_helper.from_array(arr, f"{base}.{suffix}"))
        ins = [x, f"{base}.B", f"{base}.scales", f"{base}.zero_points"]
        # A bias stays where the export put it (an Add after this node): the dense stand-in keeps it.
        new = helper.make_node("MatMulNBits", ins, [node.output[0]], domain=MS_DOMAIN, name=f"{base}/MatMulNBits",
                               K=w.K, N=w.N, bits=w.bits, block_size=w.block_size, accuracy_level=0)  # fmt: skip
        new.metadata_props.extend(node.metadata_props)
        new_nodes.append(new)
        dropped.add(node.input[1])
        done.append(hit)
    missing = sorted(set(weights) - set(done))
    if missing:
        raise UnsupportedLayerError(f"no MatMul found for quantized layer {missing[0]} in the exported graph")
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph, dropped)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def _drop_unused_initializers(graph, candidates: set[str]) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name not in candidates or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
