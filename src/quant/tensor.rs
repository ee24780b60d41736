//! [`quantize_tensor`]: one tensor's f32 rows to GGML blocks, rows in parallel; [`quantize_rows`] does
//! the same from rows still encoded (F16, BF16, a block type), each thread decoding only the few rows
//! it is about to encode, so the tensor never exists as f32 in memory.
//!
//! Every row is encoded by its own call to the type table's encoder, so the bytes depend only on the
//! row (and the importance vector), never on how rows were spread over threads.

use std::sync::atomic::{AtomicUsize, Ordering};

use formats::ggml_type::DequantizeFn;
use formats::GgmlType;
use rayon::prelude::*;

/// Why a tensor could not be quantized. The caller adds the tensor's name and file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("qforge cannot encode {0} yet")]
    NoEncoder(GgmlType),
    #[error("qforge cannot decode {0}")]
    NoDecoder(GgmlType),
    #[error("rows of {row_len} values are not a whole number of {ty} blocks ({} values each)", ty.block_size())]
    RowNotWholeBlocks { row_len: usize, ty: GgmlType },
    #[error("{len} values are not a whole number of rows of {row_len}")]
    Ragged { len: usize, row_len: usize },
    #[error("{bytes} bytes of {ty} are not a whole number of rows of {row_len} values")]
    RaggedEncoded { bytes: usize, ty: GgmlType, row_len: usize },
    #[error("the importance vector has {got} values, one per column ({row_len}) is needed")]
    ImportanceLength { got: usize, row_len: usize },
    #[error("value {value} at row {row}, column {column}: weights must be finite to be quantized")]
    NonFinite { row: usize, column: usize, value: f32 },
}

/// A tensor's rows (GGUF row order), as [`quantize_rows`] reads them.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// Decoded values.
    F32(&'a [f32]),
    /// Stored values: `bytes` hold whole rows of type `ty`.
    Encoded { bytes: &'a [u8], ty: GgmlType },
}

/// [`Rows`] checked against the row length: knows how many rows there are and hands out a range of
/// them as f32.
struct RowReader<'a> {
    source: Source<'a>,
    row_len: usize,
    n_rows: usize,
}

enum Source<'a> {
    F32(&'a [f32]),
    Encoded { bytes: &'a [u8], row_bytes: usize, decode: DequantizeFn },
}

impl<'a> RowReader<'a> {
    fn new(rows: Rows<'a>, row_len: usize) -> Result<Self, QuantizeError> {
        match rows {
            Rows::F32(values) if values.len() % row_len == 0 => {
                Ok(Self { source: Source::F32(values), row_len, n_rows: values.len() / row_len })
            }
            Rows::F32(values) => Err(QuantizeError::Ragged { len: values.len(), row_len }),
            Rows::Encoded { bytes, ty } => {
                let decode = ty.traits().dequantize.ok_or(QuantizeError::NoDecoder(ty))?;
                let row_bytes =
                    ty.row_bytes(row_len as u64).ok_or(QuantizeError::RowNotWholeBlocks { row_len, ty })? as usize;
                if bytes.len() % row_bytes != 0 {
                    return Err(QuantizeError::RaggedEncoded { bytes: bytes.len(), ty, row_len });
                }
                Ok(Self {
                    source: Source::Encoded { bytes, row_bytes, decode },
                    row_len,
                    n_rows: bytes.len() / row_bytes,
                })
            }
        }
    }

    /// Rows `first..first + n` as f32: borrowed when already decoded, else decoded into `scratch`.
    fn read<'s>(&'s self, first: usize, n: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        match self.source {
            Source::F32(values) => &values[first * self.row_len..(first + n) * self.row_len],
            Source::Encoded { bytes, row_bytes, decode } => {
                scratch.resize(n * self.row_len, 0.0);
                decode(&bytes[first * row_bytes..(first + n) * row_bytes], scratch);
                scratch
            }
        }
    }
}

/// Encodes `values` (rows of `row_len`, GGUF row order) as `ty`, one encoder call per row.
///
/// `importance`, when given, holds one non-negative weight per column (an importance-matrix entry) and
/// is passed to every row's encoder; encoders that do not use it ignore it.
pub fn quantize_tensor(
    values: &[f32],
    row_len: usize,
    ty: GgmlType,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, QuantizeError> {
    quantize_rows(Rows::F32(values), row_len, ty, importance)
}

/// [`quantize_tensor`] for rows in any decodable form; the bytes are the same as for the decoded values.
pub fn quantize_rows(
    rows: Rows,
    row_len: usize,
    ty: GgmlType,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, QuantizeError> {
    // Values per task: enough to make rayon's per-task cost negligible, few enough that a decoded
    // chunk stays in cache between decoding and encoding.
    const CHUNK_VALUES: usize = 16 * 1024;
    let encode = ty.traits().quantize.ok_or(QuantizeError::NoEncoder(ty))?;
    let row_bytes =
        ty.row_bytes(row_len as u64).filter(|_| row_len > 0).ok_or(QuantizeError::RowNotWholeBlocks { row_len, ty })?
            as usize;
    let reader = RowReader::new(rows, row_len)?;
    if let Some(w) = importance.filter(|w| w.len() != row_len) {
        return Err(QuantizeError::ImportanceLength { got: w.len(), row_len });
    }
    let mut out = vec![0u8; reader.n_rows * row_bytes];
    let rows_per_chunk = (CHUNK_VALUES / row_len).max(1);
    // Each row is checked just before it is encoded, while it is in cache; the first bad row is the
    // one reported whatever the thread count.
    let first_bad_row = AtomicUsize::new(usize::MAX);
    out.par_chunks_mut(rows_per_chunk * row_bytes).enumerate().for_each_init(Vec::new, |scratch, (c, dst)| {
        let first = c * rows_per_chunk;
        let values = reader.read(first, dst.len() / row_bytes, scratch);
        for (r, (src, dst)) in values.chunks_exact(row_len).zip(dst.chunks_exact_mut(row_bytes)).enumerate() {
            if !all_finite(src) {
                first_bad_row.fetch_min(first + r, Ordering::Relaxed);
                return;
            }
            encode(src, dst, importance);
        }
    });
    let row = first_bad_row.into_inner();
    if row != usize::MAX {
        let values = reader.read(row, 1, &mut Vec::new()).to_vec();
        let column = values.iter().position(|v| !v.is_finite()).expect("the row holds a non-finite value");
        return Err(QuantizeError::NonFinite { row, column, value: values[column] });
    }
    Ok(out)
}

/// Branch-free, so that it vectorises: a short-circuiting scan costs more than some encoders do.
fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |ok, v| ok & v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n_rows: usize, row_len: usize) -> Vec<f32> {
        (0..n_rows * row_len).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i / row_len) as f32)).collect()
    }

    fn with_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
    }

    #[test]
    fn output_is_the_same_at_any_thread_count() {
        let x = rows(257, 64);
        let w: Vec<f32> = (0..64).map(|i| 0.1 + (i % 5) as f32).collect();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::F16] {
            for importance in [None, Some(w.as_slice())] {
                let one = with_threads(1, || quantize_tensor(&x, 64, ty, importance).unwrap());
                let two = with_threads(2, || quantize_tensor(&x, 64, ty, importance).unwrap());
                assert_eq!(one, two, "{ty} importance={}", importance.is_some());
            }
        }
    }

    #[test]
    fn each_row_is_encoded_on_its_own() {
        let x = rows(3, 64);
        let ty = GgmlType::Q4_1;
        let w = vec![1.0f32; 64];
        let whole = quantize_tensor(&x, 64, ty, Some(&w)).unwrap();
        let encode = ty.traits().quantize.unwrap();
        for (r, src) in x.chunks(64).enumerate() {
            let mut one = vec![0u8; 40];
            encode(src, &mut one, Some(&w));
            assert_eq!(&whole[r * 40..(r + 1) * 40], &one[..], "row {r}");
        }
    }

    /// `values` stored as `ty`, and what those bytes decode to.
    fn stored(values: &[f32], ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = vec![0u8; ty.tensor_bytes(values.len() as u64).unwrap() as usize];
        ty.traits().quantize.unwrap()(values, &mut bytes, None);
        let mut decoded = vec![0f32; values.len()];
        ty.dequantize(&bytes, &mut decoded).unwrap();
        (bytes, decoded)
    }

    #[test]
    fn encoded_rows_give_the_bytes_of_their_decoded_values() {
        // Rows long enough that a tensor spans several of quantize_rows' chunks.
        let (n_rows, row_len) = (67, 512);
        let x = rows(n_rows, row_len);
        let w: Vec<f32> = (0..row_len).map(|i| 0.5 + (i % 3) as f32).collect();
        for from in [GgmlType::F16, GgmlType::BF16, GgmlType::F32, GgmlType::Q8_0] {
            let (bytes, decoded) = stored(&x, from);
            for (to, importance) in [(GgmlType::Q4_K, None), (GgmlType::Q5_0, Some(w.as_slice()))] {
                let expected = quantize_tensor(&decoded, row_len, to, importance).unwrap();
                for threads in [1, 2] {
                    let got = with_threads(threads, || {
                        quantize_rows(Rows::Encoded { bytes: &bytes, ty: from }, row_len, to, importance).unwrap()
                    });
                    assert!(got == expected, "{from} -> {to}, {threads} threads");
                }
            }
        }
    }

    #[test]
    fn encoded_rows_are_checked() {
        let mut x = rows(40, 256);
        x[33 * 256 + 7] = f32::NAN;
        x[39 * 256] = f32::INFINITY;
        let (bytes, _) = stored(&x, GgmlType::F16);
        let err = quantize_rows(Rows::Encoded { bytes: &bytes, ty: GgmlType::F16 }, 256, GgmlType::Q4_0, None);
        assert!(matches!(err, Err(QuantizeError::NonFinite { row: 33, column: 7, .. })), "{err:?}");
        let err = quantize_rows(Rows::Encoded { bytes: &bytes[..1000], ty: GgmlType::F16 }, 256, GgmlType::Q4_0, None);
        assert_eq!(err, Err(QuantizeError::RaggedEncoded { bytes: 1000, ty: GgmlType::F16, row_len: 256 }));
        let err = quantize_rows(Rows::Encoded { bytes: &bytes, ty: GgmlType::Q8_0 }, 48, GgmlType::F16, None);
        assert_eq!(err, Err(QuantizeError::RowNotWholeBlocks { row_len: 48, ty: GgmlType::Q8_0 }));
    }

    #[test]
    fn non_finite_values_are_reported_with_their_position() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = rows(4, 32);
            x[2 * 32 + 5] = bad;
            x[3 * 32] = bad;
            let err = quantize_tensor(&x, 32, GgmlType::Q8_0, None).unwrap_err();
            assert!(matches!(err, QuantizeError::NonFinite { row: 2, column: 5, .. }), "{err:?}");
            assert!(err.to_string().contains("row 2, column 5"), "{err}");
        }
    }

    #[test]
    fn shape_problems_are_errors() {
        let x = rows(2, 48);
        assert_eq!(
            quantize_tensor(&x, 48, GgmlType::Q8_0, None),
            Err(QuantizeError::RowNotWholeBlocks { row_len: 48, ty: GgmlType::Q8_0 })
        );
        assert_eq!(
            quantize_tensor(&x[..90], 32, GgmlType::Q8_0, None),
            Err(QuantizeError::Ragged { len: 90, row_len: 32 })
        );
        assert_eq!(
            quantize_tensor(&x[..64], 32, GgmlType::Q4_0, Some(&[1.0; 31])),
            Err(QuantizeError::ImportanceLength { got: 31, row_len: 32 })
        );
        assert_eq!(
            quantize_tensor(&x, 0, GgmlType::F16, None),
            Err(QuantizeError::RowNotWholeBlocks { row_len: 0, ty: GgmlType::F16 })
        );
    }

    #[test]
    fn types_without_an_encoder_say_so() {
        let ty = GgmlType::all().find(|t| t.traits().quantize.is_none()).expect("some type has no encoder");
        let err = quantize_tensor(&[0.0; 256], 256, ty, None).unwrap_err();
        assert_eq!(err.to_string(), format!("qforge cannot encode {ty} yet"));
    }
}
