//! Perplexity, chunked the way llama.cpp's `llama-perplexity` does it or the way the GPTQ/AWQ papers
//! do ([`Protocol`]), and the chunk loop ([`ChunkPlan`], [`for_each_chunk`]) that the model
//! comparisons of [`super::kld`] share.
//!
//! The whole text is tokenized once (BOS first when the vocabulary adds one) and cut into
//! non-overlapping chunks of `ctx` tokens, each run from an empty KV cache.
//! - [`Protocol::LlamaCpp`]: each chunk's first token is replaced by BOS when the vocabulary adds one,
//!   and only the second half is scored: the logits at positions `ctx/2 .. ctx-2` predict the tokens
//!   at `ctx/2 + 1 .. ctx-1`, so every scored token has at least half a context before it.
//! - [`Protocol::Gptq`]: GPTQ's `eval` slices `input_ids` into windows and scores all of each: the
//!   logits at `0 .. ctx-2` predict the tokens at `1 .. ctx-1`. No BOS is inserted (the tokenizer's
//!   BOS, if any, is only at the start of the text). Its reported `exp(Σ window losses · ctx / (windows
//!   · ctx))` equals `exp(mean NLL)` since every window scores the same count.
//!
//! PPL is `exp(mean NLL)`; its standard error is `PPL · sqrt(var(NLL) / (count − 1))`, as llama.cpp
//! reports it.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::model::ModelSource;
use crate::runtime::math;
use crate::runtime::{self, KvCache, Model};

/// How the text is cut into chunks and which positions are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `llama-perplexity`: BOS-started chunks, second half scored.
    LlamaCpp,
    /// The GPTQ/AWQ papers: plain windows, every position scored.
    Gptq,
}

impl Protocol {
    /// The context each protocol is usually quoted at.
    pub fn default_ctx(self) -> usize {
        match self {
            Protocol::LlamaCpp => 512,
            Protocol::Gptq => 2048,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::LlamaCpp => "llama-cpp",
            Protocol::Gptq => "gptq",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    pub protocol: Protocol,
    /// Tokens per chunk (default: [`Protocol::default_ctx`]).
    pub ctx: Option<usize>,
    /// At most this many chunks (default: as many as the text fills).
    pub chunks: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    pub protocol: Protocol,
    pub ppl: f64,
    pub ppl_stderr: f64,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Tokens run through the model (`chunks × ctx`).
    pub tokens_evaluated: usize,
    /// Time of the evaluation loop (forward passes and scoring), excluding loading and tokenizing.
    pub seconds: f64,
    pub tokens_per_second: f64,
}

/// Running sums of the scored tokens' negative log-likelihoods.
#[derive(Clone, Debug, Default)]
pub struct NllStats {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl NllStats {
    pub fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn sum_sq(&self) -> f64 {
        self.sum_sq
    }

    pub fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }

    /// Standard error of [`ppl`](Self::ppl); 0 while there are too few tokens to estimate it.
    pub fn ppl_stderr(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.sum / n;
        let variance = self.sum_sq / n - mean * mean;
        if self.count < 2 || variance <= 0.0 {
            return 0.0;
        }
        (variance / (n - 1.0)).sqrt() * self.ppl()
    }
}

/// Which chunks of a tokenized text are run and which of their positions are scored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    pub protocol: Protocol,
    pub ctx: usize,
    pub chunks: usize,
    /// The token that replaces each chunk's first (llama.cpp protocol with a BOS-adding vocabulary).
    pub bos: Option<u32>,
}

impl ChunkPlan {
    /// Plans the chunks of a text of `n_tokens` tokens; `bos` is the vocabulary's BOS when it adds
    /// one.
    pub fn new(
        protocol: Protocol,
        n_tokens: usize,
        ctx: usize,
        chunks: Option<usize>,
        bos: Option<u32>,
    ) -> Result<Self> {
        if ctx < 4 {
            bail!("a context of {ctx} tokens is too short to score (at least 4)");
        }
        if chunks == Some(0) {
            bail!("scoring 0 chunks measures nothing (--chunks must be at least 1)");
        }
        // llama-perplexity insists on two chunks; GPTQ's eval runs whatever whole windows there are.
        let needed = match protocol {
            Protocol::LlamaCpp => 2 * ctx,
            Protocol::Gptq => ctx,
        };
        if n_tokens < needed {
            bail!("the text has {n_tokens} tokens; a context of {ctx} needs at least {needed}");
        }
        let chunks = (n_tokens / ctx).min(chunks.unwrap_or(usize::MAX));
        let bos = bos.filter(|_| protocol == Protocol::LlamaCpp);
        Ok(Self { protocol, ctx, chunks, bos })
    }

    /// The first position whose logits are scored.
    pub fn first_scored(&self) -> usize {
        match self.protocol {
            Protocol::LlamaCpp => self.ctx / 2,
            Protocol::Gptq => 0,
        }
    }

    /// Scored positions per chunk: `first_scored .. ctx-1`.
    pub fn scored_per_chunk(&self) -> usize {
        self.ctx - 1 - self.first_scored()
    }

    /// The tokens chunk `index` runs: its slice of the text, the first replaced by BOS when planned.
    pub fn input(&self, tokens: &[u32], index: usize) -> Vec<u32> {
        let mut chunk = tokens[index * self.ctx..(index + 1) * self.ctx].to_vec();
        if let Some(b) = self.bos {
            chunk[0] = b;
        }
        chunk
    }

    /// The tokens the scored logits of chunk `index` predict (the text's, never the BOS).
    pub fn targets<'t>(&self, tokens: &'t [u32], index: usize) -> &'t [u32] {
        &tokens[index * self.ctx + self.first_scored() + 1..(index + 1) * self.ctx]
    }

    /// The scored logits of chunk `index` (`scored_per_chunk × vocab`), from an emptied `cache`.
    pub fn logits(&self, model: &Model, cache: &mut KvCache, tokens: &[u32], index: usize) -> Result<Vec<f32>> {
        cache.clear();
        model.forward(cache, &self.input(tokens, index), self.first_scored()..self.ctx - 1)
    }
}

/// Runs every planned chunk through `model` and hands `each(index, targets, logits)` the chunk's
/// scored logits and the tokens they predict; returns the seconds spent.
pub fn for_each_chunk(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    mut each: impl FnMut(usize, &[u32], &[f32]) -> Result<()>,
) -> Result<f64> {
    let mut cache = model.new_cache(plan.ctx);
    let start = Instant::now();
    for index in 0..plan.chunks {
        let logits = plan.logits(model, &mut cache, tokens, index)?;
        each(index, plan.targets(tokens, index), &logits)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// `−log softmax(logits)[target]`, computed as llama.cpp does: f32 differences from the maximum,
/// exponentials summed in f64.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let (max, sum_exp) = math::softmax_normalizer(logits);
    -((logits[target as usize] - max) as f64 - sum_exp.ln())
}

/// Scores the planned chunks; `on_chunk(index, stats)` sees the running sums after each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    mut on_chunk: impl FnMut(usize, &NllStats),
) -> Result<PerplexityReport> {
    let vocab = model.config.vocab_size;
    let mut stats = NllStats::default();
    let seconds = for_each_chunk(model, tokens, plan, |index, targets, logits| {
        let nlls: Vec<f64> = logits.par_chunks_exact(vocab).zip(targets).map(|(row, &t)| token_nll(row, t)).collect();
        nlls.into_iter().for_each(|nll| stats.add(nll));
        on_chunk(index, &stats);
        Ok(())
    })?;
    Ok(report(plan, &stats, seconds))
}

/// The report of scored sums `stats` over `plan`.
pub fn report(plan: &ChunkPlan, stats: &NllStats, seconds: f64) -> PerplexityReport {
    let tokens_evaluated = plan.chunks * plan.ctx;
    PerplexityReport {
        protocol: plan.protocol,
        ppl: stats.ppl(),
        ppl_stderr: stats.ppl_stderr(),
        ctx: plan.ctx,
        chunks: plan.chunks,
        tokens_scored: stats.count(),
        tokens_evaluated,
        seconds,
        tokens_per_second: tokens_evaluated as f64 / seconds,
    }
}

/// The text to score. A `.jsonl` file gives its rows' `text` fields joined with `"\n\n"` (how GPTQ
/// joins wikitext-2's rows); any other file its content, one trailing newline dropped (as
/// `llama-perplexity -f` reads it).
pub fn load_text(path: &Path) -> Result<String> {
    let mut text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read text", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        return jsonl_text(&text).with_context(|| format!("{}", path.display()));
    }
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

fn jsonl_text(content: &str) -> Result<String> {
    let mut rows = Vec::new();
    for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: not a JSON object", i + 1))?;
        match value.get("text").and_then(|t| t.as_str()) {
            Some(t) => rows.push(t.to_string()),
            None => bail!("line {}: no string field \"text\"", i + 1),
        }
    }
    Ok(rows.join("\n\n"))
}

/// The text file's tokens under `source`'s tokenizer, and the BOS a chunk may start with (the
/// vocabulary's, when it adds one).
pub fn tokenize(source: &ModelSource, text_path: &Path) -> Result<(Vec<u32>, Option<u32>)> {
    let tokenizer = runtime::tokenizer(source)?;
    let text = load_text(text_path)?;
    let tokens = tokenizer.encode(&text).with_context(|| format!("{}", text_path.display()))?;
    Ok((tokens, tokenizer.options().bos.filter(|_| tokenizer.options().add_bos)))
}

/// Opens the model, tokenizes the text file and runs [`perplexity`].
pub fn run(
    model_path: &Path,
    text_path: &Path,
    opts: &PerplexityOptions,
    on_chunk: impl FnMut(usize, &NllStats),
) -> Result<PerplexityReport> {
    let source = ModelSource::open(model_path)?;
    let (tokens, bos) = tokenize(&source, text_path)?;
    let model = Model::load(&source)?;
    let plan = plan(opts, &tokens, bos).with_context(|| format!("{}", text_path.display()))?;
    perplexity(&model, &tokens, &plan, on_chunk)
}

/// [`ChunkPlan::new`] with the options' defaults filled in.
pub fn plan(opts: &PerplexityOptions, tokens: &[u32], bos: Option<u32>) -> Result<ChunkPlan> {
    let ctx = opts.ctx.unwrap_or(opts.protocol.default_ctx());
    ChunkPlan::new(opts.protocol, tokens.len(), ctx, opts.chunks, bos)
}

#[cfg(test)]
mod tests {
    use formats::GgmlType;

    use super::*;
    use crate::model::Architecture;
    use crate::runtime::synthetic::{self, Rng};

    #[test]
    fn llama_cpp_chunks_start_with_bos_and_gptq_windows_do_not() {
        let tokens: Vec<u32> = (10..30).collect();
        let llama = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), 8, None, Some(1)).unwrap();
        assert_eq!(llama.input(&tokens, 1), [1, 19, 20, 21, 22, 23, 24, 25]);
        assert_eq!(llama.targets(&tokens, 1), [23, 24, 25], "positions 4..6 predict 5..7");
        let gptq = ChunkPlan::new(Protocol::Gptq, tokens.len(), 8, None, Some(1)).unwrap();
        assert_eq!(gptq.input(&tokens, 1), (18..26).collect::<Vec<_>>());
        assert_eq!(gptq.targets(&tokens, 1), (19..26).collect::<Vec<_>>(), "positions 0..6 predict 1..7");
        assert_eq!((llama.chunks, gptq.chunks), (2, 2));
        let err = ChunkPlan::new(Protocol::LlamaCpp, 15, 8, None, None).unwrap_err().to_string();
        assert!(err.contains("needs at least 16"), "{err}");
        assert_eq!(ChunkPlan::new(Protocol::Gptq, 15, 8, None, None).unwrap().chunks, 1, "one whole window");
    }

    #[test]
    fn jsonl_rows_are_joined_with_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        std::fs::write(&path, "{\"text\": \"a\"}\n\n{\"text\": \" b\\n\", \"id\": 2}\n").unwrap();
        assert_eq!(load_text(&path).unwrap(), "a\n\n b\n");
        std::fs::write(&path, "{\"text\": \"a\"}\n{\"body\": 1}\n").unwrap();
        let err = format!("{:#}", load_text(&path).unwrap_err());
        assert!(err.contains("line 2") && err.contains(&path.display().to_string()), "{err}");
        let txt = dir.path().join("plain.txt");
        std::fs::write(&txt, "x\n\n").unwrap();
        assert_eq!(load_text(&txt).unwrap(), "x\n", "one trailing newline dropped");
    }

    #[test]
    fn token_nll_is_the_negative_log_softmax() {
        let mut rng = Rng(3);
        let logits: Vec<f32> = (0..1000).map(|_| 20.0 * rng.f32()).collect();
        let log_sum: f64 = logits.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        for target in [0u32, 17, 999] {
            let want = log_sum - logits[target as usize] as f64;
            assert!((token_nll(&logits, target) - want).abs() < 1e-5, "{target}");
        }
        assert!((token_nll(&[3.0; 64], 5) - 64f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn stats_give_ppl_and_its_standard_error() {
        let nlls = [2.0, 3.5, 1.25, 4.0, 2.75];
        let mut stats = NllStats::default();
        nlls.iter().for_each(|&x| stats.add(x));
        let n = nlls.len() as f64;
        let mean = nlls.iter().sum::<f64>() / n;
        let population_variance = nlls.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!((stats.ppl() - mean.exp()).abs() < 1e-12);
        assert!((stats.ppl_stderr() - mean.exp() * (population_variance / (n - 1.0)).sqrt()).abs() < 1e-9);
        let mut one = NllStats::default();
        one.add(1.0);
        assert_eq!(one.ppl_stderr(), 0.0);
    }

    /// Both protocols' chunking, BOS replacement and scored positions, checked against the f64
    /// reference forward pass run on each chunk by hand.
    #[test]
    fn perplexity_scores_the_planned_positions() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 9);
        let mut rng = Rng(21);
        let tokens: Vec<u32> = (0..27).map(|_| (rng.next_u64() % 256) as u32).collect();
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let ctx = 8;
        for (protocol, first, bos) in [(Protocol::LlamaCpp, ctx / 2, Some(7)), (Protocol::Gptq, 0, None)] {
            let plan = ChunkPlan::new(protocol, tokens.len(), ctx, None, Some(7)).unwrap();
            let mut seen = Vec::new();
            let report = perplexity(&model, &tokens, &plan, |i, s| seen.push((i, s.count()))).unwrap();
            let per_chunk = ctx - 1 - first;
            assert_eq!(seen, [(0, per_chunk), (1, 2 * per_chunk), (2, 3 * per_chunk)], "{protocol:?}");

            let mut want = NllStats::default();
            for chunk in tokens.chunks_exact(ctx) {
                let mut input = chunk.to_vec();
                if let Some(b) = bos {
                    input[0] = b;
                }
                let logits = synthetic::reference_logits(&m, &input);
                for pos in first..ctx - 1 {
                    let row = &logits[pos];
                    let log_sum = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                    want.add(log_sum - row[chunk[pos + 1] as usize]);
                }
            }
            assert!((report.ppl / want.ppl() - 1.0).abs() < 1e-5, "{protocol:?}: {} vs {}", report.ppl, want.ppl());
            assert!((report.ppl_stderr / want.ppl_stderr() - 1.0).abs() < 1e-3);
            assert_eq!((report.chunks, report.tokens_scored, report.tokens_evaluated), (3, 3 * per_chunk, 24));
        }
        let limited = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), ctx, Some(2), None).unwrap();
        assert_eq!(perplexity(&model, &tokens, &limited, |_, _| {}).unwrap().chunks, 2);
        let err = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), ctx, Some(0), None).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn a_model_without_a_vocabulary_cannot_tokenize() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 10);
        let text = m.gguf.with_extension("txt");
        std::fs::write(&text, "some text").unwrap();
        let opts = PerplexityOptions { protocol: Protocol::LlamaCpp, ctx: Some(8), chunks: None };
        let err = format!("{:#}", run(&m.gguf, &text, &opts, |_, _| {}).unwrap_err());
        assert!(err.contains("carries no tokenizer") && err.contains(&m.gguf.display().to_string()), "{err}");
    }
}
