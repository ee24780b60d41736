//! One `.safetensors` file: memory-mapped, its header parsed and validated before any tensor data is
//! touched.
//!
//! Layout: an 8-byte little-endian header length N, N bytes of JSON
//! (`{"__metadata__": {str: str}, NAME: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`), then the
//! data section, which the offsets index from its start.
//!
//! Validation is as strict as the official reader's: every tensor's byte range must match its shape and
//! type, and the ranges must tile the data section exactly — no overlaps, no gaps, no trailing bytes.
//! The official writers never leave gaps and the official reader (which transformers and PyTorch use)
//! rejects them, so a file with gaps is corrupt or foreign, and accepting it would only defer the failure
//! to whichever tool reads our output's input next.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use super::dtype::Dtype;
use crate::error::{Error, IoContext, Result};

/// The header-size cap of the official implementation; real headers are kilobytes to a few megabytes.
pub(super) const MAX_HEADER_BYTES: u64 = 100_000_000;
pub(super) const LENGTH_PREFIX_BYTES: usize = 8;

#[derive(Debug)]
pub(super) struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
}

#[derive(Debug)]
pub(super) struct Header {
    pub metadata: Option<BTreeMap<String, String>>,
    /// In file order (by data offset).
    pub tensors: Vec<TensorEntry>,
}

#[derive(Debug)]
pub(super) struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range within the file.
    pub range: Range<usize>,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Maps `path` and validates its header.
pub(super) fn open(path: &Path) -> Result<(MappedFile, Header)> {
    let file = File::open(path).at(path)?;
    // SAFETY: the map is read-only; like every mmap-based reader we rely on nobody truncating or
    // rewriting the file while it is open (qforge writes outputs to fresh temporary files and renames
    // them, so it never does this to its own inputs).
    let map = unsafe { Mmap::map(&file) }.at(path)?;
    let header = parse_header(path, &map)?;
    Ok((MappedFile { path: path.to_path_buf(), map }, header))
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let invalid = |msg: String| Error::invalid(path, msg);
    if bytes.len() < LENGTH_PREFIX_BYTES {
        return Err(invalid(format!("truncated: {} bytes, too short for the 8-byte header length", bytes.len())));
    }
    let (prefix, rest) = bytes.split_at(LENGTH_PREFIX_BYTES);
    let header_len = u64::from_le_bytes(prefix.try_into().expect("split at 8"));
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt or not a safetensors file)"
        )));
    }
    if header_len > rest.len() as u64 {
        return Err(invalid(format!(
            "truncated: header length {header_len} is larger than the {} bytes after it",
            rest.len()
        )));
    }
    let (json, data) = rest.split_at(header_len as usize);
    let text = std::str::from_utf8(json)
        .map_err(|e| invalid(format!("header is not valid UTF-8 (byte {})", e.valid_up_to())))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| invalid(format!("header is not a valid JSON object: {e}")))?;

    let data_start = LENGTH_PREFIX_BYTES + json.len();
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            let map = serde_json::from_value(value)
                .map_err(|e| invalid(format!("__metadata__ must map strings to strings: {e}")))?;
            metadata = Some(map);
            continue;
        }
        let entry: RawEntry = serde_json::from_value(value)
            .map_err(|e| invalid(format!("tensor '{name}': malformed header entry: {e}")))?;
        let range = check_entry(&name, &entry, data.len()).map_err(|e| e.at_path(path))?;
        let dtype = Dtype::from_name(&entry.dtype).expect("checked by check_entry");
        let range = data_start + range.start..data_start + range.end;
        tensors.push(TensorEntry { name, dtype, shape: entry.shape, range });
    }
    tensors.sort_by_key(|t| (t.range.start, t.range.end));
    check_tiling(&tensors, data_start, bytes.len()).map_err(invalid)?;
    Ok(Header { metadata, tensors })
}

enum EntryError {
    UnknownDtype(String),
    Invalid(String),
}

impl EntryError {
    fn at_path(self, path: &Path) -> Error {
        match self {
            EntryError::UnknownDtype(msg) => Error::unsupported(path, msg),
            EntryError::Invalid(msg) => Error::invalid(path, msg),
        }
    }
}

/// Checks one entry on its own; returns its range relative to the data section.
fn check_entry(name: &str, entry: &RawEntry, data_len: usize) -> Result<Range<usize>, EntryError> {
    let Some(dtype) = Dtype::from_name(&entry.dtype) else {
        let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.name()).collect();
        return Err(EntryError::UnknownDtype(format!(
            "tensor '{name}' has dtype '{}', which qforge does not read (it reads {})",
            entry.dtype,
            known.join(", ")
        )));
    };
    let (begin, end) = entry.data_offsets;
    if begin > end || end > data_len as u64 {
        return Err(EntryError::Invalid(format!(
            "tensor '{name}': data offsets [{begin}, {end}) lie outside the data section of {data_len} bytes"
        )));
    }
    let expected =
        entry.shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64)).ok_or_else(|| {
            EntryError::Invalid(format!("tensor '{name}': shape {:?} of {dtype} overflows", entry.shape))
        })?;
    if expected != end - begin {
        return Err(EntryError::Invalid(format!(
            "tensor '{name}': shape {:?} of {dtype} needs {expected} bytes but data offsets [{begin}, {end}) span {}",
            entry.shape,
            end - begin
        )));
    }
    Ok(begin as usize..end as usize)
}

/// The sorted ranges must cover `data_start..file_len` exactly once.
fn check_tiling(tensors: &[TensorEntry], data_start: usize, file_len: usize) -> Result<(), String> {
    let relative = |at: usize| at - data_start;
    let mut covered_to = data_start;
    let mut previous: Option<&TensorEntry> = None;
    for t in tensors {
        if t.range.start < covered_to {
            let p = previous.expect("only a previous tensor can cover past the data start");
            return Err(format!(
                "tensors '{}' [{}, {}) and '{}' [{}, {}) overlap",
                p.name,
                relative(p.range.start),
                relative(p.range.end),
                t.name,
                relative(t.range.start),
                relative(t.range.end)
            ));
        }
        if t.range.start > covered_to {
            let after = previous.map_or("the start of the data section".to_string(), |p| format!("'{}'", p.name));
            return Err(format!(
                "{} unused bytes between {after} and '{}' (data offsets [{}, {}); the format has no gaps)",
                t.range.start - covered_to,
                t.name,
                relative(covered_to),
                relative(t.range.start)
            ));
        }
        covered_to = t.range.end;
        previous = Some(t);
    }
    if covered_to != file_len {
        return Err(format!(
            "{} unused bytes after the last tensor's data (the format has no trailing bytes)",
            file_len - covered_to
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    /// A file from a header JSON and a data section, the length prefix computed.
    fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    /// Opens the bytes and returns the error message, checking it names the file.
    fn open_error(bytes: &[u8]) -> String {
        let (_dir, path) = file_with(bytes);
        let err = open(&path).expect_err("expected an error");
        let text = err.to_string();
        let prefix = format!("{}: ", path.display());
        assert!(text.starts_with(&prefix), "{text}");
        assert!(!text.contains('\n'), "one-line error: {text}");
        text[prefix.len()..].to_string()
    }

    #[test]
    fn valid_file_parses_with_absolute_ranges_in_file_order() {
        let header = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]},"empty":{"dtype":"I8","shape":[0],"data_offsets":[14,14]}}"#;
        let (_dir, path) = file_with(&safetensors_bytes(header, &[0u8; 14]));
        let (file, h) = open(&path).unwrap();
        let start = 8 + header.len();
        assert_eq!(file.map.len(), start + 14);
        assert_eq!(h.metadata.unwrap()["format"], "pt");
        let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "empty"]);
        assert_eq!(h.tensors[1].dtype, Dtype::BF16);
        assert_eq!(h.tensors[1].shape, [1, 3]);
        assert_eq!(h.tensors[1].range, start + 8..start + 14);
    }

    #[test]
    fn shorter_than_the_length_prefix_is_truncated() {
        assert!(open_error(&[1, 0, 0]).contains("truncated: 3 bytes"));
        assert!(open_error(&[]).contains("truncated: 0 bytes"));
    }

    #[test]
    fn header_length_beyond_the_file_is_truncated() {
        let mut bytes = safetensors_bytes("{}", &[]);
        bytes[0] = 200;
        let msg = open_error(&bytes);
        assert!(msg.contains("header length 200 is larger than the 2 bytes"), "{msg}");
    }

    #[test]
    fn header_length_2_pow_63_is_rejected_without_allocating() {
        let mut bytes = (1u64 << 63).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let msg = open_error(&bytes);
        assert!(msg.contains(&format!("header length {}", 1u64 << 63)) && msg.contains("limit"), "{msg}");
    }

    #[test]
    fn header_length_above_the_cap_is_rejected_even_when_the_file_is_that_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        let header_len = MAX_HEADER_BYTES + 1;
        let file = File::create(&path).unwrap();
        // Sparse: costs no disk.
        file.set_len(8 + header_len).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &header_len.to_le_bytes()))
            .unwrap();
        let msg = open(&path).err().unwrap().to_string();
        assert!(msg.contains("exceeds the 100000000-byte limit"), "{msg}");
    }

    #[test]
    fn header_not_utf8_or_not_json_or_not_an_object() {
        let mut bad_utf8 = safetensors_bytes("{\"ab\":{}}", &[]);
        bad_utf8[10] = 0xff;
        assert!(open_error(&bad_utf8).contains("not valid UTF-8 (byte 2)"));
        assert!(open_error(&safetensors_bytes("{\"a\":", &[])).contains("not a valid JSON object"));
        assert!(open_error(&safetensors_bytes("[1,2]", &[])).contains("not a valid JSON object"));
        let msg = open_error(&safetensors_bytes(r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, &[0; 4]));
        assert!(msg.contains("tensor 'w': malformed header entry"), "{msg}");
        let msg = open_error(&safetensors_bytes(r#"{"__metadata__":{"n":1}}"#, &[]));
        assert!(msg.contains("__metadata__ must map strings to strings"), "{msg}");
    }

    #[test]
    fn unknown_dtype_is_named() {
        let header = r#"{"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}"#;
        let (_dir, path) = file_with(&safetensors_bytes(header, &[0; 4]));
        let err = open(&path).err().unwrap();
        assert!(matches!(err.kind, ErrorKind::Unsupported(_)));
        let msg = err.to_string();
        assert!(msg.contains("tensor 'w' has dtype 'F8_E4M3'") && msg.contains("BF16"), "{msg}");
    }

    #[test]
    fn byte_range_must_match_shape_and_dtype() {
        let header = r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#;
        let msg = open_error(&safetensors_bytes(header, &[0; 20]));
        assert!(
            msg.contains("tensor 'w': shape [2, 3] of F32 needs 24 bytes but data offsets [0, 20) span 20"),
            "{msg}"
        );
        let header = format!(r#"{{"w":{{"dtype":"F64","shape":[{},4],"data_offsets":[0,0]}}}}"#, u64::MAX / 2);
        assert!(open_error(&safetensors_bytes(&header, &[])).contains("overflows"));
    }

    #[test]
    fn offsets_outside_the_data_section() {
        let header = r#"{"w":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#;
        let msg = open_error(&safetensors_bytes(header, &[0; 8]));
        assert!(msg.contains("tensor 'w': data offsets [4, 12) lie outside the data section of 8 bytes"), "{msg}");
        let header = r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[5,4]}}"#;
        assert!(open_error(&safetensors_bytes(header, &[0; 8])).contains("[5, 4) lie outside"));
        let header = format!(r#"{{"w":{{"dtype":"U8","shape":[1],"data_offsets":[{},{}]}}}}"#, u64::MAX - 1, u64::MAX);
        assert!(open_error(&safetensors_bytes(&header, &[0; 8])).contains("lie outside"));
    }

    #[test]
    fn overlapping_ranges_name_both_tensors() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let msg = open_error(&safetensors_bytes(header, &[0; 12]));
        assert!(msg.contains("tensors 'a' [0, 8) and 'b' [4, 12) overlap"), "{msg}");
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(open_error(&safetensors_bytes(header, &[0; 8])).contains("overlap"));
    }

    #[test]
    fn gaps_and_trailing_bytes_are_errors() {
        let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[6,10]}}"#;
        let msg = open_error(&safetensors_bytes(header, &[0; 10]));
        assert!(msg.contains("2 unused bytes between 'a' and 'b'"), "{msg}");
        let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(open_error(&safetensors_bytes(header, &[0; 8]))
            .contains("4 unused bytes between the start of the data section and 'a'"));
        let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(open_error(&safetensors_bytes(header, &[0; 7])).contains("3 unused bytes after the last tensor"));
    }
}
