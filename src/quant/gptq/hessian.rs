//! GPTQ's second-order information: [`HessianAccumulator`] sums `2/n Σ x xᵀ` over a linear layer's input
//! rows, and [`inverse_upper_cholesky`] turns the damped Hessian into the upper Cholesky factor of its
//! inverse, the matrix GPTQ's column loop reads.
//!
//! Products run in f32 with faer over at most [`ROWS_PER_PRODUCT`] rows at a time and are summed in f64,
//! so long calibration runs do not lose the small contributions. Work is split into fixed tiles of the
//! output, each computed by one sequential product, so the sums are the same at any thread count.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

use super::GptqError;

/// Rows multiplied in f32 before their product joins the f64 sum.
const ROWS_PER_PRODUCT: usize = 512;
/// Side of the square tiles of `XᵀX` computed by one task.
const TILE: usize = 128;
/// Tiles computed (in parallel) before their products join the sum.
const TILES_PER_BATCH: usize = 16;

/// Sums `x xᵀ` over activation rows of width `dim`.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    dim: usize,
    rows: usize,
    /// The upper triangle (column ≥ row), row by row: row `i` holds columns `i..dim`, from
    /// [`row_start`]`(dim, i)`. Half the square: for a 7B model's FFN width, 0.5 GB of f64.
    sum: Vec<f64>,
}

/// `H = 2/n Σ x xᵀ`, symmetric, row-major, stored in f32 (summed in f64): the stage's Hessian stays
/// alive while each of its linears is factored and quantized, and for a 7B model's FFN width f32 keeps
/// it at 0.5 GB.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    dim: usize,
    values: Vec<f32>,
}

/// A Hessian handed to GPTQ: borrowed while other linears still need it, or owned (the last linear of a
/// stage), so that GPTQ frees it as soon as it is factored and before the inverse factor is allocated.
pub enum HessianInput<'h> {
    Borrowed(&'h Hessian),
    Owned(Hessian),
}

impl<'h> From<&'h Hessian> for HessianInput<'h> {
    fn from(h: &'h Hessian) -> Self {
        HessianInput::Borrowed(h)
    }
}

impl From<Hessian> for HessianInput<'_> {
    fn from(h: Hessian) -> Self {
        HessianInput::Owned(h)
    }
}

impl std::ops::Deref for HessianInput<'_> {
    type Target = Hessian;

    fn deref(&self) -> &Hessian {
        match self {
            HessianInput::Borrowed(h) => h,
            HessianInput::Owned(h) => h,
        }
    }
}

impl HessianAccumulator {
    pub fn new(dim: usize) -> Self {
        Self { dim, rows: 0, sum: vec![0.0; row_start(dim, dim)] }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds activation rows: `x` is row-major, `dim` values per row.
    pub fn add(&mut self, x: &[f32]) {
        assert!(
            x.len().is_multiple_of(self.dim.max(1)),
            "activation rows of {} values do not fit {}",
            self.dim,
            x.len()
        );
        for chunk in x.chunks(ROWS_PER_PRODUCT * self.dim) {
            self.add_product(chunk);
        }
        self.rows += x.len() / self.dim.max(1);
    }

    fn add_product(&mut self, x: &[f32]) {
        let (dim, n) = (self.dim, x.len() / self.dim);
        // Channel-major copy: each tile product then reads contiguous runs of every channel.
        let xc = Mat::<f32>::from_fn(n, dim, |r, c| x[r * dim + c]);
        let x = xc.as_ref();
        let tiles: Vec<(usize, usize)> =
            (0..dim).step_by(TILE).flat_map(|i| (i..dim).step_by(TILE).map(move |j| (i, j))).collect();
        // A bounded batch of tiles at a time: all of them at once would be a second `dim²/2` f32 matrix.
        for batch in tiles.chunks(TILES_PER_BATCH) {
            let products: Vec<Mat<f32>> = batch
                .par_iter()
                .map(|&(i, j)| {
                    let (h, w) = (TILE.min(dim - i), TILE.min(dim - j));
                    let mut tile = Mat::<f32>::zeros(h, w);
                    let lhs = x.subcols(i, h).transpose();
                    matmul(tile.as_mut(), Accum::Replace, lhs, x.subcols(j, w), 1.0, Par::Seq);
                    tile
                })
                .collect();
            self.add_tiles(batch, &products);
        }
    }

    /// Adds tile products (each `XᵀX` over one tile of the output) into the upper-triangle sum.
    fn add_tiles(&mut self, tiles: &[(usize, usize)], products: &[Mat<f32>]) {
        let dim = self.dim;
        for (&(i, j), tile) in tiles.iter().zip(products) {
            for r in 0..tile.nrows() {
                // Columns from the diagonal on.
                let (row, first) = (i + r, (i + r).saturating_sub(j));
                if first >= tile.ncols() {
                    continue;
                }
                let sums = &mut self.sum[row_start(dim, row) + j + first - row..][..tile.ncols() - first];
                for (c, s) in (first..).zip(sums) {
                    *s += f64::from(tile[(r, c)]);
                }
            }
        }
    }

    /// `2/n` times the sum; an error when no rows were added or a value overflows.
    pub fn finish(self) -> Result<Hessian, GptqError> {
        if self.rows == 0 {
            return Err(GptqError::NoActivations);
        }
        let (dim, scale) = (self.dim, 2.0 / self.rows as f64);
        let mut values = vec![0f32; dim * dim];
        for i in 0..dim {
            for (j, &sum) in (i..dim).zip(&self.sum[row_start(dim, i)..]) {
                let v = sum * scale;
                if !(v as f32).is_finite() {
                    return Err(GptqError::NonFiniteHessian(v));
                }
                values[i * dim + j] = v as f32;
                values[j * dim + i] = v as f32;
            }
        }
        Ok(Hessian { dim, values })
    }
}

/// Where row `i` of a packed upper triangle of side `dim` starts (`row_start(dim, dim)`: its length).
fn row_start(dim: usize, i: usize) -> usize {
    i * dim - i * i.saturating_sub(1) / 2
}

impl Hessian {
    /// A Hessian from a symmetric row-major `dim × dim` matrix.
    pub fn from_matrix(dim: usize, values: impl IntoIterator<Item = f64>) -> Result<Self, GptqError> {
        let mut stored = Vec::with_capacity(dim * dim);
        for v in values {
            if !(v as f32).is_finite() {
                return Err(GptqError::NonFiniteHessian(v));
            }
            stored.push(v as f32);
        }
        if stored.len() != dim * dim {
            return Err(GptqError::Shape(format!(
                "a {dim} x {dim} Hessian needs {} values, got {}",
                dim * dim,
                stored.len()
            )));
        }
        Ok(Self { dim, values: stored })
    }

    pub fn identity(dim: usize) -> Self {
        let mut values = vec![0.0; dim * dim];
        values.iter_mut().step_by(dim + 1).for_each(|v| *v = 1.0);
        Self { dim, values }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        f64::from(self.values[i * self.dim + j])
    }

    /// The matrix, row-major.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }
}

/// The first half of [`inverse_upper_cholesky`]: the Cholesky factor `L` of the reversed, damped matrix
/// `J (H + λI) J = L Lᵀ`, `λ = damp · mean(diag H)`, where `h(i, j)` gives the symmetric `n × n` matrix's
/// entries and `J` is the exchange matrix (`J_ij = 1` when `i + j = n − 1`). `None` when `H + λI` is not
/// numerically positive definite.
pub(super) fn reversed_cholesky(n: usize, h: impl Fn(usize, usize) -> f64, damp: f64) -> Option<ReversedCholesky> {
    let mean_diag = (0..n).map(|i| h(i, i)).sum::<f64>() / n as f64;
    let rev = |i: usize| n - 1 - i;
    let mut l =
        Mat::<f32>::from_fn(n, n, |i, j| (h(rev(i), rev(j)) + if i == j { damp * mean_diag } else { 0.0 }) as f32);
    cholesky_lower(&mut l)?;
    Some(ReversedCholesky(l))
}

/// [`reversed_cholesky`]'s factor, waiting for [`ReversedCholesky::inverse_upper`].
pub(super) struct ReversedCholesky(Mat<f32>);

impl ReversedCholesky {
    /// The upper Cholesky factor `U` of `(H + λI)⁻¹` (so `(H + λI)⁻¹ = UᵀU`), row-major, or `None` if a
    /// value is not finite.
    ///
    /// `(H + λI)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`, and `J L⁻¹ J` is upper triangular with a positive diagonal: `U`
    /// itself. So one factorization and one triangular inverse suffice, and the inverse goes straight into
    /// `U` a block of columns at a time: `L` is the only other `n × n` matrix (inverting, then factoring,
    /// takes two), and the Hessian can be freed before `U` is allocated. Both steps run in f32, as the
    /// reference GPTQ runs them; the shrunk, damped Hessians GPTQ factors are well conditioned, and a
    /// failed factorization is retried at higher damping.
    pub(super) fn inverse_upper(self) -> Option<Vec<f32>> {
        let l = self.0;
        let n = l.nrows();
        let rev = |i: usize| n - 1 - i;
        let mut upper = vec![0f32; n * n];
        let mut block = Mat::<f32>::zeros(n, INVERSE_BLOCK.min(n));
        for c0 in (0..n).step_by(INVERSE_BLOCK) {
            // Columns c0.. of L⁻¹ are zero above row c0; below, they solve L[c0.., c0..] X = [I; 0].
            let (m, b) = (n - c0, INVERSE_BLOCK.min(n - c0));
            let mut x = block.as_mut().submatrix_mut(0, 0, m, b);
            x.fill(0.0);
            (0..b).for_each(|j| x[(j, j)] = 1.0);
            solve_lower_triangular_in_place(l.as_ref().submatrix(c0, c0, m, m), x.as_mut(), Par::Seq);
            for j in 0..b {
                for i in j..m {
                    upper[rev(c0 + i) * n + rev(c0 + j)] = x[(i, j)];
                }
            }
        }
        upper.iter().all(|v| v.is_finite()).then_some(upper)
    }
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹`: [`reversed_cholesky`], then
/// [`ReversedCholesky::inverse_upper`].
#[cfg(test)]
fn inverse_upper_cholesky(n: usize, h: impl Fn(usize, usize) -> f64, damp: f64) -> Option<Vec<f32>> {
    reversed_cholesky(n, h, damp)?.inverse_upper()
}

/// Columns of `L⁻¹` one triangular solve produces.
const INVERSE_BLOCK: usize = 128;

/// Factors `a = L Lᵀ` in place (L in the lower triangle), sequentially so the result never depends on
/// the thread count.
fn cholesky_lower(a: &mut Mat<f32>) -> Option<()> {
    let n = a.nrows();
    let mut buffer = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f32>(n, Par::Seq, Default::default()));
    llt::factor::cholesky_in_place(
        a.as_mut(),
        Default::default(),
        Par::Seq,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .ok()
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn accumulator_matches_the_definition_across_tiles_and_batches() {
        // More tiles than one batch, the last ones partial.
        let (dim, rows) = (5 * TILE + 37, 700);
        let x = lcg_values(rows * dim, 1);
        let mut acc = HessianAccumulator::new(dim);
        acc.add(&x[..300 * dim]);
        acc.add(&x[300 * dim..]);
        assert_eq!(acc.rows(), rows);
        let h = acc.finish().unwrap();
        for (i, j) in [(0, 0), (3, 150), (150, 3), (164, 164), (100, 160), (640, 676), (676, 5), (300, 600)] {
            let exact: f64 = (0..rows).map(|r| f64::from(x[r * dim + i]) * f64::from(x[r * dim + j])).sum();
            let exact = 2.0 * exact / rows as f64;
            assert!((h.get(i, j) - exact).abs() < 1e-5, "({i},{j}): {} vs {exact}", h.get(i, j));
        }
        assert!((0..dim).all(|i| (0..dim).all(|j| h.get(i, j) == h.get(j, i))));
    }

    #[test]
    fn accumulator_without_rows_is_an_error() {
        assert!(matches!(HessianAccumulator::new(4).finish(), Err(GptqError::NoActivations)));
    }

    #[test]
    fn inverse_factor_reconstructs_the_damped_inverse() {
        // Wider than one block of the triangular inverse, and not a multiple of it.
        for n in [5, INVERSE_BLOCK + 37] {
            let x = lcg_values(3 * n * n, 2);
            let mut acc = HessianAccumulator::new(n);
            acc.add(&x);
            let h = acc.finish().unwrap();
            let u = inverse_upper_cholesky(n, |i, j| h.get(i, j), 0.01).unwrap();
            assert!((0..n).all(|i| (0..i).all(|j| u[i * n + j] == 0.0) && u[i * n + i] > 0.0), "not upper");
            let mean = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n as f64;
            let inverse: Vec<f64> = (0..n * n)
                .map(|ik| (0..n).map(|m| f64::from(u[m * n + ik / n]) * f64::from(u[m * n + ik % n])).sum())
                .collect();
            // (UᵀU)(H + λI) = I
            for i in 0..n {
                for j in 0..n {
                    let product: f64 = (0..n)
                        .map(|k| inverse[i * n + k] * (h.get(k, j) + if k == j { 0.01 * mean } else { 0.0 }))
                        .sum();
                    assert!((product - f64::from(u8::from(i == j))).abs() < 1e-4, "n {n} ({i},{j}) {product}");
                }
            }
        }
    }

    #[test]
    fn indefinite_matrices_have_no_factor() {
        let h = |i: usize, j: usize| if i == j { 1.0 } else { 2.0 };
        assert!(inverse_upper_cholesky(2, h, 0.01).is_none());
        assert!(inverse_upper_cholesky(2, h, 1.5).is_some());
    }
}
