//! Writer -> reader round trips, checked against the official `safetensors` crate as an independent reader.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};

use super::*;

/// Values every test tensor is made of; small integers so every dtype holds them exactly.
fn values(n: usize, seed: usize) -> Vec<f64> {
    (0..n).map(|i| ((i * 7 + seed * 13) % 23) as f64 - 11.0).collect()
}

fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| match dtype {
            Dtype::F64 => v.to_le_bytes().to_vec(),
            Dtype::F32 => (v as f32).to_le_bytes().to_vec(),
            Dtype::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
            Dtype::BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
            Dtype::I64 => (v as i64).to_le_bytes().to_vec(),
            Dtype::I32 => (v as i32).to_le_bytes().to_vec(),
            Dtype::I16 => (v as i16).to_le_bytes().to_vec(),
            Dtype::I8 => (v as i8).to_le_bytes().to_vec(),
            Dtype::U8 => vec![v.abs() as u8],
            Dtype::Bool => vec![(v > 0.0) as u8],
        })
        .collect()
}

struct Planned {
    plan: TensorPlan,
    values: Vec<f64>,
    bytes: Vec<u8>,
}

fn planned(specs: &[(&str, Dtype, &[usize])]) -> Vec<Planned> {
    specs
        .iter()
        .enumerate()
        .map(|(seed, &(name, dtype, shape))| {
            let values = values(shape.iter().product(), seed);
            let bytes = encode(dtype, &values);
            Planned { plan: TensorPlan { name: name.into(), dtype, shape: shape.to_vec() }, values, bytes }
        })
        .collect()
}

fn write_all(dir: &Path, tensors: &[Planned], metadata: &BTreeMap<String, String>, max: Option<u64>) {
    let plan = tensors.iter().map(|t| t.plan.clone()).collect();
    let mut writer = Writer::create(dir, plan, metadata.clone(), max).unwrap();
    for t in tensors {
        writer.write_tensor(&t.plan.name, &t.bytes).unwrap();
    }
    writer.finish().unwrap();
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// Every planned tensor is in the checkpoint with its type, shape, bytes and values, and nothing else is.
fn assert_holds_exactly(checkpoint: &Checkpoint, tensors: &[Planned]) {
    let mut expected: Vec<&str> = tensors.iter().map(|t| t.plan.name.as_str()).collect();
    expected.sort();
    assert_eq!(checkpoint.tensor_names(), expected);
    let listed: Vec<&str> = checkpoint.tensors().map(|t| t.name).collect();
    assert_eq!(listed, expected);
    for t in tensors {
        let got = checkpoint.tensor(&t.plan.name).unwrap();
        assert_eq!((got.dtype, got.shape), (t.plan.dtype, t.plan.shape.as_slice()), "{}", t.plan.name);
        assert_eq!(got.data, t.bytes.as_slice(), "{}", t.plan.name);
        assert_eq!(got.n_elements(), t.values.len());
        if t.plan.dtype == Dtype::Bool {
            assert!(got.to_f32().is_err());
        } else {
            let want: Vec<f32> =
                t.values.iter().map(|&v| if t.plan.dtype == Dtype::U8 { v.abs() } else { v } as f32).collect();
            assert_eq!(got.to_f32().unwrap(), want, "{}", t.plan.name);
        }
    }
    let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    assert_eq!(checkpoint.total_bytes(), total as u64);
}

/// The official reader accepts the file and sees the same tensors in it.
fn assert_official_reader_agrees(path: &Path, checkpoint: &Checkpoint) {
    let bytes = std::fs::read(path).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(!theirs.is_empty());
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let their_metadata = header.metadata().clone().map(|m| m.into_iter().collect::<BTreeMap<_, _>>());
    assert_eq!(their_metadata.as_ref(), checkpoint.metadata());
    for (name, view) in theirs.tensors() {
        let ours = checkpoint.tensor(&name).unwrap();
        assert_eq!(ours.path, path);
        assert_eq!(format!("{:?}", view.dtype()), ours.dtype.name());
        assert_eq!(view.shape(), ours.shape);
        assert_eq!(view.data(), ours.data);
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(header_len % 8, 0, "header padded to 8 bytes");
}

const EVERY_DTYPE: &[(&str, Dtype, &[usize])] = &[
    ("model.embed.weight", Dtype::BF16, &[5, 3]),
    ("bytes", Dtype::U8, &[3]),
    ("layers.0.weight", Dtype::F32, &[2, 3]),
    ("layers.0.half", Dtype::F16, &[3, 1]),
    ("scalar", Dtype::F32, &[]),
    ("empty", Dtype::F32, &[0, 4]),
    ("double", Dtype::F64, &[2]),
    ("i64", Dtype::I64, &[2]),
    ("i32", Dtype::I32, &[3]),
    ("i16", Dtype::I16, &[3]),
    ("i8", Dtype::I8, &[4]),
    ("mask", Dtype::Bool, &[3]),
];

#[test]
fn single_file_round_trip_with_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = planned(EVERY_DTYPE);
    write_all(dir.path(), &tensors, &metadata(), None);
    assert_eq!(file_names(dir.path()), [SINGLE_FILE_NAME]);

    let file = dir.path().join(SINGLE_FILE_NAME);
    for opened in [Checkpoint::open(dir.path()).unwrap(), Checkpoint::open(&file).unwrap()] {
        assert_holds_exactly(&opened, &tensors);
        assert_eq!(opened.metadata(), Some(&metadata()));
        assert_official_reader_agrees(&file, &opened);
    }
}

#[test]
fn a_max_shard_size_that_fits_everything_still_writes_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = planned(EVERY_DTYPE);
    write_all(dir.path(), &tensors, &BTreeMap::new(), Some(1 << 20));
    assert_eq!(file_names(dir.path()), [SINGLE_FILE_NAME]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.metadata(), None);
    assert_holds_exactly(&checkpoint, &tensors);
}

#[test]
fn sharded_round_trip_splits_greedily_in_plan_order() {
    // 400 + 400 + 200 bytes fill the first 1000-byte shard exactly; 400 + 400, then 300, the next two.
    let specs: &[(&str, Dtype, &[usize])] = &[
        ("z.first", Dtype::F32, &[100]),
        ("b.second", Dtype::BF16, &[10, 20]),
        ("y.third", Dtype::F16, &[100]),
        ("a.fourth", Dtype::F64, &[50]),
        ("x.fifth", Dtype::I32, &[100]),
        ("c.sixth", Dtype::U8, &[300]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tensors = planned(specs);
    write_all(dir.path(), &tensors, &metadata(), Some(1000));
    let shard = |i| format!("model-0000{i}-of-00003.safetensors");
    assert_eq!(file_names(dir.path()), [shard(1), shard(2), shard(3), INDEX_FILE_NAME.to_string()]);

    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE_NAME)).unwrap()).unwrap();
    let shard_of = [1, 1, 1, 2, 2, 3];
    let weight_map: serde_json::Map<String, serde_json::Value> =
        specs.iter().zip(shard_of).map(|(s, i)| (s.0.to_string(), shard(i).into())).collect();
    let total: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    assert_eq!(index, serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}));

    let index_path = dir.path().join(INDEX_FILE_NAME);
    for opened in [Checkpoint::open(dir.path()).unwrap(), Checkpoint::open(&index_path).unwrap()] {
        assert_holds_exactly(&opened, &tensors);
        assert_eq!(opened.metadata(), Some(&metadata()));
        for i in 1..=3 {
            assert_official_reader_agrees(&dir.path().join(shard(i)), &opened);
        }
    }
    // Each shard is a checkpoint on its own too.
    let last = Checkpoint::open(dir.path().join(shard(3))).unwrap();
    assert_eq!(last.tensor_names(), ["c.sixth"]);
}

#[test]
fn misaligned_data_decodes_correctly() {
    let dir = tempfile::tempdir().unwrap();
    // Three bytes first: the F32 and F16 data that follow start at odd addresses.
    let tensors = planned(&[("a", Dtype::U8, &[3]), ("b", Dtype::F32, &[64]), ("c", Dtype::F16, &[3000])]);
    write_all(dir.path(), &tensors, &BTreeMap::new(), None);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_ne!(checkpoint.tensor("b").unwrap().data.as_ptr() as usize % 4, 0);
    assert_ne!(checkpoint.tensor("c").unwrap().data.as_ptr() as usize % 2, 0);
    assert_holds_exactly(&checkpoint, &tensors);
}

#[test]
fn released_tensors_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = planned(&[("big", Dtype::F32, &[64, 1024]), ("small", Dtype::F16, &[5])]);
    write_all(dir.path(), &tensors, &BTreeMap::new(), None);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let before = checkpoint.tensor("big").unwrap().to_f32().unwrap();
    checkpoint.release("big");
    checkpoint.release("small");
    checkpoint.release("absent");
    assert_eq!(checkpoint.tensor("big").unwrap().to_f32().unwrap(), before);
    assert_holds_exactly(&checkpoint, &tensors);
}

#[test]
fn to_f32_into_checks_the_output_length() {
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), &planned(&[("w", Dtype::BF16, &[4])]), &BTreeMap::new(), None);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let w = checkpoint.tensor("w").unwrap();
    let err = w.to_f32_into(&mut [0.0; 3]).unwrap_err().to_string();
    assert!(err.contains("tensor 'w' has 4 elements but the output buffer holds 3"), "{err}");
    assert!(err.starts_with(&dir.path().join(SINGLE_FILE_NAME).display().to_string()), "{err}");
}

#[test]
fn a_directory_without_a_checkpoint_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(err.starts_with(&dir.path().display().to_string()) && err.contains("neither"), "{err}");
    let missing = dir.path().join("nope.safetensors");
    let err = Checkpoint::open(&missing).err().unwrap().to_string();
    assert!(err.starts_with(&missing.display().to_string()), "{err}");
}

#[test]
fn tensors_written_in_parts_give_the_same_files_as_whole_writes() {
    let specs: &[(&str, Dtype, &[usize])] =
        &[("a", Dtype::F32, &[10, 7]), ("b", Dtype::F16, &[0]), ("c", Dtype::BF16, &[33]), ("d", Dtype::U8, &[5])];
    let tensors = planned(specs);
    let (whole, parts) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_all(whole.path(), &tensors, &metadata(), Some(300));
    let plan = tensors.iter().map(|t| t.plan.clone()).collect();
    let mut writer = Writer::create(parts.path(), plan, metadata(), Some(300)).unwrap();
    for t in &tensors {
        if t.bytes.is_empty() {
            writer.write_tensor_part(&t.plan.name, &[]).unwrap();
        }
        for part in t.bytes.chunks(13) {
            writer.write_tensor_part(&t.plan.name, part).unwrap();
        }
    }
    writer.finish().unwrap();
    assert_eq!(file_names(whole.path()), file_names(parts.path()));
    for name in file_names(whole.path()) {
        let read = |dir: &Path| std::fs::read(dir.join(&name)).unwrap();
        assert_eq!(read(whole.path()), read(parts.path()), "{name}");
    }
}

#[test]
fn parts_that_overrun_a_tensor_or_mix_with_a_whole_write_are_errors() {
    let tensors = planned(&[("a", Dtype::F32, &[4]), ("b", Dtype::U8, &[2])]);
    let plan: Vec<TensorPlan> = tensors.iter().map(|t| t.plan.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut writer = Writer::create(dir.path(), plan.clone(), BTreeMap::new(), None).unwrap();
    writer.write_tensor_part("a", &[0; 10]).unwrap();
    let err = writer.write_tensor_part("a", &[0; 7]).unwrap_err().to_string();
    assert!(err.contains("tensor 'a' should be 16 bytes, got 17 in parts"), "{err}");
    assert!(writer.finish().is_err());
    assert_eq!(file_names(dir.path()), Vec::<String>::new());

    let mut writer = Writer::create(dir.path(), plan, BTreeMap::new(), None).unwrap();
    writer.write_tensor_part("a", &[0; 8]).unwrap();
    let err = writer.write_tensor("a", &[0; 8]).unwrap_err().to_string();
    assert!(err.contains("tensor 'a' should be 16 bytes, got 8"), "{err}");
}
