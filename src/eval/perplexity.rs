//! Perplexity with llama.cpp's method (`llama-perplexity`), so the numbers compare directly.
//!
//! The whole text is tokenized once (BOS first when the vocabulary adds one) and cut into
//! non-overlapping chunks of `ctx` tokens; each chunk runs from an empty KV cache, its first token
//! replaced by BOS when the vocabulary adds one. Only the second half is scored: the logits at
//! positions `ctx/2 .. ctx-2` predict the tokens at `ctx/2 + 1 .. ctx-1`, so every scored token has
//! at least half a context before it. PPL is `exp(mean NLL)`; its standard error is
//! `PPL · sqrt(var(NLL) / (count − 1))`, as llama.cpp reports it.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use crate::model::ModelSource;
use crate::runtime::math;
use crate::runtime::{self, Model};

#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    /// Tokens per chunk.
    pub ctx: usize,
    /// At most this many chunks (default: as many as the text fills).
    pub chunks: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
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

/// The tokens of chunk `index`, the first replaced by `bos` when given.
pub fn chunk_tokens(tokens: &[u32], ctx: usize, index: usize, bos: Option<u32>) -> Vec<u32> {
    let mut chunk = tokens[index * ctx..(index + 1) * ctx].to_vec();
    if let Some(b) = bos {
        chunk[0] = b;
    }
    chunk
}

/// `−log softmax(logits)[target]`, computed as llama.cpp does: f32 differences from the maximum,
/// exponentials summed in f64.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let (max, sum_exp) = math::softmax_normalizer(logits);
    -((logits[target as usize] - max) as f64 - sum_exp.ln())
}

/// Scores `tokens` chunk by chunk; `on_chunk(index, stats)` sees the running sums after each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    opts: &PerplexityOptions,
    mut on_chunk: impl FnMut(usize, &NllStats),
) -> Result<PerplexityReport> {
    let ctx = opts.ctx;
    if ctx < 4 {
        bail!("a context of {ctx} tokens is too short to score (at least 4)");
    }
    if opts.chunks == Some(0) {
        bail!("scoring 0 chunks measures nothing (--chunks must be at least 1)");
    }
    if tokens.len() < 2 * ctx {
        bail!("the text has {} tokens; a context of {ctx} needs at least {}", tokens.len(), 2 * ctx);
    }
    let chunks = (tokens.len() / ctx).min(opts.chunks.unwrap_or(usize::MAX));
    let first = ctx / 2;
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache(ctx);
    let mut stats = NllStats::default();
    let start = Instant::now();
    for index in 0..chunks {
        cache.clear();
        let chunk = chunk_tokens(tokens, ctx, index, bos);
        let logits = model.forward(&mut cache, &chunk, first..ctx - 1)?;
        let nlls: Vec<f64> =
            logits.par_chunks_exact(vocab).zip(&chunk[first + 1..]).map(|(row, &t)| token_nll(row, t)).collect();
        nlls.into_iter().for_each(|nll| stats.add(nll));
        on_chunk(index, &stats);
    }
    let seconds = start.elapsed().as_secs_f64();
    let tokens_evaluated = chunks * ctx;
    Ok(PerplexityReport {
        ppl: stats.ppl(),
        ppl_stderr: stats.ppl_stderr(),
        ctx,
        chunks,
        tokens_scored: stats.count(),
        tokens_evaluated,
        seconds,
        tokens_per_second: tokens_evaluated as f64 / seconds,
    })
}

/// Opens the model, tokenizes the text file and runs [`perplexity`]. Like `llama-perplexity -f`, one
/// trailing newline of the file is dropped before tokenizing.
pub fn run(
    model_path: &Path,
    text_path: &Path,
    opts: &PerplexityOptions,
    on_chunk: impl FnMut(usize, &NllStats),
) -> Result<PerplexityReport> {
    let source = ModelSource::open(model_path)?;
    let tokenizer = runtime::tokenizer(&source)?;
    let model = Model::load(&source)?;
    let mut text =
        std::fs::read_to_string(text_path).with_context(|| format!("{}: cannot read text", text_path.display()))?;
    if text.ends_with('\n') {
        text.pop();
    }
    let tokens = tokenizer.encode(&text).with_context(|| format!("{}", text_path.display()))?;
    let bos = tokenizer.options().bos.filter(|_| tokenizer.options().add_bos);
    perplexity(&model, &tokens, bos, opts, on_chunk).with_context(|| format!("{}", text_path.display()))
}

#[cfg(test)]
mod tests {
    use formats::GgmlType;

    use super::*;
    use crate::model::Architecture;
    use crate::runtime::synthetic::{self, Rng};

    #[test]
    fn chunks_start_with_bos_only_when_given() {
        let tokens: Vec<u32> = (10..30).collect();
        assert_eq!(chunk_tokens(&tokens, 8, 1, None), (18..26).collect::<Vec<_>>());
        assert_eq!(chunk_tokens(&tokens, 8, 1, Some(1)), [1, 19, 20, 21, 22, 23, 24, 25]);
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

    /// The chunking, BOS replacement and second-half scoring, checked against the f64 reference
    /// forward pass run on each chunk by hand.
    #[test]
    fn perplexity_scores_the_second_half_of_each_chunk() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 9);
        let mut rng = Rng(21);
        let tokens: Vec<u32> = (0..27).map(|_| (rng.next_u64() % 256) as u32).collect();
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let (ctx, bos) = (8, Some(7));
        let mut seen = Vec::new();
        let opts = PerplexityOptions { ctx, chunks: None };
        let report = perplexity(&model, &tokens, bos, &opts, |i, s| seen.push((i, s.count()))).unwrap();
        assert_eq!(seen, [(0, 3), (1, 6), (2, 9)], "27 tokens fill 3 chunks of 8; positions 4..6 are scored");

        let mut want = NllStats::default();
        for chunk in tokens.chunks_exact(ctx) {
            let mut input = chunk.to_vec();
            input[0] = 7;
            let logits = synthetic::reference_logits(&m, &input);
            for pos in ctx / 2..ctx - 1 {
                let row = &logits[pos];
                let log_sum = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                want.add(log_sum - row[chunk[pos + 1] as usize]);
            }
        }
        assert!((report.ppl / want.ppl() - 1.0).abs() < 1e-5, "{} vs {}", report.ppl, want.ppl());
        assert!((report.ppl_stderr / want.ppl_stderr() - 1.0).abs() < 1e-3);
        assert_eq!((report.chunks, report.tokens_scored, report.tokens_evaluated), (3, 9, 24));

        let limited = perplexity(&model, &tokens, bos, &PerplexityOptions { ctx, chunks: Some(2) }, |_, _| {}).unwrap();
        assert_eq!(limited.chunks, 2);
        let err = perplexity(&model, &tokens[..15], bos, &opts, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("needs at least 16"), "{err}");
        let none = PerplexityOptions { ctx, chunks: Some(0) };
        let err = perplexity(&model, &tokens, bos, &none, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn a_model_without_a_vocabulary_cannot_tokenize() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 10);
        let text = m.gguf.with_extension("txt");
        std::fs::write(&text, "some text").unwrap();
        let opts = PerplexityOptions { ctx: 8, chunks: None };
        let err = format!("{:#}", run(&m.gguf, &text, &opts, |_, _| {}).unwrap_err());
        assert!(err.contains("carries no tokenizer") && err.contains(&m.gguf.display().to_string()), "{err}");
    }
}
