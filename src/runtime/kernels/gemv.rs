//! The few-token path (one to four tokens): each task takes a block of weight rows and their dot
//! products with every input row.
//!
//! On CPUs with AVX-512 the common block formats (F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K,
//! IQ4_NL) are decoded block by block straight into vector registers and multiplied there
//! ([`avx512`]), several rows at once so each load of the input serves them all and enough weight
//! loads are in flight; a decoded weight is never stored. Other formats are decoded a few rows at a
//! time into a buffer that stays in L1 and multiplied from there, also with AVX-512 FMA. Without
//! AVX-512 both steps are portable code. Every dot product runs in a fixed order, so results do not
//! depend on the thread count.

use std::cell::RefCell;

use formats::GgmlType;
use rayon::prelude::*;

use super::GgmlLinear;
use crate::runtime::simd::avx2_dispatch;

/// Tasks wanted per product: enough for work stealing to even out the threads, few enough that a
/// task's work outweighs scheduling it.
const TASKS: usize = 16;
/// Fewest weights one task multiplies (a few microseconds of work).
const MIN_TASK_WEIGHTS: usize = 1 << 15;

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
    assert!(x.len() == n * w.cols && y.len() == n * w.rows, "activation shapes do not match the weights");
    if n == 1 {
        return products(w, x, 1, y, kernel);
    }
    // Output transposed (`rows × n`) so each task owns a contiguous slice; `n` is small.
    let mut yt = vec![0f32; w.rows * n];
    products(w, x, n, &mut yt, kernel);
    for (r, yr) in yt.chunks_exact(n).enumerate() {
        for (t, &v) in yr.iter().enumerate() {
            y[t * w.rows + r] = v;
        }
    }
}

/// `yt = W · xᵀ` (`rows × n`), in parallel over blocks of rows.
fn products(w: &GgmlLinear, x: &[f32], n: usize, yt: &mut [f32], kernel: Kernel) {
    let chunk_rows = w.rows.div_ceil(TASKS).max(MIN_TASK_WEIGHTS.div_ceil(w.cols));
    yt.par_chunks_mut(chunk_rows * n).enumerate().for_each(|(chunk, out)| {
        let rows = chunk * chunk_rows..chunk * chunk_rows + out.len() / n;
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::FusedAvx512 => {
                let dot = avx512::fused(w.ty, w.cols).expect("checked by Kernel::available");
                let data = &w.data[rows.start * w.row_bytes..rows.end * w.row_bytes];
                // SAFETY: `fused` returns kernels only on CPUs with the features they use.
                unsafe { dot(data, w.row_bytes, x, n, out) };
            }
            _ => ROWS.with_borrow_mut(|decoded| {
                // A few rows at a time, so the decoded rows are still in L1 when the products read them.
                for (first, out) in rows.clone().step_by(DECODED_ROWS).zip(out.chunks_mut(DECODED_ROWS * n)) {
                    let rows = first..first + out.len() / n;
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
                }
            }),
        }
    });
}

/// Rows decoded at a time by the kernels that decode to a buffer: 8 rows of a 576-wide model take
/// 18 KiB, well within L1.
const DECODED_ROWS: usize = 8;

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

    use super::iq4_nl_levels;

    /// `out[r·n + t] = row_r · x[t]` for the weight rows of `row_bytes` bytes each in `rows` (in their
    /// storage format) and the `n` input rows in `x`.
    pub(super) type RowDot = unsafe fn(rows: &[u8], row_bytes: usize, x: &[f32], n: usize, out: &mut [f32]);

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// The fused kernel for rows of `cols` elements of `ty`, if there is one and the CPU runs it.
    pub(super) fn fused(ty: GgmlType, cols: usize) -> Option<RowDot> {
        if !supported() {
            return None;
        }
        Some(match ty {
            GgmlType::F16 if cols.is_multiple_of(32) => rows_dot::<F16>,
            GgmlType::Q8_0 => rows_dot::<Q8_0>,
            GgmlType::Q4_0 => rows_dot::<Q4_0>,
            GgmlType::Q4_1 => rows_dot::<Q4_1>,
            GgmlType::Q5_0 => rows_dot::<Q5_0>,
            GgmlType::Q5_1 => rows_dot::<Q5_1>,
            GgmlType::Q4_K => rows_dot::<Q4K>,
            GgmlType::Q6_K => rows_dot::<Q6K>,
            GgmlType::IQ4_NL => {
                iq4_nl_levels();
                rows_dot::<Iq4Nl>
            }
            _ => return None,
        })
    }

    /// A storage format whose blocks hold `SUBS` runs of 32 values.
    trait Block {
        const BYTES: usize;
        const SUBS: usize = 1;
        /// Run `sub` of the block's values as two vectors.
        ///
        /// # Safety
        /// AVX-512F/BW are available, `b` points at `BYTES` readable bytes and `sub < SUBS`.
        unsafe fn values(b: *const u8, sub: usize) -> [__m512; 2];
    }

    /// The f16 at `b`, in every lane (F16C converts exactly, as the row decoders do).
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn f16_at(b: *const u8) -> __m512 {
        let h = u16::from_le_bytes([*b, *b.add(1)]);
        _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// 16 bytes of nibbles as two vectors of i32: the low nibbles, then the high ones.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn nibbles(q: *const u8) -> [__m512i; 2] {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast()));
        [_mm512_and_si512(q, _mm512_set1_epi32(0x0f)), _mm512_srli_epi32::<4>(q)]
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
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
            [_mm512_cvtph_ps(_mm256_loadu_si256(b.cast())), _mm512_cvtph_ps(_mm256_loadu_si256(b.add(32).cast()))]
        }
    }

    struct Q8_0;
    impl Block for Q8_0 {
        const BYTES: usize = 34;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
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
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
            // (q − 8)·d as q·d + (−8d): −8d is exact, so the one rounding of the fused sum gives
            // the same value as the decoder's.
            let d = f16_at(b);
            let offset = _mm512_mul_ps(d, _mm512_set1_ps(-8.0));
            nibbles(b.add(2)).map(|q| _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, offset))
        }
    }

    struct Q4_1;
    impl Block for Q4_1 {
        const BYTES: usize = 20;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
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
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
            // (q − 16)·d as q·d + (−16d), exactly as for Q4_0.
            let d = f16_at(b);
            let offset = _mm512_mul_ps(d, _mm512_set1_ps(-16.0));
            q5_values(b.add(2), b.add(6)).map(|q| _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), d, offset))
        }
    }

    struct Q5_1;
    impl Block for Q5_1 {
        const BYTES: usize = 24;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
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
        unsafe fn values(b: *const u8, _: usize) -> [__m512; 2] {
            let d = f16_at(b);
            let levels = _mm512_loadu_ps(iq4_nl_levels().as_ptr());
            nibbles(b.add(2)).map(|q| _mm512_mul_ps(_mm512_permutexvar_ps(q, levels), d))
        }
    }

    struct Q4K;
    impl Block for Q4K {
        const BYTES: usize = 144;
        const SUBS: usize = 8;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8, sub: usize) -> [__m512; 2] {
            // `d·sc·q − dmin·m`, the 6-bit scale and min read as formats' `scale_min_k4` does.
            let scales = |i: usize| *b.add(4 + i);
            let (sc, m) = if sub < 4 {
                (scales(sub) & 63, scales(sub + 4) & 63)
            } else {
                (
                    (scales(sub + 4) & 0xF) | ((scales(sub - 4) >> 6) << 4),
                    (scales(sub + 4) >> 4) | ((scales(sub) >> 6) << 4),
                )
            };
            let scale = _mm512_mul_ps(f16_at(b), _mm512_set1_ps(sc as f32));
            let min = _mm512_mul_ps(f16_at(b.add(2)), _mm512_set1_ps(-(m as f32)));
            // Sub-blocks 2j and 2j + 1 share 32 bytes: low nibbles, then high ones.
            let qs = b.add(16 + 32 * (sub / 2));
            let shift = _mm512_set1_epi32(4 * (sub % 2) as i32);
            let nibbles = |at: usize| {
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(at).cast()));
                _mm512_and_si512(_mm512_srlv_epi32(q, shift), _mm512_set1_epi32(0x0f))
            };
            [nibbles(0), nibbles(16)].map(|q| _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), scale, min))
        }
    }

    struct Q6K;
    impl Block for Q6K {
        const BYTES: usize = 210;
        const SUBS: usize = 8;
        #[target_feature(enable = "avx512f,avx512bw,f16c")]
        #[inline]
        unsafe fn values(b: *const u8, sub: usize) -> [__m512; 2] {
            // `d·scale·(q − 32)`; each half of 128 values takes 64 `ql` bytes (low nibbles of its
            // runs 0 and 1, then high nibbles of runs 2 and 3), 32 `qh` bytes (two bits per run) and 8
            // scales (one per 16 values).
            let (half, k) = (sub / 4, sub % 4);
            let ql = b.add(64 * half + 32 * (k % 2));
            let qh = b.add(128 + 32 * half);
            let scales = b.add(192 + 8 * half + 2 * k).cast::<i8>();
            let d = f16_at(b.add(208));
            let (low_shift, high_shift) = (_mm512_set1_epi32(4 * (k / 2) as i32), _mm512_set1_epi32(2 * k as i32));
            let value = |at: usize| {
                let low = _mm512_cvtepu8_epi32(_mm_loadu_si128(ql.add(at).cast()));
                let high = _mm512_cvtepu8_epi32(_mm_loadu_si128(qh.add(at).cast()));
                let low = _mm512_and_si512(_mm512_srlv_epi32(low, low_shift), _mm512_set1_epi32(0x0f));
                let high = _mm512_and_si512(_mm512_srlv_epi32(high, high_shift), _mm512_set1_epi32(3));
                let q = _mm512_cvtepi32_ps(_mm512_or_si512(low, _mm512_slli_epi32::<4>(high)));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*scales.add(at / 16) as f32));
                _mm512_fmadd_ps(q, scale, _mm512_mul_ps(scale, _mm512_set1_ps(-32.0)))
            };
            [value(0), value(16)]
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    unsafe fn rows_dot<B: Block>(rows: &[u8], row_bytes: usize, x: &[f32], n: usize, out: &mut [f32]) {
        assert!(row_bytes.is_multiple_of(B::BYTES) && x.len() >= n * row_bytes / B::BYTES * B::SUBS * 32);
        assert!(rows.len().is_multiple_of(row_bytes) && out.len() == rows.len() / row_bytes * n);
        // Up to four rows × tokens at a time: enough independent loads and sums in flight, few enough
        // for the registers.
        match n {
            1 => rows_dot_grouped::<B, 4, 1>(rows, row_bytes, x, out),
            2 => rows_dot_grouped::<B, 2, 2>(rows, row_bytes, x, out),
            3 => rows_dot_grouped::<B, 1, 3>(rows, row_bytes, x, out),
            _ => rows_dot_grouped::<B, 1, 4>(rows, row_bytes, x, out),
        }
    }

    /// [`rows_dot`] for `N` tokens, `R` rows at a time, the last few rows one at a time. Each row's
    /// sums run in the same order either way, so results do not depend on the grouping.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn rows_dot_grouped<B: Block, const R: usize, const N: usize>(
        rows: &[u8],
        row_bytes: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let groups = rows.chunks_exact(R * row_bytes);
        let tail = groups.remainder();
        let mut outs = out.chunks_exact_mut(R * N);
        for (group, out) in groups.zip(&mut outs) {
            dot_rows::<B, R, N>(group.as_ptr(), row_bytes, x, out);
        }
        for (row, out) in tail.chunks_exact(row_bytes).zip(outs.into_remainder().chunks_exact_mut(N)) {
            dot_rows::<B, 1, N>(row.as_ptr(), row_bytes, x, out);
        }
    }

    /// `out[r·N + t] = row_r · x[t]` for the `R` rows of `row_bytes` bytes at `rows`. Two
    /// accumulators per row and token (one per half block), so consecutive blocks do not wait on each
    /// other's additions; each block of `x` is loaded once for all `R` rows.
    ///
    /// # Safety
    /// AVX-512F/BW and F16C are available, `rows` points at `R · row_bytes` readable bytes and `x`
    /// holds `N` rows of `row_bytes / B::BYTES · B::SUBS · 32` values.
    #[target_feature(enable = "avx512f,avx512bw,f16c")]
    #[inline]
    unsafe fn dot_rows<B: Block, const R: usize, const N: usize>(
        rows: *const u8,
        row_bytes: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let blocks = row_bytes / B::BYTES;
        let cols = blocks * B::SUBS * 32;
        let mut acc = [[[_mm512_setzero_ps(); 2]; N]; R];
        let mut xs = [[_mm512_setzero_ps(); 2]; N];
        for b in 0..blocks {
            for sub in 0..B::SUBS {
                for r in 0..R {
                    let at = (PREFETCH_GROUPS * R + r) * row_bytes + b * B::BYTES + sub * B::BYTES / B::SUBS;
                    _mm_prefetch::<_MM_HINT_T0>(rows.wrapping_add(at).cast());
                }
                for (t, xs) in xs.iter_mut().enumerate() {
                    let xt = x.as_ptr().add(t * cols + (b * B::SUBS + sub) * 32);
                    *xs = [_mm512_loadu_ps(xt), _mm512_loadu_ps(xt.add(16))];
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let [lo, hi] = B::values(rows.add(r * row_bytes + b * B::BYTES), sub);
                    for (acc, xs) in acc.iter_mut().zip(&xs) {
                        acc[0] = _mm512_fmadd_ps(lo, xs[0], acc[0]);
                        acc[1] = _mm512_fmadd_ps(hi, xs[1], acc[1]);
                    }
                }
            }
        }
        for (o, acc) in out.iter_mut().zip(acc.iter().flatten()) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        }
    }

    /// Each block is prefetched this many groups of rows ahead of its use, which covers a memory
    /// access (a group of four rows of a 576-wide model takes a few hundred cycles); measured best
    /// among 1, 2, 4 and 8 on the model's shapes.
    const PREFETCH_GROUPS: usize = 4;

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
