//! AWQ's two searches, both scored by the linears' output error on the calibration inputs, read from the
//! input Hessian `H = 2/n XᵀX` instead of rerunning the block: rounding `W` to `W'` changes the outputs
//! by `X (W' − W)ᵀ`, whose squared norm is `n/2 · Σ_rows ΔW H ΔWᵀ`.
//!
//! - [`scales`]: per input channel `s = x_mean^α`, α on a grid in `[0, 1)`, normalized by
//!   `sqrt(max s · min s)` (AutoAWQ's `_search_best_scale` without duo scaling), scored by rounding
//!   `W·diag(s)` and scaling back. AutoAWQ scores the attention/MLP module's output; this scores each
//!   linear's own output and sums over the group, which needs no extra forward passes; to bound the
//!   cost (rows · cols² per linear and candidate) it is estimated from at most [`SEARCH_ROWS`] evenly
//!   spaced rows of each linear.
//! - [`clip`]: per output row and group, the weights' range shrunk by `1 − i/grid` for `i < grid/2`
//!   (AutoAWQ's `_compute_best_clip`: ratios 1 down to just above 0.5), scored by the group's own
//!   output error (the diagonal block of `H` for its columns).
//!
//! Candidates and rows are independent, so both run in parallel with sequential sums inside each:
//! the choice does not depend on the thread count. Ties go to the first candidate (α = 0, no clipping).

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::block::{Matrix, Tie};
use crate::quant::gptq::Grid;

/// Weight rows whose rounding error is multiplied by `H` at once.
const LOSS_ROWS: usize = 256;
/// Rows of each linear the scale search scores.
const SEARCH_ROWS: usize = 512;
/// Weight rows one clip task searches.
const CLIP_ROWS: usize = 32;

/// The scale search's choice for one group.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ScaleChoice {
    pub alpha: f64,
    /// Per producer channel.
    pub scales: Vec<f32>,
    pub loss: f64,
    /// The loss at α = 0 (plain rounding).
    pub rounding_loss: f64,
}

/// Searches the scales of the linears `ws` sharing an input with per-producer-channel mean magnitudes
/// `x_mean` and Hessian `h` (row-major, input width squared).
pub(super) fn scales(
    x_mean: &[f64],
    tie: &Tie,
    ws: &[&Matrix],
    h: &[f32],
    grid: Grid,
    group: usize,
    grid_points: usize,
) -> ScaleChoice {
    let cols = x_mean.len() * tie.heads;
    let h = MatRef::from_row_major_slice(h, cols, cols);
    let candidates: Vec<(Vec<f32>, f64)> = (0..grid_points)
        .into_par_iter()
        .map(|k| {
            let s = candidate(x_mean, k as f64 / grid_points as f64);
            let expanded = tie.expand(&s);
            let loss = ws.iter().map(|w| scaled_rounding_loss(w, &expanded, h, grid, group)).sum();
            (s, loss)
        })
        .collect();
    let best = (0..grid_points).min_by(|&a, &b| candidates[a].1.total_cmp(&candidates[b].1)).expect("a grid point");
    let rounding_loss = candidates[0].1;
    let (scales, loss) = candidates.into_iter().nth(best).expect("best is a candidate");
    ScaleChoice { alpha: best as f64 / grid_points as f64, scales, loss, rounding_loss }
}

/// `x_mean^α`, floored at 1e-4 and normalized so that `max · min = 1` (non-finite results become 1).
pub(super) fn candidate(x_mean: &[f64], alpha: f64) -> Vec<f32> {
    let s: Vec<f64> = x_mean.iter().map(|&x| x.powf(alpha).max(1e-4)).collect();
    let (lo, hi) = s.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (lo * hi).sqrt();
    s.iter()
        .map(|&v| {
            let v = (v / norm) as f32;
            if v.is_finite() && v > 0.0 {
                v
            } else {
                1.0
            }
        })
        .collect()
}

/// `Σ_rows Δ H Δᵀ` with `Δ = Q(w·diag(s))·diag(s)⁻¹ − w`, estimated from at most [`SEARCH_ROWS`] evenly
/// spaced rows and scaled to all of them.
fn scaled_rounding_loss(w: &Matrix, s: &[f32], h: MatRef<f32>, grid: Grid, group: usize) -> f64 {
    let cols = w.cols;
    let stride = w.rows.div_ceil(SEARCH_ROWS);
    let rows: Vec<&[f32]> = w.values.chunks_exact(cols).step_by(stride).collect();
    let mut delta = vec![0f32; LOSS_ROWS * cols];
    let mut product = vec![0f32; LOSS_ROWS * cols];
    let mut scaled = vec![0f32; group];
    let mut loss = 0f64;
    for batch in rows.chunks(LOSS_ROWS) {
        let n = batch.len();
        for (row, d) in batch.iter().zip(delta.chunks_exact_mut(cols)) {
            for ((w, s), d) in row.chunks_exact(group).zip(s.chunks_exact(group)).zip(d.chunks_exact_mut(group)) {
                scaled.iter_mut().zip(w.iter().zip(s)).for_each(|(v, (&w, &s))| *v = w * s);
                round_group(grid, &scaled, d);
                d.iter_mut().zip(w.iter().zip(s)).for_each(|(d, (&w, &s))| *d = *d / s - w);
            }
        }
        let (delta, product) = (&delta[..n * cols], &mut product[..n * cols]);
        let dst = MatMut::from_row_major_slice_mut(product, n, cols);
        matmul(dst, Accum::Replace, MatRef::from_row_major_slice(delta, n, cols), h, 1.0, Par::Seq);
        loss += delta.chunks_exact(cols).zip(product.chunks_exact(cols)).map(|(d, p)| dot(d, p)).sum::<f64>();
    }
    loss * (w.rows as f64 / rows.len() as f64)
}

/// `Σ a·b`, summed in eight lanes so the loop vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (a, b) in a8.zip(b8) {
        lanes.iter_mut().zip(a.iter().zip(b)).for_each(|(l, (x, y))| *l += x * y);
    }
    f64::from(lanes.iter().sum::<f32>() + tail)
}

/// `values` rounded onto their own min-max grid (one output row's group), dequantized into `out`.
fn round_group(grid: Grid, values: &[f32], out: &mut [f32]) {
    let p = grid.params(values.iter().copied());
    out.iter_mut().zip(values).for_each(|(o, &v)| *o = p.dequantize(grid.code(v, p)));
}

/// Clips every row's groups of `w` in place to the range that minimizes the group's output error under
/// `h` (row-major, `w.cols` squared).
pub(super) fn clip(w: &mut Matrix, h: &[f32], grid: Grid, group: usize, grid_points: usize) {
    let cols = w.cols;
    let blocks: Vec<Vec<f32>> = (0..cols / group)
        .map(|g| {
            let span = g * group..(g + 1) * group;
            span.clone().flat_map(|i| h[i * cols..][span.clone()].iter().copied()).collect()
        })
        .collect();
    let ratios: Vec<f32> = (0..(grid_points / 2).max(1)).map(|i| 1.0 - i as f32 / grid_points as f32).collect();
    w.values.par_chunks_mut(CLIP_ROWS * cols).for_each(|rows| {
        let candidates = rows.len() / cols * ratios.len();
        let mut delta = vec![0f32; candidates * group];
        let mut product = vec![0f32; candidates * group];
        let mut clipped = vec![0f32; group];
        for (g, h) in blocks.iter().enumerate() {
            // Row r's candidate i is row r·ratios + i of `delta`.
            let mut deltas = delta.chunks_exact_mut(group);
            for row in rows.chunks_exact(cols) {
                let w = &row[g * group..][..group];
                let full = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                for &ratio in &ratios {
                    let d = deltas.next().expect("a row per candidate");
                    clipped.iter_mut().zip(w).for_each(|(c, &v)| *c = v.clamp(-full * ratio, full * ratio));
                    round_group(grid, &clipped, d);
                    d.iter_mut().zip(w).for_each(|(d, &v)| *d -= v);
                }
            }
            let dst = MatMut::from_row_major_slice_mut(&mut product, candidates, group);
            let lhs = MatRef::from_row_major_slice(&delta, candidates, group);
            matmul(dst, Accum::Replace, lhs, MatRef::from_row_major_slice(h, group, group), 1.0, Par::Seq);
            for (r, row) in rows.chunks_exact_mut(cols).enumerate() {
                let errors: Vec<f64> = (0..ratios.len())
                    .map(|i| {
                        let at = (r * ratios.len() + i) * group;
                        dot(&delta[at..][..group], &product[at..][..group])
                    })
                    .collect();
                let best = (0..ratios.len()).min_by(|&a, &b| errors[a].total_cmp(&errors[b])).expect("a ratio");
                let w = &mut row[g * group..][..group];
                let limit = w.iter().fold(0f32, |m, v| m.max(v.abs())) * ratios[best];
                w.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
            }
        }
    });
}
