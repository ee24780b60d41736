//! The forward pass on tiny synthetic models: against an independent f64 implementation, GGUF row
//! order against HF row order, and incremental decoding against whole-sequence evaluation.

use formats::GgmlType;

use super::synthetic::{self, Rng, Synthetic};
use super::Model;
use crate::model::{Architecture, ModelSource};

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| (rng.next_u64() % 256) as u32).collect()
}

fn logits(path: &std::path::Path, tokens: &[u32]) -> Vec<f32> {
    let source = ModelSource::open(path).unwrap();
    let model = Model::load(&source).unwrap();
    let mut cache = model.new_cache(tokens.len());
    model.forward(&mut cache, tokens, 0..tokens.len()).unwrap()
}

/// Largest difference per row, relative to the row's largest reference logit.
fn assert_rows_close(got: &[f32], want: &[Vec<f64>], tolerance: f64, what: &str) {
    for (pos, (g, w)) in got.chunks_exact(want[0].len()).zip(want).enumerate() {
        let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = g.iter().zip(w).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(diff <= tolerance * scale, "{what}: position {pos} differs by {diff} (scale {scale})");
    }
}

fn variants() -> Vec<(&'static str, Synthetic)> {
    vec![
        (
            "llama, tied head, F32",
            synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 1),
        ),
        (
            "llama, separate head, llama3 rope scaling, Q8_0",
            synthetic::write(synthetic::config(Architecture::Llama, false, true), GgmlType::Q8_0, 2),
        ),
        (
            "qwen2, q/k/v biases, F16",
            synthetic::write(synthetic::config(Architecture::Qwen2, false, false), GgmlType::F16, 3),
        ),
    ]
}

#[test]
fn gguf_and_hf_sources_match_the_f64_reference_and_each_other() {
    // 40 positions: two query blocks, and the batch path of every kernel.
    let toks = tokens(40, 11);
    for (what, m) in variants() {
        let want = synthetic::reference_logits(&m, &toks);
        let from_gguf = logits(&m.gguf, &toks);
        let from_hf = logits(&m.hf, &toks);
        assert_rows_close(&from_gguf, &want, 1e-4, &format!("{what}, GGUF"));
        assert_rows_close(&from_hf, &want, 1e-4, &format!("{what}, HF"));
        let as_f64 = |v: &[f32]| v.chunks_exact(256).map(|r| r.iter().map(|&x| x as f64).collect()).collect::<Vec<_>>();
        assert_rows_close(&from_gguf, &as_f64(&from_hf), 1e-5, &format!("{what}, GGUF vs HF"));
    }
}

#[test]
fn incremental_decoding_equals_the_whole_sequence() {
    let toks = tokens(40, 12);
    for (what, m) in variants() {
        let source = ModelSource::open(&m.gguf).unwrap();
        let model = Model::load(&source).unwrap();
        let mut cache = model.new_cache(toks.len());
        let whole = model.forward(&mut cache, &toks, 0..toks.len()).unwrap();
        let vocab = model.config.vocab_size;

        cache.clear();
        // A prompt on the batch path, a few tokens together, then one at a time on the GEMV path.
        let mut pieces = vec![model.forward(&mut cache, &toks[..17], 0..17).unwrap()];
        pieces.push(model.forward(&mut cache, &toks[17..20], 0..3).unwrap());
        for i in 20..toks.len() {
            pieces.push(model.forward(&mut cache, &toks[i..i + 1], 0..1).unwrap());
        }
        assert_eq!(cache.len(), toks.len());
        let stepwise: Vec<f32> = pieces.concat();
        let as_f64 = whole.chunks_exact(vocab).map(|r| r.iter().map(|&x| x as f64).collect()).collect::<Vec<_>>();
        assert_rows_close(&stepwise, &as_f64, 1e-5, what);
    }
}

#[test]
fn outputs_select_rows_of_the_batch() {
    let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 4);
    let toks = tokens(12, 13);
    let all = logits(&m.gguf, &toks);
    let source = ModelSource::open(&m.gguf).unwrap();
    let model = Model::load(&source).unwrap();
    let mut cache = model.new_cache(12);
    let some = model.forward(&mut cache, &toks, 5..9).unwrap();
    assert_eq!(some.len(), 4 * 256);
    for (a, b) in some.iter().zip(&all[5 * 256..9 * 256]) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn bad_requests_are_errors() {
    let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 5);
    let source = ModelSource::open(&m.gguf).unwrap();
    let model = Model::load(&source).unwrap();
    let mut cache = model.new_cache(4);
    let err = model.forward(&mut cache, &[1, 256], 0..2).unwrap_err().to_string();
    assert!(err.contains("token id 256"), "{err}");
    let err = model.forward(&mut cache, &[1, 2, 3, 4, 5], 0..1).unwrap_err().to_string();
    assert!(err.contains("exceed the KV cache"), "{err}");
    let err = model.forward(&mut cache, &[1, 2], 0..3).unwrap_err().to_string();
    assert!(err.contains("outside a batch"), "{err}");
}
