//! The embedded calibration corpus under the real SmolLM2 tokenizer: it holds the default sample's
//! 128 x 512 tokens (as `calibration/data/README.md` says), and the seeded sample is a set of windows of
//! the corpus's token stream, the same for the same seed.

mod common;

use calibration::{sample, Corpus, SamplingOptions};
use common::fixture_model;
use qforge::model::ModelSource;

#[test]
fn embedded_corpus_fills_the_default_sample_with_windows_of_its_tokens() {
    let Some(fixture) = fixture_model() else { return };
    let source = ModelSource::open(&fixture).unwrap();
    let tokenizer = qforge::runtime::tokenizer(&source).unwrap();
    let corpus = Corpus::embedded();
    let stream = tokenizer.encode(&corpus.text).unwrap();
    assert!(stream.len() >= 128 * 512, "{} tokens", stream.len());

    let options = SamplingOptions::default();
    assert_eq!((options.nsamples, options.seqlen), (128, 512));
    let set = sample(&corpus, &tokenizer, options).unwrap();
    assert_eq!(set.tokens.len(), 128 * 512);
    let bos = tokenizer.options().bos.filter(|_| tokenizer.options().add_bos);
    let body = usize::from(bos.is_some());
    let text_stream = &stream[body..];
    for seq in set.sequences() {
        assert_eq!(bos.is_some(), seq.first() == bos.as_ref());
        let window = &seq[body..];
        assert!(text_stream.windows(window.len()).any(|w| w == window), "a sequence is not a window of the corpus");
    }
    assert_eq!(set, sample(&corpus, &tokenizer, options).unwrap());
    assert_ne!(set, sample(&corpus, &tokenizer, SamplingOptions { seed: 1, ..options }).unwrap());
}
