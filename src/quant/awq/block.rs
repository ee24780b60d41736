//! One decoder block's weights as f32 copies, and AWQ's scale groups over them: which linears share an
//! input, which operation before them absorbs the inverse scales, and folding a scale vector in so the
//! float block still computes the same function.
//!
//! Scaling input channel `c` of a group's linears by `s[c]` is exact when the operation producing that
//! input divides its output channel `c` by `s[c]`: an RMSNorm's weight (it multiplies after the
//! normalization), or a linear's output row. For o_proj the producer is v_proj through attention, which
//! mixes positions but not channels; with grouped-query attention one v row feeds the same dimension of
//! every query head sharing its KV head, so o's scales are tied across those heads ([`Tie`]).

use crate::runtime::attention::Heads;
use crate::runtime::forward::BlockLinear;
use crate::runtime::model::Layer;

/// A row-major `rows × cols` f32 weight matrix (`out × in`).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl Matrix {
    fn scale_columns(&mut self, s: &[f32]) {
        for row in self.values.chunks_exact_mut(self.cols) {
            row.iter_mut().zip(s).for_each(|(w, &s)| *w *= s);
        }
    }

    fn divide_rows(&mut self, s: &[f32]) {
        for (row, &s) in self.values.chunks_exact_mut(self.cols).zip(s) {
            row.iter_mut().for_each(|w| *w /= s);
        }
    }
}

/// A block's norms and linears as f32, rows in the source's order.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct BlockWeights {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// In [`BlockLinear::ALL`]'s order.
    linears: Vec<Matrix>,
}

impl BlockWeights {
    pub fn decode(layer: &Layer) -> Self {
        let linears = BlockLinear::ALL
            .iter()
            .map(|linear| {
                let w = linear.of(layer);
                let (rows, cols) = (w.rows(), w.cols());
                let mut values = vec![0f32; rows * cols];
                w.decode_rows(0..rows, &mut values);
                Matrix { rows, cols, values }
            })
            .collect();
        Self { attn_norm: layer.attn_norm.clone(), ffn_norm: layer.ffn_norm.clone(), linears }
    }

    pub fn linear(&self, linear: BlockLinear) -> &Matrix {
        &self.linears[index(linear)]
    }

    pub fn linear_mut(&mut self, linear: BlockLinear) -> &mut Matrix {
        &mut self.linears[index(linear)]
    }

    /// Multiplies `group`'s input channels by `tie.expand(s)` and divides the producer's output
    /// channels by `s`.
    pub fn fold(&mut self, group: &ScaleGroup, tie: &Tie, s: &[f32]) {
        match group.producer {
            Producer::AttnNorm => self.attn_norm.iter_mut().zip(s).for_each(|(w, &s)| *w /= s),
            Producer::FfnNorm => self.ffn_norm.iter_mut().zip(s).for_each(|(w, &s)| *w /= s),
            Producer::Rows(linear) => self.linear_mut(linear).divide_rows(s),
        }
        let expanded = tie.expand(s);
        for &linear in group.linears {
            self.linear_mut(linear).scale_columns(&expanded);
        }
    }
}

fn index(linear: BlockLinear) -> usize {
    BlockLinear::ALL.iter().position(|&l| l == linear).expect("ALL lists every linear")
}

/// What produces a group's input, and so absorbs the inverse scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Producer {
    AttnNorm,
    FfnNorm,
    /// The output rows of a linear (v_proj for o_proj, up_proj for down_proj).
    Rows(BlockLinear),
}

/// Linears sharing one input, scaled together.
#[derive(Clone, Copy, Debug)]
pub(super) struct ScaleGroup {
    pub producer: Producer,
    pub linears: &'static [BlockLinear],
}

impl ScaleGroup {
    /// The linear whose input the forward pass shows for the whole group.
    pub fn observed(&self) -> BlockLinear {
        self.linears[0]
    }
}

/// AutoAWQ's groups for llama, in the forward pass's order.
pub(super) const GROUPS: [ScaleGroup; 4] = [
    ScaleGroup { producer: Producer::AttnNorm, linears: &[BlockLinear::AttnQ, BlockLinear::AttnK, BlockLinear::AttnV] },
    ScaleGroup { producer: Producer::Rows(BlockLinear::AttnV), linears: &[BlockLinear::AttnOutput] },
    ScaleGroup { producer: Producer::FfnNorm, linears: &[BlockLinear::FfnGate, BlockLinear::FfnUp] },
    ScaleGroup { producer: Producer::Rows(BlockLinear::FfnUp), linears: &[BlockLinear::FfnDown] },
];

/// How a group's input channels map onto its producer's channels: input channel `h·dim + e` (head `h`,
/// dimension `e`) comes from producer channel `(h / heads)·dim + e`, `heads` inputs heads per producer
/// head. Only o_proj under grouped-query attention has `heads > 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tie {
    pub heads: usize,
    pub dim: usize,
}

impl Tie {
    pub fn of(group: &ScaleGroup, heads: Heads) -> Self {
        match group.producer {
            Producer::Rows(BlockLinear::AttnV) => Self { heads: heads.query / heads.kv, dim: heads.dim },
            _ => Self { heads: 1, dim: 1 },
        }
    }

    fn producer_channel(&self, c: usize) -> usize {
        (c / (self.dim * self.heads)) * self.dim + c % self.dim
    }

    /// Per-input-channel scales from per-producer-channel ones.
    pub fn expand(&self, s: &[f32]) -> Vec<f32> {
        (0..s.len() * self.heads).map(|c| s[self.producer_channel(c)]).collect()
    }

    /// Per-producer-channel means of per-input-channel values.
    pub fn reduce(&self, values: &[f64]) -> Vec<f64> {
        let mut sums = vec![0f64; values.len() / self.heads];
        for (c, &v) in values.iter().enumerate() {
            sums[self.producer_channel(c)] += v;
        }
        sums.iter().map(|&v| v / self.heads as f64).collect()
    }
}
