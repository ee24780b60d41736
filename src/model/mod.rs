//! One description of the llama model family (Llama/SmolLM2, Mistral, Qwen2).
//!
//! - [`config`]: hyper-parameters, read from `config.json` or GGUF metadata and written to either.
//! - [`names`]: the single mapping between Hugging Face tensor names and GGUF tensor names, and the
//!   Q/K row permutation llama.cpp's converter applies for the `llama` architecture.
//! - [`vocab`]: tokenizer metadata, between `tokenizer.json`/`tokenizer_config.json` and `tokenizer.ggml.*`.
//! - [`packed`]: GPTQ/AWQ packed linears in an HF directory and the `quantization_config` describing them.
//! - [`source`]: a model opened from either an HF directory or a GGUF file, seen through GGUF names.

pub mod config;
pub mod names;
pub mod packed;
pub mod source;
pub mod vocab;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use source::{ModelSource, SourceTensor};
pub use vocab::Vocab;
