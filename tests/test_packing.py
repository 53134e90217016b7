"""GPTQ-v1 packing and layout: exact round trips (torch.equal) and the reference dequantization."""

import numpy as np
import pytest
import torch

from sparsepack.formats import gptq_layout
from sparsepack.kernels import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 32), (128, 96), (256, 64)])
def test_rows_and_cols_round_trip_exactly(bits, shape):
    q = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = packing.pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0] * bits // 32, shape[1])
    assert torch.equal(packing.unpack_rows(packed, bits), q.to(torch.int32))
    packed_c = packing.pack_cols(q.t(), bits)
    assert packed_c.shape == (shape[1], shape[0] * bits // 32)
    assert torch.equal(packing.unpack_cols(packed_c, bits), q.t().to(torch.int32))


def _autogptq_style_3bit(intweight: np.ndarray) -> np.ndarray:
    """The 3-bit packing loop as AutoGPTQ writes it (values 10 and 21 straddle words), for comparison."""
    iw = intweight.astype(np.uint32)
    qw = np.zeros((iw.shape[0] // 32 * 3, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qw.shape[0]:
        for j in range(i, i + 10):
            qw[row] |= iw[j] << (3 * (j - i))
        i += 10
        qw[row] |= iw[i] << 30
        row += 1
        qw[row] |= (iw[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qw[row] |= iw[j] << (3 * (j - i) + 1)
        i += 10
        qw[row] |= iw[i] << 31
        row += 1
        qw[row] |= (iw[i] >> 1) & 3
        i += 1
        for j in range(i, i + 10):
            qw[row] |= iw[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qw.view(np.int32)


def test_3bit_matches_the_autogptq_word_layout():
    q = torch.randint(0, 8, (96, 16), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(packing.pack_rows(q, 3).numpy(), _autogptq_style_3bit(q.numpy()))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_word_layouts_put_value_j_at_bit_j_times_bits(bits):
    q = torch.zeros(32, 1, dtype=torch.int64)
    q[1, 0] = 1  # the second value of the first word
    word = int(packing.pack_rows(q, bits)[0, 0])
    assert word == 1 << bits


def test_sym_4bit_zeros_pack_to_0x77777777():
    z = torch.full((2, 16), 8)  # true zero 8 stored as 7 in every nibble
    t = gptq_layout.GPTQTensors.from_int(torch.zeros(32, 16, dtype=torch.int32), z, torch.ones(2, 16),
                                         gptq_layout.default_g_idx(32, 16), 4)  # fmt: skip
    assert (t.qzeros & 0xFFFFFFFF == 0x77777777).all()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="bits"):
        packing.pack_rows(torch.zeros(32, 4, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        packing.pack_rows(torch.zeros(40, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_rows(torch.full((32, 4), 16), 4)
    with pytest.raises(ValueError, match=r"zero points must lie in \[1, 15\]"):
        gptq_layout.GPTQTensors.from_int(torch.zeros(32, 8, dtype=torch.int32), torch.zeros(1, 8),
                                         torch.ones(1, 8), torch.zeros(32, dtype=torch.int32), 4)  # fmt: skip
    with pytest.raises(ValueError, match="allowed group sizes for this layer: .*64"):
        gptq_layout.check_packable("model.layers.0.mlp.down_proj", 576, 64, 4, 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_layout_round_trip_and_dequantize(bits, act_order):
    gen = torch.Generator().manual_seed(bits)
    K, N, gs = 128, 64, 32
    q = torch.randint(0, 2**bits, (K, N), generator=gen)
    zeros = torch.randint(1, 2**bits, (K // gs, N), generator=gen)
    scales = torch.rand(K // gs, N, generator=gen).half()
    g_idx = gptq_layout.default_g_idx(K, gs)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    t = gptq_layout.GPTQTensors.from_int(q, zeros, scales, g_idx, bits)
    for name, shape in gptq_layout.expected_shapes(K, N, bits, gs).items():
        assert tuple(getattr(t, name).shape) == shape
    q2, z2 = t.unpack()
    assert torch.equal(q2, q.int()) and torch.equal(z2, zeros.int())
    expected = scales.float()[g_idx.long()] * (q.float() - zeros.float()[g_idx.long()])
    assert torch.equal(t.dequantize(), expected)


def test_v2_zeros_convert_to_v1():
    z = torch.randint(1, 16, (4, 32))
    v2 = packing.pack_cols(z, 4)
    v1 = gptq_layout.v2_to_v1_zeros(v2, 4)
    assert torch.equal(packing.unpack_cols(v1, 4) + 1, z.int())


def test_rtn_is_within_half_a_step():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    for sym in (True, False):
        q, z, s, g = gptq_layout.rtn_quantize(w, 4, 32, sym=sym)
        deq = (s.float()[g.long()] * (q.float() - z.float()[g.long()])).t()
        step = s.float()[g.long()].t()
        # sym: half a step (plus fp16 rounding of the scale). asym: GPTQ v1 cannot store a zero point of 0,
        # so a group whose minimum rounds to zero 0 is shifted by one level: within one step.
        bound = step * (0.5 + 8 / 2048) if sym else step  # fp16 scale: rel. error <= 2**-11, q up to 8
        assert ((deq - w).abs() <= bound + 1e-6).all()


def test_matmulnbits_packing_low_nibble_is_even_k():
    q = torch.arange(16).reshape(16, 1) % 16  # K=16, N=1
    packed = packing.pack_matmulnbits(q, 4, 16)
    assert packed.shape == (1, 1, 8)
    assert int(packed[0, 0, 0]) == (0 | (1 << 4)) and int(packed[0, 0, 7]) == (14 | (15 << 4))


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_of_an_all_zero_group_packs(sym):
    w = torch.zeros(8, 64)
    w[:, 32:] = torch.randn(8, 32)
    q, z, s, g = gptq_layout.rtn_quantize(w, 4, 32, sym=sym)
    t = gptq_layout.GPTQTensors.from_int(q, z, s, g, 4)
    deq = t.dequantize().t()
    assert torch.equal(deq[:, :32], torch.zeros(8, 32)) and bool((s > 0).all())
