//! The yardstick the kernels are tested against: `x · Wᵀ` accumulated in f64, one product at a time,
//! over the type table's portable decoder.

use super::GgmlLinear;

/// Each output as `(Σ w·x, Σ |w·x|)`: the exact value and the scale its rounding error is judged by.
pub fn matmul_f64(w: &GgmlLinear, x: &[f32]) -> Vec<(f64, f64)> {
    let mut weights = vec![0f32; w.rows() * w.cols()];
    w.decode_rows(0..w.rows(), &mut weights);
    let mut y = Vec::new();
    for xt in x.chunks_exact(w.cols()) {
        for row in weights.chunks_exact(w.cols()) {
            let products = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64);
            y.push(products.fold((0.0, 0.0), |(sum, mag), p| (sum + p, mag + p.abs())));
        }
    }
    y
}
