//! The tokenizer of an opened model, as llama.cpp builds it from the same vocabulary.

use anyhow::{Context, Result};
use calibration::{Tokenizer, TokenizerOptions};

use crate::model::{ModelSource, Vocab};

/// Builds the model's tokenizer from its vocabulary (GGUF metadata or HF tokenizer files), through the
/// `tokenizer.json` that [`Vocab::to_hf`] derives, so GGUF and HF sources tokenize alike.
pub fn tokenizer(source: &ModelSource) -> Result<Tokenizer> {
    let path = source.path.display();
    let vocab = source.vocab.as_ref().with_context(|| format!("{path}: the model carries no tokenizer"))?;
    let (json, _config) = vocab.to_hf().with_context(|| format!("{path}"))?;
    let options = TokenizerOptions { bos: vocab.special.bos, add_bos: adds_bos(vocab) };
    Tokenizer::from_json(&json, options).with_context(|| format!("{path}"))
}

/// `tokenizer.ggml.add_bos_token` when present, else llama.cpp's default for the vocabulary type:
/// SentencePiece vocabularies add BOS, byte-level BPE ones only with the Llama 3 pre-tokenizer.
fn adds_bos(vocab: &Vocab) -> bool {
    vocab.add_bos.unwrap_or(vocab.model == "llama" || vocab.pre.as_deref() == Some("llama-bpe"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vocab::{token_type, SpecialTokens};

    fn vocab(model: &str, pre: Option<&str>, add_bos: Option<bool>) -> Vocab {
        Vocab {
            model: model.into(),
            pre: pre.map(str::to_string),
            tokens: vec!["<s>".into(), "a".into()],
            token_types: vec![token_type::CONTROL, token_type::NORMAL],
            scores: None,
            merges: vec![],
            special: SpecialTokens { bos: Some(0), ..Default::default() },
            add_bos,
            add_eos: None,
            add_space_prefix: None,
            chat_template: None,
        }
    }

    #[test]
    fn bos_follows_the_metadata_then_llama_cpp_defaults() {
        assert!(adds_bos(&vocab("llama", None, None)), "SentencePiece vocabularies add BOS by default");
        assert!(adds_bos(&vocab("gpt2", Some("llama-bpe"), None)), "so does Llama 3's");
        assert!(!adds_bos(&vocab("gpt2", Some("smollm"), None)));
        assert!(!adds_bos(&vocab("llama", None, Some(false))), "the metadata decides when present");
        assert!(adds_bos(&vocab("gpt2", Some("smollm"), Some(true))));
    }
}
