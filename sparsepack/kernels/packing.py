"""Integer packing for the GPTQ-v1 layout and ONNX MatMulNBits.

GPTQ v1 packs b-bit unsigned integers into int32 words as one little-endian bit stream per column:
value ``j`` of a column occupies bits ``[j*b, (j+1)*b)`` of the stream, and word ``w`` holds stream bits
``[32*w, 32*w + 32)``. For b in {2, 4, 8} each word holds ``32 // b`` whole values; for b = 3, 32 values
span exactly three words and values 10 and 21 straddle a word boundary (this is what AutoGPTQ's packer
writes: the bit stream view makes the special case disappear).

``qweight`` is packed along dim 0 (the input dimension K), ``qzeros`` along dim 1 (the output dimension N).
Everything here is exact integer arithmetic; tests compare with ``torch.equal``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def values_per_block(bits: int) -> tuple[int, int]:
    """(values, words) in the smallest whole block: ``32 // bits`` values in one word, or 32 values in three
    words for 3 bits."""
    _check_bits(bits)
    return (32, 3) if bits == 3 else (32 // bits, 1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits (two's complement wrap)."""
    words = words & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along dim 0.

    Args:
        q: integer tensor ``[K, N]`` with values in ``[0, 2**bits)``; ``K * bits`` must be a multiple of 32
            (for 3 bits, K a multiple of 32).
        bits: 2, 3, 4 or 8.

    Returns:
        int32 ``[K * bits // 32, N]``.
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(q.shape)}")
    K, N = q.shape
    if (K * bits) % 32 != 0 or (bits == 3 and K % 32 != 0):
        raise ValueError(f"cannot pack {K} rows at {bits} bits: rows * bits must fill whole 32-bit words")
    q = q.to(torch.int64)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    nval, nword = values_per_block(bits)
    blocks = K // nval
    q = q.reshape(blocks, nval, N)  # (blocks, values, N)
    out = torch.zeros(blocks, nword, N, dtype=torch.int64, device=q.device)  # (blocks, words, N)
    for j in range(nval):
        start = j * bits
        w, off = divmod(start, 32)
        out[:, w] |= q[:, j] << off
        spill = off + bits - 32
        if spill > 0:  # only for 3 bits: the value straddles into the next word
            out[:, w + 1] |= q[:, j] >> (bits - spill)
    return _to_int32(out.reshape(blocks * nword, N))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[K * bits // 32, N]`` -> int32 ``[K, N]``."""
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"unpack_rows expects a 2-D tensor, got shape {tuple(packed.shape)}")
    W, N = packed.shape
    nval, nword = values_per_block(bits)
    if W % nword != 0:
        raise ValueError(f"{W} packed rows is not a whole number of {nword}-word blocks")
    blocks = W // nword
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.reshape(blocks, nword, N)  # (blocks, words, N)
    mask = (1 << bits) - 1
    out = torch.empty(blocks, nval, N, dtype=torch.int64, device=packed.device)
    for j in range(nval):
        start = j * bits
        w, off = divmod(start, 32)
        v = words[:, w] >> off
        spill = off + bits - 32
        if spill > 0:
            v = v | (words[:, w + 1] << (bits - spill))
        out[:, j] = v & mask
    out = out.reshape(blocks * nval, N).to(torch.int32)
    if rows is not None:
        if rows != out.shape[0]:
            raise ValueError(f"packed tensor holds {out.shape[0]} rows, expected {rows}")
    return out


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers along dim 1: ``[G, N]`` -> int32 ``[G, N * bits // 32]`` (the qzeros layout)."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


# ---------------------------------------------------------------------------------------------------------
# GPTQ v1 -> ONNX com.microsoft::MatMulNBits
# ---------------------------------------------------------------------------------------------------------


def pack_matmulnbits(q: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """Pack quantized weights for MatMulNBits.

    Args:
        q: integer ``[K, N]`` (input dim first, as GPTQ stores it), values in ``[0, 2**bits)``.
        bits: 2, 4 or 8 (MatMulNBits packs whole values into bytes, low bits = lower k first).
        block_size: quantization block along K (the GPTQ group size).

    Returns:
        uint8 ``[N, K // block_size, block_size * bits // 8]``.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits supports 2, 4 or 8 bits here, got {bits}")
    K, N = q.shape
    if K % block_size:
        raise ValueError(f"K={K} is not a multiple of block size {block_size}")
    per_byte = 8 // bits
    qt = q.t().to(torch.int32).reshape(N, K // per_byte, per_byte)  # (N, bytes, values per byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=q.device) * bits
    packed = (qt << shifts).sum(-1).to(torch.uint8)  # (N, K / per_byte)
    return packed.reshape(N, K // block_size, block_size * bits // 8)


def pack_matmulnbits_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[G, N]`` (true zeros, not GPTQ's zero-1) -> uint8 ``[N * ceil(G*bits/8)]``.

    Each column's G zero points are packed into bytes low-bits-first, padded to whole bytes per column.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits supports 2, 4 or 8 bits here, got {bits}")
    G, N = zeros.shape
    per_byte = 8 // bits
    pad = (-G) % per_byte
    z = zeros.t().to(torch.int32)  # (N, G)
    if pad:
        z = torch.cat([z, torch.zeros(N, pad, dtype=torch.int32, device=z.device)], dim=1)
    z = z.reshape(N, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=z.device) * bits
    return (z << shifts).sum(-1).to(torch.uint8).reshape(-1)
