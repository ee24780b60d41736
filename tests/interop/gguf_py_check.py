"""llama.cpp's gguf-py reads a GGUF file to the values qforge reports for it.

Usage: gguf_py_check.py GGUF HF_DIR VOCAB_SIZE

HF_DIR is qforge's f32 safetensors export of GGUF (`qforge convert GGUF --to safetensors --dtype f32`).
Checks that every metadata value parses, that the tokenizer arrays hold VOCAB_SIZE entries, and that
`gguf.quants.dequantize` of every tensor equals, bit for bit, the export's tensor of the same name
(mapped with gguf-py's own HF name table, q/k rows permuted as llama.cpp's converter does).
Exits 1 with the list of mismatches otherwise.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np


def load_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Maps every tensor of the export's shard(s) without copying; f32 only (the export's dtype)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        raw = np.memmap(hf_dir / name, dtype=np.uint8, mode="r")
        header_len = int(raw[:8].view("<u8")[0])
        header = json.loads(bytes(raw[8 : 8 + header_len]))
        data = raw[8 + header_len :]
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] != "F32":
                raise SystemExit(f"{name}: {key} is {info['dtype']}, expected an f32 export")
            start, end = info["data_offsets"]
            tensors[key] = data[start:end].view("<f4").reshape(info["shape"])
    return tensors


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF rotate-half -> interleaved pairs)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def check_metadata(reader: gguf.GGUFReader, vocab_size: int, failures: list[str]) -> str:
    for key, field in reader.fields.items():
        try:
            if field.contents() is None:
                failures.append(f"metadata {key}: gguf-py reads no value")
        except Exception as e:  # any parse error is a finding, not a crash
            failures.append(f"metadata {key}: gguf-py cannot read it: {e!r}")
    arrays = [gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.TOKEN_TYPE, gguf.Keys.Tokenizer.SCORES]
    lengths = {}
    for key in arrays:
        field = reader.get_field(key)
        if field is None:
            if key != gguf.Keys.Tokenizer.SCORES:  # optional for BPE vocabularies
                failures.append(f"metadata {key} is missing")
            continue
        lengths[key] = len(field.data)
        if lengths[key] != vocab_size:
            failures.append(f"metadata {key} has {lengths[key]} entries, expected {vocab_size}")
    return f"{len(reader.fields)} metadata keys read; tokenizer arrays {lengths}"


def check_tensors(reader: gguf.GGUFReader, hf: dict[str, np.ndarray], failures: list[str]) -> str:
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    n_blocks = reader.get_field(gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)).contents()
    n_head = reader.get_field(gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)).contents()
    kv_field = reader.get_field(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch))
    n_head_kv = kv_field.contents() if kv_field is not None else n_head
    name_map = gguf.get_tensor_name_map(model_arch, n_blocks)

    hf_by_gguf_name = {}
    for hf_name in hf:
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            failures.append(f"export tensor {hf_name} has no GGUF name in gguf-py's table")
        else:
            hf_by_gguf_name[gguf_name] = hf_name

    types = Counter()
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        hf_name = hf_by_gguf_name.pop(t.name, None)
        if hf_name is None:
            failures.append(f"{t.name}: not in the export")
            continue
        ours = hf[hf_name]
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            ours = llama_permute(ours, n_head)
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            ours = llama_permute(ours, n_head_kv)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        if theirs.shape != ours.shape:
            failures.append(f"{t.name}: gguf-py shape {theirs.shape}, export {hf_name} shape {ours.shape}")
            continue
        differ = theirs.astype(np.float32).view(np.uint32) != ours.view(np.uint32)
        if differ.any():
            first = np.unravel_index(np.argmax(differ), differ.shape)
            failures.append(
                f"{t.name} ({t.tensor_type.name}): {int(differ.sum())} of {differ.size} values differ from "
                f"{hf_name}; first at {tuple(int(i) for i in first)}: gguf-py {float(theirs[first])!r}, "
                f"qforge {float(ours[first])!r}"
            )
    for gguf_name, hf_name in hf_by_gguf_name.items():
        failures.append(f"export tensor {hf_name} ({gguf_name}) is not in the GGUF")
    census = ", ".join(f"{name} x{n}" for name, n in sorted(types.items()))
    return f"{len(reader.tensors)} tensors ({census}) dequantized by gguf-py and compared bit for bit"


def main() -> int:
    path, hf_dir, vocab_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    reader = gguf.GGUFReader(path)
    failures: list[str] = []
    print(f"{path.name}: {check_metadata(reader, vocab_size, failures)}")
    print(f"{path.name}: {check_tensors(reader, load_safetensors(hf_dir), failures)}")
    if failures:
        print(f"{path}: {len(failures)} mismatches with gguf-py:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
