"""The valid stage outputs the output fuzzer damages: a finetune checkpoint and an ONNX export (tiny or real)."""

from __future__ import annotations

import json
from pathlib import Path


def build_ckpt_base(directory: Path):
    """A RoSA checkpoint directory (latest = step 6, mid-train, with sparse supports) and a set-up Trainer."""
    import torch

    from sparsepack.config import TrainConfig
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import completion_examples
    from sparsepack.pipeline.trainer import Trainer
    from sparsepack.runtime.loader import load
    from tests.factories import rtn_pack, tiny_llama

    directory = Path(directory)
    pack, _ = rtn_pack(tiny_llama(), directory / "pack")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(120)]
    (directory / "c.txt").write_text("\n".join(lines))
    cfg = TrainConfig(data=str(directory / "c.txt"), adapter="a1", rank=2, density=0.02, steps=5, warmup_steps=2,
                      batch_size=2, grad_accum=1, seqlen=32, mask_samples=2, save_every=2, dropout=0.0)  # fmt: skip

    def make_trainer(ckpt_dir: Path | None) -> Trainer:
        model = load(pack, dtype=torch.float32)
        tok = load_tokenizer(pack)
        t = Trainer(model, tok, cfg, completion_examples(tok, cfg.data, cfg.seqlen), ckpt_dir, progress=False)
        t.setup()
        return t

    ckpt_dir = directory / "ckpt"
    ckpt_dir.mkdir()
    make_trainer(ckpt_dir).run()
    (ckpt_dir / "metrics.jsonl").unlink()
    assert (ckpt_dir / "latest").read_text() == "step-0000006", (ckpt_dir / "latest").read_text()
    return ckpt_dir, make_trainer(None)


def build_onnx_base(directory: Path) -> Path:
    """A tiny export in the layout ``sparsepack export`` writes: embedding -> linear + one adapter slot.

    Inputs ``input_ids``/``attention_mask`` int64 ``[B, T]`` and the slot ``adapter_0_lora_A`` ``[r, 8]`` /
    ``adapter_0_lora_B`` ``[16, r]`` (zero defaults); two weights in ``model.onnx.data``; one adapter ``a1``.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sparsepack.exporters.onnx_adapters import write_adapter
    from sparsepack.runtime.onnx_runtime import FORMAT, FORMAT_VERSION, METADATA_FILE

    root = Path(directory) / "export"
    (root / "adapters").mkdir(parents=True)
    V, H = 16, 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32), "head"),
             numpy_helper.from_array(np.zeros((1, H), np.float32), "adapter_0_lora_A"),
             numpy_helper.from_array(np.zeros((V, 1), np.float32), "adapter_0_lora_B")]  # fmt: skip
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["base"]),
             helper.make_node("Transpose", ["adapter_0_lora_A"], ["At"], perm=[1, 0]),
             helper.make_node("Transpose", ["adapter_0_lora_B"], ["Bt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "At"], ["hr"]),
             helper.make_node("MatMul", ["hr", "Bt"], ["delta"]),
             helper.make_node("Add", ["base", "delta"], ["logits"])]  # fmt: skip
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("adapter_0_lora_A", TensorProto.FLOAT, ["r0", H]),
              helper.make_tensor_value_info("adapter_0_lora_B", TensorProto.FLOAT, [V, "r0"])]  # fmt: skip
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    graph = helper.make_graph(nodes, "tiny", inputs, out, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)  # fmt: skip
    write_adapter(root / "adapters" / "a1.onnx_adapter",
                  {"adapter_0_lora_A": rng.standard_normal((2, H)).astype(np.float32),
                   "adapter_0_lora_B": rng.standard_normal((V, 2)).astype(np.float32)})  # fmt: skip
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "model.onnx", "kv_cache": False,
            "layout": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4},
            "adapters": {"a1": "adapters/a1.onnx_adapter"}, "vocab_size": V, "eos_token_id": 0,
            "pad_token_id": 1}  # fmt: skip
    (root / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return root


def build_real_onnx_base(directory: Path) -> Path:
    """A real ``export --format onnx`` of a tiny pack with one swappable adapter ``a1`` (slow: ~20 s)."""
    from sparsepack.exporters.onnx import export_onnx
    from tests.factories import random_adapter, rtn_pack, tiny_llama

    model = tiny_llama()
    pack, _ = rtn_pack(model, Path(directory) / "pack", adapters={"a1": random_adapter(model)})
    export_onnx(pack, Path(directory) / "export", adapters=("a1",), validate=False)
    return Path(directory) / "export"
