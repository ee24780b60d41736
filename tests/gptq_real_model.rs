//! GPTQ's layer pipeline on the real SmolLM2 fixture: it quantizes every linear of all 30 blocks, the
//! result follows the full-precision model more closely than round-to-nearest on the same grid
//! (KL-divergence and perplexity on Shakespeare the embedded calibration corpus does not hold), a group
//! size that does not divide the width is refused, and the output is the same at 1 and 2 threads.

mod common;
#[path = "common/quantized.rs"]
mod quantized;

use std::collections::BTreeMap;

use calibration::CalibrationSet;
use common::{fixture_model, shared_data};
use qforge::model::ModelSource;
use qforge::progress::Progress;
use qforge::quant::gptq::{pipeline, GptqConfig, GroupQuantized};
use qforge::runtime::Model;
use quantized::{calibration, f32_bytes, rebuilt, rtn_all, HeldOut};

const W4_G64: GptqConfig = GptqConfig {
    bits: 4,
    group_size: Some(64),
    sym: true,
    act_order: false,
    static_groups: false,
    damp: 0.01,
    shrink: 0.0,
};

/// GPTQ's quantized linears by GGUF name.
fn run_gptq(model: &Model, calib: &CalibrationSet, config: &GptqConfig) -> BTreeMap<String, GroupQuantized> {
    let mut out = BTreeMap::new();
    let report = pipeline::quantize(model, calib, config, Progress { quiet: true }, |name, q| {
        assert!(out.insert(name.to_string(), q.weight.clone()).is_none(), "{name} quantized twice");
        Ok(())
    })
    .unwrap();
    eprintln!("{report:?}");
    out
}

#[test]
fn gptq_quantizes_all_layers_and_beats_rtn_on_the_same_grid() {
    let held_out = "tinyshakespeare/input.txt";
    let (Some(fixture), Some(held_out)) = (fixture_model(), shared_data(held_out)) else { return };
    let source = ModelSource::open(&fixture).unwrap();
    let model = Model::load(&source).unwrap();

    let refused = pipeline::check_config(&model, &GptqConfig { group_size: Some(128), ..W4_G64 }).unwrap_err();
    assert!(refused.to_string().contains("group size 128 does not divide 576"), "{refused}");

    // 8 x 128 tokens are too few: on held-out text GPTQ's down_proj then does worse than RTN (its 1536
    // inputs see a Hessian of rank at most 1024, and GPTQ fits the calibration rows). More tokens with 10%
    // dampening generalize.
    let gptq_weights = run_gptq(&model, &calibration(&source, 16, 128), &GptqConfig { damp: 0.1, ..W4_G64 });
    let rtn_weights = rtn_all(&model, &W4_G64);
    assert_eq!(gptq_weights.len(), 30 * 7);
    assert!(gptq_weights.keys().eq(rtn_weights.keys()));
    for (name, q) in &gptq_weights {
        let r = &rtn_weights[name];
        assert_eq!((q.rows, q.cols, q.groups()), (r.rows, r.cols, r.cols / 64), "{name}");
        assert!(q.zeros.iter().all(|&z| z == 8), "{name}: symmetric 4-bit zero points are 8");
    }

    let eval = HeldOut::new(&source, &model, &held_out, 256, 4);
    let (gptq_bytes, rtn_bytes) = (f32_bytes(&gptq_weights), f32_bytes(&rtn_weights));
    let (gptq_ppl, gptq_kld) = eval.evaluate(&rebuilt(&source, &BTreeMap::new(), &gptq_bytes));
    let (rtn_ppl, rtn_kld) = eval.evaluate(&rebuilt(&source, &BTreeMap::new(), &rtn_bytes));
    let fp_ppl = eval.fp_perplexity;
    eprintln!(
        "FP ppl {fp_ppl:.3}; RTN w4g64 ppl {rtn_ppl:.3} kld {rtn_kld:.4}; GPTQ ppl {gptq_ppl:.3} kld {gptq_kld:.4}"
    );
    assert!(rtn_kld > 0.0 && gptq_kld > 0.0);
    assert!(gptq_kld < rtn_kld, "GPTQ KLD {gptq_kld} is not below RTN's {rtn_kld}");
    assert!(gptq_ppl - fp_ppl < rtn_ppl - fp_ppl, "GPTQ PPL {gptq_ppl} vs RTN {rtn_ppl} (FP {fp_ppl})");
}

#[test]
fn gptq_pipeline_is_the_same_at_one_and_two_threads() {
    let Some(fixture) = fixture_model() else { return };
    let source = ModelSource::open(&fixture).unwrap();
    let model = Model::load(&source).unwrap();
    let calib = calibration(&source, 2, 64);
    let at = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run_gptq(&model, &calib, &W4_G64))
    };
    let (one, two) = (at(1), at(2));
    assert_eq!(one.len(), 30 * 7);
    for (name, q) in &one {
        assert!(q == &two[name], "{name} differs between 1 and 2 threads");
    }
}
