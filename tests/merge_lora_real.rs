//! `merge-lora` with the real SmolLM2 medical adapter (r=16, alpha=32, q_proj+v_proj) on the SmolLM2
//! fixture: its f32 HF export, its F16 GGUF, and the quantized fixture itself. Every merged weight is
//! checked against an f64 computation of W + s·B·A written here; every other tensor must be untouched.

mod common;
mod merge_lora;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{binary_scratch, fixture_model, qforge, qforge_ok, shared_data};
use formats::gguf::GgufFile;
use formats::safetensors::Checkpoint;
use formats::GgmlType;
use half::f16;
use merge_lora::{assert_close, gguf_tensor, llama_cpp_permute, lora_delta, merge_json, merged_deltas, p, plus};

const ADAPTER: &str = "adapters/smollm-135m-instruct-medical-r16";
const LAYERS: usize = 30;
const PROJECTIONS: [(&str, &str); 2] = [("q_proj", "attn_q"), ("v_proj", "attn_v")];

/// The fixture's f32 HF export and F16 GGUF, made once per test run.
struct Exports {
    hf: PathBuf,
    f16: PathBuf,
    scratch: PathBuf,
}

fn exports() -> Option<&'static Exports> {
    static EXPORTS: OnceLock<Option<Exports>> = OnceLock::new();
    EXPORTS
        .get_or_init(|| {
            let fixture = fixture_model()?;
            shared_data(&format!("{ADAPTER}/adapter_config.json"))?;
            let scratch = binary_scratch("merge_lora_real");
            let (hf, f16) = (scratch.join("hf32"), scratch.join("f16.gguf"));
            qforge_ok(&["convert", p(&fixture), "-o", p(&hf), "--dtype", "f32"]);
            qforge_ok(&["convert", p(&fixture), "-o", p(&f16), "--to", "gguf", "--dtype", "f16"]);
            Some(Exports { hf, f16, scratch })
        })
        .as_ref()
}

fn adapter_dir() -> PathBuf {
    shared_data(&format!("{ADAPTER}/adapter_config.json")).unwrap().parent().unwrap().to_path_buf()
}

/// The adapter's scale, from its config: lora_alpha / r.
fn adapter_scale() -> f64 {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["use_rslora"], false);
    config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap()
}

/// `s · B·A` of one module, HF order `[out][in]`.
fn reference_delta(layer: usize, proj: &str) -> Vec<f64> {
    let weights = Checkpoint::open(adapter_dir().join("adapter_model.safetensors")).unwrap();
    let get = |part: &str| {
        let name = format!("base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{part}.weight");
        let t = weights.tensor(&name).unwrap();
        (t.shape.to_vec(), t.to_f32().unwrap())
    };
    let ((a_shape, a), (_, b)) = (get("A"), get("B"));
    lora_delta(&a, &b, a_shape[0], adapter_scale())
}

fn merged_names(hf: bool) -> Vec<String> {
    let mut names: Vec<String> = (0..LAYERS)
        .flat_map(|l| {
            PROJECTIONS.iter().map(move |(h, g)| {
                if hf {
                    format!("model.layers.{l}.self_attn.{h}.weight")
                } else {
                    format!("blk.{l}.{g}.weight")
                }
            })
        })
        .collect();
    names.sort();
    names
}

fn assert_summary_covers_every_target(summary: &serde_json::Value, hf: bool) {
    let deltas = merged_deltas(summary);
    assert_eq!(deltas.keys().cloned().collect::<Vec<_>>(), merged_names(hf));
    for (name, d) in &deltas {
        assert!(d.is_finite() && *d > 0.0, "{name}: relative delta {d}");
    }
    for t in summary["merged"].as_array().unwrap() {
        assert_eq!(t["scales"].as_array().unwrap().len(), 1);
        assert!((t["scales"][0].as_f64().unwrap() - adapter_scale()).abs() < 1e-12, "{t}");
        assert_eq!(t["rank"], 16);
    }
}

#[test]
fn f32_hf_merge_equals_the_f64_reference_and_leaves_the_rest_untouched() {
    let Some(ex) = exports() else { return };
    let out = tempfile::tempdir_in(&ex.scratch).unwrap();
    let merged = out.path().join("merged");
    let (summary, _) = merge_json(&[p(&ex.hf), "--adapter", p(&adapter_dir()), "-o", p(&merged)]);
    assert_summary_covers_every_target(&summary, true);

    let (base, result) = (Checkpoint::open(&ex.hf).unwrap(), Checkpoint::open(&merged).unwrap());
    assert_eq!(base.tensor_names(), result.tensor_names());
    let targets = merged_names(true);
    for t in base.tensors() {
        let r = result.tensor(t.name).unwrap();
        assert_eq!((r.dtype, r.shape), (t.dtype, t.shape), "{}", t.name);
        if !targets.iter().any(|n| n == t.name) {
            assert!(r.data == t.data, "{} changed", t.name);
            continue;
        }
        let (layer, proj) = parse_hf_target(t.name);
        let want = plus(&t.to_f32().unwrap(), &reference_delta(layer, proj));
        assert_close(t.name, &r.to_f32().unwrap(), &want);
    }
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(ex.hf.join(f)).unwrap(), std::fs::read(merged.join(f)).unwrap(), "{f}");
    }
}

fn parse_hf_target(name: &str) -> (usize, &str) {
    let rest = name.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    (layer.parse().unwrap(), rest.strip_prefix("self_attn.").unwrap().strip_suffix(".weight").unwrap())
}

fn parse_gguf_target(name: &str) -> (usize, &'static str) {
    let rest = name.strip_prefix("blk.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let proj = PROJECTIONS.iter().find(|(_, g)| rest == format!("{g}.weight")).unwrap().0;
    (layer.parse().unwrap(), proj)
}

/// `x` correctly rounded to f16 (nearest, ties to even), decided on the exact f64 distances; `half`'s
/// own conversion looks at too few of the low bits to be exact near ties.
fn nearest_f16(x: f64) -> f16 {
    let guess = f16::from_f64(x);
    let neighbours = [guess.to_bits().wrapping_sub(1), guess.to_bits(), guess.to_bits().wrapping_add(1)];
    neighbours
        .into_iter()
        .map(f16::from_bits)
        .filter(|c| c.is_finite())
        .min_by(|a, b| {
            let (da, db) = ((a.to_f64() - x).abs(), (b.to_f64() - x).abs());
            da.partial_cmp(&db).unwrap().then((a.to_bits() & 1).cmp(&(b.to_bits() & 1)))
        })
        .unwrap()
}

/// Distance in units in the last place between two finite f16 values of the same sign or around zero.
fn ulps(a: f16, b: f16) -> u32 {
    let key = |x: f16| {
        let bits = x.to_bits() as i32;
        if bits & 0x8000 != 0 {
            -(bits & 0x7fff)
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

#[test]
fn f16_gguf_merge_is_the_f16_rounding_of_the_reference_with_permuted_q_rows() {
    let Some(ex) = exports() else { return };
    let out = tempfile::tempdir_in(&ex.scratch).unwrap();
    let merged = out.path().join("merged.gguf");
    let (summary, _) = merge_json(&[p(&ex.f16), "--adapter", p(&adapter_dir()), "-o", p(&merged)]);
    assert_summary_covers_every_target(&summary, false);

    let (base, result) = (GgufFile::open(&ex.f16).unwrap(), GgufFile::open(&merged).unwrap());
    assert_eq!(base.metadata(), result.metadata());
    let heads = base.get("llama.attention.head_count").unwrap().as_u64().unwrap() as usize;
    let targets = merged_names(false);
    let mut worst = 0;
    for t in base.tensors() {
        let r = result.tensor(&t.name).unwrap();
        assert_eq!((&r.dims, r.ggml_type), (&t.dims, t.ggml_type), "{}", t.name);
        if !targets.contains(&t.name) {
            assert!(result.tensor_data(r) == base.tensor_data(t), "{} changed", t.name);
            continue;
        }
        assert_eq!(t.ggml_type, GgmlType::F16);
        let (layer, proj) = parse_gguf_target(&t.name);
        let delta = reference_delta(layer, proj);
        let delta = if proj == "q_proj" { llama_cpp_permute(&delta, heads, t.dims[0] as usize) } else { delta };
        let want = plus(&gguf_tensor(&base, &t.name), &delta);
        for (i, (&g, &w)) in gguf_tensor(&result, &t.name).iter().zip(&want).enumerate() {
            let d = ulps(f16::from_f32(g), nearest_f16(w));
            assert!(d <= 1, "{}[{i}]: {g} is {d} ulps from the f16 rounding of {w}", t.name);
            worst = worst.max(d);
        }
    }
    eprintln!("worst distance from the correctly rounded f64 reference: {worst} ulp");
}

#[test]
fn the_adapter_as_a_llama_cpp_lora_gguf_reads_back_and_merges_to_the_same_bytes() {
    let Some(ex) = exports() else { return };
    let out = tempfile::tempdir_in(&ex.scratch).unwrap();
    // The LoRA GGUF needs the base's names and q/k layout: point the config at the local base.
    let adapter = out.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(adapter_dir().join("adapter_model.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir().join("adapter_config.json")).unwrap()).unwrap();
    config["base_model_name_or_path"] = p(&ex.hf).into();
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();

    let lora = out.path().join("adapter.gguf");
    qforge_ok(&["convert", p(&adapter), "-o", p(&lora)]);
    let file = GgufFile::open(&lora).unwrap();
    assert_eq!(file.get("general.type").unwrap().as_str(), Some("adapter"));
    assert_eq!(file.get("adapter.type").unwrap().as_str(), Some("lora"));
    assert_eq!(file.get("general.architecture").unwrap().as_str(), Some("llama"));
    assert_eq!(file.get("adapter.lora.alpha").unwrap().as_f64(), Some(32.0));
    assert_eq!(file.tensors().len(), 2 * LAYERS * PROJECTIONS.len());
    let q = file.tensor("blk.0.attn_q.weight.lora_a").unwrap();
    assert_eq!(q.dims, vec![576, 16]);
    assert_eq!(file.tensor("blk.0.attn_v.weight.lora_b").unwrap().dims, vec![16, 192]);

    let (from_peft, from_gguf) = (out.path().join("peft.gguf"), out.path().join("lora.gguf"));
    merge_json(&[p(&ex.f16), "--adapter", p(&adapter_dir()), "-o", p(&from_peft)]);
    merge_json(&[p(&ex.f16), "--adapter", p(&lora), "-o", p(&from_gguf)]);
    assert!(std::fs::read(&from_peft).unwrap() == std::fs::read(&from_gguf).unwrap(), "the two merges differ");

    // An HF base cannot take it: its rows are in GGUF order.
    let refused = qforge(&["merge-lora", p(&ex.hf), "--adapter", p(&lora), "-o", p(&out.path().join("x"))]);
    common::assert_clean_failure(&refused, &lora, "merges into GGUF bases");
}

#[test]
fn a_quantized_base_is_requantized_the_same_at_any_thread_count() {
    let Some(ex) = exports() else { return };
    let fixture = fixture_model().unwrap();
    let out = tempfile::tempdir_in(&ex.scratch).unwrap();
    let adapter = adapter_dir();
    let run = |threads: &str, extra: &[&str], name: &str| {
        let path = out.path().join(name);
        let mut args = vec![p(&fixture), "--adapter", p(&adapter), "-o", p(&path), "--threads", threads];
        args.extend_from_slice(extra);
        let (summary, stderr) = merge_json(&args);
        (path, summary, stderr)
    };
    let (one, summary, stderr) = run("1", &[], "one.gguf");
    let (two, _, _) = run("2", &[], "two.gguf");
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(), "thread count changed the output");
    assert!(stderr.contains("quantized again"), "no requantization warning: {stderr}");
    assert_eq!(merged_deltas(&summary).len(), 60);

    let (q8, summary, _) = run("2", &["--type", "Q8_0"], "q8.gguf");
    let (base, requantized, q8) =
        (GgufFile::open(&fixture).unwrap(), GgufFile::open(&one).unwrap(), GgufFile::open(&q8).unwrap());
    let heads = base.get("llama.attention.head_count").unwrap().as_u64().unwrap() as usize;
    let targets = merged_names(false);
    for t in base.tensors() {
        for (result, ty) in [(&requantized, t.ggml_type), (&q8, GgmlType::Q8_0)] {
            let r = result.tensor(&t.name).unwrap();
            if !targets.contains(&t.name) {
                assert!(result.tensor_data(r) == base.tensor_data(t), "{} changed", t.name);
                continue;
            }
            assert_eq!(r.ggml_type, ty, "{}", t.name);
            let (layer, proj) = parse_gguf_target(&t.name);
            let delta = reference_delta(layer, proj);
            let delta = if proj == "q_proj" { llama_cpp_permute(&delta, heads, t.dims[0] as usize) } else { delta };
            let want = plus(&gguf_tensor(&base, &t.name), &delta);
            assert_within_one_quantization_step(&t.name, ty, &gguf_tensor(result, &t.name), &want);
        }
    }
    assert!(summary["merged"].as_array().unwrap().iter().all(|t| t["to"] == "Q8_0"));
}

/// Every value within one quantization step of its 32-value block (Q8_0: amax/127; Q4_1: range/15).
fn assert_within_one_quantization_step(name: &str, ty: GgmlType, got: &[f32], want: &[f64]) {
    for (b, (g, w)) in got.chunks(32).zip(want.chunks(32)).enumerate() {
        let (lo, hi) = w.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        let step = match ty {
            GgmlType::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
            GgmlType::Q4_1 => (hi - lo) / 15.0,
            other => panic!("no bound for {other}"),
        };
        for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert!((g as f64 - w).abs() <= step * 1.01, "{name} block {b}[{i}]: {g} vs {w} (step {step})");
        }
    }
}
