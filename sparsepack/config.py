"""Stage configurations: validated dataclasses, one documented field per option.

The CLI builds one of these from its flags and hands it to a pipeline function; the same object is
recorded (``asdict``) in the pack's stage history.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

CLIP_SEARCH_DEFAULT = 0.2  # QuantConfig.clip_search below 8 bits
INIT_MODES = ("auto", "zero", "residual", "residual-lowrank", "residual-whitened")  # TrainConfig.init


MAX_LR = 1e3  # far above any useful rate; larger ones overflow the optimizer's fp32 update into a traceback


def check_finite(cfg: Any) -> None:
    """Refuse a NaN or infinite float field (a ``--lr nan`` would train into NaN and could end in a written
    all-NaN adapter); names the flag."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


@dataclass
class QuantConfig:
    """How ``compress`` quantizes the base model."""

    bits: int = 4  # 2, 3, 4 or 8 bits per weight
    group_size: int = 128  # input rows sharing one scale/zero; -1 = one group per output column
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal (GPTQ "desc_act")
    sym: bool = True  # symmetric grid (zero fixed at 2**(bits-1)) or asymmetric
    damp: float = 0.01  # Hessian dampening, fraction of its mean diagonal
    true_sequential: bool = True  # each sublayer group sees the outputs of already-quantized groups
    static_groups: bool = False  # with act-order: compute group grids up front (keeps g_idx monotone)
    group_aware: bool = False  # group-aware column order (GPTQModel's act_group_aware); exclusive with act_order
    # search each group's clipping range down to (1 - this) x its min/max; 0 = off; None: 0.2 below 8 bits, else 0
    clip_search: float | None = None
    method: str = "gptq"  # "gptq" (error-compensated) or "rtn" (round to nearest, no calibration)
    skip: str = r"(^|\.)lm_head$"  # regex of module names left unquantized
    nsamples: int = 128  # calibration windows
    seqlen: int = 256  # tokens per calibration window
    calib: str = "stdlib:pydoc@train"  # calibration data SOURCE
    seed: int = 0  # picks the calibration windows
    batch_size: int = 8  # calibration windows per forward pass
    block_size: int = 128  # GPTQ lazy-update block (speed only)
    hessian_dtype: str = "float32"  # Hessian accumulation: float32 or float64
    device: str = "cpu"  # where blocks are quantized: cpu or cuda
    dtype: str = "auto"  # of the calibration forwards (Hessians stay fp32+); auto: bf16 where the hardware has it

    def __post_init__(self) -> None:
        check_finite(self)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"--group-size must be positive or -1, got {self.group_size}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"--damp must be in [0, 1), got {self.damp}")
        if self.clip_search is None:
            # below 8 bits it lowers held-out perplexity; at 8 bits it raised it (255 levels leave little to gain
            # and the clipped outliers matter): docs/BENCHMARKS.md, Compress
            self.clip_search = CLIP_SEARCH_DEFAULT if self.bits < 8 else 0.0
        if not 0 <= self.clip_search < 1:
            raise ValueError(f"--clip-search must be in [0, 1), got {self.clip_search}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"--method must be gptq or rtn, got {self.method!r}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --seqlen and --batch-size must be positive (seqlen >= 2)")
        if self.group_aware and self.act_order:
            raise ValueError("--group-aware and --act-order are exclusive (two different column orders)")
        if self.hessian_dtype not in ("float32", "float64"):
            raise ValueError(f"hessian_dtype must be float32 or float64, got {self.hessian_dtype!r}")
        try:
            re.compile(self.skip)
        except re.error as e:
            raise ValueError(f"--skip is not a valid regular expression: {e}") from None

    def gptq_config(self) -> dict[str, Any]:
        """The ``quantization_config`` written into config.json (GPTQ v1, as AutoGPTQ/GPTQModel read it)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.act_order,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp,
            "static_groups": self.static_groups,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig:
    """How ``finetune`` trains a correction on the frozen base."""

    data: str = "stdlib:pydoc@train"  # training data SOURCE
    adapter: str = "default"  # name of the adapter written into the output pack
    method: str = "rosa"  # a registered method (methods/: rosa, lora, shira)
    rank: int | None = None  # low-rank dimension r; None: 16 for methods with a low-rank part, else 0
    density: float | None = None  # sparse entries per adapted weight, as a fraction of out * in; None: 0.006
    support: str | None = None  # sparse support rule (methods.masks); None: the method's default
    budget: int | None = None  # trainable parameters; each method derives its rank/density from it
    target: str = "all-linear"  # which linears to adapt: all-linear or a regex of module names
    alpha: float = 16.0  # low-rank scaling numerator: s = alpha / r
    dropout: float = 0.05  # dropout on the low-rank input
    steps: int | None = None  # optimizer steps of the main phase (None: --epochs)
    epochs: float = 1.0  # passes over the data when --steps is not given
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    seqlen: int = 256  # tokens per example
    lr: float = 2e-4  # learning rate of the sparse values
    lr_lowrank: float = 7e-4  # learning rate of A and B
    weight_decay: float = 0.0  # AdamW weight decay
    lr_warmup: float = 0.03  # fraction of the steps with a linear learning-rate warm-up (then cosine decay)
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    warmup_steps: int = 64  # RoSA: low-rank-only steps before the support is chosen
    mask_samples: int = 32  # RoSA: examples whose gradients score the support
    fisher_budget: float = 0.25  # support selection: extra memory per pass, as a fraction of the adapted weights
    schedule: str = "restart"  # after support selection: restart (fresh optimizer, schedule from 0) or continue
    eval_data: str | None = None  # held-out SOURCE for perplexity during training
    eval_every: int = 0  # optimizer steps between evaluations (0 = only at the end when eval_data is given)
    eval_windows: int = 16  # windows of eval_data used per evaluation
    save_every: int = 0  # optimizer steps between checkpoints (0 = none)
    seed: int = 0  # initialization, data order, dropout
    device: str = "cpu"  # cpu or cuda
    teacher: str | None = None  # the fp model the pack was compressed from: KL-to-teacher loss, residual init
    kl_weight: float = 1.0  # with a teacher: loss = LM loss + kl_weight * KL(teacher || student) per label token
    kl_data: str | None = None  # the KL term's data: "teacher" (samples drawn from the teacher), "batch" (the
    # training batches themselves) or a SOURCE; None (auto) = teacher: on the sample it gained on general text at
    # no cost on the training text (BENCHMARKS.md "Finetune"), where the training batches traded one for the other
    kl_samples: int | None = None  # --kl-data teacher: sequences of seqlen tokens sampled from the teacher; None
    # (auto): a quarter of the teacher sequences the run reads, within [128, 512] (pipeline.finetune.kl_sample_count)
    init: str = "auto"  # correction start: zero; residual (S and A/B from W_fp - W_q; needs a teacher);
    # residual-lowrank (A/B from an SVD of W_fp - W_q, S by the method's own rule); residual-whitened (as
    # residual-lowrank, fitted to the output error on the teacher's inputs over init_samples examples); auto
    # (residual-lowrank with a teacher, else zero: on the sample it beat the other starts, BENCHMARKS.md "Finetune")
    init_samples: int = 64  # --init residual-whitened: training examples whose teacher inputs weight the fit

    def __post_init__(self) -> None:
        from sparsepack.formats.adapter_layout import validate_adapter_name
        from sparsepack.methods import base as methods

        check_finite(self)
        validate_adapter_name(self.adapter)
        method = methods.get(self.method)  # an unknown --method fails here, naming the known ones
        self._check_sizes(method)
        for flag, lr in (("--lr", self.lr), ("--lr-lowrank", self.lr_lowrank)):
            if not 0 < lr <= MAX_LR:
                raise ValueError(f"{flag} must be in (0, {MAX_LR:g}], got {lr}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.seqlen < 2:
            raise ValueError("--epochs, --batch-size, --grad-accum must be positive and --seqlen >= 2")
        if self.schedule not in ("restart", "continue"):
            raise ValueError(f"--schedule must be restart or continue, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.mask_samples < 1 or self.init_samples < 1:
            raise ValueError("--warmup-steps must be >= 0, --mask-samples and --init-samples >= 1")
        if not 0 < self.fisher_budget <= 1:
            raise ValueError(f"fisher_budget must be in (0, 1], got {self.fisher_budget}")
        if self.init not in INIT_MODES:
            raise ValueError(f"--init must be one of {', '.join(INIT_MODES)}, got {self.init!r}")
        if self.init.startswith("residual") and not self.teacher:
            raise ValueError(f"--init {self.init} needs --teacher (the fp model the pack was compressed from)")
        if self.kl_weight < 0:
            raise ValueError(f"--kl-weight must be >= 0, got {self.kl_weight}")
        if self.kl_data not in (None, "batch") and (not self.teacher or self.kl_weight == 0):  # would go unused
            raise ValueError("--kl-data feeds the KL-to-teacher term: it needs --teacher and --kl-weight > 0")
        if self.kl_samples is not None and self.kl_samples < 1:
            raise ValueError(f"--kl-samples must be >= 1, got {self.kl_samples}")

    def _check_sizes(self, method) -> None:
        """Refuse flags the method has no use for, then fill in the sizes left unset."""
        m = f"--method {method.name}"
        if self.rank is not None and not method.lowrank:
            raise ValueError(f"--rank does not apply to {m} (it has no low-rank part); size it with --density or "
                             "--budget")  # fmt: skip
        if self.support is not None and not method.sparse:
            raise ValueError(f"--support does not apply to {m} (it has no sparse part)")
        if self.support is not None and self.support not in method.supports:
            raise ValueError(f"--support {self.support!r} is not one of {m}'s: {', '.join(method.supports)}")
        if self.budget is not None:
            if self.budget < 1:
                raise ValueError(f"--budget must be a positive number of parameters, got {self.budget}")
            if (self.density is not None and method.sparse) or (self.rank is not None and not method.sparse):
                raise ValueError(f"--budget sets {m}'s size: give it without "
                                 + ("--density" if method.sparse else "--rank"))  # fmt: skip
        if self.rank is None:
            self.rank = 16 if method.lowrank else 0
        if self.density is None:
            self.density = 0.006
        if self.rank < 0 or not 0 <= self.density < 1:
            raise ValueError(f"--rank must be >= 0 and --density in [0, 1), got {self.rank}, {self.density}")
        if method.lowrank and self.rank < 1:  # a rank-0 low-rank part would have nothing to train
            raise ValueError(f"--rank must be >= 1 for {m} (it trains a low-rank part), got {self.rank}")
        if method.sparse and self.budget is None and self.density == 0:
            raise ValueError(f"--density must be > 0 for {m} (it trains a sparse part)")

    @property
    def residual_init(self) -> bool:
        """Start the correction from the teacher's residual ``W_fp - W_q`` (``auto``: whenever a teacher is given)."""
        return self.init.startswith("residual") or (self.init == "auto" and bool(self.teacher))

    @property
    def residual_support(self) -> bool:
        """The residual initialization also fixes the sparse support (and skips warm-up and selection): only
        ``--init residual``; ``residual-lowrank`` and ``auto`` leave the support to the method's rule."""
        return self.init == "residual"

    @property
    def kl_source(self) -> str | None:
        """Where the KL term's batches come from: ``teacher``, a SOURCE, or None (the training batches, or no KL)."""
        if not self.teacher or self.kl_weight == 0 or self.kl_data == "batch":
            return None
        return self.kl_data or "teacher"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
