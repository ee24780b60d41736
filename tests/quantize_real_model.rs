//! `quantize` on the real SmolLM2-135M fixture, from the F16 GGUF `qforge convert` makes of it.

mod common;
#[path = "common/quant_check.rs"]
mod quant_check;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, fixture_model, qforge, qforge_ok};
use formats::gguf::GgufFile;
use formats::GgmlType;
use quant_check::assert_file_within_bounds;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixture as an F16 GGUF (via an F16 HF directory, as a user would make one).
fn f16_gguf(dir: &Path) -> Option<PathBuf> {
    let fixture = fixture_model()?;
    let (hf, gguf) = (dir.join("hf"), dir.join("f16.gguf"));
    qforge_ok(&["convert", s(&fixture), "-o", s(&hf), "--to", "safetensors", "--dtype", "f16"]);
    qforge_ok(&["convert", s(&hf), "-o", s(&gguf), "--dtype", "f16"]);
    Some(gguf)
}

#[test]
fn q8_0_and_q4_0_round_trip_within_the_formats_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let Some(f16) = f16_gguf(dir.path()) else { return };
    let reference = GgufFile::open(&f16).unwrap();
    for (preset, ty, file_type) in [("Q8_0", GgmlType::Q8_0, 7), ("Q4_0", GgmlType::Q4_0, 2)] {
        let out = dir.path().join(format!("{preset}.gguf"));
        qforge_ok(&["quantize", s(&f16), "-o", s(&out), "--type", preset]);
        let q = GgufFile::open(&out).unwrap();
        assert_eq!(q.get("general.file_type").and_then(|v| v.as_u64()), Some(file_type));
        assert_eq!(q.tensors().len(), reference.tensors().len());
        for t in q.tensors() {
            let expected = match (t.dims.len(), t.name.as_str()) {
                (1, _) => GgmlType::F32,
                // The tied embedding is the output projection: Q6_K, whose 256-wide blocks do not fit
                // rows of 576, so Q8_0.
                (_, "token_embd.weight") => GgmlType::Q8_0,
                _ => ty,
            };
            assert_eq!(t.ggml_type, expected, "{preset} {}", t.name);
        }
        assert_file_within_bounds(&reference, &q);
        let data: u64 = q.tensors().iter().map(|t| t.n_bytes()).sum();
        assert!(std::fs::metadata(&out).unwrap().len() - data < 8 << 20, "header and padding only besides the data");
    }
}

#[test]
fn dry_run_lists_every_tensor_with_its_planned_type() {
    let Some(fixture) = fixture_model() else { return };
    let plan = qforge_ok(&["quantize", s(&fixture), "--type", "Q4_K_M", "--dry-run"]);
    let file = GgufFile::open(&fixture).unwrap();
    for t in file.tensors() {
        let line = plan
            .lines()
            .find(|l| l.contains(&format!(" {} ", t.name)))
            .unwrap_or_else(|| panic!("{}:\n{plan}", t.name));
        assert!(line.contains(&format!("{} -> ", t.ggml_type)), "{line}");
    }
    // ffn_down rows are 1536 = 6 x 256 wide: the only matrices where Q4_K_M's K types fit.
    let down0 = plan.lines().find(|l| l.contains("blk.0.ffn_down.weight")).unwrap();
    assert!(down0.contains("-> Q6_K"), "the first layers' ffn_down get more bits: {down0}");
    assert!(plan.lines().any(|l| l.starts_with("Q4_K_M: ")), "{plan}");
}

#[test]
fn the_quantized_fixture_needs_consent_to_be_requantized() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let refused = qforge(&["quantize", s(&fixture), "-o", s(&out), "--type", "Q8_0"]);
    assert_clean_failure(&refused, &fixture, "is already Q4_1");
    assert!(!out.exists());
}
