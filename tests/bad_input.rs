//! Every malformed input gives one `error:` line naming the file and the problem, exit code 2, no
//! panic, and leaves no output behind.

mod common;
#[path = "common/synthetic.rs"]
mod synthetic;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, dir_entries, qforge};

fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    b
}

/// An HF directory whose model.safetensors holds `bytes`, with a valid config.json.
fn hf_dir_with(root: &Path, bytes: &[u8]) -> PathBuf {
    let dir = root.join("hf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":4}"#,
    )
    .unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

/// Converting `input` fails cleanly, naming `named` and `problem`, and writes nothing into the output
/// directory.
fn assert_convert_fails(input: &Path, named: &Path, problem: &str) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.gguf");
    let result = qforge(&["convert", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--to", "gguf"]);
    assert_clean_failure(&result, named, problem);
    assert!(dir_entries(out_dir.path()).is_empty(), "left behind: {:?}", dir_entries(out_dir.path()));
}

fn check_safetensors(bytes: Vec<u8>, problem: &str) {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_dir_with(root.path(), &bytes);
    let file = dir.join("model.safetensors");
    assert_convert_fails(&dir, &file, problem);
    assert_clean_failure(&qforge(&["inspect", file.to_str().unwrap()]), &file, problem);
}

#[test]
fn truncated_safetensors() {
    check_safetensors(vec![1, 2, 3], "truncated");
}

#[test]
fn safetensors_header_longer_than_file() {
    let mut b = safetensors_bytes("{}", 0);
    b[..8].copy_from_slice(&1000u64.to_le_bytes());
    check_safetensors(b, "header");
}

#[test]
fn safetensors_header_length_2_pow_63() {
    let mut b = safetensors_bytes("{}", 0);
    b[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    check_safetensors(b, "header");
}

#[test]
fn safetensors_header_not_json() {
    check_safetensors(safetensors_bytes("{not json", 0), "json");
}

#[test]
fn safetensors_unknown_dtype() {
    check_safetensors(
        safetensors_bytes(r#"{"model.norm.weight":{"dtype":"F8_E9","shape":[2],"data_offsets":[0,8]}}"#, 8),
        "F8_E9",
    );
}

#[test]
fn safetensors_shape_does_not_match_byte_range() {
    check_safetensors(
        safetensors_bytes(r#"{"model.norm.weight":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
        "model.norm.weight",
    );
}

#[test]
fn safetensors_overlapping_offsets() {
    check_safetensors(
        safetensors_bytes(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ),
        "overlap",
    );
}

#[test]
fn safetensors_offsets_beyond_file() {
    check_safetensors(safetensors_bytes(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8), "a");
}

/// GGUF bytes: header, string KVs, and tensor infos given as (name, dims, type id, offset).
fn gguf_bytes(version: u32, tensor_count: u64, kvs: &[(&str, &str)], tensors: &[(&str, &[u64], u32, u64)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    b.extend(tensor_count.to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, v) in kvs {
        string(&mut b, k);
        b.extend(8u32.to_le_bytes());
        string(&mut b, v);
    }
    for (name, dims, ty, offset) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b
}

fn check_gguf(bytes: Vec<u8>, problem: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.gguf");
    std::fs::write(&file, bytes).unwrap();
    assert_convert_fails(&file, &file, problem);
    assert_clean_failure(&qforge(&["inspect", file.to_str().unwrap()]), &file, problem);
}

#[test]
fn gguf_bad_magic() {
    let mut b = gguf_bytes(3, 0, &[], &[]);
    b[..4].copy_from_slice(b"GGML");
    check_gguf(b, "not a GGUF file");
}

#[test]
fn gguf_unsupported_version() {
    check_gguf(gguf_bytes(1, 0, &[], &[]), "version");
}

#[test]
fn gguf_tensor_count_2_pow_60() {
    check_gguf(gguf_bytes(3, 1 << 60, &[], &[]), "tensor infos");
}

#[test]
fn gguf_string_length_2_pow_60() {
    let mut b = gguf_bytes(3, 0, &[("general.architecture", "llama")], &[]);
    b[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check_gguf(b, "truncated");
}

#[test]
fn gguf_tensor_data_beyond_eof() {
    check_gguf(gguf_bytes(3, 1, &[], &[("t", &[1024], 0, 0)]), "t");
}

#[test]
fn gguf_misaligned_tensor_offset() {
    let mut b = gguf_bytes(3, 1, &[], &[("t", &[4], 0, 4)]);
    b.resize(b.len() + 64, 0);
    check_gguf(b, "align");
}

#[test]
fn config_json_missing() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_dir_with(root.path(), &safetensors_bytes("{}", 0));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_convert_fails(&dir, &dir.join("config.json"), "missing config.json");
}

#[test]
fn config_json_unknown_architecture() {
    let root = tempfile::tempdir().unwrap();
    let dir = hf_dir_with(root.path(), &safetensors_bytes("{}", 0));
    std::fs::write(dir.join("config.json"), r#"{"architectures":["GPTNeoXForCausalLM"]}"#).unwrap();
    assert_convert_fails(&dir, &dir.join("config.json"), "unsupported architecture");
}

#[test]
fn output_equal_to_input_is_refused_and_input_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    synthetic::TinyModel::new("LlamaForCausalLM").write_hf(&hf, formats::safetensors::Dtype::F32, None);
    let gguf = dir.path().join("m.gguf");
    common::qforge_ok(&["convert", hf.to_str().unwrap(), "-o", gguf.to_str().unwrap()]);
    let before = std::fs::read(&gguf).unwrap();
    let out = qforge(&["convert", gguf.to_str().unwrap(), "-o", gguf.to_str().unwrap()]);
    assert_clean_failure(&out, &gguf, "same as the input");
    assert_eq!(std::fs::read(&gguf).unwrap(), before, "input modified");
}

#[test]
fn output_directory_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    synthetic::TinyModel::new("LlamaForCausalLM").write_hf(&hf, formats::safetensors::Dtype::F32, None);
    // A regular file where the output's directory should be: not writable even for root.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let out = blocker.join("m.gguf");
    let result = qforge(&["convert", hf.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_clean_failure(&result, &out, "directory");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"");
}

#[test]
fn qk_rows_that_do_not_split_into_the_configs_heads() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    synthetic::TinyModel::new("LlamaForCausalLM").write_hf(&hf, formats::safetensors::Dtype::F32, None);
    // 32 heads of 1 value: q_proj's 32 rows cannot form 32 heads of rotary pairs.
    let config_path = hf.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_attention_heads"] = 32.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    assert_convert_fails(&hf, &hf, "do not split into 32 heads");
}
