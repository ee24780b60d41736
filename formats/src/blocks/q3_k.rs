//! Q3_K super-blocks: 256 three-bit values in 16 sub-blocks of 16, each with a signed 6-bit scale
//! (110 bytes: `u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d`; `x = d·(scale − 32)·(q − 4)`).
//!
//! The low two bits of each value sit in `qs` as in Q2_K; the third bit of element `i` is bit `i / 32`
//! of `hmask[i % 32]`, and a clear bit means "subtract 4". The 16 scales keep their low nibbles in
//! bytes 0–7 (sub-blocks 0–7 low nibbles, 8–15 high nibbles) and their top two bits in bytes 8–11
//! (sub-block `s` at byte `8 + s % 4`, bit pair `s / 4`).

use super::{read_f16, QK_K};

const BYTES: usize = 110;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
        let d = read_f16(b, 108);
        for (sub, y) in y.chunks_exact_mut(16).enumerate() {
            let low = if sub < 8 {
                packed[sub] & 0xF
            } else {
                packed[sub - 8] >> 4
            };
            let high = (packed[8 + sub % 4] >> (2 * (sub / 4))) & 3;
            let dl = d * ((low | high << 4) as i32 - 32) as f32;
            let shift = 2 * (sub % 8 / 2);
            let bit = 1u8 << (sub / 2);
            let first = 16 * (sub % 2);
            let q = &qs[32 * (sub / 8) + first..][..16];
            let h = &hmask[first..first + 16];
            for ((y, &q), &h) in y.iter_mut().zip(q).zip(h) {
                let sub4 = if h & bit != 0 { 0 } else { 4 };
                *y = dl * (((q >> shift) & 3) as i32 - sub4) as f32;
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
        let mut rng = Rng::new(3);
        // Stored levels 0..8 stand for values −4..3; stored scales 0..64 for −32..31.
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 8) as u8).collect();
        let scales: Vec<u8> = (0..16).map(|_| (rng.next_u64() % 64) as u8).collect();
        let d = 0.03125f32;

        let mut block = [0u8; BYTES];
        for (i, &l) in levels.iter().enumerate() {
            if l > 3 {
                block[i % 32] |= 1 << (i / 32);
            }
        }
        let low2: Vec<u8> = levels.iter().map(|l| l & 3).collect();
        for half in [0, 128] {
            for l in 0..32 {
                let e = half + l;
                block[32 + half / 4 + l] =
                    low2[e] | low2[e + 32] << 2 | low2[e + 64] << 4 | low2[e + 96] << 6;
            }
        }
        for (j, &s) in scales.iter().enumerate() {
            if j < 8 {
                block[96 + j] |= s & 0xF;
            } else {
                block[96 + j - 8] |= (s & 0xF) << 4;
            }
            block[96 + 8 + j % 4] |= (s >> 4) << (2 * (j / 4));
        }
        block[108..110].copy_from_slice(&f16::from_f32(d).to_le_bytes());

        let expected: Vec<f32> = (0..QK_K)
            .map(|i| d * (scales[i / 16] as f32 - 32.0) * (levels[i] as f32 - 4.0))
            .collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }
}
