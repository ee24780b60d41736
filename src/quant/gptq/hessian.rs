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
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

use super::GptqError;

/// Rows multiplied in f32 before their product joins the f64 sum.
const ROWS_PER_PRODUCT: usize = 512;
/// Side of the square tiles of `XᵀX` computed by one task.
const TILE: usize = 128;

/// Sums `x xᵀ` over activation rows of width `dim`.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    dim: usize,
    rows: usize,
    /// Row-major `dim × dim`; only the upper triangle (column ≥ row) is kept up to date.
    sum: Vec<f64>,
}

/// `H = 2/n Σ x xᵀ`, symmetric, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    dim: usize,
    values: Vec<f64>,
}

impl HessianAccumulator {
    pub fn new(dim: usize) -> Self {
        Self { dim, rows: 0, sum: vec![0.0; dim * dim] }
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
        let products: Vec<Mat<f32>> = tiles
            .par_iter()
            .map(|&(i, j)| {
                let (h, w) = (TILE.min(dim - i), TILE.min(dim - j));
                let mut tile = Mat::<f32>::zeros(h, w);
                let lhs = x.subcols(i, h).transpose();
                matmul(tile.as_mut(), Accum::Replace, lhs, x.subcols(j, w), 1.0, Par::Seq);
                tile
            })
            .collect();
        for (&(i, j), tile) in tiles.iter().zip(&products) {
            for r in 0..tile.nrows() {
                let row = &mut self.sum[(i + r) * dim + j..][..tile.ncols()];
                for (c, s) in row.iter_mut().enumerate() {
                    *s += f64::from(tile[(r, c)]);
                }
            }
        }
    }

    /// `2/n` times the sum, in the sum's own buffer (for a 7B model's FFN width one such matrix is about
    /// 1 GB); an error when no rows were added.
    pub fn finish(self) -> Result<Hessian, GptqError> {
        if self.rows == 0 {
            return Err(GptqError::NoActivations);
        }
        let (dim, scale) = (self.dim, 2.0 / self.rows as f64);
        let mut values = self.sum;
        // Row i reads only its upper part (column >= i), which no earlier row has written to.
        for i in 0..dim {
            for j in i..dim {
                let v = values[i * dim + j] * scale;
                values[i * dim + j] = v;
                values[j * dim + i] = v;
            }
        }
        Ok(Hessian { dim, values })
    }
}

impl Hessian {
    /// A Hessian from a symmetric row-major `dim × dim` matrix.
    pub fn from_matrix(dim: usize, values: Vec<f64>) -> Result<Self, GptqError> {
        if values.len() != dim * dim {
            return Err(GptqError::Shape(format!(
                "a {dim} x {dim} Hessian needs {} values, got {}",
                dim * dim,
                values.len()
            )));
        }
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(GptqError::NonFiniteHessian(*v));
        }
        Ok(Self { dim, values })
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
        self.values[i * self.dim + j]
    }
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹` (so `(H + λI)⁻¹ = UᵀU`), row-major f32, with
/// `λ = damp · mean(diag H)`. `h(i, j)` gives the symmetric `n × n` matrix's entries: it is read into
/// the factorization's own buffer, so at most two `n × n` f64 matrices are ever alive here.
///
/// Returns `None` when `H + λI` (or its computed inverse) is not numerically positive definite.
pub(super) fn inverse_upper_cholesky(n: usize, h: impl Fn(usize, usize) -> f64, damp: f64) -> Option<Vec<f32>> {
    let mean_diag = (0..n).map(|i| h(i, i)).sum::<f64>() / n as f64;
    let mut a = Mat::<f64>::from_fn(n, n, |i, j| h(i, j) + if i == j { damp * mean_diag } else { 0.0 });
    cholesky_lower(&mut a)?;
    let mut inverse = Mat::<f64>::zeros(n, n);
    let mut buffer = MemBuffer::new(llt::inverse::inverse_scratch::<f64>(n, Par::Seq));
    llt::inverse::inverse(inverse.as_mut(), a.as_ref(), Par::Seq, MemStack::new(&mut buffer));
    drop(a);
    // Only the lower triangle of the inverse is written; the factorization reads only that triangle.
    cholesky_lower(&mut inverse)?;
    let mut upper = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            upper[i * n + j] = inverse[(j, i)] as f32;
        }
    }
    upper.iter().all(|v| v.is_finite()).then_some(upper)
}

/// Factors `a = L Lᵀ` in place (L in the lower triangle), sequentially so the result never depends on
/// the thread count.
fn cholesky_lower(a: &mut Mat<f64>) -> Option<()> {
    let n = a.nrows();
    let mut buffer = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(n, Par::Seq, Default::default()));
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
        let (dim, rows) = (TILE + 37, 700);
        let x = lcg_values(rows * dim, 1);
        let mut acc = HessianAccumulator::new(dim);
        acc.add(&x[..300 * dim]);
        acc.add(&x[300 * dim..]);
        assert_eq!(acc.rows(), rows);
        let h = acc.finish().unwrap();
        for (i, j) in [(0, 0), (3, 150), (150, 3), (164, 164), (100, 160)] {
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
        let n = 5;
        let x = lcg_values(40 * n, 2);
        let mut acc = HessianAccumulator::new(n);
        acc.add(&x);
        let h = acc.finish().unwrap();
        let u = inverse_upper_cholesky(n, |i, j| h.get(i, j), 0.01).unwrap();
        let mean = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n as f64;
        // (UᵀU)(H + λI) = I
        for i in 0..n {
            for j in 0..n {
                let product: f64 = (0..n)
                    .map(|k| {
                        let inv_ik: f64 = (0..n).map(|m| f64::from(u[m * n + i]) * f64::from(u[m * n + k])).sum();
                        inv_ik * (h.get(k, j) + if k == j { 0.01 * mean } else { 0.0 })
                    })
                    .sum();
                assert!((product - f64::from(u8::from(i == j))).abs() < 1e-4, "({i},{j}) {product}");
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
