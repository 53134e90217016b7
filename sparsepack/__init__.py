"""sparsepack: GPTQ base + sparse/low-rank corrections + ONNX exports as one versioned pack.

Public API (re-exports only; nothing runs on import):

- ``load(path, adapter=None, device="cpu", dtype=None)``: a ready HF model from a pack or GPTQ checkpoint.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # Lazy re-exports keep `import sparsepack` (and `sparsepack --help`) fast: torch/transformers load on use.
    if name == "load":
        from sparsepack.runtime.loader import load

        return load
    raise AttributeError(f"module 'sparsepack' has no attribute {name!r}")
