//! `merge-lora` into GPTQ (w4 g64) and AWQ (w4 g64) directories qforge made from the SmolLM2 fixture,
//! with the real medical adapter at weight 0.1: the output is a directory of the same format that the
//! runtime scores close to the float merge; the linears the adapter does not touch keep their packed
//! tensors byte for byte; every merged weight is within half a quantization step of an f64 reference
//! `W + s·B·A` on the base's dequantized `W`; the bytes do not depend on the thread count.

mod common;
mod merge_lora;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{assert_clean_failure, fixture_model, qforge, qforge_ok, shared_data, test_data};
use formats::packed::awq::AwqLinear;
use formats::packed::gptq::GptqLinear;
use formats::packed::UnpackedWeights;
use formats::safetensors::Checkpoint;
use merge_lora::{lora_delta, merge, merge_json, merged_deltas, p, write_adapter, Tensor};
use serde_json::json;

const ADAPTER: &str = "adapters/smollm-135m-instruct-medical-r16";
const WEIGHT: f64 = 0.1;
const LAYERS: usize = 30;
const MERGED: [&str; 2] = ["q_proj", "v_proj"];

fn scratch() -> &'static Path {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("merge_lora_packed");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

fn adapter_dir() -> Option<PathBuf> {
    Some(shared_data(&format!("{ADAPTER}/adapter_config.json"))?.parent().unwrap().to_path_buf())
}

fn adapter_arg() -> String {
    format!("{}:{WEIGHT}", adapter_dir().unwrap().display())
}

/// The fixture quantized by RTN into `format` (`gptq` or `awq`), w4 g64.
fn packed_base(fixture: &Path, format: &str) -> PathBuf {
    let base = scratch().join(format!("base.{format}"));
    let args = ["quantize", p(fixture), "-o", p(&base), "--method", "rtn", "--format", format, "--group-size", "64"];
    qforge_ok(&args);
    base
}

/// The fixture's f32 HF export, and the same with the adapter merged in.
fn float_models(fixture: &Path) -> &'static (PathBuf, PathBuf) {
    static MODELS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    MODELS.get_or_init(|| {
        let (hf, merged) = (scratch().join("hf32"), scratch().join("merged.f32"));
        qforge_ok(&["convert", p(fixture), "-o", p(&hf), "--dtype", "f32"]);
        merge_json(&[p(&hf), "--adapter", &adapter_arg(), "-o", p(&merged)]);
        (hf, merged)
    })
}

fn perplexity(model: &Path) -> f64 {
    let text = test_data("wikitext-excerpt.txt");
    let out = qforge_ok(&["perplexity", p(model), "--text", p(&text), "--ctx", "128", "--chunks", "2", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["ppl"].as_f64().unwrap()
}

/// The packed linear `prefix` of a checkpoint, unpacked.
fn unpacked(c: &Checkpoint, prefix: &str, gptq: bool) -> UnpackedWeights {
    let part = |s: &str| c.tensor(&format!("{prefix}.{s}")).unwrap_or_else(|| panic!("{prefix}.{s} missing"));
    if gptq {
        GptqLinear::from_tensors(4, &part("qweight"), &part("qzeros"), &part("scales"), &part("g_idx"))
            .unwrap()
            .unpack()
    } else {
        AwqLinear::from_tensors(&part("qweight"), &part("qzeros"), &part("scales")).unwrap().unpack()
    }
}

/// `s·B·A` of one module of the real adapter, `[out][in]` in f64.
fn reference_delta(layer: usize, proj: &str) -> Vec<f64> {
    let dir = adapter_dir().unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["use_rslora"], false);
    let scale = WEIGHT * config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap();
    let weights = Checkpoint::open(dir.join("adapter_model.safetensors")).unwrap();
    let get = |part: &str| {
        let t = weights.tensor(&format!("base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{part}.weight"));
        let t = t.unwrap();
        (t.shape.to_vec(), t.to_f32().unwrap())
    };
    let ((a_shape, a), (_, b)) = (get("A"), get("B"));
    lora_delta(&a, &b, a_shape[0], scale)
}

/// Every merged weight within half a step (its group's scale) of `W + s·B·A` on the base's weights, and
/// the merged linear rounded afresh: consecutive groups, codes not all the base's.
fn assert_within_half_a_step(base: &UnpackedWeights, merged: &UnpackedWeights, delta: &[f64], name: &str) {
    let (out, inp) = (merged.out_features, merged.in_features);
    assert_eq!((base.out_features, base.in_features), (out, inp), "{name}");
    let group = inp / (merged.scales.len() / out);
    assert!(merged.g_idx.iter().enumerate().all(|(c, &g)| g as usize == c / group), "{name}: g_idx");
    assert_ne!(base.codes, merged.codes, "{name}: the merge changed no code");
    let (w, got) = (base.dequantize(), merged.dequantize());
    for o in 0..out {
        for c in 0..inp {
            let i = o * inp + c;
            let want = w[i] as f64 + delta[i];
            let step = merged.scales[(c / group) * out + o] as f64;
            let err = (got[i] as f64 - want).abs();
            // Half a step, plus the f16 rounding of the scale (2^-11 relative) over up to 15 codes.
            assert!(err <= step * (0.5 + 15.0 / 2048.0) + 1e-7, "{name}[{o}][{c}]: {} vs {want} (step {step})", got[i]);
        }
    }
}

fn check_format(format: &str, kind: &str) {
    let Some(fixture) = fixture_model() else { return };
    if adapter_dir().is_none() {
        return;
    }
    let gptq = format == "gptq";
    let base = packed_base(&fixture, format);
    let outputs: Vec<PathBuf> = ["1", "2"].iter().map(|t| scratch().join(format!("merged.{format}.t{t}"))).collect();
    let mut summary = None;
    for (threads, out) in ["1", "2"].iter().zip(&outputs) {
        let args = ["--threads", threads, "merge-lora", p(&base), "--adapter", &adapter_arg(), "-o", p(out), "--json"];
        let run = qforge(&args);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        summary = Some(serde_json::from_slice::<serde_json::Value>(&run.stdout).unwrap());
    }
    let merged_dir = &outputs[0];
    for entry in std::fs::read_dir(merged_dir).unwrap() {
        let name = entry.unwrap().file_name();
        let (one, two) = (std::fs::read(merged_dir.join(&name)).unwrap(), std::fs::read(outputs[1].join(&name)));
        assert!(two.is_ok_and(|two| two == one), "{name:?} differs between --threads 1 and 2");
    }

    // The summary: all 60 q/v projections, changed, in the base's own format.
    let summary = summary.unwrap();
    let deltas = merged_deltas(&summary);
    assert_eq!(deltas.len(), LAYERS * MERGED.len());
    assert!(deltas.values().all(|&d| d > 0.0), "{deltas:?}");
    for t in summary["merged"].as_array().unwrap() {
        assert_eq!((t["from"].as_str(), t["to"].as_str()), (Some(kind), Some(kind)), "{t}");
    }

    // Same tensors; the untouched ones byte for byte, the merged ones within half a step.
    let (b, m) = (Checkpoint::open(&base).unwrap(), Checkpoint::open(merged_dir).unwrap());
    let names =
        |c: &Checkpoint| c.tensors().map(|t| (t.name.to_string(), t.dtype, t.shape.to_vec())).collect::<Vec<_>>();
    assert_eq!(names(&b), names(&m));
    let merged_prefix = |name: &str| {
        (0..LAYERS)
            .flat_map(|l| MERGED.map(|proj| (l, proj, format!("model.layers.{l}.self_attn.{proj}"))))
            .find(|(_, _, prefix)| name.strip_prefix(prefix.as_str()).is_some_and(|s| s.starts_with('.')))
    };
    let mut untouched = 0;
    for t in b.tensors() {
        match merged_prefix(t.name) {
            None => {
                assert!(t.data == m.tensor(t.name).unwrap().data, "{} changed", t.name);
                untouched += 1;
            }
            Some((layer, proj, prefix)) if t.name.ends_with(".qweight") => {
                let (before, after) = (unpacked(&b, &prefix, gptq), unpacked(&m, &prefix, gptq));
                assert_within_half_a_step(&before, &after, &reference_delta(layer, proj), &prefix);
            }
            Some(_) => {}
        }
    }
    assert!(untouched > 5 * LAYERS * MERGED.len(), "only {untouched} tensors compared");
    for file in ["config.json", "tokenizer.json", if gptq { "quantize_config.json" } else { "quant_config.json" }] {
        assert_eq!(std::fs::read(base.join(file)).unwrap(), std::fs::read(merged_dir.join(file)).unwrap(), "{file}");
    }

    // The runtime loads it, and it is not much further from the float merge than the base is from the float
    // model: its merged linears are rounded twice, so allow up to twice the base's loss.
    let (float_base, float_merged) = float_models(&fixture);
    let log_ratio = |packed: &Path, float: &Path| (perplexity(packed) / perplexity(float)).ln();
    let (merged_gap, base_gap) = (log_ratio(merged_dir, float_merged), log_ratio(&base, float_base));
    assert!(
        merged_gap.is_finite() && merged_gap.abs() < 2.0 * base_gap.abs() + 0.05,
        "{format}: ln PPL ratio to the float model: merged {merged_gap}, base {base_gap}"
    );
}

#[test]
fn gptq_base_merges_into_a_gptq_directory() {
    check_format("gptq", "GPTQ w4");
}

#[test]
fn awq_base_merges_into_an_awq_directory() {
    check_format("awq", "AWQ w4");
}

#[test]
fn what_a_packed_base_cannot_take_fails_clearly() {
    let Some(fixture) = fixture_model() else { return };
    let base = scratch().join("errors.gptq");
    let args = ["quantize", p(&fixture), "-o", p(&base), "--method", "rtn", "--format", "gptq", "--group-size", "64"];
    qforge_ok(&args);
    let key = |module: &str, part: &str| format!("base_model.model.{module}.{part}");
    let q = "model.layers.0.self_attn.q_proj";
    let lora_q = |inp: usize| {
        vec![
            Tensor::seeded(key(q, "lora_A.weight"), &[2, inp], 0.1),
            Tensor::seeded(key(q, "lora_B.weight"), &[576, 2], 0.1),
        ]
    };
    let cases: Vec<(&str, serde_json::Value, Vec<Tensor>, &str)> = vec![
        (
            "shape",
            json!({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}),
            lora_q(100),
            "[576, 100] update, but base tensor model.layers.0.self_attn.q_proj.weight is [576, 576]",
        ),
        (
            "saved",
            json!({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "modules_to_save": ["k_proj"]}),
            lora_q(576)
                .into_iter()
                .chain([Tensor::seeded(key("model.layers.0.self_attn.k_proj", "weight"), &[192, 576], 0.1)])
                .collect(),
            "whole tensors cannot replace packed linears",
        ),
        (
            "embedding",
            json!({"r": 2, "lora_alpha": 2, "target_modules": ["embed_tokens"]}),
            vec![
                Tensor::seeded(key("model.embed_tokens", "lora_embedding_A"), &[2, 49152], 0.1),
                Tensor::seeded(key("model.embed_tokens", "lora_embedding_B"), &[576, 2], 0.1),
            ],
            "a float tensor of the packed base",
        ),
    ];
    for (name, config, tensors, problem) in cases {
        let adapter = scratch().join(format!("adapter.{name}"));
        write_adapter(&adapter, &config, &tensors);
        let out = scratch().join(format!("refused.{name}"));
        let run = merge(&[p(&base), "--adapter", p(&adapter), "-o", p(&out)]);
        assert_clean_failure(&run, &adapter, problem);
        assert!(!out.exists(), "{name}: a failed merge left {}", out.display());
    }
    let adapter = scratch().join("adapter.shape");
    let run = merge(&[p(&base), "--adapter", p(&adapter), "-o", p(&scratch().join("x")), "--dtype", "f16"]);
    assert_clean_failure(&run, &base, "--dtype do not apply");
}
