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
        let mut inner: tokenizers::Tokenizer = tokenizer_json
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

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
