"""GPTQ weight quantization as pure tensor math (Frantar et al., arXiv 2210.17323).

Everything here takes tensors and returns tensors: no hooks, no modules, no I/O. The driver
(``pipeline/compress.py``) streams a layer's inputs through :class:`HessianAccumulator`, calls
:func:`gptq_quantize` on the layer weight, and packs the result with :meth:`QuantParams.to_gptq_tensors`.

Shapes (``nn.Linear`` convention): ``weight [N, K]`` (out, in), layer inputs ``X [..., K]``,
Hessian ``H [K, K]``. The algorithm walks the K input columns of the weight in blocks; each column is
rounded to the grid of its group, and the rounding error is spread over the not-yet-quantized columns
through the upper Cholesky factor of ``H^-1`` (the OBS update), lazily: within a block column by column,
across blocks with one matmul (exact reordering of the same updates, see "Lazy batch updates" in the paper).

Quantization grid of a group (the same as the reference IST-DASLab/gptq ``Quantizer``):
``w ~ scale * (q - zero)``, ``q`` in ``[0, 2**bits - 1]``; sym: ``zero = 2**(bits-1)``,
``scale = 2 * max|w| / maxq``; asym: ``scale = (max(w,0) - min(w,0)) / maxq``, ``zero = round(-min/scale)``
clamped to ``>= 1`` because GPTQ v1 cannot store a zero point of 0 (see ``formats.gptq_layout``).
Scales are rounded to fp16 before use, so the packed checkpoint dequantizes to exactly the values whose
error GPTQ compensated.

With a :class:`ClipSearch` (compress's default) that min/max range is also tried shrunk, and each output column
of a group keeps the range whose rounding error, weighted per row by GPTQ's own cost ``1 / Hinv[k, k]^2``, is
smallest. The reference's ``mse`` option searches shrunk ranges too, scoring unweighted ``|error|^2.4``.
Below 8 bits it lowers held-out perplexity (``docs/BENCHMARKS.md``, Compress).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsepack.formats import gptq_layout
from sparsepack.formats.gptq_layout import GPTQTensors

# Damping schedule when the Cholesky factorization fails: the requested damp, then x10 each retry, up to this.
MAX_DAMP = 1.0


class GPTQNumericalError(RuntimeError):
    """The Hessian could not be inverted even at the largest allowed dampening."""


class HessianAccumulator:
    """Streamed ``H = 2/n * sum_i x_i x_i^T`` over the rows of a layer's inputs.

    Kept as a running mean (rescaled at each batch, as the reference GPTQ does), so ``H`` has the same value
    however the ``n`` rows are split into batches (up to float rounding) and stays O(1) in magnitude.
    Only the upper triangle is accumulated, in column strips (``H[a:b, a:] += x[:, a:b]^T x[:, a:]``): about
    5/8 of the full product's work at 4 strips, and less time (``docs/BENCHMARKS.md``, Compress); :attr:`H`
    mirrors it into the full symmetric matrix when read.

    Args:
        in_features: K, the layer's input dimension.
        dtype: accumulation dtype, ``torch.float32`` (GPTQ's choice) or ``torch.float64``.
        device: where ``H`` lives.
    """

    STRIP = 192  # narrowest column strip; at most 4 strips (smaller products lose BLAS efficiency)

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian accumulation dtype must be float32 or float64, got {dtype}")
        self._upper = torch.zeros(in_features, in_features, dtype=dtype, device=device)  # (K, K), upper triangle
        strips = max(1, min(4, in_features // self.STRIP))
        width = -(-in_features // strips)
        self._bounds = [(a, min(a + width, in_features)) for a in range(0, in_features, width)]
        self.n = 0  # rows (tokens) seen so far

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x [..., K]`` (every leading dim is flattened into rows)."""
        K = self._upper.shape[0]
        if x.shape[-1] != K:
            raise ValueError(f"inputs have last dim {x.shape[-1]}, Hessian expects {K}")
        x = x.detach().reshape(-1, K).to(device=self._upper.device, dtype=self._upper.dtype)  # (m, K)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        for a, b in self._bounds:  # H = n/total H + 2/total x^T x, strip by strip
            self._upper[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=self.n / total, alpha=2.0 / total)
        self.n = total

    @property
    def H(self) -> torch.Tensor:
        """The full symmetric ``H [K, K]`` (a new tensor)."""
        H = self._upper.triu()
        H += H.triu(1).t()  # the strict upper triangle mirrored (triu copies, so no aliasing)
        return H


@dataclass
class InverseHessian:
    """What GPTQ needs from ``H``: shared by every layer fed the same inputs (q/k/v, gate/up).

    ``hinv`` is the upper Cholesky factor of ``(H_perm + damp * mean(diag) * I)^-1`` in the permuted order.
    """

    hinv: torch.Tensor  # fp32/fp64 [K, K] upper triangular, rows/cols in `perm` order
    dead: torch.Tensor  # bool [K]: columns whose input is always zero (weight forced to 0)
    perm: torch.Tensor | None  # int64 [K]: processing position -> original column; None = identity
    damp: float  # fraction of mean(diag H) actually added (>= the requested one after retries)
    group_aware: int = 0  # group size of a group-aware order (0 = plain act-order or identity)


def column_order(diag: torch.Tensor, act_order: bool, group_aware: int = 0) -> torch.Tensor | None:
    """The order GPTQ walks the input columns in (position -> original column), None = original order.

    Args:
        diag: ``diag(H) [K]``.
        act_order: decreasing ``diag(H)`` over all columns (GPTQ's ``desc_act``).
        group_aware: a group size > 0: group-aware reordering (GAR, arXiv 2505.14638; GPTQModel's default
            ``act_group_aware``): sort within each group of ``group_aware`` original rows by decreasing
            ``diag(H)`` and the groups by their largest entry, so each group stays contiguous in the
            processing order and ``g_idx`` stays monotone (no input gather at inference).
    """
    if act_order and group_aware:
        raise ValueError("act_order and group_aware orders are exclusive")
    if act_order:
        return torch.argsort(diag, descending=True, stable=True)
    if not group_aware:
        return None
    K = diag.numel()
    if K % group_aware:
        raise ValueError(f"group-aware order needs group size {group_aware} to divide {K}")
    vals, local = torch.sort(diag.reshape(-1, group_aware), dim=1, descending=True, stable=True)  # (G, gs)
    order = torch.argsort(vals[:, 0], descending=True, stable=True)  # groups by their max
    base = torch.arange(0, K, group_aware, device=diag.device)[:, None]  # (G, 1)
    return (local + base)[order].reshape(-1)  # (K,)


def invert_hessian(
    H: torch.Tensor, damp: float = 0.01, act_order: bool = False, group_aware: int = 0
) -> InverseHessian:
    """Dead columns, column order (see :func:`column_order`), dampening and the Cholesky-based inverse.

    The factorizations run in float64 (cheap at K <= a few thousand and far more robust); the factor is
    returned in ``promote(H.dtype, float32)``, the dtype the quantization loop then runs in. If a
    factorization fails the dampening is multiplied by 10 up to :data:`MAX_DAMP`.

    Raises:
        GPTQNumericalError: non-finite H, or no dampening up to ``MAX_DAMP`` makes it positive definite.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise GPTQNumericalError("Hessian has non-finite entries (inf/NaN in the calibration activations?)")
    out_dtype = torch.promote_types(H.dtype, torch.float32)
    K = H.shape[0]
    diag = torch.diagonal(H).to(torch.float64)  # a copy
    dead = diag == 0
    diag[dead] = 1.0  # a dead column gets a unit curvature: its (zeroed) weight is quantized on its own
    perm = column_order(diag, act_order, group_aware)
    # GPTQ needs U upper with U^T U = Hd^-1. With J the reversal, J Hd J = Lf Lf^T gives Hd = R R^T, R = J Lf J
    # upper, so U = R^-1 = J Lf^-1 J: one Cholesky and one triangular inverse instead of the reference's
    # cholesky -> cholesky_inverse -> cholesky (same U; several times faster on CPU). F = J Hd J is built
    # once and damped in place, and the inverse overwrites its identity: at most three K x K fp64 matrices
    # live at once (with more, this inversion set a block's memory peak).
    order = torch.arange(K - 1, -1, -1, device=H.device) if perm is None else perm.flip(0)
    F = H[order[:, None], order].to(torch.float64)  # (K, K) J H_perm J: one gather, then fp64
    fdiag = torch.diagonal(F)
    fdiag.copy_(diag[order])  # dead columns get their unit curvature
    mean_diag = fdiag.mean()
    current, added = damp, 0.0
    while True:
        fdiag.add_((current - added) * mean_diag)
        added = current
        Lf, info = torch.linalg.cholesky_ex(F)
        if info == 0:
            U = torch.eye(K, dtype=F.dtype, device=F.device)
            torch.linalg.solve_triangular(Lf, U, upper=False, out=U)  # Lf^-1, in place
            del Lf
            if torch.isfinite(U).all():
                U = U.to(out_dtype).flip(0, 1)  # (K, K) upper, processing order
                return InverseHessian(U, dead, perm, current, group_aware if perm is not None else 0)
        if current >= MAX_DAMP:
            raise GPTQNumericalError(
                f"Cholesky factorization of the GPTQ Hessian failed even with dampening {current:g} "
                f"(MAX_DAMP) x mean diagonal; the calibration inputs of this layer are degenerate"
            )
        current = min(current * 10 if current > 0 else 1e-4, MAX_DAMP)


@dataclass
class QuantParams:
    """Quantized weight of one linear layer, unpacked (the integers before GPTQ-v1 bit packing).

    ``W[k, n] = scales[g, n] * (q[k, n] - zeros[g, n])`` with ``g = g_idx[k]``; ``W`` is input dim first,
    the ``nn.Linear`` weight is ``W.T``.
    """

    q: torch.Tensor  # int32 [K, N], values in [0, 2**bits - 1], original row order
    zeros: torch.Tensor  # int32 [G, N], true zero points in [1, 2**bits - 1]
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int32 [K], group of each input row (non-monotone under act-order)
    bits: int
    group_size: int  # -1 = one group per output column
    sym: bool
    act_order: bool = False  # columns were processed in a non-identity order (act-order or group-aware)
    loss: float = 0.0  # sum over columns of GPTQ's error term (w - q)^2 / (2 * Hinv[j, j]^2); 0 for RTN
    damp: float = 0.0  # dampening actually used (fraction of mean diag H)
    stats: dict = field(default_factory=dict)  # free-form extras (e.g. number of dead columns)

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    def split(self, sizes: list[int]) -> list[QuantParams]:
        """Cut along the output dim into layers of ``sizes`` output features (they must sum to N).

        GPTQ treats every output column on its own given the shared ``H``, so quantizing the concatenation of
        the layers that read one input (q/k/v, gate/up) and splitting gives each layer what quantizing it
        alone would: one column walk instead of one per layer. ``loss`` is split in proportion to the
        per-column losses when ``stats["column_loss"]`` holds them, else left at 0.
        """
        if sum(sizes) != self.out_features:
            raise ValueError(f"split sizes {sizes} do not sum to {self.out_features} output features")
        col_loss = self.stats.get("column_loss")
        parts, start = [], 0
        for n in sizes:
            cut = slice(start, start + n)
            stats = {k: v for k, v in self.stats.items() if k != "column_loss"}
            loss = float(col_loss[cut].sum()) / 2 if col_loss is not None else 0.0
            parts.append(QuantParams(self.q[:, cut].contiguous(), self.zeros[:, cut].contiguous(),
                                     self.scales[:, cut].contiguous(), self.g_idx.clone(), self.bits, self.group_size,
                                     self.sym, self.act_order, loss, self.damp, stats))  # fmt: skip
            start += n
        return parts

    def to_gptq_tensors(self, bias: torch.Tensor | None = None) -> GPTQTensors:
        """Pack into the GPTQ-v1 tensors (qweight, qzeros = zero-1, scales, g_idx, bias)."""
        return GPTQTensors.from_int(self.q, self.zeros, self.scales, self.g_idx, self.bits, bias=bias)


def dequantize_params(p: QuantParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``nn.Linear`` weight ``[N, K]`` of ``p`` (the same arithmetic as ``gptq_layout.dequantize``)."""
    g = p.g_idx.long()
    W = p.scales.to(dtype)[g] * (p.q.to(dtype) - p.zeros.to(dtype)[g])  # (K, N)
    return W.t().contiguous()


def layer_output_error(weight: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ``||X W^T - X W_q^T||_F / ||X W^T||_F`` on inputs ``x [..., K]``."""
    K = weight.shape[1]
    x = x.detach().reshape(-1, K).to(torch.float64)
    ref = x @ weight.detach().to(torch.float64).t()  # (m, N)
    diff = ref - x @ w_q.detach().to(torch.float64).t()
    return float(diff.norm() / ref.norm().clamp_min(1e-30))


@dataclass(frozen=True)
class ClipSearch:
    """A search over each group's clipping range (like the reference GPTQ's ``mse`` grid, but Hessian-weighted).

    Candidates are the full min/max range scaled by ``1, 1 - max_shrink/steps, ..., 1 - max_shrink``.
    """

    max_shrink: float = 0.2  # the narrowest candidate is (1 - max_shrink) x the group's min/max range
    steps: int = 20  # candidates besides the full range, evenly spaced

    def __post_init__(self) -> None:
        if not 0 < self.max_shrink < 1 or self.steps < 1:
            raise ValueError(f"clip search needs 0 < max_shrink < 1 and steps >= 1, got {self}")

    def candidates(self) -> list[float]:
        return [1 - self.max_shrink * i / self.steps for i in range(self.steps + 1)]


def _grid(w: torch.Tensor, maxq: int, sym: bool, clip: ClipSearch | None = None,
          row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each output column of one group ``w [c, N]``; the scale already rounded to fp16.

    Without ``clip`` the grid spans the group's min/max. With it, the range is also shrunk by each of
    ``clip.candidates()`` and each output column keeps the candidate whose rounding error
    ``sum_k row_weight[k] * (w[k] - Q(w[k]))^2`` is smallest (``row_weight [c]``: the GPTQ cost of an error in
    that row, ``1 / Hinv[k, k]^2``; uniform when None). Clipping the few largest weights buys a finer step for
    all others.

    Returns ``(scale [N], zero [N])`` in ``w.dtype`` (zero integral).
    """
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    wmin = torch.minimum(w.amin(dim=0), zero_t)
    wmax = torch.maximum(w.amax(dim=0), zero_t)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    flat = (wmin == 0) & (wmax == 0)  # an all-zero group: any grid works, take GPTQ's [-1, 1]
    wmin = torch.where(flat, -1.0, wmin)
    wmax = torch.where(flat, 1.0, wmax)
    if clip is None:
        return _grid_of_range(wmin, wmax, maxq, sym)
    # One candidate at a time on a (c, N) buffer that stays in cache, unlike all candidates at once.
    buf = torch.empty_like(w)  # (c, N)
    best = None
    for p in clip.candidates():
        scale, zero = _grid_of_range(p * wmin, p * wmax, maxq, sym)  # (N,)
        torch.div(w, scale, out=buf)
        buf.round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale).sub_(w).square_()  # rounding error^2
        if row_weight is not None:
            buf.mul_(row_weight[:, None])
        err = buf.sum(dim=0)  # (N,)
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]  # ties keep the wider range
        best = [torch.where(better, t, b) for t, b in zip((err, scale, zero), best, strict=True)]
    return best[1], best[2]


def _grid_of_range(wmin: torch.Tensor, wmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid covering ``[wmin, wmax]`` (any shape, ``wmin < 0 < wmax``): ``(scale, zero)``, scale fp16-exact."""
    # fp16 can hold down to 2**-24 (subnormal): clamp so the stored scale is never 0.
    scale = ((wmax - wmin) / maxq).clamp(2.0**-24, 65504.0).to(torch.float16).to(wmin.dtype)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-wmin / scale).clamp(1, maxq)  # >= 1: GPTQ v1 cannot store zero 0
    return scale, zero


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of one column ``w [N]`` (float dtype, integral values)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass(frozen=True)
class _GroupGrid:
    """How a group's grid is fitted: the code range, the grid kind and the optional clipping search."""

    maxq: int  # 2**bits - 1, the largest code
    sym: bool
    clip: ClipSearch | None = None
    # [K] GPTQ's cost of an error in each row, 1 / Hinv[k, k]^2, in the row order of the weight the grid is fitted
    # to: what a clip search weighs each row's rounding error by. None without a clip search.
    row_cost: torch.Tensor | None = None

    def fit(self, w: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale [N], zero [N])`` of the group ``w[rows]`` of ``w [K, N]`` (see :func:`_grid`)."""
        return _grid(w[rows], self.maxq, self.sym, self.clip, None if self.row_cost is None else self.row_cost[rows])


def _checked_group_size(bits: int, group_size: int, block_size: int, K: int) -> int:
    """The group size in input rows (``K`` for one group per output column), after checking the arguments."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits}")
    gs = K if group_size in (-1, 0) else group_size
    if gs <= 0 or K % gs:
        raise ValueError(f"group_size {group_size} does not divide in_features {K}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return gs


def _check_inverse(inv: InverseHessian, K: int, gs: int) -> None:
    """An :class:`InverseHessian` must match the weight's input dim and, if group-aware, its group size."""
    if inv.hinv.shape != (K, K):
        raise ValueError(f"Hessian is {tuple(inv.hinv.shape)}, weight needs ({K}, {K})")
    if inv.group_aware and inv.group_aware != gs:
        raise ValueError(f"InverseHessian was ordered for group size {inv.group_aware}, weight uses {gs}")


def _transposed_weight(weight: torch.Tensor, inv: InverseHessian) -> torch.Tensor:
    """``W^T [K, N]`` in the original row order, in ``inv``'s dtype and device, the dead input rows zeroed."""
    # Work on W^T: row j is input column j, contiguous, and the codes come out input-dim-first as stored.
    Wt = weight.detach().to(device=inv.hinv.device, dtype=inv.hinv.dtype).t()
    Wt = Wt.clone(memory_format=torch.contiguous_format)  # (K, N)
    Wt[inv.dead] = 0
    return Wt


def _initial_grids(Wt: torch.Tensor, grid: _GroupGrid, gs: int, perm: torch.Tensor | None,
                   static: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The groups' ``(scales, zeros)``, ``[G, N]`` each, before the column walk.

    With ``static`` every grid is fitted now, from ``Wt [K, N]`` in the original row order (``grid.row_cost`` is
    in processing order, ``perm``, and read here in the original one); without, they are left for
    :func:`_walk_columns` to fill.
    """
    K, N = Wt.shape
    scales = torch.empty(K // gs, N, dtype=Wt.dtype, device=Wt.device)  # (G, N), fp16-exact values
    zeros = torch.empty(K // gs, N, dtype=Wt.dtype, device=Wt.device)  # (G, N)
    if static:
        cost = grid.row_cost
        if cost is not None and perm is not None:
            cost = cost[torch.argsort(perm)]  # original order
        grid = _GroupGrid(grid.maxq, grid.sym, grid.clip, cost)
        for g in range(K // gs):
            scales[g], zeros[g] = grid.fit(Wt, slice(g * gs, (g + 1) * gs))
    return scales, zeros


def _walk_columns(Wt: torch.Tensor, Hinv: torch.Tensor, pos_group: list[int], scales: torch.Tensor,
                  zeros: torch.Tensor, grid: _GroupGrid, block_size: int,
                  dynamic_group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GPTQ's column walk: quantize the rows of ``Wt`` in order, spreading each rounding error over the later rows.

    Args:
        Wt: ``[K, N]`` the weight transposed, rows in processing order; updated in place.
        Hinv: ``[K, K]`` upper Cholesky factor of ``H^-1`` in the same order.
        pos_group: the group of each processing position (``K`` entries).
        scales: ``[G, N]`` grid scales; a dynamic group's are written here when the walk reaches it.
        zeros: ``[G, N]`` grid zeros, likewise.
        grid: how a dynamic group's grid is fitted (``row_cost`` in processing order).
        block_size: columns per lazy-update block.
        dynamic_group: the group size when each group's grid is fitted as the walk reaches its first position,
            from positions ``[j, j + dynamic_group)``; 0 when every grid was fitted up front.

    Returns:
        ``(codes [K, N], losses [N])``: integer codes (float dtype) in processing order, and per output column the
        sum of ``(w - w_q)^2 / Hinv[j, j]^2`` (twice GPTQ's loss).
    """
    K, N = Wt.shape
    codes = torch.empty(K, N, dtype=Wt.dtype, device=Wt.device)  # (K, N) integer codes, processing order
    losses = torch.zeros(N, dtype=Wt.dtype, device=Wt.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        # Rows i1..i2 of Wt are not touched during the block: row j receives this block's earlier errors
        # just before it is quantized, as one vector-matrix product (the same sum as GPTQ's per-column
        # rank-1 updates, but one BLAS call on a contiguous block instead of an ever-shrinking elementwise
        # update, which stalls on OpenMP fork/join when the cores are shared).
        Err = torch.zeros(i2 - i1, N, dtype=Wt.dtype, device=Wt.device)  # (B, N) scaled errors of the block
        for i in range(i2 - i1):
            j = i1 + i
            g = pos_group[j]
            if dynamic_group and j % dynamic_group == 0:
                # The group's grid comes from its columns as the earlier *blocks* left them, not yet updated
                # by this block's errors: the reference GPTQ's timing (IST-DASLab, AutoGPTQ, GPTQModel). Folding
                # this block's errors in too gave a higher mean layer output error on the calibration inputs
                # (docs/BENCHMARKS.md, Compress). So with dynamic groups
                # the block size changes which errors a grid sees (exactly as in the reference).
                scales[g], zeros[g] = grid.fit(Wt, slice(j, j + dynamic_group))
            w = Wt[j] - Hinv[i1:j, j] @ Err[:i] if i else Wt[j]  # (N,)
            q = _quantize_column(w, scales[g], zeros[g], grid.maxq)
            err = (w - scales[g] * (q - zeros[g])) / Hinv[j, j]  # (N,)
            codes[j] = q
            losses += err * err  # (w - w_q)^2 / d^2
            Err[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err, alpha=-1)  # lazy update of every later column
    return codes, losses


def _to_original_order(codes: torch.Tensor, pos_group: torch.Tensor,
                       perm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``codes [K, N]`` and the group of each position ``[K]`` back in the original row order: ``(q, g_idx)``."""
    if perm is None:
        return codes, pos_group
    g_idx = torch.empty_like(pos_group)  # (K,)
    g_idx[perm] = pos_group
    return codes[torch.argsort(perm)], g_idx


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor | InverseHessian,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    group_aware: bool = False,
    clip: ClipSearch | None = None,
) -> QuantParams:
    """Quantize one linear weight with GPTQ.

    Args:
        weight: ``[N, K]`` (``nn.Linear.weight``), any float dtype; not modified.
        H: the layer's Hessian ``[K, K]`` (see :class:`HessianAccumulator`), or an :class:`InverseHessian`
            from :func:`invert_hessian` to share one inversion across layers that see the same inputs
            (then ``act_order``, ``group_aware`` and ``damp`` are taken from it).
        bits: 2, 3, 4 or 8.
        group_size: input rows per scale/zero group; -1 = one group per output column. Must divide K.
        sym: symmetric grid (zero fixed at ``2**(bits-1)``) or asymmetric.
        act_order: quantize columns in order of decreasing ``diag(H)``; with non-static groups the groups
            follow that order and ``g_idx`` becomes non-monotone.
        damp: dampening as a fraction of ``mean(diag(H))``.
        block_size: columns per lazy-update block. With static grids (``static_groups``, ``group_size=-1``) a
            speed knob only (the same results up to float error); with dynamic groups it also sets which
            errors a group's grid sees, as in the reference GPTQ (default 128, the reference's).
        static_groups: compute every group's grid up front from the (dead-zeroed) original weight in the
            original row order, so ``g_idx`` stays monotone even with act-order.
        group_aware: group-aware reordering (GPTQModel's default ``act_group_aware``, exclusive with
            ``act_order``): most of act-order's gain with a monotone ``g_idx``; see :func:`column_order`.
        clip: search each group's clipping range (see :class:`ClipSearch`); None: the min/max grid.

    Returns:
        :class:`QuantParams` in the original row order.
    """
    N, K = weight.shape
    gs = _checked_group_size(bits, group_size, block_size, K)
    inv = H if isinstance(H, InverseHessian) else invert_hessian(H, damp, act_order, gs if group_aware else 0)
    _check_inverse(inv, K, gs)
    perm = inv.perm
    # Static groups: grids of the original row groups, computed up front. Otherwise a group's grid is
    # computed when the walk reaches its first column, from the columns at processing positions
    # [j*gs, (j+1)*gs): under act-order those are a new group (hence the non-monotone g_idx), under the
    # group-aware order they are exactly one original group, in another order.
    static = static_groups or group_size in (-1, 0)
    Wt = _transposed_weight(weight, inv)  # (K, N)
    # The GPTQ cost of an error in each processing position's row is 1 / Hinv[j, j]^2: clip searches weigh by it.
    row_cost = inv.hinv.diagonal().square().reciprocal() if clip is not None else None  # (K,)
    grid = _GroupGrid(2**bits - 1, sym, clip, row_cost)
    scales, zeros = _initial_grids(Wt, grid, gs, perm, static)  # (G, N) each
    if perm is not None:
        Wt = Wt[perm]  # (K, N) in processing order
    # group of each processing position
    keeps_groups = perm is not None and (static or inv.group_aware)
    pos_group = (perm if keeps_groups else torch.arange(K, device=Wt.device)) // gs  # (K,)
    pos_group_list = pos_group.tolist()  # read per column: a list avoids a device sync each time
    codes, losses = _walk_columns(Wt, inv.hinv, pos_group_list, scales, zeros, grid, block_size, 0 if static else gs)
    codes, g_idx = _to_original_order(codes, pos_group, perm)
    return QuantParams(
        q=codes.to(torch.int32),
        zeros=zeros.to(torch.int32),
        scales=scales.to(torch.float16),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=perm is not None,
        loss=float(losses.sum()) / 2,
        damp=inv.damp,
        stats={"dead_columns": int(inv.dead.sum()), "column_loss": losses},
    )


def rtn_quantize_params(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> QuantParams:
    """Round-to-nearest baseline on the same grid as GPTQ (no Hessian, no error compensation)."""
    q, zeros, scales, g_idx = gptq_layout.rtn_quantize(weight, bits, group_size, sym)
    return QuantParams(q=q, zeros=zeros, scales=scales, g_idx=g_idx, bits=bits, group_size=group_size, sym=sym)
