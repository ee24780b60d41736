"""llama.cpp's greedy continuation of a prompt, as token ids.

Usage: greedy.py GGUF PROMPT N

Loads GGUF with llama-cpp-python, evaluates PROMPT (tokenized by llama.cpp, BOS only when the vocabulary
adds one) as one batch, then feeds back the most likely token (the first on ties) one at a time, until an
end-of-generation token or N tokens. Prints the generated ids as a JSON list.
"""

import json
import sys

import llama_cpp
import numpy as np


def main() -> int:
    path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    batch = llm.tokenize(prompt.encode())
    generated = []
    while len(generated) < n:
        llm.eval(batch)
        # Without logits_all llama-cpp-python keeps no scores: read the batch's last row from llama.cpp.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        if not np.isfinite(logits).all():
            raise SystemExit(f"{path}: non-finite logits")
        token = int(logits.argmax())
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        generated.append(token)
        batch = [token]
    llm.close()
    print(json.dumps(generated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
