//! Measuring a model: perplexity as llama.cpp's `llama-perplexity` computes it ([`perplexity`]).

pub mod perplexity;
