//! `quantize` and imatrix files against llama.cpp's own tools, on the real fixture.
//!
//! Runs only when `QFORGE_LLAMA_CPP_BIN` names a directory holding `llama-quantize` and `llama-imatrix`
//! (a llama.cpp build's `bin`); otherwise each test says it was skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_model, llama_tool, qforge_ok, shared_data};
use formats::gguf::GgufFile;
use qforge::quant::{Imatrix, Preset, QuantizeOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a llama.cpp tool, returning its stdout and stderr together.
fn run(tool: &Path, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().expect("llama.cpp tool runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {args:?} failed:\n{text}", tool.display());
    text
}

/// The fixture as an F16 GGUF, made with `qforge convert` (via an F16 HF directory).
fn f16_gguf(dir: &Path) -> Option<PathBuf> {
    let fixture = fixture_model()?;
    let (hf, gguf) = (dir.join("hf"), dir.join("f16.gguf"));
    qforge_ok(&["convert", s(&fixture), "-o", s(&hf), "--to", "safetensors", "--dtype", "f16"]);
    qforge_ok(&["convert", s(&hf), "-o", s(&gguf), "--dtype", "f16"]);
    Some(gguf)
}

/// (name, type) per tensor from llama-quantize's log lines
/// `[  7/ 272] blk.0.attn_v.weight - [ 576, 192, 1, 1], type = f16, size = ... (q8_0)`,
/// where the parenthesised type is the new one and its absence means the tensor is kept.
fn llama_plan(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter(|l| l.starts_with('[') && l.contains("], type = "))
        .map(|l| {
            let name = l.split("] ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
            let current = l.split("type = ").nth(1).unwrap().split(',').next().unwrap().trim();
            let new = l.trim_end().strip_suffix(')').and_then(|r| r.rsplit('(').next()).unwrap_or(current);
            (name, new.to_uppercase())
        })
        .collect()
}

#[test]
fn every_preset_plans_as_llama_quantize_does() {
    let Some(quantize) = llama_tool("llama-quantize") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(f16) = f16_gguf(dir.path()) else { return };
    for preset in Preset::all() {
        let theirs = llama_plan(&run(&quantize, &["--dry-run", s(&f16), preset.name()]));
        let ours: Vec<(String, String)> = qforge::quant::dry_run(&f16, &QuantizeOptions::new(preset))
            .unwrap()
            .steps
            .iter()
            .map(|st| (st.name.clone(), st.to.name().to_uppercase()))
            .collect();
        assert_eq!(ours, theirs, "{preset}");
    }
}

fn assert_same_tensors(ours: &Path, theirs: &Path) {
    let (a, b) = (GgufFile::open(ours).unwrap(), GgufFile::open(theirs).unwrap());
    assert_eq!(a.get("general.file_type"), b.get("general.file_type"));
    assert_eq!(a.tensors(), b.tensors(), "names, order, types, shapes and offsets of {}", ours.display());
    for t in a.tensors() {
        assert!(a.tensor_data(t) == b.tensor_data(t), "{}: {} differs", ours.display(), t.name);
    }
}

#[test]
fn quantized_tensors_are_byte_identical_to_llama_quantize() {
    let Some(quantize) = llama_tool("llama-quantize") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(f16) = f16_gguf(dir.path()) else { return };
    for preset in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"] {
        let (ours, theirs) =
            (dir.path().join(format!("ours-{preset}.gguf")), dir.path().join(format!("theirs-{preset}.gguf")));
        qforge_ok(&["quantize", s(&f16), "-o", s(&ours), "--type", preset]);
        run(&quantize, &[s(&f16), s(&theirs), preset, "2"]);
        assert_same_tensors(&ours, &theirs);
    }
}

#[test]
fn imatrix_files_interoperate_with_llama_cpp() {
    let (Some(imatrix_tool), Some(quantize)) = (llama_tool("llama-imatrix"), llama_tool("llama-quantize")) else {
        return;
    };
    let Some(text) = shared_data("wikitext-2/valid.txt") else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(f16) = f16_gguf(dir.path()) else { return };
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, &std::fs::read(&text).unwrap()[..40_000]).unwrap();
    let (gguf, dat) = (dir.path().join("imatrix.gguf"), dir.path().join("imatrix.dat"));
    let common_args = ["-m", s(&f16), "-f", s(&calib), "-c", "128", "--chunks", "4", "-t", "2"];
    run(&imatrix_tool, &[&common_args[..], &["-o", s(&gguf)]].concat());
    run(&imatrix_tool, &[&common_args[..], &["-o", s(&dat), "--output-format", "dat"]].concat());

    // Both layouts carry the same importance (the legacy one rounded through mean x ncall).
    let (from_gguf, from_dat) = (Imatrix::read(&gguf).unwrap(), Imatrix::read(&dat).unwrap());
    assert_eq!(from_gguf.entries.keys().collect::<Vec<_>>(), from_dat.entries.keys().collect::<Vec<_>>());
    assert!(from_gguf.entries.contains_key("blk.0.attn_q.weight"));
    for name in from_gguf.entries.keys() {
        let (a, b) = (from_gguf.importance(name).unwrap(), from_dat.importance(name).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-30), "{name}: {x} vs {y}");
        }
    }
    // Our legacy writer reproduces llama-imatrix's .dat from the same statistics.
    let ours_dat = dir.path().join("ours.dat");
    from_gguf.write_legacy(&ours_dat).unwrap();
    assert!(std::fs::read(&ours_dat).unwrap() == std::fs::read(&dat).unwrap(), "legacy .dat files differ");

    // Quantizing with either file, or with our GGUF rewrite of it, matches llama-quantize.
    let ours_gguf = dir.path().join("ours-imatrix.gguf");
    from_gguf.write_gguf(&ours_gguf).unwrap();
    for (i, imatrix) in [&gguf, &dat, &ours_gguf].into_iter().enumerate() {
        let (ours, theirs) = (dir.path().join(format!("ours-{i}.gguf")), dir.path().join(format!("theirs-{i}.gguf")));
        qforge_ok(&["quantize", s(&f16), "-o", s(&ours), "--type", "Q4_K_M", "--imatrix", s(imatrix)]);
        run(&quantize, &["--imatrix", s(imatrix), s(&f16), s(&theirs), "Q4_K_M", "2"]);
        assert_same_tensors(&ours, &theirs);
    }
}
