#!/usr/bin/env bash
# qforge's runtime against llama.cpp's on the same GGUF files, same text, same threads, in one run.
#
# Files: an F16 GGUF made by `qforge convert` from the fixture, and Q8_0, Q4_0, Q4_1 and Q4_K_M made
# from that F16 file by llama.cpp's own `llama-quantize`, so both tools read identical bytes.
#
# Prompt rows (perplexity): `llama-perplexity -c 512 --chunks N -t 2 -fa off` and
# `qforge perplexity --ctx 512 --chunks N --threads 2 --json`, alternating, REPS times each; the
# table gives medians. Throughput is tokens through the model (chunks × 512) over the time of the
# evaluation loop, for both tools:
# - qforge reports that loop's seconds in its JSON (`seconds`, from before the first chunk to after
#   the last one's scoring; loading and tokenizing excluded);
# - llama-perplexity prints no such total and its "prompt eval time" counter covers a narrower window
#   (the decode calls only), so the loop time is taken from the timestamps of its own log lines: from
#   "calculating perplexity over N chunks" (printed after loading and tokenizing) to "Final estimate"
#   (printed after the last chunk is scored), the same window as qforge's.
# Peak RSS is /usr/bin/time -v's "Maximum resident set size" (largest over the runs).
#
# Generation rows: 64 greedy tokens after a short prompt. qforge: `qforge generate F --prompt P -n 64
# --temp 0 --json` (its `generation_tokens_per_second`); the row is skipped when this qforge has no
# `generate`. llama.cpp: this build has no llama-bench and llama-simple cannot set its thread count,
# so the same llama.cpp commit is driven through llama-cpp-python (the interop venv) with
# n_threads=2: one `llama_decode` per token and an argmax over its logits, timed over the 64 steps
# after the prompt.
#
# GFLOP/s counts 2 flops per multiply-add of every matrix product the pass needs: the block matrices
# for every token, the output head for the scored half of each chunk (both tools compute only those
# logits) or for every generated token, and attention (QKᵀ and P·V over the causal triangle). "% peak"
# relates it to PEAK_GFLOPS, the f32 GEMM both cores reach on these shapes (default 270, measured in
# shared/research/crates.md; `cargo bench --bench runtime -- f32_gemm` measures it again).
#
# llama.cpp is built beside the project, never committed: see benches/quantize_vs_llama_cpp.sh.
#
# Environment: LLAMA_CPP_BIN (default /work/llama/build/bin), REPS (default 3), CHUNKS (default 8),
# THREADS (default 2), QFORGE (a qforge binary to use instead of building target/release/qforge), FILES (default "F16 Q8_0 Q4_0 Q4_1 Q4_K_M"), TEXT (default WikiText-2 valid),
# QFORGE_BENCH_DIR (default target/bench), QFORGE_FIXTURE (default
# target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf), INTEROP_PYTHON (default
# target/interop-venv/bin/python), PEAK_GFLOPS (default 270).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
llama_bin=${LLAMA_CPP_BIN:-/work/llama/build/bin}
reps=${REPS:-3}
chunks=${CHUNKS:-8}
threads=${THREADS:-2}
files=${FILES:-F16 Q8_0 Q4_0 Q4_1 Q4_K_M}
text=${TEXT:-/work/shared/data/wikitext-2/valid.txt}
work=${QFORGE_BENCH_DIR:-target/bench}
fixture=${QFORGE_FIXTURE:-target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf}
python=${INTEROP_PYTHON:-target/interop-venv/bin/python}
peak=${PEAK_GFLOPS:-270}
ctx=512
gen_tokens=64
prompt="The history of the city begins in the early middle ages, when"

for tool in llama-perplexity llama-quantize; do
    if [ ! -x "$llama_bin/$tool" ]; then
        echo "error: $llama_bin/$tool not found; build llama.cpp (see benches/quantize_vs_llama_cpp.sh)" >&2
        echo "       and set LLAMA_CPP_BIN to its build/bin directory" >&2
        exit 1
    fi
done
for f in "$fixture" "$text"; do
    [ -f "$f" ] || { echo "error: $f not found (see the environment variables at the top of $0)" >&2; exit 1; }
done

if [ -n "${QFORGE:-}" ]; then
    qforge=$QFORGE
else
    cargo build --release --quiet --bin qforge
    qforge=target/release/qforge
fi
mkdir -p "$work"
f16=$work/runtime.F16.gguf
if [ ! -f "$f16" ] || [ "$fixture" -nt "$f16" ]; then
    rm -rf "$work/runtime-input.hf"
    "$qforge" convert "$fixture" -o "$work/runtime-input.hf" --to safetensors --dtype f16 --quiet
    "$qforge" convert "$work/runtime-input.hf" -o "$f16" --dtype f16 --quiet
    rm -rf "$work/runtime-input.hf"
fi
for t in $files; do
    out=$work/runtime.$t.gguf
    if [ "$t" != F16 ] && { [ ! -f "$out" ] || [ "$f16" -nt "$out" ]; }; then
        "$llama_bin/llama-quantize" "$f16" "$out" "$t" "$threads" > "$work/runtime-quantize.log" 2>&1 \
            || { cat "$work/runtime-quantize.log" >&2; exit 1; }
    fi
done

have_generate=no
"$qforge" generate --help > /dev/null 2>&1 && have_generate=yes
have_python=no
"$python" -c "import llama_cpp, numpy" > /dev/null 2>&1 && have_python=yes

# Model dimensions for the flop count, from the F16 file's metadata.
read -r n_embd n_ff n_layer n_head n_kv_head n_vocab < <("$qforge" inspect "$f16" --json | "$python" -c '
import json, sys
m = json.load(sys.stdin)["metadata"]
a = m["general.architecture"]
keys = ["embedding_length", "feed_forward_length", "block_count", "attention.head_count", "attention.head_count_kv"]
print(*[m[a + "." + k] for k in keys], m.get(a + ".vocab_size", 0))')
head_dim=$((n_embd / n_head))
# GFLOP per evaluated token: block matrices, half the output head (scored positions), attention over
# the causal triangle of a ctx-token chunk (average (ctx+1)/2 keys).
prompt_gflop=$(awk -v e="$n_embd" -v f="$n_ff" -v l="$n_layer" -v h="$n_head" -v kv="$n_kv_head" -v v="$n_vocab" \
    -v d="$head_dim" -v c="$ctx" 'BEGIN {
        block = l * (2 * e * h * d + 2 * e * kv * d + 3 * e * f)
        print (2 * block + 2 * v * e * (c / 2 - 1) / c + l * 4 * h * d * (c + 1) / 2) / 1e9 }')
# GFLOP per generated token: every matrix once, attention over about the prompt plus half the tokens.
gen_gflop=$(awk -v e="$n_embd" -v f="$n_ff" -v l="$n_layer" -v h="$n_head" -v kv="$n_kv_head" -v v="$n_vocab" \
    -v d="$head_dim" -v n="$gen_tokens" 'BEGIN {
        block = l * (2 * e * h * d + 2 * e * kv * d + 3 * e * f)
        print (2 * block + 2 * v * e + l * 4 * h * d * (16 + n / 2)) / 1e9 }')

time_log=$work/runtime-time.log
# Runs a command under /usr/bin/time -v, its stdout to $work/runtime-out.log and its stderr to
# $work/runtime-err.log; prints the peak RSS in KiB.
run_measured() {
    /usr/bin/time -v -o "$time_log" "$@" > "$work/runtime-out.log" 2> "$work/runtime-err.log" || {
        cat "$work/runtime-out.log" "$work/runtime-err.log" "$time_log" >&2
        exit 1
    }
    grep "Maximum resident set size" "$time_log" | awk '{print $NF}'
}

# Seconds between two "m.ss.mmm.uuu" llama.cpp log timestamps.
log_seconds() {
    awk -v a="$1" -v b="$2" 'function s(t,  p) { split(t, p, "."); return p[1] * 60 + p[2] + p[3] / 1e3 + p[4] / 1e6 }
        BEGIN { printf "%.4f\n", s(b) - s(a) }'
}

llama_prompt() { # file -> "tok/s rss ppl"
    local rss
    rss=$(run_measured "$llama_bin/llama-perplexity" -m "$1" -f "$text" -c "$ctx" --chunks "$chunks" \
        -t "$threads" -fa off)
    local log=$work/runtime-err.log start end ppl
    start=$(grep "calculating perplexity over" "$log" | awk '{print $1}')
    end=$(grep "Final estimate" "$log" | awk '{print $1}')
    ppl=$(grep "Final estimate" "$log" | sed 's/.*PPL = \([0-9.]*\).*/\1/')
    echo "$(awk -v t="$((chunks * ctx))" -v s="$(log_seconds "$start" "$end")" 'BEGIN {print t / s}') $rss $ppl"
}

qforge_prompt() { # file -> "tok/s rss ppl"
    local rss
    rss=$(run_measured "$qforge" perplexity "$1" --text "$text" --ctx "$ctx" --chunks "$chunks" \
        --threads "$threads" --json --quiet)
    "$python" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["tokens_per_second"], sys.argv[2], r["ppl"])' \
        "$work/runtime-out.log" "$rss"
}

llama_generate() { # file -> "tok/s rss"
    local rss
    rss=$(run_measured "$python" - "$1" "$prompt" "$gen_tokens" "$threads" <<'EOF'
import sys, time
import numpy as np
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
def next_token():
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
llm.eval(llm.tokenize(prompt.encode()))
token = next_token()
start = time.perf_counter()
for _ in range(n):
    llm.eval([token])
    token = next_token()
print(n / (time.perf_counter() - start))
EOF
)
    echo "$(cat "$work/runtime-out.log") $rss"
}

qforge_generate() { # file -> "tok/s rss"
    local rss
    rss=$(run_measured "$qforge" generate "$1" --prompt "$prompt" -n "$gen_tokens" --temp 0 --threads "$threads" \
        --json --quiet)
    "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["generation_tokens_per_second"], sys.argv[2])' \
        "$work/runtime-out.log" "$rss"
}

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
max() { sort -g | tail -1; }

echo "qforge vs llama.cpp, $threads threads, $reps alternating runs each (medians); prompt: ctx $ctx x $chunks chunks"
echo "of $(basename "$text"); generation: $gen_tokens greedy tokens. Peak GEMM for % peak: $peak GFLOP/s."
echo "$(uptime)"
printf '\n| %-6s | %-10s | %12s | %14s | %6s | %15s | %7s | %11s | %13s | %10s | %13s |\n' file row "qforge tok/s" \
    "llama.cpp tok/s" ratio "qforge GFLOP/s" "% peak" "qforge PPL" "llama.cpp PPL" "qforge RSS" "llama.cpp RSS"
printf '|%s|\n' "--------|------------|--------------|----------------|--------|-----------------|---------|-------------|---------------|------------|---------------"
for t in $files; do
    f=$work/runtime.$t.gguf
    rows="prompt"
    if [ "$have_generate" = yes ] && [ "$have_python" = yes ]; then rows="prompt generation"; fi
    for row in $rows; do
        q_runs=() l_runs=()
        for ((i = 0; i < reps; i++)); do
            if [ "$row" = prompt ]; then
                q_runs+=("$(qforge_prompt "$f")") l_runs+=("$(llama_prompt "$f")")
            else
                q_runs+=("$(qforge_generate "$f")") l_runs+=("$(llama_generate "$f")")
            fi
        done
        q=$(printf '%s\n' "${q_runs[@]}" | awk '{print $1}' | median)
        l=$(printf '%s\n' "${l_runs[@]}" | awk '{print $1}' | median)
        q_rss=$(printf '%s\n' "${q_runs[@]}" | awk '{print $2}' | max)
        l_rss=$(printf '%s\n' "${l_runs[@]}" | awk '{print $2}' | max)
        q_ppl=$(printf '%s\n' "${q_runs[0]}" | awk '{if ($3 == "") print "-"; else printf "%.4f\n", $3}')
        l_ppl=$(printf '%s\n' "${l_runs[0]}" | awk '{if ($3 == "") print "-"; else printf "%.4f\n", $3}')
        gflop=$([ "$row" = prompt ] && echo "$prompt_gflop" || echo "$gen_gflop")
        printf '| %-6s | %-10s | %12.1f | %14.1f | %6.2f | %15.1f | %6.1f%% | %11s | %13s | %7d MiB | %9d MiB |\n' \
            "$t" "$row" "$q" "$l" "$(awk -v a="$q" -v b="$l" 'BEGIN {print a / b}')" \
            "$(awk -v a="$q" -v g="$gflop" 'BEGIN {print a * g}')" \
            "$(awk -v a="$q" -v g="$gflop" -v p="$peak" 'BEGIN {print 100 * a * g / p}')" \
            "$q_ppl" "$l_ppl" "$((q_rss / 1024))" "$((l_rss / 1024))"
    done
done
if [ "$have_generate" = no ]; then echo; echo "(no generation rows: this qforge has no 'generate' subcommand)"; fi
if [ "$have_python" = no ]; then echo; echo "(no generation rows: $python cannot import llama_cpp and numpy)"; fi
