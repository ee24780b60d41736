//! llama.cpp's LoRA GGUF: a GGUF file with `general.type = "adapter"`, `adapter.type = "lora"` and
//! `adapter.lora.alpha`, holding for each adapted base tensor `NAME` a pair `NAME.lora_a` / `NAME.lora_b`.
//!
//! In GGUF dim order `lora_a` is `[in, r]` and `lora_b` is `[r, out]`, so read row-major they are PEFT's
//! `A [r, in]` and `B [out, r]`. `token_embd.weight` is the exception llama.cpp makes for embeddings:
//! its `lora_a` is stored transposed (`[r, n_vocab]` in GGUF order, i.e. `Aᵀ` row-major). llama.cpp
//! scales a pair by `alpha / r`, with `r` the first GGUF dim of `lora_b` (and by 1 when alpha is 0).

use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, MetadataValue, TensorInfo};
use crate::GgmlType;

pub const GENERAL_TYPE_KEY: &str = "general.type";
pub const GENERAL_TYPE: &str = "adapter";
pub const ADAPTER_TYPE_KEY: &str = "adapter.type";
pub const ADAPTER_TYPE: &str = "lora";
pub const ALPHA_KEY: &str = "adapter.lora.alpha";
pub const A_SUFFIX: &str = ".lora_a";
pub const B_SUFFIX: &str = ".lora_b";
/// Base tensors whose `lora_a` llama.cpp stores transposed.
pub const TRANSPOSED_A: &[&str] = &["token_embd.weight"];

/// The adapter's metadata: `general.architecture` is the base model's GGUF architecture.
pub fn metadata(architecture: &str, alpha: f32) -> Vec<(String, MetadataValue)> {
    vec![
        ("general.architecture".into(), MetadataValue::String(architecture.into())),
        (GENERAL_TYPE_KEY.into(), MetadataValue::String(GENERAL_TYPE.into())),
        (ADAPTER_TYPE_KEY.into(), MetadataValue::String(ADAPTER_TYPE.into())),
        (ALPHA_KEY.into(), MetadataValue::F32(alpha)),
    ]
}

pub fn a_name(base: &str) -> String {
    format!("{base}{A_SUFFIX}")
}

pub fn b_name(base: &str) -> String {
    format!("{base}{B_SUFFIX}")
}

/// Whether an opened GGUF says it is an adapter.
pub fn is_adapter(file: &GgufFile) -> bool {
    file.get(GENERAL_TYPE_KEY).and_then(MetadataValue::as_str) == Some(GENERAL_TYPE)
}

/// The `lora_a` / `lora_b` tensors of one base tensor.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// The base tensor's GGUF name.
    pub base: String,
    pub a: TensorInfo,
    pub b: TensorInfo,
    /// `lora_a` holds `Aᵀ` ([`TRANSPOSED_A`]).
    pub a_transposed: bool,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.b.dims[0] as usize
    }

    /// The adapted base tensor's shape, outermost first (`[out, in]`; `[n_vocab, dim]` for embeddings).
    pub fn base_shape(&self) -> [usize; 2] {
        let (inner, outer) =
            if self.a_transposed { (self.b.dims[1], self.a.dims[1]) } else { (self.a.dims[0], self.b.dims[1]) };
        [outer as usize, inner as usize]
    }
}

pub struct LoraGguf {
    pub file: GgufFile,
    pub architecture: String,
    pub alpha: f32,
    pub pairs: Vec<LoraPair>,
    /// Tensors that are neither half of a pair.
    pub unrecognized: Vec<String>,
}

impl LoraGguf {
    pub fn open(path: impl AsRef<Path>) -> Result<LoraGguf> {
        Self::from_file(GgufFile::open(path)?)
    }

    pub fn from_file(file: GgufFile) -> Result<LoraGguf> {
        let fail = |msg: String| Error::invalid(file.path(), msg);
        let text = |key: &str| file.get(key).and_then(MetadataValue::as_str).unwrap_or("");
        if !is_adapter(&file) {
            return Err(fail(format!(
                "not a LoRA adapter: {GENERAL_TYPE_KEY} is {:?}, not {GENERAL_TYPE:?}",
                text(GENERAL_TYPE_KEY)
            )));
        }
        if text(ADAPTER_TYPE_KEY) != ADAPTER_TYPE {
            return Err(Error::unsupported(
                file.path(),
                format!(
                    "{ADAPTER_TYPE_KEY} is {:?}; qforge reads {ADAPTER_TYPE:?} adapters only",
                    text(ADAPTER_TYPE_KEY)
                ),
            ));
        }
        let architecture = text("general.architecture").to_string();
        // llama.cpp reads a missing alpha as 0 (scale 1).
        let alpha = match file.get(ALPHA_KEY) {
            None => 0.0,
            Some(v) => {
                v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| fail(format!("{ALPHA_KEY} is not a number")))? as f32
            }
        };
        let mut pairs = Vec::new();
        let mut unrecognized = Vec::new();
        for t in file.tensors() {
            if let Some(base) = t.name.strip_suffix(A_SUFFIX) {
                let b = file
                    .tensor(&b_name(base))
                    .ok_or_else(|| fail(format!("tensor '{}' has no matching '{}'", t.name, b_name(base))))?;
                pairs.push(pair(&file, base, t, b)?);
            } else if let Some(base) = t.name.strip_suffix(B_SUFFIX) {
                if file.tensor(&a_name(base)).is_none() {
                    return Err(fail(format!("tensor '{}' has no matching '{}'", t.name, a_name(base))));
                }
            } else {
                unrecognized.push(t.name.clone());
            }
        }
        Ok(LoraGguf { file, architecture, alpha, pairs, unrecognized })
    }

    /// `lora_a` and `lora_b` as f32, row-major in GGUF order: `(A or Aᵀ, B)`.
    pub fn load(&self, pair: &LoraPair) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.file.dequantize(&pair.a)?, self.file.dequantize(&pair.b)?))
    }
}

fn pair(file: &GgufFile, base: &str, a: &TensorInfo, b: &TensorInfo) -> Result<LoraPair> {
    let fail = |msg: String| Error::invalid(file.path(), msg);
    for t in [a, b] {
        if !matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(Error::unsupported(
                file.path(),
                format!("tensor '{}' is {}; LoRA tensors must be F32, F16 or BF16", t.name, t.ggml_type),
            ));
        }
        if t.dims.len() != 2 {
            return Err(fail(format!("tensor '{}' has {} dimensions; LoRA tensors have 2", t.name, t.dims.len())));
        }
    }
    let a_transposed = TRANSPOSED_A.contains(&base);
    let a_rank = if a_transposed { a.dims[0] } else { a.dims[1] };
    if a_rank != b.dims[0] || b.dims[0] == 0 {
        return Err(fail(format!(
            "'{}' (dims {:?}) and '{}' (dims {:?}) disagree on the rank",
            a.name, a.dims, b.name, b.dims
        )));
    }
    Ok(LoraPair { base: base.to_string(), a: a.clone(), b: b.clone(), a_transposed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, TensorPlan};

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn write(path: &Path, metadata: &[(String, MetadataValue)], tensors: &[(&str, Vec<u64>)]) {
        let plan = tensors
            .iter()
            .map(|(n, d)| TensorPlan { name: n.to_string(), dims: d.clone(), ggml_type: GgmlType::F32 })
            .collect();
        let mut w = GgufWriter::create(path, metadata, plan).unwrap();
        for (n, d) in tensors {
            let count = d.iter().product::<u64>() as usize;
            w.write_tensor(n, &f32_bytes(&(0..count).map(|i| i as f32).collect::<Vec<_>>())).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn pairs_are_found_with_their_rank_and_base_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        write(
            &path,
            &metadata("llama", 16.0),
            &[
                ("blk.0.attn_q.weight.lora_a", vec![8, 4]),
                ("blk.0.attn_q.weight.lora_b", vec![4, 6]),
                ("token_embd.weight.lora_a", vec![4, 10]),
                ("token_embd.weight.lora_b", vec![4, 8]),
                ("blk.0.attn_norm.weight", vec![8]),
            ],
        );
        let lora = LoraGguf::open(&path).unwrap();
        assert_eq!((lora.architecture.as_str(), lora.alpha), ("llama", 16.0));
        assert_eq!(lora.unrecognized, vec!["blk.0.attn_norm.weight".to_string()]);
        let q = &lora.pairs[0];
        assert_eq!(
            (q.base.as_str(), q.rank(), q.base_shape(), q.a_transposed),
            ("blk.0.attn_q.weight", 4, [6, 8], false)
        );
        let e = &lora.pairs[1];
        assert_eq!(
            (e.base.as_str(), e.rank(), e.base_shape(), e.a_transposed),
            ("token_embd.weight", 4, [10, 8], true)
        );
        let (a, b) = lora.load(q).unwrap();
        assert_eq!((a.len(), b.len(), a[9]), (32, 24, 9.0));
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn broken_adapters_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let cases: [(Vec<(String, MetadataValue)>, Vec<(&str, Vec<u64>)>, &str); 4] = [
            (
                vec![("general.type".into(), MetadataValue::String("model".into()))],
                vec![("x", vec![4])],
                "not a LoRA adapter",
            ),
            (metadata("llama", 1.0), vec![("blk.0.attn_q.weight.lora_a", vec![8, 4])], "no matching"),
            (metadata("llama", 1.0), vec![("blk.0.attn_q.weight.lora_b", vec![4, 6])], "no matching"),
            (
                metadata("llama", 1.0),
                vec![("blk.0.attn_q.weight.lora_a", vec![8, 4]), ("blk.0.attn_q.weight.lora_b", vec![3, 6])],
                "rank",
            ),
        ];
        for (meta, tensors, problem) in cases {
            write(&path, &meta, &tensors);
            let err = LoraGguf::open(&path).err().expect("error").to_string();
            assert!(err.contains(problem) && err.contains("a.gguf"), "{err}");
        }
    }
}
