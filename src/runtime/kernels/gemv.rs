//! The few-token path (one to four tokens): each task takes a few weight rows and their dot products
//! with every input row at once.
//!
//! On CPUs with AVX-512 the common block formats (F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) are
//! decoded block by block straight into vector registers and multiplied there ([`avx512`]), so a
//! decoded weight is never stored; other formats are decoded a few rows at a time into a buffer that
//! stays in L1 and multiplied from there, also with AVX-512 FMA. Without AVX-512 both steps are
//! portable code. Every dot product runs in a fixed order, so results do not depend on the thread
//! count.

use std::cell::RefCell;

use formats::GgmlType;
use rayon::prelude::*;

use super::GgmlLinear;
use crate::runtime::simd::avx2_dispatch;

/// Tasks wanted per product: enough for work stealing to even out the threads, few enough that a
/// task's work (a few thousand weights at least) outweighs scheduling it.
const TASKS: usize = 16;
/// Fewest weight rows one task takes.
const MIN_CHUNK_ROWS: usize = 16;

thread_local! {
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How one weight row is multiplied with the input rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// Decode rows to an f32 buffer, then portable dot products.
    Portable,
    /// Decode rows to an f32 buffer, then AVX-512 dot products.
    #[cfg(target_arch = "x86_64")]
    DecodedAvx512,
    /// Decode each block into registers and multiply it there.
    #[cfg(target_arch = "x86_64")]
    FusedAvx512,
}

impl Kernel {
    /// Every kernel this CPU can run for `w`, the fastest first.
    pub(super) fn available(w: &GgmlLinear) -> Vec<Kernel> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if avx512::supported() {
            if avx512::fused(w.ty, w.cols).is_some() {
                kernels.push(Kernel::FusedAvx512);
            }
            kernels.push(Kernel::DecodedAvx512);
        }
        kernels.push(Kernel::Portable);
        kernels
    }
}

pub(super) fn gemv(w: &GgmlLinear, x: &[f32], n: usize, y: &mut [f32]) {
    gemv_with(w, x, n, y, Kernel::available(w)[0]);
}

/// [`gemv`] with `kernel`, which must be one of [`Kernel::available`]`(w)`.
pub(super) fn gemv_with(w: &GgmlLinear, x: &[f32], n: usize, y: &mut [f32], kernel: Kernel) {
    assert!(n <= MAX_TOKENS, "the few-token path takes at most {MAX_TOKENS} tokens");
    // Output transposed (`rows × n`) so each task owns a contiguous slice; `n` is small.
    let chunk_rows = w.rows.div_ceil(TASKS).max(MIN_CHUNK_ROWS);
    let mut yt = vec![0f32; w.rows * n];
    yt.par_chunks_mut(chunk_rows * n).enumerate().for_each(|(chunk, out)| {
        let rows = chunk * chunk_rows..chunk * chunk_rows + out.len() / n;
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::FusedAvx512 => {
                let dot = avx512::fused(w.ty, w.cols).expect("checked by Kernel::available");
                let data = &w.data[rows.start * w.row_bytes..rows.end * w.row_bytes];
                for (row, out) in data.chunks_exact(w.row_bytes).zip(out.chunks_exact_mut(n)) {
                    // SAFETY: `fused` returns kernels only on CPUs with the features they use.
                    unsafe { dot(row, x, out) };
                }
            }
            _ => ROWS.with_borrow_mut(|decoded| {
                decoded.resize(rows.len() * w.cols, 0.0);
                w.decode_rows(rows, decoded);
                for (row, out) in decoded.chunks_exact(w.cols).zip(out.chunks_exact_mut(n)) {
                    #[cfg(target_arch = "x86_64")]
                    if kernel == Kernel::DecodedAvx512 {
                        // SAFETY: `Kernel::available` offers this kernel only with AVX-512.
                        unsafe { avx512::dot_f32(row, x, out) };
                        continue;
                    }
                    for (o, xt) in out.iter_mut().zip(x.chunks_exact(w.cols)) {
                        *o = dot(row, xt);
                    }
                }
            }),
        }
    });
    for (r, yr) in yt.chunks_exact(n).enumerate() {
        for (t, &v) in yr.iter().enumerate() {
            y[t * w.rows + r] = v;
        }
    }
}

/// Input rows the path takes at most (larger batches take the GEMM path).
const MAX_TOKENS: usize = super::GEMM_MIN_ROWS - 1;

avx2_dispatch! {
    /// Dot product with independent partial sums, so the compiler can keep them in vector registers.
    fn dot(a: &[f32], b: &[f32]) -> f32 = dot_body;
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (ca, cb) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(p, q)| p * q).sum();
    acc.iter().sum::<f32>() + tail
}

/// The 16 levels of IQ4_NL's codebook, read from the type table's decoder (a block with scale 1
/// whose low nibbles count 0..16).
fn iq4_nl_levels() -> [f32; 16] {
    static LEVELS: std::sync::OnceLock<[f32; 16]> = std::sync::OnceLock::new();
    *LEVELS.get_or_init(|| {
        let mut block = [0u8; 18];
        block[..2].copy_from_slice(&0x3c00u16.to_le_bytes());
        (0..16).for_each(|j| block[2 + j] = j as u8);
        let mut values = [0f32; 32];
        GgmlType::IQ4_NL.dequantize(&block, &mut values).expect("one whole IQ4_NL block");
        std::array::from_fn(|j| values[j])
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use formats::GgmlType;

    use super::super::decode::f16_to_f32;
    use super::iq4_nl_levels;

    /// `out[t] = row · x[t]` for each of the `out.len()` input rows in `x`, `row` in its storage format.
    pub(super) type RowDot = unsafe fn(row: &[u8], x: &[f32], out: &mut [f32]);

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// The fused kernel for rows of `cols` elements of `ty`, if there is one and the CPU runs it.
    pub(super) fn fused(ty: GgmlType, cols: usize) -> Option<RowDot> {
        if !supported() {
            return None;
        }
        Some(match ty {
            GgmlType::F16 if cols.is_multiple_of(32) => row_dot::<F16>,
            GgmlType::Q8_0 => row_dot::<Q8_0>,
            GgmlType::Q4_0 => row_dot::<Q4_0>,
            GgmlType::Q4_1 => row_dot::<Q4_1>,
            GgmlType::Q5_0 => row_dot::<Q5_0>,
            GgmlType::Q5_1 => row_dot::<Q5_1>,
            GgmlType::IQ4_NL => {
                iq4_nl_levels();
                row_dot::<Iq4Nl>
            }
            _ => return None,
        })
    }

    /// A storage format whose blocks hold 32 values.
    trait Block {
        const BYTES: usize;
        /// The block's 32 values as two vectors.
        ///
        /// # Safety
        /// AVX-512F/BW are available and `b` points at `BYTES` readable bytes.
        unsafe fn values(b: *const u8) -> [__m512; 2];
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn f16_at(b: *const u8) -> __m512 {
        _mm512_set1_ps(f16_to_f32(u16::from_le_bytes([*b, *b.add(1)])))
    }

    /// 16 bytes of nibbles as two vectors of i32: the low nibbles, then the high ones.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn nibbles(q: *const u8) -> [__m512i; 2] {
        let q = _mm_loadu_si128(q.cast());
        let low = _mm_set1_epi8(0x0f);
        [_mm512_cvtepu8_epi32(_mm_and_si128(q, low)), _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(q), low))]
    }

    /// Q5 values: nibbles plus 16 where the value's bit of `qh` is set.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn q5_values(qh: *const u8, qs: *const u8) -> [__m512i; 2] {
        let high = u32::from_le_bytes([*qh, *qh.add(1), *qh.add(2), *qh.add(3)]);
        let [lo, hi] = nibbles(qs);
        let sixteen = _mm512_set1_epi32(16);
        [
            _mm512_mask_add_epi32(lo, high as u16, lo, sixteen),
            _mm512_mask_add_epi32(hi, (high >> 16) as u16, hi, sixteen),
        ]
    }

    struct F16;
    impl Block for F16 {
        const BYTES: usize = 64;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            [_mm512_cvtph_ps(_mm256_loadu_si256(b.cast())), _mm512_cvtph_ps(_mm256_loadu_si256(b.add(32).cast()))]
        }
    }

    struct Q8_0;
    impl Block for Q8_0 {
        const BYTES: usize = 34;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            let d = f16_at(b);
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2).cast())));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(18).cast())));
            [_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d)]
        }
    }

    struct Q4_0;
    impl Block for Q4_0 {
        const BYTES: usize = 18;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            let d = f16_at(b);
            let eight = _mm512_set1_epi32(8);
            let [lo, hi] = nibbles(b.add(2));
            [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, eight)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, eight)), d),
            ]
        }
    }

    struct Q4_1;
    impl Block for Q4_1 {
        const BYTES: usize = 20;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            let (d, m) = (f16_at(b), f16_at(b.add(2)));
            let [lo, hi] = nibbles(b.add(4));
            [_mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m), _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m)]
        }
    }

    struct Q5_0;
    impl Block for Q5_0 {
        const BYTES: usize = 22;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            let d = f16_at(b);
            let sixteen = _mm512_set1_epi32(16);
            let [lo, hi] = q5_values(b.add(2), b.add(6));
            [
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, sixteen)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, sixteen)), d),
            ]
        }
    }

    struct Q5_1;
    impl Block for Q5_1 {
        const BYTES: usize = 24;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            let (d, m) = (f16_at(b), f16_at(b.add(2)));
            let [lo, hi] = q5_values(b.add(4), b.add(8));
            [_mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d, m), _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d, m)]
        }
    }

    struct Iq4Nl;
    impl Block for Iq4Nl {
        const BYTES: usize = 18;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8) -> [__m512; 2] {
            let d = f16_at(b);
            let levels = _mm512_loadu_ps(iq4_nl_levels().as_ptr());
            nibbles(b.add(2)).map(|q| _mm512_mul_ps(_mm512_permutexvar_ps(q, levels), d))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn row_dot<B: Block>(row: &[u8], x: &[f32], out: &mut [f32]) {
        match out.len() {
            1 => row_dot_n::<B, 1>(row, x, out),
            2 => row_dot_n::<B, 2>(row, x, out),
            3 => row_dot_n::<B, 3>(row, x, out),
            _ => row_dot_n::<B, 4>(row, x, out),
        }
    }

    /// Two accumulators per input row (one per half block), so consecutive blocks do not wait on
    /// each other's additions.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn row_dot_n<B: Block, const N: usize>(row: &[u8], x: &[f32], out: &mut [f32]) {
        let blocks = row.len() / B::BYTES;
        let cols = blocks * 32;
        assert!(out.len() == N && x.len() >= N * cols);
        let mut acc = [[_mm512_setzero_ps(); 2]; N];
        for b in 0..blocks {
            let [lo, hi] = B::values(row.as_ptr().add(b * B::BYTES));
            for (t, acc) in acc.iter_mut().enumerate() {
                let xt = x.as_ptr().add(t * cols + b * 32);
                acc[0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xt), acc[0]);
                acc[1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xt.add(16)), acc[1]);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        }
    }

    /// `out[t] = row · x[t]` for an f32 row of any length (the last vector masked).
    ///
    /// # Safety
    /// AVX-512F is available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_f32(row: &[f32], x: &[f32], out: &mut [f32]) {
        let cols = row.len();
        assert!(x.len() >= out.len() * cols);
        for (t, o) in out.iter_mut().enumerate() {
            let xt = &x[t * cols..(t + 1) * cols];
            let mut acc = [_mm512_setzero_ps(); 2];
            for (i, k) in (0..cols).step_by(16).enumerate() {
                let mask = (((1u32 << (cols - k).min(16)) - 1) & 0xffff) as __mmask16;
                let (a, b) =
                    (_mm512_maskz_loadu_ps(mask, row[k..].as_ptr()), _mm512_maskz_loadu_ps(mask, xt[k..].as_ptr()));
                acc[i % 2] = _mm512_fmadd_ps(a, b, acc[i % 2]);
            }
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        }
    }
}
