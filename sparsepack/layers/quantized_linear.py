"""QuantizedLinear: a frozen GPTQ-v1 linear layer.

Buffers follow the GPTQ-v1 layout (see ``sparsepack.formats.gptq_layout``), so ``state_dict()`` keys and
shapes are exactly what AutoGPTQ/GPTQModel checkpoints hold: ``qweight``, ``qzeros``, ``scales``, ``g_idx``
and optionally ``bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepack.formats import gptq_layout
from sparsepack.kernels.dequant_matmul import dequant_matmul, dequantize_reference


class QuantizedLinear(nn.Module):
    """``y = x @ dequant(qweight) + bias`` with weights stored as GPTQ-v1 buffers (never trainable)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        shapes = gptq_layout.expected_shapes(in_features, out_features, bits, group_size)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None

    @classmethod
    def from_tensors(cls, t: gptq_layout.GPTQTensors, group_size: int) -> QuantizedLinear:
        layer = cls(t.in_features, t.out_features, t.bits, group_size, bias=t.bias is not None, device="meta")
        layer.qweight, layer.qzeros, layer.scales, layer.g_idx = t.qweight, t.qzeros, t.scales, t.g_idx
        if t.bias is not None:
            layer.bias = t.bias
        return layer

    def tensors(self) -> gptq_layout.GPTQTensors:
        return gptq_layout.GPTQTensors(
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``nn.Linear``-style weight ``[out, in]``."""
        return dequantize_reference(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype).t()

    @property
    def weight(self) -> torch.Tensor:
        # Some HF code reads `.weight.dtype` / `.weight.device` of every linear; give it the compute dtype.
        return self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dequant_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
