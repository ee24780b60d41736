//! AWQ on the real SmolLM2 fixture: it scales, clips and quantizes every linear of all 30 blocks, the
//! model rebuilt from what it emits (folded norms, dequantized linears) follows the full-precision model
//! more closely than round-to-nearest on the same grid (KL-divergence and perplexity on held-out
//! Shakespeare), and the output is the same at 1 and 2 threads.

mod common;
#[path = "common/quantized.rs"]
mod quantized;

use std::collections::BTreeMap;

use calibration::CalibrationSet;
use common::{fixture_model, shared_data};
use qforge::model::ModelSource;
use qforge::progress::Progress;
use qforge::quant::awq::{self, AwqConfig, AwqItem, AwqReport};
use qforge::quant::gptq::GroupQuantized;
use qforge::runtime::Model;
use quantized::{calibration, f32_bytes, rebuilt, rtn_all, HeldOut};

const W4_G64: AwqConfig = AwqConfig { bits: 4, group_size: 64, zero_point: true, grid_points: 20, clip: true };

/// What AWQ emitted: folded norms and quantized linears by GGUF name.
#[derive(Default, PartialEq)]
struct Emitted {
    norms: BTreeMap<String, Vec<f32>>,
    linears: BTreeMap<String, GroupQuantized>,
}

fn run_awq(model: &Model, calib: &CalibrationSet) -> (Emitted, AwqReport) {
    let mut out = Emitted::default();
    let report = awq::quantize(model, calib, &W4_G64, Progress { quiet: true }, |item| {
        let fresh = match item {
            AwqItem::Norm { name, values } => out.norms.insert(name.to_string(), values.to_vec()).is_none(),
            AwqItem::Linear { name, quantized, .. } => {
                out.linears.insert(name.to_string(), quantized.clone()).is_none()
            }
        };
        assert!(fresh, "an item was emitted twice");
        Ok(())
    })
    .unwrap();
    (out, report)
}

#[test]
fn awq_quantizes_all_layers_and_beats_rtn_on_the_same_grid() {
    let (Some(fixture), Some(held_out)) = (fixture_model(), shared_data("tinyshakespeare/input.txt")) else { return };
    let source = ModelSource::open(&fixture).unwrap();
    let model = Model::load(&source).unwrap();

    let refused = awq::check_config(&model, &AwqConfig { group_size: 128, ..W4_G64 }).unwrap_err();
    assert!(refused.to_string().contains("group size 128 does not divide 576"), "{refused}");

    let (awq_out, report) = run_awq(&model, &calibration(&source, 16, 128));
    eprintln!("{report:?}");
    let rtn_linears = rtn_all(&model, &W4_G64.rounding());
    assert_eq!((awq_out.linears.len(), awq_out.norms.len()), (30 * 7, 30 * 2));
    assert!(awq_out.linears.keys().eq(rtn_linears.keys()));
    for (name, q) in &awq_out.linears {
        assert_eq!((q.rows, q.cols, q.groups(), q.sym), (rtn_linears[name].rows, q.cols, q.cols / 64, false), "{name}");
    }
    // The activations of real models are far from uniform: the search scales most groups.
    let scaled = report.alphas.iter().flatten().filter(|a| a.is_some_and(|a| a > 0.0)).count();
    assert!(scaled > 30 * 4 / 2, "only {scaled} of 120 groups scaled: {:?}", report.alphas);

    let eval = HeldOut::new(&source, &model, &held_out, 256, 4);
    let (awq_bytes, rtn_bytes) = (f32_bytes(&awq_out.linears), f32_bytes(&rtn_linears));
    let (awq_ppl, awq_kld) = eval.evaluate(&rebuilt(&source, &awq_out.norms, &awq_bytes));
    let (rtn_ppl, rtn_kld) = eval.evaluate(&rebuilt(&source, &BTreeMap::new(), &rtn_bytes));
    let fp_ppl = eval.fp_perplexity;
    eprintln!(
        "FP ppl {fp_ppl:.3}; RTN w4g64 asym ppl {rtn_ppl:.3} kld {rtn_kld:.4}; AWQ ppl {awq_ppl:.3} kld {awq_kld:.4}"
    );
    assert!(rtn_kld > 0.0 && awq_kld > 0.0);
    assert!(awq_kld < rtn_kld, "AWQ KLD {awq_kld} is not below RTN's {rtn_kld}");
    assert!(awq_ppl - fp_ppl < rtn_ppl - fp_ppl, "AWQ PPL {awq_ppl} vs RTN {rtn_ppl} (FP {fp_ppl})");
}

#[test]
fn awq_is_the_same_at_one_and_two_threads() {
    let Some(fixture) = fixture_model() else { return };
    let source = ModelSource::open(&fixture).unwrap();
    let mut model = Model::load(&source).unwrap();
    // Blocks are independent given their input: two show every step.
    model.layers.truncate(2);
    let calib = calibration(&source, 2, 64);
    let at = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run_awq(&model, &calib))
    };
    let ((one, report_one), (two, report_two)) = (at(1), at(2));
    assert_eq!(one.linears.len(), 2 * 7);
    assert_eq!(report_one.alphas, report_two.alphas);
    assert!(one == two, "1 and 2 threads differ");
}
