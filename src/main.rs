//! The `qforge` command line: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use qforge::convert::{self, ConvertOptions, FloatType, Target};
use qforge::progress::Progress;

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
    /// Convert an HF model directory to GGUF, or a GGUF file to an HF model directory.
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
}

fn parse_size(s: &str) -> Result<u64, String> {
    formats::safetensors::parse_size(s).ok_or_else(|| format!("invalid size {s:?} (examples: 5GB, 500MiB, 1000000)"))
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
    }
    Ok(ExitCode::SUCCESS)
}
