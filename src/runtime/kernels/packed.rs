//! GPTQ and AWQ integer weights as the runtime multiplies them.
//!
//! The checkpoints pack codes along whichever dimension their GPU kernels like (GPTQ along the input,
//! AWQ along the output, interleaved), which a row-at-a-time CPU decoder cannot read in one pass. At
//! load [`PackedLinear::new`] repacks a layer row-major: each weight row is the LSB-first bit stream of
//! its codes at their own width, next to that row's per-group scales and zero points as f32, and the
//! group of each input column when it is not simply `column / group_size` (GPTQ act-order). Memory
//! stays about the file's size; no f32 copy of the layer is kept.
//!
//! A row decodes to `(code − zero) · scale`, the exact f32 weights the loaders compute (the caller
//! hands over true zero points: GPTQ v1's stored `zero − 1` already undone). Every product goes
//! through the shared batch path ([`super::gemm`]), which decodes a block of rows and multiplies the
//! batch by it while the block is in cache; for one to four tokens that is the decode-a-few-rows-
//! then-dot pattern of the GGML few-token path (measured no slower than faer's matrix-vector products).

use std::ops::Range;

use formats::packed::UnpackedWeights;

use super::{gemm, DecodeRows, Linear};
use crate::runtime::simd::avx2_dispatch;

/// The group of each input column.
#[derive(Clone, Debug, PartialEq)]
enum Groups {
    /// Consecutive runs of this many columns.
    Runs(usize),
    /// An arbitrary group per column (GPTQ act-order).
    Indexed(Vec<u32>),
}

/// A packed integer weight matrix, `rows × cols`, repacked row-major.
#[derive(Clone, Debug)]
pub struct PackedLinear {
    rows: usize,
    cols: usize,
    bits: u32,
    /// 32-bit words per row: the row's codes as one LSB-first bit stream, zero-padded.
    row_words: usize,
    codes: Vec<u32>,
    /// Groups per row.
    groups: usize,
    /// `rows × groups`.
    scales: Vec<f32>,
    /// `rows × groups`: true zero points.
    zeros: Vec<f32>,
    columns: Groups,
}

impl PackedLinear {
    /// Repacks `w` (true zero points) row-major; the length checks guard against a layer that is not
    /// what its shapes say.
    pub fn new(w: &UnpackedWeights) -> Result<Self, String> {
        let (rows, cols, bits) = (w.out_features, w.in_features, w.bits);
        if !(1..=8).contains(&bits) {
            return Err(format!("{bits}-bit codes are not supported"));
        }
        let groups = w.scales.len() / rows.max(1);
        if rows == 0
            || cols == 0
            || groups == 0
            || w.codes.len() != rows * cols
            || w.scales.len() != rows * groups
            || w.zeros.len() != rows * groups
            || w.g_idx.len() != cols
        {
            return Err(format!("the packed tensors do not describe one {rows} x {cols} layer"));
        }
        if let Some(g) = w.g_idx.iter().find(|&&g| g as usize >= groups) {
            return Err(format!("g_idx names group {g}, but there are {groups} groups"));
        }
        let row_words = (cols * bits as usize).div_ceil(32);
        let mut codes = vec![0u32; rows * row_words];
        for (row, words) in w.codes.chunks_exact(cols).zip(codes.chunks_exact_mut(row_words)) {
            for (c, &code) in row.iter().enumerate() {
                let bit = c * bits as usize;
                let (word, shift) = (bit / 32, (bit % 32) as u32);
                words[word] |= u32::from(code) << shift;
                if shift + bits > 32 {
                    words[word + 1] |= u32::from(code) >> (32 - shift);
                }
            }
        }
        // Scales and zeros arrive `groups × rows`; each decoded row wants its own groups together.
        let by_row = |values: &[f32]| -> Vec<f32> {
            (0..rows * groups).map(|i| values[i % groups * rows + i / groups]).collect()
        };
        let zeros: Vec<f32> = w.zeros.iter().map(|&z| f32::from(z)).collect();
        let run = cols.div_ceil(groups);
        let columns = if w.g_idx.iter().enumerate().all(|(c, &g)| g as usize == c / run) {
            Groups::Runs(run)
        } else {
            Groups::Indexed(w.g_idx.clone())
        };
        Ok(Self {
            rows,
            cols,
            bits,
            row_words,
            codes,
            groups,
            scales: by_row(&w.scales),
            zeros: by_row(&zeros),
            columns,
        })
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Decodes one row: codes first, then each group's zero and scale.
    fn decode_row(&self, row: usize, dst: &mut [f32]) {
        let words = &self.codes[row * self.row_words..][..self.row_words];
        match self.bits {
            2 => codes_2bit(words, dst),
            4 => codes_4bit(words, dst),
            8 => codes_8bit(words, dst),
            bits => codes_across_words(words, bits, dst),
        }
        let scales = &self.scales[row * self.groups..][..self.groups];
        let zeros = &self.zeros[row * self.groups..][..self.groups];
        match &self.columns {
            Groups::Runs(run) => {
                for ((values, &scale), &zero) in dst.chunks_mut(*run).zip(scales).zip(zeros) {
                    values.iter_mut().for_each(|v| *v = (*v - zero) * scale);
                }
            }
            Groups::Indexed(g_idx) => {
                for (v, &g) in dst.iter_mut().zip(g_idx) {
                    *v = (*v - zeros[g as usize]) * scales[g as usize];
                }
            }
        }
    }
}

avx2_dispatch! {
    fn codes_2bit(words: &[u32], dst: &mut [f32]) = codes_2bit_body;
}
#[inline(always)]
fn codes_2bit_body(words: &[u32], dst: &mut [f32]) {
    codes_in_words::<2>(words, dst)
}
avx2_dispatch! {
    fn codes_4bit(words: &[u32], dst: &mut [f32]) = codes_4bit_body;
}
#[inline(always)]
fn codes_4bit_body(words: &[u32], dst: &mut [f32]) {
    codes_in_words::<4>(words, dst)
}
avx2_dispatch! {
    fn codes_8bit(words: &[u32], dst: &mut [f32]) = codes_8bit_body;
}
#[inline(always)]
fn codes_8bit_body(words: &[u32], dst: &mut [f32]) {
    codes_in_words::<8>(words, dst)
}

/// Codes of a width dividing 32, which never straddle words. Whole words unroll into one vector of
/// per-lane shifts (AVX2), which is what makes decoding cheap next to the product.
#[inline(always)]
fn codes_in_words<const BITS: usize>(words: &[u32], dst: &mut [f32]) {
    let mask = (1u32 << BITS) - 1;
    let per_word = 32 / BITS;
    let whole = dst.len() / per_word;
    let (body, tail) = dst.split_at_mut(whole * per_word);
    for (&word, values) in words.iter().zip(body.chunks_exact_mut(per_word)) {
        for (i, v) in values.iter_mut().enumerate() {
            *v = ((word >> (BITS * i)) & mask) as f32;
        }
    }
    if let Some(&word) = words.get(whole) {
        for (i, v) in tail.iter_mut().enumerate() {
            *v = ((word >> (BITS * i)) & mask) as f32;
        }
    }
}

/// Codes of any width, read from the stream one at a time.
fn codes_across_words(words: &[u32], bits: u32, dst: &mut [f32]) {
    let mask = (1u64 << bits) - 1;
    for (i, v) in dst.iter_mut().enumerate() {
        let bit = i * bits as usize;
        let word = bit / 32;
        let pair = u64::from(words[word]) | words.get(word + 1).map_or(0, |&w| u64::from(w) << 32);
        *v = ((pair >> (bit % 32)) & mask) as f32;
    }
}

impl DecodeRows for PackedLinear {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn decode_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        assert_eq!(dst.len(), rows.len() * self.cols, "decoded rows do not fit the destination");
        for (row, out) in rows.zip(dst.chunks_exact_mut(self.cols)) {
            self.decode_row(row, out);
        }
    }
}

impl Linear for PackedLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], y: &mut [f32]) {
        let n = super::batch_rows(x, y, self.rows, self.cols);
        if n > 0 {
            gemm::gemm(self, x, n, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use formats::packed::{awq, gptq, UnpackedWeights};

    use super::super::gemm;
    use super::*;
    use crate::runtime::synthetic::Rng;

    /// A random layer: codes and zero points anywhere on the grid (GPTQ v1 needs zero points ≥ 1),
    /// scales as f16 holds them, and `g_idx` in runs of `group` columns or, with `act_order`, in runs
    /// of a random column permutation.
    fn random_layer(
        rows: usize,
        cols: usize,
        bits: u32,
        group: usize,
        act_order: bool,
        rng: &mut Rng,
    ) -> UnpackedWeights {
        let groups = cols.div_ceil(group);
        let levels = 1u64 << bits;
        let mut order: Vec<usize> = (0..cols).collect();
        if act_order {
            for i in (1..cols).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
        }
        let mut g_idx = vec![0u32; cols];
        for (position, &c) in order.iter().enumerate() {
            g_idx[c] = (position / group) as u32;
        }
        UnpackedWeights {
            out_features: rows,
            in_features: cols,
            bits,
            codes: (0..rows * cols).map(|_| (rng.next_u64() % levels) as u8).collect(),
            zeros: (0..groups * rows).map(|_| (1 + rng.next_u64() % (levels - 1)) as u8).collect(),
            scales: (0..groups * rows).map(|_| half::f16::from_f32(0.01 + 0.05 * rng.f32().abs()).to_f32()).collect(),
            g_idx,
        }
    }

    /// Layers read back from their GPTQ and AWQ packings, which is how the loader gets them.
    fn layers(rng: &mut Rng) -> Vec<(String, UnpackedWeights)> {
        let mut layers = Vec::new();
        for bits in [2, 3, 4, 8] {
            for (rows, cols, group, act_order) in [(32, 64, 32, false), (96, 160, 32, true), (64, 96, 96, true)] {
                let w = random_layer(rows, cols, bits, group, act_order, rng);
                let unpacked = gptq::pack(&w.as_int_weights()).unwrap().unpack();
                assert_eq!(unpacked, w, "GPTQ packing round trip");
                layers.push((format!("GPTQ w{bits} {rows}x{cols} g{group} act_order={act_order}"), unpacked));
            }
        }
        for (rows, cols, group) in [(8, 64, 64), (24, 256, 128), (72, 96, 32)] {
            let w = random_layer(rows, cols, 4, group, false, rng);
            layers
                .push((format!("AWQ {rows}x{cols} g{group}"), awq::pack(&w.as_int_weights(), group).unwrap().unpack()));
        }
        // Odd sizes no packing allows, to exercise partial words, groups and panels.
        for bits in [3, 4, 5] {
            let w = random_layer(7, 45, bits, 15, bits == 5, rng);
            layers.push((format!("raw w{bits} 7x45 g15"), w));
        }
        layers
    }

    #[test]
    fn decoded_rows_are_the_loaders_weights() {
        let mut rng = Rng(3);
        for (what, w) in layers(&mut rng) {
            let packed = PackedLinear::new(&w).unwrap();
            let mut got = vec![f32::NAN; w.out_features * w.in_features];
            packed.decode_rows(0..w.out_features, &mut got);
            let want = w.dequantize();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
            // A middle range of rows decodes to the same rows.
            let rows = 1..w.out_features.min(5);
            let mut part = vec![0f32; rows.len() * w.in_features];
            packed.decode_rows(rows.clone(), &mut part);
            assert_eq!(part, want[rows.start * w.in_features..rows.end * w.in_features], "{what}");
        }
    }

    #[test]
    fn products_match_the_f64_reference() {
        let mut rng = Rng(5);
        for (what, w) in layers(&mut rng) {
            let packed = PackedLinear::new(&w).unwrap();
            let (rows, cols) = (w.out_features, w.in_features);
            let weights: Vec<f64> = w.dequantize().iter().map(|&v| f64::from(v)).collect();
            for n in [1, 2, 4, 5, 19] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let check = |y: &[f32], path: &str| {
                    for (i, &got) in y.iter().enumerate() {
                        let (t, r) = (i / rows, i % rows);
                        let products = weights[r * cols..][..cols].iter().zip(&x[t * cols..][..cols]);
                        let (want, magnitude) = products
                            .map(|(&a, &b)| a * f64::from(b))
                            .fold((0.0, 0.0), |(s, m), p: f64| (s + p, m + p.abs()));
                        let bound = cols as f64 * f64::from(f32::EPSILON) * magnitude;
                        assert!(
                            (f64::from(got) - want).abs() <= bound,
                            "{what} {path} n={n} output {i}: {got} vs {want}"
                        );
                    }
                };
                let mut y = vec![f32::NAN; n * rows];
                packed.forward(&x, &mut y);
                check(&y, "forward");
                for kernel in gemm::Kernel::available() {
                    for block_rows in [32, 64, rows] {
                        y.fill(f32::NAN);
                        gemm::gemm_with(&packed, &x, n, &mut y, kernel, block_rows);
                        check(&y, &format!("gemm {kernel:?} block={block_rows}"));
                    }
                }
            }
        }
    }

    #[test]
    fn act_order_is_kept_and_trivial_groups_are_runs() {
        let mut rng = Rng(9);
        let plain = PackedLinear::new(&random_layer(32, 64, 4, 32, false, &mut rng)).unwrap();
        assert_eq!(plain.columns, Groups::Runs(32));
        let shuffled = PackedLinear::new(&random_layer(32, 64, 4, 32, true, &mut rng)).unwrap();
        assert!(matches!(shuffled.columns, Groups::Indexed(_)));
    }

    #[test]
    fn inconsistent_layers_are_rejected() {
        let mut rng = Rng(1);
        let mut w = random_layer(8, 32, 4, 16, false, &mut rng);
        w.g_idx[3] = 2;
        assert!(PackedLinear::new(&w).unwrap_err().contains("names group 2"));
        w.g_idx[3] = 0;
        w.codes.pop();
        assert!(PackedLinear::new(&w).unwrap_err().contains("do not describe one 8 x 32 layer"));
        w.bits = 9;
        assert!(PackedLinear::new(&w).unwrap_err().contains("9-bit"));
    }
}
