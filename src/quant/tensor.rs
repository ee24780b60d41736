//! [`quantize_tensor`]: one tensor's f32 rows to GGML blocks, rows in parallel.
//!
//! Every row is encoded by its own call to the type table's encoder, so the bytes depend only on the
//! row (and the importance vector), never on how rows were spread over threads.

use formats::GgmlType;
use rayon::prelude::*;

/// Why a tensor could not be quantized. The caller adds the tensor's name and file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("qforge cannot encode {0} yet")]
    NoEncoder(GgmlType),
    #[error("rows of {row_len} values are not a whole number of {ty} blocks ({} values each)", ty.block_size())]
    RowNotWholeBlocks { row_len: usize, ty: GgmlType },
    #[error("{len} values are not a whole number of rows of {row_len}")]
    Ragged { len: usize, row_len: usize },
    #[error("the importance vector has {got} values, one per column ({row_len}) is needed")]
    ImportanceLength { got: usize, row_len: usize },
    #[error("value {value} at row {row}, column {column}: weights must be finite to be quantized")]
    NonFinite { row: usize, column: usize, value: f32 },
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
    let encode = ty.traits().quantize.ok_or(QuantizeError::NoEncoder(ty))?;
    let row_bytes =
        ty.row_bytes(row_len as u64).filter(|_| row_len > 0).ok_or(QuantizeError::RowNotWholeBlocks { row_len, ty })?
            as usize;
    if values.len() % row_len != 0 {
        return Err(QuantizeError::Ragged { len: values.len(), row_len });
    }
    if let Some(w) = importance.filter(|w| w.len() != row_len) {
        return Err(QuantizeError::ImportanceLength { got: w.len(), row_len });
    }
    if let Some(i) = values.par_iter().position_first(|v| !v.is_finite()) {
        return Err(QuantizeError::NonFinite { row: i / row_len, column: i % row_len, value: values[i] });
    }
    let mut out = vec![0u8; values.len() / row_len * row_bytes];
    // Rows are small (hundreds of values); batching a few per task keeps rayon's overhead negligible.
    out.par_chunks_mut(row_bytes)
        .zip(values.par_chunks(row_len))
        .with_min_len(16)
        .for_each(|(dst, src)| encode(src, dst, importance));
    Ok(out)
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
