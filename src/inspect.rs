//! `qforge inspect`: what a GGUF file or safetensors checkpoint holds, read from headers only.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use formats::gguf::{GgufFile, MetadataValue};
use formats::safetensors::Checkpoint;
use serde::Serialize;

use crate::model::packed::{self, PackedFormat};
use crate::model::ModelConfig;

#[derive(Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// Outermost first, as HF and PyTorch print shapes.
    pub shape: Vec<u64>,
    pub bytes: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct TypeSummary {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    pub bits_per_weight: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub format: &'static str,
    pub architecture: Option<String>,
    pub parameters: u64,
    pub tensor_bytes: u64,
    pub bits_per_weight: f64,
    pub by_type: BTreeMap<String, TypeSummary>,
    /// Scalar values as they are; arrays summarised as `[N x TYPE]`.
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub tensors: Vec<TensorRow>,
}

pub fn inspect(path: &Path) -> Result<Report> {
    let is_gguf = path.is_file()
        && path.extension().and_then(|e| e.to_str()) != Some("safetensors")
        && path.extension().and_then(|e| e.to_str()) != Some("json");
    let (format, architecture, metadata, tensors): (_, _, _, Vec<TensorRow>) = if is_gguf {
        let file = GgufFile::open(path)?;
        let metadata = file.metadata().iter().map(|(k, v)| (k.clone(), summarize(v))).collect();
        let tensors = file
            .tensors()
            .iter()
            .map(|t| TensorRow {
                name: t.name.clone(),
                ty: t.ggml_type.name().to_string(),
                shape: t.dims.iter().rev().copied().collect(),
                bytes: t.n_bytes(),
            })
            .collect();
        ("gguf", file.architecture().map(str::to_string), metadata, tensors)
    } else {
        let checkpoint = Checkpoint::open(path)?;
        let dir =
            if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
        let config_path = dir.join("config.json");
        let mut metadata: BTreeMap<String, serde_json::Value> = checkpoint
            .metadata()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let architecture = if config_path.exists() {
            let config = ModelConfig::from_config_json(&config_path)?;
            metadata.insert("config.json".into(), config.to_hf_json("-"));
            Some(config.arch.hf_class().to_string())
        } else {
            None
        };
        let packing = if path.is_dir() { PackedFormat::from_dir(&dir)? } else { None };
        let mut tensors = Vec::new();
        for t in checkpoint.tensors() {
            match (packing, packed::split_part(t.name)) {
                // A packed linear is one row (its logical shape and all its parts' bytes) under its
                // packing's name, so parameter counts and bits per weight stay those of the model.
                (Some(p), Some((prefix, packed::QWEIGHT))) => tensors.push(TensorRow {
                    name: prefix.to_string(),
                    ty: p.name().to_string(),
                    shape: p.shape_of(&checkpoint, prefix)?.iter().map(|&d| d as u64).collect(),
                    bytes: p.stored_bytes(&checkpoint, prefix),
                }),
                (Some(_), Some(_)) => {}
                _ => tensors.push(TensorRow {
                    name: t.name.to_string(),
                    ty: t.dtype.name().to_string(),
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    bytes: t.data.len() as u64,
                }),
            }
        }
        ("safetensors", architecture, metadata, tensors)
    };
    let mut by_type: BTreeMap<String, TypeSummary> = BTreeMap::new();
    for t in &tensors {
        let s = by_type.entry(t.ty.clone()).or_default();
        s.tensors += 1;
        s.parameters += t.shape.iter().product::<u64>();
        s.bytes += t.bytes;
    }
    for s in by_type.values_mut() {
        s.bits_per_weight = bits(s.bytes, s.parameters);
    }
    let parameters = by_type.values().map(|s| s.parameters).sum();
    let tensor_bytes = by_type.values().map(|s| s.bytes).sum();
    Ok(Report {
        path: path.display().to_string(),
        format,
        architecture,
        parameters,
        tensor_bytes,
        bits_per_weight: bits(tensor_bytes, parameters),
        by_type,
        metadata,
        tensors,
    })
}

fn bits(bytes: u64, parameters: u64) -> f64 {
    if parameters == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / parameters as f64
    }
}

fn summarize(v: &MetadataValue) -> serde_json::Value {
    use serde_json::json;
    match v {
        MetadataValue::Array(a) => json!(format!("[{} x {:?}]", a.items.len(), a.elem_type)),
        MetadataValue::String(s) => json!(s),
        MetadataValue::Bool(b) => json!(b),
        other => other
            .as_i64()
            .map(|x| json!(x))
            .or_else(|| other.as_u64().map(|x| json!(x)))
            .unwrap_or_else(|| json!(other.as_f64())),
    }
}

impl Report {
    /// The human-readable form.
    pub fn render(&self, with_tensors: bool) -> Result<String> {
        use std::fmt::Write;
        let mut s = String::new();
        writeln!(s, "{} ({})", self.path, self.format)?;
        writeln!(s, "architecture: {}", self.architecture.as_deref().unwrap_or("-"))?;
        writeln!(s, "parameters:   {} ({:.2} M)", self.parameters, self.parameters as f64 / 1e6)?;
        writeln!(s, "tensor data:  {} bytes, {:.3} bits/weight", self.tensor_bytes, self.bits_per_weight)?;
        writeln!(s, "\n{:<8} {:>8} {:>14} {:>14} {:>9}", "type", "tensors", "parameters", "bytes", "bits/w")?;
        for (ty, t) in &self.by_type {
            writeln!(s, "{:<8} {:>8} {:>14} {:>14} {:>9.3}", ty, t.tensors, t.parameters, t.bytes, t.bits_per_weight)?;
        }
        writeln!(s, "\nmetadata:")?;
        for (k, v) in &self.metadata {
            let text = match v {
                serde_json::Value::String(x) => x.clone(),
                other => other.to_string(),
            };
            let one_line: String = text.replace('\n', "\\n").chars().take(100).collect();
            writeln!(s, "  {k} = {one_line}")?;
        }
        if with_tensors {
            writeln!(s, "\n{:<48} {:<8} {:>20} {:>12}", "tensor", "type", "shape", "bytes")?;
            for t in &self.tensors {
                let shape = format!("{:?}", t.shape);
                writeln!(s, "{:<48} {:<8} {:>20} {:>12}", t.name, t.ty, shape, t.bytes)?;
            }
        }
        Ok(s)
    }
}
