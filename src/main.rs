//! The `qforge` command line: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use formats::GgmlType;
use qforge::convert::{self, ConvertOptions, FloatType, Target};
use qforge::eval::logits_file::LogitsForm;
use qforge::progress::Progress;
use qforge::quant::method::{CalibArgs, Format, GridArgs, Method, MethodOptions};
use qforge::quant::{Preset, QuantizeOptions, TensorTypeRule};

#[derive(Parser)]
#[command(name = "qforge", version, about = "Convert, quantize, merge and verify small LLM checkpoints")]
struct Cli {
    /// Worker threads (default: all cores). Results are identical at any thread count.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a GGUF file or safetensors checkpoint holds.
    Inspect {
        /// A .gguf file, a .safetensors file, an index.json, or an HF model directory.
        path: PathBuf,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert an HF model directory to GGUF, or a GGUF file to an HF model directory, or a PEFT adapter
    /// directory to a llama.cpp LoRA GGUF.
    Convert {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Output format (default: the other one).
        #[arg(long, value_enum)]
        to: Option<Target>,
        /// Float type of the output's matrices (default: the input's, f32 for quantized input).
        #[arg(long, value_enum)]
        dtype: Option<FloatType>,
        /// Split safetensors output into shards of at most this size (e.g. 5GB, 500MiB).
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Quantize a model (HF directory or GGUF): to a GGUF file with a llama.cpp preset, or with GPTQ, AWQ
    /// or round-to-nearest to a GPTQ/AWQ HF directory.
    Quantize {
        /// An HF model directory (F32/F16/BF16) or a GGUF file.
        input: PathBuf,
        /// The GGUF file or HF directory to write.
        #[arg(short, long, required_unless_present = "dry_run")]
        output: Option<PathBuf>,
        /// Quantization method.
        #[arg(long, value_enum, default_value_t = Method::Rtn)]
        method: Method,
        /// Output format (default: gguf with --type, else the method's own).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// GGUF preset: Q2_K, Q3_K_S/M/L, Q4_0, Q4_1, Q4_K_S/M, Q5_0, Q5_1, Q5_K_S/M, Q6_K, Q8_0, IQ4_NL,
        /// IQ4_XS, F16, BF16, F32.
        #[arg(long = "type", value_parser = parse_preset)]
        preset: Option<Preset>,
        /// Importance matrix (llama.cpp GGUF or legacy .dat) to weight the quantization error.
        #[arg(long, requires = "preset")]
        imatrix: Option<PathBuf>,
        /// Give tensors whose name matches REGEX this type (repeatable; the first match wins).
        #[arg(
            long = "tensor-type",
            value_name = "REGEX=TYPE",
            value_parser = TensorTypeRule::parse,
            requires = "preset"
        )]
        tensor_types: Vec<TensorTypeRule>,
        /// Type of output.weight.
        #[arg(long, value_parser = parse_ggml_type, requires = "preset")]
        output_type: Option<GgmlType>,
        /// Type of token_embd.weight.
        #[arg(long, value_parser = parse_ggml_type, requires = "preset")]
        token_embedding_type: Option<GgmlType>,
        /// Keep output.weight as it is.
        #[arg(long, requires = "preset")]
        leave_output_tensor: bool,
        /// Give every matrix the preset's type (no mixes).
        #[arg(long, requires = "preset")]
        pure: bool,
        /// Allow quantizing tensors that are already quantized (worse than quantizing from F16/F32).
        #[arg(long, requires = "preset")]
        allow_requantize: bool,
        /// Print the per-tensor plan and sizes; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        grid: GridArgs,
        #[command(flatten)]
        calib: CalibArgs,
    },
    /// Merge LoRA adapters (PEFT directories or llama.cpp LoRA GGUFs) into a model (HF directory or GGUF).
    MergeLora {
        /// The base model: an HF directory, or a GGUF file (float or quantized).
        base: PathBuf,
        /// An adapter and its weight (default 1); repeat it to merge the weighted sum of several.
        #[arg(long = "adapter", value_name = "PATH[:WEIGHT]", required = true, value_parser = qforge::lora::AdapterSpec::parse)]
        adapters: Vec<qforge::lora::AdapterSpec>,
        /// Output: an HF directory for an HF base, a GGUF file for a GGUF base.
        #[arg(short, long)]
        output: PathBuf,
        /// Float type of the merged tensors (HF base: of every float tensor). Default: each tensor's own.
        #[arg(long, value_enum)]
        dtype: Option<FloatType>,
        /// GGUF base: type of the merged matrices (e.g. Q8_0). Default: each tensor's own type.
        #[arg(long = "type", value_parser = parse_ggml_type)]
        ggml_type: Option<GgmlType>,
        /// Adapter tensors PEFT would not load are errors, not warnings.
        #[arg(long)]
        strict: bool,
        /// HF output: split the safetensors into shards of at most this size.
        #[arg(long, value_parser = parse_size)]
        max_shard_size: Option<u64>,
        /// GPTQ/AWQ base: put the merged linears back on its grid by GPTQ with the base's config on
        /// calibration activations (default for GPTQ bases) or by rounding to nearest (AWQ bases: the only way).
        #[arg(long, value_enum)]
        requantize: Option<qforge::lora::Requantize>,
        #[command(flatten)]
        calib: CalibArgs,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Importance matrix of a model over calibration text, computed as llama.cpp's llama-imatrix does.
    Imatrix {
        /// A GGUF file or an HF model directory.
        model: PathBuf,
        /// The calibration text.
        #[arg(long)]
        calib: PathBuf,
        /// The imatrix file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Tokens per chunk.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Run at most this many chunks.
        #[arg(long)]
        chunks: Option<usize>,
        /// File layout (default: dat for a .dat output, else gguf).
        #[arg(long, value_enum)]
        format: Option<qforge::eval::imatrix::ImatrixFormat>,
    },
    /// Perplexity of a model on a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity {
        /// A GGUF file or an HF model directory.
        model: PathBuf,
        /// The text to score.
        #[arg(long)]
        text: PathBuf,
        #[command(flatten)]
        eval: EvalArgs,
        #[command(flatten)]
        baseline: BaselineArgs,
        /// Save this model's log-probs as a baseline file (llama.cpp's --kl-divergence-base layout).
        #[arg(long, conflicts_with_all = ["baseline", "baseline_logits"])]
        save_logits: Option<PathBuf>,
        /// With --save-logits: keep only the K most likely tokens per position (qforge's compact form).
        #[arg(long, requires = "save_logits")]
        top_k: Option<usize>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// CI regression gate: compare a model with a baseline; exit 1 when a threshold fails.
    Check {
        /// A GGUF file or an HF model directory.
        model: PathBuf,
        /// The text to score.
        #[arg(long)]
        text: PathBuf,
        #[command(flatten)]
        eval: EvalArgs,
        #[command(flatten)]
        baseline: BaselineArgs,
        /// Largest allowed PPL(model)/PPL(base) − 1 ("2%" or "0.02").
        #[arg(long, default_value = "2%", value_parser = qforge::eval::check::parse_fraction)]
        max_ppl_increase: f64,
        /// Largest allowed mean KL divergence (nats per token).
        #[arg(long, default_value_t = 0.05)]
        max_kld: f64,
        /// Smallest allowed share of tokens with the same most likely next token ("90%" or "0.9").
        #[arg(long, default_value = "0.9", value_parser = qforge::eval::check::parse_fraction)]
        min_top1: f64,
        /// Print the verdicts and statistics as JSON.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file.
        #[arg(long)]
        json_report: Option<PathBuf>,
        /// Write a JUnit XML report (a test case per threshold) to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Continue a prompt, streaming the text: greedy at --temp 0, else sampled (top-k, top-p, temperature).
    Generate {
        /// A GGUF file or an HF model directory.
        model: PathBuf,
        /// The text to continue (BOS is added only when the vocabulary says so).
        #[arg(long)]
        prompt: String,
        /// Generate at most this many tokens; stops earlier at an end-of-generation token.
        #[arg(short = 'n', long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature; 0 picks the most likely token.
        #[arg(long, default_value_t = 0.0)]
        temp: f32,
        /// Sample among the K most likely tokens only (0: all); llama.cpp's default.
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        /// Then among the fewest most likely tokens whose probabilities reach P (1: all); llama.cpp's default.
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        /// Random seed: the same seed gives the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print a JSON report (text, token ids, counts, speeds) instead of streaming the text.
        #[arg(long)]
        json: bool,
    },
}

/// How `perplexity` and `check` cut the text into chunks.
#[derive(clap::Args)]
struct EvalArgs {
    /// llama-cpp: llama-perplexity's chunks (second half scored); gptq: the GPTQ/AWQ papers' windows.
    #[arg(long, value_enum, default_value_t = qforge::eval::perplexity::Protocol::LlamaCpp)]
    protocol: qforge::eval::perplexity::Protocol,
    /// Tokens per chunk (default: 512 for llama-cpp, 2048 for gptq; a baseline logits file's own).
    #[arg(long)]
    ctx: Option<usize>,
    /// Score at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
}

/// What `perplexity` and `check` compare the model with.
#[derive(clap::Args)]
struct BaselineArgs {
    /// A baseline model (GGUF file or HF directory), run on the same tokens: report KL divergence etc.
    #[arg(long, conflicts_with = "baseline_logits")]
    baseline: Option<PathBuf>,
    /// A baseline's saved log-probs (llama.cpp's --kl-divergence-base file or qforge's top-k form).
    #[arg(long)]
    baseline_logits: Option<PathBuf>,
}

impl BaselineArgs {
    fn get(self) -> Option<qforge::eval::kld::Baseline> {
        use qforge::eval::kld::Baseline;
        self.baseline.map(Baseline::Model).or(self.baseline_logits.map(Baseline::Logits))
    }
}

impl EvalArgs {
    fn options(&self) -> qforge::eval::perplexity::PerplexityOptions {
        qforge::eval::perplexity::PerplexityOptions { protocol: self.protocol, ctx: self.ctx, chunks: self.chunks }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    formats::safetensors::parse_size(s).ok_or_else(|| format!("invalid size {s:?} (examples: 5GB, 500MiB, 1000000)"))
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::from_name(s).ok_or_else(|| {
        format!(
            "unknown preset {s:?}; choose one of {}",
            Preset::all().map(Preset::name).collect::<Vec<_>>().join(", ")
        )
    })
}

fn parse_ggml_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s).ok_or_else(|| format!("unknown tensor type {s:?} (examples: Q8_0, Q6_K, F16)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match qforge::interrupt::install_handler().and_then(|()| run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global()?;
    }
    let progress = Progress { quiet: cli.quiet };
    match cli.command {
        Command::Inspect { path, tensors, json } => {
            let report = qforge::inspect::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render(tensors)?);
            }
        }
        Command::Convert { input, output, to, dtype, max_shard_size, json } => {
            let target = to.unwrap_or(if input.is_dir() { Target::Gguf } else { Target::Safetensors });
            let opts = ConvertOptions { target, dtype, max_shard_size, progress };
            let report = convert::convert(&input, &output, &opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "output": report.output, "tensors": report.tensors, "bytes": report.bytes_written,
                        "dtype": format!("{:?}", report.dtype).to_lowercase(), "seconds": report.seconds,
                    })
                );
            } else if !cli.quiet {
                eprintln!(
                    "wrote {} ({} tensors, {:.1} MB, {:?}) in {:.2} s",
                    report.output.display(),
                    report.tensors,
                    report.bytes_written as f64 / 1e6,
                    report.dtype,
                    report.seconds
                );
            }
        }
        Command::Quantize {
            input,
            output,
            method,
            format,
            preset,
            imatrix,
            tensor_types,
            output_type,
            token_embedding_type,
            leave_output_tensor,
            pure,
            allow_requantize,
            dry_run,
            grid,
            calib,
        } => {
            let gguf = preset.map(|preset| QuantizeOptions {
                preset,
                imatrix,
                rules: tensor_types,
                output_type,
                token_embedding_type,
                leave_output_tensor,
                pure,
                allow_requantize,
                progress,
            });
            let opts = MethodOptions { method, format, gguf, grid, calib, progress };
            match output {
                Some(output) if !dry_run => {
                    let report = qforge::quant::method::run(&input, &output, &opts)?;
                    if !cli.quiet {
                        eprint!("{}", report.render());
                    }
                }
                _ => print!("{}", qforge::quant::method::dry_run(&input, &opts)?.render()),
            }
        }
        Command::Imatrix { model, calib, output, ctx, chunks, format } => {
            let opts = qforge::eval::imatrix::ImatrixOptions { ctx, chunks, format, progress };
            let report = qforge::eval::imatrix::run(&model, &calib, &output, &opts)?;
            if !cli.quiet {
                eprint!("{}", report.render());
            }
        }
        Command::MergeLora {
            base,
            adapters,
            output,
            dtype,
            ggml_type,
            strict,
            max_shard_size,
            requantize,
            calib,
            json,
        } => {
            let opts = qforge::lora::MergeOptions {
                adapters,
                dtype,
                ggml_type,
                strict,
                max_shard_size,
                requantize,
                calib,
                progress,
            };
            let report = qforge::lora::merge(&base, &output, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Command::Perplexity { model, text, eval, baseline, save_logits, top_k, json } => {
            if let Some(base) = baseline.get() {
                let report = qforge::eval::kld::run(&model, &text, &eval.options(), &base, |i, s| {
                    chunk_progress(cli.quiet, i, s.kld().value)
                })?;
                end_progress(cli.quiet);
                match json {
                    true => println!("{}", serde_json::to_string_pretty(&report)?),
                    false => print!("{}", report.render()),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let progress = |i, stats: &qforge::eval::perplexity::NllStats| chunk_progress(cli.quiet, i, stats.ppl());
            let report = match save_logits {
                Some(out) => {
                    let form = top_k.map_or(LogitsForm::Full, LogitsForm::TopK);
                    qforge::eval::kld::save_logits(&model, &text, &eval.options(), &out, form, progress)?
                }
                None => qforge::eval::perplexity::run(&model, &text, &eval.options(), progress)?,
            };
            end_progress(cli.quiet);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "PPL = {:.4} +/- {:.5} ({} chunks of {}, {} tokens scored; {:.1} tokens/s)",
                    report.ppl,
                    report.ppl_stderr,
                    report.chunks,
                    report.ctx,
                    report.tokens_scored,
                    report.tokens_per_second
                );
            }
        }
        Command::Check {
            model,
            text,
            eval,
            baseline,
            max_ppl_increase,
            max_kld,
            min_top1,
            json,
            json_report,
            junit,
        } => {
            let base = baseline.get().context("check needs --baseline BASE or --baseline-logits FILE")?;
            let report = qforge::eval::kld::run(&model, &text, &eval.options(), &base, |i, s| {
                chunk_progress(cli.quiet, i, s.kld().value)
            })?;
            end_progress(cli.quiet);
            let limits = qforge::eval::check::Thresholds { max_ppl_increase, max_kld, min_top1 };
            let result = qforge::eval::check::check(report, &limits);
            let report_json = serde_json::to_string_pretty(&result)? + "\n";
            if let Some(path) = json_report {
                qforge::eval::check::write_file(&path, &report_json)?;
            }
            if let Some(path) = junit {
                qforge::eval::check::write_file(&path, &result.junit())?;
            }
            match json {
                true => print!("{report_json}"),
                false => print!("{}\n{}", result.report.render(), result.render()),
            }
            return Ok(if result.pass { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Command::Generate { model, prompt, max_tokens, temp, top_k, top_p, seed, json } => {
            let sampling = qforge::eval::generate::SamplingOptions { temperature: temp, top_k, top_p, seed };
            let opts = qforge::eval::generate::GenerateOptions { max_tokens, sampling };
            let report = qforge::eval::generate::run(&model, &prompt, &opts, |piece| print_flushed(piece, json))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!();
            }
            if !cli.quiet {
                eprint!("{}", report.render_stats());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a chunk's running figure (`[3]6.1234,`) as llama-perplexity does.
fn chunk_progress(quiet: bool, index: usize, value: f64) {
    if !quiet {
        eprint!("[{}]{value:.4},", index + 1);
    }
}

fn end_progress(quiet: bool) {
    if !quiet {
        eprintln!();
    }
}

/// Streams generated text as it comes (nothing when the JSON report will carry it).
fn print_flushed(piece: &str, json: bool) -> Result<()> {
    use std::io::Write;
    if !json {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(piece.as_bytes())?;
        stdout.flush()?;
    }
    Ok(())
}
