//! Shared by the calibrated-quantizer tests (GPTQ, AWQ): the calibration sample, round-to-nearest of every
//! block linear, a model rebuilt with quantized weights, and held-out evaluation — Shakespeare text the
//! embedded calibration corpus does not hold (it is the file's first 270,007 bytes; this starts at byte
//! 600,000), the full-precision model's log-probabilities on it, and another model's perplexity and mean
//! KL-divergence from them.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use calibration::{sample, CalibrationSet, Corpus, SamplingOptions};
use qforge::eval::perplexity::{for_each_chunk, token_nll, ChunkPlan, Protocol};
use qforge::model::ModelSource;
use qforge::quant::gptq::{self, GptqConfig, GroupQuantized};
use qforge::runtime::forward::BlockLinear;
use qforge::runtime::model::LayerLinear;
use qforge::runtime::{GgmlLinear, Model};

/// `nsamples × seqlen` tokens of the embedded corpus, seed 0.
pub fn calibration(source: &ModelSource, nsamples: usize, seqlen: usize) -> CalibrationSet {
    let tokenizer = qforge::runtime::tokenizer(source).unwrap();
    sample(&Corpus::embedded(), &tokenizer, SamplingOptions { nsamples, seqlen, seed: 0 }).unwrap()
}

/// Round-to-nearest of every block linear on `config`'s grid, by GGUF name.
pub fn rtn_all(model: &Model, config: &GptqConfig) -> BTreeMap<String, GroupQuantized> {
    let mut out = BTreeMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for linear in BlockLinear::ALL {
            let w = linear.of(layer);
            let (rows, cols) = (w.rows(), w.cols());
            let mut values = vec![0f32; rows * cols];
            w.decode_rows(0..rows, &mut values);
            out.insert(format!("blk.{l}.{}", linear.gguf_name()), gptq::rtn(&values, rows, cols, config).unwrap());
        }
    }
    out
}

/// The dequantized weights as f32 bytes the runtime can borrow.
pub fn f32_bytes(weights: &BTreeMap<String, GroupQuantized>) -> BTreeMap<String, Vec<u8>> {
    weights.iter().map(|(n, q)| (n.clone(), q.dequantize().iter().flat_map(|v| v.to_le_bytes()).collect())).collect()
}

/// `source`'s model with the given norms (AWQ's folded ones; none for GPTQ) and every block linear replaced
/// by the f32 weights in `bytes`.
pub fn rebuilt<'a>(
    source: &'a ModelSource,
    norms: &BTreeMap<String, Vec<f32>>,
    bytes: &'a BTreeMap<String, Vec<u8>>,
) -> Model<'a> {
    let mut model = Model::load(source).unwrap();
    for (l, layer) in model.layers.iter_mut().enumerate() {
        if let Some(norm) = norms.get(&format!("blk.{l}.attn_norm.weight")) {
            layer.attn_norm = norm.clone();
            layer.ffn_norm = norms[&format!("blk.{l}.ffn_norm.weight")].clone();
        }
        for linear in BlockLinear::ALL {
            let w = linear.of(layer);
            let data = &bytes[&format!("blk.{l}.{}", linear.gguf_name())];
            let replaced: LayerLinear =
                GgmlLinear::new(formats::GgmlType::F32, w.rows(), w.cols(), data).unwrap().into();
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

pub struct HeldOut {
    tokens: Vec<u32>,
    plan: ChunkPlan,
    /// Per chunk, the full-precision model's log-probabilities of every scored position.
    reference: Vec<Vec<f64>>,
    pub fp_perplexity: f64,
}

impl HeldOut {
    /// `chunks` chunks of `ctx` tokens of the Shakespeare file at `path`, scored by `model`.
    pub fn new(source: &ModelSource, model: &Model, path: &Path, ctx: usize, chunks: usize) -> Self {
        let text = std::fs::read_to_string(path).unwrap();
        let excerpt: String = text.chars().skip(600_000).take(2000 * chunks).collect();
        let tokenizer = qforge::runtime::tokenizer(source).unwrap();
        let tokens = tokenizer.encode(&excerpt).unwrap();
        let bos = tokenizer.options().bos.filter(|_| tokenizer.options().add_bos);
        let plan = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), ctx, Some(chunks), bos).unwrap();
        assert_eq!(plan.chunks, chunks);
        let vocab = model.config.vocab_size;
        let mut reference = Vec::new();
        for_each_chunk(model, &tokens, &plan, |_, _, logits| {
            reference.push(log_probs(logits, vocab));
            Ok(())
        })
        .unwrap();
        let mut held_out = Self { tokens, plan, reference, fp_perplexity: 0.0 };
        held_out.fp_perplexity = held_out.evaluate(model).0;
        held_out
    }

    /// (perplexity, mean KL-divergence from the full-precision model) of `model`.
    pub fn evaluate(&self, model: &Model) -> (f64, f64) {
        let vocab = model.config.vocab_size;
        let (mut nll, mut kld, mut count) = (0f64, 0f64, 0usize);
        for_each_chunk(model, &self.tokens, &self.plan, |index, targets, logits| {
            nll += logits.chunks_exact(vocab).zip(targets).map(|(row, &t)| token_nll(row, t)).sum::<f64>();
            let q = log_probs(logits, vocab);
            kld += self.reference[index].iter().zip(&q).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
            count += targets.len();
            Ok(())
        })
        .unwrap();
        ((nll / count as f64).exp(), kld / count as f64)
    }
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
