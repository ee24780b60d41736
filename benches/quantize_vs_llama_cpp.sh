#!/usr/bin/env bash
# `qforge quantize` against llama.cpp's `llama-quantize` on the same F16 GGUF, with the same threads,
# in one run: for each type both tools run alternately RUNS times (so background load hits both alike);
# the table gives median wall seconds, the ratio qforge/llama.cpp (target <= 1.0), peak RSS of each
# (largest over the runs, /usr/bin/time -v's "Maximum resident set size") and whether the two outputs
# are the same bytes.
#
# llama.cpp is built beside the project, never committed. Build it with:
#   pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
#   cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
#     -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF
#   cmake --build build -j2 --target llama-quantize
# and point LLAMA_CPP_BIN at build/bin (default /work/llama/build/bin).
#
# Environment: LLAMA_CPP_BIN, RUNS (default 5), THREADS (default 2), TYPES (default
# "Q8_0 Q4_0 Q4_K_M Q3_K_M IQ4_NL"), QFORGE_BENCH_DIR (default target/bench),
# QFORGE_FIXTURE (default target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
llama_bin=${LLAMA_CPP_BIN:-/work/llama/build/bin}
runs=${RUNS:-5}
threads=${THREADS:-2}
types=${TYPES:-Q8_0 Q4_0 Q4_K_M Q3_K_M IQ4_NL}
work=${QFORGE_BENCH_DIR:-target/bench}
fixture=${QFORGE_FIXTURE:-target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf}

llama_quantize=$llama_bin/llama-quantize
if [ ! -x "$llama_quantize" ]; then
    echo "error: $llama_quantize not found; build llama.cpp as the comment at the top of $0 says" >&2
    echo "       and set LLAMA_CPP_BIN to its build/bin directory" >&2
    exit 1
fi
if [ ! -f "$fixture" ]; then
    echo "error: $fixture not found (set QFORGE_FIXTURE to a llama-architecture GGUF)" >&2
    exit 1
fi

cargo build --release --quiet --bin qforge
qforge=target/release/qforge
mkdir -p "$work"
f16=$work/quantize-input.f16.gguf
if [ ! -f "$f16" ] || [ "$fixture" -nt "$f16" ] || [ "$qforge" -nt "$f16" ]; then
    rm -rf "$work/quantize-input.hf"
    "$qforge" convert "$fixture" -o "$work/quantize-input.hf" --to safetensors --dtype f16 --quiet
    "$qforge" convert "$work/quantize-input.hf" -o "$f16" --dtype f16 --quiet
    rm -rf "$work/quantize-input.hf"
fi

# Runs a command under /usr/bin/time -v; prints "SECONDS RSS_KB".
measure() {
    local log=$work/quantize-time.log
    /usr/bin/time -v "$@" > /dev/null 2> "$log" || { cat "$log" >&2; exit 1; }
    local wall rss
    wall=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$log" | awk '{print $NF}')
    # h:mm:ss or m:ss.ss to seconds
    echo "$(echo "$wall" | awk -F: '{s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s}') $rss"
}

median() {
    tr ' ' '\n' | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

max() {
    tr ' ' '\n' | sort -g | tail -n 1
}

echo "input: $f16 ($(du -m "$f16" | awk '{print $1}') MB), threads $threads, $runs runs each, alternating"
echo "llama-quantize: $llama_quantize"
printf "%-8s %10s %10s %7s %12s %12s %10s\n" type "qforge s" "llama s" ratio "qforge MB" "llama MB" identical
worst=0
for ty in $types; do
    ours=$work/quantize-qforge.$ty.gguf
    theirs=$work/quantize-llama.$ty.gguf
    q_times=() l_times=() q_rss=() l_rss=()
    for _ in $(seq "$runs"); do
        read -r t r < <(measure "$qforge" quantize "$f16" -o "$ours" --type "$ty" --threads "$threads" --quiet)
        q_times+=("$t") q_rss+=("$r")
        read -r t r < <(measure "$llama_quantize" "$f16" "$theirs" "$ty" "$threads")
        l_times+=("$t") l_rss+=("$r")
    done
    qm=$(echo "${q_times[*]}" | median)
    lm=$(echo "${l_times[*]}" | median)
    ratio=$(awk -v a="$qm" -v b="$lm" 'BEGIN {printf "%.2f", a / b}')
    if cmp -s "$ours" "$theirs"; then same=yes; else same=NO; fi
    printf "%-8s %10.2f %10.2f %7s %12.1f %12.1f %10s\n" "$ty" "$qm" "$lm" "$ratio" \
        "$(echo "${q_rss[*]}" | max | awk '{print $1 / 1024}')" \
        "$(echo "${l_rss[*]}" | max | awk '{print $1 / 1024}')" "$same"
    echo "         qforge runs: ${q_times[*]}; llama.cpp runs: ${l_times[*]}" >&2
    worst=$(awk -v a="$ratio" -v w="$worst" 'BEGIN {print (a > w) ? a : w}')
    rm -f "$ours" "$theirs"
done
echo "worst ratio: $worst (target <= 1.0)"
