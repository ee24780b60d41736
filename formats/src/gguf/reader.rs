//! [`GgufFile`]: an opened, fully validated GGUF file.
//!
//! The file is memory-mapped; metadata and tensor infos are parsed and checked once at open, and
//! tensor data is served as slices of the map, so only the pages a caller touches are read. Callers
//! streaming through a large file hand each tensor back with [`GgufFile::release`] to keep memory flat.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::parse::{parse, Header};
use super::tensor::TensorInfo;
use super::value::MetadataValue;
use crate::error::{Error, IoContext, Result};

pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).at(&path)?;
        // SAFETY: the map is read-only; like every mmap-based reader, this relies on the file not being
        // truncated or rewritten by another process while it is open.
        let map = unsafe { Mmap::map(&file) }.at(&path)?;
        let header = parse(&map).map_err(|p| p.into_error(&path))?;
        Ok(GgufFile { path, map, header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn alignment(&self) -> u64 {
        self.header.alignment
    }

    /// Start of the data section: the end of the tensor infos, rounded up to the alignment.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    /// All key/value pairs, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.header.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        let entry = self.header.metadata_index.find(&self.header.metadata, |(k, _)| k.as_str(), key)?;
        Some(&entry.1)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture")?.as_str()
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor_index.find(&self.header.tensors, |t| t.name.as_str(), name)
    }

    /// The tensor's bytes, as stored. `t` must be one of this file's [`tensors`](Self::tensors) (whose
    /// ranges were checked at open); an info describing bytes outside the file panics.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        match self.byte_range(t) {
            Some(range) => &self.map[range],
            None => panic!("tensor '{}' is not inside {}", t.name, self.path.display()),
        }
    }

    /// The tensor decoded to f32, in GGUF element order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let fail = |msg: String| Error::unsupported(&self.path, format!("tensor '{}': {msg}", t.name));
        let mut out = vec![0f32; t.n_elements() as usize];
        t.ggml_type.dequantize(self.tensor_data(t), &mut out).map_err(fail)?;
        Ok(out)
    }

    /// Drops the tensor's pages from this process's memory (best effort; the pages at its ends may be
    /// shared with neighbouring tensors and go too). Later reads of any bytes still work: they fault the
    /// pages back in from the file.
    pub fn release(&self, t: &TensorInfo) {
        self.release_part(t, 0..t.n_bytes());
    }

    /// [`release`](Self::release) for the bytes `part` of the tensor's data only.
    pub fn release_part(&self, t: &TensorInfo, part: Range<u64>) {
        #[cfg(unix)]
        if let Some(range) = self.byte_range(t).filter(|r| part.start < part.end && part.end <= r.len() as u64) {
            let start = range.start + part.start as usize;
            // SAFETY: the map is a read-only shared file mapping, so MADV_DONTNEED only discards clean
            // pages, which are re-read unchanged from the file on the next access; borrowed slices stay
            // valid. Failure just means the pages stay resident.
            let advice = memmap2::UncheckedAdvice::DontNeed;
            let _ = unsafe { self.map.unchecked_advise_range(advice, start, (part.end - part.start) as usize) };
        }
        #[cfg(not(unix))]
        let _ = (t, part);
    }

    fn byte_range(&self, t: &TensorInfo) -> Option<Range<usize>> {
        let start = self.header.data_offset.checked_add(t.offset)?;
        let end = start.checked_add(t.n_bytes())?;
        (end <= self.map.len() as u64).then_some(start as usize..end as usize)
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("metadata_entries", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}
