//! `quantize` on tiny synthetic Llama, Mistral and Qwen2 checkpoints: round trips within the formats'
//! error bounds, HF and GGUF inputs agreeing, thread-count independence, and the clean failures.

mod common;
#[path = "common/quant_check.rs"]
mod quant_check;
#[path = "common/synthetic.rs"]
mod synthetic;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{assert_clean_failure, qforge, qforge_ok};
use formats::gguf::GgufFile;
use formats::safetensors::{Dtype, TensorPlan, Writer};
use formats::GgmlType;
use qforge::quant::{Imatrix, ImatrixEntry};
use quant_check::assert_file_within_bounds;
use synthetic::TinyModel;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    hf: PathBuf,
    /// The same checkpoint converted to an F32 GGUF: the reference values in GGUF row order.
    reference: PathBuf,
}

fn fixture(model: &TinyModel) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let hf = root.join("hf");
    model.write_hf(&hf, Dtype::F32, None);
    let reference = root.join("f32.gguf");
    qforge_ok(&["convert", s(&hf), "-o", s(&reference), "--dtype", "f32"]);
    Fixture { _dir: dir, root, hf, reference }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn quantize(input: &Path, output: &Path, preset: &str, extra: &[&str]) {
    let mut args = vec!["quantize", s(input), "-o", s(output), "--type", preset];
    args.extend(extra);
    qforge_ok(&args);
}

#[test]
fn tiny_models_round_trip_within_the_formats_bounds() {
    for (arch, tied) in [("LlamaForCausalLM", true), ("MistralForCausalLM", false), ("Qwen2ForCausalLM", false)] {
        let mut model = TinyModel::new(arch);
        model.tied = tied;
        let f = fixture(&model);
        let reference = GgufFile::open(&f.reference).unwrap();
        for preset in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "F16"] {
            let out = f.root.join(format!("{preset}.gguf"));
            quantize(&f.hf, &out, preset, &[]);
            let q = GgufFile::open(&out).unwrap();
            let names = |g: &GgufFile| {
                let mut v: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
                v.sort();
                v
            };
            assert_eq!(names(&q), names(&reference), "{arch} {preset}");
            assert_file_within_bounds(&reference, &q);
            for t in q.tensors().iter().filter(|t| t.dims.len() == 1) {
                assert_eq!(t.ggml_type, GgmlType::F32, "{arch} {preset} {}", t.name);
            }
            let file_type = q.get("general.file_type").and_then(|v| v.as_u64());
            let expected = qforge::quant::Preset::from_name(preset).unwrap().file_type();
            assert_eq!(file_type, Some(expected.into()), "{arch} {preset}");
        }
    }
}

#[test]
fn hf_and_gguf_inputs_give_the_same_tensors() {
    let f = fixture(&TinyModel::new("LlamaForCausalLM"));
    let (from_hf, from_gguf) = (f.root.join("a.gguf"), f.root.join("b.gguf"));
    quantize(&f.hf, &from_hf, "Q4_0", &[]);
    quantize(&f.reference, &from_gguf, "Q4_0", &[]);
    let (a, b) = (GgufFile::open(&from_hf).unwrap(), GgufFile::open(&from_gguf).unwrap());
    assert_eq!(a.tensors(), b.tensors(), "names, order, types and offsets");
    for t in a.tensors() {
        assert_eq!(a.tensor_data(t), b.tensor_data(b.tensor(&t.name).unwrap()), "{}", t.name);
    }
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let f = fixture(&TinyModel::new("MistralForCausalLM"));
    let (one, two) = (f.root.join("1.gguf"), f.root.join("2.gguf"));
    quantize(&f.hf, &one, "Q4_1", &["--threads", "1"]);
    quantize(&f.hf, &two, "Q4_1", &["--threads", "2"]);
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&two).unwrap());
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let model = TinyModel::new("LlamaForCausalLM");
    let f = fixture(&model);
    let before = common::dir_entries(&f.root);
    let plan = qforge_ok(&["quantize", s(&f.hf), "--type", "Q4_K_M", "--dry-run"]);
    assert_eq!(common::dir_entries(&f.root), before);
    let lines: Vec<&str> = plan.lines().collect();
    assert_eq!(lines.len(), model.tensors().len() + 2, "one line per tensor, the totals, the fallbacks:\n{plan}");
    for (hf_name, _) in model.tensors() {
        let name = qforge::model::names::hf_to_gguf(&hf_name).unwrap();
        assert_eq!(lines.iter().filter(|l| l.contains(&format!(" {name} "))).count(), 1, "{name}:\n{plan}");
    }
    // 32-wide rows cannot hold Q4_K's 256-value blocks.
    let q = lines.iter().find(|l| l.contains("blk.0.attn_q.weight")).unwrap();
    assert!(q.contains("F32 -> Q5_0") && q.contains("Q4_K does not fit rows of 32"), "{q}");
    assert!(lines[lines.len() - 2].starts_with("Q4_K_M: "), "{plan}");
}

/// Rewrites the checkpoint's weights with `bad` as the first value of `poisoned`.
fn poison(model: &TinyModel, hf: &Path, poisoned: &str, bad: f32) {
    let tensors = model.tensors();
    let plan =
        tensors.iter().map(|(n, s)| TensorPlan { name: n.clone(), dtype: Dtype::F32, shape: s.clone() }).collect();
    let mut w = Writer::create(hf, plan, BTreeMap::new(), None).unwrap();
    for (name, shape) in &tensors {
        let mut v = TinyModel::values(name, shape.iter().product());
        if name == poisoned {
            v[0] = bad;
        }
        w.write_tensor(name, &synthetic::encode(&v, Dtype::F32)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn non_finite_weights_are_a_clean_error_naming_the_tensor() {
    let model = TinyModel::new("LlamaForCausalLM");
    for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let f = fixture(&model);
        poison(&model, &f.hf, "model.layers.1.mlp.up_proj.weight", bad);
        let out = f.root.join("q.gguf");
        let result = qforge(&["quantize", s(&f.hf), "-o", s(&out), "--type", "Q8_0"]);
        assert_clean_failure(&result, &f.hf, "tensor 'blk.1.ffn_up.weight'");
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains(shown) && stderr.contains("row 0, column 0"), "{stderr}");
        assert!(!out.exists(), "no partial output");
        assert!(
            common::dir_entries(&f.root).iter().all(|e| !e.starts_with(".qforge-tmp")),
            "temporary file left behind"
        );
    }
}

#[test]
fn requantizing_needs_consent() {
    let f = fixture(&TinyModel::new("MistralForCausalLM"));
    let (q4, q8) = (f.root.join("q4.gguf"), f.root.join("q8.gguf"));
    quantize(&f.hf, &q4, "Q4_0", &[]);
    let refused = qforge(&["quantize", s(&q4), "-o", s(&q8), "--type", "Q8_0"]);
    assert_clean_failure(&refused, &q4, "--allow-requantize");
    assert!(!q8.exists());
    let allowed = qforge(&["quantize", s(&q4), "-o", s(&q8), "--type", "Q8_0", "--allow-requantize"]);
    assert!(allowed.status.success(), "{}", String::from_utf8_lossy(&allowed.stderr));
    assert!(String::from_utf8_lossy(&allowed.stderr).contains("warning"), "requantizing warns");
    // The same type again is a copy, not a requantization: no consent needed, bytes unchanged.
    let same = f.root.join("same.gguf");
    quantize(&q4, &same, "Q4_0", &[]);
    let (a, b) = (GgufFile::open(&q4).unwrap(), GgufFile::open(&same).unwrap());
    for t in a.tensors() {
        assert_eq!(a.tensor_data(t), b.tensor_data(b.tensor(&t.name).unwrap()), "{}", t.name);
    }
}

#[test]
fn types_qforge_cannot_encode_are_refused_before_writing() {
    let f = fixture(&TinyModel::new("LlamaForCausalLM"));
    let out = f.root.join("q.gguf");
    let ty = GgmlType::all()
        .find(|t| t.block_size() == 32 && t.traits().quantize.is_none())
        .expect("a type with 32-wide blocks and no encoder");
    let rule = format!("attn_q={ty}");
    let result = qforge(&["quantize", s(&f.hf), "-o", s(&out), "--type", "Q8_0", "--tensor-type", &rule]);
    assert_clean_failure(&result, &f.hf, &format!("cannot encode {ty} yet"));
    assert!(!out.exists());
}

#[test]
fn an_imatrix_lowers_the_weighted_error() {
    let model = TinyModel::new("MistralForCausalLM");
    let f = fixture(&model);
    let reference = GgufFile::open(&f.reference).unwrap();
    // One heavily weighted column in every eight, a different one per tensor.
    let mut imatrix =
        Imatrix { datasets: vec!["synthetic".into()], chunk_count: 1, chunk_size: 8, ..Imatrix::default() };
    for (i, t) in reference.tensors().iter().filter(|t| t.dims.len() == 2).enumerate() {
        let sums = (0..t.dims[0]).map(|c| if (c as usize + i).is_multiple_of(8) { 100.0 } else { 0.01 }).collect();
        imatrix.entries.insert(t.name.clone(), ImatrixEntry { sums, counts: vec![1] });
    }
    let imatrix_path = f.root.join("imatrix.gguf");
    imatrix.write_gguf(&imatrix_path).unwrap();
    let (plain, weighted) = (f.root.join("plain.gguf"), f.root.join("weighted.gguf"));
    quantize(&f.hf, &plain, "Q4_0", &[]);
    quantize(&f.hf, &weighted, "Q4_0", &["--imatrix", s(&imatrix_path)]);
    let (plain, weighted) = (GgufFile::open(&plain).unwrap(), GgufFile::open(&weighted).unwrap());
    assert_eq!(
        weighted.get("quantize.imatrix.file").and_then(|v| v.as_str()),
        Some(s(&imatrix_path)),
        "the imatrix is recorded as llama-quantize records it"
    );
    let weighted_error = |q: &GgufFile| -> f64 {
        let mut total = 0.0;
        for (name, entry) in &imatrix.entries {
            let x = reference.dequantize(reference.tensor(name).unwrap()).unwrap();
            let y = q.dequantize(q.tensor(name).unwrap()).unwrap();
            let w = &entry.sums;
            total += x
                .iter()
                .zip(&y)
                .enumerate()
                .map(|(i, (a, b))| (w[i % w.len()] * (a - b) * (a - b)) as f64)
                .sum::<f64>();
        }
        total
    };
    let (e_plain, e_weighted) = (weighted_error(&plain), weighted_error(&weighted));
    assert!(e_weighted < 0.9 * e_plain, "weighted {e_weighted} vs plain {e_plain}");
}
