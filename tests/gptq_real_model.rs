//! GPTQ's layer pipeline on the real SmolLM2 fixture: it quantizes every linear of all 30 blocks, the
//! result follows the full-precision model more closely than round-to-nearest on the same grid
//! (KL-divergence and perplexity on Shakespeare the embedded calibration corpus does not hold), a group
//! size that does not divide the width is refused, and the output is the same at 1 and 2 threads.

mod common;

use std::collections::BTreeMap;

use calibration::{sample, CalibrationSet, Corpus, SamplingOptions};
use common::{fixture_model, shared_data};
use qforge::eval::perplexity::{for_each_chunk, token_nll, ChunkPlan, Protocol};
use qforge::model::ModelSource;
use qforge::progress::Progress;
use qforge::quant::gptq::{self, pipeline, GptqConfig, GroupQuantized};
use qforge::runtime::forward::BlockLinear;
use qforge::runtime::{GgmlLinear, Linear, Model};

const W4_G64: GptqConfig =
    GptqConfig { bits: 4, group_size: Some(64), sym: true, act_order: false, static_groups: false, damp: 0.01 };

fn calibration(source: &ModelSource, nsamples: usize, seqlen: usize) -> CalibrationSet {
    let tokenizer = qforge::runtime::tokenizer(source).unwrap();
    sample(&Corpus::embedded(), &tokenizer, SamplingOptions { nsamples, seqlen, seed: 0 }).unwrap()
}

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

/// Round-to-nearest of every block linear on the same grid.
fn run_rtn(model: &Model) -> BTreeMap<String, GroupQuantized> {
    let mut out = BTreeMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for linear in BlockLinear::ALL {
            let w = linear.of(layer);
            let (rows, cols) = (w.out_features(), w.in_features());
            let mut values = vec![0f32; rows * cols];
            w.decode_rows(0..rows, &mut values);
            out.insert(format!("blk.{l}.{}", linear.gguf_name()), gptq::rtn(&values, rows, cols, &W4_G64).unwrap());
        }
    }
    out
}

fn f32_bytes(weights: &BTreeMap<String, GroupQuantized>) -> BTreeMap<String, Vec<u8>> {
    weights.iter().map(|(n, q)| (n.clone(), q.dequantized.iter().flat_map(|v| v.to_le_bytes()).collect())).collect()
}

/// `source`'s model with every block linear replaced by the f32 weights in `bytes`.
fn with_weights<'a>(source: &'a ModelSource, bytes: &'a BTreeMap<String, Vec<u8>>) -> Model<'a> {
    let mut model = Model::load(source).unwrap();
    for (l, layer) in model.layers.iter_mut().enumerate() {
        for linear in BlockLinear::ALL {
            let w = linear.of(layer);
            let data = &bytes[&format!("blk.{l}.{}", linear.gguf_name())];
            let replaced = GgmlLinear::new(formats::GgmlType::F32, w.rows(), w.cols(), data).unwrap();
            *match linear {
                BlockLinear::AttnQ => &mut layer.wq,
                BlockLinear::AttnK => &mut layer.wk,
                BlockLinear::AttnV => &mut layer.wv,
                BlockLinear::AttnOutput => &mut layer.wo,
                BlockLinear::FfnGate => &mut layer.w_gate,
                BlockLinear::FfnUp => &mut layer.w_up,
                BlockLinear::FfnDown => &mut layer.w_down,
            } = replaced;
        }
    }
    model
}

/// Log-softmax of each row, in f64.
fn log_probs(logits: &[f32], vocab: usize) -> Vec<f64> {
    logits
        .chunks_exact(vocab)
        .flat_map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            row.iter().map(move |&v| v as f64 - log_sum)
        })
        .collect()
}

/// (perplexity, mean KL-divergence from `reference`) of `model` on the planned chunks.
fn evaluate(model: &Model, tokens: &[u32], plan: &ChunkPlan, reference: &[Vec<f64>]) -> (f64, f64) {
    let vocab = model.config.vocab_size;
    let (mut nll, mut kld, mut count) = (0f64, 0f64, 0usize);
    for_each_chunk(model, tokens, plan, |index, targets, logits| {
        nll += logits.chunks_exact(vocab).zip(targets).map(|(row, &t)| token_nll(row, t)).sum::<f64>();
        let q = log_probs(logits, vocab);
        let p = &reference[index];
        kld += p.iter().zip(&q).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
        count += targets.len();
        Ok(())
    })
    .unwrap();
    ((nll / count as f64).exp(), kld / count as f64)
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
    let rtn_weights = run_rtn(&model);
    assert_eq!(gptq_weights.len(), 30 * 7);
    assert!(gptq_weights.keys().eq(rtn_weights.keys()));
    for (name, q) in &gptq_weights {
        let r = &rtn_weights[name];
        assert_eq!((q.rows, q.cols, q.groups()), (r.rows, r.cols, r.cols / 64), "{name}");
        assert!(q.zeros.iter().all(|&z| z == 8), "{name}: symmetric 4-bit zero points are 8");
    }

    // The embedded corpus is the file's first 270,007 bytes; the text from byte 600,000 on is unseen.
    let text = std::fs::read_to_string(held_out).unwrap();
    let excerpt: String = text.chars().skip(600_000).take(8000).collect();
    let tokenizer = qforge::runtime::tokenizer(&source).unwrap();
    let tokens = tokenizer.encode(&excerpt).unwrap();
    let bos = tokenizer.options().bos.filter(|_| tokenizer.options().add_bos);
    let plan = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), 256, Some(4), bos).unwrap();
    assert_eq!(plan.chunks, 4);
    let vocab = model.config.vocab_size;
    let mut reference = Vec::new();
    for_each_chunk(&model, &tokens, &plan, |_, _, logits| {
        reference.push(log_probs(logits, vocab));
        Ok(())
    })
    .unwrap();
    let (fp_ppl, _) = evaluate(&model, &tokens, &plan, &reference);

    let (gptq_bytes, rtn_bytes) = (f32_bytes(&gptq_weights), f32_bytes(&rtn_weights));
    let (gptq_ppl, gptq_kld) = evaluate(&with_weights(&source, &gptq_bytes), &tokens, &plan, &reference);
    let (rtn_ppl, rtn_kld) = evaluate(&with_weights(&source, &rtn_bytes), &tokens, &plan, &reference);
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
