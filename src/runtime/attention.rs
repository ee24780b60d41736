//! Causal grouped-query attention, and the KV cache it reads.
//!
//! Queries come in blocks of [`QUERY_BLOCK`] rows; each block attends to the cached keys up to its
//! last position (earlier keys only, so the causal mask costs no work beyond the block's own
//! triangle). Blocks run in parallel; within a block each head is two small faer products around a
//! row-wise softmax.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::kernels::row_major_mut;
use super::math;

/// Query rows attended together.
const QUERY_BLOCK: usize = 32;

/// Head counts and size.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub query: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    pub fn q_width(&self) -> usize {
        self.query * self.dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv * self.dim
    }
}

/// Keys and values of every layer for the positions processed so far (after RoPE, f32).
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_width: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// A cache for `layers` layers that holds up to `capacity` positions; memory grows as they fill.
    pub fn new(layers: usize, heads: Heads, capacity: usize) -> Self {
        Self {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            kv_width: heads.kv_width(),
            capacity,
            len: 0,
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position, keeping the memory for reuse.
    pub fn clear(&mut self) {
        self.keys.iter_mut().chain(&mut self.values).for_each(Vec::clear);
        self.len = 0;
    }

    /// Appends one layer's keys and values for the positions being processed.
    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        self.keys[layer].extend_from_slice(keys);
        self.values[layer].extend_from_slice(values);
    }

    /// Keys and values of `layer`, the positions being processed included.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Marks `n` more positions as cached once every layer has appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.keys.iter().all(|k| k.len() == self.len * self.kv_width));
    }
}

/// `out = softmax(q·kᵀ/√d + causal mask)·v` per head. `q` and `out` are `n × q_width` for the positions
/// `first_pos..first_pos + n`; `keys` and `values` are `(first_pos + n) × kv_width`.
pub fn attention(q: &[f32], keys: &[f32], values: &[f32], heads: Heads, first_pos: usize, out: &mut [f32]) {
    let (qw, kvw, d) = (heads.q_width(), heads.kv_width(), heads.dim);
    let group = heads.query / heads.kv;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(QUERY_BLOCK * qw).enumerate().for_each(|(block, out)| {
        let rows = out.len() / qw;
        let q = &q[block * QUERY_BLOCK * qw..][..rows * qw];
        let block_pos = first_pos + block * QUERY_BLOCK;
        let visible = block_pos + rows;
        let mut scores = vec![0f32; rows * visible];
        for h in 0..heads.query {
            let kv_col = (h / group) * d;
            let q_h = MatRef::from_row_major_slice_with_stride(&q[h * d..], rows, d, qw);
            let k_h = MatRef::from_row_major_slice_with_stride(&keys[kv_col..], visible, d, kvw);
            let v_h = MatRef::from_row_major_slice_with_stride(&values[kv_col..], visible, d, kvw);
            let s = MatMut::from_row_major_slice_mut(&mut scores, rows, visible);
            matmul(s, Accum::Replace, q_h, k_h.transpose(), scale, Par::Seq);
            for (r, row) in scores.chunks_exact_mut(visible).enumerate() {
                softmax_causal(row, block_pos + r + 1);
            }
            let s = MatRef::from_row_major_slice(&scores, rows, visible);
            let o_h = row_major_mut(&mut out[h * d..], rows, d, qw);
            matmul(o_h, Accum::Replace, s, v_h, 1.0, Par::Seq);
        }
    });
}

/// Softmax over the first `visible` entries; the rest (future positions) become 0.
fn softmax_causal(row: &mut [f32], visible: usize) {
    let (seen, future) = row.split_at_mut(visible);
    math::softmax(seen);
    future.fill(0.0);
}
