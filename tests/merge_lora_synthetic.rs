//! `merge-lora` with adapters written by the tests onto tiny synthetic checkpoints: every PEFT variant
//! (alpha/r and rsLoRA scaling, DoRA, fan_in_fan_out, rank/alpha patterns, embeddings, modules_to_save,
//! biases, layer selection, weighted sums of adapters), each checked against an f64 reference computed
//! here from the definitions.

mod common;
mod merge_lora;
#[path = "common/synthetic.rs"]
mod synthetic;

use std::path::{Path, PathBuf};

use common::qforge_ok;
use formats::gguf::GgufFile;
use formats::safetensors::{Checkpoint, Dtype};
use merge_lora::{
    assert_close, gguf_tensor, hf_tensor, llama_cpp_permute, lora_delta, merge_json, merged_deltas, p, plus, transpose,
    write_adapter, write_safetensors, Tensor,
};
use serde_json::{json, Value};
use synthetic::TinyModel;

const HIDDEN: usize = 32;
const KV: usize = 16;

fn tiny(dir: &Path, model: TinyModel) -> PathBuf {
    let hf = dir.join("base");
    model.write_hf(&hf, Dtype::F32, None);
    hf
}

fn llama() -> TinyModel {
    TinyModel::new("LlamaForCausalLM")
}

fn key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}")
}

fn attn(layer: usize, proj: &str) -> String {
    format!("model.layers.{layer}.self_attn.{proj}")
}

/// A and B of a linear module (`A [r, in]`, `B [out, r]`), named as PEFT saves them.
fn lora_pair(module: &str, rank: usize, n_in: usize, n_out: usize) -> [Tensor; 2] {
    [
        Tensor::seeded(key(module, "lora_A.weight"), &[rank, n_in], 0.5),
        Tensor::seeded(key(module, "lora_B.weight"), &[n_out, rank], 0.5),
    ]
}

fn values_of<'a>(tensors: &'a [Tensor], name: &str) -> &'a [f32] {
    &tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("{name}")).values
}

/// `scale · B·A` of `module` from the adapter's tensors, `[out][in]`.
fn delta(tensors: &[Tensor], module: &str, rank: usize, scale: f64) -> Vec<f64> {
    lora_delta(
        values_of(tensors, &key(module, "lora_A.weight")),
        values_of(tensors, &key(module, "lora_B.weight")),
        rank,
        scale,
    )
}

/// Asserts the merged HF tensor `name` equals `want` of the base's values.
fn check(base: &Path, merged: &Path, name: &str, want: impl FnOnce(Vec<f32>) -> Vec<f64>) {
    let (_, w) = hf_tensor(base, name);
    let (_, got) = hf_tensor(merged, name);
    assert_close(name, &got, &want(w));
}

/// Tensors not in `changed` are byte-identical between the base and the merge.
fn assert_rest_untouched(base: &Path, merged: &Path, changed: &[String]) {
    let (b, m) = (Checkpoint::open(base).unwrap(), Checkpoint::open(merged).unwrap());
    assert_eq!(b.tensor_names(), m.tensor_names());
    for t in b.tensors().filter(|t| !changed.iter().any(|c| c == t.name)) {
        assert!(m.tensor(t.name).unwrap().data == t.data, "{} changed", t.name);
    }
}

/// The summary's `weight · scale` of each module merged into `name` equal `want`.
fn assert_scales(summary: &Value, name: &str, want: &[f64]) {
    let got = scales_of(summary, name);
    assert_eq!(got.len(), want.len(), "{name}: {got:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-12 * w.abs(), "{name}: scale {g}, expected {w}");
    }
}

fn scales_of(summary: &Value, name: &str) -> Vec<f64> {
    let t = summary["merged"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} not merged"));
    t["scales"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect()
}

fn merge_hf(base: &Path, out: &Path, adapters: &[&Path]) -> Value {
    let merged = out.join("merged");
    let mut args = vec![p(base), "-o", p(&merged)];
    for a in adapters {
        args.extend_from_slice(&["--adapter", p(a)]);
    }
    merge_json(&args).0
}

#[test]
fn scale_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora() {
    for rslora in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let base = tiny(dir.path(), llama());
        let (rank, alpha) = (4, 6.0);
        let modules = [attn(0, "q_proj"), attn(1, "q_proj"), attn(0, "v_proj"), attn(1, "v_proj")];
        let tensors: Vec<Tensor> = modules
            .iter()
            .flat_map(|m| lora_pair(m, rank, HIDDEN, if m.contains("v_proj") { KV } else { HIDDEN }))
            .collect();
        let config = json!({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
                            "target_modules": ["q_proj", "v_proj"]});
        let adapter = dir.path().join("adapter");
        write_adapter(&adapter, &config, &tensors);
        let summary = merge_hf(&base, dir.path(), &[&adapter]);
        let merged = dir.path().join("merged");
        let scale = if rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        let names: Vec<String> = modules.iter().map(|m| format!("{m}.weight")).collect();
        for (m, name) in modules.iter().zip(&names) {
            check(&base, &merged, name, |w| plus(&w, &delta(&tensors, m, rank, scale)));
            assert_scales(&summary, name, &[scale]);
        }
        assert_rest_untouched(&base, &merged, &names);
    }
}

#[test]
fn dora_rescales_each_output_feature_to_its_magnitude() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), llama());
    let (rank, alpha, vocab) = (4, 8.0, llama().vocab);
    let scale = alpha / rank as f64;
    let (q, e) = (attn(1, "q_proj"), "model.embed_tokens".to_string());
    let mut tensors = lora_pair(&q, rank, HIDDEN, HIDDEN).into_iter().collect::<Vec<_>>();
    tensors.push(Tensor::new(
        key(&q, "lora_magnitude_vector"),
        &[HIDDEN],
        (0..HIDDEN).map(|i| 0.5 + 0.1 * i as f32).collect(),
    ));
    tensors.push(Tensor::seeded(key(&e, "lora_embedding_A"), &[rank, vocab], 0.5));
    tensors.push(Tensor::seeded(key(&e, "lora_embedding_B"), &[HIDDEN, rank], 0.5));
    tensors.push(Tensor::new(
        key(&e, "lora_magnitude_vector"),
        &[HIDDEN],
        (0..HIDDEN).map(|i| 2.0 + 0.05 * i as f32).collect(),
    ));
    let config =
        json!({"r": rank, "lora_alpha": alpha, "use_dora": true, "target_modules": ["q_proj", "embed_tokens"]});
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, &config, &tensors);
    let summary = merge_hf(&base, dir.path(), &[&adapter]);
    let merged = dir.path().join("merged");

    // Linear: V = W + s·B·A, W' = m[o] · V[o] / ‖V[o]‖ (norm over the row).
    let m_q = values_of(&tensors, &key(&q, "lora_magnitude_vector")).to_vec();
    check(&base, &merged, &format!("{q}.weight"), |w| {
        let v = plus(&w, &delta(&tensors, &q, rank, scale));
        v.chunks(HIDDEN)
            .zip(&m_q)
            .flat_map(|(row, &m)| {
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                row.iter().map(move |x| m as f64 * x / norm)
            })
            .collect()
    });
    // Embedding [vocab, dim]: V = W + s·(B·A)ᵀ, W' = m[d] · V[:, d] / ‖V[:, d]‖ (norm over the tokens).
    let m_e = values_of(&tensors, &key(&e, "lora_magnitude_vector")).to_vec();
    check(&base, &merged, "model.embed_tokens.weight", |w| {
        let ba = lora_delta(
            values_of(&tensors, &key(&e, "lora_embedding_A")),
            values_of(&tensors, &key(&e, "lora_embedding_B")),
            rank,
            scale,
        );
        let v = plus(&w, &transpose(&ba, HIDDEN, vocab));
        let norms: Vec<f64> =
            (0..HIDDEN).map(|d| (0..vocab).map(|t| v[t * HIDDEN + d].powi(2)).sum::<f64>().sqrt()).collect();
        v.iter().enumerate().map(|(i, x)| m_e[i % HIDDEN] as f64 * x / norms[i % HIDDEN]).collect()
    });
    let changes: Vec<&str> =
        summary["merged"].as_array().unwrap().iter().map(|t| t["change"].as_str().unwrap()).collect();
    assert_eq!(changes, vec!["dora", "dora"]);
}

#[test]
fn fan_in_fan_out_adds_the_transposed_product_to_conv1d_weights() {
    let dir = tempfile::tempdir().unwrap();
    // A GPT-2 style checkpoint: Conv1D weights stored [in, out].
    let base = dir.path().join("gpt2");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("config.json"), json!({"architectures": ["GPT2LMHeadModel"]}).to_string()).unwrap();
    let weights = [
        Tensor::seeded("transformer.h.0.attn.c_attn.weight", &[HIDDEN, 3 * HIDDEN], 0.1),
        Tensor::seeded("transformer.h.0.attn.c_proj.weight", &[HIDDEN, HIDDEN], 0.1),
        Tensor::seeded("transformer.wte.weight", &[50, HIDDEN], 0.1),
    ];
    write_safetensors(&base, "model.safetensors", &weights);

    let (rank, alpha) = (2, 4.0);
    let module = "transformer.h.0.attn.c_attn";
    let tensors = lora_pair(module, rank, HIDDEN, 3 * HIDDEN);
    let adapter = dir.path().join("adapter");
    write_adapter(
        &adapter,
        &json!({"r": rank, "lora_alpha": alpha, "fan_in_fan_out": true, "target_modules": ["c_attn"]}),
        &tensors,
    );
    merge_hf(&base, dir.path(), &[&adapter]);
    let merged = dir.path().join("merged");
    let name = format!("{module}.weight");
    check(&base, &merged, &name, |w| {
        plus(&w, &transpose(&delta(&tensors, module, rank, alpha / rank as f64), 3 * HIDDEN, HIDDEN))
    });
    assert_rest_untouched(&base, &merged, &[name]);
    assert_eq!(std::fs::read(base.join("config.json")).unwrap(), std::fs::read(merged.join("config.json")).unwrap());
}

#[test]
fn rank_and_alpha_patterns_override_the_defaults_per_module() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), llama());
    let config = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"model.layers.1.self_attn.v_proj": 2}});
    // (module, rank, n_out, scale)
    let expected = [
        (attn(0, "q_proj"), 2, HIDDEN, 8.0 / 2.0),
        (attn(1, "q_proj"), 2, HIDDEN, 8.0 / 2.0),
        (attn(0, "v_proj"), 4, KV, 8.0 / 4.0),
        (attn(1, "v_proj"), 4, KV, 2.0 / 4.0),
    ];
    let tensors: Vec<Tensor> = expected.iter().flat_map(|(m, r, out, _)| lora_pair(m, *r, HIDDEN, *out)).collect();
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, &config, &tensors);
    let summary = merge_hf(&base, dir.path(), &[&adapter]);
    let merged = dir.path().join("merged");
    for (m, r, _, s) in &expected {
        let name = format!("{m}.weight");
        check(&base, &merged, &name, |w| plus(&w, &delta(&tensors, m, *r, *s)));
        assert_scales(&summary, &name, &[*s]);
    }
}

#[test]
fn embedding_adapters_add_the_transposed_product_in_hf_and_gguf_bases() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), llama());
    let (rank, alpha, vocab) = (3, 3.0, llama().vocab);
    let e = "model.embed_tokens";
    let tensors = [
        Tensor::seeded(key(e, "lora_embedding_A"), &[rank, vocab], 0.5),
        Tensor::seeded(key(e, "lora_embedding_B"), &[HIDDEN, rank], 0.5),
    ];
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, &json!({"r": rank, "lora_alpha": alpha, "target_modules": ["embed_tokens"]}), &tensors);
    let ba = lora_delta(&tensors[0].values, &tensors[1].values, rank, alpha / rank as f64);
    // ΔW[token][d] = s · Σ_k B[d][k] A[k][token]
    let want_delta = transpose(&ba, HIDDEN, vocab);

    merge_hf(&base, dir.path(), &[&adapter]);
    let merged = dir.path().join("merged");
    check(&base, &merged, "model.embed_tokens.weight", |w| plus(&w, &want_delta));
    assert_rest_untouched(&base, &merged, &["model.embed_tokens.weight".into()]);

    let gguf = dir.path().join("base.gguf");
    qforge_ok(&["convert", p(&base), "-o", p(&gguf), "--dtype", "f32"]);
    let out = dir.path().join("merged.gguf");
    merge_json(&[p(&gguf), "--adapter", p(&adapter), "-o", p(&out)]);
    let (b, m) = (GgufFile::open(&gguf).unwrap(), GgufFile::open(&out).unwrap());
    assert_close(
        "token_embd.weight",
        &gguf_tensor(&m, "token_embd.weight"),
        &plus(&gguf_tensor(&b, "token_embd.weight"), &want_delta),
    );
}

#[test]
fn modules_to_save_and_saved_embeddings_replace_base_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel { tied: false, ..llama() };
    let vocab = model.vocab;
    let base = tiny(dir.path(), model);
    let q = attn(0, "q_proj");
    let mut tensors: Vec<Tensor> = lora_pair(&q, 2, HIDDEN, HIDDEN).into_iter().collect();
    tensors.push(Tensor::seeded(key("lm_head", "weight"), &[vocab, HIDDEN], 0.3));
    tensors.push(Tensor::seeded(key("model.embed_tokens", "weight"), &[vocab, HIDDEN], 0.3));
    let adapter = dir.path().join("adapter");
    write_adapter(
        &adapter,
        &json!({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
        &tensors,
    );
    let summary = merge_hf(&base, dir.path(), &[&adapter]);
    let merged = dir.path().join("merged");
    for (name, saved) in
        [("lm_head.weight", "lm_head.weight"), ("model.embed_tokens.weight", "model.embed_tokens.weight")]
    {
        let (_, got) = hf_tensor(&merged, name);
        assert_eq!(got, values_of(&tensors, &key(saved.trim_end_matches(".weight"), "weight")), "{name}");
    }
    check(&base, &merged, &format!("{q}.weight"), |w| plus(&w, &delta(&tensors, &q, 2, 1.0)));
    let deltas = merged_deltas(&summary);
    assert_eq!(deltas.len(), 3);
    assert!(deltas["lm_head.weight"] > 0.0);
    assert_rest_untouched(
        &base,
        &merged,
        &["lm_head.weight".into(), "model.embed_tokens.weight".into(), format!("{q}.weight")],
    );
}

#[test]
fn trained_biases_replace_and_lora_b_biases_add_to_base_biases() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), TinyModel::new("Qwen2ForCausalLM"));
    let (rank, alpha) = (2, 6.0);
    let scale = alpha / rank as f64;
    let (q, v) = (attn(1, "q_proj"), attn(1, "v_proj"));
    let mut tensors: Vec<Tensor> =
        lora_pair(&q, rank, HIDDEN, HIDDEN).into_iter().chain(lora_pair(&v, rank, HIDDEN, KV)).collect();
    tensors.push(Tensor::seeded(key(&q, "lora_B.bias"), &[HIDDEN], 0.5));
    tensors.push(Tensor::seeded(key(&v, "lora_B.bias"), &[KV], 0.5));
    tensors.push(Tensor::seeded(key(&q, "base_layer.bias"), &[HIDDEN], 0.5));
    let config = json!({"r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "bias": "lora_only", "lora_bias": true});
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, &config, &tensors);
    let summary = merge_hf(&base, dir.path(), &[&adapter]);
    let merged = dir.path().join("merged");

    let scaled = |name: &str| values_of(&tensors, name).iter().map(|&x| scale * x as f64).collect::<Vec<f64>>();
    // q: the trained bias replaces the base's, then lora_B's bias is added.
    let (_, q_bias) = hf_tensor(&merged, &format!("{q}.bias"));
    assert_close(
        "q bias",
        &q_bias,
        &plus(values_of(&tensors, &key(&q, "base_layer.bias")), &scaled(&key(&q, "lora_B.bias"))),
    );
    check(&base, &merged, &format!("{v}.bias"), |b| plus(&b, &scaled(&key(&v, "lora_B.bias"))));
    check(&base, &merged, &format!("{q}.weight"), |w| plus(&w, &delta(&tensors, &q, rank, scale)));
    let change = |name: String| {
        summary["merged"].as_array().unwrap().iter().find(|t| t["name"] == name.as_str()).unwrap()["change"].clone()
    };
    assert_eq!(change(format!("{q}.bias")), "replaced+lora_bias");
    assert_eq!(change(format!("{v}.bias")), "lora_bias");
}

#[test]
fn two_weighted_adapters_sum_their_scaled_deltas_in_hf_and_permuted_gguf_bases() {
    let dir = tempfile::tempdir().unwrap();
    let model = llama();
    let (heads, kv_heads) = (model.heads, model.kv_heads);
    let base = tiny(dir.path(), model);
    let (q, k, v) = (attn(1, "q_proj"), attn(1, "k_proj"), attn(0, "v_proj"));
    let one: Vec<Tensor> = lora_pair(&q, 4, HIDDEN, HIDDEN).into_iter().chain(lora_pair(&v, 4, HIDDEN, KV)).collect();
    let two: Vec<Tensor> = lora_pair(&q, 2, HIDDEN, HIDDEN).into_iter().chain(lora_pair(&k, 2, HIDDEN, KV)).collect();
    let (a1, a2) = (dir.path().join("one"), dir.path().join("two"));
    write_adapter(
        &a1,
        &json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "org/one"}),
        &one,
    );
    write_adapter(
        &a2,
        &json!({"r": 2, "lora_alpha": 2, "use_rslora": true, "target_modules": ["q_proj", "k_proj"], "base_model_name_or_path": "org/two"}),
        &two,
    );
    let (w1, w2) = (0.5, -1.25);
    let (s1, s2) = (8.0 / 4.0, 2.0 / 2f64.sqrt());
    let spec1 = format!("{}:{w1}", p(&a1));
    let spec2 = format!("{}:{w2}", p(&a2));

    let want = |module: &str| -> Vec<f64> {
        let mut d = vec![0f64; if module == q { HIDDEN * HIDDEN } else { KV * HIDDEN }];
        if module != k {
            d.iter_mut().zip(delta(&one, module, 4, w1 * s1)).for_each(|(x, y)| *x += y);
        }
        if module != v {
            d.iter_mut().zip(delta(&two, module, 2, w2 * s2)).for_each(|(x, y)| *x += y);
        }
        d
    };
    let merged = dir.path().join("merged");
    let (summary, stderr) = merge_json(&[p(&base), "--adapter", &spec1, "--adapter", &spec2, "-o", p(&merged)]);
    assert!(stderr.contains("different base models"), "{stderr}");
    for m in [&q, &k, &v] {
        check(&base, &merged, &format!("{m}.weight"), |w| plus(&w, &want(m)));
    }
    assert_scales(&summary, &format!("{q}.weight"), &[w1 * s1, w2 * s2]);

    // Same sum on a GGUF base, whose q/k rows llama.cpp stores permuted.
    let gguf = dir.path().join("base.gguf");
    qforge_ok(&["convert", p(&base), "-o", p(&gguf), "--dtype", "f32"]);
    let out = dir.path().join("merged.gguf");
    merge_json(&[p(&gguf), "--adapter", &spec1, "--adapter", &spec2, "-o", p(&out)]);
    let (b, m) = (GgufFile::open(&gguf).unwrap(), GgufFile::open(&out).unwrap());
    for (module, name, heads) in [
        (&q, "blk.1.attn_q.weight", Some(heads)),
        (&k, "blk.1.attn_k.weight", Some(kv_heads)),
        (&v, "blk.0.attn_v.weight", None),
    ] {
        let d = want(module);
        let d = match heads {
            Some(h) => llama_cpp_permute(&d, h, HIDDEN),
            None => d,
        };
        assert_close(name, &gguf_tensor(&m, name), &plus(&gguf_tensor(&b, name), &d));
    }
}

#[test]
fn layers_to_transform_and_regex_targets_select_modules() {
    for config in [
        json!({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "layers_to_transform": [1]}),
        json!({"r": 2, "lora_alpha": 2, "target_modules": "model\\.layers\\.1\\.self_attn\\.q_proj"}),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let base = tiny(dir.path(), llama());
        let tensors: Vec<Tensor> = (0..2).flat_map(|l| lora_pair(&attn(l, "q_proj"), 2, HIDDEN, HIDDEN)).collect();
        let adapter = dir.path().join("adapter");
        write_adapter(&adapter, &config, &tensors);
        let merged = dir.path().join("merged");
        let (summary, stderr) = merge_json(&[p(&base), "--adapter", p(&adapter), "-o", p(&merged)]);
        assert!(stderr.contains("does not target module model.layers.0.self_attn.q_proj"), "{stderr}");
        let name = format!("{}.weight", attn(1, "q_proj"));
        assert_eq!(merged_deltas(&summary).into_keys().collect::<Vec<_>>(), vec![name.clone()]);
        check(&base, &merged, &name, |w| plus(&w, &delta(&tensors, &attn(1, "q_proj"), 2, 1.0)));
        assert_rest_untouched(&base, &merged, &[name]);
    }
}

#[test]
fn dtype_converts_every_float_tensor_and_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), llama());
    let q = attn(0, "q_proj");
    let tensors = lora_pair(&q, 2, HIDDEN, HIDDEN);
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, &json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}), &tensors);
    let merged = dir.path().join("merged");
    merge_json(&[p(&base), "--adapter", p(&adapter), "-o", p(&merged), "--dtype", "bf16"]);
    let (b, m) = (Checkpoint::open(&base).unwrap(), Checkpoint::open(&merged).unwrap());
    for t in b.tensors() {
        let r = m.tensor(t.name).unwrap();
        assert_eq!(r.dtype, Dtype::BF16, "{}", t.name);
        let want: Vec<f64> = if t.name == format!("{q}.weight") {
            plus(&t.to_f32().unwrap(), &delta(&tensors, &q, 2, 2.0))
        } else {
            t.to_f32().unwrap().iter().map(|&x| x as f64).collect()
        };
        for (&g, &w) in r.to_f32().unwrap().iter().zip(&want) {
            assert_eq!(g, half::bf16::from_f32(w as f32).to_f32(), "{}", t.name);
        }
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn llama_cpp_lora_gguf_export_folds_per_module_scales_and_transposes_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let model = llama();
    let (heads, vocab) = (model.heads, model.vocab);
    let base = tiny(dir.path(), model);
    // rsLoRA with a per-module rank: llama.cpp's single alpha / r cannot express both scales.
    let (q, v, e) = (attn(0, "q_proj"), attn(1, "v_proj"), "model.embed_tokens");
    let mut tensors: Vec<Tensor> =
        lora_pair(&q, 2, HIDDEN, HIDDEN).into_iter().chain(lora_pair(&v, 4, HIDDEN, KV)).collect();
    tensors.push(Tensor::seeded(key(e, "lora_embedding_A"), &[4, vocab], 0.5));
    tensors.push(Tensor::seeded(key(e, "lora_embedding_B"), &[HIDDEN, 4], 0.5));
    let config = json!({"r": 4, "lora_alpha": 6, "use_rslora": true, "rank_pattern": {"q_proj": 2},
                        "target_modules": ["q_proj", "v_proj", "embed_tokens"], "base_model_name_or_path": p(&base)});
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, &config, &tensors);
    let lora = dir.path().join("adapter.gguf");
    qforge_ok(&["convert", p(&adapter), "-o", p(&lora)]);
    let file = GgufFile::open(&lora).unwrap();
    // alpha reproduces the config's scale at its own rank: 6 / sqrt(4) * 4.
    assert_eq!(file.get("adapter.lora.alpha").unwrap().as_f64(), Some(12.0));
    assert_eq!(file.tensor("token_embd.weight.lora_a").unwrap().dims, vec![4, vocab as u64]);
    assert_eq!(file.tensor("token_embd.weight.lora_b").unwrap().dims, vec![4, HIDDEN as u64]);
    assert_eq!(file.tensor("blk.0.attn_q.weight.lora_a").unwrap().dims, vec![HIDDEN as u64, 2]);

    let gguf = dir.path().join("base.gguf");
    qforge_ok(&["convert", p(&base), "-o", p(&gguf), "--dtype", "f32"]);
    let scale = |r: f64| 6.0 / r.sqrt();
    let embedding = transpose(
        &lora_delta(
            values_of(&tensors, &key(e, "lora_embedding_A")),
            values_of(&tensors, &key(e, "lora_embedding_B")),
            4,
            scale(4.0),
        ),
        HIDDEN,
        vocab,
    );
    let expected = [
        ("blk.0.attn_q.weight", llama_cpp_permute(&delta(&tensors, &q, 2, scale(2.0)), heads, HIDDEN)),
        ("blk.1.attn_v.weight", delta(&tensors, &v, 4, scale(4.0))),
        ("token_embd.weight", embedding),
    ];
    let b = GgufFile::open(&gguf).unwrap();
    for adapter in [&adapter, &lora] {
        let out = dir.path().join("merged.gguf");
        merge_json(&[p(&gguf), "--adapter", p(adapter), "-o", p(&out)]);
        let m = GgufFile::open(&out).unwrap();
        for (name, d) in &expected {
            assert_close(name, &gguf_tensor(&m, name), &plus(&gguf_tensor(&b, name), d));
        }
    }
}
