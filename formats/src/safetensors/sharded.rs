//! Sharded checkpoints: `model.safetensors.index.json`, whose `weight_map` names the shard file holding
//! each tensor (`{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`).
//!
//! The weight map must agree with the shards: every shard it names exists beside the index and holds the
//! tensors mapped to it. The shards' own headers are the authority on what they contain; a tensor a shard
//! holds but the map leaves out is still read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// What the writer puts in an index; key order matches transformers' `sort_keys=True`.
#[derive(Serialize)]
pub(super) struct IndexOut<'a> {
    pub metadata: IndexMetadata,
    pub weight_map: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
pub(super) struct IndexMetadata {
    pub total_size: u64,
}

pub(super) struct Index {
    pub path: PathBuf,
    weight_map: BTreeMap<String, String>,
}

impl Index {
    pub fn read(path: &Path) -> Result<Index> {
        let text = std::fs::read_to_string(path).at(path)?;
        let index: IndexFile = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(path, format!("not a safetensors index (JSON with a weight_map): {e}")))?;
        if index.weight_map.is_empty() {
            return Err(Error::invalid(path, "weight_map is empty"));
        }
        Ok(Index { path: path.to_path_buf(), weight_map: index.weight_map })
    }

    /// The shards the weight map names, sorted by file name, as (name, path beside the index).
    pub fn shards(&self) -> Result<Vec<(&str, PathBuf)>> {
        let dir = self.path.parent().unwrap_or(Path::new(""));
        let names: BTreeSet<&str> = self.weight_map.values().map(String::as_str).collect();
        names
            .into_iter()
            .map(|name| {
                let inside = Path::new(name).components().all(|c| matches!(c, Component::Normal(_)));
                if !inside {
                    return Err(
                        self.error(format!("weight_map names shard '{name}', which is outside the index's directory"))
                    );
                }
                let path = dir.join(name);
                if !path.is_file() {
                    return Err(self.error(format!("weight_map names shard '{name}', which does not exist")));
                }
                Ok((name, path))
            })
            .collect()
    }

    /// Checks every mapping against `holder`, which gives the shard (by name) that really holds a tensor.
    pub fn check_against<'a>(&self, holder: impl Fn(&str) -> Option<&'a str>) -> Result<()> {
        for (tensor, shard) in &self.weight_map {
            if holder(tensor) != Some(shard.as_str()) {
                return Err(
                    self.error(format!("weight_map puts tensor '{tensor}' in '{shard}', which does not contain it"))
                );
            }
        }
        Ok(())
    }

    fn error(&self, msg: String) -> Error {
        Error::invalid(&self.path, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Checkpoint, Dtype, TensorPlan, Writer, INDEX_FILE_NAME};
    use super::*;

    /// A valid three-shard checkpoint: tensors a, b, c, one per shard.
    fn sharded_checkpoint() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let plan = ["a", "b", "c"].map(|name| TensorPlan { name: name.into(), dtype: Dtype::U8, shape: vec![4] });
        let mut writer = Writer::create(dir.path(), plan.to_vec(), BTreeMap::new(), Some(4)).unwrap();
        for name in ["a", "b", "c"] {
            writer.write_tensor(name, name.repeat(4).as_bytes()).unwrap();
        }
        writer.finish().unwrap();
        dir
    }

    fn shard(i: usize) -> String {
        format!("model-0000{i}-of-00003.safetensors")
    }

    /// Rewrites the index's weight map and returns the error opening the checkpoint gives.
    fn error_with_weight_map(dir: &Path, weight_map: serde_json::Value) -> String {
        let index = dir.join(INDEX_FILE_NAME);
        std::fs::write(&index, serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string()).unwrap();
        Checkpoint::open(dir).expect_err("expected an error").to_string()
    }

    #[test]
    fn the_writers_index_opens() {
        let dir = sharded_checkpoint();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let shards: Vec<&Path> = checkpoint.tensors().map(|t| t.path).collect();
        let expected: Vec<PathBuf> = (1..=3).map(|i| dir.path().join(shard(i))).collect();
        assert_eq!(shards, expected);
        assert_eq!(checkpoint.tensor("b").unwrap().data, b"bbbb");
    }

    #[test]
    fn an_index_that_is_not_json_names_the_index() {
        let dir = sharded_checkpoint();
        let index = dir.path().join(INDEX_FILE_NAME);
        std::fs::write(&index, "{\"weight_map\": ").unwrap();
        let err = Checkpoint::open(&index).err().unwrap().to_string();
        assert!(err.starts_with(&format!("{}: not a safetensors index", index.display())), "{err}");
        std::fs::write(&index, "{\"metadata\": {}}").unwrap();
        assert!(Checkpoint::open(&index).err().unwrap().to_string().contains("missing field `weight_map`"));
        std::fs::write(&index, "{\"weight_map\": {}}").unwrap();
        assert!(Checkpoint::open(&index).err().unwrap().to_string().ends_with("weight_map is empty"));
    }

    #[test]
    fn a_missing_shard_is_named() {
        let dir = sharded_checkpoint();
        std::fs::remove_file(dir.path().join(shard(2))).unwrap();
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        let index = dir.path().join(INDEX_FILE_NAME);
        assert_eq!(err, format!("{}: weight_map names shard '{}', which does not exist", index.display(), shard(2)));
    }

    #[test]
    fn a_shard_outside_the_directory_is_refused() {
        let dir = sharded_checkpoint();
        let err = error_with_weight_map(dir.path(), serde_json::json!({"a": "../elsewhere.safetensors"}));
        assert!(err.contains("outside the index's directory"), "{err}");
    }

    #[test]
    fn a_tensor_its_shard_lacks_is_named() {
        let dir = sharded_checkpoint();
        let err = error_with_weight_map(dir.path(), serde_json::json!({"a": shard(1), "b": shard(3), "c": shard(3)}));
        assert!(
            err.ends_with(&format!("weight_map puts tensor 'b' in '{}', which does not contain it", shard(3))),
            "{err}"
        );
        let err = error_with_weight_map(dir.path(), serde_json::json!({"a": shard(1), "ghost": shard(1)}));
        assert!(err.contains("tensor 'ghost'"), "{err}");
    }

    /// Replaces shard `i` with one holding `tensors` (4-byte U8 each).
    fn replace_shard(dir: &Path, i: usize, tensors: &[(&str, &[u8; 4])]) {
        let plan =
            tensors.iter().map(|(name, _)| TensorPlan { name: name.to_string(), dtype: Dtype::U8, shape: vec![4] });
        let scratch = tempfile::tempdir().unwrap();
        let mut writer = Writer::create(scratch.path(), plan.collect(), BTreeMap::new(), None).unwrap();
        for (name, data) in tensors {
            writer.write_tensor(name, *data).unwrap();
        }
        writer.finish().unwrap();
        std::fs::rename(scratch.path().join("model.safetensors"), dir.join(shard(i))).unwrap();
    }

    #[test]
    fn a_tensor_in_two_shards_is_an_error() {
        let dir = sharded_checkpoint();
        replace_shard(dir.path(), 2, &[("a", b"AAAA"), ("b", b"bbbb")]);
        let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
        let expected = format!(
            "{}: tensor 'a' is also in {}",
            dir.path().join(shard(2)).display(),
            dir.path().join(shard(1)).display()
        );
        assert_eq!(err, expected);
    }

    #[test]
    fn tensors_a_shard_holds_beyond_the_weight_map_are_still_read() {
        let dir = sharded_checkpoint();
        replace_shard(dir.path(), 2, &[("b", b"bbbb"), ("extra", b"eeee")]);
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.tensor_names(), ["a", "b", "c", "extra"]);
        assert_eq!(checkpoint.tensor("extra").unwrap().data, b"eeee");
    }
}
