//! `qforge merge-lora`: adapters folded into a base model, streamed tensor by tensor.
//!
//! The whole plan (the base tensor each module, `lora_B` bias and saved whole tensor lands on, every
//! shape and output type checked) is made before any output exists. Tensors then stream from the
//! mapped base: untouched ones are copied byte for byte; merged ones are decoded to f32, merged in f64
//! ([`super::math`]), encoded to their output type and released, so memory stays bounded by a tensor.
//!
//! A GPTQ/AWQ base is merged by [`super::packed`] into a directory of its own format.
//!
//! Factors named in HF row order are permuted to llama.cpp's q/k row order when the base is a GGUF
//! that stores those rows permuted; only the output side (B's rows, DoRA magnitudes, biases) moves.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use formats::gguf::{GgufWriter, TensorPlan as GgufPlan};
use formats::output::{ensure_distinct, AtomicFile};
use formats::safetensors::{self, Dtype};
use formats::GgmlType;
use serde::Serialize;

use super::adapter::{Adapter, AdapterSpec, LoraModule, TargetName};
use super::base::{Base, BaseTensor};
use super::math::{self, LowRank, Norms, Orientation};
use super::packed::Requantize;
use crate::convert::FloatType;
use crate::model::names;
use crate::model::source::Storage;
use crate::progress::Progress;
use crate::quant::method::CalibArgs;
use crate::quant::quantize_tensor;

pub struct MergeOptions {
    pub adapters: Vec<AdapterSpec>,
    /// Float type of the merged tensors (of every float tensor, for an HF base).
    pub dtype: Option<FloatType>,
    /// GGUF type of the merged matrices (GGUF bases).
    pub ggml_type: Option<GgmlType>,
    /// Unknown adapter tensors are errors rather than warnings.
    pub strict: bool,
    /// Shard size of HF output.
    pub max_shard_size: Option<u64>,
    /// GPTQ/AWQ bases: how merged linears go back onto the grid (default: GPTQ for GPTQ bases, RTN for AWQ).
    pub requantize: Option<Requantize>,
    /// The calibration sample of `Requantize::Gptq`.
    pub calib: CalibArgs,
    pub progress: Progress,
}

#[derive(Debug, Serialize)]
pub struct MergeReport {
    pub output: PathBuf,
    pub adapters: Vec<AdapterSummary>,
    /// Every base tensor the merge changed, in file order.
    pub merged: Vec<MergedTensor>,
    /// Base tensors written unchanged.
    pub copied: usize,
    pub bytes_written: u64,
    pub seconds: f64,
    /// How the merged linears of a GPTQ/AWQ base went back onto its grid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requantize: Option<Requantize>,
}

#[derive(Debug, Serialize)]
pub struct AdapterSummary {
    pub path: PathBuf,
    pub weight: f64,
    pub modules: usize,
    pub replaced_tensors: usize,
}

#[derive(Debug, Serialize)]
pub struct MergedTensor {
    pub name: String,
    /// What changed it: `lora`, `dora`, `lora_bias`, `replaced`, joined with `+`.
    pub change: String,
    /// `weight · scale` of each LoRA module merged into it, in adapter order.
    pub scales: Vec<f64>,
    /// Summed rank of those modules.
    pub rank: usize,
    pub from: String,
    pub to: String,
    /// `‖W' − W‖ / ‖W‖`.
    pub relative_delta: f64,
}

impl MergeReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, a) in self.adapters.iter().enumerate() {
            let _ = writeln!(
                out,
                "adapter {}: {} (weight {}, {} modules, {} whole tensors)",
                i + 1,
                a.path.display(),
                a.weight,
                a.modules,
                a.replaced_tensors
            );
        }
        let _ = writeln!(
            out,
            "{:<40} {:<16} {:>5} {:>18} {:>12} {:>14}",
            "tensor", "change", "rank", "scale", "type", "|dW|/|W|"
        );
        for t in &self.merged {
            let scales = t.scales.iter().map(|s| format!("{s:.6}")).collect::<Vec<_>>().join("+");
            let types = if t.from == t.to { t.to.clone() } else { format!("{}->{}", t.from, t.to) };
            let _ = writeln!(
                out,
                "{:<40} {:<16} {:>5} {:>18} {:>12} {:>14.6e}",
                t.name, t.change, t.rank, scales, types, t.relative_delta
            );
        }
        if let Some(r) = self.requantize {
            let how = match r {
                Requantize::Gptq => "GPTQ on calibration activations",
                Requantize::Rtn => "rounding to nearest",
            };
            let _ = writeln!(out, "merged linears quantized again by {how}, on the base's grid");
        }
        let _ = writeln!(
            out,
            "merged {} tensors, copied {} unchanged; wrote {} ({:.1} MB) in {:.2} s",
            self.merged.len(),
            self.copied,
            self.output.display(),
            self.bytes_written as f64 / 1e6,
            self.seconds
        );
        out
    }
}

/// What happens to one base tensor.
#[derive(Default)]
pub(super) struct Work {
    /// (adapter, replacement)
    pub replacement: Option<(usize, usize)>,
    /// (adapter, module)
    pub lora: Vec<(usize, usize)>,
    /// (adapter, module) whose `lora_B.bias` adds to this tensor.
    pub bias: Vec<(usize, usize)>,
}

impl Work {
    pub(super) fn change(&self, adapters: &[Adapter]) -> String {
        let mut parts = Vec::new();
        if self.replacement.is_some() {
            parts.push("replaced");
        }
        if self.lora.iter().any(|&(a, m)| adapters[a].modules[m].is_dora()) {
            parts.push("dora");
        } else if !self.lora.is_empty() {
            parts.push("lora");
        }
        if !self.bias.is_empty() {
            parts.push("lora_bias");
        }
        parts.join("+")
    }

    /// Steps that each rewrite the tensor; with more than one the delta is measured against a copy.
    fn steps(&self) -> usize {
        self.replacement.is_some() as usize + !self.lora.is_empty() as usize + !self.bias.is_empty() as usize
    }
}

pub fn merge(base_path: &Path, output: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let started = Instant::now();
    ensure_distinct(base_path, output)?;
    if opts.adapters.is_empty() {
        bail!("no adapter given (--adapter PATH[:WEIGHT])");
    }
    let adapters = opts.adapters.iter().map(Adapter::open).collect::<Result<Vec<_>>>()?;
    report_unknown_keys(&adapters, opts.strict)?;
    warn_about_adapters(&adapters);

    let base = Base::open(base_path)?;
    check_compatible(&base, &adapters, output, opts)?;
    let tensors = base.tensors();
    let work = plan(&base, &tensors, &adapters)?;
    if let Base::Packed(source) = &base {
        let packed = super::packed::merge(&base, source, &tensors, &work, &adapters, output, opts)?;
        return Ok(MergeReport {
            output: output.to_path_buf(),
            adapters: adapter_summaries(&adapters),
            merged: packed.merged,
            copied: packed.copied,
            bytes_written: packed.bytes_written,
            seconds: started.elapsed().as_secs_f64(),
            requantize: Some(packed.requantize),
        });
    }
    let out_types = output_types(&base, &tensors, &work, opts)?;
    warn_about_requantization(&tensors, &work, &out_types);

    let mut writer = OutputWriter::create(&base, &tensors, &out_types, output, opts)?;
    let bar = opts.progress.bytes_bar("merge", base.data_bytes());
    let mut merged = Vec::new();
    let mut bytes_written = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let raw_len = base.raw(t).len() as u64;
        let to = out_types[i];
        let bytes: Cow<[u8]> = match work.get(&i) {
            None if to == t.storage => Cow::Borrowed(base.raw(t)),
            None => Cow::Owned(encode(&base.decode(t)?, t, to)?),
            Some(w) => {
                let (values, norms) = apply(&base, t, w, &adapters)?;
                let (scales, rank) = contributions(w, &adapters);
                merged.push(MergedTensor {
                    name: t.name.clone(),
                    change: w.change(&adapters),
                    scales,
                    rank,
                    from: t.storage.name().to_string(),
                    to: to.name().to_string(),
                    relative_delta: norms.relative_delta(),
                });
                Cow::Owned(encode(&values, t, to)?)
            }
        };
        writer.write(&t.name, &bytes)?;
        bytes_written += bytes.len() as u64;
        base.release(t);
        bar.inc(raw_len);
    }
    writer.finish(&base, opts.dtype)?;
    bar.finish_and_clear();
    Ok(MergeReport {
        output: output.to_path_buf(),
        adapters: adapter_summaries(&adapters),
        copied: tensors.len() - merged.len(),
        merged,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        requantize: None,
    })
}

fn adapter_summaries(adapters: &[Adapter]) -> Vec<AdapterSummary> {
    adapters
        .iter()
        .map(|a| AdapterSummary {
            path: a.path.clone(),
            weight: a.weight,
            modules: a.modules.len(),
            replaced_tensors: a.replacements.len(),
        })
        .collect()
}

fn report_unknown_keys(adapters: &[Adapter], strict: bool) -> Result<()> {
    for a in adapters.iter().filter(|a| !a.unknown.is_empty()) {
        let path = a.weights_path();
        if strict {
            bail!("{}: {} unknown tensors (--strict): {}", path.display(), a.unknown.len(), a.unknown.join("; "));
        }
        let list: String = a.unknown.iter().map(|u| format!("\n  {u}")).collect();
        eprintln!("warning: {}: {} tensors ignored:{list}", path.display(), a.unknown.len());
    }
    Ok(())
}

fn warn_about_adapters(adapters: &[Adapter]) {
    let bases: BTreeSet<&str> = adapters.iter().filter_map(|a| a.base_model.as_deref()).collect();
    if bases.len() > 1 {
        eprintln!(
            "warning: the adapters were trained on different base models ({}); their sum may not mean much",
            bases.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    for a in adapters.iter().filter(|a| a.weight != 1.0 && !a.replacements.is_empty()) {
        eprintln!(
            "warning: {}: weight {} scales its LoRA deltas, not its {} whole tensors, which replace the base's",
            a.path.display(),
            a.weight,
            a.replacements.len()
        );
    }
}

fn check_compatible(base: &Base, adapters: &[Adapter], output: &Path, opts: &MergeOptions) -> Result<()> {
    if let Base::Packed(source) = base {
        let format = source.tensors().iter().find_map(|t| match t.storage {
            Storage::Packed(f) => Some(f.name()),
            _ => None,
        });
        let format = format.unwrap_or("GPTQ/AWQ");
        if opts.ggml_type.is_some() || opts.dtype.is_some() {
            bail!(
                "{}: a {format} base merges into a {format} directory; --type and --dtype do not apply",
                base.path().display()
            );
        }
        if opts.max_shard_size.is_some() {
            bail!(
                "{}: a {format} base merges into one safetensors file; --max-shard-size does not apply",
                base.path().display()
            );
        }
        if output.exists() && !output.is_dir() {
            bail!(
                "{}: exists and is not a directory; a {format} base merges into an HF model directory",
                output.display()
            );
        }
    } else if let Some(flag) = opts.requantize.map(|_| "--requantize").or(opts.calib.first_set()) {
        bail!("{}: {flag} applies to GPTQ/AWQ bases only", base.path().display());
    } else if base.is_gguf() {
        if output.is_dir() {
            bail!("{}: is a directory; a GGUF base merges into a GGUF file", output.display());
        }
    } else {
        if opts.ggml_type.is_some() {
            bail!("--type applies to GGUF bases; an HF base merges into float tensors (see --dtype)");
        }
        if output.exists() && !output.is_dir() {
            bail!("{}: exists and is not a directory; an HF base merges into an HF model directory", output.display());
        }
    }
    for a in adapters {
        match (&a.gguf_architecture, base.gguf_architecture()) {
            (Some(_), None) => bail!(
                "{}: a llama.cpp LoRA GGUF merges into GGUF bases; convert {} to GGUF first",
                a.path.display(),
                base.path().display()
            ),
            (Some(lora), Some(model)) if lora != model => bail!(
                "{}: adapter for architecture {lora:?}, but {} is {model:?}",
                a.path.display(),
                base.path().display()
            ),
            _ => {}
        }
    }
    Ok(())
}

fn plan(base: &Base, tensors: &[BaseTensor], adapters: &[Adapter]) -> Result<BTreeMap<usize, Work>> {
    let index = base.index();
    let find = |a: &Adapter, what: &str, target: &TargetName| -> Result<usize> {
        index.get(target).copied().ok_or_else(|| {
            let tied = matches!(target.as_str(), "lm_head.weight" | "output.weight");
            let hint = if tied { " (a base that ties lm_head to the embeddings has no separate lm_head)" } else { "" };
            anyhow!(
                "{}: {what} targets {target}, which {} does not have{hint}",
                a.path.display(),
                base.path().display()
            )
        })
    };
    let mut work: BTreeMap<usize, Work> = BTreeMap::new();
    for (ai, a) in adapters.iter().enumerate() {
        for (mi, m) in a.modules.iter().enumerate() {
            let i = find(a, &format!("module {}", m.name), &m.target)?;
            let t = &tensors[i];
            let stored = m.stored_shape();
            if t.shape != stored {
                bail!(
                    "{}: module {}: lora_B {:?} x lora_A {:?} gives a {:?} update, but base tensor {} is {:?}",
                    a.path.display(),
                    m.name,
                    m.b_shape,
                    m.a_shape,
                    stored,
                    t.name,
                    t.shape
                );
            }
            if needs_permutation(t, &m.target).is_some() && m.orientation == Orientation::OutputColumns {
                bail!(
                    "{}: module {}: a transposed update of a permuted q/k projection is not supported",
                    a.path.display(),
                    m.name
                );
            }
            work.entry(i).or_default().lora.push((ai, mi));
            if let Some((bias, len)) = &m.bias {
                let bi = find(a, &format!("the lora_B bias of module {}", m.name), bias)?;
                if tensors[bi].shape != [*len] {
                    bail!(
                        "{}: module {}: lora_B bias has {len} values, but base tensor {} is {:?}",
                        a.path.display(),
                        m.name,
                        tensors[bi].name,
                        tensors[bi].shape
                    );
                }
                work.entry(bi).or_default().bias.push((ai, mi));
            }
        }
        for (ri, r) in a.replacements.iter().enumerate() {
            let i = find(a, &format!("saved tensor '{}'", r.tensor), &r.target)?;
            if tensors[i].shape != r.shape {
                bail!(
                    "{}: saved tensor '{}' is {:?}, but base tensor {} is {:?}",
                    a.path.display(),
                    r.tensor,
                    r.shape,
                    tensors[i].name,
                    tensors[i].shape
                );
            }
            let w = work.entry(i).or_default();
            if let Some((other, _)) = w.replacement {
                bail!(
                    "{} and {} both replace base tensor {} with a saved copy",
                    adapters[other].path.display(),
                    a.path.display(),
                    tensors[i].name
                );
            }
            w.replacement = Some((ai, ri));
        }
    }
    for (i, w) in &work {
        let dora = w.lora.iter().filter(|&&(a, m)| adapters[a].modules[m].is_dora()).count();
        if dora > 0 && w.lora.len() > 1 {
            bail!(
                "{}: a DoRA module cannot be summed with other modules on the same tensor; merge it on its own",
                tensors[*i].name
            );
        }
    }
    Ok(work)
}

/// Heads to permute an HF-ordered factor over, when the base stores the tensor in GGUF q/k order.
fn needs_permutation(t: &BaseTensor, target: &TargetName) -> Option<usize> {
    match target {
        TargetName::Hf(_) => t.qk_heads,
        TargetName::Gguf(_) => None,
    }
}

fn output_types(
    base: &Base,
    tensors: &[BaseTensor],
    work: &BTreeMap<usize, Work>,
    opts: &MergeOptions,
) -> Result<Vec<Storage>> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let merged = work.contains_key(&i);
            match t.storage {
                Storage::Safetensors(own) => {
                    let float = matches!(own, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64);
                    let to = match opts.dtype {
                        Some(d) if float => d.safetensors(),
                        _ => own,
                    };
                    if merged && FloatType::of_storage(Storage::Safetensors(to)).is_none() {
                        bail!(
                            "{}: tensor {} is {}; merged tensors are written as f32, f16 or bf16 (use --dtype)",
                            base.path().display(),
                            t.name,
                            own.name()
                        );
                    }
                    Ok(Storage::Safetensors(to))
                }
                Storage::Packed(_) => unreachable!("LoRA bases list no packed GPTQ/AWQ tensors"),
                Storage::Ggml(own) if !merged => Ok(Storage::Ggml(own)),
                Storage::Ggml(own) => {
                    let to = if t.shape.len() < 2 {
                        own
                    } else {
                        opts.ggml_type.or(opts.dtype.map(FloatType::ggml)).unwrap_or(own)
                    };
                    if to.traits().quantize.is_none() {
                        bail!(
                            "{}: tensor {} is {to}, which qforge cannot encode yet; choose another with --type",
                            base.path().display(),
                            t.name
                        );
                    }
                    if to.row_bytes(t.row_len() as u64).is_none() {
                        bail!(
                            "{}: tensor {} has rows of {} values, not a whole number of {to} blocks ({} values)",
                            base.path().display(),
                            t.name,
                            t.row_len(),
                            to.block_size()
                        );
                    }
                    Ok(Storage::Ggml(to))
                }
            }
        })
        .collect()
}

fn warn_about_requantization(tensors: &[BaseTensor], work: &BTreeMap<usize, Work>, out_types: &[Storage]) {
    let requantized: BTreeSet<&str> = work
        .keys()
        .filter_map(|&i| match out_types[i] {
            Storage::Ggml(to) if to.is_quantized() && tensors[i].storage == Storage::Ggml(to) => Some(to.name()),
            _ => None,
        })
        .collect();
    if !requantized.is_empty() {
        let n = work.keys().filter(|&&i| matches!(out_types[i], Storage::Ggml(t) if t.is_quantized())).count();
        eprintln!(
            "warning: {n} merged tensors are quantized ({}): they are dequantized, merged and quantized again, \
             which loses slightly more quality than merging before quantizing",
            requantized.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
}

/// The merged values of one base tensor (file row order) and how far they moved.
pub(super) fn apply(base: &Base, t: &BaseTensor, w: &Work, adapters: &[Adapter]) -> Result<(Vec<f32>, Norms)> {
    apply_to(base.decode(t)?, t, w, adapters)
}

/// [`apply`] onto `values`, the tensor's weights as the caller holds them (file row order).
pub(super) fn apply_to(
    mut values: Vec<f32>,
    t: &BaseTensor,
    w: &Work,
    adapters: &[Adapter],
) -> Result<(Vec<f32>, Norms)> {
    let original = (w.steps() > 1).then(|| values.clone());
    let mut norms = Norms::default();
    if let Some((ai, ri)) = w.replacement {
        let r = &adapters[ai].replacements[ri];
        let saved = adapters[ai].replacement(r)?;
        let saved = match needs_permutation(t, &r.target) {
            Some(heads) => names::permute_rows_hf_to_gguf(&saved, heads, t.row_len()),
            None => saved,
        };
        norms = Norms::between(&values, &saved);
        values = saved;
    }
    if !w.lora.is_empty() {
        let mut parts = Vec::with_capacity(w.lora.len());
        let mut dora = None;
        for &(ai, mi) in &w.lora {
            let (a, m) = (&adapters[ai], &adapters[ai].modules[mi]);
            let (fa, fb) = a.factors(m)?;
            let part = LowRank::from_lora(&fa, &fb, m.rank, m.orientation, a.weight * m.scale);
            let heads = needs_permutation(t, &m.target);
            parts.push(match heads {
                Some(h) => part.permute_rows_hf_to_gguf(h),
                None => part,
            });
            if let Some(magnitude) = a.magnitude(m)? {
                let magnitude: Vec<f64> = magnitude.iter().map(|&x| x as f64).collect();
                let magnitude = match heads {
                    Some(h) => names::permute_rows_hf_to_gguf(&magnitude, h, 1),
                    None => magnitude,
                };
                dora = Some((magnitude, m.orientation));
            }
        }
        let delta = LowRank::concat(&parts);
        norms = match dora {
            Some((magnitude, orientation)) => math::dora(&mut values, &delta, &magnitude, orientation),
            None => math::add_low_rank(&mut values, &delta),
        };
    }
    if !w.bias.is_empty() {
        let mut sum = vec![0f64; values.len()];
        for &(ai, mi) in &w.bias {
            let (a, m) = (&adapters[ai], &adapters[ai].modules[mi]);
            let bias = a.lora_bias(m)?.expect("planned biases exist");
            let coef = a.weight * m.scale;
            let scaled: Vec<f64> = bias.iter().map(|&x| coef * x as f64).collect();
            let scaled = match needs_permutation(t, &m.bias.as_ref().expect("planned").0) {
                Some(h) => names::permute_rows_hf_to_gguf(&scaled, h, 1),
                None => scaled,
            };
            sum.iter_mut().zip(scaled).for_each(|(s, x)| *s += x);
        }
        norms = math::add_vector(&mut values, &sum);
    }
    if let Some(original) = original {
        norms = Norms::between(&original, &values);
    }
    if !norms.delta.is_finite() || values.iter().any(|v| !v.is_finite()) {
        bail!("merging into {} gives values that are not finite", t.name);
    }
    Ok((values, norms))
}

pub(super) fn contributions(w: &Work, adapters: &[Adapter]) -> (Vec<f64>, usize) {
    let modules = || w.lora.iter().map(|&(a, m)| (&adapters[a], &adapters[a].modules[m]));
    (modules().map(|(a, m)| a.weight * m.scale).collect(), modules().map(|(_, m): (_, &LoraModule)| m.rank).sum())
}

fn encode(values: &[f32], t: &BaseTensor, to: Storage) -> Result<Vec<u8>> {
    match to {
        Storage::Safetensors(_) => {
            Ok(FloatType::of_storage(to).expect("output types are float where values are encoded").encode(values))
        }
        Storage::Ggml(ty) => {
            quantize_tensor(values, t.row_len(), ty, None).with_context(|| format!("tensor {}", t.name))
        }
        Storage::Packed(_) => unreachable!("output types are never packed"),
    }
}

/// The output file (GGUF base) or directory (HF base), planned in full up front.
enum OutputWriter {
    Gguf(GgufWriter),
    Hf { writer: safetensors::Writer, dir: PathBuf },
}

impl OutputWriter {
    fn create(
        base: &Base,
        tensors: &[BaseTensor],
        out_types: &[Storage],
        output: &Path,
        opts: &MergeOptions,
    ) -> Result<Self> {
        match base {
            Base::Gguf(source) => {
                let plan = tensors
                    .iter()
                    .zip(out_types)
                    .map(|(t, to)| GgufPlan {
                        name: t.name.clone(),
                        dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
                        ggml_type: match to {
                            Storage::Ggml(ty) => *ty,
                            Storage::Safetensors(_) | Storage::Packed(_) => {
                                unreachable!("GGUF tensors stay GGML types")
                            }
                        },
                    })
                    .collect();
                let metadata = source.gguf().expect("a GGUF base").metadata();
                Ok(OutputWriter::Gguf(GgufWriter::create(output, metadata, plan)?))
            }
            Base::Packed(_) => unreachable!("packed bases are merged by super::packed"),
            Base::Hf { checkpoint, .. } => {
                let plan = tensors
                    .iter()
                    .zip(out_types)
                    .map(|(t, to)| safetensors::TensorPlan {
                        name: t.name.clone(),
                        dtype: match to {
                            Storage::Safetensors(d) => *d,
                            Storage::Ggml(_) | Storage::Packed(_) => unreachable!("HF tensors stay safetensors types"),
                        },
                        shape: t.shape.clone(),
                    })
                    .collect();
                let metadata = checkpoint.metadata().cloned().unwrap_or_default();
                let writer = safetensors::Writer::create(output, plan, metadata, opts.max_shard_size)?;
                Ok(OutputWriter::Hf { writer, dir: output.to_path_buf() })
            }
        }
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        match self {
            OutputWriter::Gguf(w) => w.write_tensor(name, bytes)?,
            OutputWriter::Hf { writer, .. } => writer.write_tensor(name, bytes)?,
        }
        Ok(())
    }

    /// Commits the output and, for an HF directory, copies the base's other files.
    fn finish(self, base: &Base, dtype: Option<FloatType>) -> Result<()> {
        match self {
            OutputWriter::Gguf(w) => w.finish()?,
            OutputWriter::Hf { writer, dir } => {
                writer.finish()?;
                copy_side_files(base.path(), &dir, dtype)?;
            }
        }
        Ok(())
    }
}

/// Copies the base directory's non-weight files (config, tokenizer, ...); `config.json` gets the new
/// `torch_dtype` when the float type changed.
fn copy_side_files(from: &Path, to: &Path, dtype: Option<FloatType>) -> Result<()> {
    let entries = std::fs::read_dir(from).with_context(|| format!("{}: cannot list", from.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", from.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors") || name == safetensors::INDEX_FILE_NAME;
        if is_weights || name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let src = entry.path();
        let mut bytes = std::fs::read(&src).with_context(|| format!("{}: cannot read", src.display()))?;
        if let (Some(d), "config.json") = (dtype, name.as_str()) {
            let mut config: serde_json::Value =
                serde_json::from_slice(&bytes).with_context(|| format!("{}: not valid JSON", src.display()))?;
            if let Some(obj) = config.as_object_mut() {
                obj.insert("torch_dtype".into(), d.torch_name().into());
            }
            bytes = serde_json::to_vec_pretty(&config)?;
            bytes.push(b'\n');
        }
        let dest = to.join(&name);
        let mut f = AtomicFile::create(&dest)?;
        f.write_all(&bytes).with_context(|| format!("{}: cannot write", dest.display()))?;
        f.commit()?;
    }
    Ok(())
}
