//! Q8_0: blocks of 32 signed bytes sharing one f16 scale (34 bytes: `f16 d; i8 qs[32]`).

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
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_f16(b, 0, d);
        for (q, &v) in b[2..].iter_mut().zip(x) {
            *q = c_cast_to_byte((v * id).round());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{adversarial_rows, Rng};
    use half::f16;
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
