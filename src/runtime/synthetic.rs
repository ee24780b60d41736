//! Tiny random llama-family models written to disk twice, as a GGUF file and as an HF directory holding
//! exactly the same weights, plus an independent f64 forward pass over them. Tests only.

use std::collections::BTreeMap;
use std::path::PathBuf;

use formats::gguf::{GgufWriter, MetadataValue, TensorPlan};
use formats::safetensors::{self, Dtype};
use formats::GgmlType;

use crate::model::names::{hf_to_gguf, permute_rows_hf_to_gguf};
use crate::model::{Architecture, ModelConfig, RopeScaling};

/// A small deterministic generator (SplitMix64), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

pub fn config(arch: Architecture, tied: bool, rope_scaling: bool) -> ModelConfig {
    ModelConfig {
        arch,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: rope_scaling.then_some(RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        }),
        tie_word_embeddings: tied,
        max_position_embeddings: 512,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// One tensor: HF name and shape, and its values (HF row order) as the GGUF type decodes them.
pub struct Tensor {
    pub hf_name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub ggml_type: GgmlType,
}

pub struct Synthetic {
    pub config: ModelConfig,
    pub tensors: Vec<Tensor>,
    pub gguf: PathBuf,
    pub hf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Synthetic {
    pub fn values(&self, hf_name: &str) -> &[f32] {
        &self.tensors.iter().find(|t| t.hf_name == hf_name).expect("tensor exists").values
    }
}

/// Writes the model; matrices are stored as `matrix_type` in the GGUF (vectors stay F32), and the HF
/// copy holds their decoded values as F32, so both files describe the same weights.
pub fn write(config: ModelConfig, matrix_type: GgmlType, seed: u64) -> Synthetic {
    let c = &config;
    let mut rng = Rng(seed);
    let (h, q, kv, ffn) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![c.vocab_size, h])];
    for l in 0..c.num_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        shapes.extend([
            (p("input_layernorm.weight"), vec![h]),
            (p("self_attn.q_proj.weight"), vec![q, h]),
            (p("self_attn.k_proj.weight"), vec![kv, h]),
            (p("self_attn.v_proj.weight"), vec![kv, h]),
            (p("self_attn.o_proj.weight"), vec![h, q]),
            (p("post_attention_layernorm.weight"), vec![h]),
            (p("mlp.gate_proj.weight"), vec![ffn, h]),
            (p("mlp.up_proj.weight"), vec![ffn, h]),
            (p("mlp.down_proj.weight"), vec![h, ffn]),
        ]);
        if c.arch.has_qkv_bias() {
            shapes.extend([
                (p("self_attn.q_proj.bias"), vec![q]),
                (p("self_attn.k_proj.bias"), vec![kv]),
                (p("self_attn.v_proj.bias"), vec![kv]),
            ]);
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    let tensors: Vec<Tensor> = shapes
        .into_iter()
        .map(|(hf_name, shape)| {
            let is_norm = hf_name.ends_with("norm.weight");
            let n: usize = shape.iter().product();
            let raw: Vec<f32> = (0..n).map(|_| if is_norm { 1.0 + 0.5 * rng.f32() } else { 0.5 * rng.f32() }).collect();
            let ggml_type = if shape.len() == 2 { matrix_type } else { GgmlType::F32 };
            let values = round_trip(ggml_type, &raw);
            Tensor { hf_name, shape, values, ggml_type }
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    let hf = dir.path().join("hf");
    write_gguf(&config, &tensors, &gguf);
    write_hf(&config, &tensors, &hf);
    Synthetic { config, tensors, gguf, hf, _dir: dir }
}

fn encode(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; ty.tensor_bytes(values.len() as u64).unwrap() as usize];
    (ty.traits().quantize.expect("an encodable type"))(values, &mut bytes, None);
    bytes
}

fn round_trip(ty: GgmlType, values: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    ty.dequantize(&encode(ty, values), &mut out).unwrap();
    out
}

fn write_gguf(c: &ModelConfig, tensors: &[Tensor], path: &std::path::Path) {
    let mut metadata = vec![("general.architecture".to_string(), MetadataValue::String(c.arch.gguf_name().into()))];
    metadata.extend(c.to_gguf_metadata());
    let gguf_rows = |t: &Tensor| -> Vec<f32> {
        let heads = if t.hf_name.contains("q_proj") {
            c.num_heads
        } else if t.hf_name.contains("k_proj") {
            c.num_kv_heads
        } else {
            return t.values.clone();
        };
        if !c.arch.permutes_qk() {
            return t.values.clone();
        }
        permute_rows_hf_to_gguf(&t.values, heads, t.shape.get(1).copied().unwrap_or(1))
    };
    let plan = tensors
        .iter()
        .map(|t| TensorPlan {
            name: hf_to_gguf(&t.hf_name).unwrap(),
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: t.ggml_type,
        })
        .collect();
    let mut w = GgufWriter::create(path, &metadata, plan).unwrap();
    for t in tensors {
        w.write_tensor(&hf_to_gguf(&t.hf_name).unwrap(), &encode(t.ggml_type, &gguf_rows(t))).unwrap();
    }
    w.finish().unwrap();
}

fn write_hf(c: &ModelConfig, tensors: &[Tensor], dir: &std::path::Path) {
    let plan = tensors
        .iter()
        .map(|t| safetensors::TensorPlan { name: t.hf_name.clone(), dtype: Dtype::F32, shape: t.shape.clone() })
        .collect();
    let mut w = safetensors::Writer::create(dir, plan, BTreeMap::new(), None).unwrap();
    for t in tensors {
        w.write_tensor(&t.hf_name, &encode(GgmlType::F32, &t.values)).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), c.to_hf_json("float32").to_string()).unwrap();
}

/// Logits of every position of `tokens`, computed the plain way: one token at a time, f64 throughout,
/// HF row order with rotate-half RoPE, as transformers' modeling code defines the model.
pub fn reference_logits(m: &Synthetic, tokens: &[u32]) -> Vec<Vec<f64>> {
    let c = &m.config;
    let (d, group) = (c.head_dim, c.num_heads / c.num_kv_heads);
    let w = |name: &str| -> Vec<f64> { m.values(name).iter().map(|&v| v as f64).collect() };
    let matvec = |name: &str, x: &[f64]| -> Vec<f64> {
        w(name).chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    };
    let norm = |name: &str, x: &[f64]| -> Vec<f64> {
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + c.rms_norm_eps as f64).sqrt();
        x.iter().zip(w(name)).map(|(v, g)| v / rms * g).collect()
    };
    let factors = c.rope_scaling.as_ref().map(|s| s.frequency_factors(d, c.rope_theta));
    let rope = |x: &mut [f64], pos: usize| {
        for head in x.chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let freq = (c.rope_theta as f64).powf(-2.0 * i as f64 / d as f64)
                    / factors.as_ref().map_or(1.0, |f| f[i] as f64);
                let (sin, cos) = (pos as f64 * freq).sin_cos();
                let (a, b) = (head[i], head[i + d / 2]);
                head[i] = a * cos - b * sin;
                head[i + d / 2] = b * cos + a * sin;
            }
        }
    };
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.num_layers];
    let mut values: Vec<Vec<Vec<f64>>> = vec![Vec::new(); c.num_layers];
    let mut logits = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x: Vec<f64> = w("model.embed_tokens.weight")[tok as usize * c.hidden_size..][..c.hidden_size].to_vec();
        for l in 0..c.num_layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let hn = norm(&p("input_layernorm.weight"), &x);
            let proj = |s: &str| {
                let mut y = matvec(&p(&format!("self_attn.{s}_proj.weight")), &hn);
                if c.arch.has_qkv_bias() {
                    y.iter_mut().zip(w(&p(&format!("self_attn.{s}_proj.bias")))).for_each(|(a, b)| *a += b);
                }
                y
            };
            let (mut q, mut k, v) = (proj("q"), proj("k"), proj("v"));
            rope(&mut q, pos);
            rope(&mut k, pos);
            keys[l].push(k);
            values[l].push(v);
            let mut att = vec![0f64; q.len()];
            for h in 0..c.num_heads {
                let kvh = h / group;
                let qh = &q[h * d..][..d];
                let scores: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| qh.iter().zip(&k[kvh * d..][..d]).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (p_j, v) in e.iter().zip(&values[l]) {
                    for i in 0..d {
                        att[h * d + i] += p_j / sum * v[kvh * d + i];
                    }
                }
            }
            x.iter_mut().zip(matvec(&p("self_attn.o_proj.weight"), &att)).for_each(|(a, b)| *a += b);
            let hn = norm(&p("post_attention_layernorm.weight"), &x);
            let gate = matvec(&p("mlp.gate_proj.weight"), &hn);
            let up = matvec(&p("mlp.up_proj.weight"), &hn);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            x.iter_mut().zip(matvec(&p("mlp.down_proj.weight"), &act)).for_each(|(a, b)| *a += b);
        }
        let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        logits.push(matvec(head, &norm("model.norm.weight", &x)));
    }
    logits
}
