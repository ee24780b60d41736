//! `convert` on tiny synthetic Llama, Mistral and Qwen2 checkpoints: names, Q/K permutation, biases,
//! sharded input and output, dtypes.

mod common;
#[path = "common/synthetic.rs"]
mod synthetic;

use common::qforge_ok;
use formats::gguf::GgufFile;
use formats::safetensors::{Checkpoint, Dtype};
use synthetic::TinyModel;

/// HF row order -> llama.cpp row order, written out independently of the library:
/// W.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2).reshape(W.shape)
fn llama_cpp_permute(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let half = rows / heads / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for pair in 0..2 {
            for i in 0..half {
                let src = h * 2 * half + pair * half + i;
                let dst = h * 2 * half + i * 2 + pair;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn check_architecture(model: &TinyModel, gguf_arch: &str, permutes: bool, shard: Option<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    model.write_hf(&hf, Dtype::F32, shard);
    let gguf_path = dir.path().join("m.gguf");
    qforge_ok(&["convert", hf.to_str().unwrap(), "-o", gguf_path.to_str().unwrap(), "--dtype", "f32"]);

    let gguf = GgufFile::open(&gguf_path).unwrap();
    assert_eq!(gguf.architecture(), Some(gguf_arch));
    let expected_names = model.tensors().len();
    assert_eq!(gguf.tensors().len(), expected_names);
    assert_eq!(gguf.tensor("output.weight").is_some(), !model.tied);
    for (hf_name, shape) in model.tensors() {
        let gguf_name = qforge::model::names::hf_to_gguf(&hf_name).unwrap();
        let t = gguf.tensor(&gguf_name).unwrap_or_else(|| panic!("{gguf_name} missing"));
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        assert_eq!(t.dims, dims, "{gguf_name}");
        let original = TinyModel::values(&hf_name, shape.iter().product());
        let cols = shape.get(1).copied().unwrap_or(1);
        let heads = if hf_name.contains("q_proj") {
            Some(model.heads)
        } else if hf_name.contains("k_proj") {
            Some(model.kv_heads)
        } else {
            None
        };
        let expected = match heads {
            Some(h) if permutes => llama_cpp_permute(&original, h, cols),
            _ => original,
        };
        assert_eq!(gguf.dequantize(t).unwrap(), expected, "{gguf_name}");
    }

    let back = dir.path().join("back");
    qforge_ok(&["convert", gguf_path.to_str().unwrap(), "-o", back.to_str().unwrap(), "--max-shard-size", "20KB"]);
    let ckpt = Checkpoint::open(&back).unwrap();
    assert!(back.join("model.safetensors.index.json").exists(), "20KB shards force an index");
    for (hf_name, shape) in model.tensors() {
        let t = ckpt.tensor(&hf_name).unwrap_or_else(|| panic!("{hf_name} missing after round trip"));
        assert_eq!(t.shape, shape.as_slice());
        assert_eq!(t.to_f32().unwrap(), TinyModel::values(&hf_name, shape.iter().product()), "{hf_name}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], if gguf_arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" });
    assert_eq!(config["num_key_value_heads"], model.kv_heads);
    assert_eq!(config["tie_word_embeddings"], model.tied);
}

#[test]
fn llama_is_permuted_and_round_trips() {
    check_architecture(&TinyModel::new("LlamaForCausalLM"), "llama", true, None);
}

#[test]
fn mistral_is_written_as_llama() {
    check_architecture(&TinyModel::new("MistralForCausalLM"), "llama", true, Some(30_000));
}

#[test]
fn qwen2_keeps_biases_and_row_order() {
    check_architecture(&TinyModel::new("Qwen2ForCausalLM"), "qwen2", false, None);
}

#[test]
fn bf16_checkpoint_converts_bit_exactly_to_bf16_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new("Qwen2ForCausalLM");
    model.write_hf(&dir.path().join("hf"), Dtype::BF16, Some(25_000));
    let out = dir.path().join("m.gguf");
    qforge_ok(&["convert", dir.path().join("hf").to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let gguf = GgufFile::open(&out).unwrap();
    assert_eq!(gguf.get("general.file_type").and_then(|v| v.as_u64()), Some(32), "MOSTLY_BF16");
    for (hf_name, shape) in model.tensors() {
        let t = gguf.tensor(&qforge::model::names::hf_to_gguf(&hf_name).unwrap()).unwrap();
        let expected_type = if shape.len() == 1 { formats::GgmlType::F32 } else { formats::GgmlType::BF16 };
        assert_eq!(t.ggml_type, expected_type, "{hf_name}");
        let bf16: Vec<f32> = TinyModel::values(&hf_name, shape.iter().product())
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect();
        assert_eq!(gguf.dequantize(t).unwrap(), bf16, "{hf_name}");
    }
}

#[test]
fn vocabulary_is_padded_and_pre_tokenizer_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel::new("LlamaForCausalLM");
    model.write_hf(&dir.path().join("hf"), Dtype::F16, None);
    let out = dir.path().join("m.gguf");
    qforge_ok(&["convert", dir.path().join("hf").to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let gguf = GgufFile::open(&out).unwrap();
    let tokens = gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).unwrap();
    assert_eq!(tokens.items.len(), model.vocab, "padded to the embedding's rows");
    assert_eq!(gguf.get("tokenizer.ggml.pre").and_then(|v| v.as_str()), Some("gpt-2"));
    assert_eq!(gguf.get("tokenizer.ggml.model").and_then(|v| v.as_str()), Some("gpt2"));
    assert_eq!(gguf.get("general.file_type").and_then(|v| v.as_u64()), Some(1), "MOSTLY_F16");
}

#[test]
fn sentencepiece_vocabulary_round_trips_through_an_hf_directory() {
    use formats::gguf::{GgufWriter, MetadataValue, TensorPlan};
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel { vocab: 6, ..TinyModel::new("LlamaForCausalLM") };
    let hf = dir.path().join("hf");
    model.write_hf(&hf, Dtype::F32, None);
    // Re-express the tiny model as a GGUF carrying a SentencePiece-style vocabulary.
    let first = dir.path().join("first.gguf");
    qforge_ok(&["convert", hf.to_str().unwrap(), "-o", first.to_str().unwrap()]);
    let src = GgufFile::open(&first).unwrap();
    let vocab: Vec<(String, MetadataValue)> = vec![
        ("tokenizer.ggml.model".into(), "llama".into()),
        (
            "tokenizer.ggml.tokens".into(),
            MetadataValue::string_array(["<unk>", "<s>", "</s>", "<0x0A>", "\u{2581}a", "b"]),
        ),
        ("tokenizer.ggml.scores".into(), MetadataValue::f32_array([0.0, 0.0, 0.0, 0.0, -1.5, -2.25])),
        ("tokenizer.ggml.token_type".into(), MetadataValue::i32_array([2, 3, 3, 6, 1, 1])),
        ("tokenizer.ggml.bos_token_id".into(), MetadataValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), MetadataValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), MetadataValue::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), MetadataValue::Bool(true)),
    ];
    let metadata: Vec<(String, MetadataValue)> = src
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with("tokenizer."))
        .cloned()
        .chain(vocab.iter().cloned())
        .collect();
    let spm = dir.path().join("spm.gguf");
    let plan = src
        .tensors()
        .iter()
        .map(|t| TensorPlan { name: t.name.clone(), dims: t.dims.clone(), ggml_type: t.ggml_type })
        .collect();
    let mut w = GgufWriter::create(&spm, &metadata, plan).unwrap();
    for t in src.tensors() {
        w.write_tensor(&t.name, src.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();

    let back_hf = dir.path().join("back");
    let back = dir.path().join("back.gguf");
    qforge_ok(&["convert", spm.to_str().unwrap(), "-o", back_hf.to_str().unwrap()]);
    tokenizers::Tokenizer::from_file(back_hf.join("tokenizer.json")).expect("tokenizers crate loads the export");
    qforge_ok(&["convert", back_hf.to_str().unwrap(), "-o", back.to_str().unwrap()]);
    let back = GgufFile::open(&back).unwrap();
    for (key, value) in &vocab {
        assert_eq!(back.get(key), Some(value), "{key}");
    }
}
