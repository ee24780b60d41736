//! IQ4_XS super-blocks: 8 IQ4_NL-style sub-blocks of 32 sharing one f16 scale, each with a signed
//! 6-bit sub-scale (136 bytes: `f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]`;
//! `x = d·(ls − 32)·CODEBOOK[q]`). Sub-block `ib` keeps the low nibble of `ls` in nibble `ib % 2` of
//! `scales_l[ib / 2]` and its top two bits at bits `2·ib` of `scales_h`.

use super::iq4_nl::decode_nibbles;
use super::{read_f16, QK_K};

const BYTES: usize = 136;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let (scales_l, qs) = (&b[4..8], &b[8..]);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
            let high = ((scales_h >> (2 * ib)) & 3) as u8;
            let dl = d * ((low | high << 4) as i32 - 32) as f32;
            decode_nibbles(dl, &qs[16 * ib..], y);
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
        let codebook = [
            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        ];
        let mut rng = Rng::new(23);
        let q: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 16) as u8).collect();
        let ls: Vec<u16> = (0..8).map(|_| (rng.next_u64() % 64) as u16).collect();
        let d = 0.0078125f32;

        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let scales_h: u16 = ls
            .iter()
            .enumerate()
            .map(|(ib, &l)| (l >> 4) << (2 * ib))
            .sum();
        block[2..4].copy_from_slice(&scales_h.to_le_bytes());
        for (ib, &l) in ls.iter().enumerate() {
            block[4 + ib / 2] |= ((l & 0xF) as u8) << (4 * (ib % 2));
            for j in 0..16 {
                block[8 + 16 * ib + j] = q[32 * ib + j] | q[32 * ib + j + 16] << 4;
            }
        }

        let expected: Vec<f32> = (0..QK_K)
            .map(|i| d * (ls[i / 32] as f32 - 32.0) * codebook[q[i] as usize] as f32)
            .collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }
}
