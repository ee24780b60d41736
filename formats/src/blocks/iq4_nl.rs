//! IQ4_NL: blocks of 32 four-bit indices into a fixed non-linear codebook, with an f16 scale
//! (18 bytes: `f16 d; u8 qs[16]`, nibbles packed as in Q4_0; `x = d·CODEBOOK[q]`).

use super::grid::{block_codes, unpack_nibbles, BlockGrid};
use super::scale_search;
use super::{pack_nibbles, read_f16, signed_absmax, write_f16};

const BLOCK: usize = 32;
const BYTES: usize = 18;

/// ggml's `kvalues_iq4nl`: levels spaced more densely near zero, where weights cluster.
pub(crate) const CODEBOOK: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(BLOCK)) {
        decode_nibbles(read_f16(b, 0), &b[2..], y);
    }
}

/// Decodes 16 bytes of codebook indices (32 values) with scale `d`; IQ4_XS reuses it per sub-block.
#[inline]
pub(crate) fn decode_nibbles(d: f32, qs: &[u8], y: &mut [f32]) {
    let (lo, hi) = y.split_at_mut(BLOCK / 2);
    for ((&q, lo), hi) in qs[..16].iter().zip(lo).zip(hi) {
        *lo = d * CODEBOOK[(q & 0xF) as usize] as f32;
        *hi = d * CODEBOOK[(q >> 4) as usize] as f32;
    }
}

/// llama.cpp's `quantize_iq4_nl` (what llama-quantize runs): each block's scale is the best weighted
/// fit over 15 candidates, with weights `x²` or, given importance, [`scale_search::importance_weights`].
pub fn quantize(src: &[f32], dst: &mut [u8], importance: Option<&[f32]>) {
    for (i, (x, b)) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(BYTES)).enumerate() {
        let x: &[f32; BLOCK] = x.try_into().expect("chunks of 32");
        let sigma2 = scale_search::sum_of_squares(x) * (2.0 / BLOCK as f32);
        let importance = importance.map(|imp| &imp[i * BLOCK..][..BLOCK]);
        let d = fit_scale(x, &block_weights(x, importance, sigma2));
        write_f16(b, 0, d);
        encode_nibbles(x, if d != 0.0 { 1.0 / d } else { 0.0 }, &mut b[2..]);
    }
}

/// One 32-element block's weights: `x²` without importance, else the importance weights for `sigma2`.
pub(crate) fn block_weights(x: &[f32; BLOCK], importance: Option<&[f32]>, sigma2: f32) -> [f32; BLOCK] {
    let mut weights = [0f32; BLOCK];
    match importance {
        Some(importance) => scale_search::importance_weights(x, importance, sigma2, &mut weights),
        None => scale_search::square_weights(x, &mut weights),
    }
    weights
}

/// The block scale minimising Σw·(x − d·CODEBOOK[q])² over 15 trial scales around `max|x| / 127`
/// (llama.cpp's `quantize_row_iq4_nl_impl`, `ntry` 7); 0 for an all-zero block.
pub(crate) fn fit_scale(x: &[f32; BLOCK], weights: &[f32; BLOCK]) -> f32 {
    // ggml's starting scale, then its 15 trial scales.
    const TRIES: usize = 16;
    let max = signed_absmax(x);
    if max.abs() < 1e-15 {
        return 0.0;
    }
    let mut inverse_scales = [1.0 / (-max / CODEBOOK[0] as f32); TRIES];
    for (id, step) in inverse_scales[1..].iter_mut().zip(-7..=7) {
        *id = (step + CODEBOOK[0] as i32) as f32 / max;
    }
    // All tries are fitted at once, one vector lane each, so that their sums grow side by side instead
    // of each waiting on its own chain of additions (each still adds in element order, as ggml does).
    let (mut sumqx, mut sumq2) = ([0f32; TRIES], [0f32; TRIES]);
    for (&v, &w) in x.iter().zip(weights) {
        for t in 0..TRIES {
            let q = nearest_level(inverse_scales[t] * v);
            sumqx[t] += w * q * v;
            sumq2[t] += w * q * q;
        }
    }
    let mut d = scale_search::least_squares_scale(sumqx[0], sumq2[0]);
    let mut best = d * sumqx[0];
    for (&sumqx, &sumq2) in sumqx[1..].iter().zip(&sumq2[1..]) {
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Codebook indices of 32 values scaled by `id`, packed as [`decode_nibbles`] reads them.
pub(crate) fn encode_nibbles(x: &[f32], id: f32, qs: &mut [u8]) {
    let mut q = [0u8; BLOCK];
    for (q, &v) in q.iter_mut().zip(x) {
        let level = nearest_level(id * v);
        *q = LEVELS.iter().map(|&l| u8::from(l < level)).sum();
    }
    pack_nibbles(&q, qs);
}

/// The codebook entry nearest to `x`, as ggml's `best_index_int8` picks it: between the two entries
/// around `x`, the upper one unless `x` is strictly nearer the lower (compared in f32); NaN lands on
/// the last entry. Without branches (ggml's binary search mispredicts about every other step), so that
/// the scale search, which runs this 16 times per value, vectorises.
#[inline(always)]
fn nearest_level(x: f32) -> f32 {
    // The largest entry not above `x` (the first when none is) is the first plus the gaps below the
    // entries `x` reaches, the smallest entry above `x` (the last when none is) the first plus the gaps
    // above them. The sums are of small integers, so exact. NaN "reaches" every entry.
    let (mut lower, mut upper) = (LEVELS[0], LEVELS[0]);
    for i in 0..15 {
        let gap = LEVELS[i + 1] - LEVELS[i];
        upper += if x < LEVELS[i] { 0.0 } else { gap };
        lower += if x < LEVELS[i + 1] { 0.0 } else { gap };
    }
    if upper - x <= x - lower {
        upper
    } else {
        lower
    }
}

/// [`CODEBOOK`] as f32.
const LEVELS: [f32; 16] = {
    let mut levels = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        levels[i] = CODEBOOK[i] as f32;
        i += 1;
    }
    levels
};

/// The codebook under the block scale.
pub const GRID: BlockGrid = BlockGrid {
    levels: &LEVELS,
    affine: |b, scale, offset| {
        scale.fill(read_f16(b, 0));
        offset.fill(0.0);
    },
    read_codes: |b, codes| unpack_nibbles(&b[2..], codes),
    write_codes: |b, codes| pack_nibbles(block_codes(codes), &mut b[2..]),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::test_data::{
        assert_within, check_encoder, round_trip_row, skewed_importance_gain, symmetric_bound,
    };
    use crate::blocks::QK_K;
    use crate::ggml_type::GgmlType;
    use half::f16;
    use proptest::prelude::*;

    #[test]
    fn decodes_hand_built_block() {
        let levels = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
        let q: Vec<u8> = (0..32).map(|i| (i * 5 % 16) as u8).collect();
        let mut block = [0u8; BYTES];
        block[..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        for j in 0..16 {
            block[2 + j] = q[j] | q[j + 16] << 4;
        }
        let mut y = [0f32; BLOCK];
        dequantize(&block, &mut y);
        for i in 0..BLOCK {
            assert_eq!(y[i], 0.25 * levels[q[i] as usize] as f32, "element {i}");
        }
    }

    /// The index [`encode_nibbles`] stores for `x`.
    fn nearest_index(x: f32) -> usize {
        let mut qs = [0u8; 16];
        encode_nibbles(&[x; BLOCK], 1.0, &mut qs);
        (qs[0] & 0xF) as usize
    }

    #[test]
    fn nearest_index_picks_the_nearer_neighbour_and_the_upper_on_ties() {
        assert_eq!(nearest_index(-1000.0), 0);
        assert_eq!(nearest_index(-127.0), 0);
        assert_eq!(nearest_index(113.0), 15);
        assert_eq!(nearest_index(1000.0), 15);
        assert_eq!(nearest_index(f32::NAN), 15);
        for (i, pair) in LEVELS.windows(2).enumerate() {
            let (lo, hi) = (pair[0], pair[1]);
            let mid = (lo + hi) / 2.0;
            assert_eq!(nearest_index(lo), i, "entry {i}");
            assert_eq!(nearest_index(mid), i + 1, "midpoint above entry {i}");
            assert_eq!(nearest_index(mid - 0.01), i, "just below the midpoint above entry {i}");
            assert_eq!(nearest_index(mid + 0.01), i + 1, "just above the midpoint above entry {i}");
            assert_eq!(nearest_index(hi - 0.01), i + 1, "just below entry {}", i + 1);
        }
    }

    #[test]
    fn round_trip_stays_within_bound() {
        check_encoder(GgmlType::IQ4_NL, BLOCK, |g| symmetric_bound(g, 127.0 / 12.0));
    }

    #[test]
    fn importance_lowers_weighted_error() {
        let gain = skewed_importance_gain(GgmlType::IQ4_NL);
        assert!(gain < 0.25, "weighted error ratio {gain}");
    }

    proptest! {
        #[test]
        fn round_trip_bounded(
            x in prop::collection::vec(-6.0e4f32..6.0e4, QK_K..=QK_K),
            importance in prop::collection::vec(0.5f32..1.5, QK_K..=QK_K),
        ) {
            assert_within(&x, &round_trip_row(GgmlType::IQ4_NL, &x, None), BLOCK, |g| symmetric_bound(g, 127.0 / 12.0));
            let y = round_trip_row(GgmlType::IQ4_NL, &x, Some(&importance));
            assert_within(&x, &y, BLOCK, |g| symmetric_bound(g, 127.0 / 12.0));
        }
    }
}
