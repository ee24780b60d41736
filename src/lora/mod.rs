//! LoRA merging: adapters folded into base models, and PEFT adapters written as llama.cpp LoRA GGUFs.
//!
//! - [`adapter`]: adapters as a merge sees them (modules, scales, saved whole tensors), from a PEFT
//!   directory or a llama.cpp LoRA GGUF, every tensor name accounted for.
//! - [`select`]: PEFT's rules for which modules a config adapts and with which rank and alpha.
//! - [`math`]: the arithmetic (low-rank deltas in f64, DoRA, bias deltas), deterministic at any
//!   thread count.
//! - [`base`]: the model merged into, HF directory or GGUF, as one list of tensors.
//! - [`merge`]: `qforge merge-lora`, streaming the base tensor by tensor.
//! - `packed`: merging into a GPTQ/AWQ base, written in its own format, the merged linears
//!   quantized again by GPTQ on calibration activations or rounded to nearest ([`Requantize`]).
//! - [`export`]: `qforge convert ADAPTER_DIR`, a PEFT adapter written as a llama.cpp LoRA GGUF.

pub mod adapter;
pub mod base;
pub mod export;
pub mod math;
pub mod merge;
mod packed;
pub mod select;

pub use adapter::{Adapter, AdapterSpec};
pub use merge::{merge, MergeOptions, MergeReport};
pub use packed::Requantize;
