//! Tiny synthetic HF checkpoints for the architectures no real file can be had for here.

use std::collections::BTreeMap;
use std::path::Path;

use formats::safetensors::{Dtype, TensorPlan, Writer};
use serde_json::json;

pub struct TinyModel {
    pub arch: &'static str,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub layers: usize,
    pub vocab: usize,
    pub tied: bool,
}

impl TinyModel {
    pub fn new(arch: &'static str) -> Self {
        Self {
            arch,
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            ffn: 64,
            layers: 2,
            vocab: 300,
            tied: arch == "LlamaForCausalLM",
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// (HF name, shape) of every tensor.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, kv) = (self.hidden, self.kv_heads * self.head_dim());
        let mut t =
            vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h]), ("model.norm.weight".into(), vec![h])];
        if !self.tied {
            t.push(("lm_head.weight".into(), vec![self.vocab, h]));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![self.ffn, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![self.ffn, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, self.ffn]));
            if self.arch == "Qwen2ForCausalLM" {
                t.push((format!("{p}.self_attn.q_proj.bias"), vec![h]));
                t.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                t.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
        }
        t
    }

    /// Deterministic values for a tensor: distinct per tensor and element.
    pub fn values(name: &str, n: usize) -> Vec<f32> {
        let seed = name.bytes().fold(0x9E37_79B9u32, |a, b| a.rotate_left(5) ^ b as u32);
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    /// Writes config.json, a byte-level BPE tokenizer and safetensors weights (sharded when
    /// `max_shard_bytes` is given) into `dir`.
    pub fn write_hf(&self, dir: &Path, dtype: Dtype, max_shard_bytes: Option<u64>) {
        std::fs::create_dir_all(dir).unwrap();
        let config = json!({
            "architectures": [self.arch],
            "hidden_size": self.hidden, "intermediate_size": self.ffn, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": self.tied,
            "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json().to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": false}).to_string(),
        )
        .unwrap();
        let tensors = self.tensors();
        let plan = tensors.iter().map(|(n, s)| TensorPlan { name: n.clone(), dtype, shape: s.clone() }).collect();
        let mut w = Writer::create(dir, plan, BTreeMap::new(), max_shard_bytes).unwrap();
        for (name, shape) in &tensors {
            let v = Self::values(name, shape.iter().product());
            w.write_tensor(name, &encode(&v, dtype)).unwrap();
        }
        w.finish().unwrap();
    }
}

pub fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

/// A byte-level BPE tokenizer.json over the 256 byte symbols plus one merge and one special token.
pub fn tiny_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    let symbols: Vec<char> = (0u32..256).map(|b| char::from_u32(if b < 33 { 256 + b } else { b }).unwrap()).collect();
    for (i, c) in symbols.iter().enumerate() {
        vocab.entry(c.to_string()).or_insert(json!(i + 1));
    }
    let next = vocab.len();
    vocab.insert("th".into(), json!(next));
    json!({
        "version": "1.0", "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["t h"]},
    })
}
