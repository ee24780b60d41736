//! qforge's text side: turning text into the token ids a model was trained on.
//!
//! - [`tokenizer`]: a tokenizer built from a `tokenizer.json` document (an HF model's own, or the one
//!   `qforge::model::Vocab::to_hf` derives from a GGUF vocabulary), with llama.cpp's BOS rule.
//!
//! Calibration corpora and seeded sampling of token sequences will live here too.

pub mod tokenizer;

pub use tokenizer::{Tokenizer, TokenizerOptions};
