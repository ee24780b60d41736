//! Packed integer weights of GPTQ and AWQ checkpoints: how one quantized linear layer's codes, zero
//! points, scales and group indices become the int32/f16 tensors transformers, vLLM, AutoGPTQ/GPTQModel
//! and AutoAWQ load, and back.
//!
//! - [`gptq`]: the GPTQ "v1" layout (`qweight` packed along the input dimension, `qzeros` stored minus
//!   one, `g_idx`) and `quantize_config.json`.
//! - [`awq`]: AutoAWQ's GEMM layout (4 bits, packed along the output dimension in the interleaved
//!   nibble order) and its `quantization_config`.
//!
//! Both work on [`IntWeights`], the layer as a quantizer hands it over: `out × in` codes, per-group zero
//! points and scales `[groups, out]`, and the group of every input column. Values are packed LSB first
//! into little-endian 32-bit words as one continuous bit stream, so a 3-bit value can straddle two words.
//! Layouts are documented in `shared/research/anchors.md` §2a/2b.

pub mod awq;
pub mod gptq;

use half::f16;

use crate::safetensors::Dtype;
use crate::safetensors::TensorRef;
use crate::{Error, Result};

/// One quantized linear layer, `out_features × in_features`.
#[derive(Clone, Copy, Debug)]
pub struct IntWeights<'a> {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    /// `out × in`, row-major, each below `2^bits`.
    pub codes: &'a [u8],
    /// `groups × out`: the true zero points, each below `2^bits`.
    pub zeros: &'a [u8],
    /// `groups × out`; packed as f16.
    pub scales: &'a [f32],
    /// The group of each input column.
    pub g_idx: &'a [u32],
}

/// [`IntWeights`] read back from packed tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct UnpackedWeights {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    pub codes: Vec<u8>,
    pub zeros: Vec<u8>,
    pub scales: Vec<f32>,
    pub g_idx: Vec<u32>,
}

/// Why a layer cannot be packed in a format. The caller adds the layer's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    #[error("{format} cannot store {bits}-bit weights")]
    Bits { format: &'static str, bits: u32 },
    #[error("{format} needs {what} to be a multiple of {multiple}, got {got}")]
    NotMultiple { format: &'static str, what: &'static str, multiple: usize, got: usize },
    #[error("{0}")]
    Shape(String),
    #[error("{what} value {value} does not fit in {bits} bits")]
    ValueRange { what: &'static str, value: u32, bits: u32 },
    #[error(
        "zero point 0 (output {output}, group {group}) cannot be stored in the GPTQ v1 format, which stores \
         zero − 1; an asymmetric grid for GPTQ v1 needs zero points of at least 1"
    )]
    ZeroPointUnderflow { output: usize, group: usize },
    #[error("{format} needs g_idx[c] = c / group_size (no act-order), but column {column} is in group {group}")]
    GroupOrder { format: &'static str, column: usize, group: u32 },
}

/// One tensor of a packed layer, ready for the safetensors writer under `<layer>.<suffix>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedTensor {
    pub suffix: &'static str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Little-endian elements.
    pub data: Vec<u8>,
}

impl IntWeights<'_> {
    pub fn groups(&self) -> usize {
        self.zeros.len() / self.out_features.max(1)
    }

    /// Checks every length and value against the shape and bit width.
    fn validate(&self) -> std::result::Result<(), PackError> {
        let (out, inp) = (self.out_features, self.in_features);
        if out == 0 || inp == 0 {
            return Err(PackError::Shape(format!("an empty {out} x {inp} layer")));
        }
        let groups = self.groups();
        let lengths = [
            ("codes", self.codes.len(), out * inp),
            ("zeros", self.zeros.len(), groups.max(1) * out),
            ("scales", self.scales.len(), groups.max(1) * out),
            ("g_idx", self.g_idx.len(), inp),
        ];
        for (what, got, expected) in lengths {
            if got != expected {
                return Err(PackError::Shape(format!(
                    "{what} has {got} values, the {out} x {inp} layer needs {expected}"
                )));
            }
        }
        if let Some(&g) = self.g_idx.iter().find(|&&g| g as usize >= groups) {
            return Err(PackError::Shape(format!("g_idx names group {g}, but there are {groups} groups")));
        }
        let limit = 1u32 << self.bits;
        for (what, values) in [("code", self.codes), ("zero point", self.zeros)] {
            if let Some(&v) = values.iter().find(|&&v| u32::from(v) >= limit) {
                return Err(PackError::ValueRange { what, value: v.into(), bits: self.bits });
            }
        }
        if let Some(s) = self.scales.iter().find(|s| !s.is_finite()) {
            return Err(PackError::Shape(format!("scale {s} is not finite")));
        }
        Ok(())
    }
}

impl UnpackedWeights {
    pub fn as_int_weights(&self) -> IntWeights<'_> {
        IntWeights {
            out_features: self.out_features,
            in_features: self.in_features,
            bits: self.bits,
            codes: &self.codes,
            zeros: &self.zeros,
            scales: &self.scales,
            g_idx: &self.g_idx,
        }
    }

    /// `out × in` weights, `scale · (code − zero)` of each column's group: what the loaders compute.
    pub fn dequantize(&self) -> Vec<f32> {
        let (out, inp) = (self.out_features, self.in_features);
        let mut w = vec![0f32; out * inp];
        for (o, row) in w.chunks_mut(inp).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                let g = self.g_idx[c] as usize * out + o;
                *v = self.scales[g] * (f32::from(self.codes[o * inp + c]) - f32::from(self.zeros[g]));
            }
        }
        w
    }
}

/// Packs `values` (each below `2^bits`) into `words` as one LSB-first bit stream.
/// `words` must hold exactly `values.len() · bits / 32` zeroed words.
fn pack_stream(values: impl IntoIterator<Item = u32>, bits: u32, words: &mut [u32]) {
    for (i, v) in values.into_iter().enumerate() {
        let bit = i * bits as usize;
        let (word, shift) = (bit / 32, (bit % 32) as u32);
        words[word] |= v << shift;
        if shift + bits > 32 {
            words[word + 1] |= v >> (32 - shift);
        }
    }
}

/// The `i`-th `bits`-wide value of the LSB-first bit stream in `words`.
fn stream_value(words: &[u32], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let (word, shift) = (bit / 32, (bit % 32) as u32);
    let mut v = words[word] >> shift;
    if shift + bits > 32 {
        v |= words[word + 1] << (32 - shift);
    }
    v & ((1u32 << bits) - 1)
}

fn words_le_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn f16_le_bytes(values: &[f16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The elements of `t` (checked to be I32 of exactly `shape`) as 32-bit words.
fn tensor_i32(t: &TensorRef<'_>, shape: &[usize]) -> Result<Vec<u32>> {
    check_tensor(t, Dtype::I32, shape)?;
    Ok(t.data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

fn tensor_f16(t: &TensorRef<'_>, shape: &[usize]) -> Result<Vec<f16>> {
    check_tensor(t, Dtype::F16, shape)?;
    Ok(t.data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect())
}

fn check_tensor(t: &TensorRef<'_>, dtype: Dtype, shape: &[usize]) -> Result<()> {
    if t.dtype != dtype || t.shape != shape {
        return Err(Error::invalid(
            t.path,
            format!("tensor {} is {} {:?}, expected {dtype} {shape:?}", t.name, t.dtype, t.shape),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_stream_straddles_words_as_autogptq_packs_it() {
        // anchors.md §2a: value 10 has its low 2 bits at shift 30 of word 0 and its high bit at bit 0 of
        // word 1; value 21 has its low bit at bit 31 of word 1 and its high 2 bits at bits 0-1 of word 2.
        let mut values = [0u32; 32];
        values[10] = 0b101;
        values[21] = 0b011;
        values[22] = 0b111;
        let mut words = [0u32; 3];
        pack_stream(values, 3, &mut words);
        assert_eq!(words, [0b01 << 30, 0b1 | (0b1 << 31), 0b01 | (0b111 << 2)]);
        assert!((0..32).all(|i| stream_value(&words, 3, i) == values[i]));
    }

    #[test]
    fn streams_round_trip_at_every_width() {
        for bits in [2u32, 3, 4, 8] {
            let values: Vec<u32> = (0..96u32).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            let mut words = vec![0u32; values.len() * bits as usize / 32];
            pack_stream(values.iter().copied(), bits, &mut words);
            assert!((0..values.len()).all(|i| stream_value(&words, bits, i) == values[i]), "{bits} bits");
        }
    }
}
