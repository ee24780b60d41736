//! Q6_K super-blocks: 256 six-bit values `q − 32` in 16 sub-blocks of 16, each with a signed 8-bit
//! scale (210 bytes: `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`; `x = d·scale·(q − 32)`).
//!
//! Each 128-element half uses 64 `ql` bytes and 32 `qh` bytes. Its quarter `k` (32 elements) takes low
//! nibbles (k = 0, 1) or high nibbles (k = 2, 3) of `ql[32·(k % 2) + l]`, and bits `2k..2k+2` of `qh[l]`
//! as the top two bits.

use super::{read_f16, QK_K};

const BYTES: usize = 210;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 208);
        for (half, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &b[64 * half..][..64];
            let qh = &b[128 + 32 * half..][..32];
            let scales = &b[192 + 8 * half..][..8];
            for (k, y) in y.chunks_exact_mut(32).enumerate() {
                let low = &ql[32 * (k % 2)..][..32];
                let nibble = 4 * (k / 2);
                for (l, y) in y.iter_mut().enumerate() {
                    let q = ((low[l] >> nibble) & 0xF) | ((qh[l] >> (2 * k)) & 3) << 4;
                    let scale = scales[2 * k + l / 16] as i8;
                    *y = d * scale as f32 * (q as i32 - 32) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{assert_close, Rng};
    use half::f16;

    #[test]
    fn decodes_hand_built_block() {
        let mut rng = Rng::new(6);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 64) as u8).collect();
        let scales: Vec<i8> = (0..16).map(|_| rng.next_u64() as i8).collect();
        let d = 0.002f32;

        let mut block = [0u8; BYTES];
        for half in 0..2 {
            let (ql, qh) = (64 * half, 128 + 32 * half);
            for l in 0..32 {
                let e = |k: usize| levels[128 * half + l + 32 * k];
                block[ql + l] = (e(0) & 0xF) | (e(2) & 0xF) << 4;
                block[ql + l + 32] = (e(1) & 0xF) | (e(3) & 0xF) << 4;
                block[qh + l] = e(0) >> 4 | (e(1) >> 4) << 2 | (e(2) >> 4) << 4 | (e(3) >> 4) << 6;
            }
        }
        for (j, &s) in scales.iter().enumerate() {
            block[192 + j] = s as u8;
        }
        block[208..].copy_from_slice(&f16::from_f32(d).to_le_bytes());

        let d = f16::from_f32(d).to_f32();
        let expected: Vec<f32> = (0..QK_K)
            .map(|i| d * scales[i / 16] as f32 * (levels[i] as f32 - 32.0))
            .collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }
}
