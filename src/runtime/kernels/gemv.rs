//! The single-token path: each task decodes a few weight rows and takes their dot products with every
//! input row at once, while the decoded rows are still in L1.

use std::cell::RefCell;

use rayon::prelude::*;

use super::GgmlLinear;

/// Weight rows one task decodes and consumes.
const CHUNK_ROWS: usize = 16;

thread_local! {
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn gemv(w: &GgmlLinear, x: &[f32], n: usize, y: &mut [f32]) {
    // Output transposed (`rows × n`) so each task owns a contiguous slice; `n` is small.
    let mut yt = vec![0f32; w.rows * n];
    yt.par_chunks_mut(CHUNK_ROWS * n).enumerate().for_each(|(chunk, out)| {
        let first = chunk * CHUNK_ROWS;
        let rows = out.len() / n;
        ROWS.with_borrow_mut(|decoded| {
            decoded.resize(rows * w.cols, 0.0);
            w.decode_rows(first..first + rows, decoded);
            for (r, row) in decoded.chunks_exact(w.cols).enumerate() {
                for (t, xt) in x.chunks_exact(w.cols).enumerate() {
                    out[r * n + t] = dot(row, xt);
                }
            }
        });
    });
    for (r, yr) in yt.chunks_exact(n).enumerate() {
        for (t, &v) in yr.iter().enumerate() {
            y[t * w.rows + r] = v;
        }
    }
}

/// Dot product with independent partial sums, so the compiler can keep them in vector registers.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (ca, cb) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}
