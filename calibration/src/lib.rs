//! qforge's text side: turning text into the token ids a model was trained on.
//!
//! - [`tokenizer`]: a tokenizer built from a `tokenizer.json` document (an HF model's own, or the one
//!   `qforge::model::Vocab::to_hf` derives from a GGUF vocabulary), with llama.cpp's BOS rule.
//! - [`corpus`]: calibration text, the embedded default (Shakespeare) or `--calib` files.
//! - [`sampling`]: seeded windows of calibration tokens (`--nsamples` x `--seqlen`, `--seed`).

pub mod corpus;
pub mod sampling;
pub mod tokenizer;

pub use corpus::Corpus;
pub use sampling::{sample, CalibrationSet, SamplingOptions, SplitMix64};
pub use tokenizer::{Tokenizer, TokenizerOptions};
