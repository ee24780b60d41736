//! The fuzz targets' bodies (`fuzz/src/lib.rs`) on stable Rust: each runs over its seed corpus
//! (`fuzz/seeds/NAME/`, which also holds every input that once crashed qforge) and then over seeded
//! random mutations of it, so CI exercises the same code libFuzzer does, reproducibly.
//!
//! `QFORGE_FUZZ_ITERATIONS` sets the mutations per target (default 1500) and `QFORGE_FUZZ_SEED` the
//! random seed. A failing input is saved under `target/tmp/fuzz-failures/NAME/` for `cargo fuzz run NAME FILE`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod bodies;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

const DEFAULT_ITERATIONS: u64 = 1500;

/// Numbers that hit edge cases of length and count checks, as they appear in binary and JSON inputs.
const INTERESTING: &[u64] = &[
    0,
    1,
    7,
    8,
    31,
    32,
    255,
    256,
    65535,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 60,
    i64::MAX as u64,
    u64::MAX,
];

/// SplitMix64: small, seedable, and identical everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to eight byte-level or number-level edits of `input`, splicing from `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(b.len());
        match rng.below(8) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'-'][rng.below(8)],
            2 if b.len() >= 8 => {
                let at = rng.below(b.len() - 7);
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let bytes =
                    if rng.below(2) == 0 { v.to_le_bytes().to_vec() } else { (v as u32).to_le_bytes().to_vec() };
                b[at..at + bytes.len()].copy_from_slice(&bytes);
            }
            3 => b.truncate(at),
            4 if !b.is_empty() => {
                let len = rng.below(64).min(b.len() - at);
                b.drain(at..at + len);
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let len = rng.below(256).min(other.len() - from);
                b.splice(at..at, other[from..from + len].iter().copied());
            }
            6 => replace_number(rng, &mut b),
            _ if !b.is_empty() => {
                let len = rng.below(32).min(b.len() - at);
                let chunk = b[at..at + len].to_vec();
                b.splice(at..at, chunk);
            }
            _ => b.push(rng.next() as u8),
        }
    }
    b
}

/// Replaces a run of ASCII digits (a JSON number) with an edge-case number.
fn replace_number(rng: &mut Rng, b: &mut Vec<u8>) {
    let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
    if digits.is_empty() {
        return;
    }
    let start = digits[rng.below(digits.len())];
    let end = (start..b.len()).find(|&i| !b[i].is_ascii_digit()).unwrap_or(b.len());
    let text = match rng.below(4) {
        0 => format!("-{}", INTERESTING[rng.below(INTERESTING.len())]),
        1 => "1e308".to_string(),
        2 => "0.5".to_string(),
        _ => INTERESTING[rng.below(INTERESTING.len())].to_string(),
    };
    b.splice(start..end, text.into_bytes());
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "{} holds no seeds", dir.display());
    seeds
}

/// Runs `target`'s body on its seeds and their mutations; fails listing every input that panicked.
fn fuzz(target: &str) {
    let body = bodies::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target").1;
    let iterations =
        std::env::var("QFORGE_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_ITERATIONS);
    let seed = std::env::var("QFORGE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED);
    let corpus = seeds(target);
    let mut rng = Rng(seed ^ target.bytes().fold(0u64, |h, c| h.wrapping_mul(31).wrapping_add(c as u64)));
    let inputs = corpus.iter().cloned().chain((0..iterations).map(|_| {
        let (a, b) = (&corpus[rng.below(corpus.len())], &corpus[rng.below(corpus.len())]);
        mutate(&mut rng, a, b)
    }));
    let failures_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures").join(target);
    let mut failures = Vec::new();
    for (i, input) in inputs.enumerate() {
        if catch_unwind(AssertUnwindSafe(|| body(&input))).is_err() {
            std::fs::create_dir_all(&failures_dir).unwrap();
            let path = failures_dir.join(format!("input-{i}"));
            std::fs::write(&path, &input).unwrap();
            failures.push(path);
        }
    }
    assert!(failures.is_empty(), "{target}: {} inputs panicked, saved as {failures:?}", failures.len());
}

#[test]
fn safetensors() {
    fuzz("safetensors");
}

#[test]
fn safetensors_index() {
    fuzz("safetensors_index");
}

#[test]
fn gguf() {
    fuzz("gguf");
}

#[test]
fn peft_config() {
    fuzz("peft_config");
}

#[test]
fn model_config() {
    fuzz("model_config");
}

#[test]
fn tokenizer() {
    fuzz("tokenizer");
}

#[test]
fn block_decoders() {
    fuzz("block_decoders");
}

#[test]
fn every_target_has_a_test() {
    let source = include_str!("fuzz_corpus.rs");
    for (name, _) in bodies::TARGETS {
        assert!(source.contains(&format!("fuzz(\"{name}\")")), "no test runs fuzz target {name}");
    }
}
