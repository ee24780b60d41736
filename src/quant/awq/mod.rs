//! AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
//! 2024) over a whole model, one decoder block at a time, after AutoAWQ's `AwqQuantizer`:
//!
//! 1. The full-precision block runs once over the calibration sequences, capturing for each group of
//!    linears sharing an input (`block::GROUPS`: q/k/v, o, gate/up, down) the per-channel mean `|x|`
//!    and the Hessian `2/n XᵀX`; its output is the next block's input (the full-precision activations,
//!    as AutoAWQ does).
//! 2. Per group, the scales `s = x_mean^α` with the lowest rounding error (`search::scales`) are
//!    folded in: the producer (attn_norm, ffn_norm, v_proj rows, up_proj rows) divided by `s`, the
//!    group's input columns multiplied by it, so the float block is unchanged. Under grouped-query
//!    attention o_proj's scales are tied across the query heads sharing a KV head (AutoAWQ skips o_proj
//!    then); with q/k/v biases (whose v bias would need dividing too) o_proj is not scaled.
//! 3. Every linear but q/k has each row's group ranges clipped (`search::clip`), then all are rounded
//!    to nearest on the grouped min-max grid GPTQ's RTN uses ([`gptq::rtn`]; its range always contains
//!    0, where AutoAWQ's spans exactly min..max), f16 scales as the AWQ GEMM format stores them.
//!
//! Both searches score a linear by its own output error on the calibration inputs, computed from the
//! Hessian; AutoAWQ reruns the attention/MLP module instead, which also sees attention and SwiGLU.
//!
//! Memory: the activations (`2·N·d` for `N` calibration tokens of width `d`, stored as f16:
//! [`Activations`]), one block's f32 weights and its four inputs' Hessians (upper-triangle f64 sums, then
//! f32 matrices: `4·k²` each for input width `k`), and one sequence's forward buffers. Deterministic at any
//! thread count.
//!
//! - `block`: the block's f32 weights, the scale groups and folding.
//! - `search`: the scale and clip searches.

mod block;
mod search;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use calibration::CalibrationSet;

use self::block::{BlockWeights, Producer, Tie, GROUPS};
use super::gptq::{self, pipeline, GptqConfig, GroupQuantized, HessianAccumulator};
use crate::progress::Progress;
use crate::quant::activations::Activations;
use crate::runtime::forward::{BlockLinear, LinearObserver};
use crate::runtime::Model;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AwqConfig {
    /// 4 only: the only width the AWQ GEMM format packs.
    pub bits: u32,
    /// Input columns per group: 32, 64 or 128, dividing every linear's input width.
    pub group_size: usize,
    /// Asymmetric groups with a zero point (AutoAWQ's default); otherwise GPTQ's symmetric grid.
    pub zero_point: bool,
    /// Points of the α grid `k / grid_points` (and of the clip ratios `1 − k / grid_points`).
    pub grid_points: usize,
    /// Search each group's clipping range.
    pub clip: bool,
}

impl Default for AwqConfig {
    fn default() -> Self {
        Self { bits: 4, group_size: 128, zero_point: true, grid_points: 20, clip: true }
    }
}

impl AwqConfig {
    /// The grouped grid AWQ rounds onto, as a GPTQ round-to-nearest configuration.
    pub fn rounding(&self) -> GptqConfig {
        GptqConfig {
            bits: self.bits,
            group_size: Some(self.group_size),
            sym: !self.zero_point,
            act_order: false,
            static_groups: false,
            ..GptqConfig::default()
        }
    }
}

/// What [`quantize`] hands its sink, in the forward pass's order per block: `attn_norm`, q, k, v, o,
/// `ffn_norm`, gate, up, down.
#[derive(Clone, Copy, Debug)]
pub enum AwqItem<'a> {
    /// A norm with the scales folded in (attn_norm / ffn_norm), GGUF name.
    Norm { name: &'a str, values: &'a [f32] },
    /// A block linear: its folded + clipped f32 weights (what a GGUF block format quantizes) and the
    /// group-quantized result (what the AWQ GEMM export packs). Source row order.
    Linear { name: &'a str, rows: usize, cols: usize, scaled: &'a [f32], quantized: &'a GroupQuantized },
}

/// Where the time went and what the searches chose.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AwqReport {
    pub layers: usize,
    pub linears: usize,
    /// Calibration forward passes, statistics excluded.
    pub forward_seconds: f64,
    /// Summing `|x|` and `x xᵀ`.
    pub statistics_seconds: f64,
    pub scale_search_seconds: f64,
    pub clip_search_seconds: f64,
    /// Per block, the α chosen for q/k/v, o, gate/up and down (`None`: not scaled).
    pub alphas: Vec<[Option<f64>; 4]>,
    /// The scale search's output-error proxy summed over groups: with the chosen scales, and with
    /// plain rounding (α = 0).
    pub scaled_loss: f64,
    pub rounding_loss: f64,
}

/// Checks that `config` can quantize every linear of `model`.
pub fn check_config(model: &Model, config: &AwqConfig) -> Result<()> {
    if config.bits != 4 {
        bail!("AWQ quantizes to 4 bits only (the AWQ GEMM format packs 4-bit codes), not {}", config.bits);
    }
    if config.grid_points == 0 {
        bail!("the AWQ search grid needs at least one point");
    }
    pipeline::check_config(model, &config.rounding())
}

/// Quantizes every block of `model` with AWQ on `calib`, handing each block's folded norms and
/// quantized linears to `sink` as the block is done.
pub fn quantize(
    model: &Model,
    calib: &CalibrationSet,
    config: &AwqConfig,
    progress: Progress,
    mut sink: impl FnMut(AwqItem) -> Result<()>,
) -> Result<AwqReport> {
    check_config(model, config)?;
    if calib.seqlen == 0 || calib.tokens.is_empty() {
        bail!("AWQ needs calibration tokens");
    }
    let mut report = AwqReport { layers: model.layers.len(), ..Default::default() };
    let bar = progress.count_bar("awq", (model.layers.len() * BlockLinear::ALL.len()) as u64);
    let mut x = Activations::embed(model, calib)?;
    let mut sequence = vec![0f32; x.sequence_len()];
    for (l, layer) in model.layers.iter().enumerate() {
        // What the last block freed in small pieces would otherwise add up.
        crate::heap::return_freed_memory();
        bar.set_message(format!("blk.{l} calibrating"));
        let mut capture = Capture::new(layer);
        let start = Instant::now();
        for i in 0..x.sequences() {
            // The capture is never done: every block runs to its end, giving the next block's input.
            x.load(i, &mut sequence);
            let _ = model.block_forward(layer, l, &mut sequence, &mut capture);
            x.store(i, &sequence);
        }
        report.forward_seconds += start.elapsed().as_secs_f64() - capture.seconds;
        report.statistics_seconds += capture.seconds;
        let mut inputs = capture.finish().with_context(|| format!("blk.{l}: AWQ calibration failed"))?;

        bar.set_message(format!("blk.{l} searching scales"));
        let start = Instant::now();
        let mut block = BlockWeights::decode(layer);
        // Decoded into `block`, the block's mapped source weights are not needed again.
        for linear in BlockLinear::ALL {
            model.release_source(&format!("blk.{l}.{}", linear.gguf_name()));
        }
        let scale_all = layer.bias.is_none();
        let alphas = search_scales(model, &mut block, &mut inputs, config, scale_all, &mut report);
        report.alphas.push(alphas);
        report.scale_search_seconds += start.elapsed().as_secs_f64();

        if config.clip {
            bar.set_message(format!("blk.{l} searching clipping ranges"));
            let start = Instant::now();
            clip_ranges(&mut block, &inputs, config);
            report.clip_search_seconds += start.elapsed().as_secs_f64();
        }

        for linear in BlockLinear::ALL {
            let name = format!("blk.{l}.{}", linear.gguf_name());
            bar.set_message(format!("{name} quantizing"));
            emit(l, linear, &name, &block, config, &mut sink)?;
            report.linears += 1;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(report)
}

/// Searches and folds in the scales of every group (o_proj's only when `scale_o`), adjusting the
/// inputs' statistics to the scaled inputs; returns the chosen αs.
fn search_scales(
    model: &Model,
    block: &mut BlockWeights,
    inputs: &mut [GroupInput],
    config: &AwqConfig,
    scale_o: bool,
    report: &mut AwqReport,
) -> [Option<f64>; 4] {
    let mut alphas = [None; 4];
    for ((group, input), alpha) in GROUPS.iter().zip(inputs).zip(&mut alphas) {
        if group.producer == Producer::Rows(BlockLinear::AttnV) && !scale_o {
            continue;
        }
        let tie = Tie::of(group, model.heads);
        let ws: Vec<_> = group.linears.iter().map(|&linear| block.linear(linear)).collect();
        let grid = config.rounding().grid();
        let x_mean = tie.reduce(&input.x_mean);
        let choice = search::scales(&x_mean, &tie, &ws, &input.hessian, grid, config.group_size, config.grid_points);
        block.fold(group, &tie, &choice.scales);
        input.divide_channels(&tie.expand(&choice.scales));
        *alpha = Some(choice.alpha);
        report.scaled_loss += choice.loss;
        report.rounding_loss += choice.rounding_loss;
    }
    alphas
}

/// Clips every linear but q/k, as AutoAWQ does: their outputs meet in the attention scores, where a
/// per-linear output error says little.
fn clip_ranges(block: &mut BlockWeights, inputs: &[GroupInput], config: &AwqConfig) {
    for (group, input) in GROUPS.iter().zip(inputs) {
        for &linear in group.linears.iter().filter(|&&l| l != BlockLinear::AttnQ && l != BlockLinear::AttnK) {
            let w = block.linear_mut(linear);
            search::clip(w, &input.hessian, config.rounding().grid(), config.group_size, config.grid_points);
        }
    }
}

/// Quantizes `linear` of block `l` and hands it to `sink`, preceded by the norm in front of it, if any.
fn emit(
    l: usize,
    linear: BlockLinear,
    name: &str,
    block: &BlockWeights,
    config: &AwqConfig,
    sink: &mut impl FnMut(AwqItem) -> Result<()>,
) -> Result<()> {
    match linear {
        BlockLinear::AttnQ => {
            sink(AwqItem::Norm { name: &format!("blk.{l}.attn_norm.weight"), values: &block.attn_norm })?
        }
        BlockLinear::FfnGate => {
            sink(AwqItem::Norm { name: &format!("blk.{l}.ffn_norm.weight"), values: &block.ffn_norm })?
        }
        _ => {}
    }
    let w = block.linear(linear);
    let quantized =
        gptq::rtn(&w.values, w.rows, w.cols, &config.rounding()).with_context(|| format!("{name}: AWQ failed"))?;
    sink(AwqItem::Linear { name, rows: w.rows, cols: w.cols, scaled: &w.values, quantized: &quantized })
}

/// One group's input statistics.
struct GroupInput {
    /// Mean `|x|` per input channel.
    x_mean: Vec<f64>,
    /// `2/n XᵀX`, row-major f32.
    hessian: Vec<f32>,
}

impl GroupInput {
    /// The statistics of the inputs `x / s`, as the group sees them once `s` is folded in.
    fn divide_channels(&mut self, s: &[f32]) {
        let n = s.len();
        for (i, row) in self.hessian.chunks_exact_mut(n).enumerate() {
            row.iter_mut().zip(s).for_each(|(h, &sj)| *h /= s[i] * sj);
        }
        self.x_mean.iter_mut().zip(s).for_each(|(x, &s)| *x /= f64::from(s));
    }
}

/// Sums each group's input magnitudes and Hessian during a block's forward passes.
struct Capture {
    abs_sums: Vec<Vec<f64>>,
    hessians: Vec<HessianAccumulator>,
    seconds: f64,
}

impl Capture {
    fn new(layer: &crate::runtime::model::Layer) -> Self {
        let widths: Vec<usize> = GROUPS.iter().map(|g| g.observed().of(layer).cols()).collect();
        Self {
            abs_sums: widths.iter().map(|&w| vec![0.0; w]).collect(),
            hessians: widths.iter().map(|&w| HessianAccumulator::new(w)).collect(),
            seconds: 0.0,
        }
    }

    fn finish(self) -> Result<Vec<GroupInput>> {
        self.abs_sums
            .into_iter()
            .zip(self.hessians)
            .map(|(sums, acc)| {
                let rows = acc.rows();
                Ok(GroupInput {
                    x_mean: sums.iter().map(|s| s / rows as f64).collect(),
                    hessian: acc.finish()?.into_values(),
                })
            })
            .collect()
    }
}

impl LinearObserver for Capture {
    fn observe(&mut self, _: usize, linear: BlockLinear, x: &[f32]) {
        let Some(g) = GROUPS.iter().position(|g| g.observed() == linear) else { return };
        let start = Instant::now();
        for row in x.chunks_exact(self.abs_sums[g].len()) {
            self.abs_sums[g].iter_mut().zip(row).for_each(|(s, &v)| *s += f64::from(v.abs()));
        }
        self.hessians[g].add(x);
        self.seconds += start.elapsed().as_secs_f64();
    }
}

#[cfg(test)]
mod tests;
