//! Plain float storage: F32, F16, BF16 (and F64 for reading).

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

pub fn dequantize_f64(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
        *d = f64::from_le_bytes(s.try_into().expect("chunk of 8")) as f32;
    }
}

/// Staged through an aligned buffer so `half`'s slice conversion (F16C when present) applies:
/// converting one element at a time is about twenty times slower.
pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    const CHUNK: usize = 1024;
    let mut staged = [f16::ZERO; CHUNK];
    for (out, bytes) in dst.chunks_mut(CHUNK).zip(src.chunks(2 * CHUNK)) {
        let staged = &mut staged[..out.len()];
        for (h, b) in staged.iter_mut().zip(bytes.chunks_exact(2)) {
            *h = f16::from_le_bytes([b[0], b[1]]);
        }
        staged.convert_to_f32_slice(out);
    }
}

pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
    }
}

pub fn quantize_f32(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

/// Round-to-nearest-even, as numpy's `astype(float16)` and ggml's converter do.
pub fn quantize_f16(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f16::from_f32(*s).to_le_bytes());
    }
}

/// Round-to-nearest-even, NaN kept quiet, as PyTorch's and ggml's bf16 conversions do.
pub fn quantize_bf16(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&bf16::from_f32(*s).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_round_trips() {
        let x = [0.0f32, -1.5, 3.25, 65504.0, 1e-8, f32::INFINITY];
        for (q, dq, exact) in [
            (quantize_f32 as crate::ggml_type::QuantizeFn, dequantize_f32 as crate::ggml_type::DequantizeFn, 4),
            (quantize_f16, dequantize_f16, 2),
            (quantize_bf16, dequantize_bf16, 2),
        ] {
            let mut bytes = vec![0u8; x.len() * exact];
            q(&x, &mut bytes, None);
            let mut y = vec![0f32; x.len()];
            dq(&bytes, &mut y);
            for (a, b) in x.iter().zip(&y) {
                if a.is_infinite() {
                    assert_eq!(a, b);
                } else {
                    assert!((a - b).abs() <= a.abs() * 1e-2 + 1e-7, "{a} vs {b}");
                }
            }
        }
    }
}
