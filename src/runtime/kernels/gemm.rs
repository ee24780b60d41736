//! The batch path, for any weight matrix that can decode its rows to f32 ([`DecodeRows`]: GGML types
//! and packed GPTQ/AWQ weights alike): weight rows are split into blocks; each rayon task decodes one block to f32 and
//! multiplies the whole batch by it, writing its own block of output columns. Each weight is decoded
//! once per batch.
//!
//! On CPUs with AVX-512 the product is our own kernel ([`avx512`]): the decoded block is packed into
//! panels of [`PANEL`] rows laid out k-major, and a register tile of up to [`TILE_TOKENS`] tokens ×
//! one panel accumulates over the whole inner dimension in 28 vector registers before it is stored
//! once. Each output is one running sum in k order, so results do not depend on the thread count.
//! Elsewhere each block goes through faer's sequential GEMM.
//!
//! Parallelism stays at the level of weight blocks: rayon tasks balance by work stealing and never
//! wait on a barrier, which matters on a shared machine where a thread can lose its core at any time.

use std::cell::RefCell;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{row_major_mut, DecodeRows};

/// Weight rows in one packed panel: two AVX-512 vectors.
const PANEL: usize = 32;
/// Tokens in one register tile (14 × 2 accumulators, plus two panel vectors and a broadcast).
const TILE_TOKENS: usize = 14;
/// Tasks wanted per product, so that work stealing can even out two or more threads.
const MIN_TASKS: usize = 16;

thread_local! {
    static DECODED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The products [`gemm_with`] can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    Faer,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// Every kernel this CPU can run, the fastest first.
    pub(super) fn available() -> Vec<Kernel> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            kernels.push(Kernel::Avx512);
        }
        kernels.push(Kernel::Faer);
        kernels
    }
}

pub(super) fn gemm(w: &(impl DecodeRows + ?Sized), x: &[f32], n: usize, y: &mut [f32]) {
    // Large blocks reuse each loaded activation for more weight rows; small matrices need smaller
    // ones to give every thread a share.
    let block_rows = if w.rows() >= 2 * MIN_TASKS * PANEL { 2 * PANEL } else { PANEL };
    gemm_with(w, x, n, y, Kernel::available()[0], block_rows);
}

/// [`gemm`] with `kernel` and blocks of `block_rows` weight rows.
pub(super) fn gemm_with(
    w: &(impl DecodeRows + ?Sized),
    x: &[f32],
    n: usize,
    y: &mut [f32],
    kernel: Kernel,
    block_rows: usize,
) {
    let (w_rows, w_cols) = (w.rows(), w.cols());
    match kernel {
        Kernel::Faer => gemm_faer(w, x, n, y, block_rows),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            let y = OutPtr(y.as_mut_ptr());
            (0..w_rows.div_ceil(block_rows)).into_par_iter().for_each(|block| {
                let rows = block * block_rows..w_rows.min((block + 1) * block_rows);
                DECODED.with_borrow_mut(|decoded| {
                    PACKED.with_borrow_mut(|packed| {
                        decoded.resize(rows.len() * w_cols, 0.0);
                        w.decode_rows(rows.clone(), decoded);
                        // SAFETY: the CPU has AVX-512F (`Kernel::available`).
                        unsafe { avx512::pack_panels(decoded, w_cols, packed) };
                        // SAFETY: the CPU has AVX-512F (`Kernel::available`); `y` holds `n × w.rows`
                        // outputs and this task writes only the columns in `rows`, which no other
                        // task writes.
                        let panels = avx512::Panels::packed(packed, rows.len(), w_cols);
                        unsafe { avx512::product(x, w_cols, n, &panels, y.at(rows.start), w_rows) };
                    })
                });
            });
        }
    }
}

/// The output matrix, shared by tasks that write disjoint column blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint columns through it, and the borrow it came from outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` places past the start. (A method, so closures capture the whole
    /// `OutPtr`, not its raw-pointer field.)
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// One block of weight rows per task through faer's sequential GEMM.
fn gemm_faer(w: &(impl DecodeRows + ?Sized), x: &[f32], n: usize, y: &mut [f32], block_rows: usize) {
    let (w_rows, w_cols) = (w.rows(), w.cols());
    let lhs = MatRef::from_row_major_slice(x, n, w_cols);
    column_blocks(row_major_mut(y, n, w_rows, w_rows), block_rows).into_par_iter().for_each(|(first, dst)| {
        let rows = dst.ncols();
        DECODED.with_borrow_mut(|block| {
            block.resize(rows * w_cols, 0.0);
            w.decode_rows(first..first + rows, block);
            let rhs = MatRef::from_row_major_slice(block.as_slice(), rows, w_cols).transpose();
            matmul(dst, Accum::Replace, lhs, rhs, 1.0, Par::Seq);
        });
    });
}

/// `m` split into blocks of at most `width` columns, each with the index of its first column.
fn column_blocks(m: MatMut<'_, f32>, width: usize) -> Vec<(usize, MatMut<'_, f32>)> {
    let mut blocks = Vec::new();
    let (mut first, mut rest) = (0, m);
    while rest.ncols() > width {
        let (block, tail) = rest.split_at_col_mut(width);
        blocks.push((first, block));
        (first, rest) = (first + width, tail);
    }
    blocks.push((first, rest));
    blocks
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{PANEL, TILE_TOKENS};

    /// A `rows × cols` matrix as the kernel reads it: panels of [`PANEL`] rows, element `(r, k)` of
    /// panel `p` at `p·panel_step + k·k_step + r` (the last panel's missing rows are read but never
    /// stored). [`pack_panels`] makes one from row-major rows; a row-major `cols × rows` matrix
    /// (one whose transpose is wanted) already is one, with `k_step` its row stride and
    /// `panel_step` [`PANEL`].
    pub(crate) struct Panels<'a> {
        pub data: &'a [f32],
        pub rows: usize,
        pub cols: usize,
        pub k_step: usize,
        pub panel_step: usize,
    }

    impl<'a> Panels<'a> {
        /// The panels [`pack_panels`] wrote for `rows` rows of `cols`.
        pub(crate) fn packed(data: &'a [f32], rows: usize, cols: usize) -> Self {
            Self { data, rows, cols, k_step: PANEL, panel_step: PANEL * cols }
        }
    }

    /// Rearranges `decoded` (`rows × cols`, row-major) into panels of [`PANEL`] rows, each stored
    /// k-major (`cols × PANEL`: element `(r, k)` of the panel at `k·PANEL + r`), the last panel
    /// padded with zero rows. Whole 16 × 16 squares move through registers; the rest one by one.
    ///
    /// # Safety
    /// The CPU supports AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn pack_panels(decoded: &[f32], cols: usize, packed: &mut Vec<f32>) {
        let rows = decoded.len() / cols;
        packed.clear();
        packed.resize(rows.div_ceil(PANEL) * PANEL * cols, 0.0);
        for (panel_rows, panel) in decoded.chunks(PANEL * cols).zip(packed.chunks_exact_mut(PANEL * cols)) {
            for (half, half_rows) in panel_rows.chunks(16 * cols).enumerate() {
                let whole_cols = if half_rows.len() == 16 * cols { cols / 16 * 16 } else { 0 };
                for k in (0..whole_cols).step_by(16) {
                    let square =
                        transpose16(std::array::from_fn(|r| _mm512_loadu_ps(half_rows[r * cols + k..].as_ptr())));
                    for (c, v) in square.into_iter().enumerate() {
                        _mm512_storeu_ps(panel[(k + c) * PANEL + 16 * half..][..16].as_mut_ptr(), v);
                    }
                }
                for (r, row) in half_rows.chunks_exact(cols).enumerate() {
                    for (k, &v) in row.iter().enumerate().skip(whole_cols) {
                        panel[k * PANEL + 16 * half + r] = v;
                    }
                }
            }
        }
    }

    /// The transpose of a 16 × 16 square given as 16 row vectors: pairs of rows interleave (ps),
    /// then pairs of pairs (pd), which leaves each 128-bit lane holding four rows of one column;
    /// two rounds of lane shuffles gather the lanes of each column.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, j) = (i / 4 * 4, i % 4);
            let (a, b) = (_mm512_castps_pd(t[g + j / 2]), _mm512_castps_pd(t[g + j / 2 + 2]));
            _mm512_castpd_ps(if j % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
        });
        // u[4i + j], lane m: rows 4i..4i+4 of column 4m + j.
        let mut out = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x44>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_f32x4::<0xEE>(u[j], u[4 + j]);
            let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + j], u[12 + j]);
            let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + j], u[12 + j]);
            out[j] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            out[j + 4] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
            out[j + 8] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            out[j + 12] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
        }
        out
    }

    /// `y[t][r] = Σ_k x[t][k] · w[r][k]` for every row `t < n` of `x` (rows `ldx` apart) and every
    /// row `r` of `w`; `y` points at the first output, rows `ldy` apart.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `y` is valid for writes of `n` rows of `w.rows` columns `ldy` apart.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn product(x: &[f32], ldx: usize, n: usize, w: &Panels, y: *mut f32, ldy: usize) {
        let panels = w.rows.div_ceil(PANEL);
        assert!(n == 0 || x.len() >= (n - 1) * ldx + w.cols);
        assert!(w.rows == 0 || w.data.len() >= (panels - 1) * w.panel_step + (w.cols - 1) * w.k_step + PANEL);
        for first in (0..n).step_by(TILE_TOKENS) {
            let tokens = TILE_TOKENS.min(n - first);
            let x = x[first * ldx..].as_ptr();
            for p in 0..panels {
                let width = PANEL.min(w.rows - p * PANEL);
                let panel = w.data.as_ptr().add(p * w.panel_step);
                let y = y.add(first * ldy + p * PANEL);
                let tile: unsafe fn(*const f32, usize, &Panels, *const f32, *mut f32, usize, usize) = match tokens {
                    14 => tile::<14>,
                    13 => tile::<13>,
                    12 => tile::<12>,
                    11 => tile::<11>,
                    10 => tile::<10>,
                    9 => tile::<9>,
                    8 => tile::<8>,
                    7 => tile::<7>,
                    6 => tile::<6>,
                    5 => tile::<5>,
                    4 => tile::<4>,
                    3 => tile::<3>,
                    2 => tile::<2>,
                    _ => tile::<1>,
                };
                tile(x, ldx, w, panel, y, ldy, width);
            }
        }
    }

    /// `M` rows of `x` (`ldx` apart) times one panel of `w`, stored to the first `width` columns of
    /// `M` rows of `y`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const M: usize>(
        x: *const f32,
        ldx: usize,
        w: &Panels,
        panel: *const f32,
        y: *mut f32,
        ldy: usize,
        width: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; M];
        for k in 0..w.cols {
            let w0 = _mm512_loadu_ps(panel.add(k * w.k_step));
            let w1 = _mm512_loadu_ps(panel.add(k * w.k_step + 16));
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*x.add(t * ldx + k));
                acc[0] = _mm512_fmadd_ps(a, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, w1, acc[1]);
            }
        }
        let mask =
            |from: usize| -> __mmask16 { (((1u32 << width.saturating_sub(from).min(16)) - 1) & 0xffff) as __mmask16 };
        let (m0, m1) = (mask(0), mask(16));
        for (t, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(y.add(t * ldy), m0, acc[0]);
            _mm512_mask_storeu_ps(y.add(t * ldy + 16), m1, acc[1]);
        }
    }
}
