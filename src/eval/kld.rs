//! Comparing a model with a baseline on the same tokens: the statistics of llama.cpp's
//! `llama-perplexity --kl-divergence`, at the same scored positions (those of the [`ChunkPlan`]).
//!
//! The baseline is another model run on the same chunks, or a stored [`logits_file`]. Per scored
//! token ([`compare_token`]):
//! - `KL(base ‖ model) = Σ_i p_base(i) · (log p_base(i) − log p_model(i))`;
//! - top-1 agreement: both argmaxes (first index of the largest logit) are the same token;
//! - `Δp = p_model(next) − p_base(next)`, the change in the probability of the token that follows;
//! - both NLLs, for both PPLs and their ratio.
//!
//! From a full (llama.cpp) file the arithmetic is llama.cpp's own: f32, the baseline decoded from
//! its 16-bit records, and tokens whose baseline log-prob is at or below −16 left out of the sum. From
//! a model it is exact (f64 over the whole vocabulary); from a top-k file, the KLD of the coarsened
//! distributions (a lower bound, see [`logits_file`]). [`KldStats`] sums them as llama.cpp does:
//! means with `sqrt(var / (n − 1))` uncertainties (0 for 10 tokens or fewer), the PPL ratio's with
//! the covariance of both NLLs, interpolated percentiles of the per-token KLDs.
//!
//! Memory: one chunk's logits of each side at a time; per token only its KLD and Δp are kept (for
//! the percentiles).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::logits_file::{self, LogitsForm, LogitsReader, LogitsWriter, StoredChunk, StoredRow};
use super::perplexity::{self, for_each_chunk, ChunkPlan, NllStats, PerplexityOptions, PerplexityReport, Protocol};
use crate::model::ModelSource;
use crate::runtime::{math, KvCache, Model};

/// What the model is compared with.
#[derive(Clone, Debug)]
pub enum Baseline {
    /// A model (GGUF file or HF directory) run on the same tokens.
    Model(PathBuf),
    /// A logits file saved from the baseline (either form).
    Logits(PathBuf),
}

impl Baseline {
    pub fn path(&self) -> &Path {
        match self {
            Baseline::Model(p) | Baseline::Logits(p) => p,
        }
    }
}

/// One scored token's comparison.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenComparison {
    pub kld: f64,
    pub nll: f64,
    pub nll_base: f64,
    pub p_diff: f64,
    pub same_top: bool,
}

/// A baseline's distribution at one position.
pub enum BaseRow<'a> {
    Logits(&'a [f32]),
    Stored(StoredRow<'a>),
}

/// A row's argmax and log-normalizer: `log p(i) = (logit(i) − max) − ln Σ e^(logit − max)`.
struct LogSoftmax {
    argmax: usize,
    max: f32,
    log_sum_exp: f64,
}

impl LogSoftmax {
    fn of(logits: &[f32]) -> Self {
        let (max, sum_exp) = math::softmax_normalizer(logits);
        let argmax = logits.iter().position(|&v| v == max).unwrap_or(0);
        Self { argmax, max, log_sum_exp: sum_exp.ln() }
    }

    fn log_prob(&self, logit: f32) -> f64 {
        (logit - self.max) as f64 - self.log_sum_exp
    }
}

/// Compares the model's `logits` at one position with the baseline's, `target` being the next token.
pub fn compare_token(logits: &[f32], base: &BaseRow, target: u32) -> TokenComparison {
    match base {
        BaseRow::Logits(base) => exact(logits, base, target as usize),
        BaseRow::Stored(StoredRow::Full(row)) => llama_cpp(logits, row, target as usize),
        BaseRow::Stored(StoredRow::TopK(row)) => top_k(logits, row, target as usize),
    }
}

fn exact(logits: &[f32], base: &[f32], target: usize) -> TokenComparison {
    let (m, b) = (LogSoftmax::of(logits), LogSoftmax::of(base));
    let kld = base
        .iter()
        .zip(logits)
        .map(|(&lb, &lm)| {
            let log_p = b.log_prob(lb);
            log_p.exp() * (log_p - m.log_prob(lm))
        })
        .sum();
    let (nll, nll_base) = (-m.log_prob(logits[target]), -b.log_prob(base[target]));
    TokenComparison { kld, nll, nll_base, p_diff: (-nll).exp() - (-nll_base).exp(), same_top: m.argmax == b.argmax }
}

/// llama.cpp's `log_softmax(n_vocab, logits, base_log_prob, tok, kld)`, operation for operation.
fn llama_cpp(logits: &[f32], base: &logits_file::FullRow, target: usize) -> TokenComparison {
    let m = LogSoftmax::of(logits);
    let log_sum_exp = m.log_sum_exp as f32;
    let nll = m.max + log_sum_exp - logits[target];
    let nll_base = -base.log_prob(target);
    let norm = m.max + log_sum_exp;
    let (mut kld, mut argmax_base, mut max_base) = (0f64, 0, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        let log_p = base.log_prob(i);
        if i == 0 || log_p > max_base {
            (max_base, argmax_base) = (log_p, i);
        }
        if log_p > -16.0 {
            kld += (math::exp(log_p) * (log_p - l + norm)) as f64;
        }
    }
    TokenComparison {
        kld,
        nll: nll as f64,
        nll_base: nll_base as f64,
        p_diff: (math::exp(-nll) - math::exp(-nll_base)) as f64,
        same_top: m.argmax == argmax_base,
    }
}

/// The KLD between both distributions coarsened to the stored k tokens and the rest.
fn top_k(logits: &[f32], base: &logits_file::TopKRow, target: usize) -> TokenComparison {
    let m = LogSoftmax::of(logits);
    let mut kld: f64 = base
        .ids
        .iter()
        .zip(base.log_probs)
        .map(|(&id, &log_p)| (log_p as f64).exp() * (log_p as f64 - m.log_prob(logits[id as usize])))
        .sum();
    if base.rest_log_mass > f32::NEG_INFINITY {
        let rest: f64 = logits_file::outside(logits, base.ids).map(|l| math::exp(l - m.max) as f64).sum();
        let log_rest = rest.max(f64::MIN_POSITIVE).ln() - m.log_sum_exp;
        let base_rest = base.rest_log_mass as f64;
        kld += base_rest.exp() * (base_rest - log_rest);
    }
    let (nll, nll_base) = (-m.log_prob(logits[target]), -(base.target_log_prob as f64));
    TokenComparison {
        kld,
        nll,
        nll_base,
        p_diff: (-nll).exp() - (-nll_base).exp(),
        same_top: base.ids.first().is_some_and(|&id| id as usize == m.argmax),
    }
}

/// A mean (or a quantity derived from means) and its standard error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub stderr: f64,
}

/// llama.cpp's `mean_and_uncertainty`.
fn mean_and_uncertainty(sum: f64, sum_sq: f64, count: usize) -> Estimate {
    if count == 0 {
        return Estimate::default();
    }
    let n = count as f64;
    let mean = sum / n;
    let variance = sum_sq / n - mean * mean;
    let stderr = if variance > 0.0 && count > 10 { (variance / (n - 1.0)).sqrt() } else { 0.0 };
    Estimate { value: mean, stderr }
}

/// llama.cpp's `covariance` of two means.
fn covariance(sum_a: f64, sum_b: f64, sum_ab: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sum_ab / n - (sum_a / n) * (sum_b / n)) / (n - 1.0)
}

/// llama.cpp's linearly interpolated percentile of sorted values.
fn percentile(sorted: &[f32], fraction: f64) -> f64 {
    let p = fraction * (sorted.len() - 1) as f64;
    let i = p as usize;
    let (lo, hi) = (sorted[i] as f64, sorted[(i + 1).min(sorted.len() - 1)] as f64);
    (1.0 - (p - i as f64)) * lo + (p - i as f64) * hi
}

/// Running sums of [`TokenComparison`]s, and the per-token KLD and Δp values.
#[derive(Clone, Debug, Default)]
pub struct KldStats {
    nll: NllStats,
    nll_base: NllStats,
    sum_nll_nll_base: f64,
    sum_kld: f64,
    sum_kld2: f64,
    sum_p_diff: f64,
    sum_p_diff2: f64,
    sum_p_diff4: f64,
    same_top: usize,
    kld_values: Vec<f32>,
    p_diff_values: Vec<f32>,
}

impl KldStats {
    pub fn add(&mut self, c: &TokenComparison) {
        self.nll.add(c.nll);
        self.nll_base.add(c.nll_base);
        self.sum_nll_nll_base += c.nll * c.nll_base;
        self.sum_kld += c.kld;
        self.sum_kld2 += c.kld * c.kld;
        self.sum_p_diff += c.p_diff;
        self.sum_p_diff2 += c.p_diff * c.p_diff;
        self.sum_p_diff4 += c.p_diff.powi(4);
        self.same_top += c.same_top as usize;
        self.kld_values.push(c.kld as f32);
        self.p_diff_values.push(c.p_diff as f32);
    }

    pub fn count(&self) -> usize {
        self.kld_values.len()
    }

    pub fn kld(&self) -> Estimate {
        mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count())
    }

    /// PPL(model) / PPL(base).
    pub fn ppl_ratio(&self) -> Estimate {
        let ln = self.ln_ppl_ratio();
        Estimate { value: ln.value.exp(), stderr: ln.value.exp() * ln.stderr }
    }

    fn log_ppl(nll: &NllStats) -> Estimate {
        mean_and_uncertainty(nll.sum(), nll.sum_sq(), nll.count())
    }

    fn ln_ppl_ratio(&self) -> Estimate {
        let (a, b) = (Self::log_ppl(&self.nll), Self::log_ppl(&self.nll_base));
        let cov = covariance(self.nll.sum(), self.nll_base.sum(), self.sum_nll_nll_base, self.count());
        let variance = a.stderr * a.stderr + b.stderr * b.stderr - 2.0 * cov;
        Estimate { value: a.value - b.value, stderr: variance.max(0.0).sqrt() }
    }

    pub fn top1(&self) -> Estimate {
        let (p, n) = (self.same_top as f64 / self.count() as f64, self.count() as f64);
        Estimate { value: p, stderr: if self.count() > 1 { (p * (1.0 - p) / (n - 1.0)).sqrt() } else { 0.0 } }
    }

    pub fn report(&self, plan: &ChunkPlan, baseline: &Baseline, seconds: f64) -> KldReport {
        let ppl_of = |nll: &NllStats| {
            let log = Self::log_ppl(nll);
            Estimate { value: log.value.exp(), stderr: log.value.exp() * log.stderr }
        };
        let mut kld_sorted = self.kld_values.clone();
        kld_sorted.sort_by(f32::total_cmp);
        let p_diff_mse = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, self.count());
        let rms = p_diff_mse.value.sqrt();
        KldReport {
            baseline: baseline.path().display().to_string(),
            protocol: plan.protocol,
            ctx: plan.ctx,
            chunks: plan.chunks,
            tokens_scored: self.count(),
            ppl: ppl_of(&self.nll),
            ppl_base: ppl_of(&self.nll_base),
            ppl_ratio: self.ppl_ratio(),
            ln_ppl_ratio: self.ln_ppl_ratio(),
            kld: self.kld(),
            kld_median: percentile(&kld_sorted, 0.5),
            kld_p99: percentile(&kld_sorted, 0.99),
            kld_max: kld_sorted.last().copied().unwrap_or(0.0) as f64,
            top1: self.top1(),
            p_diff: mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, self.count()),
            p_diff_rms: Estimate { value: rms, stderr: if rms > 0.0 { 0.5 / rms * p_diff_mse.stderr } else { 0.0 } },
            p_diff_max: self.p_diff_values.iter().fold(0f64, |m, &v| m.max((v as f64).abs())),
            seconds,
        }
    }
}

/// The comparison of a model with its baseline over the scored tokens.
#[derive(Clone, Debug, Serialize)]
pub struct KldReport {
    pub baseline: String,
    pub protocol: Protocol,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub ppl: Estimate,
    pub ppl_base: Estimate,
    /// PPL(model) / PPL(base).
    pub ppl_ratio: Estimate,
    pub ln_ppl_ratio: Estimate,
    /// Mean KL(base ‖ model) per token, in nats.
    pub kld: Estimate,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Share of tokens whose most likely next token is the same under both.
    pub top1: Estimate,
    /// Mean of `p_model(next) − p_base(next)`.
    pub p_diff: Estimate,
    pub p_diff_rms: Estimate,
    /// Largest `|Δp|`.
    pub p_diff_max: f64,
    pub seconds: f64,
}

impl KldReport {
    pub fn render(&self) -> String {
        let pm = |e: &Estimate, scale: f64, digits: usize| {
            format!("{:.digits$} ± {:.digits$}", e.value * scale, e.stderr * scale)
        };
        [
            format!(
                "{} chunks of {} ({} protocol), {} tokens scored against {}",
                self.chunks,
                self.ctx,
                self.protocol.name(),
                self.tokens_scored,
                self.baseline
            ),
            format!("PPL(model)        : {}", pm(&self.ppl, 1.0, 6)),
            format!("PPL(base)         : {}", pm(&self.ppl_base, 1.0, 6)),
            format!("PPL(model)/PPL(base): {}", pm(&self.ppl_ratio, 1.0, 6)),
            format!("Mean KLD          : {}", pm(&self.kld, 1.0, 6)),
            format!("Median KLD        : {:.6}", self.kld_median),
            format!("99.0% KLD         : {:.6}", self.kld_p99),
            format!("Maximum KLD       : {:.6}", self.kld_max),
            format!("Same top p        : {} %", pm(&self.top1, 100.0, 3)),
            format!("Mean Δp           : {} %", pm(&self.p_diff, 100.0, 3)),
            format!("RMS Δp            : {} %", pm(&self.p_diff_rms, 100.0, 3)),
            format!("Maximum |Δp|      : {:.3} %", 100.0 * self.p_diff_max),
            String::new(),
        ]
        .join("\n")
    }
}

/// Where the baseline's distributions come from, chunk by chunk.
enum BaseSource<'m> {
    Model { model: Box<Model<'m>>, cache: KvCache },
    File(LogitsReader),
}

enum BaseChunk {
    Logits(Vec<f32>),
    Stored(StoredChunk),
}

impl BaseChunk {
    fn row(&self, i: usize, vocab: usize) -> BaseRow<'_> {
        match self {
            BaseChunk::Logits(l) => BaseRow::Logits(&l[i * vocab..(i + 1) * vocab]),
            BaseChunk::Stored(s) => BaseRow::Stored(s.row(i)),
        }
    }
}

impl BaseSource<'_> {
    fn chunk(&mut self, plan: &ChunkPlan, tokens: &[u32], index: usize) -> Result<BaseChunk> {
        Ok(match self {
            BaseSource::Model { model, cache } => BaseChunk::Logits(plan.logits(model, cache, tokens, index)?),
            BaseSource::File(reader) => BaseChunk::Stored(reader.read_chunk()?),
        })
    }
}

/// Compares `model` with `base` over the planned chunks; `on_chunk(index, stats)` sees the running
/// sums after each chunk.
fn compare(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    base: &mut BaseSource,
    baseline: &Baseline,
    mut on_chunk: impl FnMut(usize, &KldStats),
) -> Result<KldReport> {
    let vocab = model.config.vocab_size;
    let mut stats = KldStats::default();
    let seconds = for_each_chunk(model, tokens, plan, |index, targets, logits| {
        let base_chunk = base.chunk(plan, tokens, index)?;
        let rows: Vec<TokenComparison> = logits
            .par_chunks_exact(vocab)
            .zip(targets)
            .enumerate()
            .map(|(i, (row, &t))| compare_token(row, &base_chunk.row(i, vocab), t))
            .collect();
        rows.iter().for_each(|c| stats.add(c));
        on_chunk(index, &stats);
        Ok(())
    })?;
    Ok(stats.report(plan, baseline, seconds))
}

/// Opens the model, tokenizes the text and compares the model with `baseline` on it.
pub fn run(
    model_path: &Path,
    text_path: &Path,
    opts: &PerplexityOptions,
    baseline: &Baseline,
    on_chunk: impl FnMut(usize, &KldStats),
) -> Result<KldReport> {
    let source = ModelSource::open(model_path)?;
    let (tokens, bos) = perplexity::tokenize(&source, text_path)?;
    let model = Model::load(&source)?;
    let text = text_path.display();
    match baseline {
        Baseline::Model(base_path) => {
            let base_source = ModelSource::open(base_path)?;
            same_vocabulary(&source, &base_source)?;
            let base_model = Model::load(&base_source)?;
            let plan = perplexity::plan(opts, &tokens, bos).with_context(|| format!("{text}"))?;
            let cache = base_model.new_cache(plan.ctx);
            let mut base = BaseSource::Model { model: Box::new(base_model), cache };
            compare(&model, &tokens, &plan, &mut base, baseline, on_chunk)
        }
        Baseline::Logits(file) => {
            let reader = LogitsReader::open(file)?;
            let plan = file_plan(&reader, file, opts, &tokens, bos, model.config.vocab_size, text_path)?;
            compare(&model, &tokens, &plan, &mut BaseSource::File(reader), baseline, on_chunk)
        }
    }
}

/// Both models must tokenize alike: the same vocabulary size and, where both carry one, the same
/// token strings.
fn same_vocabulary(model: &ModelSource, base: &ModelSource) -> Result<()> {
    let (m, b) = (model.config.vocab_size, base.config.vocab_size);
    if m != b {
        bail!(
            "{}: vocabulary of {b} tokens, but {} has {m}: the models must share a tokenizer",
            base.path.display(),
            model.path.display()
        );
    }
    if let (Some(mv), Some(bv)) = (&model.vocab, &base.vocab) {
        if let Some(i) = (0..mv.tokens.len().min(bv.tokens.len())).find(|&i| mv.tokens[i] != bv.tokens[i]) {
            bail!(
                "{}: token {i} is {:?}, but {:?} in {}: the models must share a tokenizer",
                base.path.display(),
                bv.tokens[i],
                mv.tokens[i],
                model.path.display()
            );
        }
    }
    Ok(())
}

/// The chunks a logits file covers, checked against the options and the text's tokens.
fn file_plan(
    reader: &LogitsReader,
    file: &Path,
    opts: &PerplexityOptions,
    tokens: &[u32],
    bos: Option<u32>,
    vocab: usize,
    text_path: &Path,
) -> Result<ChunkPlan> {
    let (h, name) = (&reader.header, file.display());
    if h.vocab != vocab {
        bail!("{name}: made with a vocabulary of {} tokens, but the model has {vocab}", h.vocab);
    }
    if h.protocol != opts.protocol {
        bail!("{name}: made with the {} protocol, not {} (--protocol)", h.protocol.name(), opts.protocol.name());
    }
    if let Some(ctx) = opts.ctx.filter(|&c| c != h.ctx) {
        bail!("{name}: made with a context of {} tokens, not {ctx} (--ctx)", h.ctx);
    }
    let chunks = match opts.chunks {
        Some(n) if n > h.chunks => bail!("{name}: holds {} chunks, fewer than --chunks {n}", h.chunks),
        Some(n) => n,
        None => h.chunks,
    };
    let used = chunks * h.ctx;
    if tokens.len() < used || tokens[..used] != h.tokens[..used] {
        let at = (0..used.min(tokens.len())).find(|&i| tokens[i] != h.tokens[i]).unwrap_or(tokens.len());
        bail!(
            "{name}: its tokens differ from {}'s (first at token {at} of {used}): it was made from another text or tokenizer",
            text_path.display()
        );
    }
    ChunkPlan::new(opts.protocol, tokens.len(), h.ctx, Some(chunks), bos)
        .with_context(|| format!("{}", text_path.display()))
}

/// Opens the model, tokenizes the text, scores it and writes the scored positions' log-probs to
/// `out`, for later comparisons against this model; returns the model's perplexity.
pub fn save_logits(
    model_path: &Path,
    text_path: &Path,
    opts: &PerplexityOptions,
    out: &Path,
    form: LogitsForm,
    mut on_chunk: impl FnMut(usize, &NllStats),
) -> Result<PerplexityReport> {
    let source = ModelSource::open(model_path)?;
    let (tokens, bos) = perplexity::tokenize(&source, text_path)?;
    let model = Model::load(&source)?;
    let plan = perplexity::plan(opts, &tokens, bos).with_context(|| format!("{}", text_path.display()))?;
    let vocab = model.config.vocab_size;
    let mut writer = LogitsWriter::create(out, form, &plan, vocab, &tokens)?;
    let mut stats = NllStats::default();
    let seconds = for_each_chunk(&model, &tokens, &plan, |index, targets, logits| {
        writer.write_chunk(logits, targets)?;
        let nlls: Vec<f64> =
            logits.par_chunks_exact(vocab).zip(targets).map(|(row, &t)| perplexity::token_nll(row, t)).collect();
        nlls.into_iter().for_each(|nll| stats.add(nll));
        on_chunk(index, &stats);
        Ok(())
    })?;
    writer.commit()?;
    Ok(perplexity::report(&plan, &stats, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::synthetic::Rng;

    /// A baseline row and a perturbed model row over `vocab` tokens.
    fn pair(rng: &mut Rng, vocab: usize, noise: f32) -> (Vec<f32>, Vec<f32>) {
        let base: Vec<f32> = (0..vocab).map(|_| 7.0 * rng.f32()).collect();
        let model = base.iter().map(|&b| b + 0.5 * noise * rng.f32()).collect();
        (base, model)
    }

    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let norm = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - norm).collect()
    }

    fn argmax(row: &[f32]) -> usize {
        (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
    }

    /// The direct f64 definition of every per-token quantity.
    fn reference(model: &[f32], base: &[f32], target: usize) -> TokenComparison {
        let (m, b) = (log_softmax(model), log_softmax(base));
        let kld = b.iter().zip(&m).map(|(lb, lm)| lb.exp() * (lb - lm)).sum();
        TokenComparison {
            kld,
            nll: -m[target],
            nll_base: -b[target],
            p_diff: m[target].exp() - b[target].exp(),
            same_top: argmax(model) == argmax(base),
        }
    }

    fn stored(form: LogitsForm, base: &[f32], target: u32) -> StoredChunk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.bin");
        let tokens = vec![target; 8];
        let plan = ChunkPlan::new(Protocol::LlamaCpp, 8, 4, Some(1), None).unwrap();
        let mut writer = LogitsWriter::create(&path, form, &plan, base.len(), &tokens).unwrap();
        writer.write_chunk(base, &[target]).unwrap();
        writer.commit().unwrap();
        let mut reader = LogitsReader::open(&path).unwrap();
        reader.read_chunk().unwrap()
    }

    #[test]
    fn every_baseline_form_matches_the_direct_definition() {
        let mut rng = Rng(11);
        for (vocab, noise) in [(300, 0.5), (1001, 2.0), (64, 0.0)] {
            let (base, model) = pair(&mut rng, vocab, noise);
            let target = 17;
            let want = reference(&model, &base, target);
            let close = |got: f64, want: f64, tol: f64| (got - want).abs() <= tol;

            let exact = compare_token(&model, &BaseRow::Logits(&base), target as u32);
            assert!(close(exact.kld, want.kld, 1e-6 * want.kld.max(1e-3)), "{} vs {}", exact.kld, want.kld);
            assert!(close(exact.nll, want.nll, 1e-6) && close(exact.nll_base, want.nll_base, 1e-6));
            assert!(close(exact.p_diff, want.p_diff, 1e-7));
            assert_eq!(exact.same_top, want.same_top);

            // The 16-bit records round log-probs by up to 1.2e-4; logits here span 14 nats, so nothing
            // falls below llama.cpp's −16 cutoff.
            let full = stored(LogitsForm::Full, &base, target as u32);
            let got = compare_token(&model, &BaseRow::Stored(full.row(0)), target as u32);
            assert!(close(got.kld, want.kld, 2e-4), "full: {} vs {}", got.kld, want.kld);
            assert!(close(got.nll_base, want.nll_base, 2e-4) && close(got.nll, want.nll, 1e-5));
            assert_eq!(got.same_top, want.same_top);

            let topk = stored(LogitsForm::TopK(8), &base, target as u32);
            let got = compare_token(&model, &BaseRow::Stored(topk.row(0)), target as u32);
            assert!(got.kld <= want.kld + 1e-6, "top-k KLD {} is a lower bound of {}", got.kld, want.kld);
            assert!(got.kld >= -1e-6);
            assert!(close(got.nll_base, want.nll_base, 1e-5) && close(got.p_diff, want.p_diff, 1e-6));
            assert_eq!(got.same_top, want.same_top);
            let all = stored(LogitsForm::TopK(vocab), &base, target as u32);
            let got = compare_token(&model, &BaseRow::Stored(all.row(0)), target as u32);
            assert!(close(got.kld, want.kld, 1e-5), "k = vocab keeps everything: {} vs {}", got.kld, want.kld);
        }
    }

    #[test]
    fn stats_follow_llama_cpp_definitions() {
        let mut rng = Rng(4);
        let comparisons: Vec<TokenComparison> = (0..200)
            .map(|i| {
                let (base, model) = pair(&mut rng, 50, 1.5);
                reference(&model, &base, i % 50)
            })
            .collect();
        let mut stats = KldStats::default();
        comparisons.iter().for_each(|c| stats.add(c));
        let plan = ChunkPlan::new(Protocol::LlamaCpp, 400, 4, None, None).unwrap();
        let r = stats.report(&plan, &Baseline::Model("base".into()), 1.0);

        let n = comparisons.len() as f64;
        let mean = |f: &dyn Fn(&TokenComparison) -> f64| comparisons.iter().map(f).sum::<f64>() / n;
        let sem = |f: &dyn Fn(&TokenComparison) -> f64| {
            let m = mean(f);
            (comparisons.iter().map(|c| (f(c) - m).powi(2)).sum::<f64>() / n / (n - 1.0)).sqrt()
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        assert!(close(r.kld.value, mean(&|c| c.kld)) && close(r.kld.stderr, sem(&|c| c.kld)));
        assert!(close(r.ppl.value, mean(&|c| c.nll).exp()));
        assert!(close(r.ppl_base.value, mean(&|c| c.nll_base).exp()));
        let diff_sem = sem(&|c| c.nll - c.nll_base);
        assert!(close(r.ppl_ratio.value, mean(&|c| c.nll - c.nll_base).exp()));
        assert!((r.ln_ppl_ratio.stderr - diff_sem).abs() < 1e-6, "{} vs {diff_sem}", r.ln_ppl_ratio.stderr);
        assert!(close(r.p_diff.value, mean(&|c| c.p_diff)));
        assert!(close(r.p_diff_rms.value, mean(&|c| c.p_diff * c.p_diff).sqrt()));
        let top = mean(&|c| c.same_top as u8 as f64);
        assert!(close(r.top1.value, top) && close(r.top1.stderr, (top * (1.0 - top) / (n - 1.0)).sqrt()));

        let mut sorted: Vec<f64> = comparisons.iter().map(|c| c.kld as f32 as f64).collect();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(r.kld_max, sorted[199]);
        assert!(close(r.kld_median, (sorted[99] + sorted[100]) / 2.0));
        let at = 0.99 * 199.0;
        let p99 = sorted[197] + (at - 197.0) * (sorted[198] - sorted[197]);
        assert!(close(r.kld_p99, p99), "{} vs {p99}", r.kld_p99);
        assert!(close(r.p_diff_max, comparisons.iter().map(|c| (c.p_diff as f32 as f64).abs()).fold(0.0, f64::max)));
    }

    #[test]
    fn few_tokens_have_no_uncertainty() {
        let e = mean_and_uncertainty(3.0, 5.0, 10);
        assert_eq!((e.value, e.stderr), (0.3, 0.0), "llama.cpp reports none for 10 values or fewer");
        assert_eq!(covariance(1.0, 2.0, 3.0, 9), 0.0);
    }
}
