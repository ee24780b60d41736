//! Streaming safetensors writer: tensors go straight to disk in plan order, split into shards the way
//! transformers' `save_pretrained` splits them.
//!
//! The whole plan (names, types, shapes) is known up front, so each shard's header is written before its
//! data and no tensor is ever held back in memory. Every shard goes through an [`AtomicFile`] and all of
//! them are committed only by [`Writer::finish`], the index last; a writer dropped before that, or one whose
//! write failed, leaves nothing behind.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::dtype::Dtype;
use super::reader::{LENGTH_PREFIX_BYTES, MAX_HEADER_BYTES};
use super::sharded::{IndexMetadata, IndexOut};
use super::{INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::error::{Error, IoContext, Result};
use crate::output::AtomicFile;

/// One tensor the writer will be given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

pub struct Writer {
    dir: PathBuf,
    plan: Vec<TensorPlan>,
    /// Data bytes of each planned tensor.
    sizes: Vec<u64>,
    shards: Vec<Shard>,
    /// Index into `plan` of the tensor `write_tensor` expects next.
    next: usize,
    /// Bytes of that tensor already written by [`Writer::write_tensor_part`].
    next_written: u64,
    written: Vec<AtomicFile>,
    /// The shard being written and its index in `shards`.
    current: Option<AtomicFile>,
    current_shard: usize,
    /// Set when a write failed; the partial output has been discarded.
    failed: bool,
}

struct Shard {
    file_name: String,
    /// Indices into the plan.
    tensors: Range<usize>,
    /// Length prefix, JSON and padding.
    header: Vec<u8>,
}

impl Writer {
    /// Plans the output in `dest_dir` (created if missing): `model.safetensors` when everything fits in one
    /// shard, otherwise `model-00001-of-0000N.safetensors` files and `model.safetensors.index.json`.
    /// A new shard starts when the next tensor would push a non-empty one past `max_shard_bytes`.
    pub fn create(
        dest_dir: impl AsRef<Path>,
        plan: Vec<TensorPlan>,
        metadata: BTreeMap<String, String>,
        max_shard_bytes: Option<u64>,
    ) -> Result<Writer> {
        let dir = dest_dir.as_ref().to_path_buf();
        let sizes = plan_sizes(&dir, &plan)?;
        let groups = assign_shards(&sizes, max_shard_bytes);
        let count = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| {
                let file_name = if count == 1 {
                    SINGLE_FILE_NAME.to_string()
                } else {
                    format!("model-{:05}-of-{count:05}.safetensors", i + 1)
                };
                let header = encode_header(&plan[tensors.clone()], &sizes[tensors.clone()], &metadata)
                    .map_err(|msg| Error::invalid(dir.join(&file_name), msg))?;
                Ok(Shard { file_name, tensors, header })
            })
            .collect::<Result<Vec<_>>>()?;
        std::fs::create_dir_all(&dir).at(&dir)?;
        let mut writer = Writer {
            dir,
            plan,
            sizes,
            shards,
            next: 0,
            next_written: 0,
            written: Vec::new(),
            current: None,
            current_shard: 0,
            failed: false,
        };
        writer.current = Some(writer.start_shard(0)?);
        Ok(writer)
    }

    /// Writes the next tensor of the plan: `name` must be that tensor and `data` exactly its bytes.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, true)
    }

    /// Writes the next bytes of the next tensor of the plan, so a large tensor never has to be held whole:
    /// parts of `name` follow one another until they add up to its size, and only then may the next
    /// tensor start.
    pub fn write_tensor_part(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, false)
    }

    fn write(&mut self, name: &str, data: &[u8], whole: bool) -> Result<()> {
        if self.failed {
            return Err(Error::invalid(&self.dir, "an earlier write failed; the output was discarded"));
        }
        let result = self.write_next(name, data, whole);
        if result.is_err() {
            self.failed = true;
            self.written.clear();
            self.current = None;
        }
        result
    }

    fn write_next(&mut self, name: &str, data: &[u8], whole: bool) -> Result<()> {
        let shard = self.shard_of(self.next);
        let Some(expected) = self.plan.get(self.next) else {
            return Err(
                self.error(shard, format!("tensor '{name}' is not in the plan (all planned tensors are written)"))
            );
        };
        if expected.name != name {
            return Err(
                self.error(shard, format!("expected tensor '{}' next (plan order), got '{name}'", expected.name))
            );
        }
        let (size, before) = (self.sizes[self.next], self.next_written);
        let after = before + data.len() as u64;
        if (whole && (before != 0 || after != size)) || after > size {
            let got = if whole { format!("{}", data.len()) } else { format!("{after} in parts") };
            return Err(self.error(shard, format!("tensor '{name}' should be {size} bytes, got {got}")));
        }
        if shard != self.current_shard {
            let next_shard = self.start_shard(shard)?;
            self.written.extend(self.current.replace(next_shard));
            self.current_shard = shard;
        }
        let file = self.current.as_mut().expect("a shard is open while writing");
        let path = file.dest().to_path_buf();
        file.write_all(data).at(path)?;
        if after == size {
            self.next += 1;
            self.next_written = 0;
        } else {
            self.next_written = after;
        }
        Ok(())
    }

    /// Commits every shard, then (when sharded) the index.
    pub fn finish(mut self) -> Result<()> {
        if self.failed {
            return Err(Error::invalid(&self.dir, "an earlier write failed; the output was discarded"));
        }
        if let Some(missing) = self.plan.get(self.next) {
            let msg = format!(
                "{} planned tensors were never written, starting with '{}'",
                self.plan.len() - self.next,
                missing.name
            );
            return Err(Error::invalid(self.dir.join(&self.shards[self.shard_of(self.next)].file_name), msg));
        }
        self.written.extend(self.current.take());
        for file in std::mem::take(&mut self.written) {
            file.commit()?;
        }
        if self.shards.len() > 1 {
            self.write_index()?;
        }
        Ok(())
    }

    fn write_index(&self) -> Result<()> {
        let path = self.dir.join(INDEX_FILE_NAME);
        let weight_map = self
            .shards
            .iter()
            .flat_map(|s| self.plan[s.tensors.clone()].iter().map(|t| (t.name.as_str(), s.file_name.as_str())))
            .collect();
        let index = IndexOut { metadata: IndexMetadata { total_size: self.sizes.iter().sum() }, weight_map };
        let mut json = serde_json::to_string_pretty(&index).expect("an index serializes");
        json.push('\n');
        let mut file = AtomicFile::create(&path)?;
        file.write_all(json.as_bytes()).at(&path)?;
        file.commit()
    }

    fn start_shard(&self, shard: usize) -> Result<AtomicFile> {
        let path = self.dir.join(&self.shards[shard].file_name);
        let mut file = AtomicFile::create(&path)?;
        file.write_all(&self.shards[shard].header).at(&path)?;
        Ok(file)
    }

    /// The shard holding plan entry `tensor`; the last shard once the plan is exhausted.
    fn shard_of(&self, tensor: usize) -> usize {
        self.shards.iter().position(|s| s.tensors.contains(&tensor)).unwrap_or(self.shards.len() - 1)
    }

    fn error(&self, shard: usize, msg: String) -> Error {
        Error::invalid(self.dir.join(&self.shards[shard].file_name), msg)
    }
}

/// Bytes of each planned tensor, after checking the plan names each tensor once.
fn plan_sizes(dir: &Path, plan: &[TensorPlan]) -> Result<Vec<u64>> {
    let mut seen = HashSet::new();
    plan.iter()
        .map(|t| {
            if t.name == "__metadata__" || !seen.insert(t.name.as_str()) {
                return Err(Error::invalid(dir, format!("tensor name '{}' is reserved or planned twice", t.name)));
            }
            t.shape
                .iter()
                .try_fold(t.dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| Error::invalid(dir, format!("tensor '{}': shape {:?} overflows", t.name, t.shape)))
        })
        .collect()
}

/// Greedy split in plan order, as transformers' `save_pretrained` does; always at least one shard.
fn assign_shards(sizes: &[u64], max_shard_bytes: Option<u64>) -> Vec<Range<usize>> {
    // Real plans total far less than 2^64 bytes, so "no limit" is the largest limit.
    let max = max_shard_bytes.unwrap_or(u64::MAX);
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes.checked_add(size).is_none_or(|total| total > max) {
            shards.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(size);
    }
    shards.push(start..sizes.len());
    shards
}

/// The length prefix and JSON header, padded with spaces to a multiple of 8 bytes as the reference writer
/// does, so the data section starts aligned. Readers locate data by offsets, so key order is free.
fn encode_header(
    tensors: &[TensorPlan],
    sizes: &[u64],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let mut entries = serde_json::Map::new();
    if !metadata.is_empty() {
        entries.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0u64;
    for (t, &size) in tensors.iter().zip(sizes) {
        let end = offset.checked_add(size).ok_or("the planned tensors total more than 2^64 bytes")?;
        let entry = serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]});
        entries.insert(t.name.clone(), entry);
        offset = end;
    }
    let mut json = serde_json::to_vec(&entries).expect("a header serializes");
    json.resize(json.len().next_multiple_of(LENGTH_PREFIX_BYTES), b' ');
    if json.len() as u64 > MAX_HEADER_BYTES {
        return Err(format!("header of {} bytes exceeds the {MAX_HEADER_BYTES}-byte limit", json.len()));
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    Ok(header)
}

/// Parses a shard size such as `5GB` (10^9 bytes, as transformers counts), `2GiB` (2^30), `500MB`, `100kB`,
/// `1.5GB` or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier);
    }
    let value = number.parse::<f64>().ok()? * multiplier as f64;
    (value.is_finite() && value < u64::MAX as f64).then(|| value.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(specs: &[(&str, Dtype, &[usize])]) -> Vec<TensorPlan> {
        specs
            .iter()
            .map(|&(name, dtype, shape)| TensorPlan { name: name.into(), dtype, shape: shape.to_vec() })
            .collect()
    }

    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a single shard is a one-range list here
    fn greedy_sharding() {
        assert_eq!(assign_shards(&[5, 5, 5], None), [0..3]);
        assert_eq!(assign_shards(&[], Some(10)), [0..0]);
        assert_eq!(assign_shards(&[4, 6, 1], Some(10)), [0..2, 2..3]);
        // A tensor larger than the limit sits alone; so does one after it that would overflow.
        assert_eq!(assign_shards(&[3, 50, 8, 2, 0], Some(10)), [0..1, 1..2, 2..5]);
        assert_eq!(assign_shards(&[50], Some(10)), [0..1]);
        assert_eq!(assign_shards(&[u64::MAX, u64::MAX], Some(u64::MAX)), [0..1, 1..2]);
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("3MiB"), Some(3 << 20));
        assert_eq!(parse_size("100kB"), Some(100_000));
        assert_eq!(parse_size("100KiB"), Some(102_400));
        assert_eq!(parse_size("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_size(" 10 gb "), Some(10_000_000_000));
        assert_eq!(parse_size("1TB"), Some(1_000_000_000_000));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("123B"), Some(123));
        for bad in ["", "GB", "5XB", "-1GB", "1.2.3MB", "5 G B", "99999999999999999999TB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn header_is_padded_to_eight_bytes_with_spaces() {
        for name in ["a", "ab", "abc", "abcdefgh"] {
            let header = encode_header(&plan(&[(name, Dtype::F32, &[1])]), &[4], &BTreeMap::new()).unwrap();
            let len = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
            assert_eq!(header.len(), 8 + len);
            assert_eq!(len % 8, 0);
            let json = std::str::from_utf8(&header[8..]).unwrap();
            assert!(json.trim_end().ends_with('}') && json.len() - json.trim_end().len() < 8, "{json:?}");
        }
    }

    #[test]
    fn dropping_an_unfinished_writer_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::create(
            dir.path(),
            plan(&[("a", Dtype::U8, &[4]), ("b", Dtype::U8, &[4])]),
            BTreeMap::new(),
            Some(4),
        )
        .unwrap();
        writer.write_tensor("a", &[1; 4]).unwrap();
        writer.write_tensor("b", &[2; 4]).unwrap();
        assert!(entries(dir.path()) > 0, "temporary shards exist while writing");
        drop(writer);
        assert_eq!(entries(dir.path()), 0);
    }

    #[test]
    fn a_failed_write_discards_the_output_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let specs: &[(&str, Dtype, &[usize])] = &[("a", Dtype::F32, &[2]), ("b", Dtype::F32, &[2])];
        let mut writer = Writer::create(dir.path(), plan(specs), BTreeMap::new(), Some(8)).unwrap();
        writer.write_tensor("a", &[0; 8]).unwrap();
        let err = writer.write_tensor("b", &[0; 7]).unwrap_err().to_string();
        let shard = dir.path().join("model-00002-of-00002.safetensors");
        assert_eq!(err, format!("{}: tensor 'b' should be 8 bytes, got 7", shard.display()));
        assert_eq!(entries(dir.path()), 0);
        assert!(writer.write_tensor("b", &[0; 8]).unwrap_err().to_string().contains("earlier write failed"));
        assert!(writer.finish().is_err());
        assert_eq!(entries(dir.path()), 0);
    }

    #[test]
    fn tensors_must_come_in_plan_order_and_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let specs: &[(&str, Dtype, &[usize])] = &[("a", Dtype::U8, &[1]), ("b", Dtype::U8, &[1])];
        let mut writer = Writer::create(dir.path(), plan(specs), BTreeMap::new(), None).unwrap();
        let err = writer.write_tensor("b", &[0]).unwrap_err().to_string();
        assert!(err.contains("expected tensor 'a' next (plan order), got 'b'"), "{err}");

        let mut writer = Writer::create(dir.path(), plan(specs), BTreeMap::new(), None).unwrap();
        writer.write_tensor("a", &[0]).unwrap();
        let err = writer.finish().unwrap_err().to_string();
        assert!(err.contains("1 planned tensors were never written, starting with 'b'"), "{err}");
        assert_eq!(entries(dir.path()), 0);

        let mut writer = Writer::create(dir.path(), plan(&specs[..1]), BTreeMap::new(), None).unwrap();
        writer.write_tensor("a", &[0]).unwrap();
        assert!(writer.write_tensor("a", &[0]).unwrap_err().to_string().contains("not in the plan"));
    }

    #[test]
    fn plans_with_repeated_or_reserved_names_or_overflowing_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for specs in [
            &[("a", Dtype::U8, &[1][..]), ("a", Dtype::U8, &[1][..])][..],
            &[("__metadata__", Dtype::U8, &[1][..])][..],
            &[("huge", Dtype::F64, &[usize::MAX, 2][..])][..],
        ] {
            let err = Writer::create(dir.path(), plan(specs), BTreeMap::new(), None).err().unwrap().to_string();
            assert!(err.starts_with(&dir.path().display().to_string()), "{err}");
        }
        assert_eq!(entries(dir.path()), 0);
    }

    #[test]
    fn an_empty_plan_writes_a_valid_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        Writer::create(dir.path(), Vec::new(), BTreeMap::new(), Some(10)).unwrap().finish().unwrap();
        let bytes = std::fs::read(dir.path().join(SINGLE_FILE_NAME)).unwrap();
        assert!(safetensors::SafeTensors::deserialize(&bytes).unwrap().is_empty());
        assert!(super::super::Checkpoint::open(dir.path()).unwrap().tensor_names().is_empty());
    }
}
