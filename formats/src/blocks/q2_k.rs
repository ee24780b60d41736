//! Q2_K super-blocks: 256 two-bit values in 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit
//! min, both scaled by f16 super-block factors (84 bytes: `u8 scales[16]; u8 qs[64]; f16 d; f16 dmin`;
//! `x = d·(sc & 15)·q − dmin·(sc >> 4)`).
//!
//! Within each 128-element half, byte `l` of its 32 `qs` bytes holds elements `l`, `l + 32`, `l + 64`,
//! `l + 96` in bit pairs 0–1, 2–3, 4–5, 6–7.

use super::grid::{super_block_codes, uniform_levels, BlockGrid};
use super::scale_search::{self, AffineGrid, ErrorMetric};
use super::{nearest_int, pack_2bit, positive_max, read_f16, requantize, unpack_2bit, write_f16, QK_K};

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

/// Without importance: llama.cpp's `quantize_row_q2_K_ref`. With importance: `quantize_row_q2_K_impl`.
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (i, (x, b)) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let x: &[f32; QK_K] = x.try_into().expect("chunks of QK_K");
        let mut levels = [0u8; QK_K];
        let (scales, d, dmin) = match importance {
            None => plain_scales(x, &mut levels),
            Some(importance) => weighted_scales(x, &importance[i * QK_K..][..QK_K], &mut levels),
        };
        b[..16].copy_from_slice(&scales);
        write_f16(b, 80, d);
        write_f16(b, 82, dmin);
        let (d, dmin) = (read_f16(b, 80), read_f16(b, 82));
        for ((xs, out), &sc) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).zip(&scales) {
            let dl = d * (sc & 0xF) as f32;
            if dl != 0.0 {
                requantize(xs, dl, dmin * (sc >> 4) as f32, (0, 3), out);
            }
        }
        pack_2bit(&levels, &mut b[16..80]);
    }
}

/// Fits each 16-element sub-block with weights `|x|` on a coarse grid scored by absolute error, then
/// scales the 4-bit scales and mins to the largest of each. Returns the scale bytes, `d` and `dmin`.
fn plain_scales(x: &[f32; QK_K], levels: &mut [u8; QK_K]) -> ([u8; 16], f32, f32) {
    const GRID: AffineGrid =
        AffineGrid { rmin: -0.5, rdelta: 0.1, steps: 15, metric: ErrorMetric::Absolute, saturate: false };
    let weights = x.map(f32::abs);
    let (scales, mins) = scale_search::affine_on_grid::<16, 16>(x, &weights, 3, levels, &GRID);
    let mins = mins.map(|m| -m);
    let (max_scale, max_min) = (positive_max(&scales), positive_max(&mins));

    // Bytes as llama.cpp's C assignments leave them (an int truncated to a byte).
    let mut packed = [0u8; 16];
    let mut d = 0.0;
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (p, &s) in packed.iter_mut().zip(&scales) {
            *p = nearest_int(iscale * s) as u8;
        }
        d = max_scale / 15.0;
    }
    let mut dmin = 0.0;
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (p, &m) in packed.iter_mut().zip(&mins) {
            *p |= (nearest_int(iscale * m) << 4) as u8;
        }
        dmin = max_min / 15.0;
    }
    (packed, d, dmin)
}

/// Fits each 16-element sub-block with importance weights on the fine grid, then fits the 4-bit
/// scales and mins themselves, weighted by each sub-block's total weight.
fn weighted_scales(x: &[f32; QK_K], importance: &[f32], levels: &mut [u8; QK_K]) -> ([u8; 16], f32, f32) {
    let sigma2 = scale_search::sum_of_squares(x) / QK_K as f32;
    let mut sums = [0f32; 16];
    let mut weights = [0f32; QK_K];
    for (j, (xs, ws)) in x.chunks_exact(16).zip(weights.chunks_exact_mut(16)).enumerate() {
        scale_search::importance_weights(xs, &importance[16 * j..], sigma2, ws);
        sums[j] = ws.iter().fold(0.0, |acc, &w| acc + w);
    }
    let (scales, mins) = scale_search::affine::<16, 16>(x, &weights, 3, levels);
    let mins = mins.map(|m| -m);
    let (mut ls, mut lm) = ([0u8; 16], [0u8; 16]);
    let d = scale_search::positive(&scales, &sums, 15, &mut ls);
    let dmin = scale_search::positive(&mins, &sums, 15, &mut lm);
    (std::array::from_fn(|j| ls[j] | lm[j] << 4), d, dmin)
}

/// Levels `0..=3` under each 16-element sub-block's scale `d·(sc & 15)`, offset by `−dmin·(sc >> 4)`.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<4>(0),
    affine: |b, scale, offset| {
        let (d, dmin) = (read_f16(b, 80), read_f16(b, 82));
        for (sub, (scale, offset)) in scale.chunks_exact_mut(16).zip(offset.chunks_exact_mut(16)).enumerate() {
            scale.fill(d * (b[sub] & 0xF) as f32);
            offset.fill(-(dmin * (b[sub] >> 4) as f32));
        }
    },
    read_codes: |b, codes| unpack_2bit(&b[16..80], codes),
    write_codes: |b, codes| pack_2bit(super_block_codes(codes), &mut b[16..80]),
};

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
        let mut rng = Rng::new(2);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 4) as u8).collect();
        let scales: Vec<u8> = (0..16).map(|_| rng.next_u64() as u8).collect();
        let (d, dmin) = (0.0625f32, 0.5f32);

        let mut block = [0u8; BYTES];
        block[..16].copy_from_slice(&scales);
        for half in [0, 128] {
            for l in 0..32 {
                let e = half + l;
                block[16 + half / 4 + l] = levels[e] | levels[e + 32] << 2 | levels[e + 64] << 4 | levels[e + 96] << 6;
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

    #[test]
    fn round_trip_stays_within_bound() {
        check_encoder(GgmlType::Q2_K, QK_K, |g| affine_bound(g, 3.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::Q2_K);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::Q2_K, &x, None), QK_K, |g| affine_bound(g, 3.0));
            let y = round_trip_row(GgmlType::Q2_K, &x, Some(&importance));
            assert_within(&x, &y, QK_K, |g| affine_bound(g, 3.0));
        }
    }
}
