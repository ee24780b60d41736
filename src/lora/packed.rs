//! Merging into a GPTQ/AWQ base, written as a directory of the same format through [`PackedExport`].
//!
//! A linear the adapters change is dequantized and merged in f64 as any other ([`super::merge`]), then
//! put back on the base's grid (same bits, group size and symmetry) in one of two ways ([`Requantize`]):
//!
//! - `gptq` (the default for GPTQ bases): GPTQ itself, with the checkpoint's own config (bits, group
//!   size, `sym`, `desc_act`, `static_groups`, `damp_percent`; AutoGPTQ's defaults where absent) and
//!   Hessians from calibration activations. The packed base runs through GPTQ's sequential pipeline
//!   ([`pipeline::run`]), one block at a time in true-sequential order, so each merged linear is fitted
//!   on what the merged and re-quantized model before it produces. Untouched linears are still run
//!   (their outputs feed the later blocks) but keep their dequantized weights.
//! - `rtn`: round to nearest with fresh group parameters ([`gptq::rtn`]); act-order bases get
//!   consecutive groups (a trivial `g_idx`) for those linears. No calibration, but the delta is
//!   partly rounded away where it is small against the grid's step.
//!
//! Both fit the merged linear's group parameters afresh, so its grid moves (scales by ~6% on the SmolLM2
//! fixture) and every weight is rounded again, not only the delta: GPTQ lands closer to the float merge
//! than rounding does, yet neither is as close as merging before quantizing. Every other linear keeps its
//! codes, zero points, scales and `g_idx`, written back byte for byte; the float tensors are written as
//! the export stores them (f16). Only packed linears can be merged into: whole-tensor replacements, LoRA
//! biases and adapted float tensors are refused.
//!
//! AWQ bases are rounded to nearest only. AWQ divides the inputs of each linear by per-channel scales
//! it folded into the preceding norm (or v_proj/up_proj rows) and multiplied into the linear's columns,
//! and a checkpoint does not record them: a delta trained on the unscaled model lands on scaled
//! columns (exact only for a base quantized without scale search), and GPTQ's Hessians would be of
//! the scaled inputs, with no way to undo the scaling. Merge into the float model, then quantize.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use formats::packed::awq::AwqQuantizeConfig;
use formats::packed::gptq::GptqQuantizeConfig;
use serde::Serialize;
use serde_json::Value;

use super::adapter::Adapter;
use super::base::{Base, BaseTensor};
use super::math::Norms;
use super::merge::{apply, apply_to, contributions, MergeOptions, MergedTensor, Work};
use crate::model::names;
use crate::model::packed::{PackMethod, PackedFormat as Packing};
use crate::model::source::Storage;
use crate::model::ModelSource;
use crate::quant::gptq::pipeline::{self, QuantizedLinear};
use crate::quant::gptq::{self, GptqConfig};
use crate::quant::method::calibration_set;
use crate::quant::packed_export::{PackedExport, PackedFormat};
use crate::runtime::Model;

/// How merged linears go back onto a GPTQ/AWQ base's grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Requantize {
    /// GPTQ with the base's own config, on calibration activations (GPTQ bases).
    Gptq,
    /// Round to nearest on the base's grid, no calibration.
    Rtn,
}

/// What [`merge`] did.
pub(super) struct PackedMerge {
    pub merged: Vec<MergedTensor>,
    pub copied: usize,
    pub bytes_written: u64,
    pub requantize: Requantize,
}

/// Merges `work` into the packed base `source` (seen as `tensors`), writing `output`.
pub(super) fn merge(
    base: &Base,
    source: &ModelSource,
    tensors: &[BaseTensor],
    work: &BTreeMap<usize, Work>,
    adapters: &[Adapter],
    output: &Path,
    opts: &MergeOptions,
) -> Result<PackedMerge> {
    let packing = check_targets(base, tensors, work, adapters)?;
    let format = export_format(&source.path, packing)?;
    let requantize = requantize_of(&source.path, &format, opts)?;
    warn_about_rounding(&format, packing, requantize, work.len());
    let linears = Linears { base, source, tensors, work, adapters };
    let (mut merged, report) = match requantize {
        Requantize::Rtn => {
            let mut export = PackedExport::create(source, output, format, false)?;
            let merged = linears.round_to_nearest(&rounding_grid(&format), &mut export, opts)?;
            (merged, export.finish()?)
        }
        Requantize::Gptq => {
            let PackedFormat::Gptq(c) = format else { unreachable!("GPTQ re-runs are for GPTQ bases") };
            let config = gptq_config(&c);
            let model = Model::load(source)?;
            pipeline::check_config(&model, &config).map_err(|e| anyhow!("{}: {e:#}", source.path.display()))?;
            let calib = calibration_set(source, &opts.calib)?;
            let mut export = PackedExport::create(source, output, format, false)?;
            let merged = linears.rerun_gptq(&model, &calib, &config, &mut export, opts)?;
            (merged, export.finish()?)
        }
    };
    merged.sort_by_key(|(i, _)| *i);
    Ok(PackedMerge {
        copied: tensors.len() - merged.len(),
        merged: merged.into_iter().map(|(_, m)| m).collect(),
        bytes_written: report.bytes_written,
        requantize,
    })
}

/// The packed base's tensors and what the adapters do to them.
struct Linears<'a> {
    base: &'a Base,
    source: &'a ModelSource,
    tensors: &'a [BaseTensor],
    work: &'a BTreeMap<usize, Work>,
    adapters: &'a [Adapter],
}

impl Linears<'_> {
    /// Every packed linear in block order: the merged ones rounded to nearest on `grid`, the others
    /// copied. Returns the merged tensors with their indices.
    fn round_to_nearest(
        &self,
        grid: &GptqConfig,
        export: &mut PackedExport,
        opts: &MergeOptions,
    ) -> Result<Vec<(usize, MergedTensor)>> {
        let (base, source, tensors) = (self.base, self.source, self.tensors);
        let mut linears: Vec<usize> =
            (0..tensors.len()).filter(|&i| matches!(tensors[i].storage, Storage::Packed(_))).collect();
        // The export writes blocks in layer order; handing linears over in that order keeps one block pending.
        linears.sort_by_key(|&i| names::gguf_layer(&base.source_tensor(&tensors[i]).gguf_name));
        let total: u64 = linears.iter().map(|&i| source.stored_bytes(base.source_tensor(&tensors[i]))).sum();
        let bar = opts.progress.bytes_bar("merge", total);
        let mut merged = Vec::new();
        for i in linears {
            let (t, st) = (&tensors[i], base.source_tensor(&tensors[i]));
            match self.work.get(&i) {
                None => export.packed_linear(&st.gguf_name, &source.packed(st)?)?,
                Some(w) => {
                    let (values, norms) = apply(base, t, w, self.adapters)?;
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let q = gptq::rtn(&values, rows, cols, grid)
                        .with_context(|| format!("{}: rounding the merged {} again", source.path.display(), t.name))?;
                    export.linear(&st.gguf_name, &q)?;
                    merged.push((i, self.summary(t, w, &norms)));
                }
            }
            source.release(st);
            bar.inc(source.stored_bytes(st));
        }
        bar.finish_and_clear();
        Ok(merged)
    }

    /// GPTQ's sequential pipeline over `model` (the packed base): each merged linear gets its delta added
    /// to the weights the pipeline holds and is quantized by GPTQ on its Hessian; the others are copied
    /// and hand their dequantized weights back unchanged. Returns the merged tensors with their indices.
    fn rerun_gptq(
        &self,
        model: &Model,
        calib: &calibration::CalibrationSet,
        config: &GptqConfig,
        export: &mut PackedExport,
        opts: &MergeOptions,
    ) -> Result<Vec<(usize, MergedTensor)>> {
        let (base, source, tensors) = (self.base, self.source, self.tensors);
        let by_gguf_name: HashMap<&str, usize> = (0..tensors.len())
            .filter(|&i| matches!(tensors[i].storage, Storage::Packed(_)))
            .map(|i| (base.source_tensor(&tensors[i]).gguf_name.as_str(), i))
            .collect();
        let mut merged = Vec::new();
        let mut handed_over = 0;
        pipeline::run(model, calib, opts.progress, |job| {
            let i = *by_gguf_name
                .get(job.name)
                .with_context(|| format!("{}: block linear {} is not GPTQ-packed", source.path.display(), job.name))?;
            let (t, st) = (&tensors[i], base.source_tensor(&tensors[i]));
            handed_over += 1;
            let Some(w) = self.work.get(&i) else {
                export.packed_linear(&st.gguf_name, &source.packed(st)?)?;
                return Ok(QuantizedLinear::Source);
            };
            let (values, norms) = apply_to(job.weights.to_vec(), t, w, self.adapters)?;
            let q = gptq::gptq(&values, job.rows, job.cols, job.hessian, config)
                .with_context(|| format!("{}: GPTQ on the merged {}", source.path.display(), t.name))?;
            export.linear(&st.gguf_name, &q.weight)?;
            merged.push((i, self.summary(t, w, &norms)));
            QuantizedLinear::grouped(q.weight)
        })?;
        if handed_over != by_gguf_name.len() {
            bail!(
                "{}: {} packed linears are outside the decoder blocks GPTQ runs through; use --requantize rtn",
                source.path.display(),
                by_gguf_name.len() - handed_over
            );
        }
        Ok(merged)
    }

    fn summary(&self, t: &BaseTensor, w: &Work, norms: &Norms) -> MergedTensor {
        let (scales, rank) = contributions(w, self.adapters);
        MergedTensor {
            name: t.name.clone(),
            change: w.change(self.adapters),
            scales,
            rank,
            from: t.storage.name().to_string(),
            to: t.storage.name().to_string(),
            relative_delta: norms.relative_delta(),
        }
    }
}

/// `--requantize` and the calibration flags checked against the base's format.
fn requantize_of(path: &Path, format: &PackedFormat, opts: &MergeOptions) -> Result<Requantize> {
    let chosen = match (format, opts.requantize) {
        (PackedFormat::Awq(_), Some(Requantize::Gptq)) => bail!(
            "{}: --requantize gptq: an AWQ base can only be rounded to nearest again (--requantize rtn): the \
             AWQ scales folded into its weights are not recorded, so GPTQ cannot be re-run on them; merge \
             into the float model, then quantize with --method awq",
            path.display()
        ),
        (PackedFormat::Awq(_), _) => Requantize::Rtn,
        (PackedFormat::Gptq(_), chosen) => chosen.unwrap_or(Requantize::Gptq),
    };
    if let (Requantize::Rtn, Some(flag)) = (chosen, opts.calib.first_set()) {
        bail!(
            "{}: {flag} sets the calibration sample of --requantize gptq; rounding to nearest uses none",
            path.display()
        );
    }
    Ok(chosen)
}

/// Refuses every change but LoRA deltas on packed linears; returns the base's packing.
fn check_targets(
    base: &Base,
    tensors: &[BaseTensor],
    work: &BTreeMap<usize, Work>,
    adapters: &[Adapter],
) -> Result<Packing> {
    for (&i, w) in work {
        let t = &tensors[i];
        let first = w.replacement.iter().chain(&w.lora).chain(&w.bias).next().expect("planned work changes something");
        let adapter = adapters[first.0].path.display();
        let Storage::Packed(packing) = t.storage else {
            bail!(
                "{adapter}: changes {}, a float tensor of the packed base {}; only its GPTQ/AWQ linears can be \
                 merged into (merge into the float model, then quantize)",
                t.name,
                base.path().display()
            );
        };
        if let Some((a, r)) = w.replacement {
            bail!(
                "{}: saved tensor '{}' (modules_to_save) would replace {}, a packed {} linear of {}; whole \
                 tensors cannot replace packed linears (merge into the float model, then quantize)",
                adapters[a].path.display(),
                adapters[a].replacements[r].tensor,
                t.name,
                packing.name(),
                base.path().display()
            );
        }
        if !w.bias.is_empty() {
            bail!(
                "{adapter}: a lora_B bias adds to {}, which a packed {} base stores as float; merge into the \
                 float model, then quantize",
                t.name,
                packing.name()
            );
        }
    }
    tensors
        .iter()
        .find_map(|t| match t.storage {
            Storage::Packed(p) => Some(p),
            _ => None,
        })
        .with_context(|| format!("{}: has no packed linears", base.path().display()))
}

/// The base's own quantization config, as the export writes it again.
fn export_format(dir: &Path, packing: Packing) -> Result<PackedFormat> {
    let q = quantization_config(dir)?;
    let flag = |key: &str, default: bool| q[key].as_bool().unwrap_or(default);
    Ok(match packing.method {
        PackMethod::Gptq => PackedFormat::Gptq(GptqQuantizeConfig {
            bits: packing.bits,
            group_size: packing.group_size,
            desc_act: flag("desc_act", false),
            sym: flag("sym", true),
            static_groups: flag("static_groups", false),
            true_sequential: flag("true_sequential", true),
            damp_percent: q["damp_percent"].as_f64().unwrap_or(0.01),
        }),
        PackMethod::Awq => PackedFormat::Awq(AwqQuantizeConfig {
            group_size: packing.group_size.context("AWQ checkpoints have groups")?,
            zero_point: flag("zero_point", true),
        }),
    })
}

/// `config.json`'s `quantization_config`, or AutoGPTQ's older `quantize_config.json`.
fn quantization_config(dir: &Path) -> Result<Value> {
    let read = |path: &Path| -> Result<Value> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
    };
    match read(&dir.join("config.json"))?.get("quantization_config") {
        Some(q) if !q.is_null() => Ok(q.clone()),
        _ => read(&dir.join("quantize_config.json")),
    }
}

/// GPTQ as the base's config describes it.
fn gptq_config(c: &GptqQuantizeConfig) -> GptqConfig {
    GptqConfig {
        bits: c.bits,
        group_size: c.group_size,
        sym: c.sym,
        act_order: c.desc_act,
        static_groups: c.static_groups,
        damp: c.damp_percent,
        shrink: gptq::SHRINK,
    }
}

/// The round-to-nearest grid that matches the format's: bits, groups and symmetry.
fn rounding_grid(format: &PackedFormat) -> GptqConfig {
    let (bits, group_size, sym) = match format {
        PackedFormat::Gptq(c) => (c.bits, c.group_size, c.sym),
        PackedFormat::Awq(c) => (4, Some(c.group_size), !c.zero_point),
    };
    GptqConfig { bits, group_size, sym, act_order: false, static_groups: false, ..GptqConfig::default() }
}

fn warn_about_rounding(format: &PackedFormat, packing: Packing, requantize: Requantize, merged: usize) {
    if requantize == Requantize::Gptq {
        eprintln!(
            "note: {merged} merged {} linears are quantized again by GPTQ on calibration activations; merging \
             into the float model before quantizing still keeps more quality",
            packing.name()
        );
        return;
    }
    eprintln!(
        "warning: {merged} merged {} linears are dequantized, merged and rounded to nearest again on the base's \
         grid, which loses more quality than GPTQ (--requantize gptq, GPTQ bases) or merging into the float \
         model before quantizing",
        packing.name()
    );
    match format {
        PackedFormat::Gptq(c) if c.desc_act => eprintln!(
            "warning: act-order base: the merged linears get consecutive groups (g_idx = column / group size); \
             the others keep their g_idx"
        ),
        PackedFormat::Awq(_) => eprintln!(
            "warning: AWQ folds per-channel scales into the norms and v_proj/up_proj rows and does not record \
             them; the adapter is merged as if the base were unscaled, which is exact only for an AWQ base \
             quantized without scale search (otherwise merge into the float model, then quantize)"
        ),
        _ => {}
    }
}
