//! Merging into a GPTQ/AWQ base, written as a directory of the same format through [`PackedExport`].
//!
//! A linear the adapters change is dequantized, merged in f64 as any other ([`super::merge`]) and
//! rounded to nearest again on the base's grid: same bits, group size and symmetry, fresh group
//! parameters ([`gptq::rtn`]), so act-order bases get consecutive groups (a trivial `g_idx`) for those
//! linears. Every other linear keeps its codes, zero points, scales and `g_idx`, written back byte for
//! byte; the float tensors are written as the export stores them (f16). Only packed linears can be
//! merged into: whole-tensor replacements, LoRA biases and adapted float tensors are refused.
//!
//! AWQ folds per-channel scales into the norms and the v_proj/up_proj rows, and a checkpoint does not
//! record them, so a delta trained on the unscaled model lands on scaled columns; this is exact only
//! for a base quantized without scale search.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use formats::packed::awq::AwqQuantizeConfig;
use formats::packed::gptq::GptqQuantizeConfig;
use serde_json::Value;

use super::adapter::Adapter;
use super::base::{Base, BaseTensor};
use super::merge::{apply, contributions, MergeOptions, MergedTensor, Work};
use crate::model::names;
use crate::model::packed::{PackMethod, PackedFormat as Packing};
use crate::model::source::Storage;
use crate::model::ModelSource;
use crate::quant::gptq::{self, GptqConfig};
use crate::quant::packed_export::{PackedExport, PackedFormat};

/// Merges `work` into the packed base `source` (seen as `tensors`), writing `output`. Returns the merged
/// tensors, how many were copied, and the bytes written.
pub(super) fn merge(
    base: &Base,
    source: &ModelSource,
    tensors: &[BaseTensor],
    work: &BTreeMap<usize, Work>,
    adapters: &[Adapter],
    output: &Path,
    opts: &MergeOptions,
) -> Result<(Vec<MergedTensor>, usize, u64)> {
    let packing = check_targets(base, tensors, work, adapters)?;
    let format = export_format(&source.path, packing)?;
    let grid = rounding_grid(&format);
    warn_about_rounding(&format, packing, work.len());

    let mut linears: Vec<usize> =
        (0..tensors.len()).filter(|&i| matches!(tensors[i].storage, Storage::Packed(_))).collect();
    // The export writes blocks in layer order; handing linears over in that order keeps one block pending.
    linears.sort_by_key(|&i| names::gguf_layer(&base.source_tensor(&tensors[i]).gguf_name));
    let total: u64 = linears.iter().map(|&i| source.stored_bytes(base.source_tensor(&tensors[i]))).sum();
    let bar = opts.progress.bytes_bar("merge", total);
    let mut export = PackedExport::create(source, output, format, false)?;
    let mut merged = Vec::new();
    for i in linears {
        let (t, st) = (&tensors[i], base.source_tensor(&tensors[i]));
        match work.get(&i) {
            None => export.packed_linear(&st.gguf_name, &source.packed(st)?)?,
            Some(w) => {
                let (values, norms) = apply(base, t, w, adapters)?;
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let q = gptq::rtn(&values, rows, cols, &grid)
                    .with_context(|| format!("{}: rounding the merged {} again", source.path.display(), t.name))?;
                export.linear(&st.gguf_name, &q)?;
                let (scales, rank) = contributions(w, adapters);
                merged.push(MergedTensor {
                    name: t.name.clone(),
                    change: w.change(adapters),
                    scales,
                    rank,
                    from: t.storage.name().to_string(),
                    to: t.storage.name().to_string(),
                    relative_delta: norms.relative_delta(),
                });
            }
        }
        source.release(st);
        bar.inc(source.stored_bytes(st));
    }
    let report = export.finish()?;
    bar.finish_and_clear();
    let copied = tensors.len() - merged.len();
    Ok((merged, copied, report.bytes_written))
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

/// The round-to-nearest grid that matches the format's: bits, groups and symmetry.
fn rounding_grid(format: &PackedFormat) -> GptqConfig {
    let (bits, group_size, sym) = match format {
        PackedFormat::Gptq(c) => (c.bits, c.group_size, c.sym),
        PackedFormat::Awq(c) => (4, Some(c.group_size), !c.zero_point),
    };
    GptqConfig { bits, group_size, sym, act_order: false, static_groups: false, ..GptqConfig::default() }
}

fn warn_about_rounding(format: &PackedFormat, packing: Packing, merged: usize) {
    eprintln!(
        "warning: {merged} merged {} linears are dequantized, merged and rounded to nearest again on the base's \
         grid, which loses more quality than merging into the float model before quantizing",
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
             quantized without scale search"
        ),
        _ => {}
    }
}
