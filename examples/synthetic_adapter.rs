//! Writes a synthetic PEFT LoRA adapter (q_proj and v_proj, F32) for a llama-shaped base, for merge benchmarks.
//!
//! Usage: `synthetic_adapter OUT_DIR HIDDEN KV_WIDTH LAYERS RANK`
//! e.g. `synthetic_adapter target/bench/synth-2g-adapter 2048 2048 22 16`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use formats::safetensors::{Dtype, TensorPlan, Writer};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 5, "usage: synthetic_adapter OUT_DIR HIDDEN KV_WIDTH LAYERS RANK");
    let dir = PathBuf::from(&args[0]);
    let [hidden, kv_width, layers, rank]: [usize; 4] =
        std::array::from_fn(|i| args[i + 1].parse().expect("numeric argument"));
    std::fs::create_dir_all(&dir)?;
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)?;

    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    for l in 0..layers {
        for (module, out) in [("q_proj", hidden), ("v_proj", kv_width)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{module}");
            tensors.push((format!("{p}.lora_A.weight"), vec![rank, hidden]));
            tensors.push((format!("{p}.lora_B.weight"), vec![out, rank]));
        }
    }
    tensors.sort();
    let plan =
        tensors.iter().map(|(n, s)| TensorPlan { name: n.clone(), dtype: Dtype::F32, shape: s.clone() }).collect();
    // The writer makes a model directory; its single file is renamed to PEFT's name below.
    let scratch = dir.join("weights.writing");
    let mut writer = Writer::create(&scratch, plan, BTreeMap::new(), None)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(n * 4);
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.01;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        writer.write_tensor(name, &bytes)?;
    }
    writer.finish()?;
    std::fs::rename(scratch.join("model.safetensors"), dir.join("adapter_model.safetensors"))?;
    std::fs::remove_dir(&scratch)?;
    Ok(())
}
