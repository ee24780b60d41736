//! Q3_K super-blocks: 256 three-bit values in 16 sub-blocks of 16, each with a signed 6-bit scale
//! (110 bytes: `u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d`; `x = d·(scale − 32)·(q − 4)`).
//!
//! The low two bits of each value sit in `qs` as in Q2_K; the third bit of element `i` is bit `i / 32`
//! of `hmask[i % 32]`, and a clear bit means "subtract 4". The 16 scales keep their low nibbles in
//! bytes 0–7 (sub-blocks 0–7 low nibbles, 8–15 high nibbles) and their top two bits in bytes 8–11
//! (sub-block `s` at byte `8 + s % 4`, bit pair `s / 4`).

use super::grid::{super_block_codes, uniform_levels, BlockGrid};
use super::scale_search;
use super::{nearest_int, pack_2bit, read_f16, requantize, unpack_2bit, write_f16, QK_K};

const BYTES: usize = 110;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
        let d = read_f16(b, 108);
        for (sub, y) in y.chunks_exact_mut(16).enumerate() {
            let low = if sub < 8 { packed[sub] & 0xF } else { packed[sub - 8] >> 4 };
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

/// Without importance: llama.cpp's `quantize_row_q3_K_ref`. With importance: `quantize_row_q3_K_impl`.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (i, (x, b)) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let x: &[f32; QK_K] = x.try_into().expect("chunks of QK_K");
        let mut levels = [0u8; QK_K];
        let (scales, d) = match importance {
            None => plain_scales(x, &mut levels),
            Some(importance) => weighted_scales(x, &importance[i * QK_K..][..QK_K], &mut levels),
        };
        write_f16(b, 108, d);
        let d = read_f16(b, 108);
        for ((xs, out), &sc) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).zip(&scales) {
            let dl = d * (sc as i32 - 32) as f32;
            if dl != 0.0 {
                requantize(xs, dl, 0.0, (-4, 3), out);
            }
        }

        (GRID.write_codes)(b, &levels);
        pack_scales(&scales, &mut b[96..108]);
    }
}

/// Fits each 16-element sub-block's signed scale by refinement, then scales the 6-bit scales to the
/// largest in magnitude. Returns the scales as stored (`0..64`, i.e. offset by 32) and `d`.
fn plain_scales(x: &[f32; QK_K], levels: &mut [u8; QK_K]) -> ([u8; 16], f32) {
    let mut scales = [0f32; 16];
    for (s, (xs, ls)) in scales.iter_mut().zip(x.chunks_exact(16).zip(levels.chunks_exact_mut(16))) {
        *s = scale_search::symmetric_refined(xs, 4, ls);
    }
    let max_scale = super::signed_absmax(&scales);
    if max_scale == 0.0 {
        // A zero scale byte decodes as -32; with d = 0 every value is still 0.
        return ([0; 16], 0.0);
    }
    let iscale = -32.0 / max_scale;
    let stored = scales.map(|s| ((nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8);
    (stored, 1.0 / iscale)
}

/// Fits each 16-element sub-block's signed scale with importance weights, then fits the 6-bit scales
/// themselves, weighted by each sub-block's total weight.
fn weighted_scales(x: &[f32; QK_K], importance: &[f32], levels: &mut [u8; QK_K]) -> ([u8; 16], f32) {
    let sigma2 = 2.0 * scale_search::sum_of_squares(x) / QK_K as f32;
    let mut scales = [0f32; 16];
    let mut sums = [0f32; 16];
    let mut weights = [0f32; 16];
    for (j, (xs, ls)) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).enumerate() {
        scale_search::importance_weights(xs, &importance[16 * j..], sigma2, &mut weights);
        sums[j] = weights.iter().fold(0.0, |acc, &w| acc + w);
        scales[j] = scale_search::symmetric(xs, &weights, 4, ls);
    }
    let mut stored = [0u8; 16];
    let d = scale_search::symmetric(&scales, &sums, 32, &mut stored);
    (stored, d)
}

/// Packs sixteen 6-bit scales: low nibbles of scales 0–7 and 8–15 in the low and high nibbles of bytes
/// 0–7, the top two bits of scale `j` in byte `8 + j % 4` at bit `2·(j / 4)`.
fn pack_scales(scales: &[u8; 16], packed: &mut [u8]) {
    packed.fill(0);
    for (j, &s) in scales.iter().enumerate() {
        packed[j % 8] |= (s & 0xF) << (4 * (j / 8));
        packed[8 + j % 4] |= (s >> 4) << (2 * (j / 4));
    }
}

/// Levels `−4..=3` under each 16-element sub-block's scale `d·(scale − 32)`; code `c` keeps its low two
/// bits in `qs` and sets the `hmask` bit when `c ≥ 4`.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<8>(-4),
    affine: |b, scale, offset| {
        let (packed, d) = (&b[96..108], read_f16(b, 108));
        for (sub, scale) in scale.chunks_exact_mut(16).enumerate() {
            let low = if sub < 8 { packed[sub] & 0xF } else { packed[sub - 8] >> 4 };
            let high = (packed[8 + sub % 4] >> (2 * (sub / 4))) & 3;
            scale.fill(d * ((low | high << 4) as i32 - 32) as f32);
        }
        offset.fill(0.0);
    },
    read_codes: |b, codes| {
        unpack_2bit(&b[32..96], codes);
        for (j, c) in codes.iter_mut().enumerate() {
            *c |= ((b[j % 32] >> (j / 32)) & 1) << 2;
        }
    },
    write_codes: |b, codes| {
        let (hmask, qs) = b.split_at_mut(32);
        hmask.fill(0);
        for (j, &c) in codes.iter().enumerate() {
            hmask[j % 32] |= (c >> 2) << (j / 32);
        }
        pack_2bit(&super_block_codes(codes).map(|c| c & 3), &mut qs[..64]);
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
                block[32 + half / 4 + l] = low2[e] | low2[e + 32] << 2 | low2[e + 64] << 4 | low2[e + 96] << 6;
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

        let expected: Vec<f32> =
            (0..QK_K).map(|i| d * (scales[i / 16] as f32 - 32.0) * (levels[i] as f32 - 4.0)).collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }

    #[test]
    fn round_trip_stays_within_bound() {
        check_encoder(GgmlType::Q3_K, QK_K, |g| symmetric_bound(g, 4.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::Q3_K);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::Q3_K, &x, None), QK_K, |g| symmetric_bound(g, 4.0));
            let y = round_trip_row(GgmlType::Q3_K, &x, Some(&importance));
            assert_within(&x, &y, QK_K, |g| symmetric_bound(g, 4.0));
        }
    }
}
