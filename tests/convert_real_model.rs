//! `convert` and `inspect` on the real SmolLM2-135M fixture.

mod common;

use std::collections::BTreeMap;

use common::{fixture_model, qforge_ok};
use formats::gguf::GgufFile;
use half::f16;

/// Keys that describe the file's storage, which a conversion legitimately changes.
const STORAGE_KEYS: &[&str] = &["general.file_type", "general.quantization_version"];

fn metadata_without_storage_keys(f: &GgufFile) -> BTreeMap<String, String> {
    f.metadata()
        .iter()
        .filter(|(k, _)| !STORAGE_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect()
}

fn round_trip(dtype: &str) -> Option<(GgufFile, GgufFile, tempfile::TempDir)> {
    let fixture = fixture_model()?;
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let gguf = dir.path().join("back.gguf");
    let (hf_s, gguf_s, fixture_s) = (hf.to_str().unwrap(), gguf.to_str().unwrap(), fixture.to_str().unwrap());
    qforge_ok(&["convert", fixture_s, "-o", hf_s, "--to", "safetensors", "--dtype", dtype]);
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"] {
        assert!(hf.join(f).exists(), "{f} missing from the HF export");
    }
    qforge_ok(&["convert", hf_s, "-o", gguf_s, "--to", "gguf", "--dtype", dtype]);
    Some((GgufFile::open(&fixture).unwrap(), GgufFile::open(&gguf).unwrap(), dir))
}

#[test]
fn f32_round_trip_is_bit_identical_to_the_dequantized_fixture() {
    let Some((original, back, _dir)) = round_trip("f32") else { return };
    assert_eq!(metadata_without_storage_keys(&original), metadata_without_storage_keys(&back));
    let names = |f: &GgufFile| f.tensors().iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&original), names(&back), "tensor order differs from llama.cpp's");
    for t in original.tensors() {
        let b = back.tensor(&t.name).unwrap();
        assert_eq!(t.dims, b.dims, "{}", t.name);
        assert_eq!(b.ggml_type, formats::GgmlType::F32, "{}", t.name);
        let (x, y) = (original.dequantize(t).unwrap(), back.dequantize(b).unwrap());
        assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{} differs", t.name);
    }
}

#[test]
fn f16_round_trip_equals_f16_rounding_of_the_fixture() {
    let Some((original, back, _dir)) = round_trip("f16") else { return };
    assert_eq!(metadata_without_storage_keys(&original), metadata_without_storage_keys(&back));
    for t in original.tensors() {
        let b = back.tensor(&t.name).unwrap();
        let expected_type = if t.dims.len() == 1 { formats::GgmlType::F32 } else { formats::GgmlType::F16 };
        assert_eq!(b.ggml_type, expected_type, "{}", t.name);
        let (x, y) = (original.dequantize(t).unwrap(), back.dequantize(b).unwrap());
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(f16::from_f32(*a).to_f32().to_bits(), b.to_bits(), "{}: {a} -> {b}", t.name);
        }
    }
}

#[test]
fn inspect_reports_what_llama_cpp_reports() {
    let Some(fixture) = fixture_model() else { return };
    let json: serde_json::Value =
        serde_json::from_str(&qforge_ok(&["inspect", fixture.to_str().unwrap(), "--json"])).unwrap();
    // llama.cpp's llama_model_n_params and per-type counts for this file
    // (shared/research/llama_cpp_anchor.md).
    assert_eq!(json["parameters"], 134_515_008u64);
    assert_eq!(json["architecture"], "llama");
    assert_eq!(json["by_type"]["Q4_1"]["tensors"], 210);
    assert_eq!(json["by_type"]["Q8_0"]["tensors"], 1);
    assert_eq!(json["by_type"]["F32"]["tensors"], 61);
    let text = qforge_ok(&["inspect", fixture.to_str().unwrap(), "--tensors"]);
    assert!(text.contains("blk.29.ffn_down.weight"), "{text}");
}
