//! The calibration activations flowing from decoder block to decoder block in the layer-by-layer
//! quantizers ([`super::gptq::pipeline`], [`super::awq`]): the residual stream of every calibration
//! token.
//!
//! With `N` tokens of width `d` they are `N·d` values, the largest thing those pipelines hold, so they
//! are stored as f16, as the fp16 models AutoGPTQ and AutoAWQ calibrate keep them: half the memory of
//! f32, at a rounding (2⁻¹¹ relative) far below the 4-bit noise the quantized blocks add to the same
//! stream. A block that writes a value beyond f16's range switches the store to f32 for the rest of the
//! run, so no model overflows it. Blocks compute in f32 on one sequence at a time.

use anyhow::Result;
use calibration::CalibrationSet;
use half::{f16, slice::HalfFloatSliceExt};

use crate::runtime::Model;

pub struct Activations {
    /// Values per sequence: `seqlen · d`.
    sequence_len: usize,
    store: Store,
}

enum Store {
    Half(Vec<f16>),
    Single(Vec<f32>),
}

impl Activations {
    /// The calibration sequences' embeddings.
    pub fn embed(model: &Model, calib: &CalibrationSet) -> Result<Self> {
        let sequence_len = calib.seqlen * model.config.hidden_size;
        let sequences = calib.sequences().len();
        let mut activations = Self { sequence_len, store: Store::Half(vec![f16::ZERO; sequences * sequence_len]) };
        for (i, tokens) in calib.sequences().enumerate() {
            activations.store(i, &model.embed(tokens)?);
            // The rows looked up are scattered over the whole table, and not needed again.
            model.release_source("token_embd.weight");
        }
        Ok(activations)
    }

    pub fn sequences(&self) -> usize {
        let len = match &self.store {
            Store::Half(v) => v.len(),
            Store::Single(v) => v.len(),
        };
        len / self.sequence_len.max(1)
    }

    /// Values per sequence (`seqlen · d`).
    pub fn sequence_len(&self) -> usize {
        self.sequence_len
    }

    /// Sequence `i` into `out` (`sequence_len` values).
    pub fn load(&self, i: usize, out: &mut [f32]) {
        let range = i * self.sequence_len..(i + 1) * self.sequence_len;
        match &self.store {
            Store::Half(v) => v[range].convert_to_f32_slice(out),
            Store::Single(v) => out.copy_from_slice(&v[range]),
        }
    }

    /// Replaces sequence `i` with `values`.
    pub fn store(&mut self, i: usize, values: &[f32]) {
        let range = i * self.sequence_len..(i + 1) * self.sequence_len;
        if let Store::Half(v) = &self.store {
            if values.iter().any(|x| x.abs() > f16::MAX.to_f32()) {
                self.store = Store::Single(v.iter().map(|x| x.to_f32()).collect());
            }
        }
        match &mut self.store {
            Store::Half(v) => v[range].convert_from_f32_slice(values),
            Store::Single(v) => v[range].copy_from_slice(values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activations(sequences: usize, sequence_len: usize) -> Activations {
        Activations { sequence_len, store: Store::Half(vec![f16::ZERO; sequences * sequence_len]) }
    }

    #[test]
    fn sequences_round_trip_through_f16() {
        let mut a = activations(3, 4);
        a.store(1, &[1.0, -2.5, 1e-3, 65504.0]);
        let mut out = [9.0; 4];
        a.load(1, &mut out);
        assert_eq!(out, [1.0, -2.5, f16::from_f32(1e-3).to_f32(), 65504.0]);
        a.load(0, &mut out);
        assert_eq!(out, [0.0; 4]);
        assert_eq!((a.sequences(), a.sequence_len()), (3, 4));
    }

    #[test]
    fn a_value_beyond_f16_switches_the_store_to_f32_and_keeps_what_was_stored() {
        let mut a = activations(2, 2);
        a.store(0, &[0.1, 3.0]);
        a.store(1, &[1e6, -0.1]);
        let mut out = [0.0; 2];
        a.load(1, &mut out);
        assert_eq!(out, [1e6, -0.1]);
        a.load(0, &mut out);
        assert_eq!(out, [f16::from_f32(0.1).to_f32(), 3.0]);
    }
}
