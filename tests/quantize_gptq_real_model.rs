//! `qforge quantize --format gptq|awq` on the real SmolLM2 fixture: the HF directories hold the packed
//! layouts the loaders expect (shapes, dtypes, config files, the v1 zero-point convention), unpacking
//! them with `formats::packed` gives exactly the integers round-to-nearest computes from the model's
//! HF-order weights (so llama.cpp's permuted q/k rows were put back), and the bytes do not depend on
//! the thread count.

mod common;

use std::path::Path;

use common::{fixture_model, qforge_ok};
use formats::packed::awq::AwqLinear;
use formats::packed::gptq::GptqLinear;
use formats::packed::UnpackedWeights;
use formats::safetensors::{Checkpoint, Dtype};
use qforge::model::ModelSource;
use qforge::quant::gptq::{self, GptqConfig};
use serde_json::Value;

const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn quantize(fixture: &Path, out: &Path, threads: &str, args: &[&str]) {
    let mut all = vec!["quantize", fixture.to_str().unwrap(), "-o", out.to_str().unwrap(), "--threads", threads];
    all.extend_from_slice(args);
    qforge_ok(&all);
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every file of `dir`, by name, as bytes.
fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    common::dir_entries(dir).into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap())).collect()
}

fn gptq_layer(ckpt: &Checkpoint, prefix: &str, bits: u32) -> GptqLinear {
    let t = |s: &str| ckpt.tensor(&format!("{prefix}.{s}")).unwrap_or_else(|| panic!("{prefix}.{s} missing"));
    GptqLinear::from_tensors(bits, &t("qweight"), &t("qzeros"), &t("scales"), &t("g_idx")).unwrap()
}

fn awq_layer(ckpt: &Checkpoint, prefix: &str) -> AwqLinear {
    let t = |s: &str| ckpt.tensor(&format!("{prefix}.{s}")).unwrap_or_else(|| panic!("{prefix}.{s} missing"));
    AwqLinear::from_tensors(&t("qweight"), &t("qzeros"), &t("scales")).unwrap()
}

/// Round-to-nearest of the source's `prefix.weight` in HF row order, as the packed integers.
fn rtn_hf_order(source: &ModelSource, prefix: &str, config: &GptqConfig) -> UnpackedWeights {
    let t = source.tensors().iter().find(|t| t.hf_name.as_deref() == Some(&format!("{prefix}.weight"))).unwrap();
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let q = gptq::rtn(&source.load_hf_order(t).unwrap(), rows, cols, config).unwrap();
    UnpackedWeights {
        out_features: rows,
        in_features: cols,
        bits: q.bits,
        codes: q.codes,
        zeros: q.zeros,
        scales: q.scales,
        g_idx: q.g_idx,
    }
}

/// The non-quantized tensors are f16 copies of the source's, and the tied head is not duplicated.
fn check_float_tensors(ckpt: &Checkpoint, source: &ModelSource) {
    let embed = ckpt.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((embed.dtype, embed.shape), (Dtype::F16, &[49152, 576][..]));
    let norm = ckpt.tensor("model.layers.7.post_attention_layernorm.weight").unwrap();
    assert_eq!(norm.dtype, Dtype::F16);
    let expected = source.load_hf_order(source.tensor("blk.7.ffn_norm.weight").unwrap()).unwrap();
    let got = norm.to_f32().unwrap();
    assert!(got.iter().zip(&expected).all(|(g, e)| (g - e).abs() <= e.abs() * 1e-3), "norm not copied");
    assert!(ckpt.tensor("lm_head.weight").is_none(), "the fixture ties its head to the embedding");
    assert!(ckpt.tensor("model.layers.0.self_attn.q_proj.weight").is_none());
}

#[test]
fn rtn_gptq_export_unpacks_to_the_hf_order_rounding_and_is_thread_independent() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("t1"), dir.path().join("t2"));
    let args = ["--format", "gptq", "--bits", "8", "--group-size", "64"];
    quantize(&fixture, &one, "1", &args);
    quantize(&fixture, &two, "2", &args);
    assert!(dir_bytes(&one) == dir_bytes(&two), "bytes differ between 1 and 2 threads");
    assert_eq!(
        common::dir_entries(&one),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "quantize_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );

    let config = read_json(&one.join("config.json"));
    assert_eq!(config["torch_dtype"], "float16");
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    let q = &config["quantization_config"];
    assert_eq!((q["quant_method"].as_str(), q["checkpoint_format"].as_str()), (Some("gptq"), Some("gptq")));
    assert_eq!((q["bits"].as_u64(), q["group_size"].as_i64()), (Some(8), Some(64)));
    assert_eq!((q["sym"].as_bool(), q["desc_act"].as_bool()), (Some(true), Some(false)));
    assert_eq!(read_json(&one.join("quantize_config.json")), *q);

    let source = ModelSource::open(&fixture).unwrap();
    let ckpt = Checkpoint::open(&one).unwrap();
    check_float_tensors(&ckpt, &source);
    let rtn = GptqConfig { bits: 8, group_size: Some(64), ..GptqConfig::default() };
    for layer in [0, 17, 29] {
        for linear in LINEARS {
            let prefix = format!("model.layers.{layer}.{linear}");
            let unpacked = gptq_layer(&ckpt, &prefix, 8).unpack();
            assert!(unpacked == rtn_hf_order(&source, &prefix, &rtn), "{prefix} differs from RTN in HF order");
            assert!(unpacked.zeros.iter().all(|&z| z == 128), "{prefix}: symmetric 8-bit zero points are 128");
        }
    }
    // The dequantized q projection follows the HF-order weight to within half a step of its grid.
    let prefix = "model.layers.3.self_attn.q_proj";
    let t = source.tensor("blk.3.attn_q.weight").unwrap();
    let (hf, layer) = (source.load_hf_order(t).unwrap(), gptq_layer(&ckpt, prefix, 8).unpack());
    let max_scale = layer.scales.iter().fold(0f32, |m, &s| m.max(s));
    let worst = layer.dequantize().iter().zip(&hf).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= max_scale * 0.51, "q_proj off by {worst} (largest step {max_scale})");

    // The runtime reads the directory back: 8 bits barely move the perplexity of the GGUF source.
    let ppl = |model: &Path| -> f64 {
        let text = common::test_data("wikitext-excerpt.txt");
        let args = ["perplexity", model.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", "128"];
        let json: Value =
            serde_json::from_str(&qforge_ok(&[&args[..], &["--chunks", "3", "--json"]].concat())).unwrap();
        json["ppl"].as_f64().unwrap()
    };
    let (source_ppl, export_ppl) = (ppl(&fixture), ppl(&one));
    assert!(export_ppl.is_finite() && (export_ppl / source_ppl - 1.0).abs() < 0.02, "{export_ppl} vs {source_ppl}");
}

#[test]
fn rtn_awq_export_holds_the_gemm_layout() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("t1"), dir.path().join("t2"));
    let args = ["--format", "awq", "--group-size", "64"];
    quantize(&fixture, &one, "1", &args);
    quantize(&fixture, &two, "2", &args);
    assert!(dir_bytes(&one) == dir_bytes(&two), "bytes differ between 1 and 2 threads");
    assert!(!one.join("quantize_config.json").exists());

    let q = &read_json(&one.join("config.json"))["quantization_config"];
    assert_eq!((q["quant_method"].as_str(), q["version"].as_str()), (Some("awq"), Some("gemm")));
    assert_eq!(
        (q["bits"].as_u64(), q["group_size"].as_u64(), q["zero_point"].as_bool()),
        (Some(4), Some(64), Some(true))
    );
    assert_eq!(read_json(&one.join("quant_config.json"))["w_bit"], 4);

    let source = ModelSource::open(&fixture).unwrap();
    let ckpt = Checkpoint::open(&one).unwrap();
    check_float_tensors(&ckpt, &source);
    assert!(ckpt.tensor("model.layers.0.self_attn.q_proj.g_idx").is_none(), "AWQ GEMM has no g_idx");
    let rtn = GptqConfig { bits: 4, group_size: Some(64), sym: false, ..GptqConfig::default() };
    let mut asymmetric = false;
    for layer in [0, 29] {
        for linear in LINEARS {
            let prefix = format!("model.layers.{layer}.{linear}");
            let unpacked = awq_layer(&ckpt, &prefix).unpack();
            assert!(unpacked == rtn_hf_order(&source, &prefix, &rtn), "{prefix} differs from RTN in HF order");
            asymmetric |= unpacked.zeros.iter().any(|&z| z != 8);
        }
    }
    assert!(asymmetric, "AWQ's default grid has per-group zero points");
}

#[test]
fn gptq_export_is_thread_independent_follows_the_weights_and_stores_zero_points_as_seven() {
    let Some(fixture) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("t1"), dir.path().join("t2"));
    let args = ["--method", "gptq", "--group-size", "64", "--nsamples", "8", "--seqlen", "64"];
    quantize(&fixture, &one, "1", &args);
    quantize(&fixture, &two, "2", &args);
    assert!(dir_bytes(&one) == dir_bytes(&two), "bytes differ between 1 and 2 threads");
    let q = &read_json(&one.join("config.json"))["quantization_config"];
    assert_eq!((q["bits"].as_u64(), q["group_size"].as_i64(), q["sym"].as_bool()), (Some(4), Some(64), Some(true)));

    let ckpt = Checkpoint::open(&one).unwrap();
    let mut words = 0;
    for t in ckpt.tensors().filter(|t| t.name.ends_with(".qzeros")) {
        assert_eq!(t.dtype, Dtype::I32);
        for w in t.data.chunks_exact(4) {
            assert_eq!(u32::from_le_bytes(w.try_into().unwrap()), 0x7777_7777, "{}", t.name);
            words += 1;
        }
    }
    // 30 blocks × 7 linears × at least 9 groups × at least 24 words per group row.
    assert!(words >= 30 * 7 * 9 * 24, "{words} qzeros words");

    // GPTQ moves weights by more than half a step, but each linear stays close to the HF-order weight
    // (a q/k row left in llama.cpp's order would be off by about the weights' own size).
    let source = ModelSource::open(&fixture).unwrap();
    for (gguf, prefix) in [
        ("blk.5.attn_q.weight", "model.layers.5.self_attn.q_proj"),
        ("blk.5.attn_k.weight", "model.layers.5.self_attn.k_proj"),
        ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj"),
    ] {
        let hf = source.load_hf_order(source.tensor(gguf).unwrap()).unwrap();
        let layer = gptq_layer(&ckpt, prefix, 4).unpack();
        assert!(layer.g_idx.iter().enumerate().all(|(c, &g)| g as usize == c / 64), "{prefix}: g_idx");
        let err: f64 = layer.dequantize().iter().zip(&hf).map(|(a, b)| f64::from(a - b).powi(2)).sum();
        let norm: f64 = hf.iter().map(|&b| f64::from(b).powi(2)).sum();
        let relative = (err / norm).sqrt();
        assert!(relative < 0.25, "{prefix}: relative error {relative}");
    }
}
