//! The safetensors element types qforge reads and writes, and their decoding to `f32`.
//!
//! Decoding works on raw little-endian bytes, never on a cast `&[f32]`/`&[u16]`: a tensor's data inside
//! a memory map carries no alignment promise.

use crate::blocks::float;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    pub const ALL: [Dtype; 10] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U8,
        Dtype::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// The name a safetensors header uses.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Whether the type has an `f32` value (everything but BOOL).
    pub fn is_numeric(self) -> bool {
        self != Dtype::Bool
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes `src` (exactly `dst.len()` elements of `dtype`, little-endian) into `dst`.
/// The caller checks both lengths and that the type is numeric.
pub(super) fn decode_to_f32(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size());
    match dtype {
        Dtype::F64 => float::dequantize_f64(src, dst),
        Dtype::F32 => float::dequantize_f32(src, dst),
        Dtype::F16 => float::dequantize_f16(src, dst),
        Dtype::BF16 => float::dequantize_bf16(src, dst),
        Dtype::I64 => decode_ints::<8>(src, dst, |b| i64::from_le_bytes(b) as f32),
        Dtype::I32 => decode_ints::<4>(src, dst, |b| i32::from_le_bytes(b) as f32),
        Dtype::I16 => decode_ints::<2>(src, dst, |b| i16::from_le_bytes(b) as f32),
        Dtype::I8 => decode_ints::<1>(src, dst, |b| i8::from_le_bytes(b) as f32),
        Dtype::U8 => decode_ints::<1>(src, dst, |b| b[0] as f32),
        Dtype::Bool => unreachable!("callers reject BOOL before decoding"),
    }
}

fn decode_ints<const N: usize>(src: &[u8], dst: &mut [f32], decode: impl Fn([u8; N]) -> f32) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(N)) {
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(s);
        *d = decode(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn names_round_trip_and_match_the_safetensors_crate() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            let theirs: safetensors::Dtype = serde_json::from_value(serde_json::json!(d.name())).unwrap();
            assert_eq!(theirs.bitsize(), 8 * d.size(), "{d}");
        }
        assert_eq!(Dtype::from_name("F8_E4M3"), None);
        assert_eq!(Dtype::from_name("f32"), None);
    }

    #[test]
    fn every_numeric_type_decodes_to_the_same_values() {
        let values = [0.0f64, 1.0, -2.0, 7.0, 100.0, -128.0];
        let expected: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let encodings: [(Dtype, Vec<u8>); 9] = [
            (Dtype::F64, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (Dtype::F32, values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()),
            (Dtype::F16, values.iter().flat_map(|&v| f16::from_f64(v).to_le_bytes()).collect()),
            (Dtype::BF16, values.iter().flat_map(|&v| bf16::from_f64(v).to_le_bytes()).collect()),
            (Dtype::I64, values.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect()),
            (Dtype::I32, values.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect()),
            (Dtype::I16, values.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect()),
            (Dtype::I8, values.iter().flat_map(|&v| (v as i8).to_le_bytes()).collect()),
            (Dtype::U8, values.iter().map(|&v| (v as i64).rem_euclid(256) as u8).collect()),
        ];
        for (dtype, bytes) in encodings {
            let mut out = vec![f32::NAN; values.len()];
            decode_to_f32(dtype, &bytes, &mut out);
            if dtype == Dtype::U8 {
                assert_eq!(out, [0.0, 1.0, 254.0, 7.0, 100.0, 128.0]);
            } else {
                assert_eq!(out, expected, "{dtype}");
            }
        }
    }

    #[test]
    fn f16_decoding_matches_the_scalar_conversion_on_every_bit_pattern_and_odd_offsets() {
        let patterns: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        // One byte in: the element data is deliberately misaligned for u16.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&patterns);
        let src = &shifted[1..];
        let mut out = vec![0f32; 1 << 16];
        decode_to_f32(Dtype::F16, src, &mut out);
        for (bits, got) in (0..=u16::MAX).zip(&out) {
            let want = f16::from_bits(bits).to_f32();
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{bits:#06x}");
        }
    }
}
