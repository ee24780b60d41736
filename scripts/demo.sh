#!/usr/bin/env bash
# The main job end to end on the embedded defaults, on the real SmolLM2-135M fixture:
#  1. convert: GGUF (Q4_1) -> full-precision HF directory -> F16 GGUF;
#  2. quantize: llama.cpp's Q4_K_M mix, and GPTQ / AWQ w4 g64 HF checkpoints calibrated on the embedded corpus
#     (NSAMPLES x 512 tokens; 128 is the quantizers' default, the demo uses 32 to take minutes);
#  3. verify: the F16 model's log-probs are saved once, then `qforge check` gates each quantized model on
#     perplexity increase, KL-divergence and top-1 agreement; a summary lists each verdict (in CI, use the
#     exit status of `qforge check` itself: 1 on a regression).
# Evaluation text: WikiText-2 validation from the shared data when present, else the committed excerpt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/fetch-fixtures.sh
cargo build --release --quiet
qforge=target/release/qforge
model=${QFORGE_FIXTURES:-target/fixtures}/SmolLM2-135M-Instruct.Q4_1.gguf
out=${1:-target/demo}
nsamples=${NSAMPLES:-32}
text=${QFORGE_SHARED_DATA:-../shared/data}/wikitext-2/valid.txt
eval=(--ctx 512 --chunks 10)
if [ ! -f "$text" ]; then
    text=tests/data/wikitext-excerpt.txt
    eval=(--ctx 128)
fi
mkdir -p "$out"

$qforge inspect "$model"
$qforge convert "$model" -o "$out/hf" --to safetensors --dtype f32
$qforge convert "$out/hf" -o "$out/smollm2-f16.gguf" --to gguf --dtype f16
$qforge inspect "$out/smollm2-f16.gguf"

$qforge quantize "$out/smollm2-f16.gguf" -o "$out/smollm2-q4_k_m.gguf" --type Q4_K_M
$qforge quantize "$out/smollm2-f16.gguf" -o "$out/smollm2-gptq-w4g64" --method gptq --group-size 64 \
    --nsamples "$nsamples"
$qforge quantize "$out/smollm2-f16.gguf" -o "$out/smollm2-awq-w4g64" --method awq --group-size 64 \
    --nsamples "$nsamples"

$qforge perplexity "$out/smollm2-f16.gguf" --text "$text" "${eval[@]}" --save-logits "$out/f16.logits" --top-k 64
verdicts=()
for m in smollm2-q4_k_m.gguf smollm2-gptq-w4g64 smollm2-awq-w4g64; do
    echo "== qforge check $m"
    if $qforge check "$out/$m" --baseline-logits "$out/f16.logits" --text "$text" "${eval[@]}" \
        --max-ppl-increase 25% --max-kld 0.25 --min-top1 0.75; then
        verdicts+=("$m: pass")
    else
        verdicts+=("$m: FAIL (exit $?)")
    fi
done
echo "== release gate (PPL +25%, KLD 0.25, top-1 75% against F16)"
printf '  %s\n' "${verdicts[@]}"
