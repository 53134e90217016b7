"""Stage configurations: validated dataclasses, one documented field per option.

The CLI builds one of these from its flags and hands it to a pipeline function; the same object is
recorded (``asdict``) in the pack's stage history.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any


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

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"--bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"--group-size must be positive or -1, got {self.group_size}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"--damp must be in [0, 1), got {self.damp}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"--method must be gptq or rtn, got {self.method!r}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --seqlen and --batch-size must be positive (seqlen >= 2)")
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
