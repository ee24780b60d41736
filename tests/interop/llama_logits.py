"""llama.cpp evaluates qforge's F32 GGUF exactly as it evaluates its own F32 conversion of the source.

Usage: llama_logits.py SOURCE_GGUF QFORGE_F32_GGUF LLAMA_F32_OUT PROMPT

Writes LLAMA_F32_OUT with llama.cpp's own `llama_model_quantize` (ftype ALL_F32, allow_requantize),
loads it and QFORGE_F32_GGUF with llama-cpp-python, evaluates PROMPT (tokenized by each model) with
logits for every position, and requires identical tokens and max |logit difference| < 1e-3.
"""

import ctypes
import logging
import sys
from collections import Counter

import gguf
import llama_cpp
import numpy as np

TOLERANCE = 1e-3


def llama_cpp_f32(source: str, out: str) -> None:
    # llama-cpp-python routes llama.cpp's log through this logger: keep errors, drop the per-tensor lines.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({source} -> {out}) failed with {rc}")
    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(out).tensors)
    print(f"llama.cpp wrote {out}: {dict(types)}")


def logits(path: str, prompt: str) -> tuple[list[int], np.ndarray, str]:
    """The prompt's tokens, the logits at every position, and the most likely next token's text."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    tokens = llm.tokenize(prompt.encode())
    llm.eval(tokens)
    scores = llm.scores[: llm.n_tokens].copy()
    next_token = llm.detokenize([int(scores[-1].argmax())]).decode(errors="replace")
    llm.close()
    if not np.isfinite(scores).all():
        raise SystemExit(f"{path}: non-finite logits")
    return tokens, scores, next_token


def main() -> int:
    source, ours, theirs_out, prompt = sys.argv[1:5]
    llama_cpp_f32(source, theirs_out)
    their_tokens, their_logits, their_next = logits(theirs_out, prompt)
    our_tokens, our_logits, our_next = logits(ours, prompt)
    if our_tokens != their_tokens:
        print(f"{ours} tokenizes {prompt!r} as {our_tokens}, llama.cpp's F32 as {their_tokens}", file=sys.stderr)
        return 1
    diff = np.abs(our_logits.astype(np.float64) - their_logits.astype(np.float64))
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    print(
        f"{prompt!r}: {len(our_tokens)} tokens x {our_logits.shape[1]} logits; max |diff| {diff.max():.3e} "
        f"at position {worst[0]}, token {worst[1]}; next token: qforge {our_next!r}, llama.cpp {their_next!r}"
    )
    if diff.max() >= TOLERANCE:
        print(f"{ours}: logits differ from llama.cpp's F32 conversion by up to {diff.max():.3e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
