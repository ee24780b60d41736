//! Measuring a model: perplexity as llama.cpp's `llama-perplexity` or the GPTQ papers compute it
//! ([`perplexity`]); its divergence from a baseline model ([`kld`]), which may be stored
//! ([`logits_file`]); the regression gate over both ([`check`]).
//! [`imatrix`]: the importance matrix of a model over calibration text, as `llama-imatrix` computes it.

pub mod check;
pub mod generate;
pub mod imatrix;
pub mod kld;
pub mod logits_file;
pub mod perplexity;
