#!/usr/bin/env bash
# Scale benchmark for the formats layer: a synthetic ~4.4 GB BF16 sharded llama checkpoint.
# Reports wall time and peak RSS (VmHWM as /usr/bin/time -v reports it, mapped pages included) of
# `qforge inspect` and `qforge convert --to gguf`. Target: convert peak RSS under 1 GB.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=${QFORGE_BENCH_DIR:-target/bench}
threads=${THREADS:-2}
cargo build --release --quiet --example synthetic_checkpoint
cargo build --release --quiet
ckpt=$work/synth-4g
if [ ! -f "$ckpt/model.safetensors.index.json" ]; then
    rm -rf "$ckpt"
    target/release/examples/synthetic_checkpoint "$ckpt" 2560 6912 26 32000 1000000000
fi
measure() { # label, command...
    local label=$1; shift
    /usr/bin/time -v "$@" > /dev/null 2> "$work/time.log" || { cat "$work/time.log"; exit 1; }
    local wall rss
    wall=$(grep "Elapsed (wall clock)" "$work/time.log" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$work/time.log" | awk '{print $NF}')
    printf "%-34s %12s %12.1f MB\n" "$label" "$wall" "$(echo "$rss / 1024" | bc -l)"
}
size=$(du -sb "$ckpt" | awk '{print $1}')
echo "checkpoint: $ckpt ($(echo "$size / 1000000000" | bc -l | cut -c1-5) GB, $(ls "$ckpt"/*.safetensors | wc -l) shards), threads $threads"
printf "%-34s %12s %15s\n" "command" "wall" "peak RSS"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
measure "inspect (cold cache)" target/release/qforge inspect "$ckpt" --threads "$threads"
measure "inspect (warm cache)" target/release/qforge inspect "$ckpt" --threads "$threads"
measure "convert --to gguf --dtype bf16" target/release/qforge convert "$ckpt" -o "$work/synth-4g.gguf" --dtype bf16 --threads "$threads" --quiet
measure "convert --to gguf --dtype f16" target/release/qforge convert "$ckpt" -o "$work/synth-4g.gguf" --dtype f16 --threads "$threads" --quiet
ls -la "$work/synth-4g.gguf"
rm -f "$work/synth-4g.gguf"
