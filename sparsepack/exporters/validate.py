"""Export parity: onnxruntime vs PyTorch on a few prompts, tolerances in one table, a typed error.

Every exported graph is run on the CPU execution provider against the PyTorch model it came from (the loaded
pack, with the same adapter active): logits of a left-padded batch (no-cache graph), or prefill logits and a few
greedy decode steps compared token for token with ``model.generate`` (KV-cache graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Max |ORT - PyTorch| allowed per output kind: atol + rtol * max|PyTorch|. fp32 compute on both sides; the
# MatMulNBits dequantization is exact, so the remaining difference is summation order (measured ~1e-6 here).
TOLERANCES: dict[str, dict[str, float]] = {
    "logits": {"atol": 1e-4, "rtol": 1e-4},
    "decode_logits": {"atol": 1e-4, "rtol": 1e-4},
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


def validate_logits(session, model, vocab_size: int, pad_id: int, run_options=None) -> list[Check]:
    """No-cache graph: logits at every unpadded position of a left-padded batch."""
    ids, mask = sample_prompts(vocab_size, pad_id=pad_id)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, run_options)[0]
    keep = mask.bool().numpy()
    return [compare("logits", "logits", ref[keep], got[keep])]


def validate_kv(session, model, layout: dict, vocab_size: int, pad_id: int, steps: int = 4,
                run_options=None) -> list[Check]:  # fmt: skip
    """KV-cache graph: prefill + ``steps`` greedy steps vs ``model.generate`` (tokens exact, logits in tolerance)."""
    from sparsepack.runtime.onnx_runtime import greedy_decode

    ids, mask = sample_prompts(vocab_size, pad_id=pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             min_new_tokens=steps, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=pad_id)  # fmt: skip
    ref_tokens = out.sequences[:, ids.shape[1] :].numpy()
    tokens, logits = greedy_decode(session, layout, ids.numpy(), mask.numpy(), steps, eos_token_id=None,
                                   run_options=run_options)  # fmt: skip
    checks = [compare(f"decode_logits[{i}]", "decode_logits", out.logits[i].float().numpy(), logits[i])
              for i in range(steps)]  # fmt: skip
    diff = int((tokens != ref_tokens).sum())
    checks.append(Check("tokens", "tokens", float(diff), 0.0))
    return checks
