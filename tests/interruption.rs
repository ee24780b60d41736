//! An interrupted `qforge quantize` never damages an existing output.
//!
//! SIGKILL cannot be handled: the old output must still be intact byte for byte, the orphaned temporary
//! file (`.qforge-tmp-PID-NAME`) stays, and the next run writing the same output removes it. SIGINT and
//! SIGTERM are handled: qforge deletes its temporary file, says it was interrupted, and exits with 130.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{dir_entries, fixture_model};
use formats::output::TEMP_PREFIX;

const OLD_OUTPUT: &[u8] = b"the previous output, which must survive";

/// Starts quantizing `model` to `output` on one thread, slowly enough (Q4_K_M) to be caught midway.
fn start_quantize(model: &Path, output: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qforge"))
        .args(["quantize", model.to_str().unwrap(), "-o", output.to_str().unwrap()])
        .args(["--type", "Q4_K_M", "--allow-requantize", "--threads", "1", "--quiet"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("qforge runs")
}

fn temp_files(dir: &Path) -> Vec<String> {
    dir_entries(dir).into_iter().filter(|n| n.starts_with(TEMP_PREFIX)).collect()
}

/// Waits until the run has created its temporary output, and a little longer so that it is writing.
fn wait_for_temp_file(child: &mut Child, dir: &Path) {
    let start = Instant::now();
    while temp_files(dir).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "qforge ended before writing its temporary file");
        assert!(start.elapsed() < Duration::from_secs(120), "no temporary file appeared in {}", dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "qforge finished before it could be interrupted");
}

fn setup() -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
    let model = fixture_model()?;
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.gguf");
    std::fs::write(&output, OLD_OUTPUT).unwrap();
    Some((model, dir, output))
}

#[test]
fn sigkill_leaves_the_old_output_and_the_next_run_removes_the_orphan() {
    let Some((model, dir, output)) = setup() else { return };
    let mut child = start_quantize(&model, &output);
    wait_for_temp_file(&mut child, dir.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(&output).unwrap(), OLD_OUTPUT, "a killed run changed the existing output");
    let orphans = temp_files(dir.path());
    assert_eq!(orphans.len(), 1, "{:?}", dir_entries(dir.path()));

    common::qforge_ok(&[
        "quantize",
        model.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--type",
        "Q8_0",
        "--allow-requantize",
    ]);
    assert_eq!(temp_files(dir.path()), Vec::<String>::new(), "the orphaned temporary file was not removed");
    formats::gguf::GgufFile::open(&output).expect("the new output is a valid GGUF");
}

#[test]
fn sigint_and_sigterm_stop_cleanly_with_exit_code_130() {
    let Some((model, dir, output)) = setup() else { return };
    for signal in ["INT", "TERM"] {
        let mut child = start_quantize(&model, &output);
        wait_for_temp_file(&mut child, dir.path());
        let sent = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(sent.success());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "SIG{signal}: {stderr}");
        assert!(stderr.contains("interrupted"), "SIG{signal}: {stderr}");
        assert!(!stderr.contains("panicked"), "SIG{signal}: {stderr}");
        assert_eq!(temp_files(dir.path()), Vec::<String>::new(), "SIG{signal} left a temporary file");
        assert_eq!(std::fs::read(&output).unwrap(), OLD_OUTPUT, "SIG{signal} changed the existing output");
    }
}
