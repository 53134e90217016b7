"""A JSON-ready summary of a pack, for ``sparsepack inspect``."""

from __future__ import annotations

import math
from typing import Any

from sparsepack.formats.pack import Pack
from sparsepack.formats.safetensors_check import DTYPE_BYTES


def describe_pack(pack: Pack) -> dict[str, Any]:
    """Manifest, base quantization, per-layer table, adapters and sizes of ``pack``."""
    m = pack.manifest
    tensor_bytes = {n: math.prod(t.shape) * DTYPE_BYTES[t.dtype] for n, t in pack.tensors.items()}
    layer_stats = (m.quantization or {}).get("layers", {}) if m.quantization else {}
    layers = []
    for name in pack.quantized_modules:
        qw = pack.tensors[f"{name}.qweight"]
        scales = pack.tensors[f"{name}.scales"]
        nbytes = sum(b for n, b in tensor_bytes.items() if n.rsplit(".", 1)[0] == name)
        row = {
            "name": name,
            "in_features": pack.tensors[f"{name}.g_idx"].shape[0],
            "out_features": qw.shape[1],
            "bits": pack.quant["bits"],
            "group_size": pack.quant["group_size"],
            "groups": scales.shape[0],
            "bytes": nbytes,
        }
        row.update({k: v for k, v in layer_stats.get(name, {}).items() if k not in row})
        layers.append(row)
    adapters = []
    for name, ad in pack.adapters.items():
        ranks = sorted({mod.rank for mod in ad.modules.values()})
        nnz = sum(mod.nnz for mod in ad.modules.values())
        dense = sum(mod.shape[0] * mod.shape[1] for mod in ad.modules.values())
        params = nnz + sum(mod.rank * (mod.shape[0] + mod.shape[1]) for mod in ad.modules.values())
        adapters.append({
            "name": name, "method": ad.method, "modules": len(ad.modules), "ranks": ranks, "nnz": nnz,
            "density": nnz / dense if dense else 0.0, "parameters": params,
        })  # fmt: skip
    files = m.files
    return {
        "path": str(pack.path),
        "kind": pack.kind,
        "format": m.format if pack.kind == "sparsepack" else None,
        "format_version": m.format_version if pack.kind == "sparsepack" else None,
        "base": {
            **m.base,
            "model_type": pack.config.model_type,
            "architectures": getattr(pack.config, "architectures", None),
            "hidden_size": getattr(pack.config, "hidden_size", None),
            "num_hidden_layers": getattr(pack.config, "num_hidden_layers", None),
            "vocab_size": getattr(pack.config, "vocab_size", None),
        },
        "quantization": {k: v for k, v in (pack.quant or {}).items()} or None,
        "layers": layers,
        "adapters": adapters,
        "history": [
            {"stage": h.stage, "time": h.time, "tool_version": h.tool_version, "args": h.args}
            for h in m.history
        ],  # fmt: skip
        "sizes": {
            "tensors": len(pack.tensors),
            "tensor_bytes": sum(tensor_bytes.values()),
            "quantized_layer_bytes": sum(r["bytes"] for r in layers),
            "files": len(files),
            "file_bytes": sum(f["bytes"] for f in files.values()),
        },
    }
