//! The bodies of qforge's fuzz targets, shared by the libFuzzer targets in `fuzz_targets/` (run with
//! `cargo +nightly fuzz run NAME`) and by `tests/fuzz_corpus.rs`, which runs each body over the seed
//! corpus in `fuzz/seeds/NAME/` and seeded random mutations of it on stable Rust.
//!
//! A body feeds arbitrary bytes to one reader through its public entry point and panics only when
//! qforge misbehaves: a panic inside the reader, or an error that does not name the file it is about.
//! Readers that take paths get the bytes through a per-thread scratch file.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use formats::gguf::GgufFile;
use formats::lora::peft::PeftConfig;
use formats::safetensors::Checkpoint;
use formats::GgmlType;
use qforge::model::config::ModelConfig;
use qforge::model::source::ModelSource;
use qforge::model::vocab::Vocab;
use serde_json::Value;

/// A target's body: runs one input.
pub type Body = fn(&[u8]);

/// (target name, body): every target, for harnesses that run them all.
pub const TARGETS: &[(&str, Body)] = &[
    ("safetensors", safetensors),
    ("safetensors_index", safetensors_index),
    ("gguf", gguf),
    ("peft_config", peft_config),
    ("model_config", model_config),
    ("tokenizer", tokenizer),
    ("block_decoders", block_decoders),
];

/// Elements a body decodes at most per tensor, so huge-but-valid shapes do not make a run slow.
const MAX_DECODED_ELEMENTS: usize = 1 << 20;

/// A `.safetensors` file: header, tiling, and decoding every tensor.
pub fn safetensors(data: &[u8]) {
    let path = scratch_file("model.safetensors", data);
    match Checkpoint::open(&path) {
        Ok(checkpoint) => {
            for t in checkpoint.tensors().filter(|t| t.n_elements() <= MAX_DECODED_ELEMENTS) {
                let _ = t.to_f32();
            }
        }
        Err(e) => assert_names(&e.to_string(), &path),
    }
}

/// A `model.safetensors.index.json` beside two small valid shards `a.safetensors` and `b.safetensors`.
pub fn safetensors_index(data: &[u8]) {
    let dir = scratch_dir();
    for (shard, tensor) in [("a.safetensors", "x"), ("b.safetensors", "y")] {
        let header = format!(r#"{{"{tensor}":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 8]);
        write(&dir.join(shard), &bytes);
    }
    let path = scratch_file("model.safetensors.index.json", data);
    if let Err(e) = Checkpoint::open(&path) {
        assert_names(&e.to_string(), &dir);
    }
}

/// A GGUF file: header, metadata, tensor infos and layout, then the model description built from it
/// (config, vocabulary, tensor list) and every tensor's data, decoded.
pub fn gguf(data: &[u8]) {
    let path = scratch_file("model.gguf", data);
    let file = match GgufFile::open(&path) {
        Ok(file) => file,
        Err(e) => return assert_names(&e.to_string(), &path),
    };
    for t in file.tensors() {
        assert!(file.tensor_data(t).len() as u64 == t.n_bytes());
        if t.n_elements() <= MAX_DECODED_ELEMENTS as u64 {
            let _ = file.dequantize(t);
        }
    }
    drop(file);
    match ModelSource::open(&path) {
        Ok(source) => {
            for t in source.tensors().iter().filter(|t| t.n_elements() <= MAX_DECODED_ELEMENTS) {
                let _ = source.load_hf_order(t);
            }
            if let Some(vocab) = &source.vocab {
                let _ = vocab.to_hf();
            }
        }
        Err(e) => assert_names(&format!("{e:#}"), &path),
    }
}

/// `adapter_config.json` of a PEFT adapter.
pub fn peft_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PeftConfig::parse(text);
    }
}

/// An HF `config.json`.
pub fn model_config(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        if let Ok(config) = ModelConfig::from_hf_json(&v) {
            assert_eq!(ModelConfig::from_hf_json(&config.to_hf_json("float32")).ok().as_ref(), Some(&config));
        }
    }
}

/// An HF `tokenizer.json`: as the calibration tokenizer and as the vocabulary qforge writes to GGUF.
pub fn tokenizer(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let options = calibration::TokenizerOptions { bos: Some(0), add_bos: true };
    if let Ok(tok) = calibration::Tokenizer::from_json(&v, options) {
        if let Ok(ids) = tok.encode("Hello, world! 123 <|endoftext|> éà") {
            let _ = tok.decode(&ids);
        }
    }
    if let Ok(vocab) = Vocab::from_hf(&v, &Value::Null, None) {
        let _ = vocab.to_hf();
    }
}

/// Every block decoder of the type table: the first byte picks a type that has one, the rest is block
/// data (decoded whole, and refused cleanly when one element short).
pub fn block_decoders(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let types: Vec<GgmlType> = GgmlType::all().filter(|t| t.dequantize(&[], &mut []).is_ok()).collect();
    let ty = types[pick as usize % types.len()];
    let blocks = bytes.len() / ty.type_size();
    let src = &bytes[..blocks * ty.type_size()];
    let mut dst = vec![0f32; blocks * ty.block_size()];
    let _ = ty.dequantize(src, &mut dst);
    if !dst.is_empty() {
        assert!(ty.dequantize(src, &mut dst[1..]).is_err());
    }
}

/// Panics unless `message` names `path`.
fn assert_names(message: &str, path: &Path) {
    let name = path.display().to_string();
    assert!(message.contains(&name), "error does not name {name}: {message}");
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// This thread's scratch directory, made on first use and removed when the thread ends.
fn scratch_dir() -> PathBuf {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let dir = s.get_or_insert_with(|| {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("qforge-fuzz-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch directory");
            Scratch(dir)
        });
        dir.0.clone()
    })
}

fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    write(&path, data);
    path
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("writing a scratch file");
}
