//! Q5_K super-blocks: Q4_K plus a fifth bit per value (176 bytes:
//! `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`; `x = d·sc·q − dmin·m`).
//!
//! Low nibbles and scales are laid out as in Q4_K; the fifth bit of element `l` of sub-block `s`
//! is bit `s` of `qh[l]`.

use super::{read_f16, scale_min_k4, QK_K};

const BYTES: usize = 176;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 0);
        let dmin = read_f16(b, 2);
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..]);
        for (sub, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(sub, scales);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let shift = 4 * (sub % 2);
            let low = &qs[32 * (sub / 2)..][..32];
            for ((y, &q), &h) in y.iter_mut().zip(low).zip(qh) {
                let q = ((q >> shift) & 0xF) | ((h >> sub) & 1) << 4;
                *y = dl * q as f32 - ml;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::q4_k::tests::pack_scales;
    use crate::blocks::test_data::{assert_close, Rng};
    use half::f16;

    #[test]
    fn decodes_hand_built_block() {
        let mut rng = Rng::new(5);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 32) as u8).collect();
        let sc: Vec<u8> = (0..8).map(|_| (rng.next_u64() % 64) as u8).collect();
        let m: Vec<u8> = (0..8).map(|_| (rng.next_u64() % 64) as u8).collect();
        let (d, dmin) = (0.005f32, 0.25f32);

        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
        block[4..16].copy_from_slice(&pack_scales(&sc, &m));
        let (mut m1, mut m2) = (1u8, 2u8);
        for group in 0..4 {
            for j in 0..32 {
                let (mut l1, mut l2) = (levels[64 * group + j], levels[64 * group + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    block[16 + j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    block[16 + j] |= m2;
                }
                block[48 + 32 * group + j] = l1 | l2 << 4;
            }
            m1 <<= 2;
            m2 <<= 2;
        }

        let (d, dmin) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
        let expected: Vec<f32> = (0..QK_K)
            .map(|i| d * sc[i / 32] as f32 * levels[i] as f32 - dmin * m[i / 32] as f32)
            .collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }
}
