//! [`GgufWriter`]: streams a GGUF v3 file to disk, one tensor at a time.
//!
//! The caller declares every tensor up front, so the header (metadata and tensor infos with their
//! offsets) is written at creation and each tensor's data can follow as soon as it is produced; no
//! tensor is held longer than the caller holds it. The layout matches llama.cpp and gguf-py: infos
//! padded to the alignment, each tensor padded to the alignment, the last one included. The file
//! appears under its final name only when [`GgufWriter::finish`] succeeds.

use std::io::{self, Read, Write};
use std::path::Path;

use super::index::NameIndex;
use super::tensor::{checked_n_bytes, TensorPlan};
use super::value::{MetadataValue, MAX_ARRAY_DEPTH};
use super::{align_offset, alignment_from, MAGIC, VERSION};
use crate::error::{Error, IoContext, Result};
use crate::output::AtomicFile;

/// llama.cpp rejects tensor names of `GGML_MAX_NAME` (64) bytes or more.
const MAX_TENSOR_NAME_LEN: usize = 63;

pub struct GgufWriter {
    out: AtomicFile,
    alignment: u64,
    plan: Vec<TensorPlan>,
    sizes: Vec<u64>,
    next: usize,
    /// Set when a write failed part-way: the file's contents are then unknown and it must not be committed.
    broken: bool,
}

impl GgufWriter {
    /// Validates the metadata and plan and writes the header. The alignment is `general.alignment`
    /// when present (a `u32` power of two, multiple of 8), else 32.
    pub fn create(
        dest: impl AsRef<Path>,
        metadata: &[(String, MetadataValue)],
        tensors: Vec<TensorPlan>,
    ) -> Result<GgufWriter> {
        let dest = dest.as_ref();
        let fail = |msg: String| Error::invalid(dest, msg);
        NameIndex::build(metadata, |(k, _)| k.as_str())
            .map_err(|k| fail(format!("metadata key '{k}' is given more than once")))?;
        NameIndex::build(&tensors, |t| t.name.as_str())
            .map_err(|n| fail(format!("tensor '{n}' is planned more than once")))?;
        let alignment = alignment_from(metadata).map_err(fail)?;
        let sizes = tensors
            .iter()
            .map(|t| {
                if t.name.len() > MAX_TENSOR_NAME_LEN {
                    return Err(format!(
                        "tensor name '{}' is {} bytes; GGUF readers accept at most {MAX_TENSOR_NAME_LEN}",
                        t.name,
                        t.name.len()
                    ));
                }
                checked_n_bytes(&t.name, &t.dims, t.ggml_type)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        let header = encode_header(metadata, &tensors, &sizes, alignment).map_err(fail)?;

        let mut out = AtomicFile::create(dest)?;
        out.write_all(&header).at(dest)?;
        Ok(GgufWriter { out, alignment, plan: tensors, sizes, next: 0, broken: false })
    }

    /// Writes the next planned tensor's data, which must be exactly the plan's size in bytes.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        let Some(plan) = self.plan.get(self.next) else {
            return Err(self.fail(format!("tensor '{name}' written after all {} planned tensors", self.plan.len())));
        };
        if plan.name != name {
            return Err(
                self.fail(format!("tensor '{name}' written out of order: the next planned tensor is '{}'", plan.name))
            );
        }
        let size = self.sizes[self.next];
        if data.len() as u64 != size {
            return Err(self.fail(format!(
                "tensor '{name}' ({} {:?}) needs {size} bytes of data, got {}",
                plan.ggml_type,
                plan.dims,
                data.len()
            )));
        }
        let padding = align_offset(size, self.alignment) - size;
        let written =
            self.out.write_all(data).and_then(|()| io::copy(&mut io::repeat(0).take(padding), &mut self.out).map(drop));
        if written.is_err() {
            self.broken = true;
        }
        written.at(self.out.dest())?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every planned tensor was written, then flushes and moves the file into place.
    pub fn finish(self) -> Result<()> {
        self.check_usable()?;
        if let Some(missing) = self.plan.get(self.next) {
            return Err(self.fail(format!(
                "finished after {} of {} planned tensors; '{}' was never written",
                self.next,
                self.plan.len(),
                missing.name
            )));
        }
        self.out.commit()
    }

    fn check_usable(&self) -> Result<()> {
        if self.broken {
            return Err(self.fail("an earlier write to this file failed".into()));
        }
        Ok(())
    }

    fn fail(&self, msg: String) -> Error {
        Error::invalid(self.out.dest(), msg)
    }
}

/// Magic, version, counts, metadata, tensor infos with offsets, and the padding up to the data section.
fn encode_header(
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorPlan],
    sizes: &[u64],
    alignment: u64,
) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        encode_string(&mut buf, key);
        buf.extend_from_slice(&value.value_type().id().to_le_bytes());
        encode_value(&mut buf, value, 0).map_err(|e| format!("metadata '{key}': {e}"))?;
    }
    let mut offset = 0u64;
    for (t, &size) in tensors.iter().zip(sizes) {
        encode_string(&mut buf, &t.name);
        buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            buf.extend_from_slice(&d.to_le_bytes());
        }
        buf.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        offset = offset
            .checked_add(size)
            .map(|end| align_offset(end, alignment))
            .ok_or_else(|| format!("tensor data passes 2^64 bytes at tensor '{}'", t.name))?;
    }
    buf.resize(align_offset(buf.len() as u64, alignment) as usize, 0);
    Ok(buf)
}

fn encode_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The value's bytes, without its type id. Fails for an array holding items of a type other than its
/// declared element type, which no reader could parse, or nested deeper than readers accept.
fn encode_value(buf: &mut Vec<u8>, value: &MetadataValue, depth: usize) -> Result<(), String> {
    use MetadataValue as V;
    match value {
        V::U8(v) => buf.push(*v),
        V::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::Bool(v) => buf.push(u8::from(*v)),
        V::String(s) => encode_string(buf, s),
        V::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        V::Array(_) if depth >= MAX_ARRAY_DEPTH => {
            return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
        }
        V::Array(a) => {
            buf.extend_from_slice(&a.elem_type.id().to_le_bytes());
            buf.extend_from_slice(&(a.items.len() as u64).to_le_bytes());
            for (i, item) in a.items.iter().enumerate() {
                if item.value_type() != a.elem_type {
                    return Err(format!("array of {} holds a {} at item {i}", a.elem_type, item.value_type()));
                }
                encode_value(buf, item, depth + 1).map_err(|e| format!("{e} in array item {i}"))?;
            }
        }
    }
    Ok(())
}
