//! The `qforge` command line: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use formats::GgmlType;
use qforge::convert::{self, ConvertOptions, FloatType, Target};
use qforge::progress::Progress;
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
    /// Quantize a model (HF directory or GGUF) to a GGUF file with a llama.cpp preset.
    Quantize {
        /// An HF model directory (F32/F16/BF16) or a GGUF file.
        input: PathBuf,
        /// The GGUF file to write.
        #[arg(short, long, required_unless_present = "dry_run")]
        output: Option<PathBuf>,
        /// Preset: Q2_K, Q3_K_S/M/L, Q4_0, Q4_1, Q4_K_S/M, Q5_0, Q5_1, Q5_K_S/M, Q6_K, Q8_0, IQ4_NL,
        /// IQ4_XS, F16, BF16, F32.
        #[arg(long = "type", value_parser = parse_preset)]
        preset: Preset,
        /// Importance matrix (llama.cpp GGUF or legacy .dat) to weight the quantization error.
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// Give tensors whose name matches REGEX this type (repeatable; the first match wins).
        #[arg(long = "tensor-type", value_name = "REGEX=TYPE", value_parser = TensorTypeRule::parse)]
        tensor_types: Vec<TensorTypeRule>,
        /// Type of output.weight.
        #[arg(long, value_parser = parse_ggml_type)]
        output_type: Option<GgmlType>,
        /// Type of token_embd.weight.
        #[arg(long, value_parser = parse_ggml_type)]
        token_embedding_type: Option<GgmlType>,
        /// Keep output.weight as it is.
        #[arg(long)]
        leave_output_tensor: bool,
        /// Give every matrix the preset's type (no mixes).
        #[arg(long)]
        pure: bool,
        /// Allow quantizing tensors that are already quantized (worse than quantizing from F16/F32).
        #[arg(long)]
        allow_requantize: bool,
        /// Print the per-tensor plan and sizes; write nothing.
        #[arg(long)]
        dry_run: bool,
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
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a model on a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity {
        /// A GGUF file or an HF model directory.
        model: PathBuf,
        /// The text to score.
        #[arg(long)]
        text: PathBuf,
        /// Tokens per chunk.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Score at most this many chunks.
        #[arg(long)]
        chunks: Option<usize>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    formats::safetensors::parse_size(s).ok_or_else(|| format!("invalid size {s:?} (examples: 5GB, 500MiB, 1000000)"))
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::from_name(s).ok_or_else(|| {
        format!("unknown preset {s:?}; choose one of {}", Preset::all().map(Preset::name).collect::<Vec<_>>().join(", "))
    })
}

fn parse_ggml_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s).ok_or_else(|| format!("unknown tensor type {s:?} (examples: Q8_0, Q6_K, F16)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
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
            preset,
            imatrix,
            tensor_types,
            output_type,
            token_embedding_type,
            leave_output_tensor,
            pure,
            allow_requantize,
            dry_run,
        } => {
            let opts = QuantizeOptions {
                preset,
                imatrix,
                rules: tensor_types,
                output_type,
                token_embedding_type,
                leave_output_tensor,
                pure,
                allow_requantize,
                progress,
            };
            match output {
                Some(output) if !dry_run => {
                    let report = qforge::quant::quantize(&input, &output, &opts)?;
                    if !cli.quiet {
                        eprint!("{}", report.render());
                    }
                }
                _ => print!("{}", qforge::quant::dry_run(&input, &opts)?.render()),
            }
        }
        Command::MergeLora { base, adapters, output, dtype, ggml_type, strict, max_shard_size, json } => {
            let opts = qforge::lora::MergeOptions { adapters, dtype, ggml_type, strict, max_shard_size, progress };
            let report = qforge::lora::merge(&base, &output, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
        }
        Command::Perplexity { model, text, ctx, chunks, json } => {
            let opts = qforge::eval::perplexity::PerplexityOptions { ctx, chunks };
            let report = qforge::eval::perplexity::run(&model, &text, &opts, |i, stats| {
                if !cli.quiet {
                    eprint!("[{}]{:.4},", i + 1, stats.ppl());
                }
            })?;
            if !cli.quiet {
                eprintln!();
            }
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
    }
    Ok(ExitCode::SUCCESS)
}
