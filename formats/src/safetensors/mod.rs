//! safetensors: zero-copy reading of single-file and sharded checkpoints, and a streaming, sharding writer.
//!
//! - [`dtype`]: element types and their decoding to `f32`.
//! - `reader`: one memory-mapped file and its validated header.
//! - `sharded`: the `model.safetensors.index.json` of a sharded checkpoint.
//! - [`Checkpoint`]: any of these as one set of tensors.
//! - [`Writer`]: streams tensors into one file or transformers-style shards plus index.

mod checkpoint;
pub mod dtype;
mod reader;
mod sharded;
mod writer;

#[cfg(test)]
mod tests;

pub use checkpoint::{Checkpoint, TensorRef};
pub use dtype::Dtype;
pub use writer::{parse_size, TensorPlan, Writer};

/// File name of a single-file checkpoint, as transformers writes it.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";
