//! Q6_K super-blocks: 256 six-bit values `q − 32` in 16 sub-blocks of 16, each with a signed 8-bit
//! scale (210 bytes: `u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d`; `x = d·scale·(q − 32)`).
//!
//! Each 128-element half uses 64 `ql` bytes and 32 `qh` bytes. Its quarter `k` (32 elements) takes low
//! nibbles (k = 0, 1) or high nibbles (k = 2, 3) of `ql[32·(k % 2) + l]`, and bits `2k..2k+2` of `qh[l]`
//! as the top two bits.

use super::grid::{super_block_codes, uniform_levels, BlockGrid};
use super::scale_search;
use super::{nearest_int, pack_2bit, read_f16, requantize, write_f16, QK_K};

const BYTES: usize = 210;

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(b, 208);
        for (half, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &b[64 * half..][..64];
            let qh = &b[128 + 32 * half..][..32];
            let scales = &b[192 + 8 * half..][..8];
            for (k, y) in y.chunks_exact_mut(32).enumerate() {
                let low = &ql[32 * (k % 2)..][..32];
                let nibble = 4 * (k / 2);
                for (l, y) in y.iter_mut().enumerate() {
                    let q = ((low[l] >> nibble) & 0xF) | ((qh[l] >> (2 * k)) & 3) << 4;
                    let scale = scales[2 * k + l / 16] as i8;
                    *y = d * scale as f32 * (q as i32 - 32) as f32;
                }
            }
        }
    }
}

/// llama.cpp's `quantize_row_q6_K_ref` without importance and `quantize_row_q6_K_impl` with it: they
/// differ only in the weights of each sub-block's fit (`x²`, or the importance values as given).
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (i, (x, b)) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let mut squares = [0f32; 16];
        let sub_blocks = x.chunks_exact(16).zip(levels.chunks_exact_mut(16));
        for (j, (xs, ls)) in sub_blocks.enumerate() {
            let weights = match importance {
                Some(importance) => &importance[i * QK_K + 16 * j..][..16],
                None => {
                    scale_search::square_weights(xs, &mut squares);
                    &squares[..]
                }
            };
            scales[j] = scale_search::symmetric(xs, weights, 32, ls);
        }

        let max_scale = super::signed_absmax(&scales);
        if max_scale.abs() < 1e-15 {
            b.fill(0);
            continue;
        }
        let iscale = -128.0 / max_scale;
        write_f16(b, 208, 1.0 / iscale);
        let stored = scales.map(|s| nearest_int(iscale * s).min(127) as i8);
        let d = read_f16(b, 208);
        for ((xs, out), &sc) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).zip(&stored) {
            let dl = d * sc as f32;
            if dl != 0.0 {
                requantize(xs, dl, 0.0, (-32, 31), out);
            }
        }

        pack_levels(&levels, b);
        for (out, &sc) in b[192..208].iter_mut().zip(&stored) {
            *out = sc as u8;
        }
    }
}

/// Writes 256 six-bit levels into `ql` and `qh` (the first 192 bytes).
fn pack_levels(levels: &[u8; QK_K], b: &mut [u8]) {
    let (ql, qh) = b.split_at_mut(128);
    for (ql, half) in ql.chunks_exact_mut(64).zip(levels.chunks_exact(128)) {
        for l in 0..32 {
            ql[l] = (half[l] & 0xF) | (half[l + 64] & 0xF) << 4;
            ql[l + 32] = (half[l + 32] & 0xF) | (half[l + 96] & 0xF) << 4;
        }
    }
    pack_2bit(&levels.map(|l| l >> 4), &mut qh[..64]);
}

/// Levels `−32..=31` under each 16-element sub-block's scale `d·scale`.
pub const GRID: BlockGrid = BlockGrid {
    levels: &uniform_levels::<64>(-32),
    affine: |b, scale, offset| {
        let d = read_f16(b, 208);
        for (scale, &sc) in scale.chunks_exact_mut(16).zip(&b[192..208]) {
            scale.fill(d * sc as i8 as f32);
        }
        offset.fill(0.0);
    },
    read_codes: |b, codes| {
        for (half, codes) in codes.chunks_exact_mut(128).enumerate() {
            let (ql, qh) = (&b[64 * half..][..64], &b[128 + 32 * half..][..32]);
            for (k, codes) in codes.chunks_exact_mut(32).enumerate() {
                let (low, nibble) = (&ql[32 * (k % 2)..][..32], 4 * (k / 2));
                for (l, c) in codes.iter_mut().enumerate() {
                    *c = ((low[l] >> nibble) & 0xF) | ((qh[l] >> (2 * k)) & 3) << 4;
                }
            }
        }
    },
    write_codes: |b, codes| pack_levels(super_block_codes(codes), b),
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
        let mut rng = Rng::new(6);
        let levels: Vec<u8> = (0..QK_K).map(|_| (rng.next_u64() % 64) as u8).collect();
        let scales: Vec<i8> = (0..16).map(|_| rng.next_u64() as i8).collect();
        let d = 0.002f32;

        let mut block = [0u8; BYTES];
        for half in 0..2 {
            let (ql, qh) = (64 * half, 128 + 32 * half);
            for l in 0..32 {
                let e = |k: usize| levels[128 * half + l + 32 * k];
                block[ql + l] = (e(0) & 0xF) | (e(2) & 0xF) << 4;
                block[ql + l + 32] = (e(1) & 0xF) | (e(3) & 0xF) << 4;
                block[qh + l] = e(0) >> 4 | (e(1) >> 4) << 2 | (e(2) >> 4) << 4 | (e(3) >> 4) << 6;
            }
        }
        for (j, &s) in scales.iter().enumerate() {
            block[192 + j] = s as u8;
        }
        block[208..].copy_from_slice(&f16::from_f32(d).to_le_bytes());

        let d = f16::from_f32(d).to_f32();
        let expected: Vec<f32> = (0..QK_K).map(|i| d * scales[i / 16] as f32 * (levels[i] as f32 - 32.0)).collect();
        let mut y = vec![0f32; QK_K];
        dequantize(&block, &mut y);
        assert_close(&y, &expected);
    }

    #[test]
    fn round_trip_stays_within_bound() {
        check_encoder(GgmlType::Q6_K, QK_K, |g| symmetric_bound(g, 32.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::Q6_K);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::Q6_K, &x, None), QK_K, |g| symmetric_bound(g, 32.0));
            let y = round_trip_row(GgmlType::Q6_K, &x, Some(&importance));
            assert_within(&x, &y, QK_K, |g| symmetric_bound(g, 32.0));
        }
    }
}
