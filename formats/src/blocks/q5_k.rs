//! Q5_K super-blocks: Q4_K plus a fifth bit per value (176 bytes:
//! `f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]`; `x = d·sc·q − dmin·m`).
//!
//! Low nibbles and scales are laid out as in Q4_K; the fifth bit of element `l` of sub-block `s`
//! is bit `s` of `qh[l]`.

use super::grid::{super_block_codes, uniform_levels, BlockGrid};
use super::q4_k::{encode_scales, pack_low_nibbles, sub_block_affine, unpack_low_nibbles};
use super::scale_search::{AffineGrid, ErrorMetric};
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

/// Without importance: llama.cpp's `quantize_row_q5_K_ref`. With importance: `quantize_row_q5_K_impl`.
/// Both share Q4_K's scale search ([`encode_scales`]) with 32 levels instead of 16.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    const PLAIN_GRID: AffineGrid =
        AffineGrid { rmin: -0.5, rdelta: 0.1, steps: 15, metric: ErrorMetric::Squared, saturate: false };
    for (i, (x, b)) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let x: &[f32; QK_K] = x.try_into().expect("chunks of QK_K");
        let importance = importance.map(|imp| &imp[i * QK_K..][..QK_K]);
        let levels = encode_scales(x, importance, 31, &PLAIN_GRID, b);
        pack_levels(&levels, &mut b[16..]);
    }
}

/// Writes 256 five-bit levels into `qh` and `qs` (the bytes after the scales).
fn pack_levels(levels: &[u8; QK_K], qh_qs: &mut [u8]) {
    let (qh, qs) = qh_qs.split_at_mut(32);
    pack_low_nibbles(levels, qs);
    qh.fill(0);
    for (sub, group) in levels.chunks_exact(32).enumerate() {
        for (h, &l) in qh.iter_mut().zip(group) {
            *h |= (l >> 4) << sub;
        }
    }
}

/// Levels `0..=31` under each sub-block's scale `d·sc`, offset by its `−dmin·m`.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<32>(0),
    affine: sub_block_affine,
    read_codes: |b, codes| {
        unpack_low_nibbles(&b[48..], codes);
        for (sub, group) in codes.chunks_exact_mut(32).enumerate() {
            for (c, &h) in group.iter_mut().zip(&b[16..48]) {
                *c |= ((h >> sub) & 1) << 4;
            }
        }
    },
    write_codes: |b, codes| pack_levels(super_block_codes(codes), &mut b[16..]),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::pack_scale_min_k4;
    use crate::blocks::test_data::{
        affine_bound, assert_within, check_encoder, round_trip_row, skewed_importance_gain,
    };
    use crate::blocks::test_data::{assert_close, Rng};
    use crate::ggml_type::GgmlType;
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let mut rng = Rng::new(5);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 32) as u8).collect();
        let sc: [u8; 8] = std::array::from_fn(|_| (rng.next_u64() % 64) as u8);
        let m: [u8; 8] = std::array::from_fn(|_| (rng.next_u64() % 64) as u8);
        let (d, dmin) = (0.005f32, 0.25f32);

        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
        block[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &m));
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
        let expected: Vec<f32> =
            (0..QK_K).map(|i| d * sc[i / 32] as f32 * levels[i] as f32 - dmin * m[i / 32] as f32).collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }

    #[test]
    fn round_trip_stays_within_bound() {
        check_encoder(GgmlType::Q5_K, QK_K, |g| affine_bound(g, 31.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::Q5_K);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::Q5_K, &x, None), QK_K, |g| affine_bound(g, 31.0));
            let y = round_trip_row(GgmlType::Q5_K, &x, Some(&importance));
            assert_within(&x, &y, QK_K, |g| affine_bound(g, 31.0));
        }
    }
}
