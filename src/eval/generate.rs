//! Text generation (`qforge generate`): the prompt runs through the model as one batch, then each chosen
//! token runs alone against the KV cache, until an end-of-generation token or the token limit.
//!
//! [`Sampler`] chooses each token: the most likely one at temperature 0 (ties to the lowest id, as
//! llama.cpp's greedy sampler), otherwise llama.cpp's default chain order: top-k, then top-p on the
//! untempered distribution, then a softmax at the temperature and one draw from a seeded SplitMix64, so a
//! seed always gives the same text. [`TextStream`] turns tokens into text without ever splitting a UTF-8
//! character that byte-level tokens spread over several tokens.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use calibration::{SplitMix64, Tokenizer};
use serde::Serialize;

use crate::model::vocab::token_type;
use crate::model::{ModelSource, Vocab};
use crate::runtime::math;
use crate::runtime::{self, Model};

/// How the next token is chosen.
#[derive(Clone, Copy, Debug)]
pub struct SamplingOptions {
    /// 0 takes the most likely token; above 0 samples from `softmax(logits / temperature)`.
    pub temperature: f32,
    /// Sample among the `top_k` most likely tokens only; 0 keeps every token.
    pub top_k: usize,
    /// Then among the fewest most likely tokens whose probabilities add up to `top_p`; 1 keeps them all.
    pub top_p: f32,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    /// Generate at most this many tokens.
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model chose an end-of-generation token (not part of the output).
    EndOfGeneration,
    /// `max_tokens` were generated.
    Length,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateReport {
    /// The generated text (the prompt not included).
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop: StopReason,
    /// Time of the prompt's batch forward pass.
    pub prompt_seconds: f64,
    pub prompt_tokens_per_second: f64,
    /// Single-token forward passes: one per generated token but the last (which is never run through
    /// the model), plus one when an end-of-generation token was chosen after it.
    pub decode_passes: usize,
    /// Time of the token-by-token loop: its forward passes, sampling and detokenizing.
    pub generation_seconds: f64,
    /// `decode_passes` per second of that loop, as llama.cpp's eval rate; 0 without any pass.
    pub generation_tokens_per_second: f64,
}

impl GenerateReport {
    /// The counts and speeds, as lines for stderr.
    pub fn render_stats(&self) -> String {
        format!(
            "prompt: {} tokens in {:.3} s ({:.1} tokens/s)\ngenerated: {} tokens, {} decode passes in {:.3} s \
             ({:.1} tokens/s), stopped at {}\n",
            self.prompt_tokens,
            self.prompt_seconds,
            self.prompt_tokens_per_second,
            self.generated_tokens,
            self.decode_passes,
            self.generation_seconds,
            self.generation_tokens_per_second,
            match self.stop {
                StopReason::EndOfGeneration => "an end-of-generation token",
                StopReason::Length => "the token limit",
            }
        )
    }
}

/// Chooses tokens from logits, as [`SamplingOptions`] says.
pub struct Sampler {
    opts: SamplingOptions,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Result<Self> {
        if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
            bail!("--temp {} must be a number of at least 0", opts.temperature);
        }
        if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
            bail!("--top-p {} must lie in (0, 1]", opts.top_p);
        }
        Ok(Self { opts, rng: SplitMix64::new(opts.seed) })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.opts.temperature == 0.0 {
            return argmax(logits);
        }
        let mut candidates = top_k(logits, self.opts.top_k);
        top_p(&mut candidates, self.opts.top_p);
        let probs = tempered_softmax(&candidates, self.opts.temperature);
        candidates[draw(&probs, self.rng.next_f64())].0
    }
}

/// The id of the largest logit, the lowest id among equals.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The `k` largest `(id, logit)` pairs (all of them when `k` is 0), largest first, ties by id so the
/// order never depends on the sort.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, order);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(order);
    candidates
}

/// Keeps the shortest prefix of the sorted `candidates` whose softmax probabilities reach `p`.
fn top_p(candidates: &mut Vec<(u32, f32)>, p: f32) {
    if p >= 1.0 {
        return;
    }
    let probs = tempered_softmax(candidates, 1.0);
    let mut cumulative = 0.0;
    let keep = probs.iter().position(|&q| {
        cumulative += q;
        cumulative >= p
    });
    candidates.truncate(keep.map_or(candidates.len(), |i| i + 1));
}

fn tempered_softmax(candidates: &[(u32, f32)], temperature: f32) -> Vec<f32> {
    let mut probs: Vec<f32> = candidates.iter().map(|&(_, v)| v / temperature).collect();
    math::softmax(&mut probs);
    probs
}

/// The index where the cumulative probability first passes `u` (in [0, 1)); the last one when rounding
/// leaves the sum just below `u`.
fn draw(probs: &[f32], u: f64) -> usize {
    let mut cumulative = 0.0;
    probs
        .iter()
        .position(|&q| {
            cumulative += q as f64;
            u < cumulative
        })
        .unwrap_or(probs.len() - 1)
}

/// Token-by-token detokenization that holds tokens back while they end inside a UTF-8 character.
///
/// Each step decodes a short window of tokens twice, without and with the new ones, and emits the
/// difference, so every piece decodes with the token before it as context (a decoder may treat the first
/// token of a text specially, e.g. drop its leading space).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// `ids[prefix..read]` is emitted context; `ids[read..]` is not emitted yet.
    prefix: usize,
    read: usize,
}

/// A UTF-8 character has at most 4 bytes, each token at least one: a character still incomplete after
/// this many held tokens never completes, and its replacement character is emitted.
const MAX_HELD_TOKENS: usize = 4;

impl<'a> TextStream<'a> {
    /// A stream whose first pushed token follows `context` (the prompt; may be empty).
    pub fn new(tokenizer: &'a Tokenizer, context: &[u32]) -> Self {
        let ids = context.last().map(|&id| vec![id]).unwrap_or_default();
        let read = ids.len();
        Self { tokenizer, ids, prefix: 0, read }
    }

    /// The text that `id` completes: empty while it leaves a character unfinished.
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let complete = !self.decode_window()?.ends_with(char::REPLACEMENT_CHARACTER);
        if complete || self.ids.len() - self.read >= MAX_HELD_TOKENS {
            return self.emit();
        }
        Ok(String::new())
    }

    /// Whatever is still held back, unfinished characters as U+FFFD.
    pub fn finish(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        self.emit()
    }

    fn decode_window(&self) -> Result<String> {
        self.tokenizer.decode(&self.ids[self.prefix..])
    }

    fn emit(&mut self) -> Result<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.decode_window()?;
        let text = after_common_prefix(&before, &after).to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text)
    }
}

/// The part of `after` past what it shares with `before`: normally `before` is a prefix of `after`, but
/// not when `before` ended in an unfinished character that `after` completes.
fn after_common_prefix<'s>(before: &str, after: &'s str) -> &'s str {
    let common = before.char_indices().zip(after.chars()).find(|((_, a), b)| a != b).map(|((i, _), _)| i);
    &after[common.unwrap_or(before.len().min(after.len()))..]
}

/// llama.cpp's end-of-turn token texts: a control token spelled so ends generation like EOS does.
const END_OF_TURN_TEXTS: [&str; 8] =
    ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "<EOT>"];

/// The tokens that end generation: EOS, and the control tokens llama.cpp also treats as end of turn.
pub fn end_of_generation_tokens(vocab: &Vocab) -> Vec<u32> {
    let end_of_turn = vocab.tokens.iter().zip(&vocab.token_types).enumerate().filter_map(|(id, (text, &ty))| {
        (ty == token_type::CONTROL && END_OF_TURN_TEXTS.contains(&text.as_str())).then_some(id as u32)
    });
    let mut ids: Vec<u32> = vocab.special.eos.into_iter().chain(end_of_turn).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Continues `prompt` (token ids, BOS included when the vocabulary adds one) with up to
/// `opts.max_tokens` tokens, passing each piece of text to `on_text` as soon as it is complete.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    stop_tokens: &[u32],
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<GenerateReport> {
    if prompt.is_empty() {
        bail!("the prompt has no tokens: there is nothing to continue");
    }
    if opts.max_tokens == 0 {
        bail!("generating 0 tokens does nothing (-n must be at least 1)");
    }
    let mut sampler = Sampler::new(opts.sampling)?;
    // The last generated token is never run through the model.
    let positions = (prompt.len() - 1).saturating_add(opts.max_tokens);
    let context = model.config.max_position_embeddings;
    if positions > context {
        bail!(
            "the prompt's {} tokens plus {} to generate exceed the model's context of {context}",
            prompt.len(),
            opts.max_tokens
        );
    }
    let mut cache = model.new_cache(positions);
    let mut stream = TextStream::new(tokenizer, prompt);
    let mut text = String::new();
    let mut emit = |piece: String| -> Result<()> {
        on_text(&piece)?;
        text.push_str(&piece);
        Ok(())
    };

    let start = Instant::now();
    let logits = model.forward(&mut cache, prompt, prompt.len() - 1..prompt.len())?;
    let prompt_seconds = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut next = sampler.sample(&logits);
    let mut token_ids = Vec::new();
    let mut passes = 0usize;
    let stop = loop {
        if stop_tokens.contains(&next) {
            break StopReason::EndOfGeneration;
        }
        token_ids.push(next);
        emit(stream.push(next)?)?;
        if token_ids.len() == opts.max_tokens {
            break StopReason::Length;
        }
        let logits = model.forward(&mut cache, &[next], 0..1)?;
        passes += 1;
        next = sampler.sample(&logits);
    };
    emit(stream.finish()?)?;
    let generation_seconds = start.elapsed().as_secs_f64();

    Ok(GenerateReport {
        text,
        prompt_tokens: prompt.len(),
        generated_tokens: token_ids.len(),
        token_ids,
        stop,
        prompt_seconds,
        prompt_tokens_per_second: prompt.len() as f64 / prompt_seconds,
        decode_passes: passes,
        generation_seconds,
        generation_tokens_per_second: if passes == 0 { 0.0 } else { passes as f64 / generation_seconds },
    })
}

/// Opens the model, tokenizes `prompt` (BOS first only when the vocabulary adds one) and runs
/// [`generate`].
pub fn run(
    model_path: &Path,
    prompt: &str,
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<GenerateReport> {
    if prompt.is_empty() {
        bail!("--prompt is empty: there is nothing to continue");
    }
    let source = ModelSource::open(model_path)?;
    let tokenizer = runtime::tokenizer(&source)?;
    let model = Model::load(&source)?;
    let vocab =
        source.vocab.as_ref().with_context(|| format!("{}: the model carries no tokenizer", model_path.display()))?;
    let stop_tokens = end_of_generation_tokens(vocab);
    let tokens = tokenizer.encode(prompt).context("--prompt")?;
    generate(&model, &tokenizer, &stop_tokens, &tokens, opts, on_text)
        .with_context(|| format!("{}", model_path.display()))
}

#[cfg(test)]
mod tests {
    use calibration::TokenizerOptions;
    use serde_json::json;

    use super::*;

    fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingOptions {
        SamplingOptions { temperature, top_k, top_p, seed }
    }

    #[test]
    fn greedy_takes_the_first_largest_logit() {
        assert_eq!(argmax(&[0.5, 2.0, -1.0, 2.0]), 1);
        let mut greedy = Sampler::new(sampling(0.0, 40, 0.95, 7)).unwrap();
        assert_eq!(greedy.sample(&[0.0, 1.0, 3.0, 3.0, 2.0]), 2);
    }

    #[test]
    fn top_k_keeps_the_largest_in_a_fixed_order() {
        let logits = [1.0, 4.0, 2.0, 4.0, 3.0];
        assert_eq!(top_k(&logits, 3), [(1, 4.0), (3, 4.0), (4, 3.0)]);
        assert_eq!(top_k(&logits, 0).iter().map(|c| c.0).collect::<Vec<_>>(), [1, 3, 4, 2, 0]);
    }

    #[test]
    fn top_p_keeps_the_shortest_prefix_reaching_p() {
        // Probabilities 0.5, 0.25, 0.125, 0.125.
        let ln = |p: f32| p.ln();
        let all = vec![(0, ln(0.5)), (1, ln(0.25)), (2, ln(0.125)), (3, ln(0.125))];
        for (p, keep) in [(0.4, 1), (0.7, 2), (0.8, 3), (1.0, 4)] {
            let mut c = all.clone();
            top_p(&mut c, p);
            assert_eq!(c.len(), keep, "top_p {p}");
        }
    }

    #[test]
    fn draw_follows_the_cumulative_distribution() {
        let probs = [0.5, 0.25, 0.25];
        assert_eq!(draw(&probs, 0.0), 0);
        assert_eq!(draw(&probs, 0.49), 0);
        assert_eq!(draw(&probs, 0.5), 1);
        assert_eq!(draw(&probs, 0.99), 2);
        assert_eq!(draw(&[0.3, 0.3], 0.9), 1, "rounding short of u falls back to the last");
    }

    #[test]
    fn sampling_repeats_for_a_seed_and_matches_the_tempered_distribution() {
        let logits: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
        let run = |seed| {
            let mut s = Sampler::new(sampling(1.0, 0, 1.0, seed)).unwrap();
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let draws = run(3);
        let mut want = logits.clone();
        math::softmax(&mut want);
        for (id, p) in want.iter().enumerate() {
            let seen = draws.iter().filter(|&&d| d == id as u32).count() as f32 / draws.len() as f32;
            assert!((seen - p).abs() < 0.03, "token {id}: drawn {seen}, probability {p}");
        }
        let mut top2 = Sampler::new(sampling(5.0, 2, 1.0, 4)).unwrap();
        assert!((0..200).all(|_| top2.sample(&logits) >= 6), "top-k 2 only ever draws the two largest");
    }

    #[test]
    fn bad_sampling_options_are_refused() {
        assert!(Sampler::new(sampling(-1.0, 40, 0.9, 0)).is_err());
        assert!(Sampler::new(sampling(f32::NAN, 40, 0.9, 0)).is_err());
        assert!(Sampler::new(sampling(0.8, 40, 0.0, 0)).is_err());
        assert!(Sampler::new(sampling(0.8, 40, 1.5, 0)).is_err());
    }

    /// A byte-level BPE without merges: `é` (bytes C3 A9, GPT-2 chars `Ã` `©`) takes two tokens.
    fn byte_level_tokenizer() -> Tokenizer {
        let chars = ["<|endoftext|>", "a", "Ġ", "Ã", "©", "b"];
        let vocab: serde_json::Map<String, serde_json::Value> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": []},
        });
        Tokenizer::from_json(&tokenizer, TokenizerOptions::default()).unwrap()
    }

    #[test]
    fn text_stream_holds_split_characters_back() {
        let tokenizer = byte_level_tokenizer();
        assert_eq!(tokenizer.encode("a é").unwrap(), [1, 2, 3, 4]);
        let mut stream = TextStream::new(&tokenizer, &[1]);
        let pieces: Vec<String> = [2, 3, 4, 5].iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(pieces, [" ", "", "é", "b"]);
        assert_eq!(stream.finish().unwrap(), "");
    }

    #[test]
    fn text_stream_gives_up_on_characters_that_never_complete() {
        let tokenizer = byte_level_tokenizer();
        let mut stream = TextStream::new(&tokenizer, &[]);
        let mut text: String = [3, 3].iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(text, "", "a lead byte might still be completed");
        text += &stream.finish().unwrap();
        assert!(text.chars().all(|c| c == char::REPLACEMENT_CHARACTER) && !text.is_empty(), "{text:?}");
        let mut stream = TextStream::new(&tokenizer, &[]);
        let held: String = [3, 3, 3, 3, 1].iter().map(|&id| stream.push(id).unwrap()).collect();
        assert!(held.ends_with('a'), "{held:?}");
    }

    #[test]
    fn generation_ends_at_eos_and_the_chat_end_tokens() {
        let vocab = Vocab {
            model: "gpt2".into(),
            pre: None,
            tokens: ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>"].map(String::from).to_vec(),
            token_types: vec![token_type::CONTROL, token_type::CONTROL, token_type::CONTROL, token_type::NORMAL],
            scores: None,
            merges: vec![],
            special: crate::model::vocab::SpecialTokens { eos: Some(1), ..Default::default() },
            add_bos: None,
            add_eos: None,
            add_space_prefix: None,
            chat_template: None,
        };
        assert_eq!(end_of_generation_tokens(&vocab), [0, 1, 2], "a normal token spelled <|end|> does not end it");
    }
}
