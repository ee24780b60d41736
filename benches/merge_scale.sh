#!/usr/bin/env bash
# Peak memory of `qforge merge-lora`: the shared real adapter on the fixture (HF F16 export and F16 GGUF),
# and a synthetic r=16 q/v adapter on a synthetic ~2.5 GB BF16 llama checkpoint (TinyLlama-1.1B shapes,
# sharded). Prints wall time, peak RSS (VmHWM as /usr/bin/time -v reports it, mapped pages included), the
# base's largest tensor in f32 bytes and the ratio of the two: the target is a small constant, i.e. memory
# follows the largest tensor, not the model.
#
# Environment: THREADS (default 2), QFORGE_BENCH_DIR (target/bench), QFORGE_FIXTURE,
# QFORGE_SHARED_DATA (../shared/data, for the real adapter).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=${QFORGE_BENCH_DIR:-target/bench}
threads=${THREADS:-2}
fixture=${QFORGE_FIXTURE:-target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf}
adapter=${QFORGE_SHARED_DATA:-../shared/data}/adapters/smollm-135m-instruct-medical-r16
cargo build --release --quiet --bin qforge --example synthetic_checkpoint --example synthetic_adapter
qforge=target/release/qforge
mkdir -p "$work"

measure() { # label, largest tensor f32 bytes, command...
    local label=$1 largest=$2; shift 2
    /usr/bin/time -v "$@" > /dev/null 2> "$work/merge-time.log" || { cat "$work/merge-time.log"; exit 1; }
    local wall rss
    wall=$(grep "Elapsed (wall clock)" "$work/merge-time.log" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$work/merge-time.log" | awk '{print $NF}')
    printf "%-44s %10s %10.1f MB %10.1f MB %6.2f\n" "$label" "$wall" "$(echo "$rss / 1024" | bc -l)" \
        "$(echo "$largest / 1048576" | bc -l)" "$(echo "$rss * 1024 / $largest" | bc -l)"
}
printf "%-44s %10s %13s %13s %6s\n" "merge" "wall" "peak RSS" "largest f32" "ratio"

if [ -f "$fixture" ] && [ -d "$adapter" ]; then
    [ -d "$work/fixture-f16.hf" ] || "$qforge" convert "$fixture" -o "$work/fixture-f16.hf" --to safetensors --dtype f16 -q
    [ -f "$work/fixture-f16.gguf" ] || "$qforge" convert "$fixture" -o "$work/fixture-f16.gguf" --to gguf --dtype f16 -q
    largest=$((49152 * 576 * 4))
    measure "fixture HF F16 + medical r16 -> HF" $largest "$qforge" merge-lora "$work/fixture-f16.hf" \
        --adapter "$adapter" -o "$work/merged.hf" --threads "$threads" -q
    measure "fixture GGUF F16 + medical r16 -> GGUF" $largest "$qforge" merge-lora "$work/fixture-f16.gguf" \
        --adapter "$adapter" -o "$work/merged.gguf" --threads "$threads" -q
    rm -rf "$work/merged.hf" "$work/merged.gguf"
else
    echo "(fixture or shared adapter missing: fixture rows skipped)"
fi

base=$work/synth-2g
if [ ! -f "$base/model.safetensors.index.json" ]; then
    rm -rf "$base"
    target/release/examples/synthetic_checkpoint "$base" 2048 5632 22 32000 1000000000
fi
[ -d "$base-adapter" ] || target/release/examples/synthetic_adapter "$base-adapter" 2048 2048 22 16
largest=$((32000 * 2048 * 4))
echo "base: $base ($(du -sh "$base" | cut -f1), $(ls "$base"/*.safetensors | wc -l) shards)"
measure "synthetic 2.5 GB BF16 + r16 -> HF" $largest "$qforge" merge-lora "$base" --adapter "$base-adapter" \
    -o "$work/synth-2g-merged" --threads "$threads" -q
measure "synthetic 2.5 GB BF16 + r16 -> HF F32 (5 GB)" $largest "$qforge" merge-lora "$base" \
    --adapter "$base-adapter" -o "$work/synth-2g-merged" --dtype f32 --threads "$threads" -q
rm -rf "$work/synth-2g-merged"
