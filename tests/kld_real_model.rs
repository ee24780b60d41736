//! `qforge perplexity --baseline/--baseline-logits/--save-logits` on the real SmolLM2-135M fixture:
//! the fixture against its own F32 export (same weights: no divergence), against a Q4_0 quantization
//! (a real one), and the stored-logits paths against the direct comparison.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, fixture_model, qforge, qforge_ok, test_data};

const CTX: &str = "128";

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qforge perplexity MODEL` on the excerpt at ctx 128 (3 chunks) with `extra` flags, as JSON.
fn perplexity(model: &Path, extra: &[&str]) -> serde_json::Value {
    let text = test_data("wikitext-excerpt.txt");
    let args = [&["perplexity", path_str(model), "--text", path_str(&text), "--ctx", CTX, "--json"], extra].concat();
    serde_json::from_str(&qforge_ok(&args)).unwrap()
}

fn f64_at(v: &serde_json::Value, pointer: &str) -> f64 {
    v.pointer(pointer).and_then(|x| x.as_f64()).unwrap_or_else(|| panic!("{pointer} missing in {v}"))
}

/// The fixture's F32 GGUF export and its Q4_0 quantization, in `dir`.
fn exports(fixture: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let (f32, q4_0) = (dir.join("f32.gguf"), dir.join("q4_0.gguf"));
    qforge_ok(&["convert", path_str(fixture), "-o", path_str(&f32), "--to", "gguf", "--dtype", "f32"]);
    qforge_ok(&["quantize", path_str(&f32), "-o", path_str(&q4_0), "--type", "Q4_0"]);
    (f32, q4_0)
}

#[test]
fn same_weights_agree_and_a_quantization_diverges() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (f32, q4_0) = exports(&fixture, dir.path());

    let same = perplexity(&f32, &["--baseline", path_str(&fixture)]);
    assert_eq!(same["tokens_scored"], 3 * 63);
    let kld_same = f64_at(&same, "/kld/value");
    assert!(kld_same.abs() < 1e-4, "KLD {kld_same} between a model and its F32 export");
    assert!(f64_at(&same, "/top1/value") > 0.995, "{same}");

    let quant = perplexity(&q4_0, &["--baseline", path_str(&fixture)]);
    let kld = f64_at(&quant, "/kld/value");
    assert!(kld > 1e-3 && kld > 10.0 * kld_same, "{quant}");
    assert!(f64_at(&quant, "/kld_max") >= f64_at(&quant, "/kld_p99"));
    assert!(f64_at(&quant, "/kld_p99") >= f64_at(&quant, "/kld_median"));
    assert!(f64_at(&quant, "/top1/value") < 1.0);
    let ratio = f64_at(&quant, "/ppl/value") / f64_at(&quant, "/ppl_base/value");
    assert!((f64_at(&quant, "/ppl_ratio/value") / ratio - 1.0).abs() < 1e-9);
    let alone = perplexity(&fixture, &[]);
    assert!((f64_at(&quant, "/ppl_base/value") / f64_at(&alone, "/ppl") - 1.0).abs() < 1e-6, "the baseline's PPL");
}

#[test]
fn stored_logits_give_the_direct_comparison() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, q4_0) = exports(&fixture, dir.path());
    let (full, top_k) = (dir.path().join("base.kld"), dir.path().join("base.topk"));
    let saved = perplexity(&fixture, &["--save-logits", path_str(&full)]);
    perplexity(&fixture, &["--save-logits", path_str(&top_k), "--top-k", "32"]);
    assert!(std::fs::metadata(&top_k).unwrap().len() * 100 < std::fs::metadata(&full).unwrap().len());

    let direct = perplexity(&q4_0, &["--baseline", path_str(&fixture)]);
    let from_full = perplexity(&q4_0, &["--baseline-logits", path_str(&full)]);
    let from_top_k = perplexity(&q4_0, &["--baseline-logits", path_str(&top_k)]);
    assert!((f64_at(&direct, "/ppl_base/value") / f64_at(&saved, "/ppl") - 1.0).abs() < 1e-6);
    let kld = f64_at(&direct, "/kld/value");
    // The full form rounds the baseline's log-probs to 16 bits (about 1e-4 nats).
    assert!((f64_at(&from_full, "/kld/value") / kld - 1.0).abs() < 0.01, "{from_full} vs {direct}");
    assert!((f64_at(&from_full, "/ppl_ratio/value") / f64_at(&direct, "/ppl_ratio/value") - 1.0).abs() < 1e-3);
    assert!((f64_at(&from_full, "/top1/value") - f64_at(&direct, "/top1/value")).abs() <= 1.0 / 189.0);
    // The top-k form keeps the next token's log-prob and the argmax exactly, and bounds the KLD below.
    let kld_top_k = f64_at(&from_top_k, "/kld/value");
    assert!(kld_top_k <= kld * (1.0 + 1e-6) && kld_top_k > 0.5 * kld, "top-32 KLD {kld_top_k} vs {kld}");
    assert_eq!(from_top_k["top1"], direct["top1"]);
    assert!((f64_at(&from_top_k, "/ppl_ratio/value") / f64_at(&direct, "/ppl_ratio/value") - 1.0).abs() < 1e-5);
    assert!((f64_at(&from_top_k, "/p_diff_rms/value") / f64_at(&direct, "/p_diff_rms/value") - 1.0).abs() < 1e-4);
}

#[test]
fn saved_logits_are_identical_at_any_thread_count() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let text = test_data("wikitext-excerpt.txt");
    let save = |name: &str, threads: &str| {
        let out = dir.path().join(name);
        let args = ["perplexity", path_str(&fixture), "--text", path_str(&text), "--ctx", CTX, "--chunks", "2"];
        qforge_ok(&[&args[..], &["--save-logits", path_str(&out), "--top-k", "8", "--threads", threads]].concat());
        std::fs::read(out).unwrap()
    };
    assert!(save("one.topk", "1") == save("two.topk", "2"), "bytes differ between 1 and 2 threads");
}

#[test]
fn mismatched_baselines_fail_cleanly() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let text = test_data("wikitext-excerpt.txt");
    let full = dir.path().join("base.kld");
    perplexity(&fixture, &["--save-logits", path_str(&full)]);
    let run = |text: &Path, extra: &[&str]| {
        qforge(&[&["perplexity", path_str(&fixture), "--text", path_str(text)], extra].concat())
    };

    let truncated = dir.path().join("truncated.kld");
    let bytes = std::fs::read(&full).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    assert_clean_failure(&run(&text, &["--baseline-logits", path_str(&truncated)]), &truncated, "truncated");
    assert_clean_failure(
        &run(&text, &["--baseline-logits", path_str(&full), "--ctx", "64"]),
        &full,
        "made with a context of 128 tokens",
    );

    // The same text with one word changed in the second chunk.
    let other = dir.path().join("other.txt");
    let original = std::fs::read_to_string(&text).unwrap();
    let cut = original.len() / 2 + original.as_bytes()[original.len() / 2..].iter().position(|&b| b == b' ').unwrap();
    std::fs::write(&other, format!("{} zebra{}", &original[..cut], &original[cut..])).unwrap();
    assert_clean_failure(&run(&other, &["--baseline-logits", path_str(&full)]), &full, "tokens differ");

    // A well-formed llama.cpp file over a 100-token vocabulary.
    let small = dir.path().join("small-vocab.kld");
    let mut header = b"_logits_".to_vec();
    [8i32, 100, 1].iter().for_each(|n| header.extend_from_slice(&n.to_le_bytes()));
    header.resize(header.len() + 8 * 4 + 3 * (100 + 4) * 2, 0);
    std::fs::write(&small, header).unwrap();
    assert_clean_failure(&run(&text, &["--baseline-logits", path_str(&small)]), &small, "vocabulary of 100");

    // An HF export whose tokenizer spells one token differently.
    let hf = dir.path().join("hf");
    qforge_ok(&["convert", path_str(&fixture), "-o", path_str(&hf), "--to", "safetensors", "--dtype", "f16"]);
    let tokenizer_path = hf.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer_path).unwrap()).unwrap();
    let vocab = tokenizer.pointer_mut("/model/vocab").unwrap().as_object_mut().unwrap();
    let name = vocab.iter().find(|(_, id)| id.as_u64() == Some(1000)).map(|(k, _)| k.clone()).unwrap();
    vocab.remove(&name);
    vocab.insert("renamed-token".into(), 1000.into());
    std::fs::write(&tokenizer_path, tokenizer.to_string()).unwrap();
    assert_clean_failure(&run(&text, &["--ctx", CTX, "--baseline", path_str(&hf)]), &hf, "must share a tokenizer");
}
