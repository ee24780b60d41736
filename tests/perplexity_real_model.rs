//! `qforge perplexity` on the real SmolLM2-135M fixture: the quantized file and its F32 exports (GGUF
//! and HF directory) hold the same weights, so they must score the same.

mod common;

use std::path::Path;

use common::{assert_clean_failure, fixture_model, qforge, qforge_ok, test_data};

fn perplexity(model: &Path, text: &Path) -> serde_json::Value {
    let out = qforge_ok(&[
        "perplexity",
        model.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--chunks",
        "2",
        "--json",
    ]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn quantized_file_and_its_f32_exports_score_the_same() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (hf, gguf) = (dir.path().join("hf"), dir.path().join("f32.gguf"));
    qforge_ok(&[
        "convert",
        fixture.to_str().unwrap(),
        "-o",
        hf.to_str().unwrap(),
        "--to",
        "safetensors",
        "--dtype",
        "f32",
    ]);
    qforge_ok(&["convert", hf.to_str().unwrap(), "-o", gguf.to_str().unwrap(), "--dtype", "f32"]);
    let text = test_data("wikitext-excerpt.txt");

    let quantized = perplexity(&fixture, &text);
    assert_eq!(quantized["chunks"], 2);
    assert_eq!(quantized["tokens_scored"], 2 * 63, "positions 64..126 of each chunk predict the next token");
    let ppl = quantized["ppl"].as_f64().unwrap();
    // A 135M model on encyclopedic text with 64 to 126 tokens of context: far better than chance
    // (49152) and not implausibly good.
    assert!((3.0..100.0).contains(&ppl), "PPL {ppl}");
    for (what, export) in [("F32 GGUF", &gguf), ("F32 HF directory", &hf)] {
        let other = perplexity(export, &text)["ppl"].as_f64().unwrap();
        assert!((other / ppl - 1.0).abs() < 1e-4, "{what}: PPL {other} vs {ppl} for the same weights");
    }
}

#[test]
fn unreadable_or_short_text_fails_cleanly() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.txt");
    let run = |text: &Path| {
        qforge(&["perplexity", fixture.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", "128"])
    };
    assert_clean_failure(&run(&missing), &missing, "cannot read");
    let short = test_data("wikitext-paragraph.txt");
    assert_clean_failure(&run(&short), &short, "needs at least 256");
}
