//! The plan against llama-quant.cpp's rules, on llama-shaped tensor lists.

use std::collections::BTreeMap;

use super::*;

use GgmlType as T;

/// A llama-family tensor list in GGUF naming: `hidden` wide, `layers` blocks, untied unless `tied`.
fn llama(hidden: u64, ffn: u64, kv: u64, layers: usize, tied: bool, matrix: GgmlType) -> Vec<TensorDesc> {
    let t = |name: String, dims: Vec<u64>| {
        let current = if dims.len() == 1 { T::F32 } else { matrix };
        TensorDesc { name, dims, current }
    };
    let mut v = vec![t("token_embd.weight".into(), vec![hidden, 1000]), t("output_norm.weight".into(), vec![hidden])];
    if !tied {
        v.push(t("output.weight".into(), vec![hidden, 1000]));
    }
    for l in 0..layers {
        let b = |s: &str| format!("blk.{l}.{s}");
        v.push(t(b("attn_norm.weight"), vec![hidden]));
        v.push(t(b("attn_q.weight"), vec![hidden, hidden]));
        v.push(t(b("attn_k.weight"), vec![hidden, kv]));
        v.push(t(b("attn_v.weight"), vec![hidden, kv]));
        v.push(t(b("attn_output.weight"), vec![hidden, hidden]));
        v.push(t(b("ffn_norm.weight"), vec![hidden]));
        v.push(t(b("ffn_gate.weight"), vec![hidden, ffn]));
        v.push(t(b("ffn_up.weight"), vec![hidden, ffn]));
        v.push(t(b("ffn_down.weight"), vec![ffn, hidden]));
    }
    v
}

fn shape(n_layer: usize, n_gqa: usize) -> ModelShape {
    ModelShape { n_layer, n_gqa, is_70b: false }
}

fn types(shape: &ModelShape, tensors: &[TensorDesc], opts: &PlanOptions) -> BTreeMap<String, GgmlType> {
    plan(shape, tensors, opts).unwrap().into_iter().map(|p| (p.name, p.ty)).collect()
}

fn layer_types(plan: &BTreeMap<String, GgmlType>, suffix: &str, layers: usize) -> Vec<GgmlType> {
    (0..layers).map(|l| plan[&format!("blk.{l}.{suffix}")]).collect()
}

/// Layers that `use_more_bits` picks out of 32: the first and last eighth, and every third from layer 4.
const MORE_BITS_OF_32: &[usize] = &[0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];

fn per_layer(layers: usize, pick: impl Fn(usize) -> bool, yes: GgmlType, no: GgmlType) -> Vec<GgmlType> {
    (0..layers).map(|l| if pick(l) { yes } else { no }).collect()
}

#[test]
fn presets_have_llama_cpp_names_numbers_and_aliases() {
    // llama.h's llama_ftype values.
    for (name, ftype) in
        [("Q4_0", 2), ("Q8_0", 7), ("Q2_K", 10), ("Q3_K_M", 12), ("Q4_K_M", 15), ("Q6_K", 18), ("BF16", 32)]
    {
        assert_eq!(Preset::from_name(name).unwrap().file_type(), ftype, "{name}");
    }
    assert_eq!(Preset::from_name("q4_k"), Some(Preset::Q4_K_M));
    assert_eq!(Preset::from_name("Q3_K"), Some(Preset::Q3_K_M));
    assert_eq!(Preset::from_name("Q5_K"), Some(Preset::Q5_K_M));
    assert_eq!(Preset::from_name("Q4_2"), None);
    for p in Preset::all() {
        assert_eq!(Preset::from_name(p.name()), Some(p));
    }
}

#[test]
fn one_dimensional_and_norm_tensors_keep_their_type() {
    let tensors = llama(512, 1024, 128, 4, false, T::F16);
    for preset in Preset::all() {
        let plan = types(&shape(4, 4), &tensors, &PlanOptions::new(preset));
        for t in tensors.iter().filter(|t| t.dims.len() == 1) {
            assert_eq!(plan[&t.name], T::F32, "{preset} {}", t.name);
        }
    }
    let mut opts = PlanOptions::new(Preset::Q4_0);
    opts.leave_output_tensor = true;
    assert_eq!(types(&shape(4, 4), &tensors, &opts)["output.weight"], T::F16);
}

#[test]
fn plan_follows_llama_cpp_tensor_order() {
    let tensors = llama(512, 1024, 128, 12, true, T::F16);
    let names: Vec<String> =
        plan(&shape(12, 4), &tensors, &PlanOptions::new(Preset::Q8_0)).unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(&names[..2], ["output_norm.weight", "token_embd.weight"]);
    assert_eq!(names[2], "blk.0.attn_k.weight");
    let first_blk10 = names.iter().position(|n| n.starts_with("blk.10.")).unwrap();
    let last_blk2 = names.iter().rposition(|n| n.starts_with("blk.2.")).unwrap();
    assert!(last_blk2 < first_blk10, "blocks are ordered by number, not as strings");
}

#[test]
fn q4_k_m_gives_more_bits_to_attn_v_and_ffn_down_on_the_chosen_layers() {
    let tensors = llama(512, 1024, 128, 32, false, T::F16);
    let plan = types(&shape(32, 4), &tensors, &PlanOptions::new(Preset::Q4_K_M));
    let expected = per_layer(32, |l| MORE_BITS_OF_32.contains(&l), T::Q6_K, T::Q4_K);
    assert_eq!(layer_types(&plan, "attn_v.weight", 32), expected);
    assert_eq!(layer_types(&plan, "ffn_down.weight", 32), expected);
    for s in ["attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight"] {
        assert_eq!(layer_types(&plan, s, 32), vec![T::Q4_K; 32], "{s}");
    }
    assert_eq!(plan["output.weight"], T::Q6_K);
    assert_eq!(plan["token_embd.weight"], T::Q4_K, "an untied embedding gets the preset's type");
    let tied = types(&shape(32, 4), &llama(512, 1024, 128, 32, true, T::F16), &PlanOptions::new(Preset::Q4_K_M));
    assert_eq!(tied["token_embd.weight"], T::Q6_K, "a tied embedding is the output projection");
}

#[test]
fn q5_k_m_and_q4_k_s_and_q6_k() {
    let tensors = llama(512, 1024, 128, 32, false, T::F16);
    let q5 = types(&shape(32, 4), &tensors, &PlanOptions::new(Preset::Q5_K_M));
    let more = per_layer(32, |l| MORE_BITS_OF_32.contains(&l), T::Q6_K, T::Q5_K);
    assert_eq!(layer_types(&q5, "attn_v.weight", 32), more);
    assert_eq!(layer_types(&q5, "ffn_down.weight", 32), more);
    assert_eq!(layer_types(&q5, "attn_output.weight", 32), vec![T::Q5_K; 32]);

    let q4s = types(&shape(32, 4), &tensors, &PlanOptions::new(Preset::Q4_K_S));
    assert_eq!(layer_types(&q4s, "attn_v.weight", 32), per_layer(32, |l| l < 4, T::Q5_K, T::Q4_K));
    assert_eq!(layer_types(&q4s, "ffn_down.weight", 32), per_layer(32, |l| l < 32 / 8, T::Q5_K, T::Q4_K));

    let q6 = types(&shape(32, 4), &tensors, &PlanOptions::new(Preset::Q6_K));
    assert!(tensors.iter().filter(|t| t.dims.len() == 2).all(|t| q6[&t.name] == T::Q6_K));
}

#[test]
fn q3_k_m_and_q2_k() {
    let tensors = llama(512, 1024, 128, 32, false, T::F16);
    let q3 = types(&shape(32, 4), &tensors, &PlanOptions::new(Preset::Q3_K_M));
    assert_eq!(layer_types(&q3, "attn_v.weight", 32), per_layer(32, |l| l < 2, T::Q5_K, T::Q4_K));
    assert_eq!(layer_types(&q3, "ffn_down.weight", 32), per_layer(32, |l| l < 32 / 16, T::Q5_K, T::Q4_K));
    assert_eq!(layer_types(&q3, "attn_output.weight", 32), vec![T::Q4_K; 32]);
    assert_eq!(layer_types(&q3, "attn_q.weight", 32), vec![T::Q3_K; 32]);

    for (gqa, attn_v) in [(4, T::Q4_K), (3, T::Q3_K)] {
        let q2 = types(&shape(32, gqa), &tensors, &PlanOptions::new(Preset::Q2_K));
        assert_eq!(layer_types(&q2, "attn_v.weight", 32), vec![attn_v; 32], "n_gqa {gqa}");
        assert_eq!(layer_types(&q2, "ffn_down.weight", 32), vec![T::Q3_K; 32]);
        assert_eq!(layer_types(&q2, "attn_output.weight", 32), vec![T::Q3_K; 32]);
        assert_eq!(layer_types(&q2, "ffn_up.weight", 32), vec![T::Q2_K; 32]);
    }
}

#[test]
fn seventy_b_attn_v_never_drops_below_q5_k() {
    let tensors = llama(512, 1024, 128, 80, false, T::F16);
    let mut big = shape(80, 8);
    big.is_70b = true;
    let plan = types(&big, &tensors, &PlanOptions::new(Preset::Q4_K_S));
    assert_eq!(layer_types(&plan, "attn_v.weight", 80), vec![T::Q5_K; 80]);
}

#[test]
fn rows_not_a_multiple_of_256_fall_back_to_32_wide_types() {
    // 576 wide (SmolLM2-135M): every matrix whose rows are 576 long falls back; ffn_down (1536) does not.
    let tensors = llama(576, 1536, 192, 30, true, T::F16);
    for (preset, bulk, fallback) in [
        (Preset::Q2_K, T::Q2_K, T::Q4_0),
        (Preset::Q3_K_S, T::Q3_K, T::Q4_0),
        (Preset::Q4_K_S, T::Q4_K, T::Q5_0),
        (Preset::Q5_K_S, T::Q5_K, T::Q5_1),
        (Preset::Q6_K, T::Q6_K, T::Q8_0),
        (Preset::IQ4_XS, T::IQ4_XS, T::IQ4_NL),
    ] {
        let planned = plan(&shape(30, 3), &tensors, &PlanOptions::new(preset)).unwrap();
        let q = planned.iter().find(|p| p.name == "blk.7.attn_q.weight").unwrap();
        assert_eq!((q.ty, q.fell_back_from), (fallback, Some(bulk)), "{preset}");
    }
    let q4km = types(&shape(30, 3), &tensors, &PlanOptions::new(Preset::Q4_K_M));
    // use_more_bits(i, 30): i < 3, i >= 26, (i - 3) % 3 == 2.
    let more = |l: usize| !(3..26).contains(&l) || (l - 3) % 3 == 2;
    assert_eq!(layer_types(&q4km, "ffn_down.weight", 30), per_layer(30, more, T::Q6_K, T::Q4_K));
    assert_eq!(layer_types(&q4km, "attn_v.weight", 30), per_layer(30, more, T::Q8_0, T::Q5_0));
    assert_eq!(q4km["token_embd.weight"], T::Q8_0, "Q6_K for the tied embedding falls back to Q8_0");

    // Legacy presets: the tied embedding is raised to Q6_K, which does not fit 576 either.
    let q4_0 = plan(&shape(30, 3), &tensors, &PlanOptions::new(Preset::Q4_0)).unwrap();
    let embd = q4_0.iter().find(|p| p.name == "token_embd.weight").unwrap();
    assert_eq!((embd.ty, embd.fell_back_from), (T::Q8_0, Some(T::Q6_K)));
    assert_eq!(q4_0.iter().filter(|p| p.ty == T::Q4_0).count(), 30 * 7);
}

#[test]
fn rows_not_a_multiple_of_32_fall_back_to_f16() {
    let tensors = vec![TensorDesc { name: "blk.0.attn_q.weight".into(), dims: vec![48, 48], current: T::F32 }];
    for preset in [Preset::Q4_K_M, Preset::Q4_0, Preset::Q8_0] {
        let planned = plan(&shape(1, 1), &tensors, &PlanOptions::new(preset)).unwrap();
        assert_eq!(planned[0].ty, T::F16, "{preset}");
    }
}

#[test]
fn tensor_type_rules_override_first_match_wins_and_still_fall_back() {
    let tensors = llama(576, 1536, 192, 8, false, T::F16);
    let mut opts = PlanOptions::new(Preset::Q4_0);
    opts.rules =
        ["ATTN_V=q8_0", "attn_.*=q6_k", "ffn_down=Q6_K"].iter().map(|s| TensorTypeRule::parse(s).unwrap()).collect();
    let plan = types(&shape(8, 3), &tensors, &opts);
    assert_eq!(layer_types(&plan, "attn_v.weight", 8), vec![T::Q8_0; 8], "patterns are lower-cased");
    assert_eq!(layer_types(&plan, "attn_q.weight", 8), vec![T::Q8_0; 8], "Q6_K does not fit rows of 576");
    assert_eq!(layer_types(&plan, "ffn_down.weight", 8), vec![T::Q6_K; 8]);
    assert_eq!(layer_types(&plan, "ffn_up.weight", 8), vec![T::Q4_0; 8]);
    assert!(TensorTypeRule::parse("attn_v").is_err());
    assert!(TensorTypeRule::parse("=q8_0").is_err());
    assert!(TensorTypeRule::parse("attn_v=q9_9").is_err());
    assert!(TensorTypeRule::parse("attn_v(=q8_0").is_err());
}

#[test]
fn an_overridden_attn_v_does_not_advance_the_mix_counter() {
    // Q3_K_M gives the first two attn_v tensors it sees Q5_K; the overridden blk.0 is not seen.
    let tensors = llama(512, 1024, 128, 8, false, T::F16);
    let mut opts = PlanOptions::new(Preset::Q3_K_M);
    opts.rules = vec![TensorTypeRule::parse(r"blk\.0\.attn_v=q8_0").unwrap()];
    let plan = types(&shape(8, 4), &tensors, &opts);
    let mut expected = vec![T::Q8_0, T::Q5_K, T::Q5_K];
    expected.extend([T::Q4_K; 5]);
    assert_eq!(layer_types(&plan, "attn_v.weight", 8), expected);
}

#[test]
fn pure_gives_every_matrix_the_preset_type() {
    let tensors = llama(512, 1024, 128, 8, false, T::F16);
    let mut opts = PlanOptions::new(Preset::Q4_K_M);
    opts.pure = true;
    let plan = types(&shape(8, 4), &tensors, &opts);
    assert!(tensors.iter().filter(|t| t.dims.len() == 2).all(|t| plan[&t.name] == T::Q4_K));
}

#[test]
fn explicit_output_and_embedding_types() {
    let tensors = llama(576, 1536, 192, 4, false, T::F16);
    let mut opts = PlanOptions::new(Preset::Q4_0);
    opts.output_type = Some(T::F16);
    opts.token_embedding_type = Some(T::Q8_0);
    let chosen = types(&shape(4, 3), &tensors, &opts);
    assert_eq!((chosen["output.weight"], chosen["token_embd.weight"]), (T::F16, T::Q8_0));

    // With tied embeddings, --output-type also decides the token embedding (it is the output).
    let tied = llama(576, 1536, 192, 4, true, T::F16);
    let mut opts = PlanOptions::new(Preset::Q4_0);
    opts.output_type = Some(T::Q5_0);
    assert_eq!(types(&shape(4, 3), &tied, &opts)["token_embd.weight"], T::Q5_0);

    // An explicit type is not replaced: one that does not fit the rows is an error.
    let mut opts = PlanOptions::new(Preset::Q4_0);
    opts.token_embedding_type = Some(T::Q4_K);
    let err = plan(&shape(4, 3), &tensors, &opts).unwrap_err().to_string();
    assert!(err.contains("token_embd.weight") && err.contains("576"), "{err}");
}

#[test]
fn float_presets_convert_every_matrix_and_ignore_rules() {
    let tensors = llama(576, 1536, 192, 4, true, T::F32);
    let mut opts = PlanOptions::new(Preset::F16);
    opts.rules = vec![TensorTypeRule::parse("attn_v=q8_0").unwrap()];
    let plan = types(&shape(4, 3), &tensors, &opts);
    for t in &tensors {
        assert_eq!(plan[&t.name], if t.dims.len() == 1 { T::F32 } else { T::F16 }, "{}", t.name);
    }
}

#[test]
fn q4_0_with_an_imatrix_protects_the_first_ffn_down_layers() {
    let tensors = llama(512, 1024, 128, 16, false, T::F16);
    let mut opts = PlanOptions::new(Preset::Q4_0);
    assert_eq!(layer_types(&types(&shape(16, 4), &tensors, &opts), "ffn_down.weight", 16), vec![T::Q4_0; 16]);
    opts.has_imatrix = true;
    let expected = per_layer(16, |l| l < 16 / 8, T::Q4_1, T::Q4_0);
    assert_eq!(layer_types(&types(&shape(16, 4), &tensors, &opts), "ffn_down.weight", 16), expected);
}

#[test]
fn model_shape_recognises_a_70b() {
    let config = |layers: u64, kv: u64| {
        ModelConfig::from_hf_json(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": kv,
            "vocab_size": 128256, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
        }))
        .unwrap()
    };
    assert_eq!(ModelShape::of(&config(80, 8)), ModelShape { n_layer: 80, n_gqa: 8, is_70b: true });
    assert!(!ModelShape::of(&config(80, 64)).is_70b, "without GQA llama.cpp calls it a 65B");
    assert!(!ModelShape::of(&config(40, 8)).is_70b);
}
