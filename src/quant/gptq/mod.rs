//! GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", 2022): one linear layer's weights to a low-bit integer grid, column by column, each
//! column's rounding error pushed onto the columns not yet quantized through the inverse Hessian of the
//! layer's inputs, so the layer's output on the calibration activations moves as little as possible.
//!
//! Semantics follow AutoGPTQ/GPTQModel's `fasterquant`: dead inputs (zero Hessian diagonal) get weight 0,
//! dampening `damp · mean(diag H)`, the upper Cholesky factor of `H⁻¹`, lazy batch updates over blocks of
//! [`BLOCK_SIZE`] columns, act-order (columns by decreasing Hessian diagonal, with `g_idx`), static groups.
//! Where they differ: a group's parameters are taken from the weights as updated by every column already
//! quantized (the reference reads the block's pre-update copy for groups starting inside a block), the
//! factorization is retried at doubled damping instead of failing, and scales are f16 values (see [`grid`]).
//!
//! Output rows are independent given `H`, so rows are processed in fixed chunks of [`ROW_CHUNK`] in
//! parallel, each with sequential products: the result does not depend on the thread count.
//!
//! - [`hessian`]: [`HessianAccumulator`], [`Hessian`] and the inverse factor.
//! - [`grid`]: the min-max grid shared with round-to-nearest ([`rtn`]).
//! - [`blocks`]: the same error feedback onto GGUF block formats (Q4_0, Q4_K, ...), each block fitted by
//!   the format's own encoder.
//! - [`pipeline`]: the whole model, block by block, on calibration activations.

pub mod blocks;
pub mod grid;
pub mod hessian;
pub mod pipeline;

use std::borrow::Cow;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

pub use grid::{Grid, GroupParams, SUPPORTED_BITS};
pub use hessian::{Hessian, HessianAccumulator, HessianInput};

/// Columns per lazy batch update (GPTQ's `blocksize`).
pub const BLOCK_SIZE: usize = 128;
/// Group sizes accepted besides "one group per row": they divide [`BLOCK_SIZE`], so no group straddles two
/// lazy batches.
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];
/// The default shrinkage of the Hessian's off-diagonal terms: `H' = (1 − s)·H + s·diag(H)` before
/// dampening and factoring.
///
/// GPTQ trusts the calibration text's channel correlations completely: it moves each column's rounding
/// error onto the columns that are correlated with it *in that text*. Where the evaluation text
/// correlates channels differently, the moved error lands on inputs that now carry signal. On the
/// SmolLM2 fixture calibrated on the embedded Shakespeare corpus and evaluated on WikiText-2, plain
/// GPTQ (s = 0) was worse than round-to-nearest (KL-divergence 0.36 vs 0.32, w4 g64), worst in the
/// `ffn_down` linears whose Hessians a few tokens dominate; s = 0.3 / 0.5 / 0.7 / 0.8 / 0.9 gave
/// 0.24 / 0.23 / 0.21 / 0.21 / 0.23. Identity dampening cannot do this (0.1 gave 0.35): it is scaled by
/// the mean diagonal, which those few tokens set. s = 1 keeps only the diagonal: round-to-nearest.
pub const SHRINK: f64 = 0.7;
/// Output rows one parallel task quantizes.
const ROW_CHUNK: usize = 64;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GptqError {
    #[error("{0}-bit quantization is not supported (GPTQ supports 2, 3, 4 and 8 bits)")]
    Bits(u32),
    #[error("group size {0} is not supported (use -1 for one group per row, or 32, 64 or 128)")]
    GroupSize(usize),
    #[error("--static-groups needs a group size")]
    StaticGroupsWithoutGroups,
    #[error("dampening {0} is outside [0, 1)")]
    Damp(f64),
    #[error("shrinkage {0} is outside [0, 1)")]
    Shrink(f64),
    #[error("{0}")]
    Shape(String),
    #[error("weight {value} at row {row}, column {column} is not finite")]
    NonFiniteWeight { row: usize, column: usize, value: f32 },
    #[error("the Hessian holds a non-finite value ({0}); the calibration activations overflowed")]
    NonFiniteHessian(f64),
    #[error("no calibration activations reached this layer")]
    NoActivations,
    #[error("the Hessian is not positive definite even with dampening {0}")]
    NotPositiveDefinite(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqConfig {
    pub bits: u32,
    /// Input columns per group; `None` is one group per output row (GPTQ's `group_size = -1`).
    pub group_size: Option<usize>,
    pub sym: bool,
    /// Quantize columns by decreasing Hessian diagonal (`desc_act`).
    pub act_order: bool,
    /// Fix every group's parameters from the original weights before any update.
    pub static_groups: bool,
    /// Fraction of the mean Hessian diagonal added to the diagonal (`damp_percent`).
    pub damp: f64,
    /// Fraction by which the Hessian's off-diagonal terms shrink toward its diagonal (see [`SHRINK`]).
    pub shrink: f64,
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self {
            bits: 4,
            group_size: Some(128),
            sym: true,
            act_order: false,
            static_groups: false,
            damp: 0.01,
            shrink: SHRINK,
        }
    }
}

impl GptqConfig {
    pub fn grid(&self) -> Grid {
        Grid { bits: self.bits, sym: self.sym }
    }

    pub fn validate(&self) -> Result<(), GptqError> {
        if !SUPPORTED_BITS.contains(&self.bits) {
            return Err(GptqError::Bits(self.bits));
        }
        if let Some(g) = self.group_size {
            if !SUPPORTED_GROUP_SIZES.contains(&g) {
                return Err(GptqError::GroupSize(g));
            }
        } else if self.static_groups {
            return Err(GptqError::StaticGroupsWithoutGroups);
        }
        check_regularization(self.damp, self.shrink)
    }

    /// Columns per group for a row of `cols` (the whole row when there are no groups).
    fn group_len(&self, cols: usize) -> usize {
        self.group_size.unwrap_or(cols).max(1)
    }
}

/// A linear layer's weights on a grouped integer grid, in the layout GPTQ checkpoints use.
///
/// The weight is `rows × cols` = `out × in`. Group `g` holds the input columns `c` with `g_idx[c] == g`;
/// without act-order that is `c / group_size`, the last group shorter when `group_size` does not divide
/// `cols`. Every value here is exact: `dequantized[o·cols + c] == scales[g·rows + o] · (codes[o·cols + c] −
/// zeros[g·rows + o])` with `g = g_idx[c]` ([`GroupQuantized::dequantize`]), computed in f32, and every
/// scale is an f16 value.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupQuantized {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub sym: bool,
    /// `None`: one group per row.
    pub group_size: Option<usize>,
    /// `rows × cols`, row-major, each in `0..2^bits`.
    pub codes: Vec<u8>,
    /// `groups × rows` (the `[groups, out]` layout of GPTQ's `scales`).
    pub scales: Vec<f32>,
    /// `groups × rows`, the true zero points (not GPTQ v1's stored `zero − 1`).
    pub zeros: Vec<u8>,
    /// `cols` group indices.
    pub g_idx: Vec<u32>,
}

impl GroupQuantized {
    pub fn groups(&self) -> usize {
        self.scales.len() / self.rows.max(1)
    }

    /// The weights the codes stand for, `rows × cols` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        (0..rows * cols)
            .map(|i| {
                let g = self.g_idx[i % cols] as usize * rows + i / cols;
                GroupParams { scale: self.scales[g], zero: self.zeros[g] }.dequantize(self.codes[i])
            })
            .collect()
    }
}

/// [`gptq`]'s result and what it took.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOutput {
    pub weight: GroupQuantized,
    /// The dampening fraction that made `H` factorizable (the configured one unless retried).
    pub damp: f64,
    /// GPTQ's proxy loss `Σ (w − q)² / (2 [H⁻¹]_jj²)`, summed over rows and columns.
    pub loss: f64,
}

/// Quantizes `w` (`rows × cols`, row-major) with GPTQ against `h` (`cols × cols`; freed once factored
/// when owned).
pub fn gptq<'h>(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: impl Into<HessianInput<'h>>,
    config: &GptqConfig,
) -> Result<GptqOutput, GptqError> {
    let h = h.into();
    config.validate()?;
    check_weights(w, rows, cols)?;
    if h.dim() != cols {
        return Err(GptqError::Shape(format!("the Hessian is {0} x {0}, the weight has {cols} columns", h.dim())));
    }
    let dead = dead_columns(&h);
    let w = without_dead_columns(w, cols, &dead);
    let perm = column_order(&h, &dead, config.act_order);
    let (u, damp) = inverse_factor(h, &dead, &perm, config.damp, config.shrink)?;
    let plan = Plan::new(rows, cols, config, perm);
    let chunks: Vec<ChunkResult> =
        w.par_chunks(ROW_CHUNK * cols.max(1)).map(|chunk| quantize_chunk(chunk, cols, &plan, Some(&u))).collect();
    Ok(GptqOutput { loss: chunks.iter().map(|c| c.loss).sum(), weight: plan.assemble(&chunks), damp })
}

/// Round-to-nearest on the same grid and groups as [`gptq`] (no act-order: with no Hessian there is no
/// order to follow).
pub fn rtn(w: &[f32], rows: usize, cols: usize, config: &GptqConfig) -> Result<GroupQuantized, GptqError> {
    config.validate()?;
    check_weights(w, rows, cols)?;
    let plan = Plan::new(rows, cols, &GptqConfig { act_order: false, ..*config }, (0..cols).collect());
    let chunks: Vec<ChunkResult> =
        w.par_chunks(ROW_CHUNK * cols.max(1)).map(|chunk| quantize_chunk(chunk, cols, &plan, None)).collect();
    Ok(plan.assemble(&chunks))
}

fn check_regularization(damp: f64, shrink: f64) -> Result<(), GptqError> {
    if !(0.0..1.0).contains(&damp) {
        return Err(GptqError::Damp(damp));
    }
    if !(0.0..1.0).contains(&shrink) {
        return Err(GptqError::Shrink(shrink));
    }
    Ok(())
}

fn check_weights(w: &[f32], rows: usize, cols: usize) -> Result<(), GptqError> {
    if rows == 0 || cols == 0 || w.len() != rows * cols {
        return Err(GptqError::Shape(format!("{} weights do not form a {rows} x {cols} matrix", w.len())));
    }
    match w.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(GptqError::NonFiniteWeight { row: i / cols, column: i % cols, value: w[i] }),
        None => Ok(()),
    }
}

/// Inputs that never fired (zero Hessian diagonal): their weights cannot matter and are set to 0.
fn dead_columns(h: &Hessian) -> Vec<bool> {
    (0..h.dim()).map(|c| h.get(c, c) == 0.0).collect()
}

fn without_dead_columns<'w>(w: &'w [f32], cols: usize, dead: &[bool]) -> Cow<'w, [f32]> {
    if !dead.contains(&true) {
        return Cow::Borrowed(w);
    }
    let mut w = w.to_vec();
    for row in w.chunks_mut(cols) {
        row.iter_mut().zip(dead).filter(|(_, &d)| d).for_each(|(v, _)| *v = 0.0);
    }
    Cow::Owned(w)
}

/// The inverse factor of `H` with its off-diagonal terms shrunk by `shrink` and its columns in the order
/// `perm` (dead columns given a unit diagonal), and the dampening it took. An owned `h` is freed once
/// factored, before the inverse factor is allocated.
fn inverse_factor(
    h: HessianInput,
    dead: &[bool],
    perm: &[usize],
    damp: f64,
    shrink: f64,
) -> Result<(Vec<f32>, f64), GptqError> {
    let entry = |i: usize, j: usize| {
        let (pi, pj) = (perm[i], perm[j]);
        match (pi == pj, dead[pi]) {
            (true, true) => 1.0,
            (true, false) => h.get(pi, pj),
            (false, _) => (1.0 - shrink) * h.get(pi, pj),
        }
    };
    let (factor, damp) = factor_with_retries(h.dim(), entry, damp)?;
    drop(h);
    let u = factor.inverse_upper().ok_or(GptqError::NotPositiveDefinite(damp))?;
    Ok((u, damp))
}

/// The order columns are quantized in: natural, or by decreasing Hessian diagonal (dead columns count
/// as 1, as they will in the damped Hessian), ties by index so the order is deterministic.
fn column_order(h: &Hessian, dead: &[bool], act_order: bool) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..dead.len()).collect();
    if act_order {
        by_decreasing_diagonal(h, dead, &mut perm);
    }
    perm
}

/// Sorts `columns` by decreasing Hessian diagonal (dead columns count as 1), ties by index.
fn by_decreasing_diagonal(h: &Hessian, dead: &[bool], columns: &mut [usize]) {
    let key = |c: usize| if dead[c] { 1.0 } else { h.get(c, c) };
    columns.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
}

/// The damped factorization of the matrix `h(i, j)`, doubling the dampening (from at least 1%) until it
/// factors.
fn factor_with_retries(
    n: usize,
    h: impl Fn(usize, usize) -> f64,
    damp: f64,
) -> Result<(hessian::ReversedCholesky, f64), GptqError> {
    let mut damp = damp;
    loop {
        if let Some(factor) = hessian::reversed_cholesky(n, &h, damp) {
            return Ok((factor, damp));
        }
        let next = (2.0 * damp).max(0.01);
        if next >= 1.0 {
            return Err(GptqError::NotPositiveDefinite(damp));
        }
        damp = next;
    }
}

/// What every row chunk shares: shapes, grid, column order and where each column's group comes from.
struct Plan {
    rows: usize,
    cols: usize,
    grid: Grid,
    config: GptqConfig,
    group_len: usize,
    groups: usize,
    /// `perm[k]`: the original column quantized at position `k`.
    perm: Vec<usize>,
}

/// One chunk's results, in the permuted column order, rows of the chunk only.
struct ChunkResult {
    rows: usize,
    /// `cols × rows`: the code of permuted column `k`, chunk row `r` at `k·rows + r`.
    codes: Vec<u8>,
    /// `groups × rows`.
    params: Vec<GroupParams>,
    loss: f64,
}

impl Plan {
    fn new(rows: usize, cols: usize, config: &GptqConfig, perm: Vec<usize>) -> Self {
        let group_len = config.group_len(cols);
        Self { rows, cols, grid: config.grid(), config: *config, group_len, groups: cols.div_ceil(group_len), perm }
    }

    /// The group of permuted column `k`. Static groups (and RTN) keep the original columns' groups;
    /// dynamic groups are runs of the quantization order.
    fn group_of_position(&self, k: usize) -> usize {
        if self.config.static_groups {
            self.perm[k] / self.group_len
        } else {
            k / self.group_len
        }
    }

    fn assemble(&self, chunks: &[ChunkResult]) -> GroupQuantized {
        let (rows, cols) = (self.rows, self.cols);
        let mut g_idx = vec![0u32; cols];
        for (k, &c) in self.perm.iter().enumerate() {
            g_idx[c] = self.group_of_position(k) as u32;
        }
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; self.groups * rows];
        let mut zeros = vec![0u8; self.groups * rows];
        let mut row0 = 0;
        for chunk in chunks {
            for r in 0..chunk.rows {
                let row = &mut codes[(row0 + r) * cols..][..cols];
                for (k, &c) in self.perm.iter().enumerate() {
                    row[c] = chunk.codes[k * chunk.rows + r];
                }
                for g in 0..self.groups {
                    let p = chunk.params[g * chunk.rows + r];
                    scales[g * rows + row0 + r] = p.scale;
                    zeros[g * rows + row0 + r] = p.zero;
                }
            }
            row0 += chunk.rows;
        }
        let config = &self.config;
        GroupQuantized {
            rows,
            cols,
            bits: config.bits,
            sym: config.sym,
            group_size: config.group_size,
            codes,
            scales,
            zeros,
            g_idx,
        }
    }
}

/// GPTQ on a chunk of whole rows (`rows × cols`, row-major); with `u = None`, plain rounding.
fn quantize_chunk(w: &[f32], cols: usize, plan: &Plan, u: Option<&[f32]>) -> ChunkResult {
    let rows = w.len() / cols;
    let grid = plan.grid;
    // Column-major copy in quantization order: permuted column k is wt[k·rows..][..rows].
    let mut wt = vec![0f32; cols * rows];
    for (k, &c) in plan.perm.iter().enumerate() {
        for r in 0..rows {
            wt[k * rows + r] = w[r * cols + c];
        }
    }
    let mut params = vec![GroupParams { scale: 0.0, zero: 0 }; plan.groups * rows];
    let fixed_params = plan.config.static_groups || plan.config.group_size.is_none();
    if fixed_params {
        // Parameters from the original weights, before any update.
        for g in 0..plan.groups {
            let span = g * plan.group_len..((g + 1) * plan.group_len).min(cols);
            for r in 0..rows {
                params[g * rows + r] = grid.params(span.clone().map(|c| w[r * cols + c]));
            }
        }
    }
    let mut codes = vec![0u8; cols * rows];
    let loss = error_feedback(&mut wt, rows, u, BLOCK_SIZE, |k, ahead, quantized| {
        let group = plan.group_of_position(k);
        if !fixed_params && k % plan.group_len == 0 {
            // The group lies inside this lazy batch, whose columns are already fully updated.
            let len = plan.group_len.min(cols - k);
            for r in 0..rows {
                params[group * rows + r] = grid.params((0..len).map(|j| ahead[j * rows + r]));
            }
        }
        for r in 0..rows {
            let p = params[group * rows + r];
            let code = grid.code(ahead[r], p);
            codes[k * rows + r] = code;
            quantized[r] = p.dequantize(code);
        }
    });
    ChunkResult { rows, codes, params, loss }
}

/// GPTQ's column loop over one chunk of rows. `wt` holds the weights column-major in quantization order
/// (column `k` at `wt[k·rows..][..rows]`). For each column, `round(k, ahead, quantized)` sees the columns
/// from `k` to the end of its lazy batch of `batch` columns (`ahead`, column-major, every earlier column's
/// error already applied) and writes column `k`'s quantized values; the rounding error then moves onto
/// the columns not yet quantized through the inverse factor `u` (none: plain rounding). Returns GPTQ's
/// proxy loss.
pub(crate) fn error_feedback(
    wt: &mut [f32],
    rows: usize,
    u: Option<&[f32]>,
    batch: usize,
    mut round: impl FnMut(usize, &[f32], &mut [f32]),
) -> f64 {
    let cols = wt.len() / rows;
    let mut err = vec![0f32; batch * rows];
    let mut quantized = vec![0f32; rows];
    let mut loss = 0f64;
    for i1 in (0..cols).step_by(batch) {
        let i2 = (i1 + batch).min(cols);
        for k in i1..i2 {
            round(k, &wt[k * rows..i2 * rows], &mut quantized);
            let (done, rest) = wt.split_at_mut((k + 1) * rows);
            let column = &done[k * rows..];
            let d = u.map_or(1.0, |u| u[k * cols + k]);
            let e = &mut err[(k - i1) * rows..][..rows];
            for r in 0..rows {
                e[r] = (column[r] - quantized[r]) / d;
                loss += f64::from(e[r]) * f64::from(e[r]) / 2.0;
            }
            if let Some(u) = u {
                // Spread this column's error over the rest of the batch now; columns past the batch
                // get all of the batch's errors at once below.
                for j in k + 1..i2 {
                    let coef = u[k * cols + j];
                    let target = &mut rest[(j - k - 1) * rows..][..rows];
                    target.iter_mut().zip(e.iter()).for_each(|(t, &e)| *t -= e * coef);
                }
            }
        }
        if let (Some(u), true) = (u, i2 < cols) {
            let count = i2 - i1;
            let u = MatRef::from_column_major_slice(u, cols, cols).transpose();
            // wt[i2.., :] (cols−i2 × rows) −= U[i1..i2, i2..]ᵀ · Err (count × rows)
            let lhs = u.submatrix(i1, i2, count, cols - i2).transpose();
            let rhs = MatRef::from_column_major_slice(&err[..count * rows], rows, count).transpose();
            let dst = MatMut::from_column_major_slice_mut(&mut wt[i2 * rows..], rows, cols - i2).transpose_mut();
            matmul(dst, Accum::Add, lhs, rhs, -1.0, Par::Seq);
        }
    }
    loss
}

#[cfg(test)]
mod tests;
