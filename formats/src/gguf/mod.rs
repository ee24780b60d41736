//! GGUF v2/v3: a memory-mapped, validating reader and a streaming writer.
//!
//! A GGUF file is a header (magic, version, tensor and metadata counts), the metadata key/value pairs,
//! one info per tensor (name, dims, type, offset), zero padding up to the alignment, and the tensor
//! data, each tensor starting at an aligned offset. Version 2 and 3 share this layout (version 1 had
//! 32-bit counts); only little-endian files are handled.
//!
//! - [`value`]: metadata value types and values.
//! - [`tensor`]: tensor infos, writer plans, and the shape rules they obey.
//! - [`reader`]: [`GgufFile`], which validates the whole header and layout at open and then hands out
//!   zero-copy slices of the map.
//! - [`writer`]: [`GgufWriter`], which writes the header up front and then the data tensor by tensor,
//!   in the same layout llama.cpp and gguf-py produce.

mod cursor;
mod index;
mod parse;
pub mod reader;
pub mod tensor;
pub mod value;
pub mod writer;

#[cfg(test)]
mod tests;

pub use reader::GgufFile;
pub use tensor::{TensorInfo, TensorPlan, MAX_DIMS};
pub use value::{MetadataArray, MetadataValue, ValueType, MAX_ARRAY_DEPTH};
pub use writer::GgufWriter;

pub const MAGIC: &[u8; 4] = b"GGUF";
/// The version [`GgufWriter`] writes.
pub const VERSION: u32 = 3;
pub const ALIGNMENT_KEY: &str = "general.alignment";
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// `offset` rounded up to a multiple of `alignment`.
pub fn align_offset(offset: u64, alignment: u64) -> u64 {
    offset.next_multiple_of(alignment)
}

/// The data alignment a file with this metadata uses: `general.alignment`, which must be a `u32`
/// power of two and a multiple of 8, or 32 when absent.
fn alignment_from(metadata: &[(String, MetadataValue)]) -> Result<u64, String> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, MetadataValue::U32(a))) if a.is_power_of_two() && a % 8 == 0 => Ok((*a).into()),
        Some((_, MetadataValue::U32(a))) => {
            Err(format!("{ALIGNMENT_KEY} is {a}, not a power of two that is a multiple of 8"))
        }
        Some((_, v)) => Err(format!("{ALIGNMENT_KEY} must be a u32, not {}", v.value_type())),
    }
}
