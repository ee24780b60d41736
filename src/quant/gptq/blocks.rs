//! GPTQ onto GGUF block formats: the error feedback of [`super::gptq`], with each block's grid taken from
//! the format itself (Q4_0's block scale, Q4_K's sub-block scales and mins, IQ4_NL's codebook, ...).
//!
//! The column loop runs in the natural column order, in lazy batches that hold whole blocks (a multiple of
//! 32 columns, or of a 256-column super-block). When it reaches a block, every earlier column's error has
//! reached the block's columns, and each row's block is fitted by the format's own encoder on those
//! updated weights, with the Hessian diagonal of the block's columns (optionally times an importance
//! matrix) as the importance llama.cpp's encoders take. The block is then read as a grid
//! ([`formats::blocks::grid::BlockGrid`]), each column is rounded to its nearest level, the error moves on
//! as in GPTQ, and the chosen codes are written back into the blocks, which therefore decode exactly to
//! the weights the error feedback saw.
//!
//! Rows are independent given `H` and run in fixed chunks, so the bytes do not depend on the thread count.

use formats::blocks::grid::BlockGrid;
use formats::GgmlType;
use rayon::prelude::*;

use super::{
    by_decreasing_diagonal, check_regularization, dead_columns, error_feedback, inverse_factor, without_dead_columns,
    GptqError, HessianInput, BLOCK_SIZE, ROW_CHUNK,
};

/// [`gptq_blocks`]'s result.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockGptqOutput {
    /// The tensor data as a GGUF file stores it: `rows` rows of encoded blocks.
    pub bytes: Vec<u8>,
    /// The dampening fraction that made `H` factorizable.
    pub damp: f64,
    /// GPTQ's proxy loss, summed over rows and columns.
    pub loss: f64,
}

/// What [`gptq_blocks`] writes and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockGptqConfig {
    pub ty: GgmlType,
    /// Fraction of the mean Hessian diagonal added to the diagonal.
    pub damp: f64,
    /// Fraction by which the Hessian's off-diagonal terms shrink toward its diagonal ([`super::SHRINK`]).
    pub shrink: f64,
    /// Within each block, quantize columns by decreasing Hessian diagonal (blocks stay in order: a
    /// block's parameters are fitted when the loop reaches it).
    pub act_order: bool,
}

/// Quantizes `w` (`rows × cols`, row-major) into blocks of `config.ty` with GPTQ against `h`.
/// `importance`, one value per column, multiplies the Hessian diagonal the block fits are weighted by.
pub fn gptq_blocks<'h>(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: impl Into<HessianInput<'h>>,
    importance: Option<&[f32]>,
    config: &BlockGptqConfig,
) -> Result<BlockGptqOutput, GptqError> {
    let h = h.into();
    let (ty, damp) = (config.ty, config.damp);
    let traits = ty.traits();
    let (Some(grid), Some(encode)) = (traits.grid, traits.quantize) else {
        return Err(GptqError::Shape(format!("GPTQ cannot write {ty}: it has no block grid")));
    };
    if rows == 0 || w.len() != rows * cols || !cols.is_multiple_of(traits.block_size) {
        return Err(GptqError::Shape(format!(
            "{} weights do not form a {rows} x {cols} matrix of whole {ty} blocks ({} columns each)",
            w.len(),
            traits.block_size
        )));
    }
    if h.dim() != cols || importance.is_some_and(|v| v.len() != cols) {
        return Err(GptqError::Shape(format!("the Hessian or importance does not have {cols} columns")));
    }
    check_regularization(damp, config.shrink)?;
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(GptqError::NonFiniteWeight { row: i / cols, column: i % cols, value: w[i] });
    }
    let dead = dead_columns(&h);
    let w = without_dead_columns(w, cols, &dead);
    let mut perm: Vec<usize> = (0..cols).collect();
    if config.act_order {
        perm.chunks_mut(traits.block_size).for_each(|block| by_decreasing_diagonal(&h, &dead, block));
    }
    let fit_weights: Vec<f32> = (0..cols).map(|c| h.get(c, c) as f32 * importance.map_or(1.0, |imp| imp[c])).collect();
    let (u, damp) = inverse_factor(h, &dead, &perm, damp, config.shrink)?;
    let format = Format { ty, grid, encode, fit_weights: &fit_weights, perm: &perm };
    let chunks: Vec<(Vec<u8>, f64)> =
        w.par_chunks(ROW_CHUNK * cols).map(|chunk| format.quantize_chunk(chunk, cols, &u)).collect();
    let bytes: Vec<u8> = chunks.iter().flat_map(|(b, _)| b.iter().copied()).collect();
    Ok(BlockGptqOutput { bytes, damp, loss: chunks.iter().map(|(_, l)| l).sum() })
}

/// What every row chunk shares.
struct Format<'a> {
    ty: GgmlType,
    grid: &'static BlockGrid,
    encode: formats::ggml_type::QuantizeFn,
    /// Per column: the importance each block fit is weighted by.
    fit_weights: &'a [f32],
    /// `perm[k]`: the column quantized at position `k` (a permutation within each block).
    perm: &'a [usize],
}

impl Format<'_> {
    /// GPTQ on a chunk of whole rows; returns their encoded bytes and the proxy loss.
    fn quantize_chunk(&self, w: &[f32], cols: usize, u: &[f32]) -> (Vec<u8>, f64) {
        let rows = w.len() / cols;
        let (block, block_bytes) = (self.ty.block_size(), self.ty.type_size());
        let row_bytes = cols / block * block_bytes;
        let mut wt = vec![0f32; cols * rows];
        for r in 0..rows {
            for (k, &c) in self.perm.iter().enumerate() {
                wt[k * rows + r] = w[r * cols + c];
            }
        }
        let mut bytes = vec![0u8; rows * row_bytes];
        // The current block's grid, per row: `block` scales and offsets each.
        let (mut scale, mut offset) = (vec![0f32; rows * block], vec![0f32; rows * block]);
        let mut codes = vec![0u8; rows * cols];
        let mut x = vec![0f32; block];
        let levels = self.grid.levels;
        let batch = lcm(BLOCK_SIZE, block);
        let loss = error_feedback(&mut wt, rows, Some(u), batch, |k, ahead, quantized| {
            let (column, j) = (self.perm[k], self.perm[k] % block);
            let start = column - j;
            if k % block == 0 {
                let importance = &self.fit_weights[start..start + block];
                for r in 0..rows {
                    for (i, &c) in self.perm[k..k + block].iter().enumerate() {
                        x[c - start] = ahead[i * rows + r];
                    }
                    let out = &mut bytes[r * row_bytes + start / block * block_bytes..][..block_bytes];
                    (self.encode)(&x, out, Some(importance));
                    (self.grid.affine)(out, &mut scale[r * block..][..block], &mut offset[r * block..][..block]);
                }
            }
            for r in 0..rows {
                let (s, o) = (scale[r * block + j], offset[r * block + j]);
                let code = nearest_level(levels, s, o, ahead[r]);
                codes[r * cols + column] = code;
                quantized[r] = s * levels[code as usize] + o;
            }
        });
        for (row, codes) in bytes.chunks_exact_mut(row_bytes).zip(codes.chunks_exact(cols)) {
            for (out, codes) in row.chunks_exact_mut(block_bytes).zip(codes.chunks_exact(block)) {
                (self.grid.write_codes)(out, codes);
            }
        }
        (bytes, loss)
    }
}

/// The code whose value `s · levels[code] + o` is nearest to `w` (the lower on ties; code 0 when `s` is
/// 0 and every code gives `o`).
fn nearest_level(levels: &[f32], s: f32, o: f32, w: f32) -> u8 {
    if s == 0.0 {
        return 0;
    }
    let t = (w - o) / s;
    let above = levels.partition_point(|&l| l < t).min(levels.len() - 1);
    let below = above.saturating_sub(1);
    let distance = |c: usize| (s * levels[c] + o - w).abs();
    (if distance(below) <= distance(above) { below } else { above }) as u8
}

fn lcm(a: usize, b: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gptq::tests::{correlated_activations, hessian_of};
    use crate::quant::gptq::{Hessian, SHRINK};

    /// `tr(ΔW H ΔWᵀ)`.
    fn hessian_error(w: &[f32], w_hat: &[f32], h: &Hessian, cols: usize) -> f64 {
        let mut total = 0f64;
        for (row, row_hat) in w.chunks(cols).zip(w_hat.chunks(cols)) {
            let d: Vec<f64> = row.iter().zip(row_hat).map(|(a, b)| f64::from(a - b)).collect();
            for i in 0..cols {
                let hd: f64 = (0..cols).map(|j| h.get(i, j) * d[j]).sum();
                total += d[i] * hd;
            }
        }
        total
    }

    /// The format's encoder alone, with the Hessian diagonal as importance.
    fn plain(w: &[f32], cols: usize, h: &Hessian, ty: GgmlType) -> Vec<f32> {
        let importance: Vec<f32> = (0..cols).map(|c| h.get(c, c) as f32).collect();
        let row_bytes = ty.row_bytes(cols as u64).unwrap() as usize;
        let mut out = vec![0f32; w.len()];
        for (row, y) in w.chunks(cols).zip(out.chunks_mut(cols)) {
            let mut bytes = vec![0u8; row_bytes];
            (ty.traits().quantize.unwrap())(row, &mut bytes, Some(&importance));
            ty.dequantize(&bytes, y).unwrap();
        }
        out
    }

    #[test]
    fn beats_the_plain_encoder_on_correlated_inputs() {
        let (rows, cols) = (24, 512);
        let x = correlated_activations(2048, cols, 5);
        let h = hessian_of(&x, cols);
        let w = crate::quant::gptq::tests::noise(rows * cols, 9);
        use GgmlType::*;
        for (ty, act_order) in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS]
            .into_iter()
            .flat_map(|ty| [(ty, false), (ty, true)])
        {
            let out =
                gptq_blocks(&w, rows, cols, &h, None, &BlockGptqConfig { ty, damp: 0.01, shrink: 0.0, act_order })
                    .unwrap();
            let mut decoded = vec![0f32; rows * cols];
            ty.dequantize(&out.bytes, &mut decoded).unwrap();
            let gptq = hessian_error(&w, &decoded, &h, cols);
            let rtn = hessian_error(&w, &plain(&w, cols, &h, ty), &h, cols);
            assert!(gptq < 0.6 * rtn, "{ty} (act-order {act_order}): GPTQ {gptq} vs encoder {rtn}");
        }
    }

    #[test]
    fn same_bytes_at_any_thread_count() {
        let (rows, cols) = (150, 256);
        let x = correlated_activations(512, cols, 6);
        let h = hessian_of(&x, cols);
        let w = crate::quant::gptq::tests::noise(rows * cols, 10);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let config = BlockGptqConfig { ty: GgmlType::Q4_K, damp: 0.01, shrink: SHRINK, act_order: true };
            pool.install(|| gptq_blocks(&w, rows, cols, &h, None, &config).unwrap())
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn refuses_rows_of_partial_blocks_and_types_without_a_grid() {
        let h = Hessian::identity(48);
        let w = vec![0.5f32; 2 * 48];
        let config = |ty| BlockGptqConfig { ty, damp: 0.01, shrink: SHRINK, act_order: false };
        assert!(matches!(gptq_blocks(&w, 2, 48, &h, None, &config(GgmlType::Q4_0)), Err(GptqError::Shape(_))));
        let h = Hessian::identity(32);
        assert!(matches!(gptq_blocks(&w[..64], 2, 32, &h, None, &config(GgmlType::F16)), Err(GptqError::Shape(_))));
    }

    #[test]
    fn nearest_level_picks_the_closest_value() {
        let levels = [-2.0, -1.0, 0.0, 3.0];
        assert_eq!(nearest_level(&levels, 1.0, 0.0, 1.4), 2);
        assert_eq!(nearest_level(&levels, 1.0, 0.0, 1.6), 3);
        assert_eq!(nearest_level(&levels, -1.0, 0.0, 1.6), 0, "a negative scale reverses the levels");
        assert_eq!(nearest_level(&levels, 1.0, 10.0, -100.0), 0);
        assert_eq!(nearest_level(&levels, 1.0, 10.0, 100.0), 3);
        assert_eq!(nearest_level(&levels, 0.0, 1.0, 5.0), 0);
    }
}
