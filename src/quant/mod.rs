//! Quantization to llama.cpp's block formats.
//!
//! - [`tensor`]: [`quantize_tensor`], one tensor's rows to blocks in parallel, deterministic at any
//!   thread count; the building block the model-level commands (and GPTQ/AWQ, LoRA merges) share.
//! - [`presets`]: the presets llama.cpp users know (`Q4_K_M`, ...) and the per-tensor type plan they
//!   imply, ported from llama.cpp's `llama-quant.cpp`.
//! - [`imatrix`]: llama.cpp importance-matrix files (GGUF and legacy `.dat`), read and written.
//! - [`file`]: `qforge quantize`, a whole model streamed tensor by tensor into a quantized GGUF.
//! - [`gptq`]: GPTQ for one linear layer (Hessian accumulation, error-feedback rounding) and RTN on the
//!   same grouped integer grid.
//! - [`method`]: `qforge quantize --method --format`: validation and orchestration of each pair.
//! - [`activations`]: the calibration activations the layer-by-layer quantizers carry between blocks.
//! - [`packed_export`]: GPTQ/AWQ Hugging Face directories (packed integer linears, f16 elsewhere).

pub mod activations;
pub mod awq;
pub mod file;
pub mod gptq;
pub mod imatrix;
pub mod method;
pub mod packed_export;
pub mod presets;
pub mod tensor;

pub use file::{dry_run, quantize, ModelPlan, QuantizeOptions, QuantizeReport};
pub use imatrix::{Imatrix, ImatrixEntry};
pub use presets::{plan, ModelShape, PlanOptions, PlannedTensor, Preset, TensorDesc, TensorTypeRule};
pub use tensor::{quantize_tensor, QuantizeError};
