//! Q4_K super-blocks: 256 four-bit values in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit
//! min (144 bytes: `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`; `x = d·sc·q − dmin·m`).
//!
//! Each 64-element group uses 32 `qs` bytes: low nibbles hold its first sub-block, high nibbles its
//! second. Scales and mins are packed as [`scale_min_k4`] reads them.

use super::{read_f16, scale_min_k4, QK_K};

const BYTES: usize = 144;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 0);
        let dmin = read_f16(b, 2);
        let (scales, qs) = (&b[4..16], &b[16..]);
        for (sub, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min_k4(sub, scales);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let shift = 4 * (sub % 2);
            for (y, &q) in y.iter_mut().zip(&qs[32 * (sub / 2)..][..32]) {
                *y = dl * ((q >> shift) & 0xF) as f32 - ml;
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::blocks::test_data::{assert_close, Rng};
    use half::f16;

    /// The 12 scale bytes as llama.cpp's encoder packs 8 six-bit (scale, min) pairs.
    pub fn pack_scales(sc: &[u8], m: &[u8]) -> [u8; 12] {
        let mut out = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                out[j] = sc[j];
                out[j + 4] = m[j];
            } else {
                out[j + 4] = (sc[j] & 0xF) | (m[j] & 0xF) << 4;
                out[j - 4] |= (sc[j] >> 4) << 6;
                out[j] |= (m[j] >> 4) << 6;
            }
        }
        out
    }

    #[test]
    fn decodes_hand_built_block() {
        let mut rng = Rng::new(4);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 16) as u8).collect();
        let sc: Vec<u8> = (0..8).map(|_| (rng.next_u64() % 64) as u8).collect();
        let m: Vec<u8> = (0..8).map(|_| (rng.next_u64() % 64) as u8).collect();
        let (d, dmin) = (0.01f32, 0.02f32);

        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
        block[4..16].copy_from_slice(&pack_scales(&sc, &m));
        for group in 0..4 {
            for l in 0..32 {
                let e = 64 * group + l;
                block[16 + 32 * group + l] = levels[e] | levels[e + 32] << 4;
            }
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
