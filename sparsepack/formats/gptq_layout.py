"""The GPTQ-v1 tensor layout of one quantized linear layer.

For a linear with ``in_features = K``, ``out_features = N``, ``bits = b`` and ``G`` groups:

==========  ======  ========================  =================================================
tensor      dtype   shape                     meaning
==========  ======  ========================  =================================================
qweight     int32   ``[K * b // 32, N]``      quantized weights, packed along K (see kernels.packing)
qzeros      int32   ``[G, N * b // 32]``      zero points minus one ("v1" convention), packed along N
scales      fp16    ``[G, N]``                per-group scales
g_idx       int32   ``[K]``                   group of each input row; non-monotone under act-order
bias        fp16    ``[N]``                   optional
==========  ======  ========================  =================================================

Dequantized weight (input dim first): ``W[k, n] = scales[g, n] * (q[k, n] - (qzeros[g, n] + 1))`` with
``g = g_idx[k]``; the ``nn.Linear`` weight is ``W.T``. GPTQModel's "v2" checkpoints store the true zero
instead of zero-1; :func:`v2_to_v1_zeros` converts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepack.kernels import packing
from sparsepack.kernels.dequant_matmul import dequantize_reference

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups along the input dimension (group_size -1 = one group)."""
    return 1 if group_size in (-1, 0) else -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Monotone g_idx: row k belongs to group ``k // group_size``."""
    if group_size in (-1, 0):
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features, dtype=torch.int32) // group_size).to(torch.int32)


def expected_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple]:
    """Shapes of the GPTQ-v1 tensors of one layer."""
    G = num_groups(in_features, group_size)
    return {
        "qweight": (in_features * bits // 32, out_features),
        "qzeros": (G, out_features * bits // 32),
        "scales": (G, out_features),
        "g_idx": (in_features,),
    }


def check_packable(name: str, in_features: int, out_features: int, bits: int, group_size: int) -> None:
    """Raise ValueError naming the layer when its dims cannot hold the GPTQ-v1 layout."""
    packing._check_bits(bits)
    blk = 32 if bits == 3 else 32 // bits
    if in_features % blk or out_features % blk:
        raise ValueError(
            f"{name}: in_features={in_features} and out_features={out_features} must be multiples of {blk} "
            f"to pack {bits}-bit weights"
        )
    if group_size not in (-1, 0) and in_features % group_size:
        allowed = [g for g in (32, 64, 128, 256) if in_features % g == 0] + [-1]
        raise ValueError(
            f"{name}: in_features={in_features} is not divisible by group size {group_size}; "
            f"allowed group sizes for this layer: {allowed}"
        )


@dataclass
class GPTQTensors:
    """The packed tensors of one layer plus the scalars needed to read them."""

    qweight: torch.Tensor  # int32 [K*b/32, N]
    qzeros: torch.Tensor  # int32 [G, N*b/32], zero-1
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    bias: torch.Tensor | None = None  # [N]

    @property
    def in_features(self) -> int:
        return self.g_idx.numel()

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @classmethod
    def from_int(
        cls,
        q: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
    ) -> GPTQTensors:
        """Pack integer weights ``q [K, N]`` and true zero points ``zeros [G, N]`` into GPTQ v1."""
        zeros = zeros.to(torch.int64)
        if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > 2**bits - 1):
            # v1 stores zero-1 in b bits and readers add 1 back: a zero of 0 would read as 2**b. Quantizers
            # here keep zeros in [1, 2**b - 1] so that the stored file means what was computed.
            raise ValueError(f"GPTQ v1 zero points must lie in [1, {2**bits - 1}]")
        zm1 = zeros - 1
        return cls(
            qweight=packing.pack_rows(q, bits),
            qzeros=packing.pack_cols(zm1, bits),
            scales=scales.to(torch.float16).contiguous(),
            g_idx=g_idx.to(torch.int32).contiguous(),
            bits=bits,
            bias=None if bias is None else bias.to(torch.float16).contiguous(),
        )

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(q [K, N], zeros [G, N])`` as int32, zeros being the true zero points."""
        q = packing.unpack_rows(self.qweight, self.bits)
        zeros = packing.unpack_cols(self.qzeros, self.bits) + 1
        return q, zeros

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``W [K, N]`` (input dim first)."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.qweight": self.qweight,
            f"{prefix}.qzeros": self.qzeros,
            f"{prefix}.scales": self.scales,
            f"{prefix}.g_idx": self.g_idx,
        }
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """GPTQ-v1 tensors -> dense ``W [K, N]`` in ``dtype`` (the kernels' plain-torch reference)."""
    return dequantize_reference(qweight, qzeros, scales, g_idx, bits, dtype)


def v2_to_v1_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel "gptq_v2" qzeros (true zero) -> v1 (zero-1)."""
    z = packing.unpack_cols(qzeros, bits).to(torch.int64) - 1
    return packing.pack_cols(z & ((1 << bits) - 1), bits)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of an ``nn.Linear`` weight ``[N, K]``.

    Returns ``(q [K, N], zeros [G, N], scales [G, N], g_idx [K])`` with true zero points; scales are
    rounded to fp16 first so that dequantizing the stored tensors reproduces the values used here.
    """
    N, K = weight.shape
    W = weight.detach().to(torch.float32).t()  # (K, N)
    g_idx = default_g_idx(K, group_size)
    G = num_groups(K, group_size)
    gs = K if group_size in (-1, 0) else group_size
    Wg = W.reshape(G, gs, N)  # (G, gs, N)
    maxq = 2**bits - 1
    wmin = Wg.amin(dim=1).clamp(max=0)
    wmax = Wg.amax(dim=1).clamp(min=0)
    if sym:
        amax = torch.maximum(wmin.abs(), wmax)
        scales = 2 * amax / maxq
        zeros = torch.full_like(scales, (maxq + 1) // 2)
    else:
        scales = (wmax - wmin) / maxq
    # A flat (all-zero) group gets scale 1, as GPTQ's grid does; the floor keeps tiny scales non-zero in fp16.
    scales = torch.where(scales == 0, torch.ones_like(scales), scales).clamp(min=2**-24)
    if not sym:
        zeros = torch.round(-wmin / scales).clamp(1, maxq)  # >= 1: see GPTQTensors.from_int
    scales = scales.to(torch.float16).to(torch.float32)
    q = torch.clamp(torch.round(Wg / scales[:, None, :]) + zeros[:, None, :], 0, maxq)
    return q.reshape(K, N).to(torch.int32), zeros.to(torch.int32), scales.to(torch.float16), g_idx
