//! Matrix products against weights kept in their storage format.
//!
//! [`Linear`] is the one interface the forward pass multiplies through: `y = x · Wᵀ` for a batch of
//! f32 activation rows. [`GgmlLinear`] implements it for every GGML type the type table can decode,
//! borrowing the weight bytes from the mapped file, so no f32 copy of the model ever exists:
//! - batches ([`gemm`]): blocks of weight rows are decoded into an f32 scratch buffer, so each weight
//!   is decoded once per batch, and multiplied by an AVX-512 register-tile kernel (faer's GEMM on
//!   CPUs without AVX-512);
//! - one to four tokens ([`gemv`]): the common block formats are decoded block by block into vector
//!   registers and consumed there; other formats are decoded a few rows at a time right before the
//!   dot products that consume them, while they are still in cache.
//!
//! [`packed::PackedLinear`] implements it for GPTQ/AWQ integer weights, through the same batch path.
//!
//! Rows are decoded by [`decode`]'s fast decoders where it has one, else by the type table's.
//!
//! Activations stay f32 throughout: the runtime measures the weights, not kernel shortcuts.

mod decode;
pub(crate) mod gemm;
mod gemv;
pub mod packed;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::ops::Range;

use faer::MatMut;
use formats::ggml_type::DequantizeFn;
use formats::GgmlType;

/// Batches with fewer rows than this take the GEMV path.
const GEMM_MIN_ROWS: usize = 5;

/// A linear layer without bias: `out_features × in_features` weights.
pub trait Linear: Send + Sync {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// `y = x · Wᵀ` for `x` of `n × in_features` and `y` of `n × out_features`, both row-major.
    fn forward(&self, x: &[f32], y: &mut [f32]);
}

/// A weight matrix that decodes blocks of its rows to f32: what the batch path ([`gemm`]) multiplies by.
pub trait DecodeRows: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Decodes the weight rows in `rows` into `dst` (`rows.len() × cols`, row-major).
    fn decode_rows(&self, rows: Range<usize>, dst: &mut [f32]);
}

/// A weight matrix in a GGML storage type, borrowed as stored: `rows` rows of `cols` elements, each
/// row a whole number of blocks.
#[derive(Clone, Copy, Debug)]
pub struct GgmlLinear<'a> {
    ty: GgmlType,
    decode: DequantizeFn,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
}

impl<'a> GgmlLinear<'a> {
    /// Checks that `ty` can be decoded and that `data` holds exactly `rows` rows of `cols` elements.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, String> {
        let decode = decode::decoder(ty).ok_or_else(|| format!("{ty} weights are not supported by the runtime"))?;
        let row_bytes = ty
            .row_bytes(cols as u64)
            .ok_or_else(|| format!("rows of {cols} elements are not whole {ty} blocks of {}", ty.block_size()))?
            as usize;
        if rows.checked_mul(row_bytes) != Some(data.len()) {
            return Err(format!("{} bytes of {ty} data do not hold {rows} rows of {cols} elements", data.len()));
        }
        Ok(Self { ty, decode, rows, cols, row_bytes, data })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Decodes the weight rows in `rows` into `dst` (`rows.len() × cols`).
    pub fn decode_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        assert_eq!(dst.len(), rows.len() * self.cols, "decoded rows do not fit the destination");
        (self.decode)(&self.data[rows.start * self.row_bytes..rows.end * self.row_bytes], dst);
    }
}

impl DecodeRows for GgmlLinear<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn decode_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        GgmlLinear::decode_rows(self, rows, dst)
    }
}

impl Linear for GgmlLinear<'_> {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], y: &mut [f32]) {
        let n = batch_rows(x, y, self.rows, self.cols);
        if n == 0 {
            return;
        }
        if n >= GEMM_MIN_ROWS {
            gemm::gemm(self, x, n, y);
        } else {
            gemv::gemv(self, x, n, y);
        }
    }
}

/// The rows of a batch `x` (n × `cols`) for a `rows × cols` linear writing `y` (n × `rows`).
pub(crate) fn batch_rows(x: &[f32], y: &[f32], rows: usize, cols: usize) -> usize {
    let n = x.len() / cols;
    assert!(x.len() == n * cols && y.len() == n * rows, "activation shapes do not match the weights");
    n
}

/// A row-major `nrows × ncols` view with rows `row_stride` apart.
///
/// faer 0.24's own `MatMut::from_row_major_slice_with_stride_mut` checks row-major bounds but builds a
/// column-major view (unit row stride), so products written through it land outside the slice; the
/// transposed column-major view is what it should have built.
pub(crate) fn row_major_mut(slice: &mut [f32], nrows: usize, ncols: usize, row_stride: usize) -> MatMut<'_, f32> {
    MatMut::from_column_major_slice_with_stride_mut(slice, ncols, nrows, row_stride).transpose_mut()
}
