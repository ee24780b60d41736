"""Reads a GPTQ (v1) or AWQ (GEMM) HF directory the way the loaders unpack it, and compares every
block linear with the same layer of a full-precision HF directory (a `qforge convert --dtype f32`
export): round-to-nearest weights must sit within half a quantization step of the originals.

Written from the loaders' conventions as shared/research/anchors.md §2a/§2b records them, not from
qforge's writer:
- GPTQ v1 (AutoGPTQ qlinear_cuda_old / vLLM gptq): qweight [in*b/32, out] packed along the input dim,
  LSB first; qzeros [groups, out*b/32] packed along the output dim, stored minus one (loaders add 1);
  W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1)).
- AWQ GEMM (AutoAWQ utils/packing_utils): qweight [in, out/8], nibbles shifted by 0,4,..,28 then
  reordered with AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]; zeros as they are; W = (q - z) * s.

Usage: read_gptq_awq.py QUANTIZED_DIR F32_DIR; prints one line per layer and exits 1 on a mismatch.
"""

import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "BF16": None}
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = np.frombuffer(data[base + start : base + end], dtype=DTYPES[info["dtype"]])
        tensors[name] = raw.reshape(info["shape"])
    return tensors


def unpack_cols(words, bits):
    """[r, c] int32 words -> [r * 32/bits, c]: value j of word (r, c) is row r*32/bits + j (LSB first)."""
    w = words.view(np.uint32).astype(np.uint64)
    if bits == 3:
        # 32 values in 3 words: treat the three words as one 96-bit LSB-first stream.
        r, c = w.shape
        w = w.reshape(r // 3, 3, c)
        stream = w[:, 0, :] | (w[:, 1, :] << np.uint64(32))
        out = []
        for j in range(32):
            bit = 3 * j
            if bit + 3 <= 64:
                v = (stream >> np.uint64(bit)) & np.uint64(7)
            else:
                low = stream >> np.uint64(bit) if bit < 64 else np.zeros_like(stream)
                high = w[:, 2, :] << np.uint64(64 - bit) if bit < 64 else w[:, 2, :] >> np.uint64(bit - 64)
                v = (low | high) & np.uint64(7)
            out.append(v)
        return np.stack(out, axis=1).reshape(-1, c).astype(np.int64)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    values = (w[:, None, :] >> shifts[None, :, None]) & np.uint64((1 << bits) - 1)
    return values.reshape(-1, w.shape[1]).astype(np.int64)


def gptq_dequant(t, prefix, bits):
    qweight, qzeros = t[prefix + ".qweight"], t[prefix + ".qzeros"]
    scales, g_idx = t[prefix + ".scales"].astype(np.float32), t[prefix + ".g_idx"].astype(np.int64)
    q = unpack_cols(qweight, bits)  # [in, out]
    z = unpack_cols(qzeros.T.copy(), bits).T + 1  # [groups, out], v1 stores zero - 1
    w = scales[g_idx] * (q - z[g_idx])  # [in, out]
    return w.T, scales[g_idx].T


def awq_dequant(t, prefix):
    qweight, qzeros = t[prefix + ".qweight"], t[prefix + ".qzeros"]
    scales = t[prefix + ".scales"].astype(np.float32)
    shifts = np.arange(0, 32, 4, dtype=np.uint32)

    def unpack(words):
        v = (words.view(np.uint32)[:, :, None] >> shifts[None, None, :]) & np.uint32(0xF)
        v = v[:, :, AWQ_REVERSE_ORDER]
        return v.reshape(words.shape[0], -1).astype(np.int64)

    q, z = unpack(qweight), unpack(qzeros)  # [in, out], [groups, out]
    group = q.shape[0] // scales.shape[0]
    g = np.arange(q.shape[0]) // group
    w = (q - z[g]) * scales[g]
    return w.T, scales[g].T


def main():
    quantized, reference = sys.argv[1], sys.argv[2]
    config = json.load(open(quantized + "/config.json"))["quantization_config"]
    t = read_safetensors(quantized + "/model.safetensors")
    ref = read_safetensors(reference + "/model.safetensors")
    prefixes = sorted(n[: -len(".qweight")] for n in t if n.endswith(".qweight"))
    bad = 0
    for prefix in prefixes:
        if config["quant_method"] == "gptq":
            w, step = gptq_dequant(t, prefix, config["bits"])
        else:
            w, step = awq_dequant(t, prefix)
        original = ref[prefix + ".weight"].astype(np.float32)
        # Half a step, plus the f16 rounding of the scale (relative 2^-11) times up to 15 codes of distance.
        worst = np.max(np.abs(w - original) - 0.51 * step - 1e-3 * np.abs(original) - 1e-6)
        ok = w.shape == original.shape and worst <= 0
        bad += not ok
        print(f"{prefix} {w.shape} max excess {worst:.3g} {'ok' if ok else 'MISMATCH'}")
    print(f"{len(prefixes)} layers, {bad} mismatched")
    sys.exit(1 if bad or not prefixes else 0)


if __name__ == "__main__":
    main()
