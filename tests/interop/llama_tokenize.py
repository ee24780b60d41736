"""llama.cpp tokenizes a text the same way with every given GGUF's vocabulary.

Usage: llama_tokenize.py TEXT_FILE IDS_JSON_OUT GGUF...

Tokenizes the file's exact contents (no BOS, special tokens as text) with each GGUF loaded vocab-only
by llama-cpp-python, requires identical ids, and writes them as a JSON list to IDS_JSON_OUT.
"""

import json
import logging
import sys

import llama_cpp


def main() -> int:
    text_file, ids_out, *models = sys.argv[1:]
    with open(text_file, encoding="utf-8", newline="") as f:
        text = f.read()
    # llama-cpp-python routes llama.cpp's log through this logger; a vocab-only context warns about n_ctx.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    results = {}
    for path in models:
        llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        results[path] = llm.tokenize(text.encode(), add_bos=False, special=False)
        llm.close()
    first, ids = next(iter(results.items()))
    for path, other in results.items():
        if other != ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
            print(
                f"{path} tokenizes {text_file} differently from {first}: first difference at token {at}: "
                f"{other[at:at + 5]} vs {ids[at:at + 5]} ({len(other)} vs {len(ids)} tokens)",
                file=sys.stderr,
            )
            return 1
    with open(ids_out, "w") as f:
        json.dump(ids, f)
    print(f"{len(models)} vocabularies tokenize {text_file} ({len(text)} chars) into the same {len(ids)} ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
