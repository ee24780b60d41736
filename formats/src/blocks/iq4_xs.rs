//! IQ4_XS super-blocks: 8 IQ4_NL-style sub-blocks of 32 sharing one f16 scale, each with a signed
//! 6-bit sub-scale (136 bytes: `f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]`;
//! `x = d·(ls − 32)·CODEBOOK[q]`). Sub-block `ib` keeps the low nibble of `ls` in nibble `ib % 2` of
//! `scales_l[ib / 2]` and its top two bits at bits `2·ib` of `scales_h`.

use super::grid::{block_codes, unpack_nibbles, BlockGrid};
use super::iq4_nl::{block_weights, decode_nibbles, encode_nibbles, fit_scale};
use super::{nearest_int, pack_nibbles, read_f16, scale_search, write_f16, QK_K};

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

/// llama.cpp's `quantize_iq4_xs`: each 32-element sub-block gets IQ4_NL's scale fit, then the scales
/// are rounded to signed 6-bit multiples of the super-block's f16 `d` and the indices recomputed.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (i, (x, b)) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let sigma2 = scale_search::sum_of_squares(x) * (2.0 / QK_K as f32);
        let mut scales = [0f32; 8];
        for (ib, xs) in x.chunks_exact(32).enumerate() {
            let xs: &[f32; 32] = xs.try_into().expect("chunks of 32");
            let importance = importance.map(|imp| &imp[i * QK_K + 32 * ib..][..32]);
            scales[ib] = fit_scale(xs, &block_weights(xs, importance, sigma2));
        }
        let max_scale = super::signed_absmax(&scales);

        let d = -max_scale / 32.0;
        write_f16(b, 0, d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (scales_l, qs) = b[4..].split_at_mut(4);
        scales_l.fill(0);
        let mut scales_h = 0u16;
        for (ib, (xs, qs)) in x.chunks_exact(32).zip(qs.chunks_exact_mut(16)).enumerate() {
            let l = nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * l as f32;
            encode_nibbles(xs, if dl != 0.0 { 1.0 / dl } else { 0.0 }, qs);
            let stored = (l + 32) as u8;
            scales_l[ib / 2] |= (stored & 0xF) << (4 * (ib % 2));
            scales_h |= u16::from(stored >> 4) << (2 * ib);
        }
        b[2..4].copy_from_slice(&scales_h.to_le_bytes());
    }
}

/// The IQ4_NL codebook under each sub-block's scale `d·(ls − 32)`.
pub const GRID: BlockGrid = BlockGrid {
    levels: super::iq4_nl::GRID.levels,
    affine: |b, scale, offset| {
        let d = read_f16(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        for (ib, scale) in scale.chunks_exact_mut(32).enumerate() {
            let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
            let high = ((scales_h >> (2 * ib)) & 3) as u8;
            scale.fill(d * ((low | high << 4) as i32 - 32) as f32);
        }
        offset.fill(0.0);
    },
    read_codes: |b, codes| {
        for (qs, codes) in b[8..].chunks_exact(16).zip(codes.chunks_exact_mut(32)) {
            unpack_nibbles(qs, codes);
        }
    },
    write_codes: |b, codes| {
        for (qs, codes) in b[8..].chunks_exact_mut(16).zip(codes.chunks_exact(32)) {
            pack_nibbles(block_codes(codes), qs);
        }
    },
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{assert_close, Rng};
    use crate::blocks::test_data::{
        assert_within, check_encoder, round_trip_row, skewed_importance_gain, symmetric_bound,
    };
    use crate::ggml_type::GgmlType;
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let codebook = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
        let mut rng = Rng::new(23);
        let q: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 16) as u8).collect();
        let ls: Vec<u16> = (0..8).map(|_| (rng.next_u64() % 64) as u16).collect();
        let d = 0.0078125f32;

        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let scales_h: u16 = ls.iter().enumerate().map(|(ib, &l)| (l >> 4) << (2 * ib)).sum();
        block[2..4].copy_from_slice(&scales_h.to_le_bytes());
        for (ib, &l) in ls.iter().enumerate() {
            block[4 + ib / 2] |= ((l & 0xF) as u8) << (4 * (ib % 2));
            for j in 0..16 {
                block[8 + 16 * ib + j] = q[32 * ib + j] | q[32 * ib + j + 16] << 4;
            }
        }

        let expected: Vec<f32> =
            (0..QK_K).map(|i| d * (ls[i / 32] as f32 - 32.0) * codebook[q[i] as usize] as f32).collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }

    #[test]
    fn round_trip_stays_within_bound() {
        check_encoder(GgmlType::IQ4_XS, QK_K, |g| symmetric_bound(g, 127.0 / 13.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::IQ4_XS);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::IQ4_XS, &x, None), QK_K, |g| symmetric_bound(g, 127.0 / 13.0));
            let y = round_trip_row(GgmlType::IQ4_XS, &x, Some(&importance));
            assert_within(&x, &y, QK_K, |g| symmetric_bound(g, 127.0 / 13.0));
        }
    }
}
