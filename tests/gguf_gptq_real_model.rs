//! GPTQ written into GGUF blocks on the real SmolLM2 fixture (`quant::file::quantize_gptq`): the whole
//! file comes out byte-identical at 1 and 2 threads (a tiny calibration set keeps it fast).

mod common;

use calibration::{sample, CalibrationSet, Corpus, SamplingOptions};
use common::fixture_model;
use qforge::model::ModelSource;
use qforge::quant::file::{quantize_gptq, GgufGptqOptions};
use qforge::quant::{Preset, QuantizeOptions};

fn calibration(source: &ModelSource, nsamples: usize, seqlen: usize) -> CalibrationSet {
    let tokenizer = qforge::runtime::tokenizer(source).unwrap();
    sample(&Corpus::embedded(), &tokenizer, SamplingOptions { nsamples, seqlen, seed: 0 }).unwrap()
}

#[test]
fn same_bytes_at_one_and_two_threads() {
    let Some(model) = fixture_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = ModelSource::open(&model).unwrap();
    let calib = calibration(&source, 1, 32);
    drop(source);
    let mut opts = QuantizeOptions::new(Preset::from_name("Q4_0").unwrap());
    opts.allow_requantize = true;
    let run = |threads: usize| {
        let out = dir.path().join(format!("t{threads}.gguf"));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| quantize_gptq(&model, &out, &opts, &calib, &GgufGptqOptions::default())).unwrap();
        std::fs::read(out).unwrap()
    };
    assert!(run(1) == run(2));
}
