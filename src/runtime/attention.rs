//! Causal grouped-query attention, and the KV cache it reads.
//!
//! Queries come in blocks of [`QUERY_BLOCK`] rows; each block attends to the cached keys up to its
//! last position (earlier keys only, so the causal mask costs no work beyond the block's own
//! triangle). Blocks run in parallel; within a block each head is two small matrix products around a
//! row-wise softmax. On CPUs with AVX-512 the products are the batch kernel's own
//! (`kernels::gemm::avx512`): each KV head's keys are packed once per call, and the values are read
//! in place; elsewhere they are faer's.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::kernels::row_major_mut;
use super::math;

/// Query rows attended together.
const QUERY_BLOCK: usize = 32;
/// Fewest query rows that take the AVX-512 kernel, which packs the keys first.
const PACKED_KEYS_MIN_ROWS: usize = 8;

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
    #[cfg(target_arch = "x86_64")]
    // The kernel reads values in place as panels of 32 dimensions, so the head size must be a
    // multiple of 32. It packs every cached key per call, which only pays for itself over a batch of
    // queries: single tokens (generation) read the keys in place through faer.
    if heads.dim.is_multiple_of(32)
        && q.len() >= PACKED_KEYS_MIN_ROWS * heads.q_width()
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::attention(q, keys, values, heads, first_pos, out) };
    }
    attention_faer(q, keys, values, heads, first_pos, out);
}

fn attention_faer(q: &[f32], keys: &[f32], values: &[f32], heads: Heads, first_pos: usize, out: &mut [f32]) {
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::cell::RefCell;

    use rayon::prelude::*;

    use super::{softmax_causal, Heads, QUERY_BLOCK};
    use crate::runtime::kernels::gemm::avx512::{pack_panels, product, Panels};

    thread_local! {
        static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// [`super::attention`] with the AVX-512 products.
    ///
    /// # Safety
    /// The CPU supports AVX-512F, and `heads.dim` is a multiple of 32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attention(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        heads: Heads,
        first_pos: usize,
        out: &mut [f32],
    ) {
        let (qw, kvw, d) = (heads.q_width(), heads.kv_width(), heads.dim);
        let group = heads.query / heads.kv;
        let scale = 1.0 / (d as f32).sqrt();
        let positions = keys.len() / kvw;
        let packed_keys: Vec<Vec<f32>> = (0..heads.kv)
            .map(|g| {
                let head: Vec<f32> = keys.chunks_exact(kvw).flat_map(|k| &k[g * d..(g + 1) * d]).copied().collect();
                let mut packed = Vec::new();
                pack_panels(&head, d, &mut packed);
                packed
            })
            .collect();
        out.par_chunks_mut(QUERY_BLOCK * qw).enumerate().for_each(|(block, out)| {
            let rows = out.len() / qw;
            let q = &q[block * QUERY_BLOCK * qw..][..rows * qw];
            let block_pos = first_pos + block * QUERY_BLOCK;
            let visible = block_pos + rows;
            debug_assert!(visible <= positions);
            SCORES.with_borrow_mut(|scores| {
                scores.resize(rows * visible, 0.0);
                for h in 0..heads.query {
                    let g = h / group;
                    let k_h = Panels::packed(&packed_keys[g], visible, d);
                    // SAFETY: AVX-512F is available; `scores` holds `rows × visible` outputs.
                    unsafe { product(&q[h * d..], qw, rows, &k_h, scores.as_mut_ptr(), visible) };
                    for (r, row) in scores.chunks_exact_mut(visible).enumerate() {
                        row.iter_mut().for_each(|s| *s *= scale);
                        softmax_causal(row, block_pos + r + 1);
                    }
                    let v_h = Panels { data: &values[g * d..], rows: d, cols: visible, k_step: kvw, panel_step: 32 };
                    // SAFETY: as above; `out` holds `rows` rows of `qw`, and head `h` writes its `d`
                    // columns of each.
                    unsafe { product(scores, visible, rows, &v_h, out[h * d..].as_mut_ptr(), qw) };
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::synthetic::Rng;

    /// Causal attention in f64, one query row and head at a time.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], heads: Heads, first_pos: usize) -> Vec<f64> {
        let (qw, kvw, d) = (heads.q_width(), heads.kv_width(), heads.dim);
        let mut out = vec![0f64; q.len()];
        for (r, q_row) in q.chunks_exact(qw).enumerate() {
            for h in 0..heads.query {
                let kv_col = h / (heads.query / heads.kv) * d;
                let scores: Vec<f64> = (0..=first_pos + r)
                    .map(|p| {
                        let k = &keys[p * kvw + kv_col..][..d];
                        let dot: f64 = q_row[h * d..][..d].iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        dot / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (p, w) in weights.iter().enumerate() {
                    for i in 0..d {
                        out[r * qw + h * d + i] += w / total * values[p * kvw + kv_col + i] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_path_matches_the_f64_reference() {
        let mut rng = Rng(11);
        // Two query blocks (the second partial) after 7 cached positions, a whole first chunk, and
        // single tokens after a cache (generation).
        for (dim, first_pos, n) in [(64, 7, 45), (64, 0, 33), (32, 3, 5), (16, 2, 40), (64, 20, 1)] {
            let heads = Heads { query: 6, kv: 2, dim };
            let total = first_pos + n;
            let mut fill = |len: usize| -> Vec<f32> { (0..len).map(|_| 2.0 * rng.f32()).collect() };
            let (q, keys, values) =
                (fill(n * heads.q_width()), fill(total * heads.kv_width()), fill(total * heads.kv_width()));
            let want = reference(&q, &keys, &values, heads, first_pos);
            type Path = fn(&[f32], &[f32], &[f32], Heads, usize, &mut [f32]);
            let mut paths: Vec<(&str, Path)> = vec![("dispatched", attention), ("faer", attention_faer)];
            #[cfg(target_arch = "x86_64")]
            if dim % 32 == 0 && std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F and the head size is a multiple of 32.
                paths.push(("avx512", |q, k, v, h, f, o| unsafe { avx512::attention(q, k, v, h, f, o) }));
            }
            for (name, path) in paths {
                let mut out = vec![f32::NAN; q.len()];
                path(&q, &keys, &values, heads, first_pos, &mut out);
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!((got as f64 - want).abs() < 1e-5, "{name} dim {dim} output {i}: {got} vs {want}");
                }
            }
        }
    }
}
