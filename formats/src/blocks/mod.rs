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
mod scale_search;

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

/// ggml's `nearest_int`: rounds half to even by adding 1.5·2²³ so the integer lands in the mantissa.
/// Encoders use it (not `f32::round`) wherever llama.cpp does, because ties round differently.
/// Meaningful for |x| < 2²²; larger or non-finite inputs give an arbitrary value that callers clamp.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The element of largest magnitude, sign kept (the first one on ties), as llama.cpp's symmetric
/// encoders pick it: it maps to the most negative level.
#[inline]
pub(crate) fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Block minimum and maximum, compared as llama.cpp does (NaN never replaces a bound).
#[inline]
pub(crate) fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| {
        (if v < lo { v } else { lo }, if v > hi { v } else { hi })
    })
}

/// Converts a float to a byte the way llama.cpp's C casts `(int8_t)x` / `(uint8_t)x` compile on x86
/// (truncate to a 32-bit integer, keep the low byte; NaN and out-of-range give 0). Only blocks whose
/// scale underflows to zero — so every element decodes to 0 anyway — reach such inputs, but matching
/// the C conversion keeps encoded bytes identical to llama.cpp's and gguf-py's there too.
#[inline]
pub(crate) fn c_cast_to_byte(x: f32) -> u8 {
    if x.abs() < 2_147_483_648.0 {
        x as i32 as u8
    } else {
        0
    }
}

/// Packs 32 values below 16 the way the 32-element formats store them: byte `j` holds value `j` in its
/// low nibble and value `j + 16` in its high nibble.
#[inline]
pub(crate) fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0xF) | (q[j + 16] << 4);
    }
}

/// Packs 32 five-bit values as Q5_0/Q5_1 store them: low nibbles as [`pack_nibbles`], bit 4 of value `j`
/// at bit `j` of the little-endian `u32` in `qh`.
#[inline]
pub(crate) fn pack_q5(q: &[u8; 32], qh: &mut [u8], qs: &mut [u8]) {
    pack_nibbles(q, qs);
    let high = q
        .iter()
        .enumerate()
        .fold(0u32, |acc, (j, &v)| acc | (u32::from(v >> 4) & 1) << j);
    qh[..4].copy_from_slice(&high.to_le_bytes());
}

/// Inverse of [`pack_q5`].
#[inline]
pub(crate) fn unpack_q5(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | (((high >> j) & 1) << 4) as u8;
        q[j + 16] = (qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4) as u8;
    }
    q
}

/// The 6-bit (scale, min) pair of sub-block `j` (0..8) from the 12 packed bytes of Q4_K and Q5_K:
/// sub-blocks 0–3 keep both in the low 6 bits of bytes `j` and `j+4`; sub-blocks 4–7 keep their low
/// 4 bits in the nibbles of byte `j+4` and their top 2 bits in the spare top bits of bytes `j-4` and `j`.
#[inline]
pub(crate) fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ggml_type::GgmlType;
    use test_data::Rng;

    #[test]
    fn decoders_handle_consecutive_blocks_independently() {
        let mut rng = Rng::new(99);
        for ty in GgmlType::all().filter(|t| t.traits().dequantize.is_some()) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let bytes: Vec<u8> = (0..3 * ts).map(|_| rng.next_u64() as u8).collect();
            let mut whole = vec![0f32; 3 * bs];
            ty.dequantize(&bytes, &mut whole).unwrap();
            for (i, block) in bytes.chunks(ts).enumerate() {
                let mut one = vec![0f32; bs];
                ty.dequantize(block, &mut one).unwrap();
                let same = one
                    .iter()
                    .zip(&whole[i * bs..])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty} block {i}");
            }
        }
    }

    #[test]
    fn encoders_survive_non_finite_input() {
        let mut x = vec![1.0f32; 64];
        x[3] = f32::NAN;
        x[40] = f32::INFINITY;
        x[41] = f32::NEG_INFINITY;
        for ty in GgmlType::all().filter(|t| t.traits().quantize.is_some()) {
            let quantize = ty.traits().quantize.unwrap();
            let mut bytes = vec![0u8; ty.row_bytes(64).unwrap() as usize];
            quantize(&x, &mut bytes, None);
            quantize(&x, &mut bytes, Some(&[1.0; 64]));
            quantize(&x, &mut bytes, Some(&[0.0; 64]));
        }
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        for (x, n) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
            (-7.6, -8),
            (0.0, 0),
        ] {
            assert_eq!(nearest_int(x), n, "{x}");
        }
    }

    #[test]
    fn c_cast_truncates_and_zeroes_out_of_range() {
        assert_eq!(c_cast_to_byte(15.9), 15);
        assert_eq!(c_cast_to_byte(-1.5), 255);
        assert_eq!(c_cast_to_byte(300.0), 44);
        assert_eq!(c_cast_to_byte(f32::INFINITY), 0);
        assert_eq!(c_cast_to_byte(f32::NAN), 0);
    }

    #[test]
    fn q5_packing_round_trips() {
        let q: [u8; 32] = std::array::from_fn(|i| (i as u8 * 7 + 3) % 32);
        let mut block = [0u8; 20];
        let (qh, qs) = block.split_at_mut(4);
        pack_q5(&q, qh, qs);
        assert_eq!(
            u32::from_le_bytes([block[0], block[1], block[2], block[3]]).count_ones(),
            16
        );
        assert_eq!(unpack_q5(&block[..4], &block[4..]), q);
    }

    #[test]
    fn k4_scales_unpack_all_six_bits() {
        // Sub-block j gets scale 63 - j and min j + 32, packed by hand.
        let mut packed = [0u8; 12];
        for j in 0..8u8 {
            let (sc, m) = (63 - j, j + 32);
            let j = j as usize;
            if j < 4 {
                packed[j] = sc;
                packed[j + 4] = m;
            } else {
                packed[j + 4] = (sc & 0xF) | (m & 0xF) << 4;
                packed[j - 4] |= (sc >> 4) << 6;
                packed[j] |= (m >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(
                scale_min_k4(j, &packed),
                (63 - j as u8, j as u8 + 32),
                "sub-block {j}"
            );
        }
    }
}

/// Deterministic test data shared by the codec tests (no `rand` dependency).
#[cfg(test)]
pub(crate) mod test_data {
    use crate::ggml_type::{DequantizeFn, QuantizeFn};

    /// Encodes `x` (whole 32-element blocks of `block_bytes` each) and decodes it again.
    pub fn round_trip(
        codec: (QuantizeFn, DequantizeFn),
        block_bytes: usize,
        x: &[f32],
        importance: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut bytes = vec![0u8; x.len() / 32 * block_bytes];
        codec.0(x, &mut bytes, importance);
        let mut y = vec![0f32; x.len()];
        codec.1(&bytes, &mut y);
        y
    }

    /// Decoded values match the expected ones up to f32 rounding (checks layout, not operation order).
    pub fn assert_close(decoded: &[f32], expected: &[f32]) {
        assert_eq!(decoded.len(), expected.len());
        for (i, (a, b)) in decoded.iter().zip(expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs() + 1e-6,
                "element {i}: decoded {a}, expected {b}"
            );
        }
    }

    /// Σ w·(x − y)², the error the importance-weighted encoders minimise.
    pub fn weighted_sse(x: &[f32], y: &[f32], w: &[f32]) -> f32 {
        x.iter()
            .zip(y)
            .zip(w)
            .map(|((a, b), w)| w * (a - b) * (a - b))
            .sum()
    }

    /// Importance concentrated on one element per 32-element block (a different one in each block).
    pub fn skewed_importance(n: usize) -> Vec<f32> {
        let mut importance = vec![1e-4f32; n];
        for i in (0..n).step_by(32) {
            importance[i + (i / 32 * 5) % 32] = 1.0;
        }
        importance
    }

    /// xorshift64* — enough for reproducible test rows.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in [-1, 1).
        pub fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        /// A row of `n` values with varied magnitudes per block, like real weights.
        pub fn row(&mut self, n: usize) -> Vec<f32> {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let magnitude = 10f32.powf(self.unit() * 3.0);
                for _ in 0..32 {
                    out.push(self.unit() * magnitude);
                }
            }
            out.truncate(n);
            out
        }
    }

    /// Rows no encoder may mishandle: zeros, a lone outlier, tiny (subnormal-scale) values, mixed signs.
    pub fn adversarial_rows(n: usize) -> Vec<Vec<f32>> {
        let mut rows = vec![vec![0.0; n]];
        let mut outlier = vec![0.001; n];
        outlier[n / 3] = -6.0e4;
        rows.push(outlier);
        rows.push(
            (0..n)
                .map(|i| if i % 2 == 0 { 1.0e-40 } else { -3.0e-39 })
                .collect(),
        );
        rows.push(
            (0..n)
                .map(|i| 1.0e-6 * (i as f32 - n as f32 / 2.0))
                .collect(),
        );
        rows.push(vec![-2.5; n]);
        rows.push((0..n).map(|i| (i % 7) as f32 - 3.0).collect());
        rows
    }
}
