//! qforge's file-format crate: bytes in, typed tensors out.
//!
//! It owns every on-disk layout qforge reads or writes and nothing else: no model math, no tokenizer.
//! - [`ggml_type`]: the one table of GGML tensor types (id, name, block size, bytes per block, decoder,
//!   encoder); [`blocks`] holds the per-format codecs the table points to.
//! - [`gguf`]: GGUF v2/v3 reader (lazily mapped) and streaming writer.
//! - [`safetensors`]: single-file and sharded safetensors reader (zero-copy) and streaming, sharding writer.
//! - [`lora`]: LoRA adapter files (PEFT directories, llama.cpp LoRA GGUFs): configs and tensor names.
//! - [`output`]: atomic output files (temporary file in the target directory, fsync, rename).
//! - [`packed`]: GPTQ (v1) and AWQ (GEMM) packed integer weights and their quantization configs.
//!
//! Every length read from a file is checked against the file's size before anything is allocated from it,
//! and every error names the file it came from.

pub mod blocks;
pub mod error;
pub mod ggml_type;
pub mod gguf;
pub mod lora;
pub mod output;
pub mod packed;
pub mod safetensors;

pub use error::{Error, ErrorKind, Result};
pub use ggml_type::{GgmlType, TypeTraits};
