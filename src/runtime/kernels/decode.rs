//! Fast row decoders for the storage types perplexity runs spend their time in.
//!
//! The type table's decoders (`formats::blocks`) are the portable references; these compute the same
//! values with the same arithmetic in the same order, so their output is bit-identical (the tests
//! check it on random blocks), only faster:
//! - f16 scales are converted inline, in integer operations: a function call per block from
//!   SSE-encoded code into an F16C function also pays a register-state transition after faer's
//!   AVX-512 kernels, and together they cost more than the block's arithmetic;
//! - each block's values are unpacked into a fixed-size array first, so the compiler vectorizes
//!   within the block instead of gathering bytes across blocks;
//! - each decoder also has an AVX2 build (see `runtime::simd`).
//!
//! Other types decode through the table.

use formats::ggml_type::DequantizeFn;
use formats::GgmlType;

use crate::runtime::simd::avx2_dispatch;

/// The decoder `GgmlLinear` uses for `ty`, if the type table has one.
pub(super) fn decoder(ty: GgmlType) -> Option<DequantizeFn> {
    Some(match ty {
        GgmlType::F16 => f16,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        _ => return ty.traits().dequantize,
    })
}

// Without an explicit `mul_add` Rust never fuses a multiply and an add, so both builds of each
// decoder round identically.
avx2_dispatch!(fn f16(src: &[u8], dst: &mut [f32]) = f16_body;);
avx2_dispatch!(fn q8_0(src: &[u8], dst: &mut [f32]) = q8_0_body;);
avx2_dispatch!(fn q4_0(src: &[u8], dst: &mut [f32]) = q4_0_body;);
avx2_dispatch!(fn q4_1(src: &[u8], dst: &mut [f32]) = q4_1_body;);
avx2_dispatch!(fn q5_0(src: &[u8], dst: &mut [f32]) = q5_0_body;);
avx2_dispatch!(fn q5_1(src: &[u8], dst: &mut [f32]) = q5_1_body;);

/// IEEE half to single precision, exactly (subnormals, infinities and NaN included), in integer
/// operations and one exact integer-to-float conversion, so no subnormal f32 ever enters arithmetic
/// (which costs a microcode assist on x86).
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exponent = h & 0x7c00;
    let mantissa = h & 0x03ff;
    // Normal: rebias the exponent from 15 to 127 (add 112) and widen the mantissa.
    let normal = ((h & 0x7fff) << 13) + (112 << 23);
    // Subnormal (and zero): mantissa · 2^-24.
    let subnormal = (mantissa as f32 * f32::from_bits(0x3380_0000)).to_bits();
    let infinite_or_nan = 0x7f80_0000 | (mantissa << 13);
    let bits = if exponent == 0 {
        subnormal
    } else if exponent == 0x7c00 {
        infinite_or_nan
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline(always)]
fn f16_body(src: &[u8], dst: &mut [f32]) {
    for (y, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *y = f16_at(b, 0);
    }
}

#[inline(always)]
fn q8_0_body(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..34]) {
            *y = q as i8 as f32 * d;
        }
    }
}

/// The 32 values of a block whose 16 bytes hold them as nibbles: low nibbles first, then high ones.
#[inline(always)]
fn nibbles(qs: &[u8]) -> [u8; 32] {
    std::array::from_fn(|j| if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 })
}

#[inline(always)]
fn q4_0_body(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (y, q) in y.iter_mut().zip(nibbles(&b[2..18])) {
            *y = (q as i32 - 8) as f32 * d;
        }
    }
}

#[inline(always)]
fn q4_1_body(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (y, q) in y.iter_mut().zip(nibbles(&b[4..20])) {
            *y = q as f32 * d + m;
        }
    }
}

/// The 5-bit values of a Q5 block: nibbles as in Q4, bit 4 of value `j` is bit `j` of `qh`.
#[inline(always)]
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = nibbles(qs);
    for (j, q) in q.iter_mut().enumerate() {
        *q |= (((high >> j) & 1) as u8) << 4;
    }
    q
}

#[inline(always)]
fn q5_0_body(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (y, q) in y.iter_mut().zip(q5_values(&b[2..6], &b[6..22])) {
            *y = (q as i32 - 16) as f32 * d;
        }
    }
}

#[inline(always)]
fn q5_1_body(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (y, q) in y.iter_mut().zip(q5_values(&b[4..8], &b[8..24])) {
            *y = q as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_to_f32(h), f16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }

    #[test]
    fn fast_decoders_match_the_type_table_bit_for_bit() {
        let mut state = 0x1234_5678_9abc_def0u64;
        for ty in GgmlType::all().filter(|t| t.traits().dequantize.is_some()) {
            let fast = decoder(ty).unwrap();
            let blocks = 257;
            let src: Vec<u8> = (0..blocks * ty.type_size())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let mut want = vec![0f32; blocks * ty.block_size()];
            ty.dequantize(&src, &mut want).unwrap();
            // The dispatched decoder (the AVX2 build on CPUs that have it) and the baseline build.
            let baseline: DequantizeFn = match ty {
                GgmlType::F16 => f16_body,
                GgmlType::Q8_0 => q8_0_body,
                GgmlType::Q4_0 => q4_0_body,
                GgmlType::Q4_1 => q4_1_body,
                GgmlType::Q5_0 => q5_0_body,
                GgmlType::Q5_1 => q5_1_body,
                _ => fast,
            };
            for (build, decode) in [("dispatched", fast), ("baseline", baseline)] {
                let mut got = vec![0f32; want.len()];
                decode(&src, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let same = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
                    assert!(same, "{ty} ({build}) element {i}: {g} vs {w}");
                }
            }
        }
    }
}
