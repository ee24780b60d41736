#!/usr/bin/env bash
# Quality table of the calibrated quantizers on the fixture: PPL, KL-divergence and top-1 agreement against
# the full-precision model (the fixture dequantized to F16) for RTN, GPTQ (w4, w4 act-order, w3, w8), AWQ w4,
# and GPTQ written into GGUF Q4_0 / the Q4_K_M mix next to `qforge quantize`'s plain Q4_0 / Q4_K_M with and
# without an importance matrix. Every method calibrates on the same embedded corpus (NSAMPLES x SEQLEN
# tokens, seed 0); evaluation is WikiText-2 validation, llama.cpp's protocol, CTX 512, CHUNKS 20.
#
# With llama.cpp built beside the project (LLAMA_CPP_BIN, default /work/llama/build/bin; see
# benches/quantize_vs_llama_cpp.sh for the build) the GGUF rows are also measured by llama.cpp's own
# llama-perplexity, and llama.cpp's imatrix quantization (llama-imatrix on the same calibration text) is
# added as the competitor of the GPTQ GGUF rows.
#
# Environment: GROUP (default 64: the fixture's 576-wide inputs are not a multiple of 128), NSAMPLES (128),
# SEQLEN (512), CHUNKS (20), THREADS (2), QFORGE_BENCH_DIR (target/bench), QFORGE_FIXTURE,
# QFORGE_SHARED_DATA (default ../shared/data), QFORGE_BIN (a built qforge to use instead of building one).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
group=${GROUP:-64}
nsamples=${NSAMPLES:-128}
seqlen=${SEQLEN:-512}
chunks=${CHUNKS:-20}
threads=${THREADS:-2}
work=${QFORGE_BENCH_DIR:-target/bench}/gptq-awq
fixture=${QFORGE_FIXTURE:-target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf}
text=${QFORGE_SHARED_DATA:-../shared/data}/wikitext-2/valid.txt
llama_bin=${LLAMA_CPP_BIN:-/work/llama/build/bin}
calib_text=calibration/data/tinyshakespeare.txt

for f in "$fixture" "$text"; do
    [ -e "$f" ] || { echo "error: $f not found" >&2; exit 1; }
done
if [ -z "${QFORGE_BIN:-}" ]; then
    cargo build --release --quiet --bin qforge
fi
qforge=${QFORGE_BIN:-$root/target/release/qforge}
mkdir -p "$work"
q() { "$qforge" --threads "$threads" --quiet "$@"; }

fp=$work/fp.f16.gguf
[ -f "$fp" ] || q convert "$fixture" -o "$fp" --to gguf --dtype f16
base=$work/fp.logits
[ -f "$base" ] || q perplexity "$fp" --text "$text" --ctx 512 --chunks "$chunks" --save-logits "$base"

calib=(--nsamples "$nsamples" --seqlen "$seqlen" --seed 0)
# name | qforge quantize arguments (output appended)
rows=(
    "RTN w4 g$group|--method rtn --format gptq --bits 4 --group-size $group"
    "RTN w4 g$group asym|--method rtn --format gptq --bits 4 --group-size $group --asym"
    "GPTQ w4 g$group|--method gptq --format gptq --bits 4 --group-size $group ${calib[*]}"
    "GPTQ w4 g$group shrink 0|--method gptq --format gptq --bits 4 --group-size $group --shrink 0 ${calib[*]}"
    "GPTQ w4 g$group act-order|--method gptq --format gptq --bits 4 --group-size $group --act-order ${calib[*]}"
    "AWQ w4 g$group|--method awq --format awq --bits 4 --group-size $group ${calib[*]}"
    "RTN w8 g$group|--method rtn --format gptq --bits 8 --group-size $group"
    "GPTQ w8 g$group|--method gptq --format gptq --bits 8 --group-size $group ${calib[*]}"
    "RTN w3 g$group|--method rtn --format gptq --bits 3 --group-size $group"
    "GPTQ w3 g$group|--method gptq --format gptq --bits 3 --group-size $group ${calib[*]}"
    "Q4_0|--type Q4_0"
    "Q4_0 + imatrix|--type Q4_0 --imatrix $work/imatrix.gguf"
    "GPTQ Q4_0|--method gptq --format gguf --type Q4_0 ${calib[*]}"
    "Q4_K_M|--type Q4_K_M"
    "Q4_K_M + imatrix|--type Q4_K_M --imatrix $work/imatrix.gguf"
    "GPTQ Q4_K_M|--method gptq --format gguf --type Q4_K_M ${calib[*]}"
)

imatrix_chunks=$((nsamples * seqlen / 512))
[ -f "$work/imatrix.gguf" ] || q imatrix "$fp" --calib "$calib_text" --ctx 512 --chunks "$imatrix_chunks" -o "$work/imatrix.gguf"

slug() { echo "$1" | tr ' +' '__' | tr -cd 'A-Za-z0-9_'; }
json_field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

printf '| %-24s | %9s | %8s | %8s | %7s | %9s | %8s |\n' model PPL "PPL +%" KLD top-1 size_MB quant_s
printf '|%s|\n' "--------------------------|-----------|----------|----------|---------|-----------|----------"
report() { # name json size seconds
    local ppl ratio kld top1
    ppl=$(json_field "$2" "'%.4f' % d['ppl']['value']")
    ratio=$(json_field "$2" "'%+.2f' % (100 * (d['ppl_ratio']['value'] - 1))")
    kld=$(json_field "$2" "'%.4f' % d['kld']['value']")
    top1=$(json_field "$2" "'%.1f%%' % (100 * d['top1']['value'])")
    printf '| %-24s | %9s | %8s | %8s | %7s | %9.1f | %8s |\n' "$1" "$ppl" "$ratio" "$kld" "$top1" "$3" "$4"
}
q perplexity "$fp" --text "$text" --ctx 512 --chunks "$chunks" --baseline-logits "$base" --json > "$work/fp.json"
report "FP (F16)" "$work/fp.json" "$(du -sm "$fp" | cut -f1)" "-"
for row in "${rows[@]}"; do
    name=${row%%|*}
    args=${row#*|}
    out=$work/$(slug "$name")
    case $args in *"--format gptq"* | *"--format awq"*) ;; *) out=$out.gguf ;; esac
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    q quantize "$fp" -o "$out" $args
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    q perplexity "$out" --text "$text" --ctx 512 --chunks "$chunks" --baseline-logits "$base" --json > "$out.json"
    report "$name" "$out.json" "$(du -sm "$out" | cut -f1)" "$(printf '%.1f' "$seconds")"
done

[ -x "$llama_bin/llama-perplexity" ] || { echo "(llama.cpp not found at $llama_bin: its rows skipped)"; exit 0; }
echo
echo "GGUF files measured by llama.cpp's llama-perplexity (KLD against the F16 file's logits):"
lbase=$work/llama-base.kld
[ -f "$lbase" ] || "$llama_bin/llama-perplexity" -m "$fp" -f "$text" -c 512 --chunks "$chunks" -t "$threads" -fa off \
    --kl-divergence-base "$lbase" > "$work/llama-base.log" 2>&1
[ -f "$work/llama-imatrix.gguf" ] || "$llama_bin/llama-imatrix" -m "$fp" -f "$calib_text" -c 512 \
    --chunks "$imatrix_chunks" -t "$threads" -o "$work/llama-imatrix.gguf" > "$work/llama-imatrix.log" 2>&1
for ty in Q4_0 Q4_K_M; do
    "$llama_bin/llama-quantize" --imatrix "$work/llama-imatrix.gguf" "$fp" "$work/llama_${ty}_imatrix.gguf" "$ty" \
        "$threads" > "$work/llama-quantize.log" 2>&1
done
printf '| %-32s | %9s | %8s | %7s |\n' file PPL KLD top-1
for f in "$work/$(slug "Q4_0").gguf" "$work/$(slug "Q4_0 + imatrix").gguf" "$work"/llama_Q4_0_imatrix.gguf \
    "$work/$(slug "GPTQ Q4_0").gguf" "$work/$(slug "Q4_K_M").gguf" "$work/$(slug "Q4_K_M + imatrix").gguf" \
    "$work"/llama_Q4_K_M_imatrix.gguf "$work/$(slug "GPTQ Q4_K_M").gguf"; do
    log=$f.llama.log
    "$llama_bin/llama-perplexity" -m "$f" --kl-divergence-base "$lbase" --kl-divergence -c 512 -t "$threads" -fa off \
        > "$log" 2>&1
    ppl=$(grep -m1 "Mean PPL(Q)" "$log" | awk '{print $4}')
    kld=$(grep -m1 "^Mean    KLD" "$log" | awk '{print $3}')
    top1=$(grep -m1 "^Same top p" "$log" | awk '{print $4}')
    printf '| %-32s | %9s | %8s | %7s |\n' "$(basename "$f")" "$ppl" "$kld" "$top1"
done
