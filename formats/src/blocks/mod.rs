//! Block codecs, one module per GGML format. The type table in [`crate::ggml_type`] points here.
//!
//! Decoders take whole blocks and write `block_size` f32 values per block; encoders do the reverse.
//! These are the portable reference implementations: the runtime's SIMD kernels are tested against them.

pub mod float;
pub mod grid;
pub mod iq4_nl;
pub mod iq4_xs;
pub mod q2_k;
pub mod q3_k;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod q8_k;
mod scale_search;

use half::f16;

/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

#[inline]
pub(crate) fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[inline]
pub(crate) fn write_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// ggml's `nearest_int`: rounds half to even by adding 1.5·2²³ so the integer lands in the mantissa.
/// Encoders use it (not `f32::round`) wherever llama.cpp does, because ties round differently.
/// Meaningful for |x| < 2²²; larger or non-finite inputs give an arbitrary value that callers clamp.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The element of largest magnitude, sign kept (the first one on ties), as llama.cpp's symmetric
/// encoders pick it: it maps to the most negative level.
#[inline]
pub(crate) fn signed_absmax(x: &[f32]) -> f32 {
    // llama.cpp keeps the element whenever `amax < |v|`: the first of the largest magnitude, NaN never.
    // Found in two passes (the magnitude over eight lanes, then its first holder) instead of one loop
    // whose branch mispredicts at every new maximum.
    let step = |m: f32, v: &f32| if v.abs() > m { v.abs() } else { m };
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(0.0, step);
    for chunk in chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = step(*m, v);
        }
    }
    let amax = lanes.iter().fold(rest, step);
    if amax == 0.0 {
        return 0.0;
    }
    x.iter().find(|v| v.abs() == amax).copied().unwrap_or(0.0)
}

/// The largest value, or 0 when none is positive: the largest sub-block scale (or min) of the K-quants,
/// which their encoders track from 0 up.
#[inline]
pub(crate) fn positive_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |max, &v| if v > max { v } else { max })
}

/// Block minimum and maximum, compared as llama.cpp does (NaN never replaces a bound).
#[inline]
pub(crate) fn min_max(x: &[f32]) -> (f32, f32) {
    let step = |(lo, hi): (f32, f32), &v: &f32| (if v < lo { v } else { lo }, if v > hi { v } else { hi });
    // The bounds do not depend on the order (NaN is skipped either way), so eight lanes run side by
    // side instead of one chain of comparisons.
    let (mut lo, mut hi) = ([f32::MAX; 8], [-f32::MAX; 8]);
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder().iter().fold((f32::MAX, -f32::MAX), step);
    for chunk in chunks {
        for ((lo, hi), &v) in lo.iter_mut().zip(&mut hi).zip(chunk) {
            *lo = if v < *lo { v } else { *lo };
            *hi = if v > *hi { v } else { *hi };
        }
    }
    lo.iter().zip(&hi).fold(rest, |bounds, (&l, &h)| step(step(bounds, &l), &h))
}

/// Converts a float to a byte the way llama.cpp's C casts `(int8_t)x` / `(uint8_t)x` compile on x86
/// (truncate to a 32-bit integer, keep the low byte; NaN and out-of-range give 0). Only blocks whose
/// scale underflows to zero — so every element decodes to 0 anyway — reach such inputs, but matching
/// the C conversion keeps encoded bytes identical to llama.cpp's and gguf-py's there too.
#[inline]
pub(crate) fn c_cast_to_byte(x: f32) -> u8 {
    if x.abs() < 2_147_483_648.0 {
        x as i32 as u8
    } else {
        0
    }
}

/// Packs 32 values below 16 the way the 32-element formats store them: byte `j` holds value `j` in its
/// low nibble and value `j + 16` in its high nibble.
#[inline]
pub(crate) fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0xF) | (q[j + 16] << 4);
    }
}

/// Packs 32 five-bit values as Q5_0/Q5_1 store them: low nibbles as [`pack_nibbles`], bit 4 of value `j`
/// at bit `j` of the little-endian `u32` in `qh`.
#[inline]
pub(crate) fn pack_q5(q: &[u8; 32], qh: &mut [u8], qs: &mut [u8]) {
    pack_nibbles(q, qs);
    let high = q.iter().enumerate().fold(0u32, |acc, (j, &v)| acc | (u32::from(v >> 4) & 1) << j);
    qh[..4].copy_from_slice(&high.to_le_bytes());
}

/// Inverse of [`pack_q5`].
#[inline]
pub(crate) fn unpack_q5(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | (((high >> j) & 1) << 4) as u8;
        q[j + 16] = (qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4) as u8;
    }
    q
}

/// The 6-bit (scale, min) pair of sub-block `j` (0..8) from the 12 packed bytes of Q4_K and Q5_K:
/// sub-blocks 0–3 keep both in the low 6 bits of bytes `j` and `j+4`; sub-blocks 4–7 keep their low
/// 4 bits in the nibbles of byte `j+4` and their top 2 bits in the spare top bits of bytes `j-4` and `j`.
#[inline]
pub(crate) fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// Inverse of [`scale_min_k4`]: packs eight 6-bit (scale, min) pairs into Q4_K's and Q5_K's 12 bytes.
pub(crate) fn pack_scale_min_k4(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let (sc, m) = (scales[j] & 63, mins[j] & 63);
        if j < 4 {
            packed[j] |= sc;
            packed[j + 4] |= m;
        } else {
            packed[j + 4] = (sc & 0xF) | (m & 0xF) << 4;
            packed[j - 4] |= (sc >> 4) << 6;
            packed[j] |= (m >> 4) << 6;
        }
    }
    packed
}

/// Inverse of [`pack_2bit`].
pub(crate) fn unpack_2bit(packed: &[u8], values: &mut [u8]) {
    for (half, bytes) in values.chunks_exact_mut(128).zip(packed.chunks_exact(32)) {
        for (l, &byte) in bytes.iter().enumerate() {
            for k in 0..4 {
                half[l + 32 * k] = (byte >> (2 * k)) & 3;
            }
        }
    }
}

/// Packs 256 values below 4 as the K-quants store 2-bit fields: within each 128-element half, byte `l`
/// of its 32 bytes holds elements `l`, `l + 32`, `l + 64`, `l + 96` in bit pairs 0–1, 2–3, 4–5, 6–7.
pub(crate) fn pack_2bit(values: &[u8; QK_K], packed: &mut [u8]) {
    for (half, out) in values.chunks_exact(128).zip(packed.chunks_exact_mut(32)) {
        for (l, byte) in out.iter_mut().enumerate() {
            *byte = half[l] | half[l + 32] << 2 | half[l + 64] << 4 | half[l + 96] << 6;
        }
    }
}

/// Levels for a sub-block whose (already rounded) scale is settled: `nearest_int((x + offset) / d)`
/// clamped to `lo..=hi` and stored minus `lo`, so that `x ≈ d·(stored + lo) − offset`. The K-quant
/// encoders finish with this, as llama.cpp's do, so that levels match the scales actually stored.
#[inline]
pub(crate) fn requantize(x: &[f32], d: f32, offset: f32, (lo, hi): (i32, i32), levels: &mut [u8]) {
    for (out, &v) in levels.iter_mut().zip(x) {
        *out = (nearest_int((v + offset) / d).clamp(lo, hi) - lo) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ggml_type::GgmlType;
    use test_data::Rng;

    #[test]
    fn decoders_handle_consecutive_blocks_independently() {
        let mut rng = Rng::new(99);
        for ty in GgmlType::all().filter(|t| t.traits().dequantize.is_some()) {
            let (bs, ts) = (ty.block_size(), ty.type_size());
            let bytes: Vec<u8> = (0..3 * ts).map(|_| rng.next_u64() as u8).collect();
            let mut whole = vec![0f32; 3 * bs];
            ty.dequantize(&bytes, &mut whole).unwrap();
            for (i, block) in bytes.chunks(ts).enumerate() {
                let mut one = vec![0f32; bs];
                ty.dequantize(block, &mut one).unwrap();
                let same = one.iter().zip(&whole[i * bs..]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty} block {i}");
            }
        }
    }

    #[test]
    fn encoders_survive_non_finite_input() {
        // One row of a whole number of blocks for every type; every block sees a non-finite value.
        let mut x = vec![1.0f32; QK_K];
        for (i, v) in x.iter_mut().enumerate().step_by(13) {
            *v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
        }
        let mut all_nan = vec![f32::NAN; QK_K];
        all_nan[7] = 2.0;
        for ty in GgmlType::all().filter(|t| t.traits().quantize.is_some()) {
            let quantize = ty.traits().quantize.unwrap();
            let mut bytes = vec![0u8; ty.row_bytes(QK_K as u64).unwrap() as usize];
            for x in [&x, &all_nan] {
                quantize(x, &mut bytes, None);
                quantize(x, &mut bytes, Some(&[1.0; QK_K]));
                quantize(x, &mut bytes, Some(&[0.0; QK_K]));
                quantize(x, &mut bytes, Some(&[f32::NAN; QK_K]));
            }
        }
    }

    /// The bytes llama.cpp's `quantize_<type>` writes for [`test_data::reference_rows`], one 512-element
    /// row per call: FNV-1a of the output without and with the importance values. Taken from
    /// ggml-quants.c as of llama.cpp commit 01243c58, compiled with `-O2 -ffp-contract=off` (without
    /// that flag compilers fuse multiply-adds and round differently).
    #[test]
    fn encoders_match_llama_cpp_bytes() {
        use GgmlType::*;
        let (x, importance) = test_data::reference_rows();
        for (ty, plain, weighted) in [
            (Q4_0, 0x91d99ba8db3eb586, 0x0c3ea063ff150ee5),
            (Q4_1, 0xd9e65f87480401a4, 0x8548fded2ad4e10a),
            (Q5_0, 0x75197838ee1c1e26, 0x18f1a80cda46a5d8),
            (Q5_1, 0xfdc590ea684451f2, 0x643101c27773a178),
            (Q8_0, 0xe73a92bd891ec637, 0xe73a92bd891ec637),
            (Q2_K, 0x5e44369e0735ed15, 0x2ff422f856a5c783),
            (Q3_K, 0x4b16420c6c99f6b6, 0xdbe62ea179d8d8d5),
            (Q4_K, 0x0e104fe5f2cecc42, 0x7a8954ef62183ad8),
            (Q5_K, 0x14965e30cb07f6ab, 0x43ff47bf58565727),
            (Q6_K, 0x465bb0dceeb2e2eb, 0xba8cb79f5b275335),
            (IQ4_NL, 0x2c113530449f7040, 0xec50e773561f5885),
            (IQ4_XS, 0x7c4cd5341d364025, 0xf27c33bc42291d2c),
        ] {
            let quantize = ty.traits().quantize.unwrap();
            let row_bytes = ty.row_bytes(512).unwrap() as usize;
            let mut bytes = vec![0u8; x.len() / 512 * row_bytes];
            for (mode, expected, importance) in [("plain", plain, None), ("importance", weighted, Some(&importance))] {
                for (r, out) in bytes.chunks_exact_mut(row_bytes).enumerate() {
                    let row = r * 512..(r + 1) * 512;
                    quantize(&x[row.clone()], out, importance.map(|imp| &imp[row]));
                }
                assert_eq!(test_data::fnv1a(&bytes), expected, "{ty} ({mode}) differs from llama.cpp");
            }
        }
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let scales: [u8; 8] = std::array::from_fn(|j| 63 - 9 * j as u8);
        let mins: [u8; 8] = std::array::from_fn(|j| 5 + 8 * j as u8);
        let packed = pack_scale_min_k4(&scales, &mins);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (scales[j], mins[j]), "sub-block {j}");
        }
    }

    #[test]
    fn two_bit_packing_places_each_element() {
        for e in [0, 31, 32, 95, 127, 128, 200, 255] {
            let mut values = [0u8; QK_K];
            values[e] = 3;
            let mut packed = [0u8; 64];
            pack_2bit(&values, &mut packed);
            let byte = 32 * (e / 128) + e % 32;
            let shift = 2 * (e % 128 / 32);
            for (i, &b) in packed.iter().enumerate() {
                assert_eq!(b, if i == byte { 3 << shift } else { 0 }, "element {e}, byte {i}");
            }
        }
    }

    #[test]
    fn signed_absmax_keeps_the_first_largest_magnitude() {
        assert_eq!(signed_absmax(&[1.0, -3.0, 3.0, 2.0]), -3.0);
        assert_eq!(signed_absmax(&[1.0, 3.0, -3.0, 2.0]), 3.0);
        assert_eq!(signed_absmax(&[f32::NAN, -0.5, 0.25, f32::NAN]), -0.5);
        assert_eq!(signed_absmax(&[f32::NAN; 3]), 0.0);
        assert_eq!(signed_absmax(&[-0.0, 0.0]).to_bits(), 0.0f32.to_bits());
        assert_eq!(signed_absmax(&[]), 0.0);
        let mut x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 41) as f32 - 20.0).collect();
        x[30] = -25.0;
        x[35] = 25.0;
        assert_eq!(signed_absmax(&x), -25.0);
        x[3] = f32::NEG_INFINITY;
        assert_eq!(signed_absmax(&x), f32::NEG_INFINITY);
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        for (x, n) in [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (3.49, 3), (-7.6, -8), (0.0, 0)] {
            assert_eq!(nearest_int(x), n, "{x}");
        }
    }

    #[test]
    fn c_cast_truncates_and_zeroes_out_of_range() {
        assert_eq!(c_cast_to_byte(15.9), 15);
        assert_eq!(c_cast_to_byte(-1.5), 255);
        assert_eq!(c_cast_to_byte(300.0), 44);
        assert_eq!(c_cast_to_byte(f32::INFINITY), 0);
        assert_eq!(c_cast_to_byte(f32::NAN), 0);
    }

    #[test]
    fn q5_packing_round_trips() {
        let q: [u8; 32] = std::array::from_fn(|i| (i as u8 * 7 + 3) % 32);
        let mut block = [0u8; 20];
        let (qh, qs) = block.split_at_mut(4);
        pack_q5(&q, qh, qs);
        assert_eq!(u32::from_le_bytes([block[0], block[1], block[2], block[3]]).count_ones(), 16);
        assert_eq!(unpack_q5(&block[..4], &block[4..]), q);
    }

    #[test]
    fn k4_scales_unpack_all_six_bits() {
        // Sub-block j gets scale 63 - j and min j + 32, packed by hand.
        let mut packed = [0u8; 12];
        for j in 0..8u8 {
            let (sc, m) = (63 - j, j + 32);
            let j = j as usize;
            if j < 4 {
                packed[j] = sc;
                packed[j + 4] = m;
            } else {
                packed[j + 4] = (sc & 0xF) | (m & 0xF) << 4;
                packed[j - 4] |= (sc >> 4) << 6;
                packed[j] |= (m >> 4) << 6;
            }
        }
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &packed), (63 - j as u8, j as u8 + 32), "sub-block {j}");
        }
    }
}

/// Deterministic test data shared by the codec tests (no `rand` dependency).
#[cfg(test)]
pub(crate) mod test_data {
    use crate::ggml_type::{DequantizeFn, GgmlType, QuantizeFn};

    /// Encodes `x` (whole 32-element blocks of `block_bytes` each) and decodes it again.
    pub fn round_trip(
        codec: (QuantizeFn, DequantizeFn),
        block_bytes: usize,
        x: &[f32],
        importance: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut bytes = vec![0u8; x.len() / 32 * block_bytes];
        codec.0(x, &mut bytes, importance);
        let mut y = vec![0f32; x.len()];
        codec.1(&bytes, &mut y);
        y
    }

    /// Encodes one row as `ty` (through the type table) and decodes it again.
    pub fn round_trip_row(ty: GgmlType, x: &[f32], importance: Option<&[f32]>) -> Vec<f32> {
        let row_bytes = ty.row_bytes(x.len() as u64).expect("whole blocks");
        let mut bytes = vec![0u8; row_bytes as usize];
        let quantize = ty.traits().quantize.expect("type has an encoder");
        quantize(x, &mut bytes, importance);
        let mut y = vec![0f32; x.len()];
        ty.dequantize(&bytes, &mut y).expect("decodes");
        y
    }

    /// What f16 scales cannot do better than: their relative rounding (2⁻¹¹, doubled for the product
    /// of a scale and a sub-scale) and their smallest step, times the largest level multiplier (< 2¹²).
    fn f16_slack(max_abs: f32) -> f32 {
        max_abs * 2f32.powi(-9) + 2f32.powi(-24) * 4096.0
    }

    /// Bound for affine formats with levels `0..=nmax`: two level steps of the group's range (including
    /// 0, since the offset is never positive). The fit may trade a little range for precision and the
    /// sub-block scales are themselves quantized, so half a step is not guaranteed.
    pub fn affine_bound(group: &[f32], nmax: f32) -> f32 {
        let lo = group.iter().fold(0f32, |m, &v| m.min(v));
        let hi = group.iter().fold(0f32, |m, &v| m.max(v));
        2.0 * (hi - lo) / nmax + f16_slack(hi.max(-lo))
    }

    /// Bound for symmetric formats whose largest magnitude maps to `levels` steps: two steps.
    pub fn symmetric_bound(group: &[f32], levels: f32) -> f32 {
        let max_abs = group.iter().fold(0f32, |m, &v| m.max(v.abs()));
        2.0 * max_abs / levels + f16_slack(max_abs)
    }

    /// Every element of each `group`-element group of `x` decodes within `bound(group)`.
    pub fn assert_within(x: &[f32], y: &[f32], group: usize, bound: impl Fn(&[f32]) -> f32) {
        for (g, (xg, yg)) in x.chunks(group).zip(y.chunks(group)).enumerate() {
            let limit = bound(xg);
            for (i, (a, b)) in xg.iter().zip(yg).enumerate() {
                assert!((a - b).abs() <= limit, "group {g} element {i}: {a} -> {b}, bound {limit}");
            }
        }
    }

    /// Rows every encoder is checked on: random rows with varied block magnitudes and the adversarial
    /// rows, each paired with a mild random importance (the bounds assume no element is ignored).
    pub fn encoder_test_rows(n: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        let mut rng = Rng::new(n as u64);
        let mut rows: Vec<Vec<f32>> = (0..8).map(|_| rng.row(n)).collect();
        rows.extend(adversarial_rows(n));
        rows.into_iter()
            .map(|row| {
                let importance = (0..n).map(|_| 1.0 + 0.5 * rng.unit()).collect();
                (row, importance)
            })
            .collect()
    }

    /// Round-trips [`encoder_test_rows`] with and without importance and checks each `group`-element
    /// group against `bound`.
    pub fn check_encoder(ty: GgmlType, group: usize, bound: impl Fn(&[f32]) -> f32) {
        for (row, importance) in encoder_test_rows(1024) {
            assert_within(&row, &round_trip_row(ty, &row, None), group, &bound);
            assert_within(&row, &round_trip_row(ty, &row, Some(&importance)), group, &bound);
        }
    }

    /// Weighted error with [`skewed_importance`] given to the encoder, as a fraction of the same error
    /// when the encoder ignores importance.
    pub fn skewed_importance_gain(ty: GgmlType) -> f32 {
        let x = Rng::new(42).row(2048);
        let importance = skewed_importance(x.len());
        let plain = weighted_sse(&x, &round_trip_row(ty, &x, None), &importance);
        let weighted = weighted_sse(&x, &round_trip_row(ty, &x, Some(&importance)), &importance);
        weighted / plain
    }

    /// FNV-1a, to compare long encoder outputs with reference outputs.
    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    /// The input of the llama.cpp comparison: 6 rows of 512 with varied block magnitudes and a skewed
    /// importance per element, plus the cases where llama.cpp once wrote NaN scales: an outlier, a
    /// super-block of denormals, one of values so small that `63 / max` overflows, and a super-block
    /// without importance.
    pub fn reference_rows() -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(2024);
        let mut x = rng.row(6 * 512);
        x[700] = 300.0;
        for (i, v) in x[4 * 512..4 * 512 + 256].iter_mut().enumerate() {
            *v = if i % 3 == 0 { 1.0e-40 } else { -3.0e-39 };
        }
        for v in &mut x[5 * 512..5 * 512 + 256] {
            *v *= 1.0e-36;
        }
        let mut importance: Vec<f32> = (0..x.len()).map(|_| (rng.unit() + 1.0).powi(4)).collect();
        importance[3 * 512 + 256..4 * 512].fill(0.0);
        (x, importance)
    }

    /// Decoded values match the expected ones up to f32 rounding (checks layout, not operation order).
    pub fn assert_close(decoded: &[f32], expected: &[f32]) {
        assert_eq!(decoded.len(), expected.len());
        for (i, (a, b)) in decoded.iter().zip(expected).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs() + 1e-6, "element {i}: decoded {a}, expected {b}");
        }
    }

    /// Σ w·(x − y)², the error the importance-weighted encoders minimise.
    pub fn weighted_sse(x: &[f32], y: &[f32], w: &[f32]) -> f32 {
        x.iter().zip(y).zip(w).map(|((a, b), w)| w * (a - b) * (a - b)).sum()
    }

    /// Importance concentrated on one element per 32-element block (a different one in each block).
    pub fn skewed_importance(n: usize) -> Vec<f32> {
        let mut importance = vec![1e-4f32; n];
        for i in (0..n).step_by(32) {
            importance[i + (i / 32 * 5) % 32] = 1.0;
        }
        importance
    }

    /// xorshift64* — enough for reproducible test rows.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in [-1, 1).
        pub fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        /// A row of `n` values with varied magnitudes per block, like real weights.
        pub fn row(&mut self, n: usize) -> Vec<f32> {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let magnitude = 10f32.powf(self.unit() * 3.0);
                for _ in 0..32 {
                    out.push(self.unit() * magnitude);
                }
            }
            out.truncate(n);
            out
        }
    }

    /// Rows no encoder may mishandle: zeros, a lone outlier, tiny (subnormal-scale) values, mixed signs.
    pub fn adversarial_rows(n: usize) -> Vec<Vec<f32>> {
        let mut rows = vec![vec![0.0; n]];
        let mut outlier = vec![0.001; n];
        outlier[n / 3] = -6.0e4;
        rows.push(outlier);
        rows.push((0..n).map(|i| if i % 2 == 0 { 1.0e-40 } else { -3.0e-39 }).collect());
        rows.push((0..n).map(|i| 1.0e-6 * (i as f32 - n as f32 / 2.0)).collect());
        rows.push(vec![-2.5; n]);
        rows.push((0..n).map(|i| (i % 7) as f32 - 3.0).collect());
        rows
    }
}
