"""llama.cpp's own quantizer writes the same tensor bytes as `qforge quantize`.

Usage: llama_quantize.py F16_GGUF WORK_DIR TYPE=QFORGE_GGUF [TYPE=QFORGE_GGUF ...]

For each TYPE (Q8_0, Q4_0, Q4_1) quantizes F16_GGUF with llama-cpp-python's `llama_model_quantize`
(llama.cpp's llama-quantize library call, 2 threads) into WORK_DIR and requires every tensor's type,
shape and data bytes to equal those in qforge's file.
"""

import ctypes
import logging
import sys

import gguf
import llama_cpp
import numpy as np

FTYPES = {
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
}


def llama_cpp_quantize(source: str, out: str, ftype: int) -> None:
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({source} -> {out}) failed with {rc}")


def compare(theirs: str, ours: str) -> list[str]:
    a = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    problems = []
    if a.keys() != b.keys():
        problems.append(f"tensor names differ: {sorted(a.keys() ^ b.keys())[:5]}")
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            problems.append(f"{name}: llama.cpp {x.tensor_type.name}{list(x.shape)}, qforge {y.tensor_type.name}{list(y.shape)}")
        elif not np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            problems.append(f"{name}: {x.tensor_type.name} data bytes differ")
    return problems


def main() -> int:
    source, work = sys.argv[1:3]
    failed = False
    for spec in sys.argv[3:]:
        ty, ours = spec.split("=", 1)
        theirs = f"{work}/llama-{ty}.gguf"
        llama_cpp_quantize(source, theirs, FTYPES[ty])
        problems = compare(theirs, ours)
        n = len(gguf.GGUFReader(ours).tensors)
        if problems:
            failed = True
            print(f"{ty}: {len(problems)} of {n} tensors differ from llama.cpp's: " + "; ".join(problems[:5]), file=sys.stderr)
        else:
            print(f"{ty}: all {n} tensors byte-identical to llama.cpp's llama_model_quantize output")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
