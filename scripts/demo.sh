#!/usr/bin/env bash
# The main job end to end on the embedded defaults, on the real SmolLM2-135M fixture:
#  1. convert: GGUF (Q4_1) -> full-precision HF directory -> F16 GGUF;
#  2. quantize the F16 model, calibrating on the embedded corpus (NSAMPLES x 512 tokens; 128 is the
#     quantizers' default, the demo uses 32 to take minutes): GPTQ w4 g64 as an HF GPTQ checkpoint
#     (asymmetric, with zero points: on this model round-to-nearest loses +26% PPL asymmetric vs +46%
#     symmetric) and written into GGUF Q4_K_M blocks, AWQ w4 g64 as an HF AWQ checkpoint, and llama.cpp's
#     plain Q4_K_M mix for reference. Group size 64, not the usual 128: SmolLM2's 576-wide inputs are not a
#     multiple of 128;
#  3. verify: the F16 model's log-probs are saved once, then `qforge check` gates each quantized model on
#     perplexity increase, KL-divergence and top-1 agreement against them;
#  4. print one table (size, bits per weight, PPL, KLD, top-1, quantization time, verdict); exit 0 when every
#     model passes the gate, 1 otherwise.
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

# name | quantize arguments
models=(
    "smollm2-q4_k_m.gguf|--type Q4_K_M"
    "smollm2-gptq-w4g64|--method gptq --group-size 64 --asym --nsamples $nsamples"
    "smollm2-gptq-q4_k_m.gguf|--method gptq --format gguf --type Q4_K_M --nsamples $nsamples"
    "smollm2-awq-w4g64|--method awq --group-size 64 --nsamples $nsamples"
)
names=()
seconds=()
for entry in "${models[@]}"; do
    m=${entry%%|*}
    echo "== qforge quantize $m"
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    $qforge quantize "$out/smollm2-f16.gguf" -o "$out/$m" ${entry#*|}
    names+=("$m")
    seconds+=("$((($(date +%s%N) - start) / 1000000))")
done

$qforge perplexity "$out/smollm2-f16.gguf" --text "$text" "${eval[@]}" --save-logits "$out/f16.logits"
gate=(--max-ppl-increase 30% --max-kld 0.30 --min-top1 0.70)
failed=0
for entry in "${models[@]}"; do
    m=${entry%%|*}
    echo "== qforge check $m"
    $qforge check "$out/$m" --baseline-logits "$out/f16.logits" --text "$text" "${eval[@]}" "${gate[@]}" \
        --json-report "$out/$m.check.json" || failed=1
    $qforge inspect "$out/$m" --json > "$out/$m.inspect.json"
done

echo
echo "== release gate against the F16 model: PPL +30%, KLD 0.30, top-1 70% (${eval[*]})"
python3 - "$out" "${names[@]}" -- "${seconds[@]}" <<'PY'
import json, sys
out, rest = sys.argv[1], sys.argv[2:]
split = rest.index("--")
seconds = dict(zip(rest[:split], rest[split + 1:]))
print(f"| {'model':<26} | {'MB':>6} | {'bits/w':>6} | {'PPL':>7} | {'PPL +%':>7} | {'KLD':>6} | {'top-1':>6} | {'time s':>6} | gate |")
print(f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 8}|------|")
for name in seconds:
    check = json.load(open(f"{out}/{name}.check.json"))
    inspect = json.load(open(f"{out}/{name}.inspect.json"))
    r = check["report"]
    print(f"| {name:<26} | {inspect['tensor_bytes'] / 1e6:6.1f} | {inspect['bits_per_weight']:6.2f} "
          f"| {r['ppl']['value']:7.3f} | {100 * (r['ppl_ratio']['value'] - 1):+7.2f} | {r['kld']['value']:6.4f} "
          f"| {100 * r['top1']['value']:5.1f}% | {int(seconds[name]) / 1000:6.1f} | {'pass' if check['pass'] else 'FAIL'} |")
PY
exit $failed
