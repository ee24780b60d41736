//! Parsing and validating a GGUF header: everything before the tensor data.
//!
//! Every count and length is checked against the bytes left in the file before anything is allocated
//! from it (each value, array item or tensor info takes a known minimum number of bytes), and the
//! tensor layout is checked whole: aligned offsets, data inside the file, no two tensors overlapping.

use super::cursor::{invalid, Cursor, Problem};
use super::index::NameIndex;
use super::tensor::{checked_n_bytes, TensorInfo, MAX_DIMS};
use super::value::{MetadataArray, MetadataValue, ValueType, MAX_ARRAY_DEPTH};
use super::{align_offset, alignment_from, MAGIC};
use crate::ggml_type::GgmlType;

/// Key length, value type, and the smallest value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;
/// Name length, dimension count, one dimension, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 8 + 4 + 8;

pub(super) struct Header {
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub metadata: Vec<(String, MetadataValue)>,
    pub metadata_index: NameIndex,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: NameIndex,
}

pub(super) fn parse(bytes: &[u8]) -> Result<Header, Problem> {
    let mut c = Cursor::new(bytes);
    let magic = c.take(4, "the magic")?;
    if magic != MAGIC {
        return Err(invalid(format!("not a GGUF file: starts with \"{}\", expected \"GGUF\"", magic.escape_ascii())));
    }
    let version = c.u32("the version")?;
    check_version(version)?;
    let tensor_count = c.u64("the tensor count")?;
    let kv_count = c.u64("the metadata entry count")?;
    let least_needed =
        u128::from(tensor_count) * u128::from(MIN_TENSOR_INFO_LEN) + u128::from(kv_count) * u128::from(MIN_KV_LEN);
    c.ensure(least_needed, format_args!("{kv_count} metadata entries and {tensor_count} tensor infos"))?;

    let metadata = read_metadata(&mut c, kv_count)?;
    let metadata_index = NameIndex::build(&metadata, |(k, _)| k.as_str())
        .map_err(|k| invalid(format!("metadata key '{k}' occurs more than once")))?;
    let alignment = alignment_from(&metadata).map_err(invalid)?;

    let tensors = read_tensor_infos(&mut c, tensor_count)?;
    let tensor_index = NameIndex::build(&tensors, |t| t.name.as_str())
        .map_err(|n| invalid(format!("tensor name '{n}' occurs more than once")))?;
    let data_offset = align_offset(c.position(), alignment);
    check_layout(&tensors, alignment, data_offset, bytes.len() as u64)?;

    Ok(Header { version, alignment, data_offset, metadata, metadata_index, tensors, tensor_index })
}

fn check_version(version: u32) -> Result<(), Problem> {
    let swapped = version.swap_bytes();
    match version {
        2 | 3 => Ok(()),
        1 => Err(Problem::unsupported("GGUF version 1 is not supported (only versions 2 and 3)")),
        _ if (1..=3).contains(&swapped) => Err(Problem::unsupported(format!(
            "big-endian GGUF files are not supported (version {swapped} stored byte-swapped)"
        ))),
        _ => Err(Problem::unsupported(format!("unknown GGUF version {version} (only versions 2 and 3 are supported)"))),
    }
}

fn read_metadata(c: &mut Cursor, count: u64) -> Result<Vec<(String, MetadataValue)>, Problem> {
    let mut metadata = Vec::with_capacity(count as usize);
    for i in 0..count {
        let key = c.string("a metadata key").map_err(|p| p.within(format_args!("metadata entry {i}")))?;
        let value = read_value_type(c, "a metadata value type")
            .and_then(|ty| read_value(c, ty, 0))
            .map_err(|p| p.within(format_args!("metadata entry {i} '{key}'")))?;
        metadata.push((key.to_owned(), value));
    }
    Ok(metadata)
}

fn read_value_type(c: &mut Cursor, what: &str) -> Result<ValueType, Problem> {
    let at = c.position();
    let id = c.u32(what)?;
    ValueType::from_id(id).ok_or_else(|| invalid(format!("unknown value type {id} at byte {at}")))
}

fn read_value(c: &mut Cursor, ty: ValueType, depth: usize) -> Result<MetadataValue, Problem> {
    use MetadataValue as V;
    Ok(match ty {
        ValueType::U8 => V::U8(c.u8("a u8 value")?),
        ValueType::I8 => V::I8(c.u8("an i8 value")? as i8),
        ValueType::U16 => V::U16(c.u16("a u16 value")?),
        ValueType::I16 => V::I16(c.u16("an i16 value")? as i16),
        ValueType::U32 => V::U32(c.u32("a u32 value")?),
        ValueType::I32 => V::I32(c.u32("an i32 value")? as i32),
        ValueType::F32 => V::F32(f32::from_bits(c.u32("an f32 value")?)),
        ValueType::U64 => V::U64(c.u64("a u64 value")?),
        ValueType::I64 => V::I64(c.u64("an i64 value")? as i64),
        ValueType::F64 => V::F64(f64::from_bits(c.u64("an f64 value")?)),
        ValueType::Bool => {
            let at = c.position();
            match c.u8("a bool value")? {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => return Err(invalid(format!("bool value at byte {at} is {b}, not 0 or 1"))),
            }
        }
        ValueType::String => V::String(c.string("a string value")?.to_owned()),
        ValueType::Array => V::Array(read_array(c, depth)?),
    })
}

fn read_array(c: &mut Cursor, depth: usize) -> Result<MetadataArray, Problem> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(invalid(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {}", c.position())));
    }
    let elem_type = read_value_type(c, "an array's element type")?;
    let count = c.u64("an array's length")?;
    let least_needed = u128::from(count) * u128::from(elem_type.min_encoded_len());
    c.ensure(least_needed, format_args!("an array of {count} {elem_type} items"))?;
    let mut items = Vec::with_capacity(count as usize);
    for i in 0..count {
        items.push(read_value(c, elem_type, depth + 1).map_err(|p| p.in_array_item(i))?);
    }
    Ok(MetadataArray { elem_type, items })
}

fn read_tensor_infos(c: &mut Cursor, count: u64) -> Result<Vec<TensorInfo>, Problem> {
    let mut tensors = Vec::with_capacity(count as usize);
    for i in 0..count {
        let info = read_tensor_info(c).map_err(|p| p.within(format_args!("tensor info {i}")))?;
        tensors.push(info);
    }
    Ok(tensors)
}

fn read_tensor_info(c: &mut Cursor) -> Result<TensorInfo, Problem> {
    let name = c.string("a tensor name")?.to_owned();
    let n_dims = c.u32(format_args!("the dimension count of tensor '{name}'"))?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(invalid(format!("tensor '{name}' has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")));
    }
    let dims =
        (0..n_dims).map(|_| c.u64(format_args!("the dimensions of tensor '{name}'"))).collect::<Result<Vec<_>, _>>()?;
    let type_id = c.u32(format_args!("the type of tensor '{name}'"))?;
    let ggml_type = GgmlType::from_id(type_id)
        .ok_or_else(|| invalid(format!("tensor '{name}' has unknown ggml type id {type_id}")))?;
    let offset = c.u64(format_args!("the data offset of tensor '{name}'"))?;
    checked_n_bytes(&name, &dims, ggml_type).map_err(invalid)?;
    Ok(TensorInfo { name, dims, ggml_type, offset })
}

fn check_layout(tensors: &[TensorInfo], alignment: u64, data_offset: u64, file_len: u64) -> Result<(), Problem> {
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(invalid(format!(
                "tensor '{}' data offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes()));
        if end.is_none_or(|e| e > file_len) {
            return Err(invalid(format!(
                "truncated at byte {file_len} while reading the data of tensor '{}' ({} bytes at data offset {})",
                t.name,
                t.n_bytes(),
                t.offset
            )));
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_unstable_by_key(|t| t.offset);
    if let Some(pair) = by_offset.windows(2).find(|p| p[0].offset + p[0].n_bytes() > p[1].offset) {
        return Err(invalid(format!(
            "tensors '{}' (data offset {}, {} bytes) and '{}' (data offset {}) overlap",
            pair[0].name,
            pair[0].offset,
            pair[0].n_bytes(),
            pair[1].name,
            pair[1].offset
        )));
    }
    Ok(())
}
