//! `qforge quantize --method rtn|gptq|awq --format gguf|gptq|awq`: which quantizer writes which file,
//! the checks that refuse an impossible or ill-formed request before anything is computed or written,
//! and the orchestration (calibration sample, quantizer, writer) of each pair.
//!
//! | method | gguf (`--type`) | gptq | awq |
//! |--------|-----------------|------|-----|
//! | rtn    | llama.cpp's encoders ([`super::file`]) | [`gptq::rtn`] per linear | [`gptq::rtn`] per linear |
//! | gptq   | GPTQ onto the preset's block grids ([`file::quantize_gptq`]) | [`pipeline::quantize`] | — |
//! | awq    | the AWQ-folded weights in the preset's types ([`file::quantize_awq`]) | — | [`awq::quantize`] |
//!
//! Defaults follow the reference tools: 4 bits, group size 128, symmetric for GPTQ (AutoGPTQ) and
//! asymmetric for AWQ (AutoAWQ's `zero_point`), dampening 0.01, 128 calibration sequences of 512 tokens
//! from the embedded corpus. One default departs from AutoGPTQ: GPTQ's Hessian has its off-diagonal
//! terms shrunk by [`gptq::SHRINK`] (`--shrink 0` restores the plain Hessian).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use calibration::{sample, CalibrationSet, Corpus, SamplingOptions};
use formats::output::ensure_distinct;
use formats::packed::awq::AwqQuantizeConfig;
use formats::packed::gptq::GptqQuantizeConfig;

use super::awq::{self, AwqConfig, AwqItem, AwqReport};
use super::file::{self, GgufGptqOptions, ModelPlan, QuantizeOptions, QuantizeReport};
use super::gptq::pipeline::{self, PipelineReport};
use super::gptq::{self, GptqConfig};
use super::packed_export::{PackedExport, PackedFormat, PackedReport};
use crate::model::ModelSource;
use crate::progress::Progress;
use crate::runtime::forward::BlockLinear;
use crate::runtime::{Linear, Model};

/// The group size AWQ's searches score by default when it writes GGUF blocks.
const GGUF_AWQ_GROUP_SIZE: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Round to nearest: no calibration.
    Rtn,
    /// GPTQ: error feedback through the Hessian of calibration activations.
    Gptq,
    /// AWQ: activation-aware channel scales, then round to nearest.
    Awq,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A llama.cpp GGUF file (block types from `--type`).
    Gguf,
    /// An HF directory in the GPTQ v1 layout.
    Gptq,
    /// An HF directory in AutoAWQ's GEMM layout.
    Awq,
}

/// The integer grid of the GPTQ/AWQ formats; `None` leaves the method's default.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct GridArgs {
    /// Bits per weight: 2, 3, 4 or 8 for GPTQ (default 4); AWQ stores 4 only.
    #[arg(long)]
    pub bits: Option<u32>,
    /// Input columns sharing a scale and zero point: 32, 64 or 128 (default), or -1 for whole rows.
    #[arg(long, allow_hyphen_values = true)]
    pub group_size: Option<i64>,
    /// Symmetric grid (the default for GPTQ).
    #[arg(long, conflicts_with = "asym")]
    pub sym: bool,
    /// Asymmetric grid with a zero point (the default for AWQ).
    #[arg(long)]
    pub asym: bool,
    /// GPTQ: quantize columns by decreasing Hessian diagonal (desc_act; writes g_idx).
    #[arg(long)]
    pub act_order: bool,
    /// GPTQ: fix every group's scale before any error feedback.
    #[arg(long)]
    pub static_groups: bool,
    /// GPTQ: dampening, a fraction of the mean Hessian diagonal (default 0.01).
    #[arg(long)]
    pub damp: Option<f64>,
    /// GPTQ: shrink the Hessian's off-diagonal terms toward its diagonal by this fraction, so the
    /// error feedback leans less on the calibration text's channel correlations (default 0.7; 0 is
    /// AutoGPTQ's plain Hessian).
    #[arg(long)]
    pub shrink: Option<f64>,
}

/// The calibration sample of GPTQ and AWQ; `None` leaves the default.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CalibArgs {
    /// Calibration text: a .txt or .jsonl (`text` field) file or a directory of them (default: the
    /// embedded corpus).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration sequences (default 128).
    #[arg(long)]
    pub nsamples: Option<usize>,
    /// Tokens per calibration sequence (default 512).
    #[arg(long)]
    pub seqlen: Option<usize>,
    /// Seed of the sequences' positions in the text (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl CalibArgs {
    /// The first calibration flag given, for refusing it where nothing is calibrated.
    pub fn first_set(&self) -> Option<&'static str> {
        [
            (self.calib.is_some(), "--calib"),
            (self.nsamples.is_some(), "--nsamples"),
            (self.seqlen.is_some(), "--seqlen"),
            (self.seed.is_some(), "--seed"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }
}

pub struct MethodOptions {
    pub method: Method,
    /// Default: GGUF when a preset is given, else the method's own format.
    pub format: Option<Format>,
    /// The GGUF options, present when a preset (`--type`) was given.
    pub gguf: Option<QuantizeOptions>,
    pub grid: GridArgs,
    pub calib: CalibArgs,
    pub progress: Progress,
}

/// A request after validation.
enum Job<'o> {
    /// `--method rtn --format gguf`: the preset quantization.
    Gguf(&'o QuantizeOptions),
    /// `--method gptq --format gguf`.
    GptqGguf(&'o QuantizeOptions, GgufGptqOptions),
    /// `--method awq --format gguf`.
    AwqGguf(&'o QuantizeOptions, AwqConfig),
    Packed {
        format: PackedFormat,
        quantizer: Quantizer,
    },
}

enum Quantizer {
    Rtn(GptqConfig),
    Gptq(GptqConfig),
    Awq(AwqConfig),
}

/// What `quantize` did.
pub struct MethodReport {
    pub method: Method,
    pub seconds: f64,
    pub calibrated: Option<Calibrated>,
    pub written: Written,
}

/// Where a calibrated method's time went.
pub enum Calibrated {
    Gptq(PipelineReport),
    Awq(AwqReport),
}

pub enum Written {
    Gguf(QuantizeReport),
    Packed { report: PackedReport, input_bytes: u64, weights: u64 },
}

impl MethodReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.written {
            Written::Gguf(report) => out.push_str(&report.render()),
            Written::Packed { report, input_bytes, weights } => {
                let _ = writeln!(out, "{} in {:.2} s", report.render().trim_end(), self.seconds);
                let _ = writeln!(
                    out,
                    "  input {:.2} MiB -> output {:.2} MiB ({:.2} bits per weight)",
                    *input_bytes as f64 / (1024.0 * 1024.0),
                    report.bytes_written as f64 / (1024.0 * 1024.0),
                    report.bytes_written as f64 * 8.0 / (*weights).max(1) as f64
                );
            }
        }
        match &self.calibrated {
            Some(Calibrated::Gptq(p)) => {
                let _ = writeln!(
                    out,
                    "  GPTQ: {} linears in {} layers; forward {:.2} s, Hessian {:.2} s, GPTQ {:.2} s (max damp {})",
                    p.linears, p.layers, p.forward_seconds, p.hessian_seconds, p.gptq_seconds, p.max_damp
                );
            }
            Some(Calibrated::Awq(a)) => {
                let _ = writeln!(
                    out,
                    "  AWQ: {} linears in {} layers; forward {:.2} s, statistics {:.2} s, scale search {:.2} s, \
                     clip search {:.2} s",
                    a.linears,
                    a.layers,
                    a.forward_seconds,
                    a.statistics_seconds,
                    a.scale_search_seconds,
                    a.clip_search_seconds
                );
            }
            None => {}
        }
        out
    }
}

/// Quantizes `input` into `output` as `opts` asks.
pub fn run(input: &Path, output: &Path, opts: &MethodOptions) -> Result<MethodReport> {
    let started = Instant::now();
    let (written, calibrated) = match resolve(opts)? {
        Job::Gguf(gguf) => (Written::Gguf(file::quantize(input, output, gguf)?), None),
        Job::GptqGguf(gguf, gptq) => {
            let calib = calibration_set(&ModelSource::open(input)?, &opts.calib)?;
            (Written::Gguf(file::quantize_gptq(input, output, gguf, &calib, &gptq)?), None)
        }
        Job::AwqGguf(gguf, awq) => {
            let calib = calibration_set(&ModelSource::open(input)?, &opts.calib)?;
            let (written, report) = file::quantize_awq(input, output, gguf, &calib, &awq)?;
            (Written::Gguf(written), Some(Calibrated::Awq(report)))
        }
        Job::Packed { format, quantizer } => {
            ensure_distinct(input, output)?;
            let source = ModelSource::open(input)?;
            let model = Model::load(&source)?;
            let grid = match &quantizer {
                Quantizer::Rtn(c) | Quantizer::Gptq(c) => *c,
                Quantizer::Awq(c) => c.rounding(),
            };
            pipeline::check_config(&model, &grid)
                .map_err(|e| anyhow!("{}: --group-size: {e:#}", source.path.display()))?;
            let calib = match quantizer {
                Quantizer::Rtn(_) => None,
                _ => Some(calibration_set(&source, &opts.calib)?),
            };
            let produced_norms = matches!(quantizer, Quantizer::Awq(_));
            let mut export = PackedExport::create(&source, output, format, produced_norms)?;
            let calibrated = match (&quantizer, &calib) {
                (Quantizer::Gptq(c), Some(calib)) => {
                    let sink = |name: &str, q: &gptq::GptqOutput| export.linear(name, &q.weight);
                    Some(Calibrated::Gptq(pipeline::quantize(&model, calib, c, opts.progress, sink)?))
                }
                (Quantizer::Awq(c), Some(calib)) => {
                    let sink = |item: AwqItem| match item {
                        AwqItem::Norm { name, values } => export.norm(name, values),
                        AwqItem::Linear { name, quantized, .. } => export.linear(name, quantized),
                    };
                    Some(Calibrated::Awq(awq::quantize(&model, calib, c, opts.progress, sink)?))
                }
                _ => {
                    rtn_all(&model, &grid, opts.progress, &mut export)?;
                    None
                }
            };
            let report = export.finish()?;
            let weights = source.tensors().iter().map(|t| t.n_elements() as u64).sum();
            (Written::Packed { report, input_bytes: source.data_bytes(), weights }, calibrated)
        }
    };
    Ok(MethodReport { method: opts.method, seconds: started.elapsed().as_secs_f64(), calibrated, written })
}

/// `--dry-run`: the GGUF preset's per-tensor plan.
pub fn dry_run(input: &Path, opts: &MethodOptions) -> Result<ModelPlan> {
    match resolve(opts)? {
        Job::Gguf(gguf) => file::dry_run(input, gguf),
        _ => bail!("--dry-run plans --method rtn GGUF preset quantization (--type) only"),
    }
}

/// Checks the method, format and flags against each other; nothing is read or written yet.
fn resolve(opts: &MethodOptions) -> Result<Job<'_>> {
    let (method, grid, calib) = (opts.method, &opts.grid, &opts.calib);
    let format = match (opts.format, &opts.gguf, method) {
        (Some(f), _, _) => f,
        (None, Some(_), _) => Format::Gguf,
        (None, None, Method::Rtn) => bail!("--method rtn needs --type PRESET (a GGUF file) or --format gptq|awq"),
        (None, None, Method::Gptq) => Format::Gptq,
        (None, None, Method::Awq) => Format::Awq,
    };
    match (method, format) {
        (Method::Gptq, Format::Awq) | (Method::Awq, Format::Gptq) => bail!(
            "--method {} cannot write --format {}: gptq writes gptq or gguf, awq writes awq or gguf, rtn writes any",
            name(method),
            name(format)
        ),
        _ => {}
    }
    if let (Some(gguf), false) = (&opts.gguf, format == Format::Gguf) {
        bail!(
            "--type {} picks GGUF block types; --format {} takes --bits and --group-size instead",
            gguf.preset,
            name(format)
        );
    }
    let calibrated = method != Method::Rtn;
    if let (Some(flag), false) = (calib.first_set(), calibrated) {
        bail!("{flag} sets the calibration sample of --method gptq and awq; --method rtn uses none");
    }
    let gptq_only = [
        (grid.act_order, "--act-order"),
        (grid.static_groups, "--static-groups"),
        (grid.damp.is_some(), "--damp"),
        (grid.shrink.is_some(), "--shrink"),
    ];
    if let (Some((_, flag)), false) = (gptq_only.iter().find(|(set, _)| *set), method == Method::Gptq) {
        bail!("{flag} applies to --method gptq only");
    }
    if format == Format::Gguf {
        let gguf = opts.gguf.as_ref().context("--format gguf needs --type PRESET (e.g. Q4_K_M)")?;
        // AWQ's searches still round onto a grid of their own, which these flags set.
        let awq = method == Method::Awq;
        let grid_flag = [
            (grid.bits.is_some(), "--bits"),
            (grid.group_size.is_some() && !awq, "--group-size"),
            (grid.sym && !awq, "--sym"),
            (grid.asym && !awq, "--asym"),
            (grid.static_groups, "--static-groups"),
        ];
        if let Some((_, flag)) = grid_flag.iter().find(|(set, _)| *set) {
            bail!("{flag} sets the GPTQ/AWQ grid; with --format gguf the preset (--type) decides it");
        }
        return match method {
            Method::Rtn => Ok(Job::Gguf(gguf)),
            Method::Gptq => {
                let defaults = GgufGptqOptions::default();
                let options = GgufGptqOptions {
                    damp: grid.damp.unwrap_or(defaults.damp),
                    shrink: grid.shrink.unwrap_or(defaults.shrink),
                    act_order: grid.act_order,
                };
                Ok(Job::GptqGguf(gguf, options))
            }
            Method::Awq => {
                // GGUF's block formats group 32 weights (k-quants' sub-blocks at most 32), so AWQ's
                // searches default to scoring groups of that size.
                let group_size = match grid.group_size {
                    None => GGUF_AWQ_GROUP_SIZE,
                    Some(g) if g > 0 => g as usize,
                    Some(g) => bail!("--group-size {g}: AWQ's searches need groups (e.g. 32)"),
                };
                Ok(Job::AwqGguf(gguf, AwqConfig { group_size, zero_point: !grid.sym, ..AwqConfig::default() }))
            }
        };
    }
    let group_size = match grid.group_size {
        None => Some(128),
        Some(-1) => None,
        Some(g) if g > 0 => Some(g as usize),
        Some(g) => bail!("--group-size {g}: use -1 (whole rows) or a positive size such as 128"),
    };
    let bits = grid.bits.unwrap_or(4);
    let sym = if format == Format::Awq { grid.sym } else { !grid.asym };
    let config = GptqConfig {
        bits,
        group_size,
        sym,
        act_order: grid.act_order,
        static_groups: grid.static_groups,
        damp: grid.damp.unwrap_or(0.01),
        shrink: grid.shrink.unwrap_or(gptq::SHRINK),
    };
    let packed = if format == Format::Awq {
        if bits != 4 {
            bail!("--bits {bits}: AWQ's GEMM format stores 4-bit weights only");
        }
        let group_size = group_size.context("--group-size -1: AWQ's GEMM format needs groups (e.g. 128)")?;
        // The zeros are stored either way (a symmetric grid's are the middle code), and AWQ's loaders
        // read `qzeros` only when `zero_point` is set.
        PackedFormat::Awq(AwqQuantizeConfig { group_size, zero_point: true })
    } else {
        PackedFormat::Gptq(GptqQuantizeConfig {
            bits,
            group_size,
            desc_act: config.act_order,
            sym,
            static_groups: config.static_groups,
            true_sequential: true,
            damp_percent: config.damp,
        })
    };
    config.validate().map_err(|e| anyhow::anyhow!("{}: {e}", grid_flag_of(&e)))?;
    let quantizer = match method {
        Method::Gptq => Quantizer::Gptq(config),
        Method::Awq => {
            let group_size = group_size.unwrap_or(AwqConfig::default().group_size);
            Quantizer::Awq(AwqConfig { group_size, zero_point: !sym, ..AwqConfig::default() })
        }
        Method::Rtn => Quantizer::Rtn(config),
    };
    Ok(Job::Packed { format: packed, quantizer })
}

/// The flag a grid error is about.
fn grid_flag_of(e: &gptq::GptqError) -> &'static str {
    match e {
        gptq::GptqError::Bits(_) => "--bits",
        gptq::GptqError::GroupSize(_) => "--group-size",
        gptq::GptqError::StaticGroupsWithoutGroups => "--static-groups",
        gptq::GptqError::Damp(_) => "--damp",
        gptq::GptqError::Shrink(_) => "--shrink",
        _ => "grid",
    }
}

fn name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

/// The calibration sequences: `--calib` or the embedded corpus, tokenized with the model's tokenizer.
pub(crate) fn calibration_set(source: &ModelSource, args: &CalibArgs) -> Result<CalibrationSet> {
    let corpus = match &args.calib {
        Some(path) => Corpus::load(path)?,
        None => Corpus::embedded(),
    };
    let tokenizer = crate::runtime::tokenizer(source)?;
    let defaults = SamplingOptions::default();
    let options = SamplingOptions {
        nsamples: args.nsamples.unwrap_or(defaults.nsamples),
        seqlen: args.seqlen.unwrap_or(defaults.seqlen),
        seed: args.seed.unwrap_or(defaults.seed),
    };
    let sample = sample(&corpus, &tokenizer, options);
    drop((tokenizer, corpus));
    crate::heap::return_freed_memory();
    sample
}

/// Round-to-nearest of every block linear, in block order.
fn rtn_all(model: &Model, config: &GptqConfig, progress: Progress, export: &mut PackedExport) -> Result<()> {
    let bar = progress.count_bar("rtn", (model.layers.len() * BlockLinear::ALL.len()) as u64);
    for (l, layer) in model.layers.iter().enumerate() {
        for linear in BlockLinear::ALL {
            let name = format!("blk.{l}.{}", linear.gguf_name());
            let weights = linear.of(layer);
            let (rows, cols) = (weights.out_features(), weights.in_features());
            let mut w = vec![0f32; rows * cols];
            weights.decode_rows(0..rows, &mut w);
            let q = gptq::rtn(&w, rows, cols, config).with_context(|| format!("{name}: RTN failed"))?;
            export.linear(&name, &q)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(())
}
