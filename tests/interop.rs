//! Interoperability with llama.cpp's own clients from PyPI: `gguf` (gguf-py) and `llama-cpp-python`.
//!
//! The Python checks live in `tests/interop/` and run in a virtualenv created once at
//! `target/interop-venv` from `tests/interop/requirements.txt`. Its first creation compiles llama.cpp
//! inside pip (10-15 minutes on 2 cores); pip's wheel cache makes every later one take seconds.
//! Where Python or PyPI is out of reach the test is skipped with a message, except under `CI=true`,
//! where it fails. Every llama.cpp comparison that can run in CI belongs in this file.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{fixture_model, one_big_test_at_a_time, qforge_ok, test_data};

/// SmolLM2's vocabulary size, from its published `config.json`.
const SMOLLM2_VOCAB: usize = 49_152;

const PROMPT: &str = "The capital of France is Paris. The capital of Germany is";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Creates (or reuses) the venv; `Err` says why it could not.
fn create_venv() -> Result<PathBuf, String> {
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp has a parent");
    let setup = interop_dir().join("setup_venv.py");
    let out = Command::new("python3")
        .arg(&setup)
        .arg(target_dir.join("interop-venv"))
        .arg(interop_dir().join("requirements.txt"))
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(python) if out.status.success() => Ok(PathBuf::from(python)),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            Err(format!("{} failed ({}):\n{tail}", setup.display(), out.status))
        }
    }
}

/// The venv's python; `None` after printing why, where the venv cannot be made outside CI.
fn venv_python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(create_venv) {
        Ok(python) => Some(python.clone()),
        Err(why) if in_ci() => panic!("the interop virtualenv is required under CI: {why}"),
        Err(why) => {
            eprintln!("SKIPPED: no interop virtualenv: {why}");
            None
        }
    }
}

/// Runs `tests/interop/SCRIPT ARGS` in the venv: its stdout on success, a report of the failure otherwise.
fn run_script(python: &Path, script: &str, args: &[&dyn AsRef<OsStr>]) -> Result<String, String> {
    let out = Command::new(python)
        .arg(interop_dir().join(script))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .map_err(|e| format!("{script}: cannot run {}: {e}", python.display()))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(stdout.into_owned())
    } else {
        Err(format!("{script} failed ({}):\n{stdout}{stderr}", out.status))
    }
}

fn convert(input: &Path, output: &Path, to: &str, dtype: &str) {
    qforge_ok(&["convert", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--to", to, "--dtype", dtype]);
}

/// Compares llama.cpp's token ids (a JSON list in `ids_json`) with the `tokenizers` crate's encoding of
/// `text_file` by `dir/tokenizer.json` (the HF export's).
fn compare_with_tokenizers_crate(dir: &Path, text_file: &Path, ids_json: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(text_file).map_err(|e| format!("{}: {e}", text_file.display()))?;
    let llama: Vec<u32> = serde_json::from_slice(&std::fs::read(ids_json).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", ids_json.display()))?;
    let tokenizer_json = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_json)
        .map_err(|e| format!("{}: the tokenizers crate cannot load it: {e}", tokenizer_json.display()))?;
    let encoding = tokenizer.encode(text, false).map_err(|e| format!("tokenizers crate: {e}"))?;
    let ours = encoding.get_ids();
    if ours == llama.as_slice() {
        return Ok(format!("the tokenizers crate encodes {} into the same {} ids", text_file.display(), ours.len()));
    }
    let at = ours.iter().zip(&llama).position(|(a, b)| a != b).unwrap_or(ours.len().min(llama.len()));
    let window = |ids: &[u32]| ids[at.min(ids.len())..(at + 5).min(ids.len())].to_vec();
    Err(format!(
        "{} encodes {} differently from llama.cpp: first difference at token {at}: {:?} vs llama.cpp {:?} \
         ({} vs {} tokens)",
        tokenizer_json.display(),
        text_file.display(),
        window(ours),
        window(&llama),
        ours.len(),
        llama.len()
    ))
}

/// gguf-py must read the fixture, qforge's F32 and F16 GGUFs to the values qforge's f32 exports of them
/// hold; llama.cpp must compute the same logits from qforge's F32 GGUF as from its own F32 conversion of
/// the fixture, tokenize like the export's `tokenizer.json`, and quantize the F16 GGUF to Q8_0, Q4_0 and
/// Q4_1 with the same bytes as `qforge quantize`.
#[test]
fn llama_cpp_clients_agree_with_qforge() {
    let Some(fixture) = fixture_model() else { return };
    let Some(python) = venv_python() else { return };
    let _turn = one_big_test_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let vocab = SMOLLM2_VOCAB.to_string();
    let text = test_data("wikitext-paragraph.txt");
    assert!(text.exists(), "{} is missing", text.display());

    // Each file is removed once read, so that at most two F32 models (0.5 GB each) exist at once.
    let remove = |name: &str| {
        let entry = path(name);
        let _ = if entry.is_dir() { std::fs::remove_dir_all(entry) } else { std::fs::remove_file(entry) };
    };
    let mut results = Vec::new();

    // gguf-py on the fixture and on qforge's F32 and F16 GGUFs, each against qforge's f32 export of that file.
    convert(&fixture, &path("hf"), "safetensors", "f32");
    results.push(run_script(&python, "gguf_py_check.py", &[&fixture, &path("hf"), &vocab]));
    convert(&path("hf"), &path("f32.gguf"), "gguf", "f32");
    std::fs::create_dir(path("tokenizer")).unwrap();
    std::fs::rename(path("hf").join("tokenizer.json"), path("tokenizer").join("tokenizer.json")).unwrap();
    remove("hf");
    convert(&path("f32.gguf"), &path("f32.hf"), "safetensors", "f32");
    results.push(run_script(&python, "gguf_py_check.py", &[&path("f32.gguf"), &path("f32.hf"), &vocab]));
    remove("f32.hf");

    results.push(run_script(
        &python,
        "llama_logits.py",
        &[&fixture, &path("f32.gguf"), &path("llama-f32.gguf"), &PROMPT],
    ));
    remove("llama-f32.gguf");
    let ids = path("ids.json");
    let tokenized = run_script(&python, "llama_tokenize.py", &[&text, &ids, &fixture, &path("f32.gguf")]);
    let tokenized_ok = tokenized.is_ok();
    results.push(tokenized);
    if tokenized_ok {
        results.push(compare_with_tokenizers_crate(&path("tokenizer"), &text, &ids));
    }
    remove("f32.gguf");

    convert(&fixture, &path("f16.gguf"), "gguf", "f16");
    convert(&path("f16.gguf"), &path("f16.hf"), "safetensors", "f32");
    results.push(run_script(&python, "gguf_py_check.py", &[&path("f16.gguf"), &path("f16.hf"), &vocab]));
    remove("f16.hf");

    // qforge quantize vs llama.cpp's quantizer, from the same F16 GGUF.
    let mut specs: Vec<String> = Vec::new();
    for ty in ["Q8_0", "Q4_0", "Q4_1"] {
        let out = path(&format!("qforge-{ty}.gguf"));
        qforge_ok(&["quantize", path("f16.gguf").to_str().unwrap(), "-o", out.to_str().unwrap(), "--type", ty]);
        specs.push(format!("{ty}={}", out.display()));
    }
    let (f16, work) = (path("f16.gguf"), dir.path().to_path_buf());
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&f16, &work];
    args.extend(specs.iter().map(|s| s as &dyn AsRef<OsStr>));
    results.push(run_script(&python, "llama_quantize.py", &args));

    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(report) => println!("{}", report.trim_end()),
            Err(failure) => failures.push(failure),
        }
    }
    assert!(failures.is_empty(), "{} interop checks failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

/// Greedy decoding from qforge's F32 GGUF gives llama.cpp's tokens (the logits agree exactly in F32,
/// so the two argmaxes can only part at an exact tie), and ends at the same end-of-generation token.
#[test]
fn greedy_generation_matches_llama_cpp() {
    let Some(fixture) = fixture_model() else { return };
    let Some(python) = venv_python() else { return };
    let _turn = one_big_test_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let f32_gguf = dir.path().join("f32.gguf");
    convert(&fixture, &f32_gguf, "gguf", "f32");
    let (prompt, n) = ("The capital of France is", "32");
    let ours =
        qforge_ok(&["generate", f32_gguf.to_str().unwrap(), "--prompt", prompt, "-n", n, "--temp", "0", "--json"]);
    let ours: serde_json::Value = serde_json::from_str(&ours).unwrap();
    let theirs = run_script(&python, "greedy.py", &[&f32_gguf, &prompt, &n]).unwrap_or_else(|e| panic!("{e}"));
    let theirs: Vec<u32> = serde_json::from_str(theirs.trim()).unwrap();
    let ours: Vec<u32> = serde_json::from_value(ours["token_ids"].clone()).unwrap();
    assert!(!theirs.is_empty());
    assert_eq!(ours, theirs, "greedy token ids: qforge vs llama.cpp");
}

#[test]
fn numpy_transcriptions_of_the_gptq_and_awq_loaders_read_qforge_exports() {
    let Some(fixture) = fixture_model() else { return };
    let Some(python) = venv_python() else { return };
    let _turn = one_big_test_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let f32_dir = dir.path().join("f32");
    convert(&fixture, &f32_dir, "safetensors", "f32");
    for (name, args) in [("gptq3", ["--format", "gptq", "--bits", "3"]), ("awq", ["--format", "awq", "--bits", "4"])] {
        let out = dir.path().join(name);
        let (input, output) = (fixture.to_str().unwrap(), out.to_str().unwrap());
        qforge_ok(&[&["quantize", input, "-o", output, "--group-size", "64"][..], &args[..]].concat());
        let report = run_script(&python, "read_gptq_awq.py", &[&out, &f32_dir]).unwrap_or_else(|e| panic!("{e}"));
        assert!(report.contains("210 layers, 0 mismatched"), "{report}");
    }
}
