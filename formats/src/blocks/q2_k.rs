//! Q2_K super-blocks: 256 two-bit values in 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit
//! min, both scaled by f16 super-block factors (84 bytes: `u8 scales[16]; u8 qs[64]; f16 d; f16 dmin`;
//! `x = d·(sc & 15)·q − dmin·(sc >> 4)`).
//!
//! Within each 128-element half, byte `l` of its 32 `qs` bytes holds elements `l`, `l + 32`, `l + 64`,
//! `l + 96` in bit pairs 0–1, 2–3, 4–5, 6–7.

use super::{read_f16, QK_K};

const BYTES: usize = 84;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let d = read_f16(b, 80);
        let dmin = read_f16(b, 82);
        for (sub, y) in y.chunks_exact_mut(16).enumerate() {
            let sc = scales[sub];
            let dl = d * (sc & 0xF) as f32;
            let ml = dmin * (sc >> 4) as f32;
            let shift = 2 * (sub % 8 / 2);
            let q = &qs[32 * (sub / 8) + 16 * (sub % 2)..][..16];
            for (y, &q) in y.iter_mut().zip(q) {
                *y = dl * ((q >> shift) & 3) as f32 - ml;
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
        let mut rng = Rng::new(2);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 4) as u8).collect();
        let scales: Vec<u8> = (0..16).map(|_| rng.next_u64() as u8).collect();
        let (d, dmin) = (0.0625f32, 0.5f32);

        let mut block = [0u8; BYTES];
        block[..16].copy_from_slice(&scales);
        for half in [0, 128] {
            for l in 0..32 {
                let e = half + l;
                block[16 + half / 4 + l] =
                    levels[e] | levels[e + 32] << 2 | levels[e + 64] << 4 | levels[e + 96] << 6;
            }
        }
        block[80..82].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        block[82..84].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());

        let expected: Vec<f32> = (0..QK_K)
            .map(|i| {
                let sc = scales[i / 16];
                d * (sc % 16) as f32 * levels[i] as f32 - dmin * (sc / 16) as f32
            })
            .collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }
}
