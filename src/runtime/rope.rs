//! Rotary position embedding: which element pairs rotate, and by how much.
//!
//! Each head's vector is split into `head_dim / 2` pairs; pair `i` at position `p` turns by
//! `p · θ^(-2i/head_dim) / f_i`, where `f_i` are llama3's frequency factors (1 without scaling).
//! Which elements form a pair depends on the row order of the q/k weights: llama.cpp stores the llama
//! architecture's q/k rows permuted so pairs are adjacent ([`PairLayout::Adjacent`], ggml's "normal"
//! mode); Hugging Face checkpoints, and GGUF architectures without the permutation such as qwen2,
//! pair element `i` with `i + head_dim/2` ([`PairLayout::HalfSplit`], ggml's "neox" mode).

/// Which elements of a head vector rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairLayout {
    /// `(2i, 2i + 1)`.
    Adjacent,
    /// `(i, i + head_dim / 2)`.
    HalfSplit,
}

#[derive(Clone, Debug)]
pub struct Rope {
    layout: PairLayout,
    /// Angle per position of each pair, in radians.
    frequencies: Vec<f64>,
}

/// Cosines and sines for a run of positions: `positions × head_dim / 2` each.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// `factors`, when given, holds one divisor per pair (`head_dim / 2` values).
    pub fn new(layout: PairLayout, head_dim: usize, theta: f32, factors: Option<&[f32]>) -> Self {
        let frequencies = (0..head_dim / 2)
            .map(|i| {
                let f = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
                f / factors.map_or(1.0, |ff| ff[i] as f64)
            })
            .collect();
        Self { layout, frequencies }
    }

    pub fn layout(&self) -> PairLayout {
        self.layout
    }

    pub fn table(&self, positions: std::ops::Range<usize>) -> RopeTable {
        let angles = positions.flat_map(|p| self.frequencies.iter().map(move |f| p as f64 * f));
        let (cos, sin) = angles.map(|a| (a.cos() as f32, a.sin() as f32)).unzip();
        RopeTable { cos, sin }
    }

    /// Rotates every head of every row of `x` (`rows × heads·head_dim`); row `r` uses the table's
    /// `r`-th position.
    pub fn apply(&self, table: &RopeTable, x: &mut [f32], head_dim: usize) {
        let half = head_dim / 2;
        let rows = table.cos.len() / half;
        let row_len = x.len() / rows;
        for (r, row) in x.chunks_exact_mut(row_len).enumerate() {
            let (cos, sin) = (&table.cos[r * half..][..half], &table.sin[r * half..][..half]);
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match self.layout {
                        PairLayout::Adjacent => (2 * i, 2 * i + 1),
                        PairLayout::HalfSplit => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}
