//! qforge: convert, quantize, merge and verify small LLM checkpoints.
//!
//! The file formats live in the `formats` crate; this crate holds the model description ([`model`]),
//! the commands' logic ([`convert`], [`inspect`]), the reference runtime ([`runtime`]) and what is measured
//! with it ([`eval`]), and the `qforge` CLI (`src/main.rs`, a thin shell).

pub mod convert;
pub mod eval;
pub mod heap;
pub mod inspect;
pub mod interrupt;
pub mod lora;
pub mod model;
pub mod progress;
pub mod quant;
pub mod runtime;
