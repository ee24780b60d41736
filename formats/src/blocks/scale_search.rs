//! Scale searches shared by the encoders: given a group of values and a weight per value, find the
//! scale (and for affine formats the minimum) whose levels minimise the weighted squared error.
//!
//! Each search follows one of llama.cpp's (`make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`,
//! `make_qkx3_quants`, `make_qp_quants`, as of llama.cpp commit 01243c58, which guards the divisions
//! that used to write NaN scales) in its f32 arithmetic and operation order, so that the levels chosen
//! match llama.cpp's bit for bit. The weights come from the caller: llama.cpp derives them from the
//! importance matrix when there is one ([`importance_weights`]) and from the values otherwise.

use super::{nearest_int, signed_absmax};

/// Σ x², summed in order (the row and super-block statistics llama.cpp's encoders start from).
#[inline]
pub(crate) fn sum_of_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |acc, &v| acc + v * v)
}

/// llama.cpp's per-element weights without an importance matrix, for most of its searches: `x²`.
#[inline]
pub(crate) fn square_weights(x: &[f32], weights: &mut [f32]) {
    for (w, &v) in weights.iter_mut().zip(x) {
        *w = v * v;
    }
}

/// llama.cpp's per-element weights under an importance matrix: `importance · sqrt(sigma2 + x²)`, where
/// `sigma2` is a mean square of the surrounding row or super-block, so that small values keep some weight.
#[inline]
pub(crate) fn importance_weights(x: &[f32], importance: &[f32], sigma2: f32, weights: &mut [f32]) {
    for ((w, &v), &imp) in weights.iter_mut().zip(x).zip(importance) {
        *w = imp * (sigma2 + v * v).sqrt();
    }
}

/// Calls `encode(x, weights, block_bytes)` for each 32-element block of one row, with the weights
/// llama.cpp's 32-element encoders use: [`importance_weights`] with the row's mean square as `sigma2`.
pub(crate) fn for_each_block(
    row: &[f32],
    importance: &[f32],
    dst: &mut [u8],
    block_bytes: usize,
    mut encode: impl FnMut(&[f32; 32], &[f32; 32], &mut [u8]),
) {
    let sigma2 = sum_of_squares(row) / row.len() as f32;
    let blocks = row.chunks_exact(32).zip(importance.chunks_exact(32));
    for ((x, imp), block) in blocks.zip(dst.chunks_exact_mut(block_bytes)) {
        let x: &[f32; 32] = x.try_into().expect("chunks of 32");
        let mut weights = [0f32; 32];
        importance_weights(x, imp, sigma2, &mut weights);
        encode(x, &weights, block);
    }
}

/// Symmetric levels `-nmax..nmax` (stored as `0..2·nmax`, i.e. offset by `nmax`) with a weighted
/// least-squares scale, trying 18 scales around `nmax / max|x|` (llama.cpp's `make_qx_quants`,
/// `rmse_type` 1; its "no weights" case is `weights = x²`). Returns the scale; `levels` receives the
/// stored values.
pub(crate) fn symmetric(x: &[f32], weights: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    // llama.cpp's starting scale, then its 18 trial scales.
    const TRIES: usize = 19;
    let max = signed_absmax(x);
    if max.abs() < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut inverse_scales = [-(nmax as f32) / max; TRIES];
    for (id, step) in inverse_scales[1..].iter_mut().zip((-9..=9).filter(|&s| s != 0)) {
        *id = -(nmax as f32 + 0.1 * step as f32) / max;
    }
    // The tries do not depend on one another, so they are fitted at once, one vector lane each (each
    // still summing in element order, as llama.cpp does); only the chosen one's levels are stored.
    let (mut sumlx, mut suml2) = ([0f32; TRIES], [0f32; TRIES]);
    for (&v, &w) in x.iter().zip(weights) {
        for t in 0..TRIES {
            let l = level(inverse_scales[t], v) as f32;
            sumlx[t] += w * v * l;
            suml2[t] += w * l * l;
        }
    }
    let mut chosen = 0;
    let mut scale = if suml2[0] != 0.0 { sumlx[0] / suml2[0] } else { 0.0 };
    let mut best = scale * sumlx[0];
    for t in 1..TRIES {
        if suml2[t] > 0.0 && sumlx[t] * sumlx[t] > best * suml2[t] {
            chosen = t;
            scale = sumlx[t] / suml2[t];
            best = scale * sumlx[t];
        }
    }
    for (out, &v) in levels.iter_mut().zip(x) {
        *out = (level(inverse_scales[chosen], v) + nmax) as u8;
    }
    scale
}

/// Symmetric levels as [`symmetric`], weighted by `x²`, but refined one element at a time instead of
/// by trying scales (llama.cpp's `make_q3_quants` with `do_rmse`; Q3_K's encoder without importance).
pub(crate) fn symmetric_refined(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    const MAX_GROUP: usize = 16;
    let max = signed_absmax(x);
    if max.abs() < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let mut weights = [0f32; MAX_GROUP];
    let weights = &mut weights[..x.len()];
    square_weights(x, weights);
    let mut signed = [0i32; MAX_GROUP];
    let signed = &mut signed[..x.len()];

    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((l, &w), &v) in signed.iter_mut().zip(weights.iter()).zip(x) {
        *l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        sumlx += w * v * *l as f32;
        suml2 += w * *l as f32 * *l as f32;
    }
    let rule = Refinement { range: (-nmax, nmax - 1), guard: Guard::AfterUpdate, wrap: |l| l };
    let (sumlx, suml2) = refine_levels(x, weights, signed, (sumlx, suml2), &rule);
    for (out, &l) in levels.iter_mut().zip(signed.iter()) {
        *out = (l + nmax) as u8;
    }
    least_squares_scale(sumlx, suml2)
}

/// Non-negative levels `0..=nmax` for non-negative values — the sub-block scales and mins of the
/// K-quants — with a weighted least-squares scale: the best of 9 scales around `nmax / max`, then
/// refined one element at a time (llama.cpp's `make_qp_quants`). Returns the scale. Groups of at most 16.
pub(crate) fn positive(x: &[f32], weights: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    const MAX_GROUP: usize = 16;
    // llama.cpp keeps these levels in a byte array, so a (never expected) negative value wraps.
    let wrap = |l: i32| l as u8 as i32;
    let max = x.iter().fold(0.0f32, |m, &v| if m > v { m } else { v });
    if max < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let mut stored = [0i32; MAX_GROUP];
    let stored = &mut stored[..x.len()];

    let mut iscale = nmax as f32 / max;
    for (l, &v) in stored.iter_mut().zip(x) {
        *l = wrap(nearest_int(iscale * v));
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for ((&l, &v), &w) in stored.iter().zip(x).zip(weights) {
        let diff = v - scale * l as f32;
        best_mse += w * diff * diff;
    }
    for step in (-4..=4).filter(|&s| s != 0) {
        let iscale_step = (0.1 * step as f32 + nmax as f32) / max;
        let scale_step = 1.0 / iscale_step;
        let mut mse = 0.0f32;
        for (&v, &w) in x.iter().zip(weights) {
            let l = nearest_int(iscale_step * v).min(nmax);
            let diff = v - scale_step * l as f32;
            mse += w * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_step;
        }
    }

    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for ((out, &v), &w) in stored.iter_mut().zip(x).zip(weights) {
        let l = nearest_int(iscale * v).min(nmax);
        *out = wrap(l);
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let rule = Refinement { range: (i32::MIN, nmax), guard: Guard::BeforeUpdate, wrap };
    let (sumlx, suml2) = refine_levels(x, weights, stored, (sumlx, suml2), &rule);
    for (out, &l) in levels.iter_mut().zip(stored.iter()) {
        *out = l as u8;
    }
    least_squares_scale(sumlx, suml2)
}

/// Σw·x·l / Σw·l², or 0 when no weight is left (llama.cpp guards the division since all-zero
/// importance spans and denormal values wrote NaN scales).
#[inline]
pub(crate) fn least_squares_scale(sumlx: f32, suml2: f32) -> f32 {
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// When a level change may be considered: llama.cpp's two refiners differ in where they require the
/// remaining Σw·l² to be positive.
enum Guard {
    /// Before the candidate is computed (`make_qp_quants`).
    BeforeUpdate,
    /// After the candidate is added back (`make_q3_quants`).
    AfterUpdate,
}

struct Refinement<W: Fn(i32) -> i32> {
    /// Clamp for a candidate level.
    range: (i32, i32),
    guard: Guard,
    /// How the level array stores a level (the comparisons and later sums read it back from there).
    wrap: W,
}

/// Coordinate descent on the levels of a least-squares fit `x ≈ scale·l`: each element in turn moves
/// to the level that the fit of the others suggests, kept when Σwxl²/Σwl² grows; up to 5 sweeps.
/// Takes and returns (Σw·x·l, Σw·l²).
fn refine_levels<W: Fn(i32) -> i32>(
    x: &[f32],
    weights: &[f32],
    levels: &mut [i32],
    (mut sumlx, mut suml2): (f32, f32),
    rule: &Refinement<W>,
) -> (f32, f32) {
    for _ in 0..5 {
        let mut changed = false;
        for ((l, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
            let current = *l as f32;
            let mut slx = sumlx - w * v * current;
            let mut sl2 = suml2 - w * current * current;
            let may_move = match rule.guard {
                Guard::BeforeUpdate => slx > 0.0 && sl2 > 0.0,
                Guard::AfterUpdate => slx > 0.0,
            };
            if !may_move {
                continue;
            }
            let new_l = nearest_int(v * sl2 / slx).clamp(rule.range.0, rule.range.1);
            if new_l == *l {
                continue;
            }
            slx += w * v * new_l as f32;
            sl2 += w * new_l as f32 * new_l as f32;
            let positive = match rule.guard {
                Guard::BeforeUpdate => true,
                Guard::AfterUpdate => sl2 > 0.0,
            };
            if positive && slx * slx * suml2 > sumlx * sumlx * sl2 {
                *l = (rule.wrap)(new_l);
                sumlx = slx;
                suml2 = sl2;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    (sumlx, suml2)
}

/// How the affine search measures a candidate's error.
#[derive(Clone, Copy)]
pub(crate) enum ErrorMetric {
    Squared,
    Absolute,
}

/// The candidate scales of an affine search: `(nmax + rmin + rdelta·i) / (max − min)` for `i` in
/// `0..=steps`, each fitted by weighted least squares and scored with `metric`.
pub(crate) struct AffineGrid {
    pub rmin: f32,
    pub rdelta: f32,
    pub steps: i32,
    pub metric: ErrorMetric,
    /// Whether a candidate's levels saturate when `iscale·(x − min)` leaves `nearest_int`'s range (as
    /// the running minimum nears the maximum), as `make_qkx3_quants` now does; `make_qkx2_quants` still
    /// clamps whatever `nearest_int` makes of it.
    pub saturate: bool,
}

/// The grid llama.cpp uses whenever an importance matrix is given (`make_qkx3_quants`' callers).
pub(crate) const IMPORTANCE_GRID: AffineGrid =
    AffineGrid { rmin: -0.9, rdelta: 0.05, steps: 36, metric: ErrorMetric::Squared, saturate: true };

/// Affine levels on [`IMPORTANCE_GRID`]; see [`affine_on_grid`].
#[inline]
pub(crate) fn affine<const GROUPS: usize, const LEN: usize>(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
) -> ([f32; GROUPS], [f32; GROUPS]) {
    affine_on_grid::<GROUPS, LEN>(x, weights, nmax, levels, &IMPORTANCE_GRID)
}

/// Affine levels `0..=nmax` with a weighted least-squares scale and minimum, the best over `grid`
/// (llama.cpp's `make_qkx2_quants` / `make_qkx3_quants`, which differ only in their callers' grids and
/// weights and in [`AffineGrid::saturate`]), for `GROUPS` consecutive groups of `LEN` values of `x`,
/// each fitted on its own. Returns each group's `(scale, min)` so that `x ≈ scale·level + min`, with
/// `min ≤ 0`.
///
/// Each candidate starts from the minimum the previous accepted one left, so one group's candidates
/// must be tried in turn; the groups are independent, though, so they are searched side by side, one
/// vector lane each, every lane taking exactly the single-group search's steps (accepting by select
/// instead of by branch). That keeps the bytes while letting the sums of several groups grow at once.
// Inlined so that each caller's constant grid (metric, saturation) and sizes specialise the loops.
#[inline(always)]
pub(crate) fn affine_on_grid<const GROUPS: usize, const LEN: usize>(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
    grid: &AffineGrid,
) -> ([f32; GROUPS], [f32; GROUPS]) {
    /// Per-lane values; `[i][g]` is element `i` of group `g`.
    type Lanes<const G: usize> = [f32; G];
    let (x, weights, levels) = (&x[..GROUPS * LEN], &weights[..GROUPS * LEN], &mut levels[..GROUPS * LEN]);
    let mut xt = [[0f32; GROUPS]; LEN];
    let mut wt = [[0f32; GROUPS]; LEN];
    for (g, (xs, ws)) in x.chunks_exact(LEN).zip(weights.chunks_exact(LEN)).enumerate() {
        for i in 0..LEN {
            xt[i][g] = xs[i];
            wt[i][g] = ws[i];
        }
    }

    let mut min: Lanes<GROUPS> = xt[0];
    let mut max: Lanes<GROUPS> = xt[0];
    let mut sum_w: Lanes<GROUPS> = wt[0];
    let mut sum_x: Lanes<GROUPS> = std::array::from_fn(|g| wt[0][g] * xt[0][g]);
    for (xs, ws) in xt.iter().zip(&wt).skip(1) {
        for g in 0..GROUPS {
            let (v, w) = (xs[g], ws[g]);
            min[g] = if v < min[g] { v } else { min[g] };
            max[g] = if v > max[g] { v } else { max[g] };
            sum_w[g] += w;
            sum_x[g] += w * v;
        }
    }
    for m in &mut min {
        *m = if *m > 0.0 { 0.0 } else { *m };
    }
    // A flat group (also a constant positive one, once its minimum is 0) has all levels 0 and scale 0.
    let flat: [bool; GROUPS] = std::array::from_fn(|g| max[g] <= min[g]);
    let flat_min = min;

    let level = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax) as f32;
    let error = |levels: &[Lanes<GROUPS>; LEN], scale: &Lanes<GROUPS>, min: &Lanes<GROUPS>| {
        let mut total = [0f32; GROUPS];
        for ((ls, xs), ws) in levels.iter().zip(&xt).zip(&wt) {
            for g in 0..GROUPS {
                let diff = scale[g] * ls[g] + min[g] - xs[g];
                total[g] += match grid.metric {
                    ErrorMetric::Squared => ws[g] * (diff * diff),
                    ErrorMetric::Absolute => ws[g] * diff.abs(),
                };
            }
        }
        total
    };

    let iscale: Lanes<GROUPS> = std::array::from_fn(|g| nmax as f32 / (max[g] - min[g]));
    let mut scale: Lanes<GROUPS> = iscale.map(|s| 1.0 / s);
    let mut best_levels = [[0f32; GROUPS]; LEN];
    for (ls, xs) in best_levels.iter_mut().zip(&xt) {
        for g in 0..GROUPS {
            ls[g] = level(iscale[g], xs[g], min[g]);
        }
    }
    let mut best = error(&best_levels, &scale, &min);

    let mut candidate = [[0f32; GROUPS]; LEN];
    for step in 0..=grid.steps {
        let iscale: Lanes<GROUPS> =
            std::array::from_fn(|g| (grid.rmin + grid.rdelta * step as f32 + nmax as f32) / (max[g] - min[g]));
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; GROUPS], [0f32; GROUPS], [0f32; GROUPS]);
        for ((ls, xs), ws) in candidate.iter_mut().zip(&xt).zip(&wt) {
            for g in 0..GROUPS {
                let (v, w) = (xs[g], ws[g]);
                let l = if grid.saturate {
                    // Both arms computed, so that this selects rather than branches.
                    let scaled = iscale[g] * (v - min[g]);
                    let capped = nearest_int(if scaled < nmax as f32 { scaled } else { nmax as f32 }) as f32;
                    if scaled > 0.0 {
                        capped
                    } else {
                        0.0
                    }
                } else {
                    level(iscale[g], v, min[g])
                };
                ls[g] = l;
                sum_l[g] += w * l;
                sum_l2[g] += w * l * l;
                sum_xl[g] += w * l * v;
            }
        }
        let mut this_scale = [0f32; GROUPS];
        let mut this_min = [0f32; GROUPS];
        let mut fitted = [false; GROUPS];
        for g in 0..GROUPS {
            let det = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            fitted[g] = det > 0.0;
            let s = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det;
            let m = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det;
            (this_scale[g], this_min[g]) = if m > 0.0 { (sum_xl[g] / sum_l2[g], 0.0) } else { (s, m) };
        }
        let candidate_error = error(&candidate, &this_scale, &this_min);
        let accepted: [bool; GROUPS] = std::array::from_fn(|g| fitted[g] && candidate_error[g] < best[g]);
        for g in 0..GROUPS {
            if accepted[g] {
                best[g] = candidate_error[g];
                scale[g] = this_scale[g];
                min[g] = this_min[g];
            }
        }
        for (best, cand) in best_levels.iter_mut().zip(&candidate) {
            for g in 0..GROUPS {
                best[g] = if accepted[g] { cand[g] } else { best[g] };
            }
        }
    }

    for (g, out) in levels.chunks_exact_mut(LEN).enumerate() {
        for (i, l) in out.iter_mut().enumerate() {
            *l = if flat[g] { 0 } else { best_levels[i][g] as u8 };
        }
        if flat[g] {
            (scale[g], min[g]) = (0.0, flat_min[g]);
        }
    }
    (scale, min)
}
