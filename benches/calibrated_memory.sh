#!/usr/bin/env bash
# Wall time and peak memory of the calibrated quantizers on the fixture: `quantize --method gptq --format
# gptq` and `--method awq --format awq` (w4, group GROUP) on the embedded calibration corpus at NSAMPLES x
# SEQLEN tokens (default 128 x 512, the CLI's default), THREADS threads (default 2).
#
# For each: wall time, peak RSS (VmHWM as /usr/bin/time reports it, mapped pages included), where the time
# went (calibration forward passes vs. the Hessian and rounding work, from qforge's own report), and the
# memory bound the layer-by-layer design promises,
#     2 x one decoder layer's f32 weights + the calibration activations (N tokens x hidden width x 4 bytes),
# marked "met" or "MISSED".
#
# Environment: QFORGE_FIXTURE, QFORGE_BENCH_DIR (target/bench), QFORGE_BIN (a built qforge to use instead
# of building one), NSAMPLES, SEQLEN, GROUP (64: the fixture's 576-wide inputs are not a multiple of 128),
# THREADS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
nsamples=${NSAMPLES:-128}
seqlen=${SEQLEN:-512}
group=${GROUP:-64}
threads=${THREADS:-2}
work=${QFORGE_BENCH_DIR:-target/bench}/calibrated-memory
fixture=${QFORGE_FIXTURE:-target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -e "$fixture" ] || { echo "error: $fixture not found (run scripts/fetch-fixtures.sh)" >&2; exit 1; }
if [ -z "${QFORGE_BIN:-}" ]; then
    cargo build --release --quiet --bin qforge
fi
qforge=${QFORGE_BIN:-$root/target/release/qforge}
mkdir -p "$work"
fp=$work/fp.f16.gguf
[ -f "$fp" ] || "$qforge" convert "$fixture" -o "$fp" --to gguf --dtype f16 --quiet

# One layer's f32 weights and the activations, from the model's own tensor list.
read -r layer_bytes hidden < <("$qforge" inspect "$fp" --tensors --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
n = lambda shape: eval("*".join(map(str, shape)))
layer = sum(n(t["shape"]) for t in d["tensors"] if t["name"].startswith("blk.0."))
hidden = next(t["shape"][1] for t in d["tensors"] if t["name"] == "token_embd.weight")
print(4 * layer, hidden)')
activations=$((nsamples * seqlen * hidden * 4))
bound=$((2 * layer_bytes + activations))
mb() { echo "scale=1; $1 / 1048576" | bc; }
echo "fixture $fp; $nsamples x $seqlen calibration tokens; $threads threads"
echo "bound: 2 x $(mb "$layer_bytes") MB (one layer, f32) + $(mb "$activations") MB (activations, f32) = $(mb "$bound") MB"
printf '| %-6s | %8s | %13s | %-58s | %-6s |\n' method wall "peak RSS (MB)" "time split" bound
printf '|%s|\n' "--------|----------|---------------|------------------------------------------------------------|--------"
for method in gptq awq; do
    out=$work/$method
    rm -rf "$out"
    # Not --quiet: the report with the time split goes to stderr (no progress bars without a terminal).
    /usr/bin/time -f "%e %M" -o "$work/$method.time" "$qforge" --threads "$threads" quantize "$fp" -o "$out" \
        --method "$method" --format "$method" --bits 4 --group-size "$group" --nsamples "$nsamples" \
        --seqlen "$seqlen" --seed 0 2> "$work/$method.log"
    read -r wall peak_kb < "$work/$method.time"
    split=$(grep -E "^  (GPTQ|AWQ):" "$work/$method.log" | sed 's/.*layers; //')
    peak=$((peak_kb * 1024))
    [ "$peak" -lt "$bound" ] && verdict=met || verdict=MISSED
    printf '| %-6s | %7ss | %13s | %-58s | %-6s |\n' "$method" "$wall" "$(mb "$peak")" "$split" "$verdict"
    rm -rf "$out"
done
