"""Kernels on the CPU fast path (numba + torch) against their plain-torch references."""

from __future__ import annotations

import pytest
import torch

from sparsepack.formats.gptq_layout import GPTQTensors, rtn_quantize
from sparsepack.kernels import (
    CSRSupport,
    DenseBase,
    FisherState,
    GPTQBase,
    LowRankPart,
    SparsePart,
    _backend,
    _cpu_dequant,
    _cpu_sparse,
    base_weight,
    dequant_matmul,
    dequant_matmul_reference,
    dequant_matmul_t,
    dequant_matmul_t_reference,
    fisher_accumulate,
    fisher_accumulate_reference,
    sddmm,
    sddmm_reference,
    sparse_lowrank_linear,
    sparse_lowrank_linear_multi,
    sparse_lowrank_linear_multi_reference,
    sparse_lowrank_linear_reference,
    spmm,
    spmm_reference,
    spmm_t,
    spmm_t_reference,
)
from sparsepack.kernels._backend import kernel_module
from sparsepack.kernels.fisher import round_stochastic

# Relative error ||fast - ref|| / ||ref|| allowed, by compute dtype. fp32/fp64: the paths differ only in
# summation order. bf16: one rounding of inputs/outputs to 8 mantissa bits (2^-8 ~ 4e-3) plus accumulation.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def single_thread_torch():
    """Tiny tensors: torch's OpenMP barriers cost a scheduler slice each on a busy 2-core box (400x slower
    gradchecks measured); the numba kernels follow torch's count, so they run their serial drivers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(fast: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Same shape and dtype, and relative error within ``REL_TOL[dtype]`` (exact zeros when ref is zero)."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype, (fast.shape, fast.dtype, ref.shape, ref.dtype)
    fast, ref = fast.detach().double(), ref.detach().double()
    err = ((fast - ref).norm() / ref.norm()).item() if ref.norm() > 0 else fast.norm().item()
    assert err <= REL_TOL[dtype], err


def gptq_tensors(K: int, N: int, bits: int, group: int, act_order: bool, seed: int = 0) -> GPTQTensors:
    gen = torch.Generator().manual_seed(seed)
    q, zeros, scales, g_idx = rtn_quantize(torch.randn(N, K, generator=gen), bits, group, sym=False)
    if act_order:  # GPTQ's desc_act: rows visited in a data-dependent order, groups no longer monotone
        perm = torch.randperm(K, generator=gen)
        q, g_idx = q[perm], g_idx[perm]
    return GPTQTensors.from_int(q, zeros, scales, g_idx, bits, bias=torch.randn(N, generator=gen))


def use_driver(driver: str, monkeypatch) -> None:
    """Make the numba kernels take their ``parallel`` driver (two threads, any size) or the ``serial`` one."""
    if driver == "parallel":
        monkeypatch.setattr(_cpu_sparse, "_PARALLEL_MIN_NS", 0)
        monkeypatch.setattr(_cpu_sparse, "_PARALLEL_MIN_NS_BY_KERNEL", {})
        torch.set_num_threads(2)  # the autouse fixture puts it back


def support(
    out_f: int, in_f: int, density: float, seed: int = 0, full_row: int | None = None, empty_rows: tuple[int, ...] = ()
) -> CSRSupport:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=gen) < density
    if full_row is not None:
        mask[full_row] = True
    for r in empty_rows:
        mask[r] = False
    sup = CSRSupport.from_mask(mask)
    sup.validate()
    return sup


# ---------------------------------------------------------------------------------------------------------
# dequant matmul
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("driver", ["serial", "parallel"])
def test_dequant_matmul_cpu_matches_reference(bits, act_order, driver, monkeypatch):
    use_driver(driver, monkeypatch)
    monkeypatch.setattr(_cpu_dequant, "_CHUNK_ELEMENTS", 64 * 96)  # several chunks of 64 rows
    t = gptq_tensors(192, 96, bits, 64, act_order)
    args = (t.qweight, t.qzeros, t.scales, t.g_idx, bits)
    for x in (torch.randn(3, 5, 192), torch.randn(3, 192)):  # chunked GEMM path, fused decode path
        assert_close(dequant_matmul(x, *args, backend="cpu"), dequant_matmul_reference(x, *args), torch.float32)
    dy = torch.randn(3, 5, 96)
    assert_close(dequant_matmul_t(dy, *args, backend="cpu"), dequant_matmul_t_reference(dy, *args), torch.float32)


def test_dequant_matmul_cpu_dtypes_and_layouts():
    t = gptq_tensors(128, 64, 4, 32, act_order=True)
    args = (t.qweight, t.qzeros, t.scales, t.g_idx, 4)
    x = torch.randn(128, 9).t()  # non-contiguous [9, 128], strides (1, 9)
    assert_close(dequant_matmul(x, *args), dequant_matmul_reference(x, *args), torch.float32)
    one = torch.randn(1, 128)  # a single token
    assert_close(dequant_matmul(one, *args), dequant_matmul_reference(one, *args), torch.float32)
    xb = torch.randn(4, 128, dtype=torch.bfloat16)
    assert_close(dequant_matmul(xb, *args), dequant_matmul_reference(xb, *args), torch.bfloat16)
    x64 = torch.randn(4, 128, dtype=torch.float64)
    assert_close(dequant_matmul(x64, *args), dequant_matmul_reference(x64, *args), torch.float64)
    empty = torch.randn(0, 128)
    assert dequant_matmul(empty, *args).shape == (0, 64)
    with pytest.raises(ValueError, match="features"):
        dequant_matmul(torch.randn(2, 64), *args)


def test_dequant_matmul_dispatchers_are_differentiable():
    t = gptq_tensors(64, 32, 3, 32, act_order=True)
    args = (t.qweight, t.qzeros, t.scales, t.g_idx, 3)
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: dequant_matmul(x, *args, backend="cpu"), (x,), fast_mode=True)
    dy = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda dy: dequant_matmul_t(dy, *args, backend="cpu"), (dy,), fast_mode=True)
    one = torch.randn(1, 64, dtype=torch.float64, requires_grad=True)  # the fused decode kernel
    assert torch.autograd.gradcheck(lambda x: dequant_matmul(x, *args, backend="cpu"), (one,), fast_mode=True)


def test_quantized_linear_goes_through_the_fast_path():
    from sparsepack.layers.quantized_linear import QuantizedLinear

    t = gptq_tensors(128, 64, 4, 64, act_order=False)
    layer = QuantizedLinear.from_tensors(t, 64)
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = layer(x)
    assert_close(y, x @ layer.dequantized_weight().t() + t.bias.float(), torch.float32)
    (gx,) = torch.autograd.grad(y.sum(), x)  # gradients pass through the frozen quantized layer
    assert_close(gx, torch.ones(2, 3, 64) @ layer.dequantized_weight(), torch.float32)


# ---------------------------------------------------------------------------------------------------------
# sparse ops
# ---------------------------------------------------------------------------------------------------------

SPARSE_CASES = {
    "random": dict(out_f=97, in_f=64, density=0.05),  # 97: a partial block of rows in every kernel
    "full_and_empty_rows": dict(out_f=64, in_f=128, density=0.02, full_row=5, empty_rows=(0, 1, 63)),
    "nnz0": dict(out_f=64, in_f=64, density=0.0),
    "dense": dict(out_f=32, in_f=48, density=1.0),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
@pytest.mark.parametrize("tokens", [1, 77])
@pytest.mark.parametrize("driver", ["serial", "parallel"])
def test_sparse_ops_cpu_match_reference(case, tokens, driver, monkeypatch):
    use_driver(driver, monkeypatch)
    sup = support(**SPARSE_CASES[case])
    out_f, in_f = sup.shape
    vals = torch.randn(sup.nnz)
    x, dy = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
    csr = (sup.row_ptr, sup.col_idx, sup.shape)
    assert_close(spmm(x, vals, *csr, backend="cpu"), spmm_reference(x, vals, *csr), torch.float32)
    assert_close(spmm_t(dy, vals, *csr, backend="cpu"), spmm_t_reference(dy, vals, *csr), torch.float32)
    got = sddmm(dy, x, sup.row_idx, sup.col_idx, backend="cpu")
    assert_close(got, sddmm_reference(dy, x, sup.row_idx, sup.col_idx), torch.float32)
    y = torch.randn(tokens, out_f)  # the inference path adds the product into the base's output in place
    want = y + spmm_reference(x, vals, *csr)
    csr_np = (sup.row_ptr.numpy(), sup.col_idx.numpy())
    kernel_module("_cpu_sparse").add_spmm_arrays_(x.numpy(), y.numpy(), vals.numpy(), *csr_np)
    assert_close(y, want, torch.float32)
    strided = torch.randn(out_f, 2 * tokens)[:, ::2].t()  # (tokens, out_f), strides (1, 2 * tokens)
    with pytest.raises(ValueError, match="C-contiguous"):  # the kernel writes 8-wide rows of y
        kernel_module("_cpu_sparse").add_spmm_arrays_(x.numpy(), strided.numpy(), vals.numpy(), *csr_np)


def test_sddmm_drivers_give_the_same_bits(monkeypatch):
    # per-block partial sums added in block order: a resumed run on another thread count computes the same grads
    sup = support(97, 64, 0.05, full_row=3)
    dy, x = torch.randn(200, 97), torch.randn(200, 64)  # 200 tokens: three full 64-token blocks and a ragged one
    serial = sddmm(dy, x, sup.row_idx, sup.col_idx, backend="cpu")
    use_driver("parallel", monkeypatch)
    assert torch.equal(sddmm(dy, x, sup.row_idx, sup.col_idx, backend="cpu"), serial)
    assert_close(serial, sddmm_reference(dy, x, sup.row_idx, sup.col_idx), torch.float32)


def test_sparse_dispatchers_are_differentiable():
    sup = support(24, 32, 0.1, full_row=2, empty_rows=(0,))
    csr = (sup.row_ptr, sup.col_idx, sup.shape)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, dy, vals = torch.randn(5, 32, **f64), torch.randn(5, 24, **f64), torch.randn(sup.nnz, **f64)
    check = lambda fn, *inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    assert check(lambda x, v: spmm(x, v, *csr, backend="cpu"), x, vals)
    assert check(lambda dy, v: spmm_t(dy, v, *csr, backend="cpu"), dy, vals)
    assert check(lambda dy, x: sddmm(dy, x, sup.row_idx, sup.col_idx, backend="cpu"), dy, x)


def test_sparse_references_equal_dense_products():
    sup = support(48, 40, 0.2, full_row=3, empty_rows=(7,))
    vals = torch.randn(sup.nnz, dtype=torch.float64)
    S = torch.zeros(sup.shape, dtype=torch.float64)
    S[sup.row_idx.long(), sup.col_idx.long()] = vals
    x, dy = torch.randn(9, 40, dtype=torch.float64), torch.randn(9, 48, dtype=torch.float64)
    csr = (sup.row_ptr, sup.col_idx, sup.shape)
    assert_close(spmm_reference(x, vals, *csr), x @ S.t(), torch.float64)
    assert_close(spmm_t_reference(dy, vals, *csr), dy @ S, torch.float64)
    dense_grad = (dy.t() @ x)[sup.row_idx.long(), sup.col_idx.long()]
    assert_close(sddmm_reference(dy, x, sup.row_idx, sup.col_idx), dense_grad, torch.float64)


def test_sparse_ops_cpu_layouts_and_dtypes():
    sup = support(64, 96, 0.05)
    vals = torch.randn(sup.nnz)
    csr = (sup.row_ptr, sup.col_idx, sup.shape)
    x = torch.randn(96, 2, 11).permute(1, 2, 0)  # non-contiguous [2, 11, 96]
    dy = torch.randn(64, 22).t().reshape(2, 11, 64)
    assert_close(spmm(x, vals, *csr), spmm_reference(x, vals, *csr), torch.float32)
    assert_close(spmm_t(dy, vals, *csr), spmm_t_reference(dy, vals, *csr), torch.float32)
    assert_close(
        sddmm(dy, x, sup.row_idx, sup.col_idx), sddmm_reference(dy, x, sup.row_idx, sup.col_idx), torch.float32
    )
    xb, dyb = x.bfloat16(), dy.bfloat16()
    for fast, ref in (
        (spmm(xb, vals, *csr), spmm_reference(xb.float(), vals, *csr).bfloat16()),
        (spmm_t(dyb, vals, *csr), spmm_t_reference(dyb.float(), vals, *csr).bfloat16()),
        (
            sddmm(dyb, xb, sup.row_idx, sup.col_idx),
            sddmm_reference(dyb.float(), xb.float(), sup.row_idx, sup.col_idx).bfloat16(),
        ),
    ):
        assert_close(fast, ref, torch.bfloat16)


def test_csr_support_checks():
    sup = CSRSupport.from_coo(torch.tensor([2, 0, 2]), torch.tensor([1, 3, 0]), (3, 4))
    assert sup.row_ptr.tolist() == [0, 1, 1, 3] and sup.col_idx.tolist() == [3, 0, 1]
    sup.validate()
    st, perm = sup.transpose  # S^T's support and the order of its entries in S
    st.validate()
    vals = torch.arange(1.0, 4.0)
    S = torch.zeros(3, 4).index_put((sup.row_idx.long(), sup.col_idx.long()), vals)
    ST = torch.zeros(4, 3).index_put((st.row_idx.long(), st.col_idx.long()), vals[perm])
    assert torch.equal(ST, S.t())
    bad = CSRSupport(sup.row_ptr, torch.tensor([3, 0, 9], dtype=torch.int32), sup.row_idx, sup.shape)
    with pytest.raises(ValueError, match="out of range"):
        bad.validate()
    with pytest.raises(ValueError, match="row_ptr"):
        spmm(torch.randn(2, 4), torch.randn(3), sup.row_ptr[:-1], sup.col_idx, sup.shape)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve(cpu) == "cpu"
    assert _backend.resolve(torch.device("meta")) == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.resolve(cpu) == "reference"
    assert _backend.resolve(cpu, "cpu") == "cpu"  # an explicit argument beats the environment
    with pytest.raises(ValueError, match="unknown kernel backend"):
        _backend.resolve(cpu, "cuda")
    with pytest.raises(ValueError, match="CPU tensors"):
        _backend.resolve(torch.device("meta"), "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backend.resolve(cpu, "triton")


# ---------------------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------------------


def _layer(base_kind: str, dtype=torch.float64, out_f=48, in_f=64, r=4, density=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if base_kind == "dense":
        base = DenseBase(
            torch.randn(out_f, in_f, generator=gen, dtype=dtype), torch.randn(out_f, generator=gen, dtype=dtype)
        )
    else:
        t = gptq_tensors(in_f, out_f, 4, 32, act_order=True, seed=seed)
        base = GPTQBase(t.qweight, t.qzeros, t.scales, t.g_idx, 4, t.bias)
    A = torch.randn(r, in_f, generator=gen, dtype=dtype).requires_grad_()
    B = torch.randn(out_f, r, generator=gen, dtype=dtype).requires_grad_()
    sup = support(out_f, in_f, density, seed=seed, full_row=1, empty_rows=(0,))
    vals = torch.randn(sup.nnz, generator=gen, dtype=dtype).requires_grad_()
    return base, A, B, vals, sup


GRADCHECK_SHAPE = dict(out_f=24, in_f=32, r=3, density=0.1)  # small: gradcheck perturbs every input entry


@pytest.mark.parametrize("base_kind", ["dense", "gptq"])
def test_reference_autograd_gradcheck(base_kind):
    base, A, B, vals, sup = _layer(base_kind, **GRADCHECK_SHAPE)
    x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)

    def f(x, A, B, vals):
        return sparse_lowrank_linear_reference(x, base, A, B, 0.5, vals, sup.row_ptr, sup.col_idx, sup.row_idx)

    assert torch.autograd.gradcheck(f, (x, A, B, vals))


def force_fold(monkeypatch, fold: bool) -> None:
    """Route every sparse part through the base's weight (fold) or through spmm/spmm_t (no fold)."""
    monkeypatch.setattr(base_weight, "_FOLD_MIN_WORK", 0.0 if fold else float("inf"))
    monkeypatch.setattr(base_weight, "_FOLD_ALWAYS_ELEMENTS", -1)
    monkeypatch.setattr(GPTQBase, "can_fold", lambda self, *a: fold)


@pytest.mark.parametrize("base_kind", ["dense", "gptq"])
@pytest.mark.parametrize("fold", [False, True])
def test_fast_autograd_gradcheck(base_kind, fold, monkeypatch):
    # float64 runs the same numba kernels and custom backward as fp32
    force_fold(monkeypatch, fold)
    base, A, B, vals, sup = _layer(base_kind, **GRADCHECK_SHAPE)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)

    def f(x, A, B, vals):
        return sparse_lowrank_linear(x, base, A, B, 0.5, vals, sup.row_ptr, sup.col_idx, backend="cpu")

    assert torch.autograd.gradcheck(f, (x, A, B, vals), fast_mode=True)


def _grads(fn, x, params, gy):
    y = fn()
    return (y, *torch.autograd.grad(y, [x, *params], gy))


@pytest.mark.parametrize("base_kind", ["dense", "gptq"])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("tokens", [1, 200])
def test_fast_autograd_matches_reference_and_dense_equivalent(base_kind, fold, tokens, monkeypatch):
    force_fold(monkeypatch, fold)
    base, A, B, vals, sup = _layer(base_kind, dtype=torch.float32, out_f=64, in_f=96, r=8, density=0.03)
    if base_kind == "dense":
        base = DenseBase(base.weight.float(), base.bias.float())
    x = torch.randn(96, tokens).t().requires_grad_()  # non-contiguous [tokens, 96]
    csr = (sup.row_ptr, sup.col_idx, sup.row_idx)
    gy = torch.randn(tokens, 64)
    fast = _grads(lambda: sparse_lowrank_linear(x, base, A, B, 2.0, vals, *csr), x, (A, B, vals), gy)
    ref = _grads(lambda: sparse_lowrank_linear_reference(x, base, A, B, 2.0, vals, *csr), x, (A, B, vals), gy)

    def densified():  # S scattered into a dense matrix, autograd through plain matmuls only
        S = torch.zeros(sup.shape).index_put((sup.row_idx.long(), sup.col_idx.long()), vals)
        W = base.dense(torch.float32) + S
        return x @ W.t() + base.bias.float() + 2.0 * (x @ A.t()) @ B.t()

    dense = _grads(densified, x, (A, B, vals), gy)
    for f, r, d in zip(fast, ref, dense, strict=True):
        assert_close(f, r, torch.float32)
        assert_close(f, d, torch.float32)


def test_autograd_without_adapter_parts_and_without_input_grad():
    base, A, B, vals, sup = _layer("gptq", dtype=torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    y = sparse_lowrank_linear(x, base)
    assert_close(y, x @ base.dense(torch.float32).t() + base.bias.float(), torch.float32)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert_close(gx, torch.ones(4, 48) @ base.dense(torch.float32), torch.float32)
    x0 = torch.randn(4, 64)  # first layer: no dx, only adapter grads
    y = sparse_lowrank_linear(
        x0, base, A.float().detach().requires_grad_(), B.float(), 1.0, vals.float(), sup.row_ptr, sup.col_idx
    )
    y.sum().backward()
    with torch.no_grad():
        assert sparse_lowrank_linear(
            x0, base, A.float(), B.float(), 1.0, vals.float(), sup.row_ptr, sup.col_idx
        ).shape == (4, 48)


@pytest.mark.parametrize("base_kind", ["dense", "gptq"])
@pytest.mark.parametrize("fold", [False, True])
def test_multi_adapter_equals_sum_of_parts(base_kind, fold, monkeypatch):
    # two supports folded at once: the dense base's flat offsets and the GPTQ base's by-input grouping concatenate
    force_fold(monkeypatch, fold)
    base, A, B, vals, sup = _layer(base_kind, dtype=torch.float32)
    _, A2, B2, vals2, sup2 = _layer(base_kind, dtype=torch.float32, r=2, density=0.05, seed=1)
    lowrank = [LowRankPart(A, B, 0.5), LowRankPart(A2, B2, 2.0)]
    sparse = [SparsePart(vals, sup), SparsePart(vals2, sup2)]
    x = torch.randn(30, 64, requires_grad=True)
    params = (A, B, A2, B2, vals, vals2)
    gy = torch.randn(30, 48)
    fast = _grads(lambda: sparse_lowrank_linear_multi(x, base, lowrank, sparse), x, params, gy)
    ref = _grads(lambda: sparse_lowrank_linear_multi_reference(x, base, lowrank, sparse), x, params, gy)
    for f, r in zip(fast, ref, strict=True):
        assert_close(f, r, torch.float32)


def test_dense_fold_in_place_restores_the_base_exactly(monkeypatch):
    # the dense base folds S into W itself for the GEMM and writes the saved entries back; two adapters on the
    # same support give duplicate indices, which add up on the way in and restore to the one original on the way out
    force_fold(monkeypatch, True)
    base, A, B, vals, sup = _layer("dense", dtype=torch.float32)
    # W a view of one buffer with another parameter (a loader's layout) that autograd saves for backward
    buffer = torch.cat([base.weight.flatten(), torch.randn(64)])
    base, norm = DenseBase(buffer[: 48 * 64].view(48, 64), base.bias), buffer[48 * 64 :].requires_grad_()
    vals2 = torch.randn(sup.nnz).requires_grad_()
    w0 = base.weight.clone()
    lowrank = [LowRankPart(A.float().detach().requires_grad_(), B.float().detach().requires_grad_(), 0.5)]
    sparse = [SparsePart(vals, sup), SparsePart(vals2, sup)]
    x = torch.randn(30, 64, requires_grad=True)
    params = (*[p for part in lowrank for p in (part.A, part.B)], vals, vals2)
    gy = torch.randn(30, 48)
    fast = _grads(lambda: sparse_lowrank_linear_multi(x * norm, base, lowrank, sparse), x, params, gy)
    assert torch.equal(base.weight, w0)
    ref = _grads(lambda: sparse_lowrank_linear_multi_reference(x * norm, base, lowrank, sparse), x, params, gy)
    for f, r in zip(fast, ref, strict=True):
        assert_close(f, r, torch.float32)

    fold = base_weight.SparseFold((sup,), (vals,))
    dense_s = torch.zeros(48, 64).index_put((sup.row_idx.long(), sup.col_idx.long()), vals.detach())
    with pytest.raises(RuntimeError, match="inside the fold"), base._effective(torch.float32, fold) as w:
        assert w.data_ptr() == base.weight.data_ptr() and w.shape == (48, 64)  # in place, no copy
        assert torch.equal(w, w0 + dense_s)
        raise RuntimeError("inside the fold")
    assert torch.equal(base.weight, w0)  # restored on the way out of an error too
    with base._effective(torch.float64, fold) as w:  # another dtype: a transient copy, the base untouched
        assert w.dtype == torch.float64 and torch.equal(base.weight, w0)


def test_autograd_bf16_activations():
    base, A, B, vals, sup = _layer("dense", dtype=torch.float32)
    base = DenseBase(base.weight.bfloat16(), base.bias.bfloat16())
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    args = (
        base,
        A.float().detach().requires_grad_(),
        B.float().detach().requires_grad_(),
        0.5,
        vals.float().detach().requires_grad_(),
        sup.row_ptr,
        sup.col_idx,
    )
    y = sparse_lowrank_linear(x, *args)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and args[1].grad.dtype == torch.float32
    assert_close(y, sparse_lowrank_linear_reference(x.detach(), *args).detach(), torch.bfloat16)


def test_autograd_rejects_mismatched_parts():
    base, A, B, vals, sup = _layer("dense", dtype=torch.float32)
    with pytest.raises(ValueError, match="low-rank"):
        sparse_lowrank_linear(torch.randn(2, 64), base, A, B.t())
    with pytest.raises(ValueError, match="both A and B"):
        sparse_lowrank_linear(torch.randn(2, 64), base, A)


# ---------------------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------------------


def _micro_batches(n=3, tokens=40, out_f=48, in_f=72, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, tokens // 2, out_f, generator=gen), torch.randn(2, tokens // 2, in_f, generator=gen))
        for _ in range(n)
    ]


def test_fisher_cpu_matches_reference_and_definition(monkeypatch):
    monkeypatch.setattr("sparsepack.kernels.fisher._CHUNK_ELEMENTS", 10 * 72)  # several row chunks
    batches = _micro_batches()
    fast, ref = FisherState.zeros(48, 72), FisherState.zeros(48, 72)
    for dy, x in batches:
        fisher_accumulate(fast, dy, x, backend="cpu")
        fisher_accumulate_reference(ref, dy, x)
    exact = torch.stack(
        [(dy.reshape(-1, 48).t().double() @ x.reshape(-1, 72).double()) ** 2 for dy, x in batches]
    ).mean(0)
    assert fast.count == ref.count == 3
    assert_close(fast.mean, ref.mean, torch.float32)
    assert_close(fast.mean.double(), exact, torch.float32)


def test_fisher_bf16_accumulation():
    batches = _micro_batches(n=8)
    exact = torch.stack(
        [(dy.reshape(-1, 48).t().double() @ x.reshape(-1, 72).double()) ** 2 for dy, x in batches]
    ).mean(0)
    nearest = FisherState.zeros(48, 72, torch.bfloat16, stochastic_rounding=False)
    stochastic = FisherState.zeros(48, 72, torch.bfloat16)
    stochastic.generator = torch.Generator().manual_seed(0)
    for dy, x in batches:
        fisher_accumulate(nearest, dy, x)
        fisher_accumulate(stochastic, dy, x)
    for state in (nearest, stochastic):
        assert state.mean.dtype == torch.bfloat16
        assert_close(state.mean.double(), exact, torch.bfloat16)
    # stochastic rounding is unbiased: the mean relative error over all entries is far below one ulp
    assert abs(((stochastic.mean.double() - exact) / exact).mean().item()) < 2e-3


def test_round_stochastic_is_unbiased_and_exact_on_representable():
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way between two bf16 neighbours
    r = round_stochastic(x, torch.bfloat16, torch.Generator().manual_seed(0)).double()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - (1.0 + 2**-9)) < 2e-5
    exact = torch.tensor([1.0, 0.5, 3.0])
    assert torch.equal(round_stochastic(exact, torch.bfloat16).float(), exact)


def test_fisher_rejects_bad_input():
    with pytest.raises(ValueError, match="accumulates"):
        FisherState.zeros(4, 4, torch.float16)
    with pytest.raises(ValueError, match="fit"):
        fisher_accumulate(FisherState.zeros(4, 5), torch.randn(3, 4), torch.randn(3, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (16, 24), (77, 97), (5, 130), (130, 5)])
def test_simd_transposes_are_exact(dtype, shape):
    tr = kernel_module("_cpu_transpose")
    x = torch.randn(*shape, dtype=dtype)
    xT = torch.empty(shape[1], shape[0], dtype=dtype)
    tr.transpose_rows_into(x.numpy(), 0, shape[0], xT.numpy())
    assert torch.equal(xT, x.t())
    T, R = shape  # write_back: y[t0 + t, r0 + r] (+)= acc[r, t] for the first R rows and T tokens of acc
    acc = torch.randn(R + 3, T + 5, dtype=dtype)
    y = torch.randn(T + 4, R + 9, dtype=dtype)
    want_set, want_add = y.clone(), y.clone()
    want_set[2 : 2 + T, 5 : 5 + R] = acc[:R, :T].t()
    want_add[2 : 2 + T, 5 : 5 + R] += acc[:R, :T].t()
    got_set, got_add = y.clone(), y.clone()
    tr.write_back(acc.numpy(), R, T, got_set.numpy(), 5, 2, False)
    tr.write_back(acc.numpy(), R, T, got_add.numpy(), 5, 2, True)
    assert torch.equal(got_set, want_set) and torch.equal(got_add, want_add)
