//! `merge-lora` on bad adapters and bad requests: each fails cleanly (one `error:` line naming the file
//! and the problem, exit code 2) and leaves no output behind.

mod common;
mod merge_lora;
#[path = "common/synthetic.rs"]
mod synthetic;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, qforge, qforge_ok};
use formats::safetensors::Dtype;
use merge_lora::{merge_json, p, write_adapter, Tensor};
use serde_json::json;
use synthetic::TinyModel;

const HIDDEN: usize = 32;

struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    gguf: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    TinyModel::new("LlamaForCausalLM").write_hf(&base, Dtype::F32, None);
    let gguf = dir.path().join("base.gguf");
    qforge_ok(&["convert", p(&base), "-o", p(&gguf), "--dtype", "f32"]);
    Setup { dir, base, gguf }
}

const Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj";

fn config() -> serde_json::Value {
    json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
}

fn q_pair(a_shape: &[usize], b_shape: &[usize]) -> Vec<Tensor> {
    vec![
        Tensor::seeded(format!("{Q0}.lora_A.weight"), a_shape, 0.5),
        Tensor::seeded(format!("{Q0}.lora_B.weight"), b_shape, 0.5),
    ]
}

impl Setup {
    fn adapter(&self, name: &str, config: serde_json::Value, tensors: &[Tensor]) -> PathBuf {
        let dir = self.dir.path().join(name);
        write_adapter(&dir, &config, tensors);
        dir
    }

    /// Merges into the GGUF base and checks the failure: clean, naming `path` and `problem`, no output.
    fn fails(&self, adapter: &Path, extra: &[&str], path: &Path, problem: &str) {
        let out = self.dir.path().join("out.gguf");
        let mut args = vec!["merge-lora", p(&self.gguf), "--adapter", p(adapter), "-o", p(&out)];
        args.extend_from_slice(extra);
        assert_clean_failure(&qforge(&args), path, problem);
        assert!(!out.exists(), "a failed merge left {}", out.display());
        let leftovers: Vec<String> =
            common::dir_entries(self.dir.path()).into_iter().filter(|e| e.starts_with(".qforge-tmp")).collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
}

#[test]
fn a_pickled_adapter_is_refused_with_a_way_to_convert_it() {
    let s = setup();
    let dir = s.dir.path().join("pickled");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config().to_string()).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
    s.fails(&dir, &[], &dir.join("adapter_model.bin"), "pickle");
    let err =
        String::from_utf8(qforge(&["merge-lora", p(&s.gguf), "--adapter", p(&dir), "-o", "x.gguf"]).stderr).unwrap();
    assert!(err.contains("save_file") && err.contains("adapter_model.safetensors"), "{err}");
}

#[test]
fn a_directory_without_a_config_is_not_an_adapter() {
    let s = setup();
    let dir = s.dir.path().join("empty");
    std::fs::create_dir(&dir).unwrap();
    s.fails(&dir, &[], &dir, "not a PEFT adapter directory");
}

#[test]
fn a_target_the_base_lacks_is_an_error() {
    let s = setup();
    let tensors = vec![
        Tensor::seeded("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", &[2, HIDDEN], 0.5),
        Tensor::seeded("base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight", &[HIDDEN, 2], 0.5),
    ];
    let a = s.adapter("missing", config(), &tensors);
    s.fails(&a, &[], &a, "targets model.layers.5.self_attn.q_proj.weight, which");
}

#[test]
fn a_shape_mismatch_names_both_shapes() {
    let s = setup();
    let a = s.adapter("shape", config(), &q_pair(&[2, HIDDEN], &[16, 2]));
    s.fails(&a, &[], &a, "gives a [16, 32] update, but base tensor blk.0.attn_q.weight is [32, 32]");
}

#[test]
fn factors_of_different_ranks_are_an_error() {
    let s = setup();
    let a = s.adapter("ranks", config(), &q_pair(&[2, HIDDEN], &[HIDDEN, 3]));
    s.fails(&a, &[], &a.join("adapter_model.safetensors"), "rank mismatch");
    let b = s.adapter(
        "config_rank",
        json!({"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}),
        &q_pair(&[2, HIDDEN], &[HIDDEN, 2]),
    );
    s.fails(&b, &[], &b.join("adapter_model.safetensors"), "rank 4");
}

#[test]
fn a_missing_half_is_an_error() {
    let s = setup();
    let a = s.adapter("half", config(), &q_pair(&[2, HIDDEN], &[HIDDEN, 2])[..1]);
    s.fails(&a, &[], &a.join("adapter_model.safetensors"), "has lora_A but no lora_B");
    let d = s.adapter(
        "dora",
        json!({"r": 2, "lora_alpha": 4, "use_dora": true, "target_modules": ["q_proj"]}),
        &q_pair(&[2, HIDDEN], &[HIDDEN, 2]),
    );
    s.fails(&d, &[], &d.join("adapter_model.safetensors"), "no lora_magnitude_vector");
}

#[test]
fn unknown_tensors_are_warnings_or_errors_under_strict() {
    let s = setup();
    let mut tensors = q_pair(&[2, HIDDEN], &[HIDDEN, 2]);
    tensors.push(Tensor::seeded("base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", &[2, 2], 0.5));
    let a = s.adapter("unknown", config(), &tensors);
    let out = s.dir.path().join("ok.gguf");
    let (summary, stderr) = merge_json(&[p(&s.gguf), "--adapter", p(&a), "-o", p(&out)]);
    assert!(stderr.contains("warning:") && stderr.contains("lora_C"), "{stderr}");
    assert_eq!(summary["merged"].as_array().unwrap().len(), 1);
    s.fails(&a, &["--strict"], &a.join("adapter_model.safetensors"), "unknown tensors (--strict)");
}

#[test]
fn non_finite_adapter_values_are_an_error() {
    let s = setup();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut tensors = q_pair(&[2, HIDDEN], &[HIDDEN, 2]);
        tensors[1].values[7] = bad;
        let a = s.adapter(&format!("bad{bad}"), config(), &tensors);
        s.fails(&a, &[], &a.join("adapter_model.safetensors"), &format!("holds {bad} at index 7"));
    }
}

#[test]
fn an_adapter_that_targets_nothing_is_an_error() {
    let s = setup();
    let a = s.adapter(
        "nothing",
        json!({"r": 2, "lora_alpha": 4, "target_modules": ["k_proj"]}),
        &q_pair(&[2, HIDDEN], &[HIDDEN, 2]),
    );
    s.fails(&a, &[], &a, "targets nothing");
}

#[test]
fn requests_that_do_not_fit_the_base_are_errors() {
    let s = setup();
    let a = s.adapter("fine", config(), &q_pair(&[2, HIDDEN], &[HIDDEN, 2]));
    let out = s.dir.path().join("hf_out");
    let refused = qforge(&["merge-lora", p(&s.base), "--adapter", p(&a), "-o", p(&out), "--type", "Q8_0"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--type applies to GGUF bases"));
    assert_eq!(refused.status.code(), Some(2));
    // Q4_K needs rows of 256 values; the tiny model's have 32.
    s.fails(
        &a,
        &["--type", "Q4_K"],
        &s.gguf,
        "blk.0.attn_q.weight has rows of 32 values, not a whole number of Q4_K blocks",
    );
}

#[test]
fn lora_gguf_export_refuses_what_llama_cpp_cannot_hold() {
    let s = setup();
    let base = p(&s.base).to_string();
    let cases = [
        (
            "dora",
            json!({"r": 2, "lora_alpha": 4, "use_dora": true, "target_modules": ["q_proj"], "base_model_name_or_path": base}),
            "DoRA",
        ),
        (
            "nobase",
            json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "org/absent"}),
            "neither a local path",
        ),
    ];
    for (name, config, problem) in cases {
        let mut tensors = q_pair(&[2, HIDDEN], &[HIDDEN, 2]);
        if config["use_dora"] == true {
            tensors.push(Tensor::seeded(format!("{Q0}.lora_magnitude_vector"), &[HIDDEN], 1.0));
        }
        let a = s.adapter(name, config, &tensors);
        let out = s.dir.path().join(format!("{name}.gguf"));
        assert_clean_failure(&qforge(&["convert", p(&a), "-o", p(&out)]), &a, problem);
        assert!(!out.exists());
    }
}
