//! Model hyper-parameters: `config.json` <-> [`ModelConfig`] <-> GGUF `{arch}.*` metadata.

use std::path::Path;

use anyhow::{bail, Context, Result};
use formats::gguf::{GgufFile, MetadataValue};
use serde_json::{json, Map, Value};

/// The supported members of the llama family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 1-3, SmolLM/SmolLM2).
    Llama,
    /// `MistralForCausalLM`; written to GGUF as architecture `llama`, as llama.cpp's converter does.
    Mistral,
    /// `Qwen2ForCausalLM`: q/k/v biases, no Q/K permutation; GGUF architecture `qwen2`.
    Qwen2,
}

impl Architecture {
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    pub fn hf_model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama | Self::Mistral => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    fn from_hf_class(class: &str) -> Option<Self> {
        [Self::Llama, Self::Mistral, Self::Qwen2].into_iter().find(|a| a.hf_class() == class)
    }

    /// llama.cpp stores q/k rows of the `llama` architecture in interleaved-pair RoPE order.
    pub fn permutes_qk(self) -> bool {
        self.gguf_name() == "llama"
    }

    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: u32,
}

impl RopeScaling {
    /// The per-frequency divisors llama.cpp reads from the `rope_freqs` tensor (`head_dim / 2` values).
    pub fn frequency_factors(&self, head_dim: usize, rope_theta: f32) -> Vec<f32> {
        let low_wavelen = self.original_max_position_embeddings as f32 / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings as f32 / self.high_freq_factor;
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / rope_theta.powf(2.0 * i as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (self.original_max_position_embeddings as f32 / wavelen - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
    }
}

/// Hyper-parameters of a llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// Key under which qforge keeps the HF `rope_scaling` object in GGUF, since llama.cpp's converter
/// stores llama3 scaling only as the derived `rope_freqs` tensor, from which it cannot be recovered.
const ROPE_SCALING_KEY: &str = "qforge.hf.rope_scaling";

impl ModelConfig {
    /// Reads `config.json`.
    pub fn from_config_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&value).with_context(|| format!("{}", path.display()))
    }

    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let class = v["architectures"][0].as_str().or(v["model_type"].as_str()).unwrap_or("<none>");
        let arch = Architecture::from_hf_class(class)
            .or(match v["model_type"].as_str() {
                Some("llama") => Some(Architecture::Llama),
                Some("mistral") => Some(Architecture::Mistral),
                Some("qwen2") => Some(Architecture::Qwen2),
                _ => None,
            })
            .with_context(|| {
                format!("unsupported architecture {class:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")
            })?;
        let usize_field = |name: &str| -> Result<usize> {
            v[name].as_u64().map(|x| x as usize).with_context(|| format!("missing or invalid field {name:?}"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        if num_heads == 0 || hidden_size % num_heads != 0 {
            bail!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}");
        }
        let num_kv_heads = v["num_key_value_heads"].as_u64().map(|x| x as usize).unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
        }
        let head_dim = v["head_dim"].as_u64().map(|x| x as usize).unwrap_or(hidden_size / num_heads);
        let rope_scaling = match &v["rope_scaling"] {
            Value::Null => None,
            s => {
                let kind = s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or("");
                if kind != "llama3" {
                    bail!("unsupported rope_scaling type {kind:?} (supported: llama3)");
                }
                let f = |k: &str| s[k].as_f64().with_context(|| format!("rope_scaling.{k} missing"));
                Some(RopeScaling {
                    factor: f("factor")? as f32,
                    low_freq_factor: f("low_freq_factor")? as f32,
                    high_freq_factor: f("high_freq_factor")? as f32,
                    original_max_position_embeddings: f("original_max_position_embeddings")? as u32,
                })
            }
        };
        let eos = match &v["eos_token_id"] {
            Value::Array(a) => a.first().and_then(Value::as_u64),
            x => x.as_u64(),
        };
        Ok(Self {
            arch,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_field("vocab_size")?,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10000.0) as f32,
            rope_scaling,
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            max_position_embeddings: v["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
            bos_token_id: v["bos_token_id"].as_u64().map(|x| x as u32),
            eos_token_id: eos.map(|x| x as u32),
        })
    }

    /// `config.json` contents as transformers writes them.
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let mut m = Map::new();
        m.insert("architectures".into(), json!([self.arch.hf_class()]));
        m.insert("model_type".into(), json!(self.arch.hf_model_type()));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_layers));
        m.insert("num_attention_heads".into(), json!(self.num_heads));
        m.insert("num_key_value_heads".into(), json!(self.num_kv_heads));
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps as f64));
        m.insert("rope_theta".into(), json!(self.rope_theta as f64));
        m.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(s) => json!({
                    "rope_type": "llama3",
                    "factor": s.factor as f64,
                    "low_freq_factor": s.low_freq_factor as f64,
                    "high_freq_factor": s.high_freq_factor as f64,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                }),
            },
        );
        m.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        m.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("attention_bias".into(), json!(self.arch.has_qkv_bias()));
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = self.eos_token_id {
            m.insert("eos_token_id".into(), json!(e));
        }
        m.insert("torch_dtype".into(), json!(torch_dtype));
        m.insert("use_cache".into(), json!(true));
        Value::Object(m)
    }

    /// Reads the `{arch}.*` keys of a GGUF model (bos/eos come from the vocabulary keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path().display();
        let arch_name = file.architecture().with_context(|| format!("{path}: no general.architecture"))?;
        let arch = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!("{path}: unsupported GGUF architecture {other:?} (supported: llama, qwen2)"),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| -> Result<usize> {
            file.get(&key(k))
                .and_then(MetadataValue::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("{path}: missing or invalid {}", key(k)))
        };
        let float = |k: &str| file.get(&key(k)).and_then(MetadataValue::as_f64);
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("{path}: head counts {num_heads}/{num_kv_heads} are inconsistent");
        }
        let head_dim = int("attention.key_length").unwrap_or(hidden_size / num_heads);
        let token_embd = file.tensor("token_embd.weight").with_context(|| format!("{path}: no token_embd.weight"))?;
        let vocab_size = int("vocab_size").unwrap_or(token_embd.dims.get(1).copied().unwrap_or(0) as usize);
        let rope_scaling = match file.get(ROPE_SCALING_KEY).and_then(MetadataValue::as_str) {
            None => None,
            Some(s) => {
                let v: Value =
                    serde_json::from_str(s).with_context(|| format!("{path}: invalid {ROPE_SCALING_KEY}"))?;
                Self::from_hf_json(&json!({
                    "architectures": ["LlamaForCausalLM"], "hidden_size": 1, "num_attention_heads": 1,
                    "intermediate_size": 1, "num_hidden_layers": 1, "vocab_size": 1, "rope_scaling": v,
                }))?
                .rope_scaling
            }
        };
        let vocab_id = |k: &str| file.get(k).and_then(MetadataValue::as_u64).map(|x| x as u32);
        Ok(Self {
            arch,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope_theta: float("rope.freq_base").unwrap_or(10000.0) as f32,
            rope_scaling,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            max_position_embeddings: int("context_length").unwrap_or(2048),
            bos_token_id: vocab_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: vocab_id("tokenizer.ggml.eos_token_id"),
        })
    }

    /// The `{arch}.*` metadata llama.cpp's converter writes (plus qforge's rope-scaling record).
    pub fn to_gguf_metadata(&self) -> Vec<(String, MetadataValue)> {
        let a = self.arch.gguf_name();
        let u32v = |x: usize| MetadataValue::U32(x as u32);
        let mut kv = vec![
            (format!("{a}.vocab_size"), u32v(self.vocab_size)),
            (format!("{a}.context_length"), u32v(self.max_position_embeddings)),
            (format!("{a}.embedding_length"), u32v(self.hidden_size)),
            (format!("{a}.block_count"), u32v(self.num_layers)),
            (format!("{a}.feed_forward_length"), u32v(self.intermediate_size)),
            (format!("{a}.rope.dimension_count"), u32v(self.head_dim)),
            (format!("{a}.attention.head_count"), u32v(self.num_heads)),
            (format!("{a}.attention.head_count_kv"), u32v(self.num_kv_heads)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), MetadataValue::F32(self.rms_norm_eps)),
            (format!("{a}.rope.freq_base"), MetadataValue::F32(self.rope_theta)),
        ];
        if self.head_dim * self.num_heads != self.hidden_size {
            kv.push((format!("{a}.attention.key_length"), u32v(self.head_dim)));
            kv.push((format!("{a}.attention.value_length"), u32v(self.head_dim)));
        }
        if self.rope_scaling.is_some() {
            let hf = self.to_hf_json("float32");
            kv.push((ROPE_SCALING_KEY.into(), MetadataValue::String(hf["rope_scaling"].to_string())));
        }
        kv
    }

    /// Parameter count implied by the shapes (embedding, blocks, norms, untied head).
    pub fn parameter_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let ffn = self.intermediate_size as u64;
        let mut per_layer = h * q + 2 * h * kv + q * h + 3 * h * ffn + 2 * h;
        if self.arch.has_qkv_bias() {
            per_layer += q + 2 * kv;
        }
        let embed = self.vocab_size as u64 * h;
        embed + per_layer * self.num_layers as u64 + h + if self.tie_word_embeddings { 0 } else { embed }
    }
}
