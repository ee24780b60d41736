"""Regenerates the seed corpora in fuzz/seeds/ (small files; the whole set stays well under 1 MB).

Run from the repository root after `cargo build --release`, with the interop venv (numpy + gguf-py):
    target/interop-venv/bin/python fuzz/make_seeds.py [FIXTURE_GGUF] [PEFT_ADAPTER_DIR]
The GGUF seeds come from a tiny synthetic llama quantized by qforge to every preset, the block seeds are
the first blocks of those tensors, and the real fixture and adapter contribute a truncated header and
the adapter's config.
"""

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
QFORGE = ROOT / "target" / "release" / "qforge"
PRESETS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL",
           "IQ4_XS", "F16", "BF16", "F32"]
# The ggml type ids that have a decoder, in the type table's order: the block_decoders body picks one by index.
TYPE_IDS = [0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15, 20, 23, 28, 30]


def seed(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def tokenizer_json():
    vocab = {"<|endoftext|>": 0}
    for b in range(256):
        vocab.setdefault(chr(256 + b if b < 33 else b), b + 1)
    vocab["th"] = len(vocab)
    return {
        "version": "1.0",
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["t h"]},
    }


def safetensors_bytes(tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def tiny_hf(dir, hidden, heads, ffn, vocab):
    dir.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ffn,
              "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": 1, "vocab_size": vocab,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}
    (dir / "config.json").write_text(json.dumps(config))
    (dir / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    kv = hidden // heads
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden],
              "model.layers.0.input_layernorm.weight": [hidden],
              "model.layers.0.post_attention_layernorm.weight": [hidden],
              "model.layers.0.self_attn.q_proj.weight": [hidden, hidden],
              "model.layers.0.self_attn.k_proj.weight": [kv, hidden],
              "model.layers.0.self_attn.v_proj.weight": [kv, hidden],
              "model.layers.0.self_attn.o_proj.weight": [hidden, hidden],
              "model.layers.0.mlp.gate_proj.weight": [ffn, hidden], "model.layers.0.mlp.up_proj.weight": [ffn, hidden],
              "model.layers.0.mlp.down_proj.weight": [hidden, ffn]}
    rng = np.random.default_rng(7)
    tensors = {n: ("F32", s, (rng.standard_normal(s) * 0.05).astype("<f4").tobytes()) for n, s in shapes.items()}
    (dir / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    return config


def qforge(*args):
    subprocess.run([str(QFORGE), *map(str, args), "--quiet"], check=True, stdout=subprocess.DEVNULL)


def main():
    fixture = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf"
    adapter = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "../shared/data/adapters/smollm-135m-instruct-medical-r16"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The smallest llama qforge converts: its GGUF is mostly the 260-token vocabulary.
        small = tiny_hf(tmp / "small", hidden=8, heads=2, ffn=16, vocab=260)
        seed("model_config", "tiny.json", json.dumps(small))
        seed("tokenizer", "tiny.json", json.dumps(tokenizer_json()))
        seed("safetensors", "tiny.safetensors", (tmp / "small/model.safetensors").read_bytes())
        qforge("convert", tmp / "small", "-o", tmp / "small.gguf", "--dtype", "f16")
        seed("gguf", "tiny-f16.gguf", (tmp / "small.gguf").read_bytes())
        qforge("convert", tmp / "small.gguf", "-o", tmp / "small-hf", "--max-shard-size", "1000")
        seed("safetensors_index", "sharded.json", (tmp / "small-hf/model.safetensors.index.json").read_text())
        seed("model_config", "exported.json", (tmp / "small-hf/config.json").read_text())

        # One row per block type: a wider model so that K-quant super-blocks (256 values) fit a row.
        tiny_hf(tmp / "wide", hidden=256, heads=2, ffn=256, vocab=260)
        blocks = {}
        for preset in PRESETS:
            out = tmp / f"wide-{preset}.gguf"
            qforge("quantize", tmp / "wide", "-o", out, "--type", preset, "--pure")
            for t in GGUFReader(out).tensors:
                if t.name == "blk.0.ffn_up.weight":
                    blocks[int(t.tensor_type)] = bytes(t.data.tobytes()[:512])
            if preset in ("Q8_0", "Q4_K_M"):
                # Only the header: the tensor data of a valid file would make the seed large.
                seed("gguf", f"wide-{preset}-header.gguf", out.read_bytes()[:8192])
        for index, type_id in enumerate(TYPE_IDS):
            if type_id in blocks:
                seed("block_decoders", f"type-{type_id}", bytes([index]) + blocks[type_id])

    seed("safetensors", "bf16-f16-meta.safetensors", safetensors_bytes(
        {"a": ("BF16", [2, 2], bytes(range(8))), "b": ("F16", [3], bytes(6)), "c": ("U8", [0], b"")},
        {"format": "pt"}))
    seed("safetensors_index", "two-shards.json", json.dumps(
        {"metadata": {"total_size": 16}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    if fixture.exists():
        seed("gguf", "smollm2-header-truncated.gguf", fixture.read_bytes()[:4096])
    config = adapter / "adapter_config.json"
    if config.exists():
        text = config.read_text()
        seed("peft_config", "smollm2-medical.json", text)
        variant = json.loads(text)
        variant.update({"target_modules": "all-linear", "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 8},
                        "layers_to_transform": [0, 1], "layers_pattern": "layers", "bias": "lora_only"})
        seed("peft_config", "patterns.json", json.dumps(variant))


if __name__ == "__main__":
    main()
