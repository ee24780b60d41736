//! Q8_K super-blocks: 256 signed bytes with an f32 scale and per-16 sums (292 bytes:
//! `f32 d; i8 qs[256]; i16 bsums[16]`; `x = d·q`). The sums only serve dot-product kernels.

use super::QK_K;

const BYTES: usize = 292;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (y, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
            *y = d * q as i8 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_hand_built_block() {
        let qs: Vec<i8> = (0..QK_K).map(|i| (i as i32 - 128) as i8).collect();
        let d = -0.0123f32;
        let mut block = vec![0u8; BYTES];
        block[..4].copy_from_slice(&d.to_le_bytes());
        for (b, &q) in block[4..].iter_mut().zip(&qs) {
            *b = q as u8;
        }
        for (j, sum) in qs.chunks(16).map(|c| c.iter().map(|&q| q as i16).sum::<i16>()).enumerate() {
            block[260 + 2 * j..][..2].copy_from_slice(&sum.to_le_bytes());
        }
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        for (i, &q) in qs.iter().enumerate() {
            assert_eq!(y[i], d * f32::from(q), "element {i}");
        }
    }
}
