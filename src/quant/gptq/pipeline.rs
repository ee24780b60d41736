//! GPTQ over a whole model, one decoder block at a time (GPTQ's sequential layer loop).
//!
//! The calibration tokens are embedded once. For each block, in true-sequential order, the block runs
//! over every calibration sequence (each its own sequence from position 0) while the input of the stage's
//! linears is summed into one [`HessianAccumulator`]; the stage's linears are quantized with [`gptq`] and
//! take their quantized (dequantized f32) weights before the next stage's inputs are captured:
//! q/k/v (one shared input), then o, then gate/up (one shared input), then down. The fully quantized
//! block then turns the activations into the next block's input, so every block is calibrated on what
//! the quantized model before it produces.
//!
//! Each quantized linear goes to a sink as soon as it is done (named by its GGUF tensor name, rows in the
//! source's order: a GGUF llama keeps llama.cpp's permuted q/k rows, which an HF exporter must undo),
//! so nothing but the current block is held.
//!
//! Memory, with `N = nsamples · seqlen` calibration tokens, hidden width `d`, `P` parameters per block,
//! the widest linear `rows × cols` and the widest input `k` (the FFN width for llama):
//! `4·N·d` (activations) + `4·P` (the block's quantized f32 stand-ins) + `~16·rows·cols` (one linear's
//! f32 weights and GPTQ's working copies) + `20·k²` (the f64 Hessian sum, the finished f64 Hessian and
//! the f32 inverse factor) + one sequence's forward buffers. The source's own weights stay mapped.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use calibration::CalibrationSet;
use formats::GgmlType;

use super::{gptq, GptqConfig, GptqOutput, HessianAccumulator};
use crate::progress::Progress;
use crate::runtime::forward::{BlockLinear, LinearObserver};
use crate::runtime::model::{Layer, QkvBias};
use crate::runtime::{GgmlLinear, Linear, Model};

/// The true-sequential stages: the linears of a stage share one input (and Hessian) and are quantized
/// before the next stage's input is captured.
const STAGES: [&[BlockLinear]; 4] = [
    &[BlockLinear::AttnQ, BlockLinear::AttnK, BlockLinear::AttnV],
    &[BlockLinear::AttnOutput],
    &[BlockLinear::FfnGate, BlockLinear::FfnUp],
    &[BlockLinear::FfnDown],
];

/// Where the time went and how hard the rounding was.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineReport {
    pub layers: usize,
    pub linears: usize,
    /// Calibration forward passes through the blocks, Hessian accumulation excluded.
    pub forward_seconds: f64,
    /// Summing `x xᵀ` into the Hessians.
    pub hessian_seconds: f64,
    /// [`gptq`] itself: factorization and the column loop.
    pub gptq_seconds: f64,
    /// GPTQ's proxy loss summed over every linear.
    pub loss: f64,
    /// The largest dampening any linear needed.
    pub max_damp: f64,
}

/// Checks that `config` can quantize every linear of `model`: supported bits and group size, and a
/// group size that divides each input width (GPTQ checkpoints with a short last group do not load in
/// vLLM, so they are refused rather than written).
pub fn check_config(model: &Model, config: &GptqConfig) -> Result<()> {
    config.validate()?;
    let (Some(group), Some(layer)) = (config.group_size, model.layers.first()) else { return Ok(()) };
    for linear in BlockLinear::ALL {
        let cols = linear.of(layer).in_features();
        if cols % group != 0 {
            bail!("group size {group} does not divide {cols}, the input width of {}", linear.gguf_name());
        }
    }
    Ok(())
}

/// Quantizes every block linear of `model` with GPTQ on `calib`, handing each result to
/// `sink(gguf_name, output)` as it is done.
pub fn quantize(
    model: &Model,
    calib: &CalibrationSet,
    config: &GptqConfig,
    progress: Progress,
    mut sink: impl FnMut(&str, &GptqOutput) -> Result<()>,
) -> Result<PipelineReport> {
    check_config(model, config)?;
    let mut report = PipelineReport { layers: model.layers.len(), ..Default::default() };
    let bar = progress.count_bar("gptq", (model.layers.len() * BlockLinear::ALL.len()) as u64);
    let mut x = model.embed(&calib.tokens)?;
    let sequence_len = calib.seqlen * model.config.hidden_size;
    for (l, original) in model.layers.iter().enumerate() {
        // Quantized linears of this block so far, as f32 bytes the runtime reads.
        let mut quantized: Vec<(BlockLinear, Vec<u8>)> = Vec::new();
        for stage in STAGES {
            bar.set_message(format!("blk.{l} calibrating {}", stage[0].gguf_name()));
            let hessian = HessianAccumulator::new(stage[0].of(original).in_features());
            let mut capture = Capture { linear: stage[0], hessian, seconds: 0.0 };
            let layer = with_weights(original, &quantized)?;
            let start = Instant::now();
            for sequence in x.chunks_exact(sequence_len) {
                model.block_forward(&layer, l, &mut sequence.to_vec(), &mut capture);
            }
            report.forward_seconds += start.elapsed().as_secs_f64() - capture.seconds;
            report.hessian_seconds += capture.seconds;
            let hessian = capture.hessian.finish()?;
            for &linear in stage {
                let name = format!("blk.{l}.{}", linear.gguf_name());
                bar.set_message(format!("{name} quantizing"));
                let weights = linear.of(original);
                let (rows, cols) = (weights.out_features(), weights.in_features());
                let mut w = vec![0f32; rows * cols];
                weights.decode_rows(0..rows, &mut w);
                let start = Instant::now();
                let output = gptq(&w, rows, cols, &hessian, config).with_context(|| format!("{name}: GPTQ failed"))?;
                report.gptq_seconds += start.elapsed().as_secs_f64();
                report.loss += output.loss;
                report.max_damp = report.max_damp.max(output.damp);
                report.linears += 1;
                sink(&name, &output)?;
                quantized.push((linear, output.weight.dequantized.iter().flat_map(|v| v.to_le_bytes()).collect()));
                bar.inc(1);
            }
        }
        bar.set_message(format!("blk.{l} quantized forward"));
        let layer = with_weights(original, &quantized)?;
        let start = Instant::now();
        for sequence in x.chunks_exact_mut(sequence_len) {
            model.block_forward(&layer, l, sequence, &mut ());
        }
        report.forward_seconds += start.elapsed().as_secs_f64();
    }
    bar.finish_and_clear();
    Ok(report)
}

/// Sums the input of one linear into its Hessian.
struct Capture {
    linear: BlockLinear,
    hessian: HessianAccumulator,
    seconds: f64,
}

impl LinearObserver for Capture {
    fn observe(&mut self, _: usize, linear: BlockLinear, x: &[f32]) {
        if linear == self.linear {
            let start = Instant::now();
            self.hessian.add(x);
            self.seconds += start.elapsed().as_secs_f64();
        }
    }
}

/// `layer` with the linears in `quantized` replaced by their f32 weights.
fn with_weights<'b>(layer: &Layer<'b>, quantized: &'b [(BlockLinear, Vec<u8>)]) -> Result<Layer<'b>> {
    let pick = |linear: BlockLinear| -> Result<GgmlLinear<'b>> {
        let original = *linear.of(layer);
        match quantized.iter().find(|(q, _)| *q == linear) {
            None => Ok(original),
            Some((_, bytes)) => GgmlLinear::new(GgmlType::F32, original.rows(), original.cols(), bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", linear.gguf_name())),
        }
    };
    Ok(Layer {
        attn_norm: layer.attn_norm.clone(),
        wq: pick(BlockLinear::AttnQ)?,
        wk: pick(BlockLinear::AttnK)?,
        wv: pick(BlockLinear::AttnV)?,
        bias: layer.bias.as_ref().map(|b| QkvBias { q: b.q.clone(), k: b.k.clone(), v: b.v.clone() }),
        wo: pick(BlockLinear::AttnOutput)?,
        ffn_norm: layer.ffn_norm.clone(),
        w_gate: pick(BlockLinear::FfnGate)?,
        w_up: pick(BlockLinear::FfnUp)?,
        w_down: pick(BlockLinear::FfnDown)?,
    })
}
