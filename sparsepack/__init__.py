"""sparsepack: GPTQ base + sparse/low-rank corrections + ONNX exports as one versioned pack."""

__version__ = "0.1.0"
