//! A model opened from a Hugging Face directory or a GGUF file, seen through GGUF tensor names.
//!
//! This is the seam every command streams through: tensors are listed with their shape and storage
//! type, and each is loaded (decoded to f32, in HF or GGUF row order) or borrowed as raw bytes one at a
//! time from the memory-mapped files, then released so resident memory stays bounded by one tensor.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use formats::gguf::{GgufFile, MetadataArray, MetadataValue, ValueType};
use formats::packed::UnpackedWeights;
use formats::safetensors::{Checkpoint, Dtype};
use formats::GgmlType;
use serde_json::{json, Value};

use super::config::ModelConfig;
use super::names::{self, QkRole};
use super::packed::{self, PackedFormat, QWEIGHT};
use super::vocab::Vocab;

/// How a source tensor is stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Ggml(GgmlType),
    Safetensors(Dtype),
    /// A GPTQ/AWQ linear: several tensors (`qweight`, `qzeros`, `scales`, `g_idx`) that only decode
    /// together, so it has no raw bytes of its own.
    Packed(PackedFormat),
}

impl Storage {
    pub fn name(self) -> &'static str {
        match self {
            Storage::Ggml(t) => t.name(),
            Storage::Safetensors(d) => d.name(),
            Storage::Packed(f) => f.name(),
        }
    }

    pub fn bits_per_weight(self) -> f64 {
        match self {
            Storage::Ggml(t) => t.bits_per_weight(),
            Storage::Safetensors(d) => d.size() as f64 * 8.0,
            Storage::Packed(f) => f.bits_per_weight(),
        }
    }
}

/// One tensor of a model.
#[derive(Clone, Debug)]
pub struct SourceTensor {
    pub gguf_name: String,
    /// `None` for tensors HF checkpoints do not have (e.g. `rope_freqs.weight`).
    pub hf_name: Option<String>,
    /// HF order: outermost first (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    pub storage: Storage,
    /// Name of the tensor in the file it comes from; for a packed linear, its module prefix.
    file_name: String,
}

impl SourceTensor {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// GGUF dims: innermost first.
    pub fn gguf_dims(&self) -> Vec<u64> {
        self.shape.iter().rev().map(|&d| d as u64).collect()
    }
}

enum Files {
    Gguf(GgufFile),
    Hf(Checkpoint),
}

/// A model ready to be streamed tensor by tensor.
pub struct ModelSource {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub vocab: Option<Vocab>,
    /// `general.*` descriptive keys (name, license, ...) carried across conversions.
    pub general: Vec<(String, MetadataValue)>,
    tensors: Vec<SourceTensor>,
    files: Files,
}

/// `general.*` keys that describe the file rather than the model; they are recomputed on write.
const FILE_KEYS: &[&str] =
    &["general.architecture", "general.file_type", "general.quantization_version", "general.alignment"];

/// The HF name of the token embedding, whose rows are the vocabulary.
const EMBEDDING: &str = "model.embed_tokens.weight";

/// Prefix of safetensors `__metadata__` entries that carry GGUF `general.*` keys through an HF directory.
const GGUF_KEY_PREFIX: &str = "gguf:";

impl ModelSource {
    /// Opens an HF directory (or a `.safetensors` file inside one) or a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?;
        if meta.is_dir() {
            return Self::open_hf(path, path);
        }
        if path.extension().is_some_and(|e| e == "safetensors" || e == "json") {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            return Self::open_hf(dir, path);
        }
        Self::open_gguf(path)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let vocab = Vocab::from_gguf(&file)?;
        let general = file
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("general.") && !FILE_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        let tensors = file
            .tensors()
            .iter()
            .map(|t| SourceTensor {
                gguf_name: t.name.clone(),
                hf_name: names::gguf_to_hf(&t.name),
                shape: t.dims.iter().rev().map(|&d| d as usize).collect(),
                storage: Storage::Ggml(t.ggml_type),
                file_name: t.name.clone(),
            })
            .collect();
        Self { path: path.to_path_buf(), config, vocab, general, tensors, files: Files::Gguf(file) }.checked()
    }

    fn open_hf(dir: &Path, weights: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            bail!("{}: missing config.json (an HF model directory needs one)", config_path.display());
        }
        let config = ModelConfig::from_config_json(&config_path)?;
        let packing = PackedFormat::from_dir(dir)?;
        let checkpoint = Checkpoint::open(weights)?;
        // The vocabulary is padded to vocab_size, so that must be the embedding's size, not an unchecked
        // number from a text file.
        let embedding = checkpoint
            .tensor(EMBEDDING)
            .with_context(|| format!("{}: the checkpoint has no {EMBEDDING}", weights.display()))?;
        if embedding.shape.first() != Some(&config.vocab_size) {
            bail!(
                "{}: vocab_size {} does not match {EMBEDDING} of shape {:?} in {}",
                config_path.display(),
                config.vocab_size,
                embedding.shape,
                embedding.path.display()
            );
        }
        let vocab = read_hf_vocab(dir, config.vocab_size)?;
        let general = checkpoint
            .metadata()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix(GGUF_KEY_PREFIX)?;
                Some((key.to_string(), json_to_metadata(&serde_json::from_str(v).ok()?)?))
            })
            .collect();
        let mut tensors = Vec::new();
        for t in checkpoint.tensors() {
            if names::hf_is_ignored(t.name) {
                continue;
            }
            if let Some((prefix, part)) = packed::split_part(t.name) {
                let Some(format) = packing else {
                    bail!(
                        "{}: tensor {:?} is a packed GPTQ/AWQ tensor, but {} has no quantization_config",
                        t.path.display(),
                        t.name,
                        config_path.display()
                    );
                };
                if part != QWEIGHT {
                    if checkpoint.tensor(&format!("{prefix}.{QWEIGHT}")).is_none() {
                        bail!("{}: tensor {:?} has no {prefix}.{QWEIGHT} beside it", t.path.display(), t.name);
                    }
                    continue;
                }
                let hf_name = format!("{prefix}.weight");
                let gguf_name = names::hf_to_gguf(&hf_name)
                    .with_context(|| format!("{}: tensor {:?} has no GGUF name", t.path.display(), t.name))?;
                tensors.push(SourceTensor {
                    gguf_name,
                    hf_name: Some(hf_name),
                    shape: format.shape_of(&checkpoint, prefix)?.to_vec(),
                    storage: Storage::Packed(format),
                    file_name: prefix.to_string(),
                });
                continue;
            }
            let gguf_name = names::hf_to_gguf(t.name)
                .with_context(|| format!("{}: tensor {:?} has no GGUF name", t.path.display(), t.name))?;
            if t.shape.is_empty() || t.shape.len() > 4 {
                bail!("{}: tensor {:?} has unsupported rank {}", t.path.display(), t.name, t.shape.len());
            }
            tensors.push(SourceTensor {
                gguf_name,
                hf_name: Some(t.name.to_string()),
                shape: t.shape.to_vec(),
                storage: Storage::Safetensors(t.dtype),
                file_name: t.name.to_string(),
            });
        }
        if config.tie_word_embeddings {
            tensors.retain(|t| t.gguf_name != "output.weight");
        }
        // llama.cpp's converter writes tensors in the checkpoint's (name-sorted) order.
        tensors.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
        Self { path: dir.to_path_buf(), config, vocab, general, tensors, files: Files::Hf(checkpoint) }.checked()
    }

    /// Fails when a q/k projection's rows cannot be split into the config's heads of rotary pairs, which
    /// the row permutation between HF and GGUF order needs.
    fn checked(self) -> Result<Self> {
        for t in &self.tensors {
            let (Some(heads), Some(&rows)) = (self.qk_heads(t), t.shape.first()) else { continue };
            if rows % (2 * heads) != 0 {
                bail!(
                    "{}: tensor {} has {rows} rows, which do not split into {heads} heads of rotary pairs",
                    self.path.display(),
                    t.gguf_name
                );
            }
        }
        Ok(self)
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.files, Files::Gguf(_))
    }

    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.files {
            Files::Gguf(f) => Some(f),
            Files::Hf(_) => None,
        }
    }

    pub fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    pub fn tensor(&self, gguf_name: &str) -> Option<&SourceTensor> {
        self.tensors.iter().find(|t| t.gguf_name == gguf_name)
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| self.stored_bytes(t)).sum()
    }

    /// Bytes the tensor takes in its file(s).
    pub fn stored_bytes(&self, t: &SourceTensor) -> u64 {
        match (&self.files, t.storage) {
            (Files::Hf(c), Storage::Packed(f)) => f.stored_bytes(c, &t.file_name),
            _ => self.raw(t).len() as u64,
        }
    }

    /// The tensor's bytes as stored.
    ///
    /// # Panics
    /// For a [`Storage::Packed`] tensor, which has no bytes of its own: those are read through
    /// [`packed`](Self::packed) or decoded by the `load_*` methods.
    pub fn raw(&self, t: &SourceTensor) -> &[u8] {
        match &self.files {
            Files::Gguf(f) => f.tensor_data(f.tensor(&t.file_name).expect("listed tensors exist")),
            Files::Hf(_) if matches!(t.storage, Storage::Packed(_)) => {
                panic!("tensor {} is packed GPTQ/AWQ data, which has no raw bytes", t.gguf_name)
            }
            Files::Hf(c) => c.tensor(&t.file_name).expect("listed tensors exist").data,
        }
    }

    /// A packed GPTQ/AWQ linear's codes, true zero points, scales and groups, in HF row order.
    pub fn packed(&self, t: &SourceTensor) -> Result<UnpackedWeights> {
        match (&self.files, t.storage) {
            (Files::Hf(c), Storage::Packed(f)) => {
                f.load(c, &t.file_name).with_context(|| format!("{}: tensor {}", self.path.display(), t.gguf_name))
            }
            _ => bail!("{}: tensor {} is not a packed GPTQ/AWQ linear", self.path.display(), t.gguf_name),
        }
    }

    /// Decodes a tensor to f32 in the file's own row order.
    fn decode(&self, t: &SourceTensor) -> Result<Vec<f32>> {
        match &self.files {
            Files::Gguf(f) => Ok(f.dequantize(f.tensor(&t.file_name).expect("listed tensors exist"))?),
            Files::Hf(_) if matches!(t.storage, Storage::Packed(_)) => Ok(self.packed(t)?.dequantize()),
            Files::Hf(c) => Ok(c.tensor(&t.file_name).expect("listed tensors exist").to_f32()?),
        }
    }

    /// The tensor as f32 in GGUF row order (llama q/k rows interleaved).
    pub fn load_gguf_order(&self, t: &SourceTensor) -> Result<Vec<f32>> {
        let data = self.decode(t)?;
        Ok(match (&self.files, self.qk_heads(t)) {
            (Files::Hf(_), Some(heads)) => names::permute_rows_hf_to_gguf(&data, heads, row_len(t)),
            _ => data,
        })
    }

    /// The tensor as f32 in HF row order.
    pub fn load_hf_order(&self, t: &SourceTensor) -> Result<Vec<f32>> {
        let data = self.decode(t)?;
        Ok(match (&self.files, self.qk_heads(t)) {
            (Files::Gguf(_), Some(heads)) => names::permute_rows_gguf_to_hf(&data, heads, row_len(t)),
            _ => data,
        })
    }

    /// The tensor as f32 in HF row order, handed to `each` whole rows at a time (4 MiB of f32 per call,
    /// each chunk's mapped pages released once decoded), so a large tensor such as the embedding is never
    /// decoded, or resident, whole. Tensors whose HF row order differs from the file's (llama q/k) and
    /// packed linears come in one piece.
    pub fn for_each_hf_rows(&self, t: &SourceTensor, mut each: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let ty = match t.storage {
            Storage::Ggml(ty) => ty,
            Storage::Safetensors(Dtype::F32) => GgmlType::F32,
            Storage::Safetensors(Dtype::F16) => GgmlType::F16,
            Storage::Safetensors(Dtype::BF16) => GgmlType::BF16,
            _ => return each(&self.load_hf_order(t)?),
        };
        let (row, raw) = (row_len(t), self.raw(t));
        let row_bytes = ty.row_bytes(row as u64).unwrap_or(0) as usize;
        let rows = t.n_elements() / row;
        if t.shape.len() != 2
            || rows == 0
            || self.qk_heads(t).is_some()
            || row_bytes == 0
            || raw.len() != rows * row_bytes
        {
            // One piece; a malformed tensor fails there with the decoder's own error.
            return each(&self.load_hf_order(t)?);
        }
        let rows_per_call = (ROWS_CHUNK_VALUES / row).max(1);
        let mut values = vec![0f32; rows_per_call.min(rows) * row];
        for (i, bytes) in raw.chunks(rows_per_call * row_bytes).enumerate() {
            let values = &mut values[..bytes.len() / row_bytes * row];
            ty.dequantize(bytes, values)
                .map_err(|e| anyhow::anyhow!("{}: tensor {}: {e}", self.path.display(), t.gguf_name))?;
            let start = i * rows_per_call * row_bytes;
            self.release_part(t, start..start + bytes.len());
            each(values)?;
        }
        Ok(())
    }

    /// Lets the OS drop the tensor's mapped pages once it has been consumed.
    pub fn release(&self, t: &SourceTensor) {
        match &self.files {
            Files::Gguf(f) => f.release(f.tensor(&t.file_name).expect("listed tensors exist")),
            Files::Hf(c) => match t.storage {
                Storage::Packed(f) => f.release(c, &t.file_name),
                _ => c.release(&t.file_name),
            },
        }
    }

    /// [`release`](Self::release) for the bytes `part` of a tensor's [`raw`](Self::raw) data.
    fn release_part(&self, t: &SourceTensor, part: Range<usize>) {
        let part = part.start as u64..part.end as u64;
        match &self.files {
            Files::Gguf(f) => f.release_part(f.tensor(&t.file_name).expect("listed tensors exist"), part),
            Files::Hf(c) => c.release_part(&t.file_name, part),
        }
    }

    /// Heads to permute over when the tensor is a llama q/k projection (its rows differ between HF and GGUF order).
    pub fn qk_heads(&self, t: &SourceTensor) -> Option<usize> {
        if !self.config.arch.permutes_qk() {
            return None;
        }
        match names::qk_role(&t.gguf_name)? {
            QkRole::Query => Some(self.config.num_heads),
            QkRole::Key => Some(self.config.num_kv_heads),
        }
    }

    /// `general.*` keys as safetensors `__metadata__` entries.
    pub fn general_as_safetensors_metadata(&self) -> Vec<(String, String)> {
        self.general.iter().map(|(k, v)| (format!("{GGUF_KEY_PREFIX}{k}"), metadata_to_json(v).to_string())).collect()
    }
}

/// Values [`ModelSource::for_each_hf_rows`] decodes at a time.
const ROWS_CHUNK_VALUES: usize = 1 << 20;

fn row_len(t: &SourceTensor) -> usize {
    t.shape.iter().skip(1).product::<usize>().max(1)
}

fn read_hf_vocab(dir: &Path, vocab_size: usize) -> Result<Option<Vocab>> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Ok(None);
    }
    let read = |p: &Path| -> Result<Value> {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))
    };
    let tokenizer = read(&tok_path)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.exists() { read(&cfg_path)? } else { Value::Null };
    let vocab = Vocab::from_hf(&tokenizer, &cfg, Some(vocab_size)).with_context(|| format!("{}", dir.display()))?;
    Ok(Some(vocab))
}

/// A self-describing JSON form of a GGUF value: `{"type": id, "value": ...}` (arrays add `"elem"`).
fn metadata_to_json(v: &MetadataValue) -> Value {
    let value = match v {
        MetadataValue::U8(x) => json!(x),
        MetadataValue::I8(x) => json!(x),
        MetadataValue::U16(x) => json!(x),
        MetadataValue::I16(x) => json!(x),
        MetadataValue::U32(x) => json!(x),
        MetadataValue::I32(x) => json!(x),
        MetadataValue::F32(x) => json!(x),
        MetadataValue::Bool(x) => json!(x),
        MetadataValue::String(x) => json!(x),
        MetadataValue::U64(x) => json!(x),
        MetadataValue::I64(x) => json!(x),
        MetadataValue::F64(x) => json!(x),
        MetadataValue::Array(a) => {
            return json!({"type": ValueType::Array as u32, "elem": a.elem_type as u32,
                          "value": a.items.iter().map(metadata_to_json).collect::<Vec<_>>()})
        }
    };
    json!({"type": v.value_type() as u32, "value": value})
}

fn json_to_metadata(v: &Value) -> Option<MetadataValue> {
    let ty = ValueType::from_id(v["type"].as_u64()? as u32)?;
    let x = &v["value"];
    Some(match ty {
        ValueType::U8 => MetadataValue::U8(x.as_u64()?.try_into().ok()?),
        ValueType::I8 => MetadataValue::I8(x.as_i64()?.try_into().ok()?),
        ValueType::U16 => MetadataValue::U16(x.as_u64()?.try_into().ok()?),
        ValueType::I16 => MetadataValue::I16(x.as_i64()?.try_into().ok()?),
        ValueType::U32 => MetadataValue::U32(x.as_u64()?.try_into().ok()?),
        ValueType::I32 => MetadataValue::I32(x.as_i64()?.try_into().ok()?),
        ValueType::F32 => MetadataValue::F32(x.as_f64()? as f32),
        ValueType::Bool => MetadataValue::Bool(x.as_bool()?),
        ValueType::String => MetadataValue::String(x.as_str()?.to_string()),
        ValueType::U64 => MetadataValue::U64(x.as_u64()?),
        ValueType::I64 => MetadataValue::I64(x.as_i64()?),
        ValueType::F64 => MetadataValue::F64(x.as_f64()?),
        ValueType::Array => MetadataValue::Array(MetadataArray {
            elem_type: ValueType::from_id(v["elem"].as_u64()? as u32)?,
            items: x.as_array()?.iter().map(json_to_metadata).collect::<Option<Vec<_>>>()?,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_json_round_trip() {
        let values = [
            MetadataValue::String("SmolLM2".into()),
            MetadataValue::U32(7),
            MetadataValue::F32(0.5),
            MetadataValue::I64(-3),
            MetadataValue::Bool(true),
            MetadataValue::string_array(vec!["en", "fr"]),
        ];
        for v in values {
            assert_eq!(json_to_metadata(&metadata_to_json(&v)), Some(v));
        }
    }
}
