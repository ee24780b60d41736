//! [`Tokenizer`]: the HF `tokenizers` pipeline, configured to give llama.cpp's token ids.
//!
//! llama.cpp tokenizes text with `parse_special = false` in its evaluation tools: text that spells a
//! special token (`<|endoftext|>`) is tokenized as ordinary text, not as that token. It prepends BOS
//! only when the vocabulary says so (`tokenizer.ggml.add_bos_token`), never by a post-processor.
//! This type follows both rules, so the ids match `llama-tokenize` for the same text.

use anyhow::{Context, Result};
use serde_json::Value;

/// What a tokenizer adds around the text, as the model's vocabulary metadata says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// The BOS id, prepended to every encoded text when `add_bos` is set.
    pub bos: Option<u32>,
    pub add_bos: bool,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    options: TokenizerOptions,
}

impl Tokenizer {
    /// Builds a tokenizer from a `tokenizer.json` document.
    pub fn from_json(tokenizer_json: &Value, options: TokenizerOptions) -> Result<Self> {
        if options.add_bos && options.bos.is_none() {
            anyhow::bail!("the vocabulary asks for a BOS token but names none");
        }
        let mut inner: tokenizers::Tokenizer =
            tokenizer_json
                .to_string()
                .parse()
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("tokenizer.json is not a tokenizer the tokenizers crate can build")?;
        inner.set_encode_special_tokens(true);
        Ok(Self { inner, options })
    }

    pub fn options(&self) -> TokenizerOptions {
        self.options
    }

    /// Token ids of `text`, with BOS first when the vocabulary adds one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        let bos = self.options.bos.filter(|_| self.options.add_bos);
        Ok(bos.into_iter().chain(encoding.get_ids().iter().copied()).collect())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A byte-level BPE over a handful of characters: `a b → ab`, `Ġ ab → Ġab`, with `<|endoftext|>`
    /// as a special token (id 0).
    fn tokenizer_json() -> Value {
        let chars = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab", "<", "|", "e", "n", "d", "o", "f", "t", "x", ">"];
        let vocab: serde_json::Map<String, Value> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), json!(i))).collect();
        json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": ["a b", "Ġ ab"]},
        })
    }

    #[test]
    fn merges_apply_and_bos_follows_the_options() {
        let plain = Tokenizer::from_json(&tokenizer_json(), TokenizerOptions { bos: Some(0), add_bos: false }).unwrap();
        assert_eq!(plain.encode("ab ab").unwrap(), [3, 5]);
        assert_eq!(plain.decode(&[3, 5]).unwrap(), "ab ab");
        let with_bos =
            Tokenizer::from_json(&tokenizer_json(), TokenizerOptions { bos: Some(0), add_bos: true }).unwrap();
        assert_eq!(with_bos.encode("ab ab").unwrap(), [0, 3, 5]);
    }

    #[test]
    fn special_token_text_is_plain_text() {
        let t = Tokenizer::from_json(&tokenizer_json(), TokenizerOptions::default()).unwrap();
        let ids = t.encode("a<|endoftext|>").unwrap();
        assert!(!ids.contains(&0), "{ids:?}");
        assert_eq!(ids.len(), 1 + "<|endoftext|>".len(), "{ids:?}");
    }

    #[test]
    fn bad_definitions_are_errors() {
        let err = Tokenizer::from_json(&tokenizer_json(), TokenizerOptions { bos: None, add_bos: true })
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("names none"), "{err}");
        let err = Tokenizer::from_json(&json!({"model": {"type": "Nonsense"}}), TokenizerOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
