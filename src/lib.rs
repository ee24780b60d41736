//! qforge: convert, quantize, merge and verify small LLM checkpoints.
//!
//! The file formats live in the `formats` crate; this crate holds the model description ([`model`]),
//! the commands' logic ([`convert`], [`inspect`]) and the `qforge` CLI (`src/main.rs`, a thin shell).

pub mod convert;
pub mod inspect;
pub mod model;
pub mod progress;
