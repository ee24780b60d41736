//! Hostile 1 KB inputs make qforge fail before it allocates more than a few megabytes: every count
//! and length read from a file is checked against the file's size before anything is allocated from it.
//!
//! A counting global allocator tracks the peak of live heap bytes; each case opens its file through
//! the library (as the CLI does) and asserts the open fails and the peak stayed under the limit. The
//! cases run one after another in a single test, since the allocator counts the whole process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use formats::gguf::GgufFile;
use formats::lora::peft::PeftAdapter;
use formats::safetensors::Checkpoint;
use qforge::model::ModelSource;

/// What opening a hostile 1 KB file may allocate at most.
const LIMIT: usize = 4 << 20;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            if new_size >= layout.size() {
                let live = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f`, above what was live when it started.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

const HUGE: u64 = 1 << 40;

/// GGUF building blocks, little-endian.
fn gguf_header(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(tensors.to_le_bytes());
    b.extend(kvs.to_le_bytes());
    b
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// A string-valued metadata entry.
fn kv_str(b: &mut Vec<u8>, key: &str, value: &str) {
    string(b, key);
    b.extend(8u32.to_le_bytes());
    string(b, value);
}

/// The start of an array-valued metadata entry: key, type, element type, length.
fn kv_array(b: &mut Vec<u8>, key: &str, elem_type: u32, len: u64) {
    string(b, key);
    b.extend(9u32.to_le_bytes());
    b.extend(elem_type.to_le_bytes());
    b.extend(len.to_le_bytes());
}

fn tensor_info(b: &mut Vec<u8>, name: &str, dims: &[u64], ty: u32) {
    string(b, name);
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
}

/// Pads to exactly 1 KB.
fn kilobyte(mut b: Vec<u8>) -> Vec<u8> {
    assert!(b.len() <= 1024);
    b.resize(1024, 0);
    b
}

fn hostile_ggufs() -> Vec<(&'static str, Vec<u8>)> {
    let llama = |kvs: u64| {
        let mut b = gguf_header(0, kvs + 2);
        kv_str(&mut b, "general.architecture", "llama");
        kv_str(&mut b, "tokenizer.ggml.model", "gpt2");
        b
    };
    vec![
        ("tensor count 2^40", kilobyte(gguf_header(HUGE, 0))),
        ("metadata count 2^40", kilobyte(gguf_header(0, HUGE))),
        ("key length 2^40", {
            let mut b = gguf_header(0, 1);
            b.extend(HUGE.to_le_bytes());
            kilobyte(b)
        }),
        ("string value length 2^40", {
            let mut b = gguf_header(0, 1);
            string(&mut b, "general.name");
            b.extend(8u32.to_le_bytes());
            b.extend(HUGE.to_le_bytes());
            kilobyte(b)
        }),
        ("u8 array length 2^40", {
            let mut b = llama(1);
            kv_array(&mut b, "tokenizer.ggml.token_type", 0, HUGE);
            kilobyte(b)
        }),
        ("string array length 2^40", {
            let mut b = llama(1);
            kv_array(&mut b, "tokenizer.ggml.tokens", 8, HUGE);
            kilobyte(b)
        }),
        ("array of arrays of length 2^40", {
            let mut b = llama(1);
            kv_array(&mut b, "tokenizer.ggml.merges", 9, 4);
            b.extend(0u32.to_le_bytes());
            b.extend(HUGE.to_le_bytes());
            kilobyte(b)
        }),
        ("dimension count 2^31", {
            let mut b = gguf_header(1, 0);
            string(&mut b, "t");
            b.extend((1u32 << 31).to_le_bytes());
            kilobyte(b)
        }),
        ("dims 2^40 x 2^40", {
            let mut b = gguf_header(1, 0);
            tensor_info(&mut b, "t", &[HUGE, HUGE], 0);
            kilobyte(b)
        }),
        ("dims 2^31 x 2^31 of F32", {
            let mut b = gguf_header(1, 0);
            tensor_info(&mut b, "t", &[1 << 31, 1 << 31], 0);
            kilobyte(b)
        }),
        ("2^20 tensor infos claimed", kilobyte(gguf_header(1 << 20, 0))),
    ]
}

fn safetensors_file(header_len: u64, json: &str) -> Vec<u8> {
    let mut b = header_len.to_le_bytes().to_vec();
    b.extend(json.as_bytes());
    kilobyte(b)
}

fn hostile_safetensors() -> Vec<(&'static str, Vec<u8>)> {
    let huge_shape = format!(r#"{{"t":{{"dtype":"F32","shape":[{HUGE},{HUGE}],"data_offsets":[0,16]}}}}"#);
    let huge_offsets = format!(r#"{{"t":{{"dtype":"F32","shape":[4],"data_offsets":[{HUGE},{}]}}}}"#, HUGE + 16);
    vec![
        ("header length 2^40", safetensors_file(HUGE, "{}")),
        ("header length 2^63", safetensors_file(1 << 63, "{}")),
        ("header length just under the cap", safetensors_file(99_999_999, "{}")),
        ("shape 2^40 x 2^40", safetensors_file(huge_shape.len() as u64, &huge_shape)),
        ("data offsets at 2^40", safetensors_file(huge_offsets.len() as u64, &huge_offsets)),
    ]
}

fn assert_bounded<T, E: std::fmt::Display>(what: &str, path: &Path, open: impl FnOnce() -> Result<T, E>) {
    assert_bounded_by(LIMIT, what, path, open)
}

fn assert_bounded_by<T, E: std::fmt::Display>(
    limit: usize,
    what: &str,
    path: &Path,
    open: impl FnOnce() -> Result<T, E>,
) {
    let (result, peak) = peak_allocation(open);
    let err = match result {
        Ok(_) => panic!("{what}: opening {} succeeded", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(peak <= limit, "{what}: allocated {peak} bytes before failing with: {err}");
    eprintln!("{what}: peak {peak} bytes; {err}");
}

#[test]
fn hostile_files_fail_before_allocating_much() {
    let dir = tempfile::tempdir().unwrap();

    for (what, bytes) in hostile_ggufs() {
        let path = dir.path().join("hostile.gguf");
        std::fs::write(&path, &bytes).unwrap();
        assert_bounded(what, &path, || GgufFile::open(&path));
        assert_bounded(what, &path, || ModelSource::open(&path));
    }

    for (what, bytes) in hostile_safetensors() {
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        assert_bounded(what, &path, || Checkpoint::open(&path));
    }

    // An index naming 50 000 shards (1.6 MB of JSON), none of which exists: what it takes is in
    // proportion to the file (the parsed map), not to anything the file claims.
    let index = dir.path().join("model.safetensors.index.json");
    let map: serde_json::Map<String, serde_json::Value> =
        (0..50_000).map(|i| (format!("t{i}"), format!("s{i}.safetensors").into())).collect();
    let text = serde_json::json!({ "weight_map": map }).to_string();
    std::fs::write(&index, &text).unwrap();
    assert_bounded_by(8 * text.len(), "index with 50 000 missing shards", &index, || Checkpoint::open(&index));

    // An HF directory whose config claims a vocabulary of 2^24 - 1 tokens over a tiny tokenizer.json and
    // a 4-token embedding: the vocabulary must not be padded to the claimed size.
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":2,"intermediate_size":2,"num_hidden_layers":0,
            "num_attention_heads":1,"vocab_size":16777215}"#,
    )
    .unwrap();
    std::fs::write(hf.join("tokenizer.json"), r#"{"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]}}"#).unwrap();
    let json = r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]}}"#;
    let mut st = (json.len() as u64).to_le_bytes().to_vec();
    st.extend(json.as_bytes());
    st.extend([0u8; 32]);
    std::fs::write(hf.join("model.safetensors"), st).unwrap();
    assert_bounded("config vocab_size 2^24 - 1", &hf, || ModelSource::open(&hf));

    // The same directory with an honest vocab_size, but a tokenizer.json whose one sparse id would size
    // the vocabulary table (found by fuzzing).
    std::fs::write(
        hf.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":2,"intermediate_size":2,"num_hidden_layers":0,
            "num_attention_heads":1,"vocab_size":4}"#,
    )
    .unwrap();
    std::fs::write(hf.join("tokenizer.json"), r#"{"model":{"type":"BPE","vocab":{"a":0,"b":2011213},"merges":[]}}"#)
        .unwrap();
    assert_bounded("tokenizer.json id 2,011,213", &hf, || ModelSource::open(&hf));

    // A PEFT adapter whose config asks for rank 2^40.
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), format!(r#"{{"peft_type":"LORA","r":{HUGE},"lora_alpha":1}}"#))
        .unwrap();
    std::fs::write(adapter.join("adapter_model.safetensors"), safetensors_file(HUGE, "{}")).unwrap();
    assert_bounded("adapter with rank 2^40", &adapter, || PeftAdapter::open(&adapter));
}
