//! Q8_0: blocks of 32 signed bytes sharing one f16 scale (34 bytes: `f16 d; i8 qs[32]`).

use super::grid::{uniform_levels, BlockGrid};
use super::{c_cast_to_byte, read_f16, write_f16};

const BLOCK: usize = 32;
const BYTES: usize = 34;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(BLOCK)) {
        let d = read_f16(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..]) {
            *y = q as i8 as f32 * d;
        }
    }
}

/// llama.cpp's `quantize_row_q8_0_ref`: `d = max|x| / 127`, `q = round(x / d)` (ties away from zero).
/// Importance is ignored, as in llama.cpp: 8 bits leave no scale choice worth searching.
pub fn quantize(src: &[f32], dst: &mut [u8], _importance: Option<&[f32]>) {
    for (x, b) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(BYTES)) {
        let d = abs_max(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(b, 0, d);
        for (q, &v) in b[2..].iter_mut().zip(x) {
            *q = round_to_byte(v * id);
        }
    }
}

/// The largest |x| as llama.cpp's loop `amax = MAX(amax, fabsf(x))` finds it, NaN included: a NaN
/// is replaced by the next magnitude, and is the result only when last.
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    let step = |m: f32, v: &f32| if m > v.abs() { m } else { v.abs() };
    if x.iter().fold(false, |nan, v| nan | v.is_nan()) {
        return x.iter().fold(0.0, step);
    }
    // Without NaN the order does not matter: eight running maxima side by side, instead of one chain.
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(0.0, step);
    for chunk in chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = step(*m, v);
        }
    }
    lanes.iter().fold(rest, step)
}

/// [`c_cast_to_byte`]`(y.round())` (C's `(int8_t)roundf(y)`: half away from zero) without the libm
/// call, so that it vectorises. Below 2²³ the truncated integer and the remainder are exact; from
/// there on `y` is already whole.
#[inline]
fn round_to_byte(y: f32) -> u8 {
    let truncated = y as i32;
    let rest = y - truncated as f32;
    // Wrapping: out of range the sum is discarded below, but computing it keeps the loop branch-free.
    let rounded = truncated.wrapping_add(i32::from(rest >= 0.5)).wrapping_sub(i32::from(rest <= -0.5));
    if y.abs() < 2_147_483_648.0 {
        rounded as u8
    } else {
        c_cast_to_byte(y)
    }
}

/// Levels `−128..=127` under the block scale; code `c` is the stored byte `c − 128`, i.e. `c ^ 0x80`.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<256>(-128),
    affine: |b, scale, offset| {
        scale.fill(read_f16(b, 0));
        offset.fill(0.0);
    },
    read_codes: |b, codes| codes.iter_mut().zip(&b[2..]).for_each(|(c, &q)| *c = q ^ 0x80),
    write_codes: |b, codes| b[2..].iter_mut().zip(codes).for_each(|(q, &c)| *q = c ^ 0x80),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{adversarial_rows, Rng};
    use half::f16;

    #[test]
    fn rounding_matches_roundf_then_c_cast() {
        let mut ys = vec![0.0f32, -0.0, 0.5, -0.5, 1.5, -2.5, 126.5, -127.5, 127.49999, 1e9, -3e9, 2.0e38];
        ys.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 8388607.5, 8388608.0, 16777217.0, 2147483520.0]);
        for k in -300..300 {
            let half = k as f32 + 0.5;
            ys.extend([half, half.next_up(), half.next_down(), k as f32 * 0.37]);
        }
        for y in ys {
            assert_eq!(round_to_byte(y), c_cast_to_byte(y.round()), "{y}");
        }
    }

    #[test]
    fn abs_max_matches_the_sequential_loop() {
        let sequential = |x: &[f32]| x.iter().fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
        let mut rng = Rng::new(5);
        for case in 0..200 {
            let mut x: Vec<f32> = (0..BLOCK).map(|_| rng.unit() * 2.0).collect();
            if case % 3 == 0 {
                x[rng.next_u64() as usize % BLOCK] = f32::NAN;
            }
            if case % 7 == 0 {
                x[BLOCK - 1] = f32::NAN;
            }
            if case % 5 == 0 {
                x[rng.next_u64() as usize % BLOCK] = f32::NEG_INFINITY;
            }
            let (ours, theirs) = (abs_max(&x), sequential(&x));
            assert!(ours.to_bits() == theirs.to_bits(), "case {case}: {ours} vs {theirs}");
        }
    }
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let qs: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
        for (b, &q) in block[2..].iter_mut().zip(&qs) {
            *b = q as u8;
        }
        let mut y = [0f32; BLOCK];
        dequantize(&block, &mut y);
        for (i, &q) in qs.iter().enumerate() {
            assert_eq!(y[i], 0.25 * f32::from(q));
        }
    }

    /// |x − y| ≤ d/2 from rounding plus 127·|d − f16(d)| from storing the scale.
    fn check_round_trip(x: &[f32]) {
        let y = crate::blocks::test_data::round_trip((quantize, dequantize), BYTES, x, None);
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let d16 = f16::from_f32(d).to_f32();
            let bound = d * 0.5001 + 127.0 * (d - d16).abs() + 1e-30;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
            }
        }
    }

    #[test]
    fn round_trip_random_and_adversarial_rows() {
        let mut rng = Rng::new(8);
        for _ in 0..50 {
            check_round_trip(&rng.row(256));
        }
        for row in adversarial_rows(128) {
            check_round_trip(&row);
        }
    }

    #[test]
    fn block_max_maps_to_127() {
        let mut x = [0.5f32; BLOCK];
        x[5] = -3.0;
        let mut b = [0u8; BYTES];
        quantize(&x, &mut b, None);
        assert_eq!(b[2 + 5] as i8, -127);
        assert_eq!(b[2] as i8, (0.5f32 * 127.0 / 3.0).round() as i8);
    }

    proptest! {
        #[test]
        fn round_trip_bounded(x in prop::collection::vec(-6.0e4f32..6.0e4, 32..=32)) {
            check_round_trip(&x);
        }
    }
}
