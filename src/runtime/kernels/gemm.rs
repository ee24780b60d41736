//! The batch path: weight rows are split into blocks of [`BLOCK_ROWS`]; each rayon task decodes one
//! block to f32 in its thread's scratch buffer (small enough to stay in L2) and multiplies the whole
//! batch by it with faer's sequential GEMM, writing its own block of output columns.
//!
//! Parallelism stays at this level, not inside faer: rayon tasks balance by work stealing and never
//! wait on a barrier, which matters on a shared machine where a thread can lose its core at any time.

use std::cell::RefCell;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{row_major_mut, GgmlLinear};

/// Weight rows one task decodes and multiplies.
const BLOCK_ROWS: usize = 64;

thread_local! {
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn gemm(w: &GgmlLinear, x: &[f32], n: usize, y: &mut [f32]) {
    gemm_in_blocks(w, x, n, y, BLOCK_ROWS);
}

/// [`gemm`] with blocks of `block_rows` weight rows.
pub(super) fn gemm_in_blocks(w: &GgmlLinear, x: &[f32], n: usize, y: &mut [f32], block_rows: usize) {
    let lhs = MatRef::from_row_major_slice(x, n, w.cols);
    column_blocks(row_major_mut(y, n, w.rows, w.rows), block_rows).into_par_iter().for_each(|(first, dst)| {
        let rows = dst.ncols();
        BLOCK.with_borrow_mut(|block| {
            block.resize(rows * w.cols, 0.0);
            w.decode_rows(first..first + rows, block);
            let rhs = MatRef::from_row_major_slice(block.as_slice(), rows, w.cols).transpose();
            matmul(dst, Accum::Replace, lhs, rhs, 1.0, Par::Seq);
        });
    });
}

/// `m` split into blocks of at most `width` columns, each with the index of its first column.
fn column_blocks(m: MatMut<'_, f32>, width: usize) -> Vec<(usize, MatMut<'_, f32>)> {
    let mut blocks = Vec::new();
    let (mut first, mut rest) = (0, m);
    while rest.ncols() > width {
        let (block, tail) = rest.split_at_col_mut(width);
        blocks.push((first, block));
        (first, rest) = (first + width, tail);
    }
    blocks.push((first, rest));
    blocks
}
