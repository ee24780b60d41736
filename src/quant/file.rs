//! `qforge quantize`: a model (HF directory or GGUF file) to a GGUF file quantized with a preset.
//!
//! The whole plan (every tensor's output type) is fixed first, so the GGUF header is written up front
//! and problems (requantizing without consent, a type qforge cannot encode, a bad imatrix) stop the run
//! before any output exists. Tensors then stream one at a time from the mapped input: encoded with
//! [`quantize_rows`] (threads decode the stored rows as they encode them), released, and handed to a
//! writer thread that writes one tensor while the next is encoded, so memory stays bounded by two
//! tensors' output.
//! Tensors are written in llama-quantize's order, so files from the same input line up byte for byte.
//! [`quantize_gptq`] and [`quantize_awq`] keep the plan but take the block tensors from a calibrated
//! method run layer by layer, writing each layer as it is done ([`LayerWriter`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use calibration::CalibrationSet;
use formats::gguf::{GgufWriter, MetadataValue, TensorPlan};
use formats::output::ensure_distinct;
use formats::GgmlType;
use indicatif::ProgressBar;

use super::awq::{self, AwqConfig, AwqItem, AwqReport};
use super::gptq;
use super::gptq::blocks::{gptq_blocks, BlockGptqConfig};
use super::gptq::pipeline::QuantizedLinear;
use super::imatrix::Imatrix;
use super::presets::{plan, ModelShape, PlanOptions, Preset, TensorDesc, TensorTypeRule};
use super::tensor::{quantize_rows, Rows};
use crate::convert::FloatType;
use crate::model::source::{SourceTensor, Storage};
use crate::model::ModelSource;
use crate::progress::Progress;
use crate::runtime::forward::BlockLinear;
use crate::runtime::{Linear, Model};

/// llama.cpp's `GGML_QNT_VERSION`: the block layouts' revision, recorded in every quantized file.
const QUANTIZATION_VERSION: u32 = 2;

pub struct QuantizeOptions {
    pub preset: Preset,
    pub imatrix: Option<PathBuf>,
    pub rules: Vec<TensorTypeRule>,
    pub output_type: Option<GgmlType>,
    pub token_embedding_type: Option<GgmlType>,
    pub leave_output_tensor: bool,
    pub pure: bool,
    pub allow_requantize: bool,
    pub progress: Progress,
}

impl QuantizeOptions {
    pub fn new(preset: Preset) -> Self {
        Self {
            preset,
            imatrix: None,
            rules: Vec::new(),
            output_type: None,
            token_embedding_type: None,
            leave_output_tensor: false,
            pure: false,
            allow_requantize: false,
            progress: Progress { quiet: true },
        }
    }
}

/// Where a tensor's values come from.
enum Origin {
    /// Index into the source's tensor list.
    Source(usize),
    /// Computed for the GGUF (llama3 `rope_freqs` of an HF source).
    Computed(Vec<f32>),
}

/// One output tensor.
pub struct Step {
    pub name: String,
    /// GGUF order.
    pub dims: Vec<u64>,
    /// Its type in the input (as `qforge convert` would store it, for an HF source).
    pub from: GgmlType,
    pub to: GgmlType,
    /// The type the preset chose before the row length forced `to`.
    pub fell_back_from: Option<GgmlType>,
    pub input_bytes: u64,
    origin: Origin,
}

impl Step {
    fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn output_bytes(&self) -> u64 {
        self.to.tensor_bytes(self.elements()).expect("planned types fit the row length")
    }

    /// The stored bytes are taken over unchanged.
    fn is_copy(&self, source: &ModelSource) -> bool {
        self.from == self.to && source.is_gguf() && matches!(self.origin, Origin::Source(_))
    }
}

/// The per-tensor plan of a quantization (what `--dry-run` prints).
pub struct ModelPlan {
    pub preset: Preset,
    pub steps: Vec<Step>,
}

impl ModelPlan {
    pub fn elements(&self) -> u64 {
        self.steps.iter().map(Step::elements).sum()
    }

    pub fn input_bytes(&self) -> u64 {
        self.steps.iter().map(|s| s.input_bytes).sum()
    }

    pub fn output_bytes(&self) -> u64 {
        self.steps.iter().map(Step::output_bytes).sum()
    }

    pub fn tensors_by_type(&self) -> BTreeMap<GgmlType, usize> {
        let mut counts = BTreeMap::new();
        for s in &self.steps {
            *counts.entry(s.to).or_insert(0) += 1;
        }
        counts
    }

    pub fn fallbacks(&self) -> usize {
        self.steps.iter().filter(|s| s.fell_back_from.is_some()).count()
    }

    /// One line per tensor, then the totals.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let n = self.steps.len();
        for (i, s) in self.steps.iter().enumerate() {
            let dims = format!("[{}]", s.dims.iter().map(u64::to_string).collect::<Vec<_>>().join(", "));
            let why =
                s.fell_back_from.map(|t| format!(" ({t} does not fit rows of {})", s.dims[0])).unwrap_or_default();
            let _ = writeln!(
                out,
                "[{:>4}/{n}] {:<36} {dims:<16} {:>6} -> {:<6} {:>11} -> {:>11}{why}",
                i + 1,
                s.name,
                s.from.name(),
                s.to.name(),
                mib(s.input_bytes),
                mib(s.output_bytes())
            );
        }
        let _ = writeln!(
            out,
            "{}: {} -> {} ({:.2} bits per weight), {}",
            self.preset,
            mib(self.input_bytes()),
            mib(self.output_bytes()),
            bits_per_weight(self.output_bytes(), self.elements()),
            type_counts(&self.tensors_by_type())
        );
        if self.fallbacks() > 0 {
            let _ = writeln!(out, "{}", fallback_note(self.fallbacks()));
        }
        out
    }
}

/// What a quantization wrote.
pub struct QuantizeReport {
    pub output: PathBuf,
    pub preset: Preset,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub elements: u64,
    pub tensors_by_type: BTreeMap<GgmlType, usize>,
    pub fallbacks: usize,
    pub seconds: f64,
}

impl QuantizeReport {
    fn of(output: &Path, plan: &ModelPlan, started: Instant) -> Self {
        QuantizeReport {
            output: output.to_path_buf(),
            preset: plan.preset,
            input_bytes: plan.input_bytes(),
            output_bytes: plan.output_bytes(),
            elements: plan.elements(),
            tensors_by_type: plan.tensors_by_type(),
            fallbacks: plan.fallbacks(),
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    pub fn render(&self) -> String {
        let mut out = format!("wrote {} as {} in {:.2} s\n", self.output.display(), self.preset, self.seconds);
        let _ = writeln!(
            out,
            "  input   {:>10} ({:.2} bits per weight)",
            mib(self.input_bytes),
            bits_per_weight(self.input_bytes, self.elements)
        );
        let _ = writeln!(
            out,
            "  output  {:>10} ({:.2} bits per weight)",
            mib(self.output_bytes),
            bits_per_weight(self.output_bytes, self.elements)
        );
        let _ = writeln!(out, "  tensors {}", type_counts(&self.tensors_by_type));
        if self.fallbacks > 0 {
            let _ = writeln!(out, "  {}", fallback_note(self.fallbacks));
        }
        out
    }
}

fn fallback_note(n: usize) -> String {
    format!("{n} tensors fell back to another type: their rows do not fit the one chosen first")
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn bits_per_weight(bytes: u64, elements: u64) -> f64 {
    bytes as f64 * 8.0 / elements.max(1) as f64
}

fn type_counts(counts: &BTreeMap<GgmlType, usize>) -> String {
    counts.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ")
}

/// The plan for quantizing `input`, without writing anything.
pub fn dry_run(input: &Path, opts: &QuantizeOptions) -> Result<ModelPlan> {
    let source = ModelSource::open(input)?;
    plan_model(&source, opts, read_imatrix(opts)?.is_some())
}

fn read_imatrix(opts: &QuantizeOptions) -> Result<Option<(Imatrix, &Path)>> {
    opts.imatrix.as_deref().map(|path| Ok((Imatrix::read(path)?, path))).transpose()
}

/// Quantizes `input` into the GGUF file `output`.
pub fn quantize(input: &Path, output: &Path, opts: &QuantizeOptions) -> Result<QuantizeReport> {
    ensure_distinct(input, output)?;
    if output.is_dir() {
        bail!("{}: is a directory; GGUF output is a single file", output.display());
    }
    let started = Instant::now();
    let source = ModelSource::open(input)?;
    let imatrix = read_imatrix(opts)?;
    let plan = plan_model(&source, opts, imatrix.is_some())?;
    check_feasible(&source, &plan, opts.allow_requantize)?;

    let importance = imatrix.as_ref().map(|(m, path)| importance_for(&plan, m, path)).transpose()?;
    let metadata = file_metadata(&source, opts, imatrix.as_ref());
    let writer = GgufWriter::create(output, &metadata, tensor_plans(&plan, 0..plan.steps.len()))?;
    let bar = opts.progress.bytes_bar("quantize", plan.input_bytes());
    write_tensors(&source, &plan, importance.as_deref(), writer, &bar)?;
    bar.finish_and_clear();
    Ok(QuantizeReport::of(output, &plan, started))
}

/// The output file's metadata: the source's, then the keys llama-quantize adds.
fn file_metadata(
    source: &ModelSource,
    opts: &QuantizeOptions,
    imatrix: Option<&(Imatrix, &Path)>,
) -> Vec<(String, MetadataValue)> {
    let mut metadata = crate::convert::gguf_metadata(source, opts.preset.file_type());
    // llama-quantize sets these two last, in this order; doing the same keeps the whole file identical
    // to its output for the same input.
    metadata.retain(|(k, _)| k != "general.file_type");
    metadata.push(("general.quantization_version".into(), MetadataValue::U32(QUANTIZATION_VERSION)));
    metadata.push(("general.file_type".into(), MetadataValue::U32(opts.preset.file_type())));
    if let Some((m, path)) = imatrix {
        metadata.extend(imatrix_metadata(m, path));
    }
    metadata
}

/// The writer's plan for the steps `order` lists, in that order.
fn tensor_plans(plan: &ModelPlan, order: impl IntoIterator<Item = usize>) -> Vec<TensorPlan> {
    order
        .into_iter()
        .map(|i| &plan.steps[i])
        .map(|s| TensorPlan { name: s.name.clone(), dims: s.dims.clone(), ggml_type: s.to })
        .collect()
}

/// GPTQ's settings for [`quantize_gptq`].
#[derive(Clone, Debug)]
pub struct GgufGptqOptions {
    /// Fraction of the mean Hessian diagonal added to the diagonal.
    pub damp: f64,
    /// Fraction by which the Hessian's off-diagonal terms shrink toward its diagonal.
    pub shrink: f64,
    /// Within each block, quantize columns by decreasing Hessian diagonal.
    pub act_order: bool,
}

impl Default for GgufGptqOptions {
    fn default() -> Self {
        Self { damp: 0.01, shrink: gptq::SHRINK, act_order: false }
    }
}

/// Quantizes `input` into the GGUF file `output` with the same per-tensor plan as [`quantize`], but the
/// block linears' blocks come from GPTQ ([`gptq_blocks`]) run layer by layer on `calib`. Each block is
/// fitted by its format's own encoder weighted by the Hessian diagonal (times the imatrix, if
/// `opts.imatrix` is given); every other tensor is encoded as [`quantize`] does.
///
/// Written layer by layer as [`LayerWriter`] says. Input must be GGUF, whose q/k rows are already in
/// llama.cpp's order (the order GPTQ sees and the file stores).
pub fn quantize_gptq(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    calib: &CalibrationSet,
    gptq: &GgufGptqOptions,
) -> Result<QuantizeReport> {
    quantize_layers(input, output, opts, "GPTQ", |model, out| {
        gptq::pipeline::run(model, calib, opts.progress, |job| {
            let i = out.step_of(job.name)?;
            let to = out.plan.steps[i].to;
            let importance = out.importance(i);
            let bytes = match to.traits().grid {
                Some(_) => {
                    let config =
                        BlockGptqConfig { ty: to, damp: gptq.damp, shrink: gptq.shrink, act_order: gptq.act_order };
                    gptq_blocks(job.weights, job.rows, job.cols, job.hessian, importance, &config)
                        .with_context(|| format!("{}: tensor '{}': GPTQ failed", input.display(), job.name))?
                        .bytes
                }
                // A type without levels to choose (a float type a rule keeps): stored as it encodes.
                None => out.encode(i, job.weights, job.cols)?,
            };
            out.produced(i, bytes.clone())?;
            Ok(QuantizedLinear::Blocks(to, bytes))
        })?;
        Ok(())
    })
}

/// Quantizes `input` into the GGUF file `output` with the same per-tensor plan as [`quantize`], from
/// the AWQ-folded model ([`awq::quantize`] run layer by layer on `calib`): its folded norms and its
/// folded, clipped f32 linears are encoded with their planned types as [`quantize`] encodes any tensor
/// (with the imatrix, if `opts.imatrix` is given); every other tensor is encoded as [`quantize`] does.
///
/// Written layer by layer as [`LayerWriter`] says. Input must be GGUF (q/k rows in llama.cpp's order).
pub fn quantize_awq(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    calib: &CalibrationSet,
    config: &AwqConfig,
) -> Result<(QuantizeReport, AwqReport)> {
    let mut awq_report = AwqReport::default();
    let report = quantize_layers(input, output, opts, "AWQ", |model, out| {
        awq_report = awq::quantize(model, calib, config, opts.progress, |item| {
            let (name, values, row_len) = match item {
                AwqItem::Norm { name, values } => (name, values, values.len()),
                AwqItem::Linear { name, cols, scaled, .. } => (name, scaled, cols),
            };
            let i = out.step_of(name)?;
            let importance = match (out.importance(i), item) {
                (Some(w), AwqItem::Linear { rows, cols, scaled, .. }) => {
                    let original = original_linear(model, name)?;
                    let s = column_scales(&original, scaled, rows, cols);
                    Some(w.iter().zip(s).map(|(&w, s)| w / (s * s)).collect::<Vec<f32>>())
                }
                (w, _) => w.map(<[f32]>::to_vec),
            };
            let bytes = out.encode_with(i, values, row_len, importance.as_deref())?;
            out.produced(i, bytes)
        })?;
        Ok(())
    })?;
    Ok((report, awq_report))
}

/// The f32 weights of the block linear `name` (`blk.N.<linear>`) as the model stores them.
fn original_linear(model: &Model, name: &str) -> Result<Vec<f32>> {
    let (layer, linear) = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(l, tail)| {
            let layer = model.layers.get(l.parse::<usize>().ok()?)?;
            Some((layer, BlockLinear::ALL.into_iter().find(|b| b.gguf_name() == tail)?))
        })
        .ok_or_else(|| anyhow!("'{name}' is not a block linear of the model"))?;
    let weights = linear.of(layer);
    let mut w = vec![0f32; weights.out_features() * weights.in_features()];
    weights.decode_rows(0..weights.out_features(), &mut w);
    Ok(w)
}

/// The factor AWQ multiplied each input column by (the factor its input channel was divided by):
/// `scaled / original` at the column's smallest nonzero original weight, which clipping (it trims
/// only a group's extremes) leaves as scaling made it; 1 for an all-zero column.
fn column_scales(original: &[f32], scaled: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .map(|j| {
            let smallest = (0..rows)
                .map(|r| r * cols + j)
                .filter(|&k| original[k] != 0.0)
                .min_by(|&a, &b| original[a].abs().total_cmp(&original[b].abs()));
            smallest.map_or(1.0, |k| scaled[k] / original[k])
        })
        .collect()
}

/// Opens `input`, plans it as [`quantize`] would, and has `produce` run `method` over the loaded model,
/// handing each block tensor's bytes to the [`LayerWriter`]; writes what it did not produce itself.
fn quantize_layers(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    method: &str,
    produce: impl FnOnce(&Model, &mut LayerWriter) -> Result<()>,
) -> Result<QuantizeReport> {
    ensure_distinct(input, output)?;
    if output.is_dir() {
        bail!("{}: is a directory; GGUF output is a single file", output.display());
    }
    let started = Instant::now();
    let source = ModelSource::open(input)?;
    if !source.is_gguf() {
        bail!(
            "{}: {method} into GGUF reads a GGUF model (its q/k rows in llama.cpp's order); convert it first \
             with `qforge convert {} -o MODEL.gguf --to gguf`",
            input.display(),
            input.display()
        );
    }
    let imatrix = read_imatrix(opts)?;
    let plan = plan_model(&source, opts, imatrix.is_some())?;
    check_feasible(&source, &plan, opts.allow_requantize)?;
    let importance = imatrix.as_ref().map(|(m, path)| importance_for(&plan, m, path)).transpose()?;
    let model = Model::load(&source)?;
    let layered = LayeredPlan::new(&plan, model.layers.len());
    let metadata = file_metadata(&source, opts, imatrix.as_ref());
    let writer = GgufWriter::create(output, &metadata, tensor_plans(&plan, layered.order()))?;
    let mut out = LayerWriter {
        source: &source,
        plan: &plan,
        layered,
        importance,
        writer,
        written: 0,
        produced: BTreeMap::new(),
    };
    produce(&model, &mut out)?;
    out.write_up_to(out.layered.order.len())?;
    out.writer.finish()?;
    Ok(QuantizeReport::of(output, &plan, started))
}

/// Writes a layered quantization's output: each layer's tensors together, in plan order within the
/// layer (see [`LayeredPlan`]). A method hands over a block tensor's bytes as it produces them; once it
/// has moved on to a later layer, everything before that layer is written (what it did not produce
/// encoded as [`quantize`] does), so memory holds at most one layer's output.
struct LayerWriter<'a> {
    source: &'a ModelSource,
    plan: &'a ModelPlan,
    layered: LayeredPlan,
    importance: Option<Vec<Option<Vec<f32>>>>,
    writer: GgufWriter,
    /// The first `written` steps of the output order are written.
    written: usize,
    /// Produced bytes waiting for their turn, by step.
    produced: BTreeMap<usize, Vec<u8>>,
}

impl LayerWriter<'_> {
    /// The step of the planned tensor `name`.
    fn step_of(&self, name: &str) -> Result<usize> {
        let i = self.layered.by_name.get(name).copied();
        i.ok_or_else(|| anyhow!("{}: no planned tensor '{name}'", self.source.path.display()))
    }

    fn importance(&self, i: usize) -> Option<&[f32]> {
        self.importance.as_ref().and_then(|w| w[i].as_deref())
    }

    /// `values` (rows of `row_len`) encoded with step `i`'s type and importance.
    fn encode(&self, i: usize, values: &[f32], row_len: usize) -> Result<Vec<u8>> {
        self.encode_with(i, values, row_len, self.importance(i))
    }

    fn encode_with(&self, i: usize, values: &[f32], row_len: usize, importance: Option<&[f32]>) -> Result<Vec<u8>> {
        let step = &self.plan.steps[i];
        quantize_rows(Rows::F32(values), row_len, step.to, importance)
            .map_err(|e| anyhow!("{}: tensor '{}': {e}", self.source.path.display(), step.name))
    }

    /// Takes step `i`'s output, first writing everything that comes before its layer.
    fn produced(&mut self, i: usize, bytes: Vec<u8>) -> Result<()> {
        self.write_up_to(self.layered.end_before_layer_of(i))?;
        if let Origin::Source(t) = self.plan.steps[i].origin {
            self.source.release(&self.source.tensors()[t]);
        }
        self.produced.insert(i, bytes);
        Ok(())
    }

    /// Writes the output order's entries up to `end`.
    fn write_up_to(&mut self, end: usize) -> Result<()> {
        for &i in &self.layered.order[self.written.min(end)..end] {
            let step = &self.plan.steps[i];
            match self.produced.remove(&i) {
                Some(bytes) => self.writer.write_tensor(&step.name, &bytes)?,
                None => {
                    let importance = self.importance.as_ref().and_then(|w| w[i].as_deref());
                    let encoded = encode_step(self.source, step, importance)?;
                    self.writer.write_tensor(encoded.name, &encoded.bytes)?;
                    if let Some(t) = encoded.release {
                        self.source.release(t);
                    }
                }
            }
        }
        self.written = self.written.max(end);
        Ok(())
    }
}

/// The plan's steps grouped by layer: tensors before the first layer's (in plan order), then each
/// layer's `blk.N.` tensors in plan order, then the rest.
struct LayeredPlan {
    /// Step indices in output order.
    order: Vec<usize>,
    /// Per entry of `order`: 0 before the layers, `l + 1` for layer `l`, one more after them.
    keys: Vec<usize>,
    /// Per step, its entry's key.
    step_keys: Vec<usize>,
    by_name: HashMap<String, usize>,
}

impl LayeredPlan {
    fn new(plan: &ModelPlan, layers: usize) -> Self {
        let layer_of = |name: &str| -> Option<usize> {
            name.strip_prefix("blk.")?.split('.').next()?.parse().ok().filter(|&l| l < layers)
        };
        let first_layer_step = plan.steps.iter().position(|s| layer_of(&s.name).is_some()).unwrap_or(0);
        let key = |i: usize| match layer_of(&plan.steps[i].name) {
            Some(l) => l + 1,
            None if i < first_layer_step => 0,
            None => layers + 1,
        };
        let step_keys: Vec<usize> = (0..plan.steps.len()).map(key).collect();
        let mut order: Vec<usize> = (0..plan.steps.len()).collect();
        order.sort_by_key(|&i| step_keys[i]);
        let keys = order.iter().map(|&i| step_keys[i]).collect();
        let by_name = plan.steps.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { order, keys, step_keys, by_name }
    }

    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        self.order.iter().copied()
    }

    /// How many entries of the order come before the tensors of step `i`'s layer.
    fn end_before_layer_of(&self, i: usize) -> usize {
        self.keys.partition_point(|&k| k < self.step_keys[i])
    }
}

/// Encodes the plan's tensors in order and writes them. A writer thread takes each tensor's bytes
/// while the next one is encoded, so the cores are not idle during writes; the hand-over waits for the
/// writer, so at most two tensors' output exist at a time.
fn write_tensors(
    source: &ModelSource,
    plan: &ModelPlan,
    importance: Option<&[Option<Vec<f32>>]>,
    mut writer: GgufWriter,
    bar: &ProgressBar,
) -> Result<()> {
    std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::sync_channel::<Encoded>(0);
        let writing = scope.spawn(move || -> Result<GgufWriter> {
            for encoded in receive {
                writer.write_tensor(encoded.name, &encoded.bytes)?;
                if let Some(t) = encoded.release {
                    source.release(t);
                }
            }
            Ok(writer)
        });
        let mut encoding = Ok(());
        for (i, step) in plan.steps.iter().enumerate() {
            bar.set_message(step.name.clone());
            let weights = importance.and_then(|w| w[i].as_deref());
            let encoded = match encode_step(source, step, weights) {
                Ok(encoded) => encoded,
                Err(e) => {
                    encoding = Err(e);
                    break;
                }
            };
            // A refused hand-over means the writer stopped on an error, which its result reports.
            if send.send(encoded).is_err() {
                break;
            }
            bar.inc(step.input_bytes);
        }
        drop(send);
        let writer = writing.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        encoding?;
        writer?.finish()?;
        Ok(())
    })
}

/// One step's output bytes, ready for the writer.
struct Encoded<'a> {
    name: &'a str,
    bytes: Cow<'a, [u8]>,
    /// A tensor whose stored bytes are `bytes`: released once they are written.
    release: Option<&'a SourceTensor>,
}

fn encode_step<'a>(source: &'a ModelSource, step: &'a Step, importance: Option<&[f32]>) -> Result<Encoded<'a>> {
    let encode = |rows: Rows| {
        quantize_rows(rows, step.dims[0] as usize, step.to, importance)
            .map_err(|e| anyhow!("{}: tensor '{}': {e}", source.path.display(), step.name))
    };
    let bytes = match &step.origin {
        Origin::Computed(values) => encode(Rows::F32(values))?,
        Origin::Source(i) => {
            let t = &source.tensors()[*i];
            if step.is_copy(source) {
                return Ok(Encoded { name: &step.name, bytes: Cow::Borrowed(source.raw(t)), release: Some(t) });
            }
            let bytes = match stored_gguf_rows(source, t) {
                Some(rows) => encode(rows)?,
                None => encode(Rows::F32(&source.load_gguf_order(t)?))?,
            };
            source.release(t);
            bytes
        }
    };
    Ok(Encoded { name: &step.name, bytes: Cow::Owned(bytes), release: None })
}

/// The tensor's stored bytes, when they already are its GGUF rows in a decodable type (all but the
/// q/k projections of an HF checkpoint, whose rows are permuted), so that the threads encoding the
/// rows decode them, a few at a time, instead of the whole tensor being decoded first.
fn stored_gguf_rows<'a>(source: &'a ModelSource, t: &SourceTensor) -> Option<Rows<'a>> {
    if !source.is_gguf() && source.qk_heads(t).is_some() {
        return None;
    }
    let ty = match t.storage {
        Storage::Ggml(ty) => ty,
        storage => FloatType::of_storage(storage)?.ggml(),
    };
    ty.traits().dequantize.is_some().then(|| Rows::Encoded { bytes: source.raw(t), ty })
}

/// The type llama.cpp would see the tensor in: a GGUF's own, or what `qforge convert` stores for an HF
/// tensor (1-D tensors as F32, matrices in their float type).
fn current_type(source: &ModelSource, storage: Storage, rank: usize, name: &str) -> Result<GgmlType> {
    match storage {
        Storage::Ggml(t) => Ok(t),
        Storage::Safetensors(_) if rank == 1 => Ok(GgmlType::F32),
        // A GPTQ/AWQ linear is dequantized exactly, to f32.
        Storage::Packed(_) => Ok(GgmlType::F32),
        Storage::Safetensors(d) => FloatType::of_storage(storage).map(FloatType::ggml).ok_or_else(|| {
            anyhow!(
                "{}: tensor '{name}' is stored as {}; qforge quantizes F32, F16 and BF16 checkpoints",
                source.path.display(),
                d.name()
            )
        }),
    }
}

/// Lists the output tensors (the source's plus any the GGUF needs computed) and plans their types.
pub fn plan_model(source: &ModelSource, opts: &QuantizeOptions, has_imatrix: bool) -> Result<ModelPlan> {
    let mut descs = Vec::new();
    let mut origins = Vec::new();
    let mut input_bytes = Vec::new();
    for (i, t) in source.tensors().iter().enumerate() {
        let current = current_type(source, t.storage, t.shape.len(), &t.gguf_name)?;
        descs.push(TensorDesc { name: t.gguf_name.clone(), dims: t.gguf_dims(), current });
        origins.push(Some(Origin::Source(i)));
        input_bytes.push(source.stored_bytes(t));
    }
    if let Some((rope, values)) = crate::convert::rope_freqs_tensor(source) {
        input_bytes.push(values.len() as u64 * 4);
        descs.push(TensorDesc { name: rope.name, dims: rope.dims, current: GgmlType::F32 });
        origins.push(Some(Origin::Computed(values)));
    }
    let plan_opts = PlanOptions {
        preset: opts.preset,
        rules: opts.rules.clone(),
        output_type: opts.output_type,
        token_embedding_type: opts.token_embedding_type,
        leave_output_tensor: opts.leave_output_tensor,
        pure: opts.pure,
        has_imatrix,
    };
    let planned = plan(&ModelShape::of(&source.config), &descs, &plan_opts)
        .with_context(|| format!("{}", source.path.display()))?;
    let steps = planned
        .into_iter()
        .map(|p| {
            let desc = &descs[p.index];
            Step {
                name: p.name,
                dims: desc.dims.clone(),
                from: desc.current,
                to: p.ty,
                fell_back_from: p.fell_back_from,
                input_bytes: input_bytes[p.index],
                origin: origins[p.index].take().expect("each tensor is planned once"),
            }
        })
        .collect();
    Ok(ModelPlan { preset: opts.preset, steps })
}

/// Refuses, before any output exists, what cannot or should not be done.
fn check_feasible(source: &ModelSource, plan: &ModelPlan, allow_requantize: bool) -> Result<()> {
    let path = source.path.display();
    let encoded = plan.steps.iter().filter(|s| !s.is_copy(source));
    if let Some(s) = encoded.clone().find(|s| s.to.traits().quantize.is_none()) {
        bail!("{path}: tensor '{}' needs {}, and qforge cannot encode {} yet", s.name, s.to, s.to);
    }
    let requantized: Vec<&Step> = encoded.filter(|s| s.from.is_quantized()).collect();
    if let Some(first) = requantized.first() {
        if !allow_requantize {
            bail!(
                "{path}: tensor '{}' is already {}; requantizing loses quality (pass --allow-requantize to do it anyway)",
                first.name,
                first.from
            );
        }
        eprintln!(
            "warning: {path}: requantizing {} tensors that are already quantized; the result is worse than \
             quantizing from F16/F32",
            requantized.len()
        );
    }
    Ok(())
}

/// Each step's importance vector, or `None` where the imatrix has none to give (as llama-quantize, it
/// then quantizes without one). A vector of the wrong size is an error. The token embedding is exempt
/// from both checks: it is looked up, never multiplied, so imatrix tools have nothing to record for it.
fn importance_for(plan: &ModelPlan, imatrix: &Imatrix, path: &Path) -> Result<Vec<Option<Vec<f32>>>> {
    let mut missing = Vec::new();
    let mut out = Vec::with_capacity(plan.steps.len());
    for s in &plan.steps {
        if !s.to.is_quantized() || s.from == s.to {
            out.push(None);
            continue;
        }
        let is_embedding = s.name == "token_embd.weight";
        let Some(w) = imatrix.importance(&s.name) else {
            if !is_embedding {
                missing.push(s.name.as_str());
            }
            out.push(None);
            continue;
        };
        if w.len() as u64 != s.dims[0] {
            if is_embedding {
                out.push(None);
                continue;
            }
            bail!(
                "{}: entry '{}' has {} values; the tensor has rows of {}",
                path.display(),
                s.name,
                w.len(),
                s.dims[0]
            );
        }
        out.push(Some(w));
    }
    if !missing.is_empty() {
        eprintln!(
            "warning: {}: no importance data for {} quantized tensors ({}{}); they are quantized without it",
            path.display(),
            missing.len(),
            missing[..missing.len().min(3)].join(", "),
            if missing.len() > 3 { ", ..." } else { "" }
        );
    }
    Ok(out)
}

/// The `quantize.imatrix.*` keys llama-quantize records.
fn imatrix_metadata(imatrix: &Imatrix, path: &Path) -> Vec<(String, MetadataValue)> {
    let mut kv = vec![("quantize.imatrix.file".to_string(), MetadataValue::from(path.display().to_string().as_str()))];
    if let Some(d) = imatrix.datasets.first() {
        kv.push(("quantize.imatrix.dataset".into(), MetadataValue::from(d.as_str())));
    }
    kv.push(("quantize.imatrix.entries_count".into(), MetadataValue::U32(imatrix.entries.len() as u32)));
    if imatrix.chunk_count > 0 {
        kv.push(("quantize.imatrix.chunks_count".into(), MetadataValue::U32(imatrix.chunk_count)));
    }
    kv
}

#[cfg(test)]
mod tests {
    use super::column_scales;

    #[test]
    fn column_scales_recover_awq_scaling_past_clipped_extremes() {
        // Column 0 scaled by 2, column 1 by 0.5; then column 0's largest entry clipped (-6 to -4).
        let original = [1.0, -4.0, 0.25, 2.0, -3.0, 0.0];
        let mut scaled: Vec<f32> = original.iter().enumerate().map(|(k, &w)| w * [2.0, 0.5][k % 2]).collect();
        scaled[4] = -4.0;
        assert_eq!(column_scales(&original, &scaled, 3, 2), vec![2.0, 0.5]);
        assert_eq!(column_scales(&[0.0, 1.0], &[0.0, 3.0], 1, 2), vec![1.0, 3.0], "an all-zero column keeps 1");
    }
}
