#!/usr/bin/env bash
# The main job end to end on the embedded defaults, on the real SmolLM2-135M fixture:
# GGUF (Q4_1) -> full-precision HF directory -> F16 GGUF, then a look at each.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/fetch-fixtures.sh
cargo build --release --quiet
qforge=target/release/qforge
model=${QFORGE_FIXTURES:-target/fixtures}/SmolLM2-135M-Instruct.Q4_1.gguf
out=${1:-target/demo}
mkdir -p "$out"
$qforge inspect "$model"
$qforge convert "$model" -o "$out/hf" --to safetensors --dtype f32
$qforge convert "$out/hf" -o "$out/smollm2-f16.gguf" --to gguf --dtype f16
$qforge inspect "$out/smollm2-f16.gguf"
