//! LoRA adapter files: what they say and how their tensors are named, with no merge math.
//!
//! - [`peft`]: a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`), its
//!   configuration fields, and the grammar of the tensor names PEFT saves.
//! - [`gguf`]: llama.cpp's LoRA GGUF (`general.type = adapter`): its keys, its `.lora_a` / `.lora_b`
//!   tensor names, and a reader that pairs them up.

pub mod gguf;
pub mod peft;
