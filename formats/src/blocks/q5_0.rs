//! Q5_0: blocks of 32 five-bit values `q − 16` sharing one f16 scale
//! (22 bytes: `f16 d; u8 qh[4]; u8 qs[16]`; low nibbles packed as in Q4_0, bit 4 of element `j` at
//! bit `j` of the little-endian `u32` `qh`).

use super::grid::{block_codes, uniform_levels, BlockGrid};
use super::{c_cast_to_byte, pack_q5, read_f16, scale_search, signed_absmax, unpack_q5, write_f16};

const BLOCK: usize = 32;
const BYTES: usize = 22;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(BLOCK)) {
        let d = read_f16(b, 0);
        let q = unpack_q5(&b[2..6], &b[6..]);
        for (y, &q) in y.iter_mut().zip(&q) {
            *y = (q as i32 - 16) as f32 * d;
        }
    }
}

/// Without importance: llama.cpp's `quantize_row_q5_0_ref` (the element of largest magnitude maps to
/// −16, `d = max / −16`). With importance: `quantize_row_q5_0_impl`'s weighted scale search; then `src`
/// must be exactly one row, because the weights depend on the row's mean square.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    match importance {
        None => quantize_plain(src, dst),
        Some(importance) => quantize_weighted(src, dst, importance),
    }
}

fn quantize_plain(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(BYTES)) {
        let d = signed_absmax(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(b, 0, d);
        // Truncation after +16.5 is llama.cpp's rounding; only x = −max can reach 32, hence the clamp.
        let q: [u8; BLOCK] = std::array::from_fn(|j| (c_cast_to_byte(x[j] * id + 16.5) as i8).min(31) as u8);
        let (qh, qs) = b[2..].split_at_mut(4);
        pack_q5(&q, qh, qs);
    }
}

fn quantize_weighted(src: &[f32], dst: &mut [u8], importance: &[f32]) {
    scale_search::for_each_block(src, importance, dst, BYTES, |x, w, b| {
        let mut q = [0u8; BLOCK];
        write_f16(b, 0, scale_search::symmetric(x, w, 16, &mut q));
        let (qh, qs) = b[2..].split_at_mut(4);
        pack_q5(&q, qh, qs);
    });
}

/// Levels `−16..=15` under the block scale.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<32>(-16),
    affine: |b, scale, offset| {
        scale.fill(read_f16(b, 0));
        offset.fill(0.0);
    },
    read_codes: |b, codes| codes.copy_from_slice(&unpack_q5(&b[2..6], &b[6..])),
    write_codes: |b, codes| {
        let (qh, qs) = b[2..].split_at_mut(4);
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
        let q: Vec<u32> = (0..32).map(|i| (i * 13 + 5) % 32).collect();
        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(0.75).to_le_bytes());
        let high: u32 = q.iter().enumerate().map(|(i, &v)| (v >> 4) << i).sum();
        block[2..6].copy_from_slice(&high.to_le_bytes());
        for j in 0..16 {
            block[6 + j] = (q[j] & 15) as u8 | ((q[j + 16] & 15) as u8) << 4;
        }
        let mut y = [0f32; BLOCK];
        dequantize(&block, &mut y);
        for i in 0..BLOCK {
            assert_eq!(y[i], 0.75 * (q[i] as f32 - 16.0), "element {i}");
        }
    }

    fn round_trip(x: &[f32], importance: Option<&[f32]>) -> Vec<f32> {
        crate::blocks::test_data::round_trip((quantize, dequantize), BYTES, x, importance)
    }

    /// Levels span [−16, 15]·|d| with |d| = max|x|/16: one step off at worst (x = −max), plus the f16
    /// error of d times up to 16 levels.
    fn check_plain(x: &[f32]) {
        let y = round_trip(x, None);
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 16.0;
            let bound = d * 1.0001 + 16.0 * (d - f16::from_f32(d).to_f32()).abs() + 1e-30;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
            }
        }
    }

    /// With even importance the least-squares scale stays near max|x|/16.
    fn check_weighted_bounded(x: &[f32], y: &[f32]) {
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 16.0;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= 2.5 * step + 1e-30, "{a} -> {b}, step {step}");
            }
        }
    }

    #[test]
    fn round_trip_random_and_adversarial_rows() {
        let mut rng = Rng::new(50);
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
        let x = Rng::new(51).row(1024);
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
