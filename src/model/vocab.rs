//! Tokenizer metadata between Hugging Face files and GGUF.
//!
//! [`Vocab`] holds what llama.cpp's `tokenizer.ggml.*` keys hold. It is read from / written to
//! `tokenizer.json` + `tokenizer_config.json` (byte-level BPE as GPT-2, SmolLM2, Llama 3 and Qwen2 use;
//! SentencePiece-style vocabularies with scores as a Unigram model) and from / to GGUF metadata.
//! A byte-level BPE's pre-tokenizer is named in GGUF (`tokenizer.ggml.pre`); [`PRE_TOKENIZERS`] is
//! the one table that relates those names to `tokenizer.json` pre-tokenizer definitions.

use anyhow::{bail, Context, Result};
use formats::gguf::{GgufFile, MetadataValue};
use serde_json::{json, Map, Value};

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Byte-level BPE pre-tokenizers llama.cpp knows by name, as `tokenizer.json` spells them.
const PRE_TOKENIZERS: &[(&str, &str)] = &[
    (
        "smollm",
        r#"{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]}"#,
    ),
    ("gpt-2", r#"{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}"#),
    (
        "llama-bpe",
        r#"{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}]}"#,
    ),
    (
        "qwen2",
        r#"{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},"behavior":"Isolated","invert":false},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}]}"#,
    ),
];

/// Special token ids.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
}

/// A model's vocabulary and tokenizer settings, as GGUF stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece-style, with scores).
    pub model: String,
    /// Pre-tokenizer name for `gpt2` vocabularies.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Option<Vec<f32>>,
    /// BPE merges as `"left right"`.
    pub merges: Vec<String>,
    pub special: SpecialTokens,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

fn string_array(v: Option<&MetadataValue>) -> Option<Vec<String>> {
    v?.as_array()?.items.iter().map(|x| x.as_str().map(str::to_string)).collect()
}

impl Vocab {
    /// Reads `tokenizer.ggml.*`; `None` when the file carries no vocabulary.
    pub fn from_gguf(file: &GgufFile) -> Result<Option<Self>> {
        let path = file.path().display();
        let Some(model) = file.get("tokenizer.ggml.model").and_then(MetadataValue::as_str) else {
            return Ok(None);
        };
        let tokens = string_array(file.get("tokenizer.ggml.tokens"))
            .with_context(|| format!("{path}: tokenizer.ggml.tokens missing or not a string array"))?;
        let token_types = match file.get("tokenizer.ggml.token_type").and_then(MetadataValue::as_array) {
            Some(a) => a
                .items
                .iter()
                .map(|x| x.as_i64().map(|t| t as i32))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{path}: tokenizer.ggml.token_type is not an integer array"))?,
            None => vec![token_type::NORMAL; tokens.len()],
        };
        let scores = match file.get("tokenizer.ggml.scores").and_then(MetadataValue::as_array) {
            Some(a) => Some(
                a.items
                    .iter()
                    .map(|x| x.as_f64().map(|s| s as f32))
                    .collect::<Option<Vec<_>>>()
                    .with_context(|| format!("{path}: tokenizer.ggml.scores is not a float array"))?,
            ),
            None => None,
        };
        if token_types.len() != tokens.len() || scores.as_ref().is_some_and(|s| s.len() != tokens.len()) {
            bail!("{path}: tokenizer arrays have different lengths");
        }
        let id = |k: &str| file.get(&format!("tokenizer.ggml.{k}")).and_then(MetadataValue::as_u64).map(|x| x as u32);
        let flag = |k: &str| file.get(&format!("tokenizer.ggml.{k}")).and_then(MetadataValue::as_bool);
        Ok(Some(Self {
            model: model.to_string(),
            pre: file.get("tokenizer.ggml.pre").and_then(MetadataValue::as_str).map(str::to_string),
            tokens,
            token_types,
            scores,
            merges: string_array(file.get("tokenizer.ggml.merges")).unwrap_or_default(),
            special: SpecialTokens {
                bos: id("bos_token_id"),
                eos: id("eos_token_id"),
                unk: id("unknown_token_id"),
                sep: id("seperator_token_id").or(id("separator_token_id")),
                pad: id("padding_token_id"),
            },
            add_bos: flag("add_bos_token"),
            add_eos: flag("add_eos_token"),
            add_space_prefix: flag("add_space_prefix"),
            chat_template: file.get("tokenizer.chat_template").and_then(MetadataValue::as_str).map(str::to_string),
        }))
    }

    /// The `tokenizer.*` keys in the order llama.cpp's converter writes them.
    pub fn to_gguf_metadata(&self) -> Vec<(String, MetadataValue)> {
        let key = |k: &str| format!("tokenizer.ggml.{k}");
        let mut kv = Vec::new();
        if let Some(b) = self.add_space_prefix {
            kv.push((key("add_space_prefix"), MetadataValue::Bool(b)));
        }
        if let Some(b) = self.add_bos {
            kv.push((key("add_bos_token"), MetadataValue::Bool(b)));
        }
        if let Some(b) = self.add_eos {
            kv.push((key("add_eos_token"), MetadataValue::Bool(b)));
        }
        kv.push((key("model"), MetadataValue::String(self.model.clone())));
        if let Some(p) = &self.pre {
            kv.push((key("pre"), MetadataValue::String(p.clone())));
        }
        kv.push((key("tokens"), MetadataValue::string_array(self.tokens.clone())));
        if let Some(s) = &self.scores {
            kv.push((key("scores"), MetadataValue::f32_array(s.clone())));
        }
        kv.push((key("token_type"), MetadataValue::i32_array(self.token_types.clone())));
        if !self.merges.is_empty() {
            kv.push((key("merges"), MetadataValue::string_array(self.merges.clone())));
        }
        let s = &self.special;
        for (name, v) in [
            ("bos_token_id", s.bos),
            ("eos_token_id", s.eos),
            ("unknown_token_id", s.unk),
            ("seperator_token_id", s.sep),
            ("padding_token_id", s.pad),
        ] {
            if let Some(id) = v {
                kv.push((key(name), MetadataValue::U32(id)));
            }
        }
        if let Some(t) = &self.chat_template {
            kv.push(("tokenizer.chat_template".into(), MetadataValue::String(t.clone())));
        }
        kv
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (the latter may be `Value::Null`).
    /// `vocab_size` pads the token list as llama.cpp does when the embedding has more rows.
    pub fn from_hf(tokenizer: &Value, config: &Value, vocab_size: Option<usize>) -> Result<Self> {
        let model = &tokenizer["model"];
        let mut entries: Vec<(usize, String, f32)> = Vec::new();
        let kind = model["type"].as_str().unwrap_or("");
        match kind {
            "BPE" => {
                let vocab = model["vocab"].as_object().context("tokenizer.json: model.vocab is not an object")?;
                for (tok, id) in vocab {
                    let id = id.as_u64().context("tokenizer.json: a vocab id is not an integer")?;
                    entries.push((id as usize, tok.clone(), 0.0));
                }
            }
            "Unigram" => {
                let vocab = model["vocab"].as_array().context("tokenizer.json: model.vocab is not an array")?;
                for (id, pair) in vocab.iter().enumerate() {
                    let tok = pair[0].as_str().context("tokenizer.json: a Unigram entry has no token")?;
                    entries.push((id, tok.to_string(), pair[1].as_f64().unwrap_or(0.0) as f32));
                }
            }
            other => bail!("tokenizer.json: unsupported tokenizer model {other:?} (supported: BPE, Unigram)"),
        }
        let added = tokenizer["added_tokens"].as_array().cloned().unwrap_or_default();
        for t in &added {
            let id = t["id"].as_u64().context("tokenizer.json: added token without id")? as usize;
            let content = t["content"].as_str().context("tokenizer.json: added token without content")?;
            if !entries.iter().any(|(i, _, _)| *i == id) {
                entries.push((id, content.to_string(), 0.0));
            }
        }
        let n = entries.iter().map(|(i, _, _)| i.saturating_add(1)).max().unwrap_or(0).max(vocab_size.unwrap_or(0));
        if n > 16 << 20 {
            bail!("tokenizer.json: token id {n} is implausibly large");
        }
        // Ids are dense in real vocabularies (the model's embedding may add padding rows); a sparse id
        // would make a tiny file allocate a table as large as the id.
        let dense = vocab_size.unwrap_or(0).max(2 * entries.len());
        if let Some((id, tok, _)) = entries.iter().find(|(id, _, _)| *id >= dense) {
            bail!(
                "tokenizer.json: token {tok:?} has id {id}, beyond a vocabulary of {} entries{}",
                entries.len(),
                vocab_size.map(|v| format!(" and a model vocabulary of {v}")).unwrap_or_default()
            );
        }
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut scores = vec![0f32; n];
        for (id, tok, score) in entries {
            if tokens[id].is_some() {
                bail!("tokenizer.json: token id {id} appears twice");
            }
            tokens[id] = Some(tok);
            scores[id] = score;
        }
        let is_spm = kind == "Unigram";
        let unk = match kind {
            "Unigram" => model["unk_id"].as_u64().map(|x| x as u32),
            _ => None,
        };
        let mut token_types = vec![token_type::NORMAL; n];
        for (id, tok) in tokens.iter().enumerate() {
            if tok.is_none() {
                token_types[id] = token_type::UNUSED;
            } else if is_spm && tok.as_deref().is_some_and(is_byte_token) {
                token_types[id] = token_type::BYTE;
            }
        }
        for t in &added {
            let id = t["id"].as_u64().unwrap_or(0) as usize;
            token_types[id] =
                if t["special"].as_bool().unwrap_or(false) { token_type::CONTROL } else { token_type::USER_DEFINED };
        }
        if let Some(u) = unk {
            *token_types
                .get_mut(u as usize)
                .with_context(|| format!("tokenizer.json: unk_id {u} is not a token id"))? = token_type::UNKNOWN;
        }
        let tokens: Vec<String> =
            tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();

        let merges = match &model["merges"] {
            Value::Array(a) => a
                .iter()
                .map(|m| match m {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .context("tokenizer.json: malformed merges")?,
            _ => Vec::new(),
        };
        let find = |field: &str| -> Option<u32> {
            let content = match &config[field] {
                Value::String(s) => s.clone(),
                Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            tokens.iter().position(|t| *t == content).map(|i| i as u32)
        };
        let pre = if is_spm { None } else { Some(pre_tokenizer_name(&tokenizer["pre_tokenizer"])?.to_string()) };
        Ok(Self {
            model: if is_spm { "llama" } else { "gpt2" }.to_string(),
            pre,
            token_types,
            scores: is_spm.then_some(scores),
            merges,
            special: SpecialTokens {
                bos: find("bos_token"),
                eos: find("eos_token"),
                unk: unk.or_else(|| find("unk_token")),
                sep: find("sep_token"),
                pad: find("pad_token"),
            },
            add_bos: config["add_bos_token"].as_bool(),
            add_eos: config["add_eos_token"].as_bool(),
            add_space_prefix: config["add_prefix_space"].as_bool(),
            chat_template: config["chat_template"].as_str().map(str::to_string),
            tokens,
        })
    }

    /// `tokenizer.json` and `tokenizer_config.json` contents that the HF `tokenizers` crate and
    /// transformers load, tokenizing as llama.cpp does from the GGUF.
    pub fn to_hf(&self) -> Result<(Value, Value)> {
        let added: Vec<Value> = self
            .tokens
            .iter()
            .zip(&self.token_types)
            .enumerate()
            .filter(|(_, (_, t))| matches!(**t, token_type::CONTROL | token_type::USER_DEFINED))
            .map(|(id, (tok, t))| {
                let special = *t == token_type::CONTROL;
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": !special, "special": special})
            })
            .collect();
        let tokenizer = match self.model.as_str() {
            "gpt2" => {
                let pre_name = self.pre.as_deref().unwrap_or("gpt-2");
                let pre = PRE_TOKENIZERS
                    .iter()
                    .find(|(n, _)| *n == pre_name || (pre_name == "default" && *n == "gpt-2"))
                    .map(|(_, j)| serde_json::from_str::<Value>(j).expect("table entries are valid JSON"))
                    .with_context(|| format!("BPE pre-tokenizer {pre_name:?} is not known to qforge"))?;
                let vocab: Map<String, Value> =
                    self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added, "normalizer": null, "pre_tokenizer": pre,
                    "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                              "ignore_merges": false, "vocab": vocab, "merges": self.merges},
                })
            }
            "llama" => {
                let scores = self.scores.clone().unwrap_or_else(|| vec![0.0; self.tokens.len()]);
                let vocab: Vec<Value> = self.tokens.iter().zip(&scores).map(|(t, s)| json!([t, *s as f64])).collect();
                json!({
                    "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                    "pre_tokenizer": null, "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                    "model": {"type": "Unigram", "unk_id": self.special.unk, "vocab": vocab, "byte_fallback": true},
                })
            }
            other => bail!("tokenizer model {other:?} cannot be written as tokenizer.json (supported: gpt2, llama)"),
        };
        let mut cfg = Map::new();
        let token = |id: Option<u32>| id.and_then(|i| self.tokens.get(i as usize)).map(|t| json!(t));
        for (field, id) in [
            ("bos_token", self.special.bos),
            ("eos_token", self.special.eos),
            ("unk_token", self.special.unk),
            ("sep_token", self.special.sep),
            ("pad_token", self.special.pad),
        ] {
            if let Some(t) = token(id) {
                cfg.insert(field.into(), t);
            }
        }
        for (field, v) in [
            ("add_bos_token", self.add_bos),
            ("add_eos_token", self.add_eos),
            ("add_prefix_space", self.add_space_prefix),
        ] {
            if let Some(b) = v {
                cfg.insert(field.into(), json!(b));
            }
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        cfg.insert(
            "tokenizer_class".into(),
            json!(if self.model == "gpt2" { "GPT2Tokenizer" } else { "LlamaTokenizer" }),
        );
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        cfg.insert("model_max_length".into(), json!(1_000_000_000_000_000_000u64));
        Ok((tokenizer, Value::Object(cfg)))
    }
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// Finds the llama.cpp name of a `tokenizer.json` pre-tokenizer, comparing only the fields that change
/// how text is split.
fn pre_tokenizer_name(pre: &Value) -> Result<&'static str> {
    let wanted = splitting_fields(pre);
    PRE_TOKENIZERS
        .iter()
        .find(|(_, j)| splitting_fields(&serde_json::from_str(j).expect("table entries are valid JSON")) == wanted)
        .map(|(name, _)| *name)
        .with_context(|| {
            format!("tokenizer.json: BPE pre-tokenizer not recognized (known: {}): {pre}", known_pre_names())
        })
}

fn known_pre_names() -> String {
    PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

fn splitting_fields(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let keep = [
                "type",
                "pretokenizers",
                "individual_digits",
                "pattern",
                "behavior",
                "invert",
                "use_regex",
                "add_prefix_space",
            ];
            Value::Object(
                o.iter()
                    .filter(|(k, _)| keep.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), splitting_fields(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(splitting_fields).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_id_of_u64_max_is_an_error_not_an_overflow() {
        let tokenizer = json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": u64::MAX}, "merges": []}});
        let err = Vocab::from_hf(&tokenizer, &Value::Null, None).unwrap_err();
        assert!(err.to_string().contains("implausibly large"), "{err}");
    }

    #[test]
    fn sparse_token_ids_are_refused_before_the_table_is_built() {
        // Found by fuzzing: a 4 KB tokenizer.json with one id of 2,011,213 built a 2M-entry table.
        let tokenizer = json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 2_011_213}, "merges": []}});
        let err = Vocab::from_hf(&tokenizer, &Value::Null, None).unwrap_err().to_string();
        assert!(err.contains(r#"token "b" has id 2011213, beyond a vocabulary of 2 entries"#), "{err}");
        let err = Vocab::from_hf(&tokenizer, &Value::Null, Some(1000)).unwrap_err().to_string();
        assert!(err.contains("and a model vocabulary of 1000"), "{err}");
        // Padding rows of the model's embedding and small gaps are fine.
        let (mut padded, cfg) = tiny_bpe().to_hf().unwrap();
        let n = padded["model"]["vocab"].as_object().unwrap().len();
        padded["model"]["vocab"]["gap"] = json!(2 * n - 1);
        assert_eq!(Vocab::from_hf(&padded, &cfg, None).unwrap().tokens.len(), 2 * n);
        assert_eq!(Vocab::from_hf(&padded, &cfg, Some(3 * n)).unwrap().tokens.len(), 3 * n);
    }

    fn tiny_bpe() -> Vocab {
        Vocab {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens: vec!["<|endoftext|>".into(), "a".into(), "b".into(), "ab".into(), "Ġ".into()],
            token_types: vec![3, 1, 1, 1, 1],
            scores: None,
            merges: vec!["a b".into()],
            special: SpecialTokens { bos: Some(0), eos: Some(0), unk: Some(0), sep: None, pad: Some(0) },
            add_bos: Some(false),
            add_eos: None,
            add_space_prefix: Some(false),
            chat_template: Some("{{ x }}".into()),
        }
    }

    #[test]
    fn bpe_vocab_round_trips_through_hf_files() {
        let v = tiny_bpe();
        let (tok, cfg) = v.to_hf().unwrap();
        let back = Vocab::from_hf(&tok, &cfg, None).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn spm_vocab_round_trips_through_hf_files() {
        let v = Vocab {
            model: "llama".into(),
            pre: None,
            tokens: vec!["<unk>".into(), "<s>".into(), "</s>".into(), "<0x0A>".into(), "\u{2581}a".into()],
            token_types: vec![2, 3, 3, 6, 1],
            scores: Some(vec![0.0, 0.0, 0.0, 0.0, -3.5]),
            merges: vec![],
            special: SpecialTokens { bos: Some(1), eos: Some(2), unk: Some(0), sep: None, pad: None },
            add_bos: Some(true),
            add_eos: Some(false),
            add_space_prefix: Some(true),
            chat_template: None,
        };
        let (tok, cfg) = v.to_hf().unwrap();
        assert_eq!(Vocab::from_hf(&tok, &cfg, None).unwrap(), v);
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let (mut tok, cfg) = tiny_bpe().to_hf().unwrap();
        tok["pre_tokenizer"] = json!({"type": "Whitespace"});
        let err = Vocab::from_hf(&tok, &cfg, None).unwrap_err().to_string();
        assert!(err.contains("pre-tokenizer not recognized"), "{err}");
    }

    #[test]
    fn short_vocab_is_padded_to_the_embedding_rows() {
        let (tok, cfg) = tiny_bpe().to_hf().unwrap();
        let v = Vocab::from_hf(&tok, &cfg, Some(8)).unwrap();
        assert_eq!(v.tokens.len(), 8);
        assert_eq!(v.tokens[7], "[PAD7]");
        assert_eq!(v.token_types[7], token_type::UNUSED);
    }
}
