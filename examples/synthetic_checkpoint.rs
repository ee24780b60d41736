//! Writes a synthetic llama-shaped HF checkpoint (random BF16 weights, sharded) for scale benchmarks.
//!
//! Usage: `synthetic_checkpoint OUT_DIR HIDDEN FFN LAYERS VOCAB SHARD_BYTES`
//! e.g. `synthetic_checkpoint target/bench/synth-4g 2560 6912 26 32000 1000000000` (~4.4 GB).
//! Values are N(0, 0.02)-like with a few outlier columns, streamed tensor by tensor.

use std::collections::BTreeMap;
use std::path::PathBuf;

use formats::safetensors::{Dtype, TensorPlan, Writer};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 6, "usage: synthetic_checkpoint OUT_DIR HIDDEN FFN LAYERS VOCAB SHARD_BYTES");
    let dir = PathBuf::from(&args[0]);
    let [hidden, ffn, layers, vocab, shard]: [usize; 5] =
        std::array::from_fn(|i| args[i + 1].parse().expect("numeric argument"));
    let heads = hidden / 128;
    std::fs::create_dir_all(&dir)?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;

    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("lm_head.weight".into(), vec![vocab, hidden]),
        ("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        ("model.norm.weight".into(), vec![hidden]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden, hidden]),
            ("self_attn.v_proj.weight", vec![hidden, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![ffn, hidden]),
            ("mlp.up_proj.weight", vec![ffn, hidden]),
            ("mlp.down_proj.weight", vec![hidden, ffn]),
        ] {
            tensors.push((format!("{p}.{n}"), s));
        }
    }
    tensors.sort();
    let plan =
        tensors.iter().map(|(n, s)| TensorPlan { name: n.clone(), dtype: Dtype::BF16, shape: s.clone() }).collect();
    let mut writer = Writer::create(&dir, plan, BTreeMap::new(), Some(shard as u64))?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (name, shape) in &tensors {
        let cols = *shape.last().expect("non-empty shape");
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(n * 2);
        for i in 0..n {
            // xorshift + sum of uniforms: cheap, roughly Gaussian, deterministic.
            let mut sum = 0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                sum += (state >> 40) as f32 / (1u64 << 24) as f32;
            }
            let mut x = (sum - 2.0) * 0.035;
            if shape.len() == 1 {
                x += 1.0;
            } else if i % cols % 997 == 0 {
                x *= 20.0;
            }
            bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
        }
        writer.write_tensor(name, &bytes)?;
    }
    writer.finish()?;
    Ok(())
}
