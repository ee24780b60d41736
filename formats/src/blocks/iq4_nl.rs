//! IQ4_NL: blocks of 32 four-bit indices into a fixed non-linear codebook, with an f16 scale
//! (18 bytes: `f16 d; u8 qs[16]`, nibbles packed as in Q4_0; `x = d·CODEBOOK[q]`).

use super::read_f16;

const BLOCK: usize = 32;
const BYTES: usize = 18;

/// ggml's `kvalues_iq4nl`: levels spaced more densely near zero, where weights cluster.
pub(crate) const CODEBOOK: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(BLOCK)) {
        decode_nibbles(read_f16(b, 0), &b[2..], y);
    }
}

/// Decodes 16 bytes of codebook indices (32 values) with scale `d`; IQ4_XS reuses it per sub-block.
#[inline]
pub(crate) fn decode_nibbles(d: f32, qs: &[u8], y: &mut [f32]) {
    let (lo, hi) = y.split_at_mut(BLOCK / 2);
    for ((&q, lo), hi) in qs[..16].iter().zip(lo).zip(hi) {
        *lo = d * CODEBOOK[(q & 0xF) as usize] as f32;
        *hi = d * CODEBOOK[(q >> 4) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn decodes_hand_built_block() {
        let levels = [
            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        ];
        let q: Vec<u8> = (0..32).map(|i| (i * 5 % 16) as u8).collect();
        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        for j in 0..16 {
            block[2 + j] = q[j] | q[j + 16] << 4;
        }
        let mut y = [0f32; BLOCK];
        dequantize(&block, &mut y);
        for i in 0..BLOCK {
            assert_eq!(y[i], 0.25 * levels[q[i] as usize] as f32, "element {i}");
        }
    }
}
