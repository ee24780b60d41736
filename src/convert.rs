//! `qforge convert`: HF directory <-> GGUF file, in f32, f16 or bf16.
//!
//! Tensors stream one at a time from the mapped input to the output writer; quantized GGUF tensors are
//! dequantized on the way out. 1-D tensors (norms, biases) stay f32 in GGUF, as llama.cpp expects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use formats::gguf::{GgufWriter, MetadataValue, TensorPlan as GgufPlan};
use formats::output::{ensure_distinct, AtomicFile};
use formats::safetensors::{self, Dtype};
use formats::GgmlType;

use crate::model::{ModelSource, SourceTensor};
use crate::progress::Progress;

/// Float storage for converted tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    pub fn ggml(self) -> GgmlType {
        match self {
            FloatType::F32 => GgmlType::F32,
            FloatType::F16 => GgmlType::F16,
            FloatType::Bf16 => GgmlType::BF16,
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            FloatType::F32 => Dtype::F32,
            FloatType::F16 => Dtype::F16,
            FloatType::Bf16 => Dtype::BF16,
        }
    }

    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::Bf16 => "bfloat16",
        }
    }

    /// llama.cpp's `general.file_type` for a file whose matrices have this type.
    pub fn gguf_file_type(self) -> u32 {
        match self {
            FloatType::F32 => 0,
            FloatType::F16 => 1,
            FloatType::Bf16 => 32,
        }
    }

    pub(crate) fn of_storage(storage: crate::model::source::Storage) -> Option<Self> {
        use crate::model::source::Storage::*;
        match storage {
            Ggml(GgmlType::F32) | Safetensors(Dtype::F32) => Some(FloatType::F32),
            Ggml(GgmlType::F16) | Safetensors(Dtype::F16) => Some(FloatType::F16),
            Ggml(GgmlType::BF16) | Safetensors(Dtype::BF16) => Some(FloatType::Bf16),
            _ => None,
        }
    }

    /// Encodes f32 values.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let ty = self.ggml();
        let mut out = vec![0u8; values.len() * ty.type_size()];
        (ty.traits().quantize.expect("float types encode"))(values, &mut out, None);
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Gguf,
    Safetensors,
}

pub struct ConvertOptions {
    pub target: Target,
    pub dtype: Option<FloatType>,
    pub max_shard_size: Option<u64>,
    pub progress: Progress,
}

/// What a conversion wrote.
#[derive(Debug)]
pub struct ConvertReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub bytes_written: u64,
    pub dtype: FloatType,
    pub seconds: f64,
}

pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    if formats::lora::peft::PeftAdapter::is_adapter_dir(input) {
        return crate::lora::export::convert_adapter(input, output, opts);
    }
    ensure_distinct(input, output)?;
    let started = Instant::now();
    let source = ModelSource::open(input)?;
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&source));
    let (tensors, bytes_written) = match opts.target {
        Target::Gguf => write_gguf(&source, output, dtype, &opts.progress)?,
        Target::Safetensors => write_hf_dir(&source, output, dtype, opts.max_shard_size, &opts.progress)?,
    };
    Ok(ConvertReport {
        output: output.to_path_buf(),
        tensors,
        bytes_written,
        dtype,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The matrices' own float type when they have one, f32 for quantized sources (exact).
fn default_dtype(source: &ModelSource) -> FloatType {
    source
        .tensors()
        .iter()
        .find(|t| t.shape.len() >= 2)
        .and_then(|t| FloatType::of_storage(t.storage))
        .unwrap_or(FloatType::F32)
}

fn gguf_float_for(t: &SourceTensor, dtype: FloatType) -> FloatType {
    if t.shape.len() == 1 {
        FloatType::F32
    } else {
        dtype
    }
}

/// All GGUF metadata of a converted model, in llama.cpp's converter order.
pub fn gguf_metadata(source: &ModelSource, file_type: u32) -> Vec<(String, MetadataValue)> {
    let mut kv =
        vec![("general.architecture".to_string(), MetadataValue::String(source.config.arch.gguf_name().into()))];
    if !source.general.iter().any(|(k, _)| k == "general.type") {
        kv.push(("general.type".into(), MetadataValue::String("model".into())));
    }
    kv.extend(source.general.iter().cloned());
    kv.extend(source.config.to_gguf_metadata());
    kv.push(("general.file_type".into(), MetadataValue::U32(file_type)));
    if let Some(v) = &source.vocab {
        kv.extend(v.to_gguf_metadata());
    }
    kv
}

fn write_gguf(source: &ModelSource, output: &Path, dtype: FloatType, progress: &Progress) -> Result<(usize, u64)> {
    if output.is_dir() {
        bail!("{}: is a directory; GGUF output is a single file", output.display());
    }
    if source.vocab.is_none() {
        eprintln!("warning: {}: no tokenizer found; the GGUF will have no vocabulary", source.path.display());
    }
    let mut tensors: Vec<&SourceTensor> = source.tensors().iter().collect();
    let rope_freqs = rope_freqs_tensor(source);
    let plan: Vec<GgufPlan> = tensors
        .iter()
        .map(|t| GgufPlan {
            name: t.gguf_name.clone(),
            dims: t.gguf_dims(),
            ggml_type: gguf_float_for(t, dtype).ggml(),
        })
        .chain(rope_freqs.as_ref().map(|(plan, _)| plan.clone()))
        .collect();
    let metadata = gguf_metadata(source, dtype.gguf_file_type());
    let mut writer = GgufWriter::create(output, &metadata, plan)?;
    let bar = progress.bytes_bar("convert", source.data_bytes());
    let mut written = 0u64;
    for t in tensors.drain(..) {
        let values = source.load_gguf_order(t)?;
        let bytes = gguf_float_for(t, dtype).encode(&values);
        writer.write_tensor(&t.gguf_name, &bytes)?;
        written += bytes.len() as u64;
        bar.inc(source.stored_bytes(t));
        source.release(t);
    }
    if let Some((plan, values)) = rope_freqs {
        let bytes = FloatType::F32.encode(&values);
        writer.write_tensor(&plan.name, &bytes)?;
        written += bytes.len() as u64;
    }
    writer.finish()?;
    bar.finish_and_clear();
    Ok((source.tensors().len(), written))
}

/// llama.cpp reads llama3 RoPE scaling from a `rope_freqs` tensor; an HF source needs it computed.
pub(crate) fn rope_freqs_tensor(source: &ModelSource) -> Option<(GgufPlan, Vec<f32>)> {
    let scaling = source.config.rope_scaling.as_ref()?;
    if source.tensor("rope_freqs.weight").is_some() {
        return None;
    }
    let values = scaling.frequency_factors(source.config.head_dim, source.config.rope_theta);
    let plan = GgufPlan { name: "rope_freqs.weight".into(), dims: vec![values.len() as u64], ggml_type: GgmlType::F32 };
    Some((plan, values))
}

fn write_hf_dir(
    source: &ModelSource,
    output: &Path,
    dtype: FloatType,
    max_shard_size: Option<u64>,
    progress: &Progress,
) -> Result<(usize, u64)> {
    if output.exists() && !output.is_dir() {
        bail!("{}: exists and is not a directory; safetensors output is an HF model directory", output.display());
    }
    std::fs::create_dir_all(output).with_context(|| format!("{}: cannot create directory", output.display()))?;
    let tensors: Vec<&SourceTensor> = source.tensors().iter().filter(|t| t.hf_name.is_some()).collect();
    let mut plan: Vec<safetensors::TensorPlan> = tensors
        .iter()
        .map(|t| safetensors::TensorPlan {
            name: t.hf_name.clone().expect("filtered"),
            dtype: dtype.safetensors(),
            shape: t.shape.clone(),
        })
        .collect();
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    let mut writer = safetensors::Writer::create(output, plan.clone(), safetensors_metadata(source), max_shard_size)?;
    let bar = progress.bytes_bar("convert", source.data_bytes());
    let mut written = 0u64;
    for p in &plan {
        let t = tensors.iter().find(|t| t.hf_name.as_deref() == Some(p.name.as_str())).expect("planned");
        let bytes = dtype.encode(&source.load_hf_order(t)?);
        writer.write_tensor(&p.name, &bytes)?;
        written += bytes.len() as u64;
        bar.inc(source.stored_bytes(t));
        source.release(t);
    }
    writer.finish()?;
    bar.finish_and_clear();
    write_hf_side_files(source, output, &source.config.to_hf_json(dtype.torch_name()))?;
    Ok((tensors.len(), written))
}

/// The safetensors `__metadata__` of an HF directory written from `source`: transformers' `format`
/// marker and the GGUF `general.*` keys.
pub(crate) fn safetensors_metadata(source: &ModelSource) -> BTreeMap<String, String> {
    let mut metadata: BTreeMap<String, String> = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    metadata.extend(source.general_as_safetensors_metadata());
    metadata
}

/// Everything of an HF directory but its weights: `config` as `config.json`, `generation_config.json`,
/// and the tokenizer files when `source` has a vocabulary.
pub(crate) fn write_hf_side_files(source: &ModelSource, output: &Path, config: &serde_json::Value) -> Result<()> {
    write_json(&output.join("config.json"), config)?;
    let mut generation = serde_json::Map::new();
    generation.insert("_from_model_config".into(), true.into());
    if let Some(b) = source.config.bos_token_id {
        generation.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = source.config.eos_token_id {
        generation.insert("eos_token_id".into(), e.into());
    }
    write_json(&output.join("generation_config.json"), &serde_json::Value::Object(generation))?;
    if let Some(vocab) = &source.vocab {
        let (tokenizer, tokenizer_config) = vocab.to_hf().with_context(|| format!("{}", source.path.display()))?;
        write_json(&output.join("tokenizer.json"), &tokenizer)?;
        write_json(&output.join("tokenizer_config.json"), &tokenizer_config)?;
    }
    Ok(())
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut f = AtomicFile::create(path)?;
    serde_json::to_writer_pretty(&mut f, value).with_context(|| format!("{}: cannot write", path.display()))?;
    f.write_all(b"\n").with_context(|| format!("{}: cannot write", path.display()))?;
    f.commit()?;
    Ok(())
}
