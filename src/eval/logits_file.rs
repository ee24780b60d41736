//! Stored baseline log-probabilities, so a model can be compared with a baseline that is not run again.
//!
//! Two forms, both starting with the evaluated tokens (`i32`, `ctx × chunks`, the text's own: no BOS
//! replacement) and then one record per scored position, chunk after chunk:
//!
//! - **Full** ([`LogitsForm::Full`]): llama.cpp's `--kl-divergence-base` file, byte for byte, so either
//!   tool reads the other's. Header: `"_logits_"`, then `n_ctx`, `n_vocab`, `n_chunk` (`i32` each,
//!   little-endian). Positions are llama.cpp's (`ctx/2 .. ctx-2` of each chunk). A record is
//!   `nv = 2·⌈n_vocab/2⌉ + 4` `u16`s: the f32 `scale` and f32 `min_log_prob` in the first four, then
//!   per token `q = round((logit − min_logit) / scale)` with `min_logit = max(min, max − 16)` and
//!   `scale = (max − min_logit) / 65535`, so `log p ≈ scale·q + min_log_prob` (tokens below
//!   `min_logit` get `q = 0`), then a zero `u16` when `n_vocab` is odd.
//! - **Top-k** ([`LogitsForm::TopK`]), qforge's compact form. Header: `"_topklp_"`, then `u32`s
//!   `version` (1), `protocol` (0 llama-cpp, 1 gptq), `n_ctx`, `n_vocab`, `n_chunk`, `k`. A record is
//!   the f32 log-prob of the token that follows, the f32 log of the mass outside the top k (`-inf`
//!   when none), the `k` largest tokens' `u32` ids (by logit, ties to the lower id) and their f32
//!   log-probs: `8 + 8k` bytes instead of `2·nv`.
//!
//! The top-k form keeps the baseline's next-token log-prob exactly (so its PPL, Δp and the PPL ratio
//! are exact) and its argmax (top-1 agreement is exact), but only `k + 1` buckets of its distribution:
//! the k tokens and "everything else". The KL divergence computed from it is `KL(P̄ ‖ Q̄)`, the
//! divergence between both distributions coarsened to those buckets, and by the data-processing
//! inequality (merging outcomes never increases a KL divergence; here the log-sum inequality applied
//! to the merged tail) `KL(P̄ ‖ Q̄) ≤ KL(P ‖ Q)`: it is a lower bound of the true KLD, short by exactly
//! `R_P · KL(P_tail ‖ Q_tail)`, where `R_P` is the baseline's tail mass and `P_tail`, `Q_tail` the
//! tails renormalized. The error is therefore at most the tail mass times the divergence within the
//! tail, and vanishes as k grows.
//!
//! Readers check every header field against the file's size before allocating anything.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use formats::output::AtomicFile;
use rayon::prelude::*;

use super::perplexity::{ChunkPlan, Protocol};
use crate::runtime::math;

pub const LLAMA_CPP_MAGIC: &[u8; 8] = b"_logits_";
pub const TOP_K_MAGIC: &[u8; 8] = b"_topklp_";
const TOP_K_VERSION: u32 = 1;
/// llama.cpp keeps 16 nats of log-prob range below the most likely token.
const LOG_PROB_RANGE: f32 = 16.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsForm {
    /// llama.cpp's `--kl-divergence-base` layout.
    Full,
    /// The `k` most likely tokens per position.
    TopK(usize),
}

/// What a logits file was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogitsHeader {
    pub form: LogitsForm,
    pub protocol: Protocol,
    pub ctx: usize,
    pub vocab: usize,
    pub chunks: usize,
    /// The evaluated tokens, `ctx × chunks`.
    pub tokens: Vec<u32>,
}

impl LogitsHeader {
    fn scored_per_chunk(&self) -> usize {
        match self.protocol {
            Protocol::LlamaCpp => self.ctx - 1 - self.ctx / 2,
            Protocol::Gptq => self.ctx - 1,
        }
    }

    fn fixed_len(&self) -> usize {
        match self.form {
            LogitsForm::Full => 8 + 3 * 4,
            LogitsForm::TopK(_) => 8 + 6 * 4,
        }
    }

    fn record_len(&self) -> usize {
        match self.form {
            LogitsForm::Full => 2 * full_record_u16s(self.vocab),
            LogitsForm::TopK(k) => 8 + 8 * k,
        }
    }

    /// The file size these fields imply, `None` on overflow.
    fn file_len(&self) -> Option<u64> {
        let tokens = (self.ctx as u64).checked_mul(self.chunks as u64)?.checked_mul(4)?;
        let records =
            (self.chunks as u64).checked_mul(self.scored_per_chunk() as u64)?.checked_mul(self.record_len() as u64)?;
        (self.fixed_len() as u64).checked_add(tokens)?.checked_add(records)
    }
}

/// `u16`s per full record: the two f32s, then the vocabulary padded to an even count.
fn full_record_u16s(vocab: usize) -> usize {
    2 * vocab.div_ceil(2) + 4
}

/// Writes a model's scored log-probabilities, chunk by chunk, through an [`AtomicFile`].
pub struct LogitsWriter {
    file: AtomicFile,
    form: LogitsForm,
    vocab: usize,
}

impl LogitsWriter {
    /// Creates `path` and writes the header for the chunks of `plan` over `tokens`.
    pub fn create(path: &Path, form: LogitsForm, plan: &ChunkPlan, vocab: usize, tokens: &[u32]) -> Result<Self> {
        let fail = || format!("{}: cannot write", path.display());
        match form {
            LogitsForm::Full if plan.protocol != Protocol::LlamaCpp => {
                bail!(
                    "{}: llama.cpp's logits layout scores llama.cpp's positions; use --protocol llama-cpp or --top-k",
                    path.display()
                )
            }
            LogitsForm::TopK(k) if k == 0 || k > vocab => {
                bail!("{}: --top-k {k} must lie in 1..={vocab} (the vocabulary)", path.display())
            }
            _ => {}
        }
        let count =
            |n: usize| i32::try_from(n).with_context(|| format!("{}: {n} does not fit the header", path.display()));
        let mut header = Vec::new();
        match form {
            LogitsForm::Full => {
                header.extend_from_slice(LLAMA_CPP_MAGIC);
                for n in [plan.ctx, vocab, plan.chunks] {
                    header.extend_from_slice(&count(n)?.to_le_bytes());
                }
            }
            LogitsForm::TopK(k) => {
                header.extend_from_slice(TOP_K_MAGIC);
                let protocol = match plan.protocol {
                    Protocol::LlamaCpp => 0,
                    Protocol::Gptq => 1,
                };
                for n in [TOP_K_VERSION as usize, protocol, plan.ctx, vocab, plan.chunks, k] {
                    header.extend_from_slice(&(count(n)? as u32).to_le_bytes());
                }
            }
        }
        tokens[..plan.ctx * plan.chunks].iter().for_each(|&t| header.extend_from_slice(&(t as i32).to_le_bytes()));
        let mut file = AtomicFile::create(path)?;
        file.write_all(&header).with_context(fail)?;
        Ok(Self { file, form, vocab })
    }

    /// Appends the records of one chunk's scored `logits` (`targets.len() × vocab`).
    pub fn write_chunk(&mut self, logits: &[f32], targets: &[u32]) -> Result<()> {
        let records: Vec<Vec<u8>> = logits
            .par_chunks_exact(self.vocab)
            .zip(targets)
            .map(|(row, &target)| match self.form {
                LogitsForm::Full => encode_full(row),
                LogitsForm::TopK(k) => encode_top_k(row, target, k),
            })
            .collect();
        let dest = self.file.dest().display().to_string();
        records.iter().try_for_each(|r| self.file.write_all(r)).with_context(|| format!("{dest}: cannot write"))
    }

    pub fn commit(self) -> Result<()> {
        Ok(self.file.commit()?)
    }
}

/// One full record, as llama.cpp's `log_softmax(n_vocab, logits, log_prob, tok)` fills it.
fn encode_full(logits: &[f32]) -> Vec<u8> {
    let (max, sum_exp) = math::softmax_normalizer(logits);
    let min = logits.iter().fold(logits[0], |m, &v| if v < m { v } else { m }).max(max - LOG_PROB_RANGE);
    let log_sum_exp = sum_exp.ln() as f32;
    let min_log_prob = min - max - log_sum_exp;
    let scale = (max - min) / 65535.0;
    let mut out = Vec::with_capacity(2 * full_record_u16s(logits.len()));
    out.extend_from_slice(&scale.to_le_bytes());
    out.extend_from_slice(&min_log_prob.to_le_bytes());
    let inv_scale = 1.0 / scale;
    for &l in logits {
        // llama.cpp's `nearest_int` rounds half to even; its int result is narrowed to u16.
        let q = if scale != 0.0 && l > min { (inv_scale * (l - min)).round_ties_even() as i32 as u16 } else { 0 };
        out.extend_from_slice(&q.to_le_bytes());
    }
    out.resize(2 * full_record_u16s(logits.len()), 0);
    out
}

/// One top-k record.
fn encode_top_k(logits: &[f32], target: u32, k: usize) -> Vec<u8> {
    let (max, sum_exp) = math::softmax_normalizer(logits);
    let log_norm = max as f64 + sum_exp.ln();
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if k < ids.len() {
        ids.select_nth_unstable_by(k, order);
        ids.truncate(k);
    }
    ids.sort_unstable_by(order);
    let log_prob = |id: u32| (logits[id as usize] as f64 - log_norm) as f32;
    let rest: f64 = outside(logits, &ids).map(|l| math::exp(l - max) as f64).sum();
    let mut out = Vec::with_capacity(8 + 8 * k);
    out.extend_from_slice(&log_prob(target).to_le_bytes());
    out.extend_from_slice(&((rest.ln() - sum_exp.ln()) as f32).to_le_bytes());
    ids.iter().for_each(|id| out.extend_from_slice(&id.to_le_bytes()));
    ids.iter().for_each(|&id| out.extend_from_slice(&log_prob(id).to_le_bytes()));
    out
}

/// The logits whose ids are not in `ids`.
pub fn outside<'a>(logits: &'a [f32], ids: &[u32]) -> impl Iterator<Item = f32> + 'a {
    let mut excluded = vec![false; logits.len()];
    ids.iter().for_each(|&id| excluded[id as usize] = true);
    logits.iter().zip(excluded).filter(|(_, e)| !e).map(|(&l, _)| l)
}

/// A full record: llama.cpp's quantized log-probs of every token.
#[derive(Clone, Copy, Debug)]
pub struct FullRow<'a> {
    pub scale: f32,
    pub min_log_prob: f32,
    q: &'a [u16],
}

impl FullRow<'_> {
    /// `scale·q + min_log_prob`, in f32 as llama.cpp decodes it.
    pub fn log_prob(&self, token: usize) -> f32 {
        self.scale * self.q[token] as f32 + self.min_log_prob
    }

    pub fn vocab(&self) -> usize {
        self.q.len()
    }
}

/// A top-k record.
#[derive(Clone, Copy, Debug)]
pub struct TopKRow<'a> {
    pub target_log_prob: f32,
    /// `ln` of the probability outside the k tokens; `-inf` when there is none.
    pub rest_log_mass: f32,
    /// The k most likely tokens, most likely first.
    pub ids: &'a [u32],
    pub log_probs: &'a [f32],
}

/// One chunk's records.
pub enum StoredChunk {
    Full { vocab: usize, data: Vec<u16> },
    TopK { k: usize, heads: Vec<[f32; 2]>, ids: Vec<u32>, log_probs: Vec<f32> },
}

pub enum StoredRow<'a> {
    Full(FullRow<'a>),
    TopK(TopKRow<'a>),
}

impl StoredChunk {
    pub fn row(&self, i: usize) -> StoredRow<'_> {
        match self {
            StoredChunk::Full { vocab, data } => {
                let record = &data[i * full_record_u16s(*vocab)..(i + 1) * full_record_u16s(*vocab)];
                let f32_at = |j: usize| f32::from_bits(record[j] as u32 | (record[j + 1] as u32) << 16);
                StoredRow::Full(FullRow { scale: f32_at(0), min_log_prob: f32_at(2), q: &record[4..4 + vocab] })
            }
            StoredChunk::TopK { k, heads, ids, log_probs } => StoredRow::TopK(TopKRow {
                target_log_prob: heads[i][0],
                rest_log_mass: heads[i][1],
                ids: &ids[i * k..(i + 1) * k],
                log_probs: &log_probs[i * k..(i + 1) * k],
            }),
        }
    }
}

/// Reads a logits file of either form, chunk by chunk.
pub struct LogitsReader {
    path: PathBuf,
    file: BufReader<File>,
    pub header: LogitsHeader,
}

impl LogitsReader {
    /// Opens `path` and reads and checks its header against the file's size.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("{name}: cannot open logits file"))?;
        let size = file.metadata().with_context(|| format!("{name}: cannot read"))?.len();
        let mut file = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        read_exact(&mut file, &mut magic, &name, "the magic")?;
        let mut field = |what: &str| -> Result<u32> {
            let mut b = [0u8; 4];
            read_exact(&mut file, &mut b, &name, what)?;
            Ok(u32::from_le_bytes(b))
        };
        let mut header = match &magic {
            LLAMA_CPP_MAGIC => {
                let (ctx, vocab, chunks) = (field("n_ctx")?, field("n_vocab")?, field("n_chunk")?);
                LogitsHeader {
                    form: LogitsForm::Full,
                    protocol: Protocol::LlamaCpp,
                    ctx: positive(ctx, "n_ctx", &name)?,
                    vocab: positive(vocab, "n_vocab", &name)?,
                    chunks: positive(chunks, "n_chunk", &name)?,
                    tokens: Vec::new(),
                }
            }
            TOP_K_MAGIC => {
                let version = field("version")?;
                if version != TOP_K_VERSION {
                    bail!("{name}: top-k logits file version {version}; this qforge reads version {TOP_K_VERSION}");
                }
                let protocol = match field("protocol")? {
                    0 => Protocol::LlamaCpp,
                    1 => Protocol::Gptq,
                    other => bail!("{name}: unknown protocol {other} in the header (0 llama-cpp, 1 gptq)"),
                };
                let (ctx, vocab, chunks, k) = (field("n_ctx")?, field("n_vocab")?, field("n_chunk")?, field("k")?);
                let vocab = positive(vocab, "n_vocab", &name)?;
                let k = positive(k, "k", &name)?;
                if k > vocab {
                    bail!("{name}: k = {k} exceeds the vocabulary of {vocab}");
                }
                LogitsHeader {
                    form: LogitsForm::TopK(k),
                    protocol,
                    ctx: positive(ctx, "n_ctx", &name)?,
                    vocab,
                    chunks: positive(chunks, "n_chunk", &name)?,
                    tokens: Vec::new(),
                }
            }
            _ => bail!("{name}: not a logits file (no \"_logits_\" or \"_topklp_\" magic)"),
        };
        if header.ctx < 4 {
            bail!("{name}: n_ctx = {} is too short to have scored positions", header.ctx);
        }
        match header.file_len() {
            Some(want) if want == size => {}
            Some(want) if want > size => bail!(
                "{name}: truncated: {} chunks of {} tokens over a vocabulary of {} need {want} bytes, the file has {size}",
                header.chunks,
                header.ctx,
                header.vocab
            ),
            Some(want) => bail!("{name}: {} bytes after the {want} its header accounts for", size - want),
            None => bail!("{name}: the header's sizes overflow"),
        }
        let mut raw = vec![0u8; header.ctx * header.chunks * 4];
        read_exact(&mut file, &mut raw, &name, "the tokens")?;
        header.tokens = raw.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u32).collect();
        if let Some(i) = header.tokens.iter().position(|&t| t as usize >= header.vocab) {
            bail!("{name}: token {i} is {}, outside the vocabulary of {}", header.tokens[i] as i32, header.vocab);
        }
        Ok(Self { path: path.to_path_buf(), file, header })
    }

    /// The next chunk's records.
    pub fn read_chunk(&mut self) -> Result<StoredChunk> {
        let name = self.path.display().to_string();
        let h = &self.header;
        let mut raw = vec![0u8; h.scored_per_chunk() * h.record_len()];
        read_exact(&mut self.file, &mut raw, &name, "a chunk's records")?;
        let words = |bytes: &[u8]| -> Vec<u32> {
            bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        };
        Ok(match h.form {
            LogitsForm::Full => StoredChunk::Full {
                vocab: h.vocab,
                data: raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
            },
            LogitsForm::TopK(k) => {
                let (mut heads, mut ids, mut log_probs) = (Vec::new(), Vec::new(), Vec::new());
                for record in raw.chunks_exact(h.record_len()) {
                    let w = words(record);
                    heads.push([f32::from_bits(w[0]), f32::from_bits(w[1])]);
                    ids.extend_from_slice(&w[2..2 + k]);
                    log_probs.extend(w[2 + k..].iter().map(|&b| f32::from_bits(b)));
                }
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= h.vocab) {
                    bail!("{name}: top-k token id {id} is outside the vocabulary of {}", h.vocab);
                }
                StoredChunk::TopK { k, heads, ids, log_probs }
            }
        })
    }
}

fn positive(n: u32, what: &str, name: &str) -> Result<usize> {
    match n as i32 {
        n if n > 0 => Ok(n as usize),
        n => bail!("{name}: {what} = {n} in the header; it must be positive"),
    }
}

fn read_exact(file: &mut impl Read, buf: &mut [u8], name: &str, what: &str) -> Result<()> {
    file.read_exact(buf).with_context(|| format!("{name}: truncated while reading {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::synthetic::Rng;

    fn logits(rng: &mut Rng, rows: usize, vocab: usize) -> Vec<f32> {
        (0..rows * vocab).map(|_| 6.0 * rng.f32()).collect()
    }

    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let norm = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - norm).collect()
    }

    #[test]
    fn both_forms_round_trip_through_a_file() {
        let (vocab, ctx) = (51, 8);
        let mut rng = Rng(5);
        let tokens: Vec<u32> = (0..2 * ctx as u32).map(|i| (i * 7) % vocab as u32).collect();
        let plan = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), ctx, None, Some(1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chunks: Vec<Vec<f32>> = (0..2).map(|_| logits(&mut rng, plan.scored_per_chunk(), vocab)).collect();
        for form in [LogitsForm::Full, LogitsForm::TopK(5)] {
            let path = dir.path().join(format!("{form:?}.bin"));
            let mut w = LogitsWriter::create(&path, form, &plan, vocab, &tokens).unwrap();
            for (i, c) in chunks.iter().enumerate() {
                w.write_chunk(c, plan.targets(&tokens, i)).unwrap();
            }
            w.commit().unwrap();
            let mut r = LogitsReader::open(&path).unwrap();
            assert_eq!(r.header.tokens, tokens, "the text's tokens, not the BOS-replaced input");
            assert_eq!((r.header.form, r.header.ctx, r.header.vocab, r.header.chunks), (form, ctx, vocab, 2));
            for (i, c) in chunks.iter().enumerate() {
                let stored = r.read_chunk().unwrap();
                for (j, row) in c.chunks_exact(vocab).enumerate() {
                    let want = log_softmax(row);
                    let target = plan.targets(&tokens, i)[j] as usize;
                    match stored.row(j) {
                        StoredRow::Full(f) => {
                            // 16 nats over 65535 steps: half a step of rounding.
                            (0..vocab).for_each(|t| assert!((f.log_prob(t) as f64 - want[t]).abs() < 2e-4, "{t}"));
                        }
                        StoredRow::TopK(t) => {
                            assert!((t.target_log_prob as f64 - want[target]).abs() < 1e-5);
                            let mut order: Vec<usize> = (0..vocab).collect();
                            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
                            assert_eq!(t.ids, order[..5].iter().map(|&i| i as u32).collect::<Vec<_>>());
                            let rest: f64 = order[5..].iter().map(|&i| want[i].exp()).sum();
                            assert!((t.rest_log_mass as f64 - rest.ln()).abs() < 1e-5);
                        }
                    }
                }
            }
            assert!(r.read_chunk().is_err(), "no third chunk");
        }
    }

    #[test]
    fn full_records_follow_llama_cpp_bit_for_bit() {
        // A row spanning more than 16 nats: the low tail is clamped to q = 0.
        let row = [0.0f32, 20.0, 4.0, 19.999, -3.0];
        let bytes = encode_full(&row);
        assert_eq!(bytes.len(), 2 * (6 + 4), "5 tokens pad to 6");
        let sum_exp: f64 = row.iter().map(|&v| math::exp(v - 20.0) as f64).sum();
        let scale = 16.0f32 / 65535.0;
        assert_eq!(f32::from_le_bytes(bytes[0..4].try_into().unwrap()), scale);
        assert_eq!(f32::from_le_bytes(bytes[4..8].try_into().unwrap()), 4.0 - 20.0 - sum_exp.ln() as f32);
        let q: Vec<u16> = bytes[8..].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(q[0], 0);
        assert_eq!(q[1], 65535);
        assert_eq!(q[2], 0, "exactly at min_logit: not above it");
        assert_eq!(q[3], ((19.999f32 - 4.0) / scale).round() as u16);
        assert_eq!((q[4], q[5]), (0, 0), "below the range, then padding");
        assert_eq!(&encode_full(&[2.5; 3])[..4], &0f32.to_le_bytes(), "a flat row has scale 0");
    }

    #[test]
    fn damaged_files_are_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, ctx) = (10, 4);
        let tokens = vec![1u32; 2 * ctx];
        let plan = ChunkPlan::new(Protocol::LlamaCpp, tokens.len(), ctx, None, None).unwrap();
        let path = dir.path().join("base.kld");
        let mut w = LogitsWriter::create(&path, LogitsForm::Full, &plan, vocab, &tokens).unwrap();
        for i in 0..2 {
            w.write_chunk(&vec![0.5; vocab], plan.targets(&tokens, i)).unwrap();
        }
        w.commit().unwrap();
        let good = std::fs::read(&path).unwrap();
        let err_of = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            format!("{:#}", LogitsReader::open(&path).err().expect("rejected"))
        };
        let name = path.display().to_string();
        for (bytes, problem) in [
            (good[..good.len() - 1].to_vec(), "truncated"),
            ([good.as_slice(), &[0]].concat(), "1 bytes after"),
            (b"_logitz_".iter().chain(&good[8..]).copied().collect(), "not a logits file"),
            ([&good[..12], &(-1i32).to_le_bytes(), &good[16..]].concat(), "n_vocab = -1"),
            ([&good[..8], &i32::MAX.to_le_bytes(), &good[12..]].concat(), "truncated"),
            (good[..10].to_vec(), "truncated while reading n_ctx"),
        ] {
            let err = err_of(&bytes);
            assert!(err.contains(&name) && err.contains(problem), "{problem}: {err}");
        }
        let mut bad_token = good.clone();
        bad_token[20..24].copy_from_slice(&10i32.to_le_bytes());
        assert!(err_of(&bad_token).contains("outside the vocabulary of 10"));
        let gptq = ChunkPlan::new(Protocol::Gptq, tokens.len(), ctx, None, None).unwrap();
        let err = LogitsWriter::create(&path, LogitsForm::Full, &gptq, vocab, &tokens).err().unwrap().to_string();
        assert!(err.contains("--protocol llama-cpp"), "{err}");
    }
}
