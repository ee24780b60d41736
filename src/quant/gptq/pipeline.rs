//! GPTQ over a whole model, one decoder block at a time (GPTQ's sequential layer loop).
//!
//! The calibration tokens are embedded once. For each block, in true-sequential order, the block runs
//! over every calibration sequence (each its own sequence from position 0) while the input of the stage's
//! linears is summed into one [`HessianAccumulator`], and stops there: later linears cannot change that
//! input. The stage's linears are quantized and take their quantized (dequantized f32) weights before
//! the next stage's inputs are captured: q/k/v (one shared input), then o, then gate/up (one shared
//! input), then down. The fully quantized block then turns the activations into the next block's input,
//! so every block is calibrated on what the quantized model before it produces. A block thus costs about
//! two and a half forward passes: the captures run a growing prefix of it, the last pass all of it.
//!
//! [`run`] is the loop, with the rounding left to a callback (GPTQ on a GGUF block grid plugs in
//! there); [`quantize`] is GPTQ on its own grouped grid. Each linear is handed over as soon as its
//! Hessian is ready (named by its GGUF tensor name, rows in the source's order: a GGUF llama keeps
//! llama.cpp's permuted q/k rows, which an HF exporter must undo), so nothing but the current block is
//! held.
//!
//! Memory, with `N = nsamples · seqlen` calibration tokens, hidden width `d`, `P` parameters per block,
//! the widest linear `rows × cols` and the widest input `k` (the FFN width for llama):
//! `4·N·d` (activations) + `4·P` (the block's quantized f32 stand-ins) + `~16·rows·cols` (one linear's
//! f32 weights and GPTQ's working copies) + `24·k²` (the f64 Hessian, finished in its sum's buffer, and
//! the factorization's two f64 matrices; then the f32 inverse factor) + one sequence's forward buffers +
//! the current block's mapped source weights (callers release each linear's once it is quantized).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use calibration::CalibrationSet;
use formats::GgmlType;

use super::{gptq, GptqConfig, GptqOutput, Hessian, HessianAccumulator};
use crate::progress::Progress;
use crate::runtime::forward::{BlockLinear, LinearObserver};
use crate::runtime::model::{Layer, LayerLinear, QkvBias};
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
    /// The rounding: [`run`]'s callback ([`gptq`] itself, with [`quantize`]'s sink).
    pub gptq_seconds: f64,
    /// GPTQ's proxy loss summed over every linear ([`quantize`] only).
    pub loss: f64,
    /// The largest dampening any linear needed ([`quantize`] only).
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

/// One linear for [`run`]'s `quantize_linear` to quantize. The pipeline never reads the linear's
/// source weights again once the callback returns, so a caller holding the
/// [`ModelSource`](crate::model::ModelSource) can release them there.
pub struct LinearJob<'j> {
    /// The GGUF tensor name, e.g. `blk.3.attn_q.weight`.
    pub name: &'j str,
    pub layer: usize,
    pub linear: BlockLinear,
    /// The source weights, `rows × cols` row-major, in the source's row order.
    pub weights: &'j [f32],
    pub rows: usize,
    pub cols: usize,
    /// The Hessian of the linear's calibration inputs (`cols × cols`), as the model quantized so far
    /// produces them.
    pub hessian: &'j Hessian,
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
    let (mut loss, mut max_damp) = (0f64, 0f64);
    let report = run(model, calib, progress, |job| {
        let output = gptq(job.weights, job.rows, job.cols, job.hessian, config)
            .with_context(|| format!("{}: GPTQ failed", job.name))?;
        loss += output.loss;
        max_damp = max_damp.max(output.damp);
        sink(job.name, &output)?;
        Ok(output.weight.dequantized)
    })?;
    Ok(PipelineReport { loss, max_damp, ..report })
}

/// Runs the sequential layer pipeline over `model` on `calib`: `quantize_linear` gets each block
/// linear with its Hessian, in true-sequential order, and returns the dequantized f32 weights
/// (`rows × cols`, source row order) the rest of the pipeline computes with.
pub fn run(
    model: &Model,
    calib: &CalibrationSet,
    progress: Progress,
    mut quantize_linear: impl FnMut(&LinearJob) -> Result<Vec<f32>>,
) -> Result<PipelineReport> {
    let mut report = PipelineReport { layers: model.layers.len(), ..Default::default() };
    let bar = progress.count_bar("gptq", (model.layers.len() * BlockLinear::ALL.len()) as u64);
    let mut x = model.embed(&calib.tokens)?;
    let sequence_len = calib.seqlen * model.config.hidden_size;
    let mut sequence = vec![0f32; sequence_len];
    for (l, original) in model.layers.iter().enumerate() {
        // Quantized linears of this block so far, as f32 bytes the runtime reads.
        let mut quantized: Vec<(BlockLinear, Vec<u8>)> = Vec::with_capacity(BlockLinear::ALL.len());
        for stage in STAGES {
            bar.set_message(format!("blk.{l} calibrating {}", stage[0].gguf_name()));
            let layer = with_weights(original, &quantized)?;
            let mut capture = Capture::new(stage[0], stage[0].of(original).in_features());
            let start = Instant::now();
            for input in x.chunks_exact(sequence_len) {
                // The block stops once the stage's input is captured, but may have updated its copy.
                sequence.copy_from_slice(input);
                capture.done = false;
                let _ = model.block_forward(&layer, l, &mut sequence, &mut capture);
            }
            report.forward_seconds += start.elapsed().as_secs_f64() - capture.seconds;
            report.hessian_seconds += capture.seconds;
            let hessian = capture.hessian.finish()?;
            for &linear in stage {
                let name = format!("blk.{l}.{}", linear.gguf_name());
                bar.set_message(format!("{name} quantizing"));
                let source = linear.of(original);
                let (rows, cols) = (source.out_features(), source.in_features());
                let mut weights = vec![0f32; rows * cols];
                source.decode_rows(0..rows, &mut weights);
                let job = LinearJob { name: &name, layer: l, linear, weights: &weights, rows, cols, hessian: &hessian };
                let start = Instant::now();
                let dequantized = quantize_linear(&job)?;
                report.gptq_seconds += start.elapsed().as_secs_f64();
                drop(weights);
                if dequantized.len() != rows * cols {
                    bail!("{name}: the quantizer returned {} weights for a {rows} x {cols} matrix", dequantized.len());
                }
                quantized.push((linear, dequantized.iter().flat_map(|v| v.to_le_bytes()).collect()));
                report.linears += 1;
                bar.inc(1);
            }
        }
        bar.set_message(format!("blk.{l} quantized forward"));
        let layer = with_weights(original, &quantized)?;
        let start = Instant::now();
        for sequence in x.chunks_exact_mut(sequence_len) {
            let _ = model.block_forward(&layer, l, sequence, &mut ());
        }
        report.forward_seconds += start.elapsed().as_secs_f64();
    }
    bar.finish_and_clear();
    Ok(report)
}

/// Sums the input of one linear into its Hessian, then stops the block.
struct Capture {
    linear: BlockLinear,
    hessian: HessianAccumulator,
    done: bool,
    seconds: f64,
}

impl Capture {
    fn new(linear: BlockLinear, in_features: usize) -> Self {
        Self { linear, hessian: HessianAccumulator::new(in_features), done: false, seconds: 0.0 }
    }
}

impl LinearObserver for Capture {
    fn observe(&mut self, _: usize, linear: BlockLinear, x: &[f32]) {
        if linear == self.linear {
            let start = Instant::now();
            self.hessian.add(x);
            self.seconds += start.elapsed().as_secs_f64();
            self.done = true;
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

/// `layer` with the linears in `quantized` replaced by their f32 weights.
fn with_weights<'b>(layer: &Layer<'b>, quantized: &'b [(BlockLinear, Vec<u8>)]) -> Result<Layer<'b>> {
    let pick = |linear: BlockLinear| -> Result<LayerLinear<'b>> {
        let original = linear.of(layer).clone();
        match quantized.iter().find(|(q, _)| *q == linear) {
            None => Ok(original),
            Some((_, bytes)) => GgmlLinear::new(GgmlType::F32, original.rows(), original.cols(), bytes)
                .map(Into::into)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Architecture, ModelSource};
    use crate::runtime::synthetic;

    /// Sums each stage's input over whole forward passes: one accumulator per block and stage.
    struct AllStages(Vec<HessianAccumulator>);

    impl LinearObserver for AllStages {
        fn observe(&mut self, l: usize, linear: BlockLinear, x: &[f32]) {
            if let Some(stage) = STAGES.iter().position(|s| s[0] == linear) {
                self.0[l * STAGES.len() + stage].add(x);
            }
        }
    }

    fn calibration(model: &Model, nsamples: usize, seqlen: usize) -> CalibrationSet {
        let vocab = model.config.vocab_size;
        CalibrationSet { seqlen, tokens: (0..nsamples * seqlen).map(|i| (i * 7 % vocab) as u32).collect() }
    }

    #[test]
    fn stopped_blocks_capture_what_the_full_forward_pass_feeds_each_linear() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 61);
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let calib = calibration(&model, 3, 8);
        // Handing the f32 weights back unchanged keeps the model exact, so every stage must see what the
        // unquantized model's forward pass feeds it, bit for bit.
        let mut seen = Vec::new();
        let report = run(&model, &calib, Progress { quiet: true }, |job| {
            seen.push((job.name.to_string(), job.hessian.clone()));
            Ok(job.weights.to_vec())
        })
        .unwrap();
        let mut full = AllStages(
            (0..model.layers.len() * STAGES.len())
                .map(|i| HessianAccumulator::new(STAGES[i % STAGES.len()][0].of(&model.layers[0]).in_features()))
                .collect(),
        );
        for sequence in calib.sequences() {
            model.forward_observed(&mut model.new_cache(calib.seqlen), sequence, 0..1, &mut full).unwrap();
        }
        let linears = BlockLinear::ALL.len();
        assert_eq!((report.layers, report.linears, seen.len()), (model.layers.len(), 2 * linears, 2 * linears));
        for (i, (name, hessian)) in seen.iter().enumerate() {
            let (l, linear) = (i / linears, BlockLinear::ALL[i % linears]);
            assert_eq!(name, &format!("blk.{l}.{}", linear.gguf_name()));
            let stage = STAGES.iter().position(|s| s.contains(&linear)).unwrap();
            assert!(hessian == &full.0[l * STAGES.len() + stage].clone().finish().unwrap(), "{name}: Hessians differ");
        }
    }

    #[test]
    fn a_quantizer_returning_the_wrong_shape_is_an_error() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 62);
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let err = run(&model, &calibration(&model, 1, 4), Progress { quiet: true }, |_| Ok(vec![0.0])).unwrap_err();
        assert!(err.to_string().contains("blk.0.attn_q.weight: the quantizer returned 1 weights for a"), "{err}");
    }
}
