//! A checkpoint: one or more memory-mapped safetensors files seen as one name-sorted set of tensors, handed
//! out as zero-copy [`TensorRef`]s.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use super::dtype::{decode_to_f32, Dtype};
use super::reader::{self, Header, MappedFile};
use super::sharded::Index;
use super::{INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, Location>,
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug)]
struct Location {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// A tensor's bytes inside its file's memory map, with what is needed to interpret them.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// Little-endian elements, with no alignment promise.
    pub data: &'a [u8],
    /// The file holding the tensor.
    pub path: &'a Path,
}

impl TensorRef<'_> {
    pub fn n_elements(&self) -> usize {
        // Cannot overflow: validated against the file's size when the header was read.
        self.shape.iter().product()
    }

    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_numeric()?;
        let mut out = vec![0f32; self.n_elements()];
        self.to_f32_into(&mut out)?;
        Ok(out)
    }

    /// Decodes into `out`, which must hold exactly [`n_elements`](Self::n_elements) values.
    pub fn to_f32_into(&self, out: &mut [f32]) -> Result<()> {
        self.check_numeric()?;
        if out.len() != self.n_elements() {
            return Err(Error::invalid(
                self.path,
                format!(
                    "tensor '{}' has {} elements but the output buffer holds {}",
                    self.name,
                    self.n_elements(),
                    out.len()
                ),
            ));
        }
        decode_to_f32(self.dtype, self.data, out);
        Ok(())
    }

    fn check_numeric(&self) -> Result<()> {
        if self.dtype.is_numeric() {
            Ok(())
        } else {
            Err(Error::unsupported(
                self.path,
                format!("tensor '{}' is {}, which has no f32 value", self.name, self.dtype),
            ))
        }
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either
    /// (`model.safetensors` first, as transformers looks for it).
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        if path.is_dir() {
            let single = path.join(SINGLE_FILE_NAME);
            let index = path.join(INDEX_FILE_NAME);
            if single.is_file() {
                Self::open_single(&single)
            } else if index.is_file() {
                Self::open_index(&index)
            } else {
                Err(Error::invalid(path, format!("directory holds neither {SINGLE_FILE_NAME} nor {INDEX_FILE_NAME}")))
            }
        } else if path.extension().is_some_and(|e| e == "json") {
            Self::open_index(path)
        } else {
            Self::open_single(path)
        }
    }

    fn open_single(path: &Path) -> Result<Checkpoint> {
        Self::from_files(vec![reader::open(path)?])
    }

    fn open_index(path: &Path) -> Result<Checkpoint> {
        let index = Index::read(path)?;
        let shards = index.shards()?;
        let opened = shards.iter().map(|(_, path)| reader::open(path)).collect::<Result<Vec<_>>>()?;
        let checkpoint = Self::from_files(opened)?;
        index.check_against(|tensor| checkpoint.tensors.get(tensor).map(|loc| shards[loc.file].0))?;
        Ok(checkpoint)
    }

    fn from_files(opened: Vec<(MappedFile, Header)>) -> Result<Checkpoint> {
        let mut files: Vec<MappedFile> = Vec::with_capacity(opened.len());
        let mut tensors: BTreeMap<String, Location> = BTreeMap::new();
        let mut metadata = None;
        for (file_index, (file, header)) in opened.into_iter().enumerate() {
            if file_index == 0 {
                metadata = header.metadata;
            }
            for entry in header.tensors {
                if let Some(earlier) = tensors.get(&entry.name) {
                    let earlier_path = files[earlier.file].path.display();
                    return Err(Error::invalid(
                        &file.path,
                        format!("tensor '{}' is also in {earlier_path}", entry.name),
                    ));
                }
                let location =
                    Location { file: file_index, dtype: entry.dtype, shape: entry.shape, range: entry.range };
                tensors.insert(entry.name, location);
            }
            files.push(file);
        }
        Ok(Checkpoint { files, tensors, metadata })
    }

    /// Sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }

    pub fn tensor(&self, name: &str) -> Option<TensorRef<'_>> {
        self.tensors.get_key_value(name).map(|(name, loc)| self.tensor_ref(name, loc))
    }

    /// Sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef<'_>> {
        self.tensors.iter().map(|(name, loc)| self.tensor_ref(name, loc))
    }

    /// The `__metadata__` of the first file (by name, for a sharded checkpoint).
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Sum of all tensors' data bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|loc| loc.range.len() as u64).sum()
    }

    /// Tells the OS the tensor's pages are not needed any more, so streaming through a checkpoint larger
    /// than RAM keeps the resident set bounded. Best effort; the data stays readable (it is re-read from the
    /// file if touched again).
    pub fn release(&self, name: &str) {
        self.release_part(name, 0..u64::MAX);
    }

    /// [`release`](Self::release) for the bytes `part` of the tensor's data only (clamped to its end).
    pub fn release_part(&self, name: &str, part: Range<u64>) {
        #[cfg(unix)]
        if let Some(loc) = self.tensors.get(name) {
            let end = part.end.min(loc.range.len() as u64);
            if part.start < end {
                // SAFETY: the map is read-only and file-backed, so dropping its pages discards nothing that
                // is not in the file; touching them again faults the same bytes back in, which keeps every
                // outstanding `TensorRef` valid.
                let _ = unsafe {
                    self.files[loc.file].map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        loc.range.start + part.start as usize,
                        (end - part.start) as usize,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (name, part);
    }

    fn tensor_ref<'a>(&'a self, name: &'a str, loc: &'a Location) -> TensorRef<'a> {
        let file = &self.files[loc.file];
        TensorRef { name, dtype: loc.dtype, shape: &loc.shape, data: &file.map[loc.range.clone()], path: &file.path }
    }
}
