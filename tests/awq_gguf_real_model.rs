//! `qforge quantize --method awq --format gguf` on the real SmolLM2 fixture, with a small calibration
//! sample: the AWQ-folded model written in the preset's block types loads and scores like the plain
//! preset, its norms carry the folded scales, and the bytes do not depend on the thread count.

mod common;

use std::path::Path;

use common::{fixture_model, qforge_ok, test_data};
use formats::gguf::GgufFile;

fn awq_q4_0(fixture: &Path, out: &Path, threads: &str) {
    qforge_ok(&[
        "--threads",
        threads,
        "quantize",
        fixture.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--method",
        "awq",
        "--type",
        "Q4_0",
        "--nsamples",
        "8",
        "--seqlen",
        "128",
        "--group-size",
        "64",
        "--allow-requantize",
    ]);
}

fn ppl(model: &Path) -> f64 {
    let text = test_data("wikitext-excerpt.txt");
    let args = ["perplexity", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", "128"];
    let out = qforge_ok(&[&args[..], &["--chunks", "2", "--json"]].concat());
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json["ppl"].as_f64().unwrap()
}

fn values(file: &GgufFile, name: &str) -> Vec<f32> {
    file.dequantize(file.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"))).unwrap()
}

#[test]
fn awq_into_q4_0_loads_scores_like_plain_q4_0_and_is_deterministic() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (one, two, plain) = (dir.path().join("t1.gguf"), dir.path().join("t2.gguf"), dir.path().join("plain.gguf"));
    awq_q4_0(&fixture, &one, "1");
    awq_q4_0(&fixture, &two, "2");
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(), "bytes differ at 1 and 2 threads");

    let (awq, source) = (GgufFile::open(&one).unwrap(), GgufFile::open(&fixture).unwrap());
    assert_eq!(awq.tensor("blk.0.attn_q.weight").unwrap().ggml_type, formats::GgmlType::Q4_0);
    assert_eq!(awq.tensor("blk.0.attn_norm.weight").unwrap().ggml_type, formats::GgmlType::F32);
    let (folded, original) = (values(&awq, "blk.0.attn_norm.weight"), values(&source, "blk.0.attn_norm.weight"));
    assert_eq!(folded.len(), original.len());
    assert!(folded.iter().zip(&original).any(|(a, b)| a != b), "attn_norm is not folded");
    assert_eq!(values(&awq, "output_norm.weight"), values(&source, "output_norm.weight"));

    qforge_ok(&[
        "quantize",
        fixture.to_str().unwrap(),
        "-o",
        plain.to_str().unwrap(),
        "--type",
        "Q4_0",
        "--allow-requantize",
    ]);
    let (awq_ppl, plain_ppl) = (ppl(&one), ppl(&plain));
    assert!(awq_ppl.is_finite(), "AWQ PPL {awq_ppl}");
    // The same grid with better-placed scales: near the plain preset, not a broken model.
    assert!((awq_ppl / plain_ppl - 1.0).abs() < 0.15, "AWQ PPL {awq_ppl} vs plain Q4_0 {plain_ppl}");
}
