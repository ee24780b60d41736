//! `qforge imatrix`: the importance matrix of a model over a calibration text, computed as llama.cpp's
//! `llama-imatrix` does, written with [`crate::quant::imatrix`] for `qforge quantize --imatrix`.
//!
//! The text is tokenized and cut as `llama-perplexity` does ([`ChunkPlan`] under
//! [`Protocol::LlamaCpp`]): non-overlapping chunks of `ctx` tokens, each run from an empty KV cache
//! with its first token replaced by BOS when the vocabulary adds one. Each chunk runs through
//! [`Model::forward_observed`] without logits, and [`Collector`] adds up, for every linear weight of
//! every block, `Σ x²` per input column over the chunk's tokens and the number of tokens. As in
//! `llama-imatrix`:
//! - every weight has its own entry, also where several share one input (q/k/v, gate/up);
//! - the output head is not collected (`llama-imatrix` collects it only with `--process-output`);
//! - chunks under 16 tokens are refused, since `llama-imatrix` ignores batches that small;
//! - metadata: `imatrix.chunk_size` is `ctx`, `imatrix.chunk_count` the chunks run, and
//!   `imatrix.datasets` the text file as it was named.
//!
//! `llama-imatrix` accumulates in f32; the sums here are f64 (rounded to f32 when written), added in
//! token order whatever the thread count, so the file is deterministic.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use formats::output::{ensure_distinct, AtomicFile};
use serde::Serialize;

use super::perplexity::{self, ChunkPlan, Protocol};
use crate::model::ModelSource;
use crate::progress::Progress;
use crate::quant::{Imatrix, ImatrixEntry};
use crate::runtime::forward::{BlockLinear, LinearObserver};
use crate::runtime::Model;

/// `llama-imatrix` skips matrix products over fewer rows than this.
pub const MIN_CTX: usize = 16;

/// The file layout to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ImatrixFormat {
    /// llama.cpp's current GGUF layout (raw sums and counts).
    Gguf,
    /// llama.cpp's legacy `.dat` layout (means scaled by the chunk count).
    Dat,
}

impl ImatrixFormat {
    /// `.dat` files get the legacy layout, anything else GGUF (`llama-imatrix`'s default).
    pub fn for_path(path: &Path) -> Self {
        if path.extension().is_some_and(|e| e == "dat") {
            Self::Dat
        } else {
            Self::Gguf
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gguf => "GGUF",
            Self::Dat => "legacy .dat",
        }
    }

    pub fn write(self, imatrix: &Imatrix, path: &Path) -> Result<()> {
        match self {
            Self::Gguf => imatrix.write_gguf(path),
            Self::Dat => imatrix.write_legacy(path),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ImatrixOptions {
    /// Tokens per chunk.
    pub ctx: usize,
    /// At most this many chunks (default: as many as the text fills).
    pub chunks: Option<usize>,
    /// Output layout (default: [`ImatrixFormat::for_path`]).
    pub format: Option<ImatrixFormat>,
    pub progress: Progress,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImatrixReport {
    pub output: PathBuf,
    pub format: ImatrixFormat,
    /// Weights with an entry.
    pub entries: usize,
    pub ctx: usize,
    pub chunks: usize,
    /// Tokens run through the model (`chunks × ctx`), which is each entry's count.
    pub tokens: usize,
    /// Time of the chunk loop, excluding loading, tokenizing and writing.
    pub seconds: f64,
    pub tokens_per_second: f64,
}

impl ImatrixReport {
    pub fn render(&self) -> String {
        format!(
            "wrote {} ({}, {} entries, {} chunks of {} tokens) in {:.1} s, {:.1} tokens/s\n",
            self.output.display(),
            self.format.name(),
            self.entries,
            self.chunks,
            self.ctx,
            self.seconds,
            self.tokens_per_second
        )
    }
}

/// Running `Σ x²` per input column and row count of every block linear weight.
pub struct Collector {
    /// Indexed by `layer · 7 + linear`, `linear` in [`BlockLinear::ALL`] order.
    accumulators: Vec<Accumulator>,
}

struct Accumulator {
    sums: Vec<f64>,
    rows: u64,
}

impl Collector {
    pub fn new(model: &Model) -> Self {
        let accumulators = model
            .layers
            .iter()
            .flat_map(|layer| BlockLinear::ALL.map(|linear| linear.of(layer).cols()))
            .map(|columns| Accumulator { sums: vec![0.0; columns], rows: 0 })
            .collect();
        Self { accumulators }
    }

    /// The statistics under their GGUF weight names, as an [`Imatrix`] with no metadata.
    pub fn into_imatrix(self) -> Imatrix {
        let entries = self
            .accumulators
            .into_iter()
            .enumerate()
            .map(|(i, acc)| {
                let (layer, linear) = (i / BlockLinear::ALL.len(), BlockLinear::ALL[i % BlockLinear::ALL.len()]);
                let entry = ImatrixEntry { sums: acc.sums.iter().map(|&s| s as f32).collect(), counts: vec![acc.rows] };
                (format!("blk.{layer}.{}", linear.gguf_name()), entry)
            })
            .collect();
        Imatrix { entries, ..Imatrix::default() }
    }
}

impl LinearObserver for Collector {
    fn observe(&mut self, layer: usize, linear: BlockLinear, x: &[f32]) {
        let acc = &mut self.accumulators[layer * BlockLinear::ALL.len() + linear as usize];
        let columns = acc.sums.len();
        for row in x.chunks_exact(columns) {
            acc.sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64 * v as f64);
        }
        acc.rows += (x.len() / columns) as u64;
    }
}

/// Runs the planned chunks through `model` and returns what they fed every block linear weight;
/// `on_chunk(index)` is called after each chunk.
pub fn collect(model: &Model, tokens: &[u32], plan: &ChunkPlan, mut on_chunk: impl FnMut(usize)) -> Result<Collector> {
    let mut collector = Collector::new(model);
    let mut cache = model.new_cache(plan.ctx);
    for index in 0..plan.chunks {
        cache.clear();
        model.forward_observed(&mut cache, &plan.input(tokens, index), 0..0, &mut collector)?;
        on_chunk(index);
    }
    Ok(collector)
}

/// Refuses what `llama-imatrix` would not compute, before anything is loaded.
fn check_options(opts: &ImatrixOptions) -> Result<()> {
    if opts.ctx < MIN_CTX {
        bail!("--ctx {} is too short: llama-imatrix ignores batches under {MIN_CTX} tokens", opts.ctx);
    }
    if opts.chunks == Some(0) {
        bail!("--chunks 0 collects nothing (at least 1)");
    }
    Ok(())
}

/// Computes the importance matrix of the model at `model_path` over the text file `text_path` and
/// writes it to `output`.
pub fn run(model_path: &Path, text_path: &Path, output: &Path, opts: &ImatrixOptions) -> Result<ImatrixReport> {
    check_options(opts)?;
    ensure_distinct(model_path, output)?;
    ensure_distinct(text_path, output)?;
    // An output that cannot be written fails now, not after the whole computation.
    drop(AtomicFile::create(output)?);
    let source = ModelSource::open(model_path)?;
    let (tokens, bos) = perplexity::tokenize(&source, text_path)?;
    let model = Model::load(&source)?;
    let plan = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), opts.ctx, opts.chunks, bos)
        .with_context(|| format!("{}", text_path.display()))?;

    let bar = opts.progress.count_bar("imatrix", plan.chunks as u64);
    let start = Instant::now();
    let collector = collect(&model, &tokens, &plan, |_| bar.inc(1))?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let mut imatrix = collector.into_imatrix();
    imatrix.datasets = vec![text_path.display().to_string()];
    imatrix.chunk_count = u32::try_from(plan.chunks).context("too many chunks for the imatrix's 32-bit count")?;
    imatrix.chunk_size = u32::try_from(plan.ctx).context("--ctx does not fit the imatrix's 32-bit chunk size")?;
    let format = opts.format.unwrap_or(ImatrixFormat::for_path(output));
    format.write(&imatrix, output)?;
    let tokens = plan.chunks * plan.ctx;
    Ok(ImatrixReport {
        output: output.to_path_buf(),
        format,
        entries: imatrix.entries.len(),
        ctx: plan.ctx,
        chunks: plan.chunks,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use formats::GgmlType;

    use super::*;
    use crate::model::Architecture;
    use crate::runtime::synthetic::{self, Rng, Synthetic};

    fn tokens(n: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng(seed);
        (0..n).map(|_| (rng.next_u64() % 256) as u32).collect()
    }

    fn rms_norm(x: &[f64], weight: &[f32]) -> Vec<f64> {
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
        x.iter().zip(weight).map(|(v, &w)| v / rms * w as f64).collect()
    }

    /// `x · Wᵀ` with `W` in Hugging Face row order.
    fn matvec(m: &Synthetic, name: &str, x: &[f64]) -> Vec<f64> {
        m.values(name).chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(&w, v)| w as f64 * v).sum()).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], what: &str) {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * scale, "{what}[{i}]: {g} vs {w}");
        }
    }

    /// Every input the forward pass showed, in order.
    #[derive(Default)]
    struct Recorder(Vec<(usize, BlockLinear, Vec<f32>)>);

    impl LinearObserver for Recorder {
        fn observe(&mut self, layer: usize, linear: BlockLinear, x: &[f32]) {
            self.0.push((layer, linear, x.to_vec()));
        }
    }

    /// The observed inputs are the model's: the first layer's is the normalized embedding, each
    /// later one follows from the previous ones through the weights and the residual stream.
    #[test]
    fn observed_inputs_follow_the_residual_stream() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 5);
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let toks = tokens(20, 3);
        let mut recorder = Recorder::default();
        let mut cache = model.new_cache(toks.len());
        let logits = model.forward_observed(&mut cache, &toks, 0..toks.len(), &mut recorder).unwrap();
        assert_eq!(logits, model.forward(&mut model.new_cache(toks.len()), &toks, 0..toks.len()).unwrap());
        let order: Vec<_> = recorder.0.iter().map(|(l, linear, _)| (*l, *linear)).collect();
        let want: Vec<_> = (0..2).flat_map(|l| BlockLinear::ALL.map(|linear| (l, linear))).collect();
        assert_eq!(order, want);

        let (h, ffn) = (m.config.hidden_size, m.config.intermediate_size);
        let input = |l: usize, linear: BlockLinear| &recorder.0[l * 7 + linear as usize].2;
        for (t, &tok) in toks.iter().enumerate() {
            let row =
                |x: &[f32], width: usize| -> Vec<f64> { x[t * width..][..width].iter().map(|&v| v as f64).collect() };
            let mut x: Vec<f64> =
                m.values("model.embed_tokens.weight")[tok as usize * h..][..h].iter().map(|&v| v as f64).collect();
            for l in 0..2 {
                let p = |s: &str| format!("model.layers.{l}.{s}");
                let attn_in = rms_norm(&x, m.values(&p("input_layernorm.weight")));
                for linear in [BlockLinear::AttnQ, BlockLinear::AttnK, BlockLinear::AttnV] {
                    assert_close(&row(input(l, linear), h), &attn_in, &format!("token {t}, layer {l}, {linear:?}"));
                }
                let att = row(input(l, BlockLinear::AttnOutput), h);
                x.iter_mut().zip(matvec(&m, &p("self_attn.o_proj.weight"), &att)).for_each(|(a, b)| *a += b);
                let ffn_in = rms_norm(&x, m.values(&p("post_attention_layernorm.weight")));
                for linear in [BlockLinear::FfnGate, BlockLinear::FfnUp] {
                    assert_close(&row(input(l, linear), h), &ffn_in, &format!("token {t}, layer {l}, {linear:?}"));
                }
                let gate = matvec(&m, &p("mlp.gate_proj.weight"), &ffn_in);
                let up = matvec(&m, &p("mlp.up_proj.weight"), &ffn_in);
                let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                assert_close(&row(input(l, BlockLinear::FfnDown), ffn), &act, &format!("token {t}, layer {l}, down"));
                x.iter_mut().zip(matvec(&m, &p("mlp.down_proj.weight"), &act)).for_each(|(a, b)| *a += b);
            }
        }
    }

    /// Chunks restart from an empty cache with BOS first, every weight gets its own entry, and each
    /// entry sums the squares of its inputs over all chunks.
    #[test]
    fn collector_sums_squares_over_every_chunk() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, false, false), GgmlType::Q8_0, 6);
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let toks = tokens(50, 4);
        let (ctx, bos) = (16, Some(9));
        let plan = ChunkPlan::new(Protocol::LlamaCpp, toks.len(), ctx, Some(2), bos).unwrap();
        let mut seen = Vec::new();
        let imatrix = collect(&model, &toks, &plan, |i| seen.push(i)).unwrap().into_imatrix();
        assert_eq!(seen, [0, 1]);

        let mut want: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for chunk in 0..2 {
            let mut input = toks[chunk * ctx..(chunk + 1) * ctx].to_vec();
            input[0] = 9;
            let mut recorder = Recorder::default();
            model.forward_observed(&mut model.new_cache(ctx), &input, 0..0, &mut recorder).unwrap();
            for (l, linear, x) in recorder.0 {
                let sums = want.entry(format!("blk.{l}.{}", linear.gguf_name())).or_default();
                sums.resize(linear.of(&model.layers[l]).cols(), 0.0);
                for row in x.chunks_exact(sums.len()) {
                    sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64 * v as f64);
                }
            }
        }
        assert_eq!(imatrix.entries.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        assert_eq!(imatrix.entries.len(), 14);
        for (name, entry) in &imatrix.entries {
            assert_eq!(entry.counts, [32], "{name}: two chunks of 16 tokens");
            let got: Vec<f64> = entry.sums.iter().map(|&s| s as f64).collect();
            assert_close(&got, &want[name], name);
            assert!(entry.sums.iter().all(|&s| s > 0.0), "{name}");
        }
        let e = |n: &str| &imatrix.entries[n].sums;
        assert_eq!(e("blk.1.attn_q.weight"), e("blk.1.attn_v.weight"), "q, k and v share their input");
        assert_eq!(e("blk.1.ffn_gate.weight"), e("blk.1.ffn_up.weight"), "so do gate and up");
    }

    #[test]
    fn options_llama_imatrix_would_refuse_are_errors() {
        let opts = |ctx, chunks| ImatrixOptions { ctx, chunks, format: None, progress: Progress { quiet: true } };
        let err = check_options(&opts(8, None)).unwrap_err().to_string();
        assert!(err.contains("--ctx 8") && err.contains("16"), "{err}");
        let err = check_options(&opts(64, Some(0))).unwrap_err().to_string();
        assert!(err.contains("--chunks 0"), "{err}");
        assert!(check_options(&opts(16, Some(1))).is_ok());
    }

    #[test]
    fn the_format_follows_the_extension_unless_given() {
        assert_eq!(ImatrixFormat::for_path(Path::new("a/imatrix.dat")), ImatrixFormat::Dat);
        assert_eq!(ImatrixFormat::for_path(Path::new("imatrix.gguf")), ImatrixFormat::Gguf);
        assert_eq!(ImatrixFormat::for_path(Path::new("imatrix")), ImatrixFormat::Gguf);
    }
}
