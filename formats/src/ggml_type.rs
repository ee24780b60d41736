//! The GGML tensor-type table: every type described once.
//!
//! Each entry gives the type's GGUF id, name, elements per block, bytes per block, and the block codecs
//! (in [`crate::blocks`]) that decode blocks to f32 and, where qforge can produce the type, encode f32
//! rows into blocks and describe a block as a grid of levels ([`BlockGrid`]). Readers size tensors from
//! this table, the runtime keys its kernels by [`GgmlType`], and adding a format means adding its row here
//! plus its codec module.

use crate::blocks;
use crate::blocks::grid::BlockGrid;

/// Decodes whole blocks: `src.len()` is a multiple of the type's block bytes and
/// `dst.len() == src.len() / type_size * block_size`.
pub type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);

/// Encodes one row (a whole number of blocks). `importance`, when given, has one non-negative weight per
/// element of the row (the importance matrix's column weights) and steers the scale search; encoders
/// that use row statistics (as llama.cpp's do) need exactly one row per call.
pub type QuantizeFn = fn(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>);

macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, $block:literal, $bytes:literal, $deq:expr, $q:expr, $grid:expr;)*) => {
        /// A GGML tensor storage type, numbered as in GGUF files.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum GgmlType { $($variant = $id,)* }

        static TABLE: &[TypeTraits] = &[
            $(TypeTraits {
                ty: GgmlType::$variant,
                name: $name,
                block_size: $block,
                type_size: $bytes,
                dequantize: $deq,
                quantize: $q,
                grid: $grid,
            },)*
        ];
    };
}

ggml_types! {
    F32     = 0,  "F32",     1,   4,   Some(blocks::float::dequantize_f32),   Some(blocks::float::quantize_f32), None;
    F16     = 1,  "F16",     1,   2,   Some(blocks::float::dequantize_f16),   Some(blocks::float::quantize_f16), None;
    Q4_0    = 2,  "Q4_0",    32,  18,  Some(blocks::q4_0::dequantize),        Some(blocks::q4_0::quantize), Some(&blocks::q4_0::GRID);
    Q4_1    = 3,  "Q4_1",    32,  20,  Some(blocks::q4_1::dequantize),        Some(blocks::q4_1::quantize), Some(&blocks::q4_1::GRID);
    Q5_0    = 6,  "Q5_0",    32,  22,  Some(blocks::q5_0::dequantize),        Some(blocks::q5_0::quantize), Some(&blocks::q5_0::GRID);
    Q5_1    = 7,  "Q5_1",    32,  24,  Some(blocks::q5_1::dequantize),        Some(blocks::q5_1::quantize), Some(&blocks::q5_1::GRID);
    Q8_0    = 8,  "Q8_0",    32,  34,  Some(blocks::q8_0::dequantize),        Some(blocks::q8_0::quantize), Some(&blocks::q8_0::GRID);
    Q8_1    = 9,  "Q8_1",    32,  36,  None,                                  None, None;
    Q2_K    = 10, "Q2_K",    256, 84,  Some(blocks::q2_k::dequantize),        Some(blocks::q2_k::quantize), Some(&blocks::q2_k::GRID);
    Q3_K    = 11, "Q3_K",    256, 110, Some(blocks::q3_k::dequantize),        Some(blocks::q3_k::quantize), Some(&blocks::q3_k::GRID);
    Q4_K    = 12, "Q4_K",    256, 144, Some(blocks::q4_k::dequantize),        Some(blocks::q4_k::quantize), Some(&blocks::q4_k::GRID);
    Q5_K    = 13, "Q5_K",    256, 176, Some(blocks::q5_k::dequantize),        Some(blocks::q5_k::quantize), Some(&blocks::q5_k::GRID);
    Q6_K    = 14, "Q6_K",    256, 210, Some(blocks::q6_k::dequantize),        Some(blocks::q6_k::quantize), Some(&blocks::q6_k::GRID);
    Q8_K    = 15, "Q8_K",    256, 292, Some(blocks::q8_k::dequantize),        None, None;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66,  None,                                  None, None;
    IQ2_XS  = 17, "IQ2_XS",  256, 74,  None,                                  None, None;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98,  None,                                  None, None;
    IQ1_S   = 19, "IQ1_S",   256, 50,  None,                                  None, None;
    IQ4_NL  = 20, "IQ4_NL",  32,  18,  Some(blocks::iq4_nl::dequantize),      Some(blocks::iq4_nl::quantize), Some(&blocks::iq4_nl::GRID);
    IQ3_S   = 21, "IQ3_S",   256, 110, None,                                  None, None;
    IQ2_S   = 22, "IQ2_S",   256, 82,  None,                                  None, None;
    IQ4_XS  = 23, "IQ4_XS",  256, 136, Some(blocks::iq4_xs::dequantize),      Some(blocks::iq4_xs::quantize), Some(&blocks::iq4_xs::GRID);
    I8      = 24, "I8",      1,   1,   None,                                  None, None;
    I16     = 25, "I16",     1,   2,   None,                                  None, None;
    I32     = 26, "I32",     1,   4,   None,                                  None, None;
    I64     = 27, "I64",     1,   8,   None,                                  None, None;
    F64     = 28, "F64",     1,   8,   Some(blocks::float::dequantize_f64),   None, None;
    IQ1_M   = 29, "IQ1_M",   256, 56,  None,                                  None, None;
    BF16    = 30, "BF16",    1,   2,   Some(blocks::float::dequantize_bf16),  Some(blocks::float::quantize_bf16), None;
    TQ1_0   = 34, "TQ1_0",   256, 54,  None,                                  None, None;
    TQ2_0   = 35, "TQ2_0",   256, 66,  None,                                  None, None;
    MXFP4   = 39, "MXFP4",   32,  17,  None,                                  None, None;
}

/// One row of the type table.
#[derive(Debug)]
pub struct TypeTraits {
    pub ty: GgmlType,
    pub name: &'static str,
    /// Elements per block (1 for plain scalar types).
    pub block_size: usize,
    /// Bytes per block.
    pub type_size: usize,
    pub dequantize: Option<DequantizeFn>,
    pub quantize: Option<QuantizeFn>,
    /// How an encoded block is a grid of levels, for quantizers that pick each element's level.
    pub grid: Option<&'static BlockGrid>,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|t| t.ty as u32 == id).map(|t| t.ty)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        TABLE.iter().find(|t| t.name.eq_ignore_ascii_case(name)).map(|t| t.ty)
    }

    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|t| t.ty)
    }

    pub fn traits(self) -> &'static TypeTraits {
        TABLE.iter().find(|t| t.ty == self).expect("every variant has a table row")
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        self.traits().name
    }

    pub fn block_size(self) -> usize {
        self.traits().block_size
    }

    pub fn type_size(self) -> usize {
        self.traits().type_size
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes taken by a row of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        n.is_multiple_of(bs).then(|| n / bs * self.type_size() as u64)
    }

    /// Bytes taken by a tensor of `elements` elements, checked for overflow and whole blocks.
    pub fn tensor_bytes(self, elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !elements.is_multiple_of(bs) {
            return None;
        }
        (elements / bs).checked_mul(self.type_size() as u64)
    }

    /// Bits per weight of the stored data.
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }

    /// Decodes `src` (whole blocks) into `dst`. Fails for types without a decoder or mismatched sizes.
    pub fn dequantize(self, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
        let t = self.traits();
        let Some(f) = t.dequantize else {
            return Err(format!("dequantizing {} is not supported", t.name));
        };
        if !src.len().is_multiple_of(t.type_size) || src.len() / t.type_size * t.block_size != dst.len() {
            return Err(format!("{} data of {} bytes does not hold {} elements", t.name, src.len(), dst.len()));
        }
        f(src, dst);
        Ok(())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for ty in GgmlType::all() {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            assert_eq!(GgmlType::from_name(ty.name()), Some(ty));
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from GGML");
        assert_eq!(GgmlType::from_id(1000), None);
    }

    #[test]
    fn sizes_that_gguf_rs_gets_wrong() {
        assert_eq!(GgmlType::BF16.tensor_bytes(576 * 1536), Some(576 * 1536 * 2));
        assert_eq!(GgmlType::I8.tensor_bytes(100), Some(100));
        assert_eq!(GgmlType::IQ4_NL.tensor_bytes(64), Some(36));
        assert_eq!(GgmlType::Q4_K.row_bytes(576), None);
        assert_eq!(GgmlType::F64.tensor_bytes(u64::MAX / 2), None, "overflow is caught");
    }
}
