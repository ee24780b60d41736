//! Write errors: a full disk gives one clear error naming the output and leaves nothing behind (no
//! temporary file, no partial output, an existing output untouched), and an output path that is not a
//! regular file is refused before anything is written.
//!
//! The full disk is a real one: a 64 KiB tmpfs mounted for the test where the machine allows it (root,
//! mount permitted), else those tests skip with a message. The same failure is always exercised through
//! the kernel's file-size limit (`ulimit -f`, SIGXFSZ ignored), under which a write past the limit fails
//! with EFBIG exactly where a full disk fails with ENOSPC.

mod common;
#[path = "common/synthetic.rs"]
mod synthetic;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_clean_failure, dir_entries, qforge};
use formats::safetensors::Dtype;

/// A tmpfs of 64 KiB, unmounted on drop.
struct SmallDisk {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs", mount.to_str().unwrap()])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount permission)");
            return None;
        }
        Some(SmallDisk { _dir: dir, mount })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// A synthetic model whose GGUF (about 150 KB in F32) cannot fit the small disk.
fn model(root: &Path) -> PathBuf {
    let hf = root.join("hf");
    synthetic::TinyModel::new("LlamaForCausalLM").write_hf(&hf, Dtype::F32, None);
    hf
}

#[test]
fn a_full_disk_fails_cleanly_and_keeps_the_old_output() {
    let Some(disk) = SmallDisk::mount() else { return };
    let root = tempfile::tempdir().unwrap();
    let hf = model(root.path());
    let output = disk.mount.join("out.gguf");
    std::fs::write(&output, b"old").unwrap();
    for args in [vec!["convert", hf.to_str().unwrap()], vec!["quantize", hf.to_str().unwrap(), "--type", "F32"]] {
        let mut args = args.clone();
        args.extend(["-o", output.to_str().unwrap()]);
        let out = qforge(&args);
        assert_clean_failure(&out, &output, "no space left");
        assert_eq!(dir_entries(&disk.mount), ["out.gguf"], "{args:?} left files behind");
        assert_eq!(std::fs::read(&output).unwrap(), b"old", "{args:?} damaged the old output");
    }
}

/// Runs qforge with files limited to 64 KiB: writing past it fails with EFBIG ("File too large").
fn qforge_with_file_size_limit(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .args(["-c", "trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\" --quiet", env!("CARGO_BIN_EXE_qforge")])
        .args(args)
        .output()
        .expect("bash runs")
}

#[test]
fn a_write_error_fails_cleanly_and_keeps_the_old_output() {
    let root = tempfile::tempdir().unwrap();
    let hf = model(root.path());
    let out_dir = root.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let output = out_dir.join("out.gguf");
    std::fs::write(&output, b"old").unwrap();
    for args in [vec!["convert", hf.to_str().unwrap()], vec!["quantize", hf.to_str().unwrap(), "--type", "F32"]] {
        let mut args = args.clone();
        args.extend(["-o", output.to_str().unwrap()]);
        let out = qforge_with_file_size_limit(&args);
        assert_clean_failure(&out, &output, "file too large");
        assert_eq!(dir_entries(&out_dir), ["out.gguf"], "{args:?} left files behind");
        assert_eq!(std::fs::read(&output).unwrap(), b"old", "{args:?} damaged the old output");
    }
}

#[test]
fn a_full_disk_under_an_hf_export_fails_cleanly() {
    let Some(disk) = SmallDisk::mount() else { return };
    let root = tempfile::tempdir().unwrap();
    let hf = model(root.path());
    let gguf = root.path().join("m.gguf");
    common::qforge_ok(&["convert", hf.to_str().unwrap(), "-o", gguf.to_str().unwrap()]);
    let output = disk.mount.join("export");
    let out = qforge(&["convert", gguf.to_str().unwrap(), "-o", output.to_str().unwrap(), "--dtype", "f32"]);
    assert_clean_failure(&out, &output.join("model.safetensors"), "no space left");
    let left: Vec<String> = dir_entries(&output).into_iter().filter(|n| n.starts_with(".qforge-tmp-")).collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert!(!output.join("model.safetensors").exists(), "a partial model.safetensors was written");
}

#[test]
fn an_output_that_is_not_a_regular_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let hf = model(root.path());
    let fifo = root.path().join("fifo.gguf");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = qforge(&["convert", hf.to_str().unwrap(), "-o", fifo.to_str().unwrap()]);
    assert_clean_failure(&out, &fifo, "not a regular file");
    let entries = dir_entries(root.path());
    assert!(entries.iter().all(|n| !n.starts_with(".qforge-tmp-")), "{entries:?}");
}
