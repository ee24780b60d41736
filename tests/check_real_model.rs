//! `qforge check` on the real SmolLM2-135M fixture: a Q4_0 quantization judged against the fixture
//! passes loose thresholds (exit 0) and fails a tight one (exit 1), with its JSON and JUnit reports;
//! usage and input errors exit 2.

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_clean_failure, fixture_model, qforge, qforge_ok, test_data};

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qforge check` of `model` against `base` on the excerpt (ctx 128, 2 chunks), with `extra` flags.
fn check(model: &Path, base: &Path, extra: &[&str]) -> Output {
    let text = test_data("wikitext-excerpt.txt");
    let args = ["check", path_str(model), "--baseline", path_str(base), "--text", path_str(&text)];
    qforge(&[&args[..], &["--ctx", "128", "--chunks", "2"], extra].concat())
}

#[test]
fn thresholds_decide_the_exit_code_and_reports() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let q4_0 = dir.path().join("q4_0.gguf");
    qforge_ok(&["quantize", path_str(&fixture), "-o", path_str(&q4_0), "--type", "Q4_0", "--allow-requantize"]);
    let (json_path, junit_path) = (dir.path().join("report.json"), dir.path().join("junit.xml"));
    let files = ["--json-report", path_str(&json_path), "--junit", path_str(&junit_path)];

    let loose = ["--max-ppl-increase", "1000%", "--max-kld", "10", "--min-top1", "0.1"];
    let out = check(&q4_0, &fixture, &[&loose[..], &files].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("check passed") && stdout.contains("kld"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["pass"], true);
    assert_eq!(report["verdicts"].as_array().unwrap().len(), 3);
    let kld = report.pointer("/report/kld/value").and_then(|v| v.as_f64()).unwrap();
    assert!(kld > 0.0, "{report}");
    let junit = std::fs::read_to_string(&junit_path).unwrap();
    assert!(junit.starts_with("<?xml") && junit.contains("<testsuite") && junit.trim_end().ends_with("</testsuite>"));
    assert_eq!((junit.matches("<testcase").count(), junit.matches("<failure").count()), (3, 0), "{junit}");

    // Just under the measured KLD: only that threshold fails.
    let tight = format!("{}", kld * 0.99);
    let out = check(
        &q4_0,
        &fixture,
        &[&["--max-kld", &tight, "--min-top1", "0", "--max-ppl-increase", "10"], &files[..], &["--json"]].concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(printed, written);
    assert_eq!(written["pass"], false);
    let failed: Vec<&str> = written["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["pass"] == false)
        .map(|v| v["metric"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["kld"]);
    let junit = std::fs::read_to_string(&junit_path).unwrap();
    assert_eq!((junit.matches("<testcase").count(), junit.matches("<failure").count()), (3, 1), "{junit}");
    assert!(junit.contains("failures=\"1\""), "{junit}");
}

#[test]
fn usage_and_input_errors_exit_2() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let text = test_data("wikitext-excerpt.txt");
    let out = qforge(&["check", path_str(&fixture), "--text", path_str(&text)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--baseline"));

    let out = check(&fixture, &fixture, &["--max-ppl-increase", "two percent"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects the value");

    let missing = dir.path().join("missing.kld");
    let args = ["check", path_str(&fixture), "--baseline-logits", path_str(&missing), "--text", path_str(&text)];
    assert_clean_failure(&qforge(&args), &missing, "cannot open");
}
