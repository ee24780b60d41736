//! Block codecs, one module per GGML format. The type table in [`crate::ggml_type`] points here.
//!
//! Decoders take whole blocks and write `block_size` f32 values per block; encoders do the reverse.
//! These are the portable reference implementations: the runtime's SIMD kernels are tested against them.

pub mod float;
pub mod iq4_nl;
pub mod iq4_xs;
pub mod q2_k;
pub mod q3_k;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_k;

use half::f16;

/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

#[inline]
pub(crate) fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline]
pub(crate) fn write_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}
