//! Shared by the merge-lora tests: adapters written from scratch and the reference arithmetic (f64,
//! straight from the definitions), both independent of qforge's merge code.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use formats::gguf::GgufFile;
use formats::safetensors::{Checkpoint, Dtype, TensorPlan, Writer};
use serde_json::Value;

/// A tensor to put in an adapter file.
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Tensor {
    pub fn new(name: impl Into<String>, shape: &[usize], values: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        Tensor { name: name.into(), shape: shape.to_vec(), values }
    }

    /// Deterministic values in [-scale, scale), different for every name.
    pub fn seeded(name: impl Into<String>, shape: &[usize], scale: f32) -> Tensor {
        let name = name.into();
        let values = seeded_values(&name, shape.iter().product(), scale);
        Tensor::new(name, shape, values)
    }
}

pub fn seeded_values(seed: &str, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Writes `adapter_config.json` and an F32 `adapter_model.safetensors`.
pub fn write_adapter(dir: &Path, config: &Value, tensors: &[Tensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    write_safetensors(dir, "adapter_model.safetensors", tensors);
}

/// Writes F32 `tensors` to `dir/file_name`.
pub fn write_safetensors(dir: &Path, file_name: &str, tensors: &[Tensor]) {
    let plan = tensors
        .iter()
        .map(|t| TensorPlan { name: t.name.clone(), dtype: Dtype::F32, shape: t.shape.clone() })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let scratch = dir.join(format!("{file_name}.writing"));
    let mut w = Writer::create(&scratch, plan, metadata, None).unwrap();
    for t in tensors {
        let bytes: Vec<u8> = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor(&t.name, &bytes).unwrap();
    }
    w.finish().unwrap();
    // The writer makes a model directory; only its weights file is wanted, under this name.
    std::fs::rename(scratch.join("model.safetensors"), dir.join(file_name)).unwrap();
    std::fs::remove_dir(&scratch).unwrap();
}

/// `scale · (B · A)` as `[out][in]`, with `a` = A `[rank, in]` and `b` = B `[out, rank]`.
pub fn lora_delta(a: &[f32], b: &[f32], rank: usize, scale: f64) -> Vec<f64> {
    let (n_in, n_out) = (a.len() / rank, b.len() / rank);
    let mut d = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        for i in 0..n_in {
            let dot: f64 = (0..rank).map(|k| b[o * rank + k] as f64 * a[k * n_in + i] as f64).sum();
            d[o * n_in + i] = scale * dot;
        }
    }
    d
}

pub fn transpose<T: Copy>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| m[r * cols + c])).collect()
}

/// `w + delta`, element-wise in f64.
pub fn plus(w: &[f32], delta: &[f64]) -> Vec<f64> {
    assert_eq!(w.len(), delta.len());
    w.iter().zip(delta).map(|(&w, &d)| w as f64 + d).collect()
}

/// HF row order -> llama.cpp row order, as llama.cpp's converter writes it:
/// `W.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2).reshape(W.shape)`.
pub fn llama_cpp_permute<T: Copy + Default>(w: &[T], heads: usize, cols: usize) -> Vec<T> {
    let rows = w.len() / cols;
    let half = rows / heads / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for pair in 0..2 {
            for i in 0..half {
                let src = h * 2 * half + pair * half + i;
                let dst = h * 2 * half + i * 2 + pair;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Every element within `1e-6 · max|want|` of the reference.
pub fn assert_close(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let max = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let tol = 1e-6 * max;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol, "{name}[{i}]: got {g}, reference {w} (tolerance {tol:e})");
    }
}

/// An HF checkpoint's tensor as f32, with its shape.
pub fn hf_tensor(dir: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let c = Checkpoint::open(dir).unwrap();
    let t = c.tensor(name).unwrap_or_else(|| panic!("{name} missing from {}", dir.display()));
    (t.shape.to_vec(), t.to_f32().unwrap())
}

/// A GGUF tensor decoded to f32 (GGUF element order).
pub fn gguf_tensor(file: &GgufFile, name: &str) -> Vec<f32> {
    file.dequantize(file.tensor(name).unwrap_or_else(|| panic!("{name} missing"))).unwrap()
}

/// Runs `qforge merge-lora ARGS --json` and returns the parsed summary, panicking with stderr on failure.
pub fn merge_json(args: &[&str]) -> (Value, String) {
    let out = merge(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "merge-lora {args:?} failed: {stderr}");
    (serde_json::from_slice(&out.stdout).expect("JSON summary"), stderr)
}

pub fn merge(args: &[&str]) -> Output {
    let mut all = vec!["merge-lora"];
    all.extend_from_slice(args);
    all.push("--json");
    crate::common::qforge(&all)
}

/// `name -> relative_delta` of the merged tensors in a summary.
pub fn merged_deltas(summary: &Value) -> BTreeMap<String, f64> {
    summary["merged"]
        .as_array()
        .expect("merged list")
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_string(), t["relative_delta"].as_f64().unwrap()))
        .collect()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
