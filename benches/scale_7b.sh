#!/usr/bin/env bash
# 7B-scale bench: a synthetic Llama-2-7B-shaped checkpoint (hidden 4096, FFN 11008, 32 layers, 32 heads,
# vocab 32000, BF16, sharded at 5 GB as HF does, 13.5 GB; N(0, 0.02)-like weights with every 997th input
# column x20, see examples/synthetic_checkpoint.rs) and a synthetic r=16 q/v adapter. Per command: wall
# time, peak RSS (VmHWM as /usr/bin/time -v reports it, mapped pages included), the largest anonymous and
# file-backed resident sizes a 1 s sampler of /proc/PID/status saw (where the memory goes; the series of
# each command, seconds / RssAnon kB / RssFile kB, stays in $QFORGE_BENCH_DIR/scale_7b.*.rss), the output
# size and the peak RSS target.
#
# GPTQ needs a tokenizer and the synthetic checkpoint has none: it gets the fixture's (SmolLM2's byte-level
# BPE, tokenizer.json/tokenizer_config.json from its HF export) cut to Llama-2's vocabulary of 32000: the
# tokens with ids below 32000 and the merges that make them (SmolLM2's merges are in id order, so every
# id the cut tokenizer produces is below 32000). Keeping SmolLM2's 49152 would make the embedding and head,
# the largest tensors, 1.5x Llama-2's, and convert/quantize/merge memory follows the largest tensor.
#
# GPTQ at full depth with 32 x 512 calibration tokens takes hours on 2 cores (GPTQ proper costs ~k^3 per
# linear, k = 11008 for down_proj, whatever the calibration size), so GPTQ runs twice:
#   - a cut of the same shapes with CUT_LAYERS layers (default 2) and the full 32 x 512 calibration set:
#     the activation-memory target (the activations and one block's working set do not depend on depth);
#   - the full 32-layer model with a small calibration set (GPTQ_DEPTH_CALIB, default 4x512): memory must
#     not grow with depth (mapped pages of finished layers included). GPTQ_DEPTH_TIMEOUT (seconds, 0 =
#     none) caps it; a capped row is marked so and its RSS columns cover the layers it got through (its
#     .rss series shows the growth per layer).
#
# Disk: the checkpoint (13.5 GB) plus one output at a time (at most 13.5 GB), plus the cut (~1.3 GB).
# Each output is deleted once measured; the checkpoints stay for the next run (they take minutes to write).
#
# Environment: THREADS (2), QFORGE_BENCH_DIR (target/bench), QFORGE_FIXTURE (the SmolLM2 fixture),
# GPTQ_DEPTH_CALIB (4x512), GPTQ_DEPTH_TIMEOUT (0), CUT_LAYERS (2), CUT_CALIB (32x512), ONLY (set to `gptq`
# to run the GPTQ rows alone).
# Usage: benches/scale_7b.sh | tee target/bench/scale_7b.log
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=${QFORGE_BENCH_DIR:-target/bench}
threads=${THREADS:-2}
fixture=${QFORGE_FIXTURE:-target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf}
depth_calib=${GPTQ_DEPTH_CALIB:-4x512}
depth_timeout=${GPTQ_DEPTH_TIMEOUT:-0}
cut_layers=${CUT_LAYERS:-2}
cut_calib=${CUT_CALIB:-32x512}
cargo build --release --quiet --bin qforge --example synthetic_checkpoint --example synthetic_adapter
qforge=target/release/qforge
mkdir -p "$work"

tokenizer=$work/fixture-f16.hf
[ -f "$tokenizer/tokenizer.json" ] || "$qforge" convert "$fixture" -o "$tokenizer" --to safetensors --dtype f16 -q
checkpoint() { # dir, layers
    if [ ! -f "$1/tokenizer_config.json" ]; then
        rm -rf "$1"
        target/release/examples/synthetic_checkpoint "$1" 4096 11008 "$2" 32000 5000000000
        python3 - "$tokenizer/tokenizer.json" "$1/tokenizer.json" 32000 << 'EOF'
import json, sys
tokenizer = json.load(open(sys.argv[1]))
model, vocab = tokenizer["model"], int(sys.argv[3])
model["vocab"] = {token: id for token, id in model["vocab"].items() if id < vocab}
model["merges"] = [m for m in model["merges"] if model["vocab"].get(m.replace(" ", ""), vocab) < vocab]
json.dump(tokenizer, open(sys.argv[2], "w"), ensure_ascii=False)
EOF
        cp "$tokenizer/tokenizer_config.json" "$1/"
    fi
}
ckpt=$work/synth-7b
cut=$work/synth-7b-cut$cut_layers
adapter=$work/synth-7b-adapter
checkpoint "$ckpt" 32
checkpoint "$cut" "$cut_layers"
[ -f "$adapter/adapter_model.safetensors" ] || target/release/examples/synthetic_adapter "$adapter" 4096 4096 32 16

# Largest RssAnon and RssFile (kB) of the deepest process under $1 while $1 runs, written to $2; the
# series (seconds, RssAnon, RssFile) goes to $3, to see whether memory grows with depth.
sample() {
    local pid=$1 anon=0 file=0 leaf child a f start=$SECONDS
    : > "$3"
    while kill -0 "$pid" 2> /dev/null; do
        leaf=$pid
        while child=$(pgrep -P "$leaf" | head -1) && [ -n "$child" ]; do leaf=$child; done
        a=$(awk '/^RssAnon/ {print $2}' "/proc/$leaf/status" 2> /dev/null || echo 0)
        f=$(awk '/^RssFile/ {print $2}' "/proc/$leaf/status" 2> /dev/null || echo 0)
        [ "${a:-0}" -gt "$anon" ] && anon=$a
        [ "${f:-0}" -gt "$file" ] && file=$f
        echo "$anon $file" > "$2"
        echo "$((SECONDS - start)) ${a:-0} ${f:-0}" >> "$3"
        sleep 1
    done
}
mb() { echo "$1 / 1024" | bc; }
gb() { printf "%.2f" "$(echo "scale=3; $1 / 1000000000" | bc)"; }
measure() { # label, target MB, output path, cap seconds (0 = none), command...
    local label=$1 target=$2 out=$3 cap=$4 series; shift 4
    series=$work/scale_7b.$(echo "$label" | tr -c 'A-Za-z0-9_\n' '-').rss
    local cmd=("$@")
    [ "$cap" -gt 0 ] && cmd=(timeout "$cap" "${cmd[@]}")
    rm -rf "$out"
    echo "0 0" > "$work/scale_7b.sample"
    local status=0
    /usr/bin/time -v "${cmd[@]}" > "$work/scale_7b.out" 2> "$work/scale_7b.err" &
    local pid=$!
    sample "$pid" "$work/scale_7b.sample" "$series" &
    wait "$pid" || status=$?
    wait
    local wall rss anon file size note=""
    wall=$(grep "Elapsed (wall clock)" "$work/scale_7b.err" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$work/scale_7b.err" | awk '{print $NF}')
    read -r anon file < "$work/scale_7b.sample"
    if [ "$status" -eq 124 ]; then
        note="stopped at the ${cap} s cap (RSS over time: $series)"
        size=-
    elif [ "$status" -ne 0 ]; then
        tail -20 "$work/scale_7b.err"
        exit 1
    else
        size=$(du -sb "$out" | awk '{print $1}')
        [ "$(mb "$rss")" -lt "$target" ] && note="met" || note="MISSED"
    fi
    printf "%-44s %9s %6s MB %6s MB %6s MB %6s GB %7s MB %s\n" "$label" "$wall" "$(mb "$rss")" "$(mb "$anon")" \
        "$(mb "$file")" "$([ "$size" = - ] && echo - || gb "$size")" "$target" "$note" | tee -a "$work/scale_7b.table"
    rm -rf "$out"
}
calib() { # NxL -> --nsamples N --seqlen L
    echo "--nsamples ${1%x*} --seqlen ${1#*x}"
}

echo "checkpoint: $ckpt ($(gb "$(du -sb "$ckpt" | awk '{print $1}')") GB, $(ls "$ckpt"/*.safetensors | wc -l) shards);" \
    "cut: $cut ($cut_layers layers); threads $threads"
printf "%-44s %9s %9s %9s %9s %9s %10s %s\n" command wall "peak RSS" anon file output target "" | tee "$work/scale_7b.table"
only=${ONLY:-all}
if [ "$only" != gptq ]; then
measure "convert --to gguf --dtype f16" 1536 "$work/synth-7b.f16.gguf" 0 \
    "$qforge" convert "$ckpt" -o "$work/synth-7b.f16.gguf" --to gguf --dtype f16 --threads "$threads" -q
measure "quantize --type Q4_K_M" 1536 "$work/synth-7b.Q4_K_M.gguf" 0 \
    "$qforge" quantize "$ckpt" -o "$work/synth-7b.Q4_K_M.gguf" --type Q4_K_M --threads "$threads" -q
measure "merge-lora r16 q/v -> HF BF16" 1536 "$work/synth-7b-merged" 0 \
    "$qforge" merge-lora "$ckpt" --adapter "$adapter" -o "$work/synth-7b-merged" --threads "$threads" -q
fi
# shellcheck disable=SC2046 # calib's words are separate options
measure "gptq --format gptq, $cut_layers layers, $cut_calib" 4096 "$work/synth-7b-cut-gptq" 0 \
    "$qforge" quantize "$cut" -o "$work/synth-7b-cut-gptq" --method gptq --format gptq $(calib "$cut_calib") \
    --threads "$threads"
# shellcheck disable=SC2046
measure "gptq --format gptq, 32 layers, $depth_calib" 4096 "$work/synth-7b-gptq" "$depth_timeout" \
    "$qforge" quantize "$ckpt" -o "$work/synth-7b-gptq" --method gptq --format gptq $(calib "$depth_calib") \
    --threads "$threads"
rm -f "$work/scale_7b.out" "$work/scale_7b.err" "$work/scale_7b.sample"
