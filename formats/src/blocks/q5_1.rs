//! Q5_1: blocks of 32 five-bit values with an f16 scale and an f16 offset
//! (24 bytes: `f16 d; f16 m; u8 qh[4]; u8 qs[16]`, bits packed as in Q5_0; `x = q·d + m`).

use super::grid::{block_codes, uniform_levels, BlockGrid};
use super::{c_cast_to_byte, min_max, pack_q5, read_f16, scale_search, unpack_q5, write_f16};

const BLOCK: usize = 32;
const BYTES: usize = 24;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(BLOCK)) {
        let d = read_f16(b, 0);
        let m = read_f16(b, 2);
        let q = unpack_q5(&b[4..8], &b[8..]);
        for (y, &q) in y.iter_mut().zip(&q) {
            *y = q as f32 * d + m;
        }
    }
}

/// Without importance: llama.cpp's `quantize_row_q5_1_ref` (`m = min`, `d = (max − min) / 31`).
/// With importance: `quantize_row_q5_1_impl`'s weighted search for scale and offset; then `src` must be
/// exactly one row, because the weights depend on the row's mean square.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    match importance {
        None => quantize_plain(src, dst),
        Some(importance) => quantize_weighted(src, dst, importance),
    }
}

fn quantize_plain(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(BYTES)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(b, 0, d);
        write_f16(b, 2, min);
        // llama.cpp does not clamp here: (max − min)·id + 0.5 stays below 32.
        let q: [u8; BLOCK] = std::array::from_fn(|j| c_cast_to_byte((x[j] - min) * id + 0.5));
        let (qh, qs) = b[4..].split_at_mut(4);
        pack_q5(&q, qh, qs);
    }
}

fn quantize_weighted(src: &[f32], dst: &mut [u8], importance: &[f32]) {
    scale_search::for_each_block(src, importance, dst, BYTES, |x, w, b| {
        let mut q = [0u8; BLOCK];
        let ([d], [m]) = scale_search::affine::<1, BLOCK>(x, w, 31, &mut q);
        write_f16(b, 0, d);
        write_f16(b, 2, m);
        let (qh, qs) = b[4..].split_at_mut(4);
        pack_q5(&q, qh, qs);
    });
}

/// Levels `0..=31` under the block scale, plus the block offset.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<32>(0),
    affine: |b, scale, offset| {
        scale.fill(read_f16(b, 0));
        offset.fill(read_f16(b, 2));
    },
    read_codes: |b, codes| codes.copy_from_slice(&unpack_q5(&b[4..8], &b[8..])),
    write_codes: |b, codes| {
        let (qh, qs) = b[4..].split_at_mut(4);
        pack_q5(block_codes(codes), qh, qs);
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{adversarial_rows, skewed_importance, weighted_sse, Rng};
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let q: Vec<u32> = (0..32).map(|i| (i * 19 + 3) % 32).collect();
        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-7.25).to_le_bytes());
        let high: u32 = q.iter().enumerate().map(|(i, &v)| (v >> 4) << i).sum();
        block[4..8].copy_from_slice(&high.to_le_bytes());
        for j in 0..16 {
            block[8 + j] = (q[j] & 15) as u8 | ((q[j + 16] & 15) as u8) << 4;
        }
        let mut y = [0f32; BLOCK];
        dequantize(&block, &mut y);
        for i in 0..BLOCK {
            assert_eq!(y[i], 0.5 * q[i] as f32 - 7.25, "element {i}");
        }
    }

    fn round_trip(x: &[f32], importance: Option<&[f32]>) -> Vec<f32> {
        crate::blocks::test_data::round_trip((quantize, dequantize), BYTES, x, importance)
    }

    fn f16_error(v: f32) -> f32 {
        (v - f16::from_f32(v).to_f32()).abs()
    }

    /// Half a step of (max − min)/31, plus the f16 errors of d (times up to 31 levels) and of m.
    fn check_plain(x: &[f32]) {
        let y = round_trip(x, None);
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let lo = xb.iter().fold(f32::MAX, |m, &v| m.min(v));
            let hi = xb.iter().fold(f32::MIN, |m, &v| m.max(v));
            let d = (hi - lo) / 31.0;
            let bound = d * 0.5001 + 31.0 * f16_error(d) + f16_error(lo) + 1e-30;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
            }
        }
    }

    /// With even importance the fitted scale stays near the min–max step (the offset is at most 0).
    fn check_weighted_bounded(x: &[f32], y: &[f32]) {
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let lo = xb.iter().fold(0f32, |m, &v| m.min(v));
            let hi = xb.iter().fold(f32::MIN, |m, &v| m.max(v));
            let bound = 2.5 * (hi - lo) / 31.0 + f16_error(lo) + 1e-30;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
            }
        }
    }

    #[test]
    fn round_trip_random_and_adversarial_rows() {
        let mut rng = Rng::new(51);
        for _ in 0..50 {
            check_plain(&rng.row(256));
        }
        for row in adversarial_rows(128) {
            check_plain(&row);
            check_weighted_bounded(&row, &round_trip(&row, Some(&vec![1.0; row.len()])));
        }
    }

    #[test]
    fn weighted_search_favours_important_elements() {
        let x = Rng::new(52).row(1024);
        let importance = skewed_importance(x.len());
        let plain = weighted_sse(&x, &round_trip(&x, None), &importance);
        let weighted = weighted_sse(&x, &round_trip(&x, Some(&importance)), &importance);
        assert!(weighted < 0.2 * plain, "{weighted} vs {plain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(x in prop::collection::vec(-6.0e4f32..6.0e4, 64..=64)) {
            check_plain(&x);
            check_weighted_bounded(&x, &round_trip(&x, Some(&vec![1.0; 64])));
        }
    }
}
