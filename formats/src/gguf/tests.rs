use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use half::f16;

use super::*;
use crate::error::Result;
use crate::ggml_type::GgmlType;

// ---------------------------------------------------------------------------------------------------
// Helpers

fn plan(name: &str, dims: &[u64], ggml_type: GgmlType) -> TensorPlan {
    TensorPlan { name: name.into(), dims: dims.to_vec(), ggml_type }
}

fn kv(key: &str, value: impl Into<MetadataValue>) -> (String, MetadataValue) {
    (key.into(), value.into())
}

/// Deterministic, non-repeating filler so misplaced bytes show up as mismatches.
fn filler(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn write_gguf(path: &Path, metadata: &[(String, MetadataValue)], tensors: &[(TensorPlan, Vec<u8>)]) -> Result<()> {
    let plans = tensors.iter().map(|(p, _)| p.clone()).collect();
    let mut w = GgufWriter::create(path, metadata, plans)?;
    for (p, data) in tensors {
        w.write_tensor(&p.name, data)?;
    }
    w.finish()
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

/// A GGUF file assembled byte by byte, so tests can describe malformed files exactly.
struct Raw(Vec<u8>);

impl Raw {
    fn new(version: u32, tensor_count: u64, kv_count: u64) -> Self {
        Raw(b"GGUF".to_vec()).u32(version).u64(tensor_count).u64(kv_count)
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }

    fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    fn string(self, s: &[u8]) -> Self {
        self.u64(s.len() as u64).bytes(s)
    }

    /// A key followed by a value type id; the value comes next.
    fn key(self, key: &str, type_id: u32) -> Self {
        self.string(key.as_bytes()).u32(type_id)
    }

    fn tensor(self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        let mut r = self.string(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(type_id).u64(offset)
    }

    fn pad(mut self, alignment: usize) -> Self {
        self.0.resize(self.0.len().next_multiple_of(alignment), 0);
        self
    }

    fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }

    fn open(&self) -> (tempfile::TempDir, PathBuf, Result<GgufFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crafted.gguf");
        std::fs::write(&path, &self.0).unwrap();
        let result = GgufFile::open(&path);
        (dir, path, result)
    }

    /// Opens the bytes, expects an error naming the file and containing every one of `needles`, and
    /// expects it quickly (a file claiming 2^60 items must be rejected before anything is allocated).
    fn rejected_with(&self, needles: &[&str]) -> String {
        let start = Instant::now();
        let (_dir, path, result) = self.open();
        let err = result.expect_err("malformed file was accepted").to_string();
        assert!(start.elapsed() < Duration::from_secs(2), "rejecting took {:?}", start.elapsed());
        assert!(err.starts_with(&format!("{}: ", path.display())), "error does not name the file: {err}");
        for needle in needles {
            assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
        }
        err
    }
}

/// One F32 tensor `t` of 4 elements with its data, after `kvs` metadata entries written by `meta`.
fn one_tensor_file(kv_count: u64, meta: impl FnOnce(Raw) -> Raw) -> Raw {
    meta(Raw::new(3, 1, kv_count)).tensor("t", &[4], 0, 0).pad(32).zeros(32)
}

fn every_metadata_type() -> Vec<(String, MetadataValue)> {
    use MetadataValue as V;
    vec![
        kv("general.architecture", "llama"),
        kv("t.u8", 200u8),
        kv("t.i8", -100i8),
        kv("t.u16", 60000u16),
        kv("t.i16", -30000i16),
        kv("t.u32", 4_000_000_000u32),
        kv("t.i32", -2_000_000_000i32),
        kv("t.f32", 1.5e-5f32),
        kv("t.bool_true", true),
        kv("t.bool_false", false),
        kv("t.string", "héllo ✓"),
        kv("t.empty_string", ""),
        kv("t.u64", u64::MAX),
        kv("t.i64", i64::MIN),
        kv("t.f64", -2.25e300f64),
        kv("t.strings", V::string_array(["a", "", "ĉ"])),
        kv("t.f32s", V::f32_array([0.5, -1.0])),
        kv("t.i32s", V::i32_array([1, -2, 3])),
        kv("t.u32s", V::u32_array([7])),
        kv("t.bools", MetadataArray::new(ValueType::Bool, vec![V::Bool(true), V::Bool(false)])),
        kv("t.u8s", MetadataArray::new(ValueType::U8, vec![V::U8(1), V::U8(255)])),
        kv("t.empty_f64s", MetadataArray::new(ValueType::F64, vec![])),
        kv(
            "t.nested",
            MetadataArray::new(
                ValueType::Array,
                vec![
                    V::i32_array([1, 2]),
                    V::string_array(["x"]),
                    V::Array(MetadataArray::new(ValueType::U64, vec![])),
                    V::Array(MetadataArray::new(ValueType::Array, vec![V::f32_array([3.0])])),
                ],
            ),
        ),
        kv("t.empty_nested", MetadataArray::new(ValueType::Array, vec![])),
    ]
}

// ---------------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_of_every_metadata_type_and_padded_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.gguf");
    let metadata = every_metadata_type();
    let floats: Vec<f32> = vec![1.0, -2.5, 3.25];
    let halves: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 2.0).collect();
    let tensors = vec![
        // 12 bytes: padded to 32
        (plan("a.f32", &[3], GgmlType::F32), floats.iter().flat_map(|v| v.to_le_bytes()).collect()),
        // 20 bytes
        (plan("b.f16", &[5, 2], GgmlType::F16), halves.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect()),
        // 4 blocks of 34 bytes
        (plan("c.q8_0", &[64, 2, 1], GgmlType::Q8_0), filler(4 * 34, 7)),
        (plan("d.empty", &[0], GgmlType::F32), vec![]),
        (plan("e.f32", &[1, 1, 1, 2], GgmlType::F32), filler(8, 9)),
    ];
    write_gguf(&path, &metadata, &tensors).unwrap();

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata(), &metadata[..]);
    assert_eq!(f.architecture(), Some("llama"));
    let nested = metadata.iter().find(|(k, _)| k == "t.nested").map(|(_, v)| v);
    assert_eq!(f.get("t.nested"), nested);
    assert_eq!(f.get("t.missing"), None);
    assert_eq!(f.data_offset() % 32, 0);

    assert_eq!(f.tensors().len(), tensors.len());
    let mut expected_offset = 0;
    for ((p, data), t) in tensors.iter().zip(f.tensors()) {
        assert_eq!((&t.name, &t.dims, t.ggml_type), (&p.name, &p.dims, p.ggml_type));
        assert_eq!(t.offset, expected_offset, "{}", t.name);
        assert_eq!(t.n_bytes(), data.len() as u64);
        assert_eq!(f.tensor_data(t), &data[..]);
        assert_eq!(f.tensor(&t.name), Some(t));
        expected_offset = (expected_offset + data.len() as u64).next_multiple_of(32);
    }
    assert_eq!(f.tensor("nope"), None);
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(file_len, f.data_offset() + expected_offset, "every tensor, the last included, is padded");

    assert_eq!(f.dequantize(&f.tensors()[0]).unwrap(), floats);
    assert_eq!(f.dequantize(&f.tensors()[1]).unwrap(), halves);
    assert_eq!(f.tensors()[2].n_elements(), 128);
}

#[test]
fn custom_alignment_and_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a64.gguf");
    let metadata = vec![kv(ALIGNMENT_KEY, 64u32), kv("general.name", "x")];
    let tensors =
        vec![(plan("x", &[5], GgmlType::F32), filler(20, 1)), (plan("y", &[32], GgmlType::Q4_0), filler(18, 2))];
    write_gguf(&path, &metadata, &tensors).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensors()[1].offset, 64);
    assert_eq!(f.tensor_data(&f.tensors()[1]), &tensors[1].1[..]);

    // Version 2 has the same layout as version 3.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let (_dir, _path, v2) = Raw(bytes).open();
    let v2 = v2.unwrap();
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.metadata(), f.metadata());
    assert_eq!(v2.tensors(), f.tensors());
}

#[test]
fn released_tensors_read_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.gguf");
    let data = filler(3 * 4096 * 4, 3);
    write_gguf(&path, &[], &[(plan("big", &[3 * 4096], GgmlType::F32), data.clone())]).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let t = &f.tensors()[0];
    assert_eq!(f.tensor_data(t), &data[..]);
    f.release(t);
    assert_eq!(f.tensor_data(t), &data[..]);
}

#[test]
fn dequantize_error_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i8.gguf");
    write_gguf(&path, &[], &[(plan("ints", &[4], GgmlType::I8), vec![1, 2, 3, 4])]).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let err = f.dequantize(&f.tensors()[0]).unwrap_err().to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(err.contains("'ints'") && err.contains("I8"), "{err}");
}

#[test]
fn accessors_convert_between_numeric_types() {
    use MetadataValue as V;
    assert_eq!(V::I32(5).as_u64(), Some(5));
    assert_eq!(V::I8(-1).as_u64(), None);
    assert_eq!(V::U64(u64::MAX).as_i64(), None);
    assert_eq!(V::U16(7).as_i64(), Some(7));
    assert_eq!(V::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(V::I64(-3).as_f64(), Some(-3.0));
    assert_eq!(V::F64(1.0).as_u64(), None);
    assert_eq!(V::Bool(true).as_u64(), None);
    assert_eq!(V::Bool(true).as_bool(), Some(true));
    assert_eq!(V::from("s").as_str(), Some("s"));
    assert_eq!(V::U8(1).as_str(), None);
    assert_eq!(V::string_array(["a"]).as_array().map(|a| a.elem_type), Some(ValueType::String));
    for id in 0..13 {
        assert_eq!(ValueType::from_id(id).map(ValueType::id), Some(id));
    }
    assert_eq!(ValueType::from_id(13), None);
}

// ---------------------------------------------------------------------------------------------------
// Malformed files

#[test]
fn valid_crafted_file_is_accepted() {
    // The baseline the malformed variants below differ from.
    let raw = one_tensor_file(1, |r| r.key("general.architecture", 8).string(b"llama"));
    let (_dir, _path, f) = raw.open();
    let f = f.unwrap();
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.tensors()[0].n_bytes(), 16);
}

#[test]
fn rejects_bad_magic_and_versions() {
    Raw(b"PK\x03\x04rest of a zip file".to_vec()).rejected_with(&["not a GGUF file"]);
    Raw(vec![]).rejected_with(&["truncated at byte 0 while reading the magic"]);
    Raw::new(1, 0, 0).rejected_with(&["version 1 is not supported"]);
    Raw::new(4, 0, 0).rejected_with(&["unknown GGUF version 4"]);
    Raw::new(3u32.swap_bytes(), 0, 0).rejected_with(&["big-endian", "version 3"]);
}

#[test]
fn rejects_absurd_counts_and_lengths_without_allocating() {
    let huge = 1u64 << 60;
    let truncated = "truncated at byte";
    Raw::new(3, huge, 0).rejected_with(&[truncated, &format!("{huge} tensor infos")]);
    Raw::new(3, 0, huge).rejected_with(&[truncated, &format!("{huge} metadata entries")]);
    Raw::new(3, 0, 1).u64(huge).zeros(64).rejected_with(&[truncated, "a metadata key", &format!("{huge} bytes")]);
    one_tensor_file(1, |r| r.key("s", 8).u64(huge)).rejected_with(&[
        truncated,
        "a string value",
        &format!("{huge} bytes"),
        "'s'",
    ]);
    one_tensor_file(1, |r| r.key("arr", 9).u32(4).u64(huge)).rejected_with(&[
        truncated,
        &format!("array of {huge} u32 items"),
        "'arr'",
    ]);
    one_tensor_file(1, |r| r.key("arr", 9).u32(9).u64(u64::MAX)).rejected_with(&[
        truncated,
        &format!("array of {} array items", u64::MAX),
        "'arr'",
    ]);
    Raw::new(3, 1, 0).u64(huge).zeros(64).rejected_with(&[truncated, "a tensor name", &format!("{huge} bytes")]);
}

#[test]
fn rejects_bad_metadata() {
    one_tensor_file(1, |r| r.key("k", 13).u32(0)).rejected_with(&["unknown value type 13", "'k'"]);
    one_tensor_file(1, |r| r.key("k", 9).u32(99).u64(0)).rejected_with(&["unknown value type 99", "'k'"]);
    one_tensor_file(1, |r| r.string(b"bad\xffkey").u32(4).u32(1)).rejected_with(&["metadata key", "not valid UTF-8"]);
    one_tensor_file(1, |r| r.key("k", 8).string(b"\xc3")).rejected_with(&["string value", "not valid UTF-8", "'k'"]);
    one_tensor_file(1, |r| r.key("k", 7).u8(2)).rejected_with(&["bool value", "is 2", "'k'"]);
    one_tensor_file(2, |r| r.key("k", 4).u32(1).key("k", 4).u32(2)).rejected_with(&["'k' occurs more than once"]);
    let deep = (0..40).fold(Raw::new(3, 0, 1).key("deep", 9), |r, _| r.u32(9).u64(1)).u32(4).u64(0);
    deep.rejected_with(&["nested more than 32 deep", "'deep'"]);
}

#[test]
fn rejects_bad_alignment() {
    one_tensor_file(1, |r| r.key(ALIGNMENT_KEY, 4).u32(48)).rejected_with(&["general.alignment is 48"]);
    one_tensor_file(1, |r| r.key(ALIGNMENT_KEY, 4).u32(4)).rejected_with(&["general.alignment is 4", "multiple of 8"]);
    one_tensor_file(1, |r| r.key(ALIGNMENT_KEY, 4).u32(0)).rejected_with(&["general.alignment is 0"]);
    one_tensor_file(1, |r| r.key(ALIGNMENT_KEY, 10).u64(32))
        .rejected_with(&["general.alignment must be a u32, not u64"]);
}

#[test]
fn rejects_bad_tensor_infos() {
    let with_info = |dims: &[u64], type_id: u32| Raw::new(3, 1, 0).tensor("w", dims, type_id, 0).pad(32).zeros(4096);
    with_info(&[], 0).rejected_with(&["'w' has 0 dimensions"]);
    with_info(&[1, 1, 1, 1, 1], 0).rejected_with(&["'w' has 5 dimensions"]);
    with_info(&[1 << 32, 1 << 32], 0).rejected_with(&["'w'", "overflows"]);
    with_info(&[1 << 62, 2], 0).rejected_with(&["'w'", "overflows"]);
    with_info(&[32], 4).rejected_with(&["'w' has unknown ggml type id 4"]);
    with_info(&[32], 1000).rejected_with(&["unknown ggml type id 1000"]);
    with_info(&[33, 2], GgmlType::Q8_0.id()).rejected_with(&["'w'", "33 elements", "Q8_0 blocks"]);
    Raw::new(3, 1, 0)
        .string(b"\xff")
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(0)
        .pad(32)
        .zeros(16)
        .rejected_with(&["tensor name", "not valid UTF-8"]);
}

#[test]
fn rejects_bad_tensor_layout() {
    let two = |offset_b: u64, name_b: &str| {
        Raw::new(3, 2, 0).tensor("a", &[16], 0, 0).tensor(name_b, &[16], 0, offset_b).pad(32).zeros(128)
    };
    two(64, "b").open().2.unwrap();
    two(32, "b").rejected_with(&["'a'", "'b'", "overlap"]);
    two(64, "a").rejected_with(&["tensor name 'a' occurs more than once"]);
    two(68, "b").rejected_with(&["'b' data offset 68 is not a multiple of the alignment 32"]);
    two(96, "b").rejected_with(&["while reading the data of tensor 'b'"]);
    two(u64::MAX - 31, "b").rejected_with(&["while reading the data of tensor 'b'"]);
    Raw::new(3, 1, 0)
        .tensor("t", &[4], 0, 0)
        .pad(32)
        .zeros(15)
        .rejected_with(&["truncated at byte 79 while reading the data of tensor 't'"]);
}

#[test]
fn every_truncation_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.gguf");
    let tensors =
        vec![(plan("a", &[3], GgmlType::F32), filler(12, 1)), (plan("b", &[32], GgmlType::Q8_0), filler(34, 2))];
    write_gguf(&path, &every_metadata_type(), &tensors).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let data_offset = GgufFile::open(&path).unwrap().data_offset() as usize;
    for cut in 0..data_offset + 32 + 34 {
        Raw(bytes[..cut].to_vec()).rejected_with(&[&format!("truncated at byte {cut} while reading")]);
    }
    // A cut inside a field names the field and the byte where the file ends.
    let mut info_b = Raw(vec![]).tensor("b", &[32], GgmlType::Q8_0.id(), 0).0;
    info_b.truncate(info_b.len() - 8); // the offset
    let type_at = bytes.windows(info_b.len()).position(|w| w == info_b).unwrap() + info_b.len() - 4;
    Raw(bytes[..type_at + 2].to_vec()).rejected_with(&[
        &format!("truncated at byte {} while reading the type of tensor 'b'", type_at + 2),
        "in tensor info 1",
    ]);
}

// ---------------------------------------------------------------------------------------------------
// Writer misuse

#[test]
fn writer_rejects_wrong_order_size_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let plans = vec![plan("first", &[2], GgmlType::F32), plan("second", &[32], GgmlType::Q4_0)];
    let mut w = GgufWriter::create(&path, &[], plans).unwrap();
    let err = w.write_tensor("second", &[0; 18]).unwrap_err().to_string();
    assert!(err.contains("out of order") && err.contains("'first'"), "{err}");
    let err = w.write_tensor("first", &[0; 7]).unwrap_err().to_string();
    assert!(err.contains("needs 8 bytes") && err.contains("got 7"), "{err}");
    w.write_tensor("first", &[0; 8]).unwrap();
    let err = w.write_tensor("second", &[0; 16]).unwrap_err().to_string();
    assert!(err.contains("needs 18 bytes"), "{err}");
    w.write_tensor("second", &[0; 18]).unwrap();
    let err = w.write_tensor("third", &[]).unwrap_err().to_string();
    assert!(err.contains("after all 2 planned tensors"), "{err}");
    w.finish().unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().tensors().len(), 2);
}

#[test]
fn unfinished_writers_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let plans = vec![plan("a", &[2], GgmlType::F32), plan("b", &[2], GgmlType::F32)];
    {
        let mut w = GgufWriter::create(&path, &[], plans.clone()).unwrap();
        w.write_tensor("a", &[0; 8]).unwrap();
    }
    assert!(files_in(dir.path()).is_empty(), "dropped writer left {:?}", files_in(dir.path()));
    let mut w = GgufWriter::create(&path, &[], plans).unwrap();
    w.write_tensor("a", &[0; 8]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("'b' was never written"), "{err}");
    assert!(files_in(dir.path()).is_empty(), "failed finish left {:?}", files_in(dir.path()));
}

#[test]
fn writer_rejects_invalid_plans_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.gguf");
    let create_err = |metadata: &[(String, MetadataValue)], plans: Vec<TensorPlan>| {
        GgufWriter::create(&path, metadata, plans).err().expect("writer accepted bad input").to_string()
    };
    let f32s = |name: &str| plan(name, &[4], GgmlType::F32);
    assert!(create_err(&[], vec![f32s("a"), f32s("a")]).contains("'a' is planned more than once"));
    assert!(create_err(&[kv("k", 1u8), kv("k", 2u8)], vec![]).contains("'k' is given more than once"));
    assert!(create_err(&[kv(ALIGNMENT_KEY, 24u32)], vec![]).contains("general.alignment is 24"));
    assert!(create_err(&[kv(ALIGNMENT_KEY, 32u64)], vec![]).contains("must be a u32"));
    assert!(create_err(&[], vec![plan("q", &[31], GgmlType::Q4_0)]).contains("Q4_0 blocks"));
    assert!(create_err(&[], vec![plan("s", &[], GgmlType::F32)]).contains("0 dimensions"));
    assert!(create_err(&[], vec![f32s(&"n".repeat(64))]).contains("at most 63"));
    let mixed = MetadataArray::new(ValueType::U32, vec![MetadataValue::U32(1), MetadataValue::from("x")]);
    let err = create_err(&[kv("m", mixed)], vec![]);
    assert!(err.contains("'m'") && err.contains("array of u32 holds a string at item 1"), "{err}");
    let deep = (0..40).fold(MetadataValue::u32_array([]), |v, _| MetadataArray::new(ValueType::Array, vec![v]).into());
    assert!(create_err(&[("deep".into(), deep)], vec![]).contains("nested more than 32 deep"));
    assert!(files_in(dir.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------------
// The real model fixture

/// The fixture when present. Missing is a skip locally and a failure in CI.
fn fixture() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "fixture {} is missing (CI=true)", path.display());
    eprintln!("skipping: fixture {} not found", path.display());
    None
}

#[test]
fn reads_the_fixture() {
    let Some(path) = fixture() else { return };
    let start = Instant::now();
    let f = GgufFile::open(&path).unwrap();
    eprintln!("opened {} in {:?}", path.display(), start.elapsed());
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.architecture(), Some("llama"));
    let tokens = f.get("tokenizer.ggml.tokens").and_then(MetadataValue::as_array).unwrap();
    assert_eq!((tokens.elem_type, tokens.len()), (ValueType::String, 49152));

    // The data section is the tensors back to back, each padded to the alignment.
    let mut by_offset: Vec<&TensorInfo> = f.tensors().iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    let mut expected = 0;
    for t in &by_offset {
        assert_eq!(t.offset, expected, "{}", t.name);
        expected = (t.offset + t.n_bytes()).next_multiple_of(f.alignment());
    }
    let last = by_offset.last().unwrap();
    let data_end = f.data_offset() + last.offset + last.n_bytes();
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(
        (data_end..=f.data_offset() + expected).contains(&file_len),
        "file is {file_len} bytes, data ends at {data_end}"
    );

    let norm = f.tensor("output_norm.weight").unwrap();
    let decoded = f.dequantize(norm).unwrap();
    let raw: Vec<f32> =
        f.tensor_data(norm).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(decoded, raw);
    for name in ["token_embd.weight", "blk.0.attn_q.weight"] {
        let t = f.tensor(name).unwrap();
        let values = f.dequantize(t).unwrap();
        assert_eq!(values.len() as u64, t.n_elements());
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
        f.release(t);
    }
}

#[test]
fn rewriting_the_fixture_is_byte_identical() {
    let Some(path) = fixture() else { return };
    let f = GgufFile::open(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rewritten.gguf");
    let plans = f.tensors().iter().map(|t| plan(&t.name, &t.dims, t.ggml_type)).collect();
    let mut w = GgufWriter::create(&out, f.metadata(), plans).unwrap();
    for t in f.tensors() {
        w.write_tensor(&t.name, f.tensor_data(t)).unwrap();
        f.release(t);
    }
    w.finish().unwrap();

    let (original, rewritten) = (std::fs::read(&path).unwrap(), std::fs::read(&out).unwrap());
    if let Some(at) = original.iter().zip(&rewritten).position(|(a, b)| a != b) {
        panic!("rewrite differs first at byte {at} (data section starts at {})", f.data_offset());
    }
    assert_eq!(original.len(), rewritten.len());
}
