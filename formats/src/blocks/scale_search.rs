//! Importance-weighted scale searches shared by the 32-element encoders.
//!
//! These follow llama.cpp's `quantize_row_q{4,5}_{0,1}_impl`: each element's weight is its importance
//! times `sqrt(sigma2 + x²)`, where `sigma2` is the mean square of the whole row, then a small grid of
//! candidate scales is tried and the weighted least-squares fit kept. Arithmetic is f32 in llama.cpp's
//! order so that the chosen levels match its output bit for bit.

use super::{nearest_int, signed_absmax};

/// Calls `encode(x, weights, block_bytes)` for each 32-element block of one row, with the weights
/// llama.cpp derives from the importance values: `importance · sqrt(sigma2 + x²)`, where `sigma2` is the
/// row's mean square (so that small elements keep some weight).
pub(crate) fn for_each_block(
    row: &[f32],
    importance: &[f32],
    dst: &mut [u8],
    block_bytes: usize,
    mut encode: impl FnMut(&[f32; 32], &[f32; 32], &mut [u8]),
) {
    let sum: f32 = row.iter().fold(0.0, |acc, &x| acc + x * x);
    let sigma2 = sum / row.len() as f32;
    let blocks = row.chunks_exact(32).zip(importance.chunks_exact(32));
    for ((x, imp), block) in blocks.zip(dst.chunks_exact_mut(block_bytes)) {
        let x: &[f32; 32] = x.try_into().expect("chunks of 32");
        let weights = std::array::from_fn(|j| imp[j] * (sigma2 + x[j] * x[j]).sqrt());
        encode(x, &weights, block);
    }
}

/// Symmetric levels `-nmax..nmax` (stored as `0..2·nmax`, i.e. offset by `nmax`) with a weighted
/// least-squares scale, trying 18 scales around `nmax / max|x|` (llama.cpp's `make_qx_quants`,
/// `rmse_type` 1 with explicit weights). Returns the scale; `levels` receives the stored values.
pub(crate) fn symmetric(
    x: &[f32; 32],
    weights: &[f32; 32],
    nmax: i32,
    levels: &mut [u8; 32],
) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < 1e-15 {
        *levels = [0; 32];
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (&v, &w) in x.iter().zip(weights) {
            let l = level(iscale, v) as f32;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, levels: &mut [u8; 32]| {
        for (out, &v) in levels.iter_mut().zip(x) {
            *out = (level(iscale, v) + nmax) as u8;
        }
    };

    let iscale = -(nmax as f32) / max;
    store(iscale, levels);
    let (sumlx, suml2) = fit(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        let iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Affine levels `0..=nmax` with a weighted least-squares scale and minimum, trying 37 scales around
/// `nmax / (max − min)` (llama.cpp's `make_qkx3_quants` with explicit weights, its rmin −0.9, rdelta
/// 0.05, squared error). Returns `(scale, min)` so that `x ≈ scale·level + min`, with `min ≤ 0`.
pub(crate) fn affine(
    x: &[f32; 32],
    weights: &[f32; 32],
    nmax: i32,
    levels: &mut [u8; 32],
) -> (f32, f32) {
    const RMIN: f32 = -0.9;
    const RDELTA: f32 = 0.05;
    const STEPS: i32 = 36;

    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        *levels = [0; 32];
        return (0.0, min);
    }

    let level =
        |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
    let weighted_sse = |levels: &[u8; 32], scale: f32, min: f32| {
        let mut sse = 0.0f32;
        for ((&l, &v), &w) in levels.iter().zip(x).zip(weights) {
            let diff = scale * l as f32 + min - v;
            sse += w * (diff * diff);
        }
        sse
    };

    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    for (out, &v) in levels.iter_mut().zip(x) {
        *out = level(iscale, v, min);
    }
    let mut best = weighted_sse(levels, scale, min);

    let mut candidate = [0u8; 32];
    for step in 0..=STEPS {
        let iscale = (RMIN + RDELTA * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((out, &v), &w) in candidate.iter_mut().zip(x).zip(weights) {
            *out = level(iscale, v, min);
            let l = *out as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let sse = weighted_sse(&candidate, this_scale, this_min);
            if sse < best {
                *levels = candidate;
                best = sse;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, min)
}
