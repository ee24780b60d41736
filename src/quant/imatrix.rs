//! llama.cpp importance-matrix files, read and written in both of its layouts.
//!
//! An importance matrix holds, for every linear weight, the sum of the squared inputs each of its
//! columns saw during calibration and how many input rows were summed; their quotient, the mean
//! squared activation, weights the quantization error per column.
//!
//! - GGUF (`llama-imatrix` default): metadata `general.type = "imatrix"`, `imatrix.datasets`,
//!   `imatrix.chunk_count`, `imatrix.chunk_size`; per weight `NAME.in_sum2` (F32, `[n_in, n_mat]`, raw
//!   sums) and `NAME.counts` (F32, `[1, n_mat]`, rows summed per matrix), tensors sorted by name.
//! - Legacy `.dat` (little-endian): `i32 n_entries`, then per entry `i32 len, name, i32 ncall, i32 nval,
//!   f32 values[nval]` where each value is `mean · ncall`; then, optionally, `i32 chunk_count` and
//!   `i32 len, dataset name`.
//!
//! Both are held as [`Imatrix`]: sums and counts whose quotient is the mean, which is what
//! llama-quantize feeds its encoders. Entries are keyed by GGUF tensor name; entries written under
//! Hugging Face names are mapped on reading.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use formats::gguf::{GgufFile, MetadataValue, TensorPlan};
use formats::output::AtomicFile;
use formats::GgmlType;

use crate::model::names;

const SUMS_SUFFIX: &str = ".in_sum2";
const COUNTS_SUFFIX: &str = ".counts";
const KEY_DATASETS: &str = "imatrix.datasets";
const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";

/// One weight's statistics; `counts.len()` matrices (experts) of `sums.len() / counts.len()` columns.
#[derive(Clone, Debug, PartialEq)]
pub struct ImatrixEntry {
    /// Σ x² per column, matrix after matrix.
    pub sums: Vec<f32>,
    /// Rows accumulated into each matrix's sums.
    pub counts: Vec<u64>,
}

impl ImatrixEntry {
    /// llama-quantize's importance: `sum / count` per column, 1 for a matrix that saw no rows.
    pub fn importance(&self) -> Vec<f32> {
        let columns = self.sums.len() / self.counts.len();
        self.sums
            .chunks(columns)
            .zip(&self.counts)
            .flat_map(|(sums, &count)| sums.iter().map(move |&s| if count > 0 { s / count as f32 } else { 1.0 }))
            .collect()
    }
}

/// A whole importance-matrix file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// The calibration files it was computed from.
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    /// Tokens per chunk; 0 when unknown (legacy files do not record it).
    pub chunk_size: u32,
}

impl Imatrix {
    /// Reads either layout (GGUF is recognised by its magic).
    pub fn read(path: &Path) -> Result<Self> {
        let cannot_read = || format!("{}: cannot read", path.display());
        let mut magic = Vec::with_capacity(4);
        let file = std::fs::File::open(path).with_context(cannot_read)?;
        file.take(4).read_to_end(&mut magic).with_context(cannot_read)?;
        let imatrix = if magic == formats::gguf::MAGIC {
            read_gguf(path)?
        } else {
            let bytes = std::fs::read(path).with_context(cannot_read)?;
            read_legacy(&bytes).with_context(|| format!("{}: not a GGUF or legacy .dat imatrix", path.display()))?
        };
        imatrix.check().with_context(|| format!("{}", path.display()))?;
        Ok(imatrix)
    }

    /// The importance vector for a GGUF tensor name, if the file has one.
    pub fn importance(&self, tensor: &str) -> Option<Vec<f32>> {
        self.entries.get(tensor).map(ImatrixEntry::importance)
    }

    fn check(&self) -> Result<()> {
        if self.entries.is_empty() {
            bail!("the importance matrix has no entries");
        }
        for (name, e) in &self.entries {
            if e.counts.is_empty() || e.sums.is_empty() || e.sums.len() % e.counts.len() != 0 {
                bail!("entry '{name}': {} sums do not split into {} matrices", e.sums.len(), e.counts.len());
            }
            if let Some(v) = e.sums.iter().find(|v| !v.is_finite() || **v < 0.0) {
                bail!("entry '{name}' holds {v}; sums of squares are finite and non-negative");
            }
        }
        Ok(())
    }

    /// Writes the GGUF layout, as `llama-imatrix` does by default.
    pub fn write_gguf(&self, path: &Path) -> Result<()> {
        self.check().with_context(|| format!("{}", path.display()))?;
        let metadata = vec![
            ("general.type".to_string(), MetadataValue::from("imatrix")),
            (KEY_DATASETS.to_string(), MetadataValue::string_array(self.datasets.iter().cloned())),
            (KEY_CHUNK_COUNT.to_string(), MetadataValue::U32(self.chunk_count)),
            (KEY_CHUNK_SIZE.to_string(), MetadataValue::U32(self.chunk_size)),
        ];
        // ggml drops trailing dimensions of 1, so a single matrix is stored 1-D.
        let dims = |inner: usize, n_mat: usize| {
            if n_mat == 1 {
                vec![inner as u64]
            } else {
                vec![inner as u64, n_mat as u64]
            }
        };
        let mut plan = Vec::new();
        for (name, e) in &self.entries {
            let n_mat = e.counts.len();
            plan.push(TensorPlan {
                name: format!("{name}{SUMS_SUFFIX}"),
                dims: dims(e.sums.len() / n_mat, n_mat),
                ggml_type: GgmlType::F32,
            });
            plan.push(TensorPlan {
                name: format!("{name}{COUNTS_SUFFIX}"),
                dims: dims(1, n_mat),
                ggml_type: GgmlType::F32,
            });
        }
        let mut writer = formats::gguf::GgufWriter::create(path, &metadata, plan)?;
        for (name, e) in &self.entries {
            writer.write_tensor(&format!("{name}{SUMS_SUFFIX}"), &f32_bytes(e.sums.iter().copied()))?;
            writer.write_tensor(&format!("{name}{COUNTS_SUFFIX}"), &f32_bytes(e.counts.iter().map(|&c| c as f32)))?;
        }
        writer.finish()?;
        Ok(())
    }

    /// Writes the legacy `.dat` layout. Each value becomes `mean · ncall`, with `ncall` the chunks the
    /// busiest matrix saw (its row count when the chunk size is unknown), as `llama-imatrix` does.
    pub fn write_legacy(&self, path: &Path) -> Result<()> {
        self.check().with_context(|| format!("{}", path.display()))?;
        let fail =
            |what: &str| anyhow::anyhow!("{}: {what} does not fit the legacy format's 32-bit fields", path.display());
        let i32_of = |n: u64, what: &str| i32::try_from(n).map_err(|_| fail(what));
        let mut out = Vec::new();
        let stored: Vec<_> = self.entries.iter().filter(|(_, e)| e.counts.iter().any(|&c| c > 0)).collect();
        out.extend(i32_of(stored.len() as u64, "the entry count")?.to_le_bytes());
        for (name, e) in stored {
            out.extend(i32_of(name.len() as u64, "a name")?.to_le_bytes());
            out.extend(name.as_bytes());
            let busiest = e.counts.iter().copied().max().unwrap_or(0);
            let ncall = match u64::from(self.chunk_size) {
                0 => busiest,
                chunk => busiest.div_ceil(chunk),
            };
            out.extend(i32_of(ncall, "a call count")?.to_le_bytes());
            out.extend(i32_of(e.sums.len() as u64, "an entry's size")?.to_le_bytes());
            let columns = e.sums.len() / e.counts.len();
            for (sums, &count) in e.sums.chunks(columns).zip(&e.counts) {
                for &s in sums {
                    // Matrices that saw no rows store 1, llama-imatrix's neutral value.
                    let v = match count {
                        0 => ncall as f32,
                        c if c == ncall => s,
                        c => s / c as f32 * ncall as f32,
                    };
                    out.extend(v.to_le_bytes());
                }
            }
        }
        out.extend(i32_of(self.chunk_count.into(), "the chunk count")?.to_le_bytes());
        let dataset = self.datasets.last().map_or("", String::as_str);
        out.extend(i32_of(dataset.len() as u64, "the dataset name")?.to_le_bytes());
        out.extend(dataset.as_bytes());
        let mut file = AtomicFile::create(path)?;
        file.write_all(&out).with_context(|| format!("{}: cannot write", path.display()))?;
        file.commit()?;
        Ok(())
    }
}

fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

/// GGUF names are kept; Hugging Face names (as some tools write) become their GGUF names.
fn gguf_name(name: &str) -> String {
    names::hf_to_gguf(name).unwrap_or_else(|| name.to_string())
}

fn read_gguf(path: &Path) -> Result<Imatrix> {
    let file = GgufFile::open(path)?;
    let fail = |msg: String| anyhow::anyhow!("{}: {msg}", path.display());
    let u32_key =
        |key: &str| file.get(key).and_then(MetadataValue::as_u64).map_or(0, |v| v.min(u32::MAX as u64) as u32);
    let datasets = match file.get(KEY_DATASETS).and_then(MetadataValue::as_array) {
        Some(a) => a.items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        None => Vec::new(),
    };
    let mut pairs: BTreeMap<&str, (Option<_>, Option<_>)> = BTreeMap::new();
    for t in file.tensors() {
        if let Some(name) = t.name.strip_suffix(SUMS_SUFFIX) {
            pairs.entry(name).or_default().0 = Some(t);
        } else if let Some(name) = t.name.strip_suffix(COUNTS_SUFFIX) {
            pairs.entry(name).or_default().1 = Some(t);
        }
    }
    let mut entries = BTreeMap::new();
    for (name, pair) in pairs {
        let (Some(sums), Some(counts)) = pair else {
            return Err(fail(format!("'{name}' needs both {name}{SUMS_SUFFIX} and {name}{COUNTS_SUFFIX}")));
        };
        if sums.ggml_type != GgmlType::F32 || counts.ggml_type != GgmlType::F32 {
            return Err(fail(format!("'{name}': sums and counts must be F32")));
        }
        let counts = file.dequantize(counts)?;
        if let Some(c) = counts.iter().find(|c| !c.is_finite() || **c < 0.0) {
            return Err(fail(format!("entry '{name}' has row count {c}")));
        }
        // llama.cpp reads counts with lround.
        let counts = counts.iter().map(|&c| c.round() as u64).collect();
        entries.insert(gguf_name(name), ImatrixEntry { sums: file.dequantize(sums)?, counts });
    }
    Ok(Imatrix { entries, datasets, chunk_count: u32_key(KEY_CHUNK_COUNT), chunk_size: u32_key(KEY_CHUNK_SIZE) })
}

/// Bounds-checked little-endian reads over the legacy file.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("truncated: {what} at byte {} needs {n} bytes, the file has {}", self.at, self.bytes.len() - self.at);
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    /// A length or count: non-negative, and `unit` bytes per item must fit in what is left.
    fn len(&mut self, unit: usize, what: &str) -> Result<usize> {
        let n = self.i32(what)?;
        let left = self.bytes.len() - self.at;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(unit) <= left => Ok(n),
            _ => bail!("{what} is {n}, but only {left} bytes follow"),
        }
    }

    fn at_end(&self) -> bool {
        self.at == self.bytes.len()
    }
}

fn read_legacy(bytes: &[u8]) -> Result<Imatrix> {
    let mut c = Cursor { bytes, at: 0 };
    // Every entry takes at least 16 bytes (three counts, one value).
    let n_entries = c.len(16, "the entry count")?;
    let mut entries = BTreeMap::new();
    for i in 0..n_entries {
        let len = c.len(1, "a name length")?;
        let name = std::str::from_utf8(c.take(len, "a name")?)
            .map_err(|_| anyhow::anyhow!("entry {i}: the name is not UTF-8"))?
            .to_string();
        let ncall = c.i32("a call count")?;
        let nval = c.len(4, "a value count")?;
        if nval == 0 {
            bail!("entry '{name}' has no values");
        }
        let sums = c
            .take(nval * 4, "values")?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        // Stored values are mean · ncall; a count of ncall makes their quotient the mean. llama-quantize
        // uses values as they are when ncall is not positive, which a count of 1 reproduces.
        let counts = vec![u64::try_from(ncall).ok().filter(|&n| n > 0).unwrap_or(1)];
        if entries.insert(gguf_name(&name), ImatrixEntry { sums, counts }).is_some() {
            bail!("entry '{name}' appears twice");
        }
    }
    let mut imatrix = Imatrix { entries, ..Imatrix::default() };
    if !c.at_end() {
        imatrix.chunk_count = c.i32("the chunk count")?.max(0) as u32;
        if !c.at_end() {
            let len = c.len(1, "the dataset name length")?;
            let name = String::from_utf8_lossy(c.take(len, "the dataset name")?).into_owned();
            if !name.is_empty() {
                imatrix.datasets.push(name);
            }
        }
    }
    Ok(imatrix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Imatrix {
        let mut entries = BTreeMap::new();
        entries.insert(
            "blk.0.attn_q.weight".to_string(),
            ImatrixEntry { sums: vec![2.0, 4.0, 8.0, 0.5], counts: vec![4] },
        );
        entries.insert(
            "blk.0.ffn_down_exps.weight".to_string(),
            ImatrixEntry { sums: vec![3.0, 6.0, 9.0, 12.0, 5.0, 5.0], counts: vec![3, 0, 5] },
        );
        Imatrix { entries, datasets: vec!["calib.txt".into()], chunk_count: 2, chunk_size: 2 }
    }

    #[test]
    fn importance_is_the_mean_and_one_for_unseen_matrices() {
        let m = sample();
        assert_eq!(m.importance("blk.0.attn_q.weight").unwrap(), vec![0.5, 1.0, 2.0, 0.125]);
        assert_eq!(m.importance("blk.0.ffn_down_exps.weight").unwrap(), vec![1.0, 2.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(m.importance("blk.1.attn_q.weight"), None);
    }

    #[test]
    fn gguf_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        sample().write_gguf(&path).unwrap();
        assert_eq!(Imatrix::read(&path).unwrap(), sample());
        let file = GgufFile::open(&path).unwrap();
        let names: Vec<_> = file.tensors().iter().map(|t| (t.name.as_str(), t.dims.clone())).collect();
        assert_eq!(
            names,
            [
                ("blk.0.attn_q.weight.in_sum2", vec![4]),
                ("blk.0.attn_q.weight.counts", vec![1]),
                ("blk.0.ffn_down_exps.weight.in_sum2", vec![2, 3]),
                ("blk.0.ffn_down_exps.weight.counts", vec![1, 3]),
            ]
        );
        assert_eq!(file.get("general.type").and_then(|v| v.as_str()), Some("imatrix"));
    }

    #[test]
    fn legacy_round_trip_keeps_the_importance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.dat");
        let m = sample();
        m.write_legacy(&path).unwrap();
        let back = Imatrix::read(&path).unwrap();
        assert_eq!(back.datasets, m.datasets);
        assert_eq!(back.chunk_count, m.chunk_count);
        for name in m.entries.keys() {
            let (a, b) = (m.importance(name).unwrap(), back.importance(name).unwrap());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * x.abs(), "{name}: {a:?} vs {b:?}");
            }
        }
        // Written again, the legacy file is byte-identical (no drift through the ncall scaling).
        let again = dir.path().join("again.dat");
        back.write_legacy(&again).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
    }

    #[test]
    fn legacy_layout_matches_llama_cpp() {
        // One entry, "a", ncall 3, values [6, 9] (means 2 and 3), 7 chunks, dataset "d.txt".
        let mut bytes = Vec::new();
        bytes.extend(1i32.to_le_bytes());
        bytes.extend(1i32.to_le_bytes());
        bytes.extend(b"a");
        bytes.extend(3i32.to_le_bytes());
        bytes.extend(2i32.to_le_bytes());
        bytes.extend(6f32.to_le_bytes());
        bytes.extend(9f32.to_le_bytes());
        bytes.extend(7i32.to_le_bytes());
        bytes.extend(5i32.to_le_bytes());
        bytes.extend(b"d.txt");
        let m = read_legacy(&bytes).unwrap();
        assert_eq!(m.importance("a").unwrap(), vec![2.0, 3.0]);
        assert_eq!((m.chunk_count, m.datasets.as_slice()), (7, ["d.txt".to_string()].as_slice()));
        // The trailer is optional.
        let m = read_legacy(&bytes[..bytes.len() - 13]).unwrap();
        assert_eq!((m.chunk_count, m.datasets.len()), (0, 0));
    }

    #[test]
    fn hugging_face_names_are_mapped() {
        let mut bytes = Vec::new();
        let name = b"model.layers.3.mlp.down_proj.weight";
        bytes.extend(1i32.to_le_bytes());
        bytes.extend((name.len() as i32).to_le_bytes());
        bytes.extend(name);
        bytes.extend(1i32.to_le_bytes());
        bytes.extend(1i32.to_le_bytes());
        bytes.extend(4f32.to_le_bytes());
        let m = read_legacy(&bytes).unwrap();
        assert_eq!(m.importance("blk.3.ffn_down.weight"), Some(vec![4.0]));
    }

    #[test]
    fn bad_files_are_clean_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.dat");
        let cases: &[(&[u8], &str)] = &[
            (&[], "truncated"),
            (&1_000_000i32.to_le_bytes(), "entry count"),
            (&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "name length"),
        ];
        for (bytes, problem) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = format!("{:#}", Imatrix::read(&path).unwrap_err());
            assert!(err.contains(&path.display().to_string()) && err.contains(problem), "{err}");
        }
        let mut m = sample();
        m.entries.get_mut("blk.0.attn_q.weight").unwrap().sums[1] = f32::NAN;
        let gguf = dir.path().join("nan.gguf");
        let err = format!("{:#}", m.write_gguf(&gguf).unwrap_err());
        assert!(err.contains("blk.0.attn_q.weight") && err.contains("NaN"), "{err}");
    }
}
