//! Q4_K super-blocks: 256 four-bit values in 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit
//! min (144 bytes: `f16 d; f16 dmin; u8 scales[12]; u8 qs[128]`; `x = d·sc·q − dmin·m`).
//!
//! Each 64-element group uses 32 `qs` bytes: low nibbles hold its first sub-block, high nibbles its
//! second. Scales and mins are packed as [`scale_min_k4`] reads them.

use super::grid::{super_block_codes, uniform_levels, BlockGrid};
use super::scale_search::{self, AffineGrid, ErrorMetric};
use super::{nearest_int, pack_scale_min_k4, positive_max, read_f16, requantize, scale_min_k4, write_f16, QK_K};

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

/// Without importance: llama.cpp's `quantize_row_q4_K_ref`. With importance: `quantize_row_q4_K_impl`.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    const PLAIN_GRID: AffineGrid =
        AffineGrid { rmin: -1.0, rdelta: 0.1, steps: 20, metric: ErrorMetric::Squared, saturate: false };
    for (i, (x, b)) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let x: &[f32; QK_K] = x.try_into().expect("chunks of QK_K");
        let importance = importance.map(|imp| &imp[i * QK_K..][..QK_K]);
        let levels = encode_scales(x, importance, 15, &PLAIN_GRID, b);
        pack_low_nibbles(&levels, &mut b[16..]);
    }
}

/// Packs the low nibbles of 256 levels as Q4_K and Q5_K store them: each 64-element group takes 32
/// bytes, its first 32 elements in the low nibbles and its last 32 in the high nibbles.
pub(crate) fn pack_low_nibbles(levels: &[u8; QK_K], qs: &mut [u8]) {
    for (group, out) in levels.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        let (first, second) = group.split_at(32);
        for ((q, &lo), &hi) in out.iter_mut().zip(first).zip(second) {
            *q = (lo & 0xF) | (hi & 0xF) << 4;
        }
    }
}

/// The part of a Q4_K or Q5_K super-block both share: fits a (scale, min) pair to each 32-element
/// sub-block, quantizes the pairs to 6 bits under the f16 `d` and `dmin`, and writes those into the first
/// 16 bytes of `block`. Returns the levels `0..=nmax` for the stored scales.
///
/// Without importance each sub-block is fitted on `plain_grid` with weights `rms + |x|` and the 6-bit
/// values are scaled to the largest pair; with importance the fits use [`scale_search::IMPORTANCE_GRID`]
/// and the 6-bit values come from a weighted fit of their own ([`scale_search::positive`]).
// Inlined so that each caller's constant grid specialises the search (see `affine_on_grid`).
#[inline(always)]
pub(crate) fn encode_scales(
    x: &[f32; QK_K],
    importance: Option<&[f32]>,
    nmax: i32,
    plain_grid: &AffineGrid,
    block: &mut [u8],
) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    let mut weights = [0f32; QK_K];
    let sub_blocks = x.chunks_exact(32).zip(weights.chunks_exact_mut(32));

    let (ls, lm, d, dmin) = match importance {
        None => {
            for (xs, ws) in sub_blocks {
                let rms = (scale_search::sum_of_squares(xs) / 32.0).sqrt();
                for (w, &v) in ws.iter_mut().zip(xs) {
                    *w = rms + v.abs();
                }
            }
            let (scales, mins) = scale_search::affine_on_grid::<8, 32>(x, &weights, nmax, &mut levels, plain_grid);
            let mins = mins.map(|m| -m);
            let (max_scale, max_min) = (positive_max(&scales), positive_max(&mins));
            let six_bits = |values: &[f32; 8], max: f32| -> [u8; 8] {
                let inverse = if max > 0.0 { 63.0 / max } else { 0.0 };
                std::array::from_fn(|j| (nearest_int(inverse * values[j]) as u8).min(63))
            };
            (six_bits(&scales, max_scale), six_bits(&mins, max_min), max_scale / 63.0, max_min / 63.0)
        }
        Some(importance) => {
            let sigma2 = 2.0 * scale_search::sum_of_squares(x) / QK_K as f32;
            let mut sums = [0f32; 8];
            for (j, (xs, ws)) in sub_blocks.enumerate() {
                scale_search::importance_weights(xs, &importance[32 * j..], sigma2, ws);
                sums[j] = ws.iter().fold(0.0, |acc, &w| acc + w);
            }
            let (scales, mins) = scale_search::affine::<8, 32>(x, &weights, nmax, &mut levels);
            let mins = mins.map(|m| -m);
            let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
            let d = scale_search::positive(&scales, &sums, 63, &mut ls);
            let dmin = scale_search::positive(&mins, &sums, 63, &mut lm);
            (ls.map(|l| l.min(63)), lm.map(|l| l.min(63)), d, dmin)
        }
    };

    write_f16(block, 0, d);
    write_f16(block, 2, dmin);
    block[4..16].copy_from_slice(&pack_scale_min_k4(&ls, &lm));
    let (d, dmin) = (read_f16(block, 0), read_f16(block, 2));
    let sub_blocks = x.chunks_exact(32).zip(levels.chunks_exact_mut(32));
    for (j, (xs, out)) in sub_blocks.enumerate() {
        let dl = d * ls[j] as f32;
        if dl != 0.0 {
            requantize(xs, dl, dmin * lm[j] as f32, (0, nmax), out);
        }
    }
    levels
}

/// Levels `0..=15` under each sub-block's scale `d·sc`, offset by its `−dmin·m`.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<16>(0),
    affine: sub_block_affine,
    read_codes: |b, codes| unpack_low_nibbles(&b[16..], codes),
    write_codes: |b, codes| pack_low_nibbles(super_block_codes(codes), &mut b[16..]),
};

/// Each element's scale and offset in a Q4_K or Q5_K super-block (the same 16 leading bytes).
pub(crate) fn sub_block_affine(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
    let (d, dmin) = (read_f16(b, 0), read_f16(b, 2));
    for (sub, (scale, offset)) in scale.chunks_exact_mut(32).zip(offset.chunks_exact_mut(32)).enumerate() {
        let (sc, m) = scale_min_k4(sub, &b[4..16]);
        scale.fill(d * sc as f32);
        offset.fill(-(dmin * m as f32));
    }
}

/// Inverse of [`pack_low_nibbles`].
pub(crate) fn unpack_low_nibbles(qs: &[u8], levels: &mut [u8]) {
    for (group, qs) in levels.chunks_exact_mut(64).zip(qs.chunks_exact(32)) {
        for (l, &q) in qs.iter().enumerate() {
            group[l] = q & 0xF;
            group[l + 32] = q >> 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{
        affine_bound, assert_within, check_encoder, round_trip_row, skewed_importance_gain,
    };
    use crate::blocks::test_data::{assert_close, Rng};
    use crate::ggml_type::GgmlType;
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let mut rng = Rng::new(4);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 16) as u8).collect();
        let sc: [u8; 8] = std::array::from_fn(|_| (rng.next_u64() % 64) as u8);
        let m: [u8; 8] = std::array::from_fn(|_| (rng.next_u64() % 64) as u8);
        let (d, dmin) = (0.01f32, 0.02f32);

        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
        block[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &m));
        for group in 0..4 {
            for l in 0..32 {
                let e = 64 * group + l;
                block[16 + 32 * group + l] = levels[e] | levels[e + 32] << 4;
            }
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
        check_encoder(GgmlType::Q4_K, QK_K, |g| affine_bound(g, 15.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::Q4_K);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::Q4_K, &x, None), QK_K, |g| affine_bound(g, 15.0));
            let y = round_trip_row(GgmlType::Q4_K, &x, Some(&importance));
            assert_within(&x, &y, QK_K, |g| affine_bound(g, 15.0));
        }
    }
}
