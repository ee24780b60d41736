//! The reference runtime: a llama-family forward pass over weights kept in their storage format.
//!
//! - [`model`]: [`Model`], the weights borrowed from an opened [`crate::model::ModelSource`].
//! - [`forward`]: the forward pass, one small function per operation.
//! - [`attention`]: causal grouped-query attention and the [`KvCache`].
//! - [`rope`]: rotary position embedding in either pair layout.
//! - [`math`]: the elementwise loops (softmax, SiLU, log-softmax), written for the vectorizer.
//! - `simd`: run-time dispatch to AVX2 builds of the hot loops.
//! - [`kernels`]: the [`Linear`] interface and its per-format GEMM/GEMV kernels.
//! - [`tokenizer`]: the model's tokenizer, giving llama.cpp's token ids.
//!
//! It runs on the CPU, parallel through rayon (and faer's rayon backend).

pub mod attention;
pub mod forward;
pub mod kernels;
pub mod math;
pub mod model;
pub mod rope;
mod simd;
pub mod tokenizer;

#[cfg(test)]
pub(crate) mod synthetic;
#[cfg(test)]
mod tests;

pub use attention::KvCache;
pub use kernels::{GgmlLinear, Linear};
pub use model::Model;
pub use tokenizer::tokenizer;
