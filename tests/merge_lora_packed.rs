//! `merge-lora` into GPTQ (w4 g64) and AWQ (w4 g64) directories qforge made from the SmolLM2 fixture,
//! with the real medical adapter at weight 0.1: the output is a directory of the same format that the
//! runtime scores close to the float merge; the linears the adapter does not touch keep their packed
//! tensors byte for byte; the bytes do not depend on the thread count. Rounded to nearest
//! (`--requantize rtn`, AWQ's only way), every merged weight is within half a quantization step of an
//! f64 reference `W + s·B·A` on the base's dequantized `W`. Re-quantized by GPTQ (GPTQ's default, on a
//! small calibration sample), the merged linears change, the interop tests' numpy reader unpacks them
//! as qforge does, and the model is closer to the float merge on the base's weights than rounding to
//! nearest gets.

mod common;
mod merge_lora;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use common::{assert_clean_failure, binary_scratch, fixture_model, qforge, qforge_ok, shared_data, test_data};
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
    SCRATCH.get_or_init(|| binary_scratch("merge_lora_packed"))
}

fn adapter_dir() -> Option<PathBuf> {
    Some(shared_data(&format!("{ADAPTER}/adapter_config.json"))?.parent().unwrap().to_path_buf())
}

fn adapter_arg() -> String {
    format!("{}:{WEIGHT}", adapter_dir().unwrap().display())
}

/// The fixture quantized by RTN into `format` (`gptq` or `awq`), w4 g64, made once.
fn packed_base(fixture: &Path, format: &str) -> PathBuf {
    static BASES: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut bases = BASES.lock().unwrap_or_else(|e| e.into_inner());
    let base = scratch().join(format!("base.{format}"));
    bases
        .entry(format.to_string())
        .or_insert_with(|| {
            let args =
                ["quantize", p(fixture), "-o", p(&base), "--method", "rtn", "--format", format, "--group-size", "64"];
            qforge_ok(&args);
            base
        })
        .clone()
}

/// The calibration sample of the GPTQ re-runs: small, to keep the tests fast.
const CALIB: [&str; 4] = ["--nsamples", "8", "--seqlen", "128"];

/// `base` merged with the adapter at `--threads threads` and `extra` flags into `out`: the JSON summary.
fn merge_packed(base: &Path, threads: &str, extra: &[&str], out: &Path) -> serde_json::Value {
    let adapter = adapter_arg();
    let mut args = vec!["--threads", threads, "merge-lora", p(base), "--adapter", &adapter, "-o", p(out)];
    args.extend_from_slice(extra);
    args.push("--json");
    let run = qforge(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    serde_json::from_slice(&run.stdout).unwrap()
}

/// `base` merged with the adapter at one thread and `extra` flags, made once: the output directory
/// and the JSON summary.
fn merged(base: &Path, extra: &[&str]) -> (PathBuf, serde_json::Value) {
    static MERGED: Mutex<BTreeMap<String, (PathBuf, serde_json::Value)>> = Mutex::new(BTreeMap::new());
    let name = format!("{}{}", base.file_name().unwrap().to_string_lossy(), extra.join(""));
    let mut done = MERGED.lock().unwrap_or_else(|e| e.into_inner());
    done.entry(name.clone())
        .or_insert_with(|| {
            let out = scratch().join(format!("merged.{name}"));
            let summary = merge_packed(base, "1", extra, &out);
            (out, summary)
        })
        .clone()
}

/// The same merge at two threads writes the same files as `one`, made at one thread.
fn assert_same_at_two_threads(base: &Path, extra: &[&str], one: &Path) {
    let two = tempfile::tempdir_in(scratch()).unwrap();
    let two = two.path().join("merged");
    merge_packed(base, "2", extra, &two);
    for entry in std::fs::read_dir(one).unwrap() {
        let name = entry.unwrap().file_name();
        let (a, b) = (std::fs::read(one.join(&name)).unwrap(), std::fs::read(two.join(&name)));
        assert!(b.is_ok_and(|b| b == a), "{name:?} differs between --threads 1 and 2");
    }
}

/// The summary lists all 60 q/v projections, changed, in the base's own format, put back on the grid
/// as `requantize` says.
fn check_summary(summary: &serde_json::Value, kind: &str, requantize: &str) {
    let deltas = merged_deltas(summary);
    assert_eq!(deltas.len(), LAYERS * MERGED.len());
    assert!(deltas.values().all(|&d| d > 0.0), "{deltas:?}");
    for t in summary["merged"].as_array().unwrap() {
        assert_eq!((t["from"].as_str(), t["to"].as_str()), (Some(kind), Some(kind)), "{t}");
    }
    assert_eq!(summary["requantize"], requantize);
}

/// The merged q/v projection a tensor belongs to: (layer, projection, prefix).
fn merged_prefix(name: &str) -> Option<(usize, &'static str, String)> {
    (0..LAYERS)
        .flat_map(|l| MERGED.map(|proj| (l, proj, format!("model.layers.{l}.self_attn.{proj}"))))
        .find(|(_, _, prefix)| name.strip_prefix(prefix.as_str()).is_some_and(|s| s.starts_with('.')))
}

/// Same tensors in `base` and `merged`; those outside the merged projections byte for byte. Calls
/// `check(layer, projection, prefix)` on each merged projection.
fn assert_untouched_copied(base: &Checkpoint, merged: &Checkpoint, mut check: impl FnMut(usize, &str, &str)) {
    let names =
        |c: &Checkpoint| c.tensors().map(|t| (t.name.to_string(), t.dtype, t.shape.to_vec())).collect::<Vec<_>>();
    assert_eq!(names(base), names(merged));
    let mut untouched = 0;
    for t in base.tensors() {
        match merged_prefix(t.name) {
            None => {
                assert!(t.data == merged.tensor(t.name).unwrap().data, "{} changed", t.name);
                untouched += 1;
            }
            Some((layer, proj, prefix)) if t.name.ends_with(".qweight") => check(layer, proj, &prefix),
            Some(_) => {}
        }
    }
    assert!(untouched > 5 * LAYERS * MERGED.len(), "only {untouched} tensors compared");
}

/// The fixture with the adapter merged in, the merged matrices in F32 and every other tensor as the
/// fixture has it: the float merge, since the fixture's Q4_1 weights are its full-precision values.
fn float_merge(fixture: &Path) -> &'static Path {
    static MERGED: OnceLock<PathBuf> = OnceLock::new();
    MERGED.get_or_init(|| {
        let merged = scratch().join("merged.f32.gguf");
        merge_json(&[p(fixture), "--adapter", &adapter_arg(), "-o", p(&merged), "--type", "F32"]);
        merged
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

fn check_rounded_to_nearest(format: &str, kind: &str) {
    let Some(fixture) = fixture_model() else { return };
    if adapter_dir().is_none() {
        return;
    }
    let gptq = format == "gptq";
    let base = packed_base(&fixture, format);
    // GPTQ bases re-run GPTQ unless asked to round; AWQ bases round by default.
    let flags: &[&str] = if gptq { &["--requantize", "rtn"] } else { &[] };
    let (merged_dir, summary) = merged(&base, flags);
    assert_same_at_two_threads(&base, flags, &merged_dir);
    check_summary(&summary, kind, "rtn");

    // Same tensors; the untouched ones byte for byte, the merged ones within half a step.
    let (b, m) = (Checkpoint::open(&base).unwrap(), Checkpoint::open(&merged_dir).unwrap());
    assert_untouched_copied(&b, &m, |layer, proj, prefix| {
        let (before, after) = (unpacked(&b, prefix, gptq), unpacked(&m, prefix, gptq));
        assert_within_half_a_step(&before, &after, &reference_delta(layer, proj), prefix);
    });
    for file in ["config.json", "tokenizer.json", if gptq { "quantize_config.json" } else { "quant_config.json" }] {
        assert_eq!(std::fs::read(base.join(file)).unwrap(), std::fs::read(merged_dir.join(file)).unwrap(), "{file}");
    }
    assert_close_to_the_float_merge(&fixture, &base, &merged_dir);
}

/// The runtime loads `merged_dir`, and it is not much further from the float merge than `base` is from
/// the float model: its merged linears are quantized twice, so allow up to twice the base's loss.
fn assert_close_to_the_float_merge(fixture: &Path, base: &Path, merged_dir: &Path) {
    let float_merged = float_merge(fixture);
    let log_ratio = |packed: &Path, float: &Path| (perplexity(packed) / perplexity(float)).ln();
    let (merged_gap, base_gap) = (log_ratio(merged_dir, float_merged), log_ratio(base, fixture));
    assert!(
        merged_gap.is_finite() && merged_gap.abs() < 2.0 * base_gap.abs() + 0.05,
        "{}: ln PPL ratio to the float model: merged {merged_gap}, base {base_gap}",
        merged_dir.display()
    );
}

#[test]
fn gptq_base_merges_into_a_gptq_directory_by_rounding_to_nearest() {
    check_rounded_to_nearest("gptq", "GPTQ w4");
}

#[test]
fn awq_base_merges_into_an_awq_directory() {
    check_rounded_to_nearest("awq", "AWQ w4");
}

#[test]
fn gptq_base_merges_into_a_gptq_directory_by_gptq() {
    let Some(fixture) = fixture_model() else { return };
    if adapter_dir().is_none() {
        return;
    }
    let base = packed_base(&fixture, "gptq");
    let (merged_dir, summary) = merged(&base, &CALIB);
    assert_same_at_two_threads(&base, &CALIB, &merged_dir);
    check_summary(&summary, "GPTQ w4", "gptq");

    let (b, m) = (Checkpoint::open(&base).unwrap(), Checkpoint::open(&merged_dir).unwrap());
    assert_untouched_copied(&b, &m, |_, _, prefix| {
        let (before, after) = (unpacked(&b, prefix, true), unpacked(&m, prefix, true));
        assert_ne!(before.codes, after.codes, "{prefix}: the merge changed no code");
        let group = after.in_features / (after.scales.len() / after.out_features);
        assert!(after.g_idx.iter().enumerate().all(|(c, &g)| g as usize == c / group), "{prefix}: g_idx");
    });
    for file in ["config.json", "quantize_config.json"] {
        assert_eq!(std::fs::read(base.join(file)).unwrap(), std::fs::read(merged_dir.join(file)).unwrap(), "{file}");
    }
    assert_close_to_the_float_merge(&fixture, &base, &merged_dir);

    // The interop tests' numpy transcription of the GPTQ loaders unpacks every linear as qforge's own
    // dequantization (an f16 export of the merged directory, within the script's tolerance) has it.
    let Some(python) = venv_python() else { return };
    let dequantized = tempfile::tempdir_in(scratch()).unwrap();
    let dequantized = dequantized.path().join("dequantized");
    qforge_ok(&["convert", p(&merged_dir), "-o", p(&dequantized), "--to", "safetensors", "--dtype", "f16"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/read_gptq_awq.py");
    let run = Command::new(python).arg(script).arg(&merged_dir).arg(&dequantized).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success() && report.contains("210 layers, 0 mismatched"), "{report}");
}

/// Re-running GPTQ must bring the merged model closer to the float merge on the base's own weights
/// (every untouched linear as the base has it, the merged ones unquantized) than rounding to nearest.
#[test]
fn gptq_rerun_is_closer_to_the_float_merge_than_rounding_to_nearest() {
    let Some(fixture) = fixture_model() else { return };
    if adapter_dir().is_none() {
        return;
    }
    let base = packed_base(&fixture, "gptq");
    // In f16: its rounding (2^-11 relative) is far below the quantization step GPTQ and RTN differ by.
    let scratch = tempfile::tempdir_in(scratch()).unwrap();
    let (dequantized, reference) = (scratch.path().join("base.f16"), scratch.path().join("base.f16.merged"));
    qforge_ok(&["convert", p(&base), "-o", p(&dequantized), "--to", "safetensors", "--dtype", "f16"]);
    merge_json(&[p(&dequantized), "--adapter", &adapter_arg(), "-o", p(&reference)]);
    std::fs::remove_dir_all(&dequantized).unwrap();
    let kld = |model: &Path| {
        let text = test_data("wikitext-excerpt.txt");
        let args = ["perplexity", p(model), "--baseline", p(&reference), "--text", p(&text), "--ctx", "128"];
        let out = qforge_ok(&[&args[..], &["--chunks", "2", "--json"]].concat());
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["kld"]["value"].as_f64().unwrap()
    };
    let (gptq, rtn) = (kld(&merged(&base, &CALIB).0), kld(&merged(&base, &["--requantize", "rtn"]).0));
    assert!(gptq.is_finite() && gptq < rtn, "KL-divergence from the float merge: GPTQ re-run {gptq}, RTN {rtn}");
}

/// The interop tests' virtualenv (numpy); `None` after saying why, outside CI.
fn venv_python() -> Option<PathBuf> {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("interop-venv");
    let out = Command::new("python3")
        .arg(interop.join("setup_venv.py"))
        .arg(venv)
        .arg(interop.join("requirements.txt"))
        .output();
    match out {
        Ok(out) if out.status.success() => {
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default()))
        }
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("the interop virtualenv is required under CI"),
        _ => {
            eprintln!("SKIPPED: no interop virtualenv (tests/interop/setup_venv.py failed)");
            None
        }
    }
}

#[test]
fn what_a_packed_base_cannot_take_fails_clearly() {
    let Some(fixture) = fixture_model() else { return };
    let base = packed_base(&fixture, "gptq");
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

    // How the merged linears go back onto the grid, and the calibration flags, where they cannot apply.
    let adapter = scratch().join("adapter.ok");
    write_adapter(&adapter, &json!({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}), &lora_q(576));
    let awq = packed_base(&fixture, "awq");
    let cases: [(&Path, &[&str], &str); 4] = [
        (&awq, &["--requantize", "gptq"], "--requantize gptq: an AWQ base can only be rounded to nearest"),
        (&awq, &["--nsamples", "8"], "--nsamples sets the calibration sample of --requantize gptq"),
        (&base, &["--requantize", "rtn", "--calib", p(&adapter)], "--calib sets the calibration sample"),
        (&fixture, &["--requantize", "rtn"], "--requantize applies to GPTQ/AWQ bases only"),
    ];
    for (i, (model, flags, problem)) in cases.into_iter().enumerate() {
        let out = scratch().join(format!("refused.requantize{i}"));
        let run = merge(&[&[p(model), "--adapter", p(&adapter), "-o", p(&out)][..], flags].concat());
        assert_clean_failure(&run, model, problem);
        assert!(!out.exists(), "{flags:?}: a failed merge left {}", out.display());
    }
}
