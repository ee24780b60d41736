//! The merge arithmetic: low-rank deltas added to a weight in f64, DoRA's renormalisation, bias deltas.
//!
//! Each output row is computed by one task, summing in a fixed order, and per-column reductions go
//! through fixed row blocks, so the results are the same at any thread count.

use rayon::prelude::*;

use crate::model::names;

/// Which axis of a stored weight holds the output features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Orientation {
    /// `[out, in]`, as `nn.Linear` stores it: ΔW = B·A.
    OutputRows,
    /// `[in, out]`: `Conv1D` (`fan_in_fan_out`) and embeddings (`[vocab, dim]`): ΔW = (B·A)ᵀ.
    OutputColumns,
}

/// A `rows × cols` matrix of rank at most `rank`, held as `left [rows, rank] · right [rank, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    rows: usize,
    cols: usize,
    rank: usize,
    left: Vec<f64>,
    right: Vec<f64>,
}

impl LowRank {
    /// `coef · ΔW` of one LoRA module in the stored layout of its base weight, from `a` (`A [r, in]`)
    /// and `b` (`B [out, r]`), both row-major.
    pub fn from_lora(a: &[f32], b: &[f32], rank: usize, orientation: Orientation, coef: f64) -> LowRank {
        assert!(
            rank > 0 && a.len().is_multiple_of(rank) && b.len().is_multiple_of(rank),
            "factors checked against their shapes"
        );
        let (n_in, n_out) = (a.len() / rank, b.len() / rank);
        match orientation {
            Orientation::OutputRows => LowRank {
                rows: n_out,
                cols: n_in,
                rank,
                left: b.iter().map(|&x| coef * x as f64).collect(),
                right: a.iter().map(|&x| x as f64).collect(),
            },
            Orientation::OutputColumns => LowRank {
                rows: n_in,
                cols: n_out,
                rank,
                left: transpose(a, rank, n_in).map(|x| coef * x).collect(),
                right: transpose(b, n_out, rank).collect(),
            },
        }
    }

    /// The sum of the parts, as one matrix of the summed rank (PEFT's `cat` combination).
    pub fn concat(parts: &[LowRank]) -> LowRank {
        let (rows, cols) = (parts[0].rows, parts[0].cols);
        assert!(parts.iter().all(|p| p.rows == rows && p.cols == cols), "parts adapt the same tensor");
        let rank = parts.iter().map(|p| p.rank).sum();
        let mut left = Vec::with_capacity(rows * rank);
        for row in 0..rows {
            for p in parts {
                left.extend_from_slice(&p.left[row * p.rank..(row + 1) * p.rank]);
            }
        }
        let right = parts.iter().flat_map(|p| p.right.iter().copied()).collect();
        LowRank { rows, cols, rank, left, right }
    }

    /// Reorders the rows from HF's rotate-half layout to llama.cpp's interleaved one.
    pub fn permute_rows_hf_to_gguf(mut self, heads: usize) -> LowRank {
        self.left = names::permute_rows_hf_to_gguf(&self.left, heads, self.rank);
        self
    }

    /// `out = row` of this matrix.
    fn row_into(&self, row: usize, out: &mut [f64]) {
        out.fill(0.0);
        for (k, &l) in self.left[row * self.rank..(row + 1) * self.rank].iter().enumerate() {
            if l != 0.0 {
                for (o, &r) in out.iter_mut().zip(&self.right[k * self.cols..(k + 1) * self.cols]) {
                    *o += l * r;
                }
            }
        }
    }
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> impl Iterator<Item = f64> + '_ {
    (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c] as f64))
}

/// Squared Frobenius norms of a weight before a merge and of what the merge changed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Norms {
    pub weight: f64,
    pub delta: f64,
}

impl Norms {
    /// `‖ΔW‖ / ‖W‖` (infinite for a zero weight that changed).
    pub fn relative_delta(&self) -> f64 {
        (self.delta / self.weight).sqrt()
    }

    pub fn between(before: &[f32], after: &[f32]) -> Norms {
        before.iter().zip(after).fold(Norms::default(), |n, (&b, &a)| n.add(b, a as f64))
    }

    fn add(self, before: f32, after: f64) -> Norms {
        let b = before as f64;
        Norms { weight: self.weight + b * b, delta: self.delta + (after - b) * (after - b) }
    }

    fn sum(rows: Vec<Norms>) -> Norms {
        rows.into_iter().fold(Norms::default(), |a, n| Norms { weight: a.weight + n.weight, delta: a.delta + n.delta })
    }
}

/// `w += delta`, each element computed in f64 and rounded once.
pub fn add_low_rank(w: &mut [f32], delta: &LowRank) -> Norms {
    check_shape(w, delta);
    let rows = w
        .par_chunks_mut(delta.cols)
        .enumerate()
        .map_init(
            || vec![0f64; delta.cols],
            |d, (row, w)| {
                delta.row_into(row, d);
                let mut n = Norms::default();
                for (w, &d) in w.iter_mut().zip(d.iter()) {
                    let merged = *w as f64 + d;
                    n = n.add(*w, merged);
                    *w = merged as f32;
                }
                n
            },
        )
        .collect();
    Norms::sum(rows)
}

/// DoRA: `w = m · (w + delta) / ‖w + delta‖`, the norm taken per output feature over the inputs
/// (PEFT's `weight_norm`), `magnitude` holding `m`, one value per output feature.
pub fn dora(w: &mut [f32], delta: &LowRank, magnitude: &[f64], orientation: Orientation) -> Norms {
    check_shape(w, delta);
    let norms = match orientation {
        Orientation::OutputRows => None,
        Orientation::OutputColumns => Some(column_norms(w, delta)),
    };
    let rows = w
        .par_chunks_mut(delta.cols)
        .enumerate()
        .map_init(
            || vec![0f64; delta.cols],
            |v, (row, w)| {
                delta.row_into(row, v);
                for (v, &w) in v.iter_mut().zip(w.iter()) {
                    *v += w as f64;
                }
                let mut n = Norms::default();
                let mut put = |w: &mut f32, merged: f64| {
                    n = n.add(*w, merged);
                    *w = merged as f32;
                };
                match &norms {
                    None => {
                        let factor = magnitude[row] / v.iter().map(|x| x * x).sum::<f64>().sqrt();
                        w.iter_mut().zip(v.iter()).for_each(|(w, &v)| put(w, factor * v));
                    }
                    Some(norms) => {
                        for (col, (w, &v)) in w.iter_mut().zip(v.iter()).enumerate() {
                            put(w, magnitude[col] / norms[col] * v);
                        }
                    }
                }
                n
            },
        )
        .collect();
    Norms::sum(rows)
}

/// Rows per block of a column reduction: blocks are summed in parallel, then in order.
const ROW_BLOCK: usize = 64;

/// `‖column j of (w + delta)‖` for every column.
fn column_norms(w: &[f32], delta: &LowRank) -> Vec<f64> {
    let cols = delta.cols;
    let partial: Vec<Vec<f64>> = w
        .par_chunks(cols * ROW_BLOCK)
        .enumerate()
        .map(|(block, rows)| {
            let mut sums = vec![0f64; cols];
            let mut v = vec![0f64; cols];
            for (i, w) in rows.chunks(cols).enumerate() {
                delta.row_into(block * ROW_BLOCK + i, &mut v);
                for ((s, &d), &w) in sums.iter_mut().zip(&v).zip(w) {
                    let x = d + w as f64;
                    *s += x * x;
                }
            }
            sums
        })
        .collect();
    let mut total = vec![0f64; cols];
    for block in partial {
        total.iter_mut().zip(block).for_each(|(t, s)| *t += s);
    }
    total.into_iter().map(f64::sqrt).collect()
}

/// `w += v`, element-wise (bias deltas).
pub fn add_vector(w: &mut [f32], v: &[f64]) -> Norms {
    assert_eq!(w.len(), v.len(), "bias delta checked against its base");
    let mut n = Norms::default();
    for (w, &d) in w.iter_mut().zip(v) {
        let merged = *w as f64 + d;
        n = n.add(*w, merged);
        *w = merged as f32;
    }
    n
}

fn check_shape(w: &[f32], delta: &LowRank) {
    assert_eq!(w.len(), delta.rows * delta.cols, "delta checked against its base");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Σ_k b[o,k] a[k,i], straight from the definition.
    fn product(a: &[f32], b: &[f32], rank: usize) -> Vec<Vec<f64>> {
        let (n_in, n_out) = (a.len() / rank, b.len() / rank);
        (0..n_out)
            .map(|o| {
                (0..n_in).map(|i| (0..rank).map(|k| b[o * rank + k] as f64 * a[k * n_in + i] as f64).sum()).collect()
            })
            .collect()
    }

    fn with_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
    }

    #[test]
    fn low_rank_adds_the_scaled_product_in_either_orientation() {
        let (rank, n_in, n_out) = (3, 7, 5);
        let (a, b) = (values(rank * n_in, 1), values(n_out * rank, 2));
        let ba = product(&a, &b, rank);
        let base = values(n_out * n_in, 3);
        let mut w = base.clone();
        add_low_rank(&mut w, &LowRank::from_lora(&a, &b, rank, Orientation::OutputRows, 0.5));
        for o in 0..n_out {
            for i in 0..n_in {
                assert_eq!(w[o * n_in + i], (base[o * n_in + i] as f64 + 0.5 * ba[o][i]) as f32);
            }
        }
        // Stored [in, out]: element (i, o) gets ΔW[o][i].
        let mut w = base.clone();
        add_low_rank(&mut w, &LowRank::from_lora(&a, &b, rank, Orientation::OutputColumns, 2.0));
        for i in 0..n_in {
            for o in 0..n_out {
                assert_eq!(w[i * n_out + o], (base[i * n_out + o] as f64 + 2.0 * ba[o][i]) as f32);
            }
        }
    }

    #[test]
    fn concat_is_the_sum_of_its_parts() {
        let (n_in, n_out) = (6, 4);
        let one = LowRank::from_lora(&values(2 * n_in, 4), &values(n_out * 2, 5), 2, Orientation::OutputRows, 0.25);
        let two = LowRank::from_lora(&values(3 * n_in, 6), &values(n_out * 3, 7), 3, Orientation::OutputRows, -1.5);
        let both = LowRank::concat(&[one.clone(), two.clone()]);
        let (mut x, mut y) = (vec![0f64; n_in], vec![0f64; n_in]);
        let mut z = vec![0f64; n_in];
        for row in 0..n_out {
            one.row_into(row, &mut x);
            two.row_into(row, &mut y);
            both.row_into(row, &mut z);
            for j in 0..n_in {
                assert!((z[j] - (x[j] + y[j])).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn dora_rows_have_the_magnitude_as_norm() {
        let (rank, n_in, n_out) = (2, 9, 4);
        let delta =
            LowRank::from_lora(&values(rank * n_in, 8), &values(n_out * rank, 9), rank, Orientation::OutputRows, 1.0);
        let m: Vec<f64> = (0..n_out).map(|i| 0.5 + i as f64).collect();
        let mut w = values(n_out * n_in, 10);
        dora(&mut w, &delta, &m, Orientation::OutputRows);
        for (row, m) in w.chunks(n_in).zip(&m) {
            let norm: f64 = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - m).abs() < 1e-6, "{norm} vs {m}");
        }
        let delta = LowRank::from_lora(
            &values(rank * n_out, 8),
            &values(n_in * rank, 9),
            rank,
            Orientation::OutputColumns,
            1.0,
        );
        let m: Vec<f64> = (0..n_in).map(|i| 1.0 + i as f64).collect();
        let mut w = values(n_out * n_in, 11);
        dora(&mut w, &delta, &m, Orientation::OutputColumns);
        for (col, m) in m.iter().enumerate() {
            let norm: f64 = (0..n_out).map(|r| (w[r * n_in + col] as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - m).abs() < 1e-5, "{norm} vs {m}");
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rank, n_in, n_out) = (4, 33, 300);
        let rows =
            LowRank::from_lora(&values(rank * n_in, 12), &values(n_out * rank, 13), rank, Orientation::OutputRows, 0.7);
        let cols = LowRank::from_lora(
            &values(rank * n_out, 12),
            &values(n_in * rank, 13),
            rank,
            Orientation::OutputColumns,
            0.7,
        );
        let base = values(n_out * n_in, 14);
        let run = |threads| {
            with_threads(threads, || {
                let mut a = base.clone();
                let na = add_low_rank(&mut a, &rows);
                let mut b = base.clone();
                let nb = dora(&mut b, &cols, &vec![1.0; n_in], Orientation::OutputColumns);
                (a, na, b, nb)
            })
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn norms_measure_the_change() {
        let mut w = vec![3.0f32, 4.0];
        let n = add_vector(&mut w, &[0.0, 0.5]);
        assert_eq!(w, vec![3.0, 4.5]);
        assert_eq!((n.weight, n.delta), (25.0, 0.25));
        assert!((n.relative_delta() - 0.1).abs() < 1e-12);
        assert_eq!(Norms::between(&[3.0, 4.0], &[3.0, 4.5]), n);
    }
}
