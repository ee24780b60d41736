//! safetensors (to be written).
