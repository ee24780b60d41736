//! Tensor descriptions: what a GGUF file says about a tensor, what a writer is asked to store, and the
//! shape rules both must satisfy.

use crate::ggml_type::GgmlType;

/// GGML tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;

/// A tensor as listed in a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (contiguous) axis, so a `[out, in]` matrix has dims `[in, out]`.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Start of the tensor's data, relative to the file's data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Infos read from a file or built by the writer have passed [`checked_n_bytes`]; an info built by
    /// hand with overflowing dimensions panics here.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.ggml_type.tensor_bytes(self.n_elements()).expect("tensor shapes are validated when read or planned")
    }
}

/// A tensor a [`super::GgufWriter`] will store: its place in the file follows from the plan's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    /// GGUF order, as in [`TensorInfo::dims`].
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

/// The bytes a tensor of this shape and type takes, or why the shape is not storable: it needs 1 to 4
/// dimensions, rows of whole blocks, and an element count that fits GGML's signed 64-bit sizes.
pub(super) fn checked_n_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, String> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(format!("tensor '{name}' has {} dimensions (GGUF allows 1 to {MAX_DIMS})", dims.len()));
    }
    let overflow = || format!("tensor '{name}' has dimensions {dims:?} whose size overflows 64 bits");
    let elements =
        dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).filter(|&n| n <= i64::MAX as u64).ok_or_else(overflow)?;
    let block = ty.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "tensor '{name}' has rows of {} elements, not a whole number of {ty} blocks ({block} elements each)",
            dims[0]
        ));
    }
    ty.tensor_bytes(elements).ok_or_else(overflow)
}
