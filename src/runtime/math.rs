//! The elementwise loops of the forward pass and the scoring (softmax, SiLU, log-softmax), written so
//! the compiler vectorizes them, each with an AVX2 build (see `runtime::simd`).
//!
//! - [`exp`]: calling libm's `expf` once per element is slow twice over: the call keeps the loop
//!   scalar, and glibc's AVX-encoded `expf` returning into SSE-encoded code after faer's AVX-512
//!   kernels pays a register-state transition per call, which measured at tens of nanoseconds. This
//!   one inlines into the loop. It is Cephes' `expf`: `x = n·ln2 + r`, a polynomial for `e^r` (within
//!   about 1 ulp of the true value), and `2^n` built in the exponent bits.
//! - Reductions run over independent lanes, since a single running value forces the elements through
//!   one at a time.

use super::simd::avx2_dispatch;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split into a part exact in few bits and the remainder, so `n·ln2` subtracts without rounding.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `e^x` is under f32's smallest normal number and returns 0; above the next it overflows.
const MIN_ARG: f32 = -87.33;
const MAX_ARG: f32 = 88.72;
/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude below 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(MIN_ARG, MAX_ARG);
    let shifted = clamped * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `shifted`'s low mantissa bits hold n (its ulp is 1); taking it from the bits, not with `as i32`,
    // keeps the loop in vector registers.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < MIN_ARG {
        0.0
    } else if x > MAX_ARG {
        f32::INFINITY
    } else {
        e_r * two_n
    }
}

const LANES: usize = 16;

/// The largest element (`-∞` for an empty slice).
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The sum, accumulated in `T` (f32 or f64).
#[inline(always)]
fn sum<T: Copy + Default + std::ops::Add<Output = T> + From<f32>>(x: &[f32]) -> T {
    let mut lanes = [T::default(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s = *s + T::from(v);
        }
    }
    tail.iter().map(|&v| T::from(v)).chain(lanes).fold(T::default(), |a, b| a + b)
}

/// `Σ e^(x − shift)`, accumulated in f64.
#[inline(always)]
fn sum_exp(x: &[f32], shift: f32) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s += exp(v - shift) as f64;
        }
    }
    tail.iter().map(|&v| exp(v - shift) as f64).chain(lanes).sum()
}

avx2_dispatch! {
    /// `x ← softmax(x)`.
    pub fn softmax(x: &mut [f32]) = softmax_body;
}

#[inline(always)]
fn softmax_body(x: &mut [f32]) {
    let max = max(x);
    x.iter_mut().for_each(|v| *v = exp(*v - max));
    let inv = 1.0 / sum::<f32>(x);
    x.iter_mut().for_each(|v| *v *= inv);
}

avx2_dispatch! {
    /// The largest logit and `Σ e^(logit − max)` (in f64): what a log-softmax needs.
    pub fn softmax_normalizer(logits: &[f32]) -> (f32, f64) = softmax_normalizer_body;
}

#[inline(always)]
fn softmax_normalizer_body(logits: &[f32]) -> (f32, f64) {
    let max = max(logits);
    (max, sum_exp(logits, max))
}

avx2_dispatch! {
    /// `gate ← silu(gate) · up`, SwiGLU's gating.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) = silu_mul_body;
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, &u)| *g = *g / (1.0 + exp(-*g)) * u);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_two_ulps() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(((got as f64 - want) / want).abs() < 2.5e-7, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions_cover_every_element() {
        for n in [0, 1, 15, 16, 17, 100] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
            let want_max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), want_max, "n={n}");
            let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
            assert_eq!(sum::<f64>(&x), want_sum, "n={n}");
            assert_eq!(sum::<f32>(&x) as f64, want_sum, "n={n}");
            let want_sum_exp: f64 = x.iter().map(|&v| ((v - 3.0) as f64).exp()).sum();
            assert!((sum_exp(&x, 3.0) / want_sum_exp - 1.0).abs() < 1e-6 || n == 0, "n={n}");
        }
    }
}
