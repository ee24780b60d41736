//! `qforge quantize --method/--format` refuses what it cannot do with one clear error line naming the
//! flag or file, exit code 2, and no output: impossible method/format pairs, GGUF presets with packed
//! formats, unsupported bit widths and group sizes, calibration text shorter than one sequence, and
//! architectures outside the llama family.

mod common;

use std::path::Path;

use common::{assert_clean_failure, fixture_model, qforge};
use formats::gguf::{GgufWriter, MetadataValue};

/// Runs `qforge quantize INPUT -o OUT ARGS` and checks it failed cleanly, saying `problem` and naming
/// `named` (a flag or a path), with nothing written at `OUT`.
fn refuses(input: &Path, args: &[&str], named: &str, problem: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut all = vec!["quantize", input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    all.extend_from_slice(args);
    assert_clean_failure(&qforge(&all), Path::new(named), problem);
    assert!(!out.exists(), "{args:?} left {} behind", out.display());
    assert_eq!(common::dir_entries(dir.path()), Vec::<String>::new(), "{args:?} left temporary files");
}

#[test]
fn impossible_requests_are_refused_before_the_model_is_read() {
    // No model is opened for these, so a missing input shows the flags are checked first.
    let input = Path::new("no-such-model.gguf");
    refuses(input, &["--method", "gptq", "--format", "awq"], "--method gptq", "cannot write --format awq");
    refuses(input, &["--method", "awq", "--format", "gptq"], "--method awq", "cannot write --format gptq");
    refuses(input, &["--format", "gptq", "--type", "Q4_0"], "--type Q4_0", "--format gptq takes --bits");
    refuses(input, &["--method", "gptq", "--bits", "5"], "--bits", "5-bit quantization is not supported");
    refuses(input, &["--format", "gptq", "--bits", "1"], "--bits", "GPTQ supports 2, 3, 4 and 8 bits");
    refuses(input, &["--method", "awq", "--bits", "3"], "--bits 3", "4-bit weights only");
    refuses(input, &["--format", "awq", "--bits", "8"], "--bits 8", "4-bit weights only");
    refuses(input, &["--method", "gptq", "--group-size", "96"], "--group-size", "group size 96 is not supported");
    refuses(input, &["--method", "gptq", "--group-size", "0"], "--group-size 0", "use -1");
    refuses(input, &["--format", "awq", "--group-size", "-1"], "--group-size -1", "needs groups");
    refuses(input, &["--method", "gptq", "--static-groups", "--group-size", "-1"], "--static-groups", "group size");
    refuses(input, &["--method", "rtn"], "--method rtn", "needs --type");
    refuses(input, &["--format", "gguf"], "--format gguf", "needs --type");
    refuses(input, &["--format", "gptq", "--calib", "x.txt"], "--calib", "--method rtn uses none");
    refuses(input, &["--format", "awq", "--nsamples", "4"], "--nsamples", "--method rtn uses none");
    refuses(input, &["--method", "awq", "--damp", "0.1"], "--damp", "--method gptq only");
    refuses(input, &["--format", "gptq", "--act-order"], "--act-order", "--method gptq only");
    refuses(input, &["--type", "Q4_0", "--bits", "4"], "--bits", "the preset (--type) decides");
    refuses(input, &["--method", "gptq", "--type", "Q4_K_M", "--sym"], "--sym", "the preset (--type) decides");
    refuses(input, &["--method", "awq", "--type", "Q4_0", "--bits", "4"], "--bits", "the preset (--type) decides");
    refuses(input, &["--method", "awq", "--type", "Q4_0", "--group-size", "-1"], "--group-size -1", "need groups");
    refuses(input, &["--method", "gptq", "--damp", "1.5"], "--damp", "outside [0, 1)");
}

#[test]
fn a_group_size_that_does_not_divide_the_width_names_the_model_and_the_flag() {
    let Some(fixture) = fixture_model() else { return };
    for method in ["rtn", "gptq", "awq"] {
        let args = ["--method", method, "--format", if method == "gptq" { "gptq" } else { "awq" }];
        refuses(&fixture, &args, &fixture.display().to_string(), "--group-size");
        refuses(&fixture, &args, "--group-size", "group size 128 does not divide 576");
    }
}

#[test]
fn calibration_text_shorter_than_one_sequence_names_the_file() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "To be, or not to be, that is the question.").unwrap();
    for method in ["gptq", "awq"] {
        let args = ["--method", method, "--group-size", "64", "--calib", short.to_str().unwrap(), "--seqlen", "64"];
        refuses(&fixture, &args, &short.display().to_string(), "shorter than one sequence");
    }
    let missing = dir.path().join("missing.txt");
    let args = ["--method", "gptq", "--group-size", "64", "--calib", missing.to_str().unwrap()];
    refuses(&fixture, &args, &missing.display().to_string(), "");
}

#[test]
fn architectures_outside_the_llama_family_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("gpt2.gguf");
    let metadata = [("general.architecture".to_string(), MetadataValue::String("gpt2".into()))];
    GgufWriter::create(&gguf, &metadata, vec![]).unwrap().finish().unwrap();
    refuses(&gguf, &["--method", "gptq"], &gguf.display().to_string(), "unsupported GGUF architecture \"gpt2\"");
    refuses(&gguf, &["--format", "awq"], &gguf.display().to_string(), "unsupported GGUF architecture");

    let hf = dir.path().join("neox");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), r#"{"architectures":["GPTNeoXForCausalLM"]}"#).unwrap();
    let config = hf.join("config.json");
    refuses(&hf, &["--method", "awq"], &config.display().to_string(), "unsupported architecture");
}

#[test]
fn an_existing_file_is_not_replaced_by_a_directory() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("taken");
    std::fs::write(&out, b"keep me").unwrap();
    let args = ["quantize", fixture.to_str().unwrap(), "-o", out.to_str().unwrap(), "--format", "gptq"];
    let args = [&args[..], &["--group-size", "64"]].concat();
    assert_clean_failure(&qforge(&args), &out, "is not a directory");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
}
