"""Triton kernels against the plain-torch references, in the Triton CPU interpreter at small shapes.

The interpreter runs each program in numpy (10^3-10^5 times slower than a GPU), so shapes stay at 64-192 and the
grid small. It must be switched on before triton is imported anywhere: our kernel modules import triton lazily,
so setting the variable at collection time is enough.
"""

from __future__ import annotations

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sparsepack.kernels import (  # noqa: E402
    FisherState,
    GPTQBase,
    dequant_matmul,
    dequant_matmul_reference,
    dequant_matmul_t,
    dequant_matmul_t_reference,
    fisher_accumulate,
    fisher_accumulate_reference,
    sddmm,
    sddmm_reference,
    sparse_lowrank_linear,
    sparse_lowrank_linear_reference,
    spmm,
    spmm_reference,
    spmm_t,
    spmm_t_reference,
)
from tests.test_kernels import assert_close, gptq_tensors, single_thread_torch, support  # noqa: E402,F401

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module", autouse=True)
def _restore_interpret_flag():
    """Our kernels were decorated in interpreter mode at import; give later test modules the original flag."""
    yield
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.mark.parametrize(("bits", "act_order"), [(2, False), (3, True), (4, True), (4, False), (8, False)])
def test_triton_dequant_matmul(bits, act_order):
    t = gptq_tensors(128, 96, bits, 32, act_order)
    args = (t.qweight, t.qzeros, t.scales, t.g_idx, bits)
    x = torch.randn(3, 7, 128)
    assert_close(dequant_matmul(x, *args, backend="triton"), dequant_matmul_reference(x, *args), torch.float32)
    dy = torch.randn(96, 21).t().reshape(3, 7, 96)  # non-contiguous source
    got = dequant_matmul_t(dy, *args, backend="triton")
    assert_close(got, dequant_matmul_t_reference(dy, *args), torch.float32)


def test_triton_dequant_matmul_bf16_and_single_token():
    t = gptq_tensors(64, 64, 4, 32, act_order=False)
    args = (t.qweight, t.qzeros, t.scales, t.g_idx, 4)
    xb = torch.randn(5, 64, dtype=torch.bfloat16)
    assert_close(dequant_matmul(xb, *args, backend="triton"), dequant_matmul_reference(xb, *args), torch.bfloat16)
    one = torch.randn(1, 64)
    assert_close(dequant_matmul(one, *args, backend="triton"), dequant_matmul_reference(one, *args), torch.float32)


@pytest.mark.parametrize(
    "case",
    [dict(out_f=64, in_f=96, density=0.05, full_row=3, empty_rows=(0, 1)), dict(out_f=64, in_f=64, density=0.0)],
    ids=["rows_full_and_empty", "nnz0"],
)
def test_triton_sparse_ops(case):
    sup = support(**case)
    out_f, in_f = sup.shape
    vals = torch.randn(sup.nnz)
    csr = (sup.row_ptr, sup.col_idx, sup.shape)
    x = torch.randn(in_f, 70).t()  # non-contiguous [70, in]
    dy = torch.randn(70, out_f)
    assert_close(spmm(x, vals, *csr, backend="triton"), spmm_reference(x, vals, *csr), torch.float32)
    assert_close(spmm_t(dy, vals, *csr, backend="triton"), spmm_t_reference(dy, vals, *csr), torch.float32)
    got = sddmm(dy, x, sup.row_idx, sup.col_idx, backend="triton")
    assert_close(got, sddmm_reference(dy, x, sup.row_idx, sup.col_idx), torch.float32)
    one_x, one_dy = x[:1], dy[:1]  # a single token
    assert_close(spmm(one_x, vals, *csr, backend="triton"), spmm_reference(one_x, vals, *csr), torch.float32)
    got = sddmm(one_dy, one_x, sup.row_idx, sup.col_idx, backend="triton")
    assert_close(got, sddmm_reference(one_dy, one_x, sup.row_idx, sup.col_idx), torch.float32)


def test_triton_sparse_ops_bf16():
    sup = support(64, 64, 0.1)
    vals = torch.randn(sup.nnz)
    csr = (sup.row_ptr, sup.col_idx, sup.shape)
    x, dy = torch.randn(33, 64, dtype=torch.bfloat16), torch.randn(33, 64, dtype=torch.bfloat16)
    assert_close(
        spmm(x, vals, *csr, backend="triton"), spmm_reference(x.float(), vals, *csr).bfloat16(), torch.bfloat16
    )
    got = sddmm(dy, x, sup.row_idx, sup.col_idx, backend="triton")
    assert_close(got, sddmm_reference(dy.float(), x.float(), sup.row_idx, sup.col_idx).bfloat16(), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fisher(dtype):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 64, generator=gen), torch.randn(40, 96, generator=gen)) for _ in range(3)]
    fast = FisherState.zeros(64, 96, dtype, stochastic_rounding=False)
    ref = FisherState.zeros(64, 96, dtype, stochastic_rounding=False)
    for dy, x in batches:
        fisher_accumulate(fast, dy, x, backend="triton")
        fisher_accumulate_reference(ref, dy, x)
    # fp32: summation order only. bf16: the interpreter truncates where torch rounds: within two ulps.
    assert_close(fast.mean, ref.mean, dtype)
    if dtype == torch.bfloat16:
        stochastic = FisherState.zeros(64, 96, dtype)
        for dy, x in batches:
            fisher_accumulate(stochastic, dy, x, backend="triton")
        assert_close(stochastic.mean.float(), ref.mean.float(), dtype)


def test_triton_autograd_layer():
    t = gptq_tensors(64, 64, 4, 32, act_order=True)
    base = GPTQBase(t.qweight, t.qzeros, t.scales, t.g_idx, 4, t.bias)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 64, generator=gen).requires_grad_()
    B = torch.randn(64, 4, generator=gen).requires_grad_()
    sup = support(64, 64, 0.05, full_row=2)
    vals = torch.randn(sup.nnz, generator=gen).requires_grad_()
    x = torch.randn(9, 64, generator=gen, requires_grad=True)
    gy = torch.randn(9, 64, generator=gen)
    csr = (sup.row_ptr, sup.col_idx, sup.row_idx)
    results = []
    for fn, kw in ((sparse_lowrank_linear, dict(backend="triton")), (sparse_lowrank_linear_reference, {})):
        y = fn(x, base, A, B, 0.5, vals, *csr, **kw)
        results.append((y, *torch.autograd.grad(y, (x, A, B, vals), gy)))
    for fast, ref in zip(*results, strict=True):
        assert_close(fast, ref, torch.float32)
