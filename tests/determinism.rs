//! Every command's output is identical at any thread count and on every run: each step runs at
//! `--threads 1` and twice at `--threads 2` on the real fixture, and every output file must be
//! byte-identical to the first run's (perplexity: the bits of its `ppl`, not its timings).
//!
//! Steps feed each other (the HF export is converted to F16, which is quantized), so they run in order
//! in one test. A new command joins by one more `Step` in `steps()`. GPTQ and AWQ calibrate on the
//! committed text excerpt with 4 sequences of 64 tokens: their cost is the per-linear rounding, not the
//! calibration, and a few sequences already exercise the threaded activation and Hessian sums.

mod common;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use common::{fixture_model, qforge, shared_data, test_data};

const ADAPTER: &str = "adapters/smollm-135m-instruct-medical-r16";
/// (threads, repetition) of the runs compared.
const RUNS: [(usize, usize); 3] = [(1, 0), (2, 0), (2, 1)];

/// One command: its arguments without the output and thread options, the name of the output it writes
/// inside its run directory, and a JSON field of its stdout that must be identical too.
struct Step {
    name: &'static str,
    args: Vec<String>,
    output: &'static str,
    stdout_key: Option<&'static str>,
}

fn step(name: &'static str, args: &[&str], output: &'static str) -> Step {
    Step { name, args: args.iter().map(|s| s.to_string()).collect(), output, stdout_key: None }
}

fn steps(fixture: &str, adapter: &str, text: &str, first: &dyn Fn(&str) -> String) -> Vec<Step> {
    let (hf, f16) = (first("gguf-to-hf-f32"), first("hf-to-gguf-f16"));
    // IQ4_NL's scale search is slow: layers 3-29 get Q8_0 so that the step stays quick.
    let iq4_nl_rule = r"blk\.([3-9]|[12][0-9])\.=Q8_0";
    let calib = ["--calib", text, "--nsamples", "4", "--seqlen", "64"];
    let calibrated = |args: &[&'static str]| -> Vec<&str> { [&["quantize", f16.as_str()], args, &calib].concat() };
    vec![
        step("gguf-to-hf-f32", &["convert", fixture, "--dtype", "f32"], "hf"),
        step("hf-to-gguf-f16", &["convert", &hf, "--dtype", "f16"], "out.gguf"),
        step("quantize-Q8_0", &["quantize", &f16, "--type", "Q8_0"], "out.gguf"),
        step("quantize-Q4_K_M", &["quantize", &f16, "--type", "Q4_K_M"], "out.gguf"),
        step("quantize-Q3_K_M", &["quantize", &f16, "--type", "Q3_K_M"], "out.gguf"),
        step("quantize-IQ4_NL", &["quantize", &f16, "--type", "IQ4_NL", "--tensor-type", iq4_nl_rule], "out.gguf"),
        // The fixture's width (576) is not a multiple of the default group size (128).
        step("gptq-gptq", &calibrated(&["--method", "gptq", "--format", "gptq", "--group-size", "64"]), "hf"),
        step("awq-awq", &calibrated(&["--method", "awq", "--format", "awq", "--group-size", "64"]), "hf"),
        step("gptq-gguf-Q4_0", &calibrated(&["--method", "gptq", "--format", "gguf", "--type", "Q4_0"]), "out.gguf"),
        step("merge-lora", &["merge-lora", fixture, "--adapter", adapter], "out.gguf"),
        step("imatrix", &["imatrix", fixture, "--calib", text, "--ctx", "64", "--chunks", "2"], "out.gguf"),
        Step {
            stdout_key: Some("ppl"),
            ..step(
                "perplexity-and-logits",
                &["perplexity", fixture, "--text", text, "--ctx", "64", "--chunks", "2", "--json", "--top-k", "8"],
                "logits.bin",
            )
        },
    ]
}

/// The option that names a step's output.
fn output_flag(command: &str) -> &'static str {
    match command {
        "perplexity" => "--save-logits",
        _ => "-o",
    }
}

#[test]
fn every_output_is_identical_at_any_thread_count_and_run() {
    let (Some(fixture), Some(adapter_config)) =
        (fixture_model(), shared_data(&format!("{ADAPTER}/adapter_config.json")))
    else {
        return;
    };
    let adapter = adapter_config.parent().unwrap().to_path_buf();
    let text = test_data("wikitext-excerpt.txt");
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR")).join("determinism");
    let _ = std::fs::remove_dir_all(&scratch);
    let run_dir = |step: &str, threads: usize, rep: usize| scratch.join(format!("{step}-t{threads}-{rep}"));
    // Later steps read the first run's output of earlier ones.
    let first_outputs: std::collections::BTreeMap<&str, &str> =
        [("gguf-to-hf-f32", "hf"), ("hf-to-gguf-f16", "out.gguf")].into_iter().collect();
    let first = |name: &str| run_dir(name, RUNS[0].0, RUNS[0].1).join(first_outputs[name]).display().to_string();
    let (fixture, adapter, text) =
        (fixture.display().to_string(), adapter.display().to_string(), text.display().to_string());

    let steps = steps(&fixture, &adapter, &text, &first);
    for (done, step) in steps.iter().enumerate() {
        let mut reference: Option<(PathBuf, Option<String>)> = None;
        for (threads, rep) in RUNS {
            let dir = run_dir(step.name, threads, rep);
            std::fs::create_dir_all(&dir).unwrap();
            let output = dir.join(step.output);
            let mut args: Vec<&str> = step.args.iter().map(String::as_str).collect();
            let threads = threads.to_string();
            args.extend([output_flag(&step.args[0]), output.to_str().unwrap(), "--threads", &threads]);
            let out = qforge(&args);
            assert!(out.status.success(), "{}: {}", step.name, String::from_utf8_lossy(&out.stderr));
            let key = step.stdout_key.map(|k| {
                let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
                json[k].to_string()
            });
            match &reference {
                None => reference = Some((output, key)),
                Some((first_output, first_key)) => {
                    assert_eq!(&key, first_key, "{}: {:?} differs at --threads {threads}", step.name, step.stdout_key);
                    assert_same_tree(step.name, first_output, &output);
                    std::fs::remove_dir_all(&dir).unwrap();
                }
            }
        }
        // Keep the disk use to a model or two: drop first outputs that no later step reads.
        let later_args: Vec<&String> = steps[done + 1..].iter().flat_map(|s| &s.args).collect();
        for earlier in &steps[..=done] {
            let dir = run_dir(earlier.name, RUNS[0].0, RUNS[0].1);
            let output = dir.join(earlier.output).display().to_string();
            if dir.exists() && !later_args.iter().any(|a| **a == output) {
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `b` holds the same files as `a` (a file, or a directory of files), byte for byte.
fn assert_same_tree(step: &str, a: &Path, b: &Path) {
    if a.is_dir() {
        let names = |d: &Path| common::dir_entries(d);
        assert_eq!(names(a), names(b), "{step}: different files");
        for name in names(a) {
            assert_same_tree(step, &a.join(&name), &b.join(&name));
        }
        return;
    }
    assert!(same_bytes(a, b), "{step}: {} and {} differ", a.display(), b.display());
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ra, mut rb) = (BufReader::new(fa), BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = ra.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        rb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}
