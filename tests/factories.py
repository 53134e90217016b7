"""Tiny models and packs built from a config (no download), shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from sparsepack.formats.adapter_layout import Adapter, AdapterModule, write_adapter
from sparsepack.formats.gptq_layout import GPTQTensors, rtn_quantize
from sparsepack.formats.manifest import Manifest, StageRecord
from sparsepack.formats.pack import write_pack
from sparsepack.kernels import CSRSupport
from tests.helpers_tokenizer import tiny_tokenizer


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True, max_position_embeddings=256,
              eos_token_id=0, pad_token_id=1, bos_token_id=None)  # fmt: skip
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def save_hf(model: LlamaForCausalLM, path: Path) -> Path:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def rtn_pack(
    model: LlamaForCausalLM, path: Path, bits: int = 4, group_size: int = 32, act_order: bool = False,
    manifest: bool = True, checkpoint_format: str = "gptq", adapters: dict[str, Adapter] | None = None,
    overwrite: bool = False,
) -> tuple[Path, LlamaForCausalLM]:  # fmt: skip
    """RTN-quantize every decoder linear into a GPTQ-v1 pack.

    Returns the pack path and a dense reference model holding exactly the dequantized weights (and the fp16
    rounding of every unquantized tensor), so that its logits must equal the loaded pack's.
    """
    ref = LlamaForCausalLM(model.config).eval()
    ref.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        q, z, s, g = rtn_quantize(mod.weight, bits, group_size)
        if act_order:  # a random row -> group map, as act-order produces (non-monotone g_idx)
            g = g[torch.randperm(g.numel(), generator=gen)]
        t = GPTQTensors.from_int(q, z, s, g, bits)
        state = t.state_dict(name)
        if checkpoint_format == "gptq_v2":  # v2 stores the true zero
            from sparsepack.kernels.packing import pack_cols

            state[f"{name}.qzeros"] = pack_cols(z, bits)
        tensors.update(state)
        ref.get_submodule(name).weight.data = t.dequantize().t().contiguous()
    for k, v in model.state_dict().items():
        module = k.rsplit(".", 1)[0]
        if f"{module}.qweight" in tensors or k == "lm_head.weight":
            continue
        tensors[k] = v.to(torch.float16).contiguous()
        ref.state_dict()[k].copy_(v.half().float())
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": True,
            "checkpoint_format": checkpoint_format, "true_sequential": True, "damp_percent": 0.01}  # fmt: skip

    def populate(d: Path) -> None:
        save_file(tensors, str(d / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qcfg
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        tiny_tokenizer().save_pretrained(d)
        for name, ad in (adapters or {}).items():
            (d / "adapters" / name).mkdir(parents=True)
            write_adapter(d / "adapters" / name, ad)

    if manifest:
        m = Manifest(base={"model_type": "llama", "source": "tiny"}, quantization=qcfg,
                     adapters={n: {"path": f"adapters/{n}", "method": a.method} for n, a in (adapters or {}).items()},
                     history=[StageRecord("test-rtn", {"bits": bits})])  # fmt: skip
        write_pack(path, m, populate, overwrite=overwrite)
    else:
        path.mkdir(parents=True)
        populate(path)
    return path, ref


def random_adapter(model: LlamaForCausalLM, rank: int = 4, density: float = 0.05, seed: int = 0,
                   target: str = "q_proj|v_proj|down_proj") -> Adapter:  # fmt: skip
    """Random low-rank + sparse corrections (non-zero B so the adapter changes outputs)."""
    import re

    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not re.search(target, name):
            continue
        out_f, in_f = mod.weight.shape
        nnz = max(1, int(density * out_f * in_f))
        flat = torch.randperm(out_f * in_f, generator=gen)[:nnz]
        support = CSRSupport.from_coo(flat // in_f, flat % in_f, (out_f, in_f))
        modules[name] = AdapterModule(
            shape=(out_f, in_f),
            A=torch.randn(rank, in_f, generator=gen) * 0.1,
            B=torch.randn(out_f, rank, generator=gen) * 0.1,
            alpha=2.0 * rank,
            values=torch.randn(nnz, generator=gen) * 0.05,
            row_ptr=support.row_ptr,
            col_idx=support.col_idx,
        )
    return Adapter(modules=modules, method="rosa", meta={"support": "random"})


def run_interrupted(monkeypatch, at_step: int, run) -> None:
    """Call ``run()`` with the trainer's ``at_step``-th optimizer step (counted from 1 in this run) raising
    KeyboardInterrupt before it starts, as a Ctrl-C would; expects the interrupt, then restores the trainer."""
    import pytest

    from sparsepack.pipeline import trainer as trainer_mod

    real = trainer_mod.Trainer._train_step
    calls = {"n": 0}

    def crash(self, phase):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real(self, phase)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", real)
