//! Shared helpers for the integration tests: locating fixtures and running the `qforge` binary.
//!
//! Real-model fixtures live in `$QFORGE_FIXTURES` (default `target/fixtures`, filled by
//! `scripts/fetch-fixtures.sh`); larger shared text in `$QFORGE_SHARED_DATA` (default `../shared/data`).
//! Outside CI a missing file skips the test with a message; under `CI=true` it fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, Once};

pub const FIXTURE_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn require(path: PathBuf, how_to_get_it: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    let msg = format!("{} is missing ({how_to_get_it})", path.display());
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF.
pub fn fixture_model() -> Option<PathBuf> {
    let dir = std::env::var_os("QFORGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/fixtures"));
    require(dir.join(FIXTURE_MODEL), "run scripts/fetch-fixtures.sh")
}

/// A file under the shared data directory, e.g. `wikitext-2/valid.txt`.
pub fn shared_data(relative: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("QFORGE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("../shared/data"));
    require(dir.join(relative), "set QFORGE_SHARED_DATA to the shared data directory")
}

/// A committed test-data file under `tests/data`.
pub fn test_data(relative: &str) -> PathBuf {
    project_root().join("tests/data").join(relative)
}

/// A fresh directory `target/tmp/<name>` for the large files the tests of one binary share, removed
/// when the test binary exits, pass or fail: the suite runs binary after binary on one disk, and
/// models left behind by one would crowd out the next. `QFORGE_KEEP_TEST_FILES=1` keeps it.
pub fn binary_scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if std::env::var_os("QFORGE_KEEP_TEST_FILES").is_none() {
        remove_at_exit(dir.clone());
    }
    dir
}

/// Held by the tests of a binary that each write several whole models, so that they take turns
/// rather than add up their disk use.
pub fn one_big_test_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

static REMOVED_AT_EXIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn remove_at_exit(dir: PathBuf) {
    extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
    }
    extern "C" fn remove_registered() {
        let dirs = std::mem::take(&mut *REMOVED_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    static REGISTER: Once = Once::new();
    // libtest ends by returning from main or calling `process::exit`; both run C `atexit` handlers,
    // and nothing else runs once every test has finished.
    REGISTER.call_once(|| assert_eq!(unsafe { atexit(remove_registered) }, 0, "atexit refused the handler"));
    REMOVED_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
}

pub fn qforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qforge")).args(args).arg("--quiet").output().expect("qforge binary runs")
}

/// Runs qforge, panicking with its stderr when it fails.
pub fn qforge_ok(args: &[&str]) -> String {
    let out = qforge(args);
    assert!(out.status.success(), "qforge {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Asserts a clean failure: exit code 2, one `error:` line naming `path`, and the message containing
/// `problem`.
pub fn assert_clean_failure(out: &Output, path: &Path, problem: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(&path.display().to_string()), "error does not name {}: {stderr}", path.display());
    assert!(lines[0].to_lowercase().contains(&problem.to_lowercase()), "error does not say {problem:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Names of the entries in `dir`.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A llama.cpp tool from the build directory `QFORGE_LLAMA_CPP_BIN` names, or `None` (the caller skips)
/// when it is unset: llama.cpp is built beside the project for comparisons, never in CI.
pub fn llama_tool(name: &str) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("QFORGE_LLAMA_CPP_BIN") else {
        eprintln!("SKIPPED: set QFORGE_LLAMA_CPP_BIN to a llama.cpp build's bin directory");
        return None;
    };
    let tool = PathBuf::from(dir).join(name);
    assert!(tool.exists(), "{} is missing", tool.display());
    Some(tool)
}
