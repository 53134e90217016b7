"""Export parity: onnxruntime vs PyTorch on a few prompts, tolerances in one table, a typed error.

Every exported graph is run on the CPU execution provider against the PyTorch model it came from (the loaded
pack, with the same adapter active): logits of a left-padded batch (no-cache graph), or prefill logits and a few
greedy decode steps compared token for token with ``model.generate`` (KV-cache graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Max |ORT - PyTorch| allowed per output kind: atol + rtol * max|PyTorch|; PyTorch always runs in fp32.
# fp32 graphs: the MatMulNBits dequantization is exact, so the remaining difference is summation order (measured
# ~1e-6 here). fp16 graphs (--dtype fp16): every activation is rounded to 11 significant bits, so errors of a few
# 1e-3 relative accumulate over the layers; decode steps are teacher-forced with PyTorch's tokens (a near-tie
# may legitimately flip a greedy token in fp16, which would make every later step incomparable).
TOLERANCES: dict[str, dict[str, float]] = {
    "logits": {"atol": 1e-4, "rtol": 1e-4},
    "decode_logits": {"atol": 1e-4, "rtol": 1e-4},
    "logits_fp16": {"atol": 1e-2, "rtol": 2e-2},
    "decode_logits_fp16": {"atol": 1e-2, "rtol": 2e-2},
}


class ExportValidationError(ValueError):
    """onnxruntime disagrees with PyTorch beyond :data:`TOLERANCES`; names the worst output."""

    def __init__(self, output: str, max_abs_diff: float, allowed: float, detail: str = "") -> None:
        self.output, self.max_abs_diff, self.allowed = output, max_abs_diff, allowed
        msg = f"ONNX export does not match PyTorch: {output} max |diff| {max_abs_diff:.3g} > allowed {allowed:.3g}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


@dataclass
class Check:
    output: str  # e.g. "logits", "decode_logits[2]", "tokens"
    kind: str  # key of TOLERANCES (or "tokens": exact)
    max_abs_diff: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed


def compare(output: str, kind: str, ref: np.ndarray, got: np.ndarray) -> Check:
    """One output against its reference, with the tolerance of ``kind``."""
    if ref.shape != got.shape:
        raise ExportValidationError(output, float("inf"), 0.0, f"shape {got.shape} != {ref.shape}")
    tol = TOLERANCES[kind]
    allowed = tol["atol"] + tol["rtol"] * float(np.abs(ref).max(initial=0.0))
    return Check(output, kind, float(np.abs(ref.astype(np.float64) - got).max(initial=0.0)), allowed)


def raise_worst(checks: list[Check]) -> None:
    """Raise :class:`ExportValidationError` for the check furthest over its tolerance, if any fails."""
    bad = [c for c in checks if not c.ok]
    if bad:
        worst = max(bad, key=lambda c: c.max_abs_diff / max(c.allowed, 1e-30))
        raise ExportValidationError(worst.output, worst.max_abs_diff, worst.allowed)


def sample_prompts(vocab_size: int, batch: int = 2, length: int = 8, pad: int = 3, pad_id: int = 0, seed: int = 0):
    """Random token ids ``[batch, length]`` with the last row left-padded by ``pad``: (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and pad:
        ids[-1, :pad], mask[-1, :pad] = pad_id, 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` makes them from a left-padded mask ``[B, T]`` -> ``[B, T]``."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def validate_logits(session, model, vocab_size: int, pad_id: int, run_options=None, dtype: str = "fp32") -> list[Check]:
    """No-cache graph: logits at every unpadded position of a left-padded batch."""
    ids, mask = sample_prompts(vocab_size, pad_id=pad_id)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, run_options)[0]
    keep = mask.bool().numpy()
    return [compare("logits", _kind("logits", dtype), ref[keep], got[keep])]


def _kind(output: str, dtype: str) -> str:
    return output if dtype == "fp32" else f"{output}_{dtype}"


def validate_kv(session, model, layout: dict, vocab_size: int, pad_id: int, steps: int = 4,
                run_options=None, dtype: str = "fp32") -> list[Check]:  # fmt: skip
    """KV-cache graph: prefill + ``steps`` greedy steps vs ``model.generate`` (tokens exact, logits in tolerance).

    fp16 graphs are fed PyTorch's tokens (teacher forcing) and only their logits are compared.
    """
    from sparsepack.runtime.onnx_runtime import greedy_decode

    ids, mask = sample_prompts(vocab_size, pad_id=pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             min_new_tokens=steps, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=pad_id)  # fmt: skip
    ref_tokens = out.sequences[:, ids.shape[1] :].numpy()
    forced = None if dtype == "fp32" else ref_tokens
    tokens, logits = greedy_decode(session, layout, ids.numpy(), mask.numpy(), steps, eos_token_id=None,
                                   run_options=run_options, forced_tokens=forced)  # fmt: skip
    kind = _kind("decode_logits", dtype)
    checks = [compare(f"decode_logits[{i}]", kind, out.logits[i].float().numpy(), logits[i]) for i in range(steps)]
    if forced is None:
        checks.append(Check("tokens", "tokens", float(int((tokens != ref_tokens).sum())), 0.0))
    return checks
