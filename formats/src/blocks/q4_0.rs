//! Q4_0: blocks of 32 four-bit values `q − 8` sharing one f16 scale (18 bytes: `f16 d; u8 qs[16]`,
//! element `j` in the low nibble of byte `j`, element `j + 16` in the high nibble).

use super::grid::{block_codes, uniform_levels, unpack_nibbles, BlockGrid};
use super::{c_cast_to_byte, pack_nibbles, read_f16, scale_search, signed_absmax, write_f16};

const BLOCK: usize = 32;
const BYTES: usize = 18;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(BLOCK)) {
        let d = read_f16(b, 0);
        let (lo, hi) = y.split_at_mut(BLOCK / 2);
        for ((&q, lo), hi) in b[2..].iter().zip(lo).zip(hi) {
            *lo = ((q & 0xF) as i32 - 8) as f32 * d;
            *hi = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Without importance: llama.cpp's `quantize_row_q4_0_ref` (the element of largest magnitude maps to
/// −8, `d = max / −8`). With importance: `quantize_row_q4_0_impl`'s weighted scale search; then `src`
/// must be exactly one row, because the weights depend on the row's mean square.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    match importance {
        None => quantize_plain(src, dst),
        Some(importance) => quantize_weighted(src, dst, importance),
    }
}

fn quantize_plain(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(BYTES)) {
        let d = signed_absmax(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(b, 0, d);
        // Truncation after +8.5 is llama.cpp's rounding; only x = −max can reach 16, hence the clamp.
        let q: [u8; BLOCK] = std::array::from_fn(|j| (c_cast_to_byte(x[j] * id + 8.5) as i8).min(15) as u8);
        pack_nibbles(&q, &mut b[2..]);
    }
}

fn quantize_weighted(src: &[f32], dst: &mut [u8], importance: &[f32]) {
    scale_search::for_each_block(src, importance, dst, BYTES, |x, w, b| {
        let mut q = [0u8; BLOCK];
        write_f16(b, 0, scale_search::symmetric(x, w, 8, &mut q));
        pack_nibbles(&q, &mut b[2..]);
    });
}

/// Levels `−8..=7` under the block scale.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<16>(-8),
    affine: |b, scale, offset| {
        scale.fill(read_f16(b, 0));
        offset.fill(0.0);
    },
    read_codes: |b, codes| unpack_nibbles(&b[2..], codes),
    write_codes: |b, codes| pack_nibbles(block_codes(codes), &mut b[2..]),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{adversarial_rows, skewed_importance, weighted_sse, Rng};
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let q: Vec<u8> = (0..32).map(|i| (i * 7 % 16) as u8).collect();
        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(-1.5).to_le_bytes());
        for j in 0..16 {
            block[2 + j] = q[j] | q[j + 16] << 4;
        }
        let mut y = [0f32; BLOCK];
        dequantize(&block, &mut y);
        for i in 0..BLOCK {
            assert_eq!(y[i], -1.5 * (q[i] as f32 - 8.0), "element {i}");
        }
    }

    fn round_trip(x: &[f32], importance: Option<&[f32]>) -> Vec<f32> {
        crate::blocks::test_data::round_trip((quantize, dequantize), BYTES, x, importance)
    }

    /// Levels span [−8, 7]·|d| with |d| = max|x|/8: the far end (x = −max) is one step off at worst,
    /// everything else half a step, plus the f16 error of d times up to 8 levels.
    fn check_plain(x: &[f32]) {
        let y = round_trip(x, None);
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0;
            let bound = d * 1.0001 + 8.0 * (d - f16::from_f32(d).to_f32()).abs() + 1e-30;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
            }
        }
    }

    #[test]
    fn round_trip_random_and_adversarial_rows() {
        let mut rng = Rng::new(40);
        for _ in 0..50 {
            check_plain(&rng.row(256));
        }
        for row in adversarial_rows(128) {
            check_plain(&row);
        }
    }

    #[test]
    fn largest_magnitude_maps_to_minus_eight() {
        let mut x = [0.25f32; BLOCK];
        x[9] = -4.0;
        let mut b = [0u8; BYTES];
        quantize(&x, &mut b, None);
        assert_eq!(b[2 + 9] & 0xF, 0);
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 0.5);
    }

    #[test]
    fn weighted_search_favours_important_elements() {
        let mut rng = Rng::new(41);
        let x = rng.row(1024);
        let importance = skewed_importance(x.len());
        let plain = weighted_sse(&x, &round_trip(&x, None), &importance);
        let weighted = weighted_sse(&x, &round_trip(&x, Some(&importance)), &importance);
        assert!(weighted < 0.2 * plain, "{weighted} vs {plain}");
    }

    /// With even importance the least-squares scale stays near max|x|/8, so errors stay within ~2 steps.
    /// (Skewed importance may shrink the scale and clamp the largest elements; llama.cpp does the same.)
    fn check_weighted_bounded(x: &[f32], y: &[f32]) {
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= 2.5 * step + 1e-30, "{a} -> {b}, step {step}");
            }
        }
    }

    #[test]
    fn weighted_handles_adversarial_rows() {
        for row in adversarial_rows(128) {
            let y = round_trip(&row, Some(&vec![1.0; row.len()]));
            check_weighted_bounded(&row, &y);
        }
    }

    proptest! {
        #[test]
        fn round_trip_bounded(x in prop::collection::vec(-6.0e4f32..6.0e4, 64..=64)) {
            check_plain(&x);
            let y = round_trip(&x, Some(&vec![1.0; 64]));
            check_weighted_bounded(&x, &y);
        }
    }
}
