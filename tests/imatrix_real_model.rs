//! `qforge imatrix` on the real SmolLM2-135M fixture: what the file holds, the first layer's sums
//! recomputed from the weights, its effect on `qforge quantize`, bad input, and, when
//! `QFORGE_LLAMA_CPP_BIN` names a llama.cpp build's `bin` directory, llama-imatrix's own numbers.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_clean_failure, fixture_model, llama_tool, qforge, qforge_ok, test_data};
use formats::gguf::GgufFile;
use formats::GgmlType;
use qforge::model::ModelSource;
use qforge::quant::Imatrix;

const CTX: usize = 128;
const CHUNKS: usize = 2;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qforge imatrix` over the committed wikitext excerpt, two chunks of 128 tokens.
fn imatrix(model: &Path, out: &Path, extra: &[&str]) {
    let text = test_data("wikitext-excerpt.txt");
    let (ctx, chunks) = (CTX.to_string(), CHUNKS.to_string());
    let args = ["imatrix", s(model), "--calib", s(&text), "--ctx", &ctx, "--chunks", &chunks, "-o", s(out)];
    qforge_ok(&[&args[..], extra].concat());
}

/// Names of the fixture's 2-D block weights: what llama-imatrix collects by default.
fn block_matrices(model: &Path) -> Vec<String> {
    let file = GgufFile::open(model).unwrap();
    let mut names: Vec<String> = file
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.dims.len() == 2)
        .map(|t| t.name.clone())
        .collect();
    names.sort();
    names
}

#[test]
fn every_block_weight_gets_an_entry_the_same_at_any_thread_count() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (one, two, dat) = (dir.path().join("t1.gguf"), dir.path().join("t2.gguf"), dir.path().join("m.dat"));
    imatrix(&fixture, &one, &["--threads", "1"]);
    imatrix(&fixture, &two, &["--threads", "2"]);
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(), "1 and 2 threads write different files");

    let m = Imatrix::read(&one).unwrap();
    let names = block_matrices(&fixture);
    assert_eq!(names.len(), 210, "30 blocks of 7 matrices");
    assert_eq!(m.entries.keys().cloned().collect::<Vec<_>>(), names, "no output head, no token embedding");
    assert_eq!((m.chunk_count, m.chunk_size), (CHUNKS as u32, CTX as u32));
    assert_eq!(m.datasets, [test_data("wikitext-excerpt.txt").display().to_string()]);
    for (name, e) in &m.entries {
        assert_eq!(e.counts, [(CHUNKS * CTX) as u64], "{name}: every token of every chunk");
        assert!(e.sums.iter().all(|v| v.is_finite() && *v > 0.0), "{name}: sums of squares are positive");
    }
    for l in 0..30 {
        let sums = |w: &str| &m.entries[&format!("blk.{l}.{w}.weight")].sums;
        assert_eq!(sums("attn_q"), sums("attn_k"), "block {l}: q and k see the same input");
        assert_eq!(sums("attn_q"), sums("attn_v"), "block {l}: q and v see the same input");
        assert_eq!(sums("ffn_gate"), sums("ffn_up"), "block {l}: gate and up see the same input");
        assert_ne!(sums("attn_q"), sums("ffn_up"), "block {l}: the MLP sees the attention's output too");
    }

    // The legacy layout carries the same importance.
    imatrix(&fixture, &dat, &["--format", "dat"]);
    let legacy = Imatrix::read(&dat).unwrap();
    assert_eq!(legacy.chunk_count, CHUNKS as u32);
    for name in m.entries.keys() {
        let (a, b) = (m.importance(name).unwrap(), legacy.importance(name).unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-6 * x), "{name}");
    }
}

/// The first block's q/k/v input is the normalized token embedding, so its sums follow from the
/// weights alone.
#[test]
fn first_block_sums_match_the_normalized_embeddings() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    imatrix(&fixture, &out, &[]);
    let m = Imatrix::read(&out).unwrap();

    let source = ModelSource::open(&fixture).unwrap();
    let (tokens, bos) = qforge::eval::perplexity::tokenize(&source, &test_data("wikitext-excerpt.txt")).unwrap();
    let file = GgufFile::open(&fixture).unwrap();
    let tensor = |name: &str| file.dequantize(file.tensors().iter().find(|t| t.name == name).unwrap()).unwrap();
    let (embd, norm) = (tensor("token_embd.weight"), tensor("blk.0.attn_norm.weight"));
    let eps = source.config.rms_norm_eps as f64;
    let width = norm.len();
    let mut want = vec![0f64; width];
    for chunk in tokens.chunks_exact(CTX).take(CHUNKS) {
        for (pos, &token) in chunk.iter().enumerate() {
            let token = if pos == 0 { bos.unwrap_or(token) } else { token };
            let x = &embd[token as usize * width..][..width];
            let mean_square = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
            let scale = 1.0 / (mean_square + eps).sqrt();
            want.iter_mut()
                .zip(x.iter().zip(&norm))
                .for_each(|(s, (&v, &g))| *s += (v as f64 * scale * g as f64).powi(2));
        }
    }
    for w in ["attn_q", "attn_k", "attn_v"] {
        let got = &m.entries[&format!("blk.0.{w}.weight")].sums;
        for (i, (g, x)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 / x - 1.0).abs() < 1e-3, "blk.0.{w} column {i}: {g} vs {x}");
        }
    }
}

#[test]
fn quantize_uses_the_importance_on_exactly_the_tensors_it_covers() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let imatrix_file = dir.path().join("m.gguf");
    imatrix(&fixture, &imatrix_file, &[]);
    let (plain, weighted) = (dir.path().join("plain.gguf"), dir.path().join("weighted.gguf"));
    let args = ["quantize", s(&fixture), "--type", "Q4_K_M", "--allow-requantize", "-o"];
    qforge_ok(&[&args[..], &[s(&plain)]].concat());
    qforge_ok(&[&args[..], &[s(&weighted), "--imatrix", s(&imatrix_file)]].concat());

    // 576-wide rows are not whole K-quant blocks, so Q4_K_M falls back to Q5_0 for most matrices
    // (Q8_0 for some attn_v); only the 1536-wide ffn_down rows take Q4_K/Q6_K. Q8_0 ignores
    // importance, as llama.cpp's does.
    let covered = Imatrix::read(&imatrix_file).unwrap();
    let (a, b) = (GgufFile::open(&plain).unwrap(), GgufFile::open(&weighted).unwrap());
    assert_eq!(a.tensors(), b.tensors(), "the same plan either way");
    let mut k_quants = 0;
    for t in a.tensors() {
        let same = a.tensor_data(t) == b.tensor_data(t);
        let uses_importance = covered.entries.contains_key(&t.name) && t.ggml_type != GgmlType::Q8_0;
        assert_eq!(!same, uses_importance, "{} ({}): changed {}", t.name, t.ggml_type.name(), !same);
        k_quants += usize::from(!same && t.ggml_type.name().ends_with("_K"));
    }
    assert_eq!(k_quants, 30, "every ffn_down");
}

#[test]
fn bad_input_fails_cleanly() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let run = |model: &Path, text: &Path, ctx: &str| {
        qforge(&["imatrix", s(model), "--calib", s(text), "--ctx", ctx, "-o", s(&out)])
    };
    let missing = dir.path().join("missing.txt");
    assert_clean_failure(&run(&fixture, &missing, "128"), &missing, "cannot read");
    let short = test_data("wikitext-paragraph.txt");
    assert_clean_failure(&run(&fixture, &short, "128"), &short, "needs at least 256");
    let no_model = dir.path().join("missing.gguf");
    assert_clean_failure(&run(&no_model, &short, "128"), &no_model, "cannot open");
    let err = run(&fixture, &short, "8");
    assert_eq!(err.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&err.stderr).contains("--ctx 8 is too short"));
    assert!(!out.exists(), "no file is written on failure");
    let text = test_data("wikitext-excerpt.txt");
    let unwritable = dir.path().join("no-such-dir").join("m.gguf");
    let err = qforge(&["imatrix", s(&fixture), "--calib", s(&text), "--ctx", "128", "-o", s(&unwritable)]);
    assert_clean_failure(&err, &unwritable, "");
    let same = qforge(&["imatrix", s(&fixture), "--calib", s(&text), "-o", s(&fixture)]);
    assert_clean_failure(&same, &fixture, "");
}

/// On the fixture's F32 export, with llama.cpp's attention kept in f32 (no flash attention, F32 KV
/// cache), the two runtimes feed every linear layer the same activations up to rounding.
#[test]
fn matches_llama_imatrix_on_the_f32_export() {
    let Some(tool) = llama_tool("llama-imatrix") else { return };
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let f32_gguf = dir.path().join("f32.gguf");
    qforge_ok(&["convert", s(&fixture), "-o", s(&f32_gguf), "--to", "gguf", "--dtype", "f32"]);
    let (ours, theirs) = (dir.path().join("ours.gguf"), dir.path().join("theirs.gguf"));
    imatrix(&f32_gguf, &ours, &[]);
    let text = test_data("wikitext-excerpt.txt");
    let (ctx, chunks) = (CTX.to_string(), CHUNKS.to_string());
    let args = ["-m", s(&f32_gguf), "-f", s(&text), "-c", &ctx, "--chunks", &chunks, "-t", "2"];
    let args = [&args[..], &["-fa", "off", "-ctk", "f32", "-ctv", "f32", "--no-ppl", "-o", s(&theirs)]].concat();
    let out = Command::new(&tool).args(&args).output().expect("llama-imatrix runs");
    assert!(out.status.success(), "llama-imatrix failed: {}", String::from_utf8_lossy(&out.stderr));

    let (a, b) = (Imatrix::read(&ours).unwrap(), Imatrix::read(&theirs).unwrap());
    assert_eq!(a.entries.keys().collect::<Vec<_>>(), b.entries.keys().collect::<Vec<_>>());
    assert_eq!((a.chunk_count, a.chunk_size, &a.datasets), (b.chunk_count, b.chunk_size, &b.datasets));
    for (name, ea) in &a.entries {
        let eb = &b.entries[name];
        assert_eq!(ea.counts, eb.counts, "{name}");
        for (i, (x, y)) in ea.sums.iter().zip(&eb.sums).enumerate() {
            assert!((x / y - 1.0).abs() < 1e-3, "{name} column {i}: ours {x}, llama-imatrix {y}");
        }
    }
}
