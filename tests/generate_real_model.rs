//! `qforge generate` on the real SmolLM2-135M fixture: greedy decoding gives the well-known fact and the
//! same text at any thread count; sampling repeats for a seed; bad requests fail cleanly. (Greedy ids
//! against llama.cpp's are checked in tests/interop.rs.)

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_clean_failure, fixture_model, qforge, qforge_ok};

const PROMPT: &str = "The capital of France is";

fn generate(model: &Path, extra: &[&str]) -> String {
    let mut args = vec!["generate", model.to_str().unwrap(), "--prompt", PROMPT, "-n", "16"];
    args.extend_from_slice(extra);
    qforge_ok(&args)
}

fn generate_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    serde_json::from_str(&generate(model, &[extra, &["--json"][..]].concat())).unwrap()
}

#[test]
fn greedy_continuation_names_paris_at_any_thread_count() {
    let Some(fixture) = fixture_model() else { return };
    let one = generate(&fixture, &["--temp", "0", "--threads", "1"]);
    assert!(one.contains("Paris"), "{PROMPT:?} continued as {one:?}");
    assert_eq!(generate(&fixture, &["--temp", "0", "--threads", "2"]), one, "2 threads vs 1");

    let report = generate_json(&fixture, &["--temp", "0"]);
    assert_eq!(report["text"].as_str().unwrap().to_string() + "\n", one, "the JSON text is the streamed text");
    let ids = report["token_ids"].as_array().unwrap();
    assert_eq!(report["generated_tokens"], ids.len());
    assert!(ids.len() == 16 || report["stop"] == "end_of_generation", "{report}");
    assert_eq!(report["prompt_tokens"], 5, "SmolLM2 adds no BOS; the prompt is 5 words");
    assert!(report["prompt_tokens_per_second"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["generation_tokens_per_second"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn sampling_repeats_for_a_seed_and_varies_across_seeds() {
    let Some(fixture) = fixture_model() else { return };
    let sample = |seed: &str| generate_json(&fixture, &["--temp", "1.0", "--seed", seed])["token_ids"].clone();
    let first = sample("1");
    assert_eq!(sample("1"), first, "the same seed twice");
    assert_ne!(sample("2"), first, "another seed");
}

fn assert_bad_request(out: &Output, problem: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(problem), "error does not say {problem:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_requests_fail_cleanly() {
    let Some(fixture) = fixture_model() else { return };
    let model = fixture.to_str().unwrap();
    assert_bad_request(&qforge(&["generate", model, "--prompt", ""]), "--prompt is empty");
    assert_clean_failure(
        &qforge(&["generate", model, "--prompt", PROMPT, "-n", "0"]),
        &fixture,
        "-n must be at least 1",
    );
    for (flag, value) in [("--top-p", "0"), ("--top-p", "1.5"), ("--temp", "-1")] {
        let out = qforge(&["generate", model, "--prompt", PROMPT, &format!("{flag}={value}")]);
        assert_clean_failure(&out, &fixture, flag);
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    assert_clean_failure(&qforge(&["generate", missing.to_str().unwrap(), "--prompt", PROMPT]), &missing, "");
}
