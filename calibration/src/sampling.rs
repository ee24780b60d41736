//! Seeded sampling of calibration sequences from a corpus, as GPTQ's `get_wikitext2`/`get_c4` loaders
//! do: tokenize the whole text once, then cut `nsamples` windows of `seqlen` tokens at random starts.
//!
//! The algorithm, fixed so that two runs with the same seed see the same tokens:
//! 1. `stream` = the corpus's token ids, without BOS.
//! 2. When the vocabulary adds BOS, each sequence is BOS followed by `seqlen - 1` stream tokens (the model
//!    always saw BOS first, as in llama.cpp's imatrix and perplexity chunks); otherwise `seqlen` stream
//!    tokens. Call that count `take`.
//! 3. A [`SplitMix64`] generator is seeded with `--seed`. For each sample in turn, the window start is
//!    [`SplitMix64::below`]`(stream.len() - take + 1)`, uniform over every start that fits.
//!
//! Windows may overlap (GPTQ's loaders allow it too); the text must hold at least one whole window.

use anyhow::{bail, Result};

use crate::{Corpus, Tokenizer};

pub const DEFAULT_NSAMPLES: usize = 128;
pub const DEFAULT_SEQLEN: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingOptions {
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { nsamples: DEFAULT_NSAMPLES, seqlen: DEFAULT_SEQLEN, seed: 0 }
    }
}

/// `nsamples` sequences of `seqlen` token ids, stored back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalibrationSet {
    pub seqlen: usize,
    pub tokens: Vec<u32>,
}

impl CalibrationSet {
    pub fn nsamples(&self) -> usize {
        self.tokens.len() / self.seqlen
    }

    pub fn sequences(&self) -> std::slice::ChunksExact<'_, u32> {
        self.tokens.chunks_exact(self.seqlen)
    }
}

/// Tokenizes `corpus` with the model's tokenizer and draws the sample.
pub fn sample(corpus: &Corpus, tokenizer: &Tokenizer, options: SamplingOptions) -> Result<CalibrationSet> {
    let mut stream = tokenizer.encode(&corpus.text)?;
    let vocab = tokenizer.options();
    let bos = vocab.bos.filter(|_| vocab.add_bos);
    if bos.is_some() {
        stream.remove(0);
    }
    sample_stream(&stream, bos, options).map_err(|e| anyhow::anyhow!("{}: {e}", corpus.name))
}

/// Draws the sample from an already tokenized stream (no BOS in it); `bos` starts every sequence.
pub fn sample_stream(stream: &[u32], bos: Option<u32>, options: SamplingOptions) -> Result<CalibrationSet> {
    let SamplingOptions { nsamples, seqlen, seed } = options;
    if nsamples == 0 || seqlen < 2 {
        bail!("a calibration sample needs at least 1 sequence of at least 2 tokens (got {nsamples} x {seqlen})");
    }
    let take = seqlen - usize::from(bos.is_some());
    if stream.len() < take {
        bail!(
            "the calibration text is {} tokens long, shorter than one sequence of {seqlen} tokens; \
             give a longer --calib text or a smaller --seqlen",
            stream.len()
        );
    }
    let starts = (stream.len() - take + 1) as u64;
    let mut rng = SplitMix64::new(seed);
    let mut tokens = Vec::with_capacity(nsamples.saturating_mul(seqlen));
    for _ in 0..nsamples {
        let start = rng.below(starts) as usize;
        tokens.extend(bos);
        tokens.extend_from_slice(&stream[start..start + take]);
    }
    Ok(CalibrationSet { seqlen, tokens })
}

/// SplitMix64 (Steele, Lea and Flood 2014; the generator `java.util.SplittableRandom` uses): a 64-bit state
/// advanced by the golden-ratio constant, each output a bijective mix of the state.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` without modulo bias: outputs at or above the largest multiple of `n` that fits in
    /// 2^64 are drawn again, the rest reduced modulo `n`. `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let limit = u64::MAX - (u64::MAX % n + 1) % n;
        loop {
            let x = self.next_u64();
            if x <= limit {
                return x % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenizerOptions;
    use serde_json::json;

    #[test]
    fn splitmix64_matches_the_published_sequence() {
        // First outputs for seed 1234567 from the reference C implementation (Vigna's splitmix64.c).
        let mut rng = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..1000 {
            seen[rng.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 150), "{seen:?}");
        assert_eq!(SplitMix64::new(3).below(1), 0);
    }

    #[test]
    fn windows_are_slices_of_the_stream_and_follow_the_seed() {
        let stream: Vec<u32> = (100..1100).collect();
        let options = SamplingOptions { nsamples: 8, seqlen: 16, seed: 42 };
        let set = sample_stream(&stream, None, options).unwrap();
        assert_eq!((set.nsamples(), set.seqlen), (8, 16));
        for seq in set.sequences() {
            assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "{seq:?}");
        }
        assert_eq!(set, sample_stream(&stream, None, options).unwrap());
        assert_ne!(set, sample_stream(&stream, None, SamplingOptions { seed: 43, ..options }).unwrap());
    }

    #[test]
    fn bos_starts_every_sequence() {
        let stream: Vec<u32> = (1..=40).collect();
        let set = sample_stream(&stream, Some(0), SamplingOptions { nsamples: 4, seqlen: 8, seed: 0 }).unwrap();
        for seq in set.sequences() {
            assert_eq!(seq[0], 0);
            assert!(seq[1..].windows(2).all(|w| w[1] == w[0] + 1), "{seq:?}");
        }
    }

    #[test]
    fn a_stream_of_exactly_one_window_always_gives_that_window() {
        let stream: Vec<u32> = (0..16).collect();
        let set = sample_stream(&stream, None, SamplingOptions { nsamples: 3, seqlen: 16, seed: 9 }).unwrap();
        assert!(set.sequences().all(|s| s == stream.as_slice()));
    }

    #[test]
    fn too_short_text_and_empty_samples_are_errors() {
        let stream: Vec<u32> = (0..10).collect();
        let err = sample_stream(&stream, None, SamplingOptions { nsamples: 1, seqlen: 11, seed: 0 }).unwrap_err();
        assert!(err.to_string().contains("10 tokens long, shorter than one sequence of 11"), "{err}");
        for (nsamples, seqlen) in [(0, 8), (8, 1)] {
            let err = sample_stream(&stream, None, SamplingOptions { nsamples, seqlen, seed: 0 }).unwrap_err();
            assert!(err.to_string().contains("at least"), "{err}");
        }
    }

    /// A byte-level BPE whose vocabulary is the 256 byte symbols, so any text tokenizes to one id per byte.
    fn byte_tokenizer(options: TokenizerOptions) -> Tokenizer {
        let bytes = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet();
        let mut symbols: Vec<String> = bytes.into_iter().map(String::from).collect();
        symbols.sort();
        let vocab: serde_json::Map<String, serde_json::Value> =
            symbols.iter().enumerate().map(|(i, s)| (s.clone(), json!(i + 1))).collect();
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "added_tokens": [],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        Tokenizer::from_json(&doc, options).unwrap()
    }

    #[test]
    fn sampling_a_corpus_tokenizes_it_and_names_it_in_errors() {
        let corpus = Corpus { name: "tiny.txt".into(), text: "abcdefghijklmnopqrstuvwxyz".into() };
        let tokenizer = byte_tokenizer(TokenizerOptions { bos: Some(0), add_bos: true });
        let set = sample(&corpus, &tokenizer, SamplingOptions { nsamples: 5, seqlen: 10, seed: 1 }).unwrap();
        for seq in set.sequences() {
            assert_eq!(seq[0], 0);
            let text = tokenizer.decode(&seq[1..]).unwrap();
            assert_eq!(text.len(), 9);
            assert!(corpus.text.contains(&text), "{text}");
        }
        let err = sample(&corpus, &tokenizer, SamplingOptions { nsamples: 1, seqlen: 28, seed: 1 }).unwrap_err();
        assert!(err.to_string().starts_with("tiny.txt: the calibration text is 26 tokens long"), "{err}");
        // Without BOS the whole window comes from the text: 26 tokens make exactly one window of 26.
        let plain = byte_tokenizer(TokenizerOptions::default());
        let set = sample(&corpus, &plain, SamplingOptions { nsamples: 2, seqlen: 26, seed: 5 }).unwrap();
        assert_eq!(plain.decode(&set.tokens[..26]).unwrap(), corpus.text);
    }
}
