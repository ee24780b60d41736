//! GPTQ over a whole model, one decoder block at a time (GPTQ's sequential layer loop).
//!
//! The calibration tokens are embedded once. For each block, in true-sequential order, the block runs
//! over every calibration sequence (each its own sequence from position 0) while the input of the stage's
//! linears is summed into one [`HessianAccumulator`], and stops there: later linears cannot change that
//! input. The stage's linears are quantized and computed with in their quantized form before the next
//! stage's inputs are captured: q/k/v (one shared input), then o, then gate/up (one shared input), then
//! down. The fully quantized block then turns the activations into the next block's input, so every
//! block is calibrated on what the quantized model before it produces. A block thus costs about two and
//! a half forward passes: the captures run a growing prefix of it, the last pass all of it. The
//! quantized linears stay packed ([`QuantizedLinear`]: integer codes or GGUF blocks, decoded on the
//! fly), never an f32 copy: for a 7B block that is ~0.1 GB instead of ~0.8.
//!
//! [`run`] is the loop, with the rounding left to a callback (GPTQ on a GGUF block grid plugs in
//! there); [`quantize`] is GPTQ on its own grouped grid. Each linear is handed over as soon as its
//! Hessian is ready (named by its GGUF tensor name, rows in the source's order: a GGUF llama keeps
//! llama.cpp's permuted q/k rows, which an HF exporter must undo), so nothing but the current block is
//! held.
//!
//! Memory, with `N = nsamples · seqlen` calibration tokens, hidden width `d`, `P` parameters per block,
//! the widest linear `rows × cols` and the widest input `k` (the FFN width for llama):
//! `2·N·d` (the activations, f16: [`Activations`]) + `~P/2` (the block's quantized linears, packed) +
//! `~12·rows·cols` (one linear's f32 weights and GPTQ's working copies) + `8·k²` (the Hessian's f64
//! upper-triangle sum, then the f32 Hessian and its Cholesky factor, then the factor and the f32 inverse
//! factor: a stage's last linear frees the Hessian once factored, and `ffn_down` is alone in its stage;
//! `12·d²` for the other stages) + one sequence's forward buffers + the current linear's mapped source
//! weights (released once quantized).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use calibration::CalibrationSet;
use formats::packed::UnpackedWeights;
use formats::GgmlType;

use super::{gptq, GptqConfig, GptqOutput, GroupQuantized, HessianAccumulator, HessianInput};
use crate::progress::Progress;
use crate::quant::activations::Activations;
use crate::runtime::forward::{BlockLinear, LinearObserver};
use crate::runtime::kernels::packed::PackedLinear;
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
    /// produces them; owned by the stage's last linear.
    pub hessian: HessianInput<'j>,
}

/// What the rest of the pipeline computes a quantized linear with: the weights it decodes to are the
/// quantized weights, rows in the source's order.
pub enum QuantizedLinear {
    /// Left as the source stores it.
    Source,
    /// GGUF blocks of this type.
    Blocks(GgmlType, Vec<u8>),
    /// Codes on a grouped integer grid.
    Grouped(Arc<PackedLinear>),
}

impl QuantizedLinear {
    /// The GPTQ/RTN grid result as the packed kernel runs it.
    pub fn grouped(q: GroupQuantized) -> Result<Self> {
        let w = UnpackedWeights {
            out_features: q.rows,
            in_features: q.cols,
            bits: q.bits,
            codes: q.codes,
            zeros: q.zeros,
            scales: q.scales,
            g_idx: q.g_idx,
        };
        Ok(Self::Grouped(Arc::new(PackedLinear::new(&w).map_err(anyhow::Error::msg)?)))
    }
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
        QuantizedLinear::grouped(output.weight)
    })?;
    Ok(PipelineReport { loss, max_damp, ..report })
}

/// Runs the sequential layer pipeline over `model` on `calib`: `quantize_linear` gets each block
/// linear with its Hessian, in true-sequential order, and returns the quantized linear the rest of the
/// pipeline computes with.
pub fn run(
    model: &Model,
    calib: &CalibrationSet,
    progress: Progress,
    mut quantize_linear: impl FnMut(LinearJob) -> Result<QuantizedLinear>,
) -> Result<PipelineReport> {
    let mut report = PipelineReport { layers: model.layers.len(), ..Default::default() };
    let bar = progress.count_bar("gptq", (model.layers.len() * BlockLinear::ALL.len()) as u64);
    let mut x = Activations::embed(model, calib)?;
    let mut sequence = vec![0f32; x.sequence_len()];
    for (l, original) in model.layers.iter().enumerate() {
        // What the last block freed in small pieces would otherwise add up.
        crate::heap::return_freed_memory();
        // Quantized linears of this block so far.
        let mut quantized: Vec<(BlockLinear, QuantizedLinear)> = Vec::with_capacity(BlockLinear::ALL.len());
        for stage in STAGES {
            bar.set_message(format!("blk.{l} calibrating {}", stage[0].gguf_name()));
            let layer = with_weights(original, &quantized)?;
            let mut capture = Capture::new(stage[0], stage[0].of(original).in_features());
            let start = Instant::now();
            for i in 0..x.sequences() {
                // The block stops once the stage's input is captured, but may have updated its copy.
                x.load(i, &mut sequence);
                capture.done = false;
                let _ = model.block_forward(&layer, l, &mut sequence, &mut capture);
            }
            report.forward_seconds += start.elapsed().as_secs_f64() - capture.seconds;
            report.hessian_seconds += capture.seconds;
            let mut hessian = Some(capture.hessian.finish()?);
            for (k, &linear) in stage.iter().enumerate() {
                let name = format!("blk.{l}.{}", linear.gguf_name());
                bar.set_message(format!("{name} quantizing"));
                let source = linear.of(original);
                let (rows, cols) = (source.out_features(), source.in_features());
                let mut weights = vec![0f32; rows * cols];
                source.decode_rows(0..rows, &mut weights);
                // The stage's last linear owns the Hessian, so GPTQ can free it once factored.
                let hessian = match k + 1 == stage.len() {
                    true => HessianInput::Owned(hessian.take().expect("the stage's Hessian is taken last")),
                    false => HessianInput::Borrowed(hessian.as_ref().expect("the stage's Hessian is taken last")),
                };
                let job = LinearJob { name: &name, layer: l, linear, weights: &weights, rows, cols, hessian };
                let start = Instant::now();
                let result = quantize_linear(job)?;
                report.gptq_seconds += start.elapsed().as_secs_f64();
                drop(weights);
                // Nothing reads the linear's source weights again.
                model.release_source(&name);
                quantized.push((linear, result));
                // Checks the result's shape now, so a bad one is reported under its own name.
                with_weights(original, &quantized).with_context(|| format!("{name}: the quantizer's result"))?;
                report.linears += 1;
                bar.inc(1);
            }
        }
        bar.set_message(format!("blk.{l} quantized forward"));
        let layer = with_weights(original, &quantized)?;
        let start = Instant::now();
        for i in 0..x.sequences() {
            x.load(i, &mut sequence);
            let _ = model.block_forward(&layer, l, &mut sequence, &mut ());
            x.store(i, &sequence);
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

/// `layer` with the linears in `quantized` replaced by their quantized forms.
fn with_weights<'b>(layer: &Layer<'b>, quantized: &'b [(BlockLinear, QuantizedLinear)]) -> Result<Layer<'b>> {
    let pick = |linear: BlockLinear| -> Result<LayerLinear<'b>> {
        let original = linear.of(layer).clone();
        let (rows, cols) = (original.out_features(), original.in_features());
        let fail = anyhow::Error::msg;
        match quantized.iter().find(|(q, _)| *q == linear).map(|(_, q)| q) {
            None | Some(QuantizedLinear::Source) => Ok(original),
            Some(QuantizedLinear::Blocks(ty, bytes)) => {
                GgmlLinear::new(*ty, rows, cols, bytes).map(Into::into).map_err(fail)
            }
            Some(QuantizedLinear::Grouped(packed)) => {
                if (packed.out_features(), packed.in_features()) != (rows, cols) {
                    return Err(fail(format!(
                        "{} x {} quantized weights for a {rows} x {cols} matrix",
                        packed.out_features(),
                        packed.in_features()
                    )));
                }
                Ok(LayerLinear::Packed(packed.clone()))
            }
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
    use crate::quant::gptq::Hessian;
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
        // Leaving the weights unchanged keeps the model exact, so every stage must see what the unquantized
        // model's forward pass feeds it, up to the f16 rounding of the activations between blocks.
        let mut seen = Vec::new();
        let report = run(&model, &calib, Progress { quiet: true }, |job| {
            seen.push((job.name.to_string(), (*job.hessian).clone()));
            Ok(QuantizedLinear::Source)
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
            let expected = full.0[l * STAGES.len() + stage].clone().finish().unwrap();
            let n = expected.dim();
            assert_eq!(hessian.dim(), n, "{name}");
            let entries = |h: &Hessian| (0..n * n).map(|i| h.get(i / n, i % n)).collect::<Vec<_>>();
            let scale = entries(&expected).iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = entries(hessian).iter().zip(entries(&expected)).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 2e-3 * scale, "{name}: Hessians differ by {worst} (largest entry {scale})");
        }
    }

    #[test]
    fn a_quantizer_returning_the_wrong_shape_is_an_error() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 62);
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let calib = calibration(&model, 1, 4);
        let err =
            run(&model, &calib, Progress { quiet: true }, |_| Ok(QuantizedLinear::Blocks(GgmlType::F32, vec![0; 4])))
                .unwrap_err();
        assert!(format!("{err:#}").starts_with("blk.0.attn_q.weight: the quantizer's result: "), "{err:#}");
    }
}
