//! AutoAWQ's GEMM layout (`version: "gemm"`), as `WQLinear_GEMM.from_linear` writes it and transformers,
//! vLLM and AutoAWQ read it, per quantized linear layer (4 bits only):
//!
//! | tensor    | dtype | shape              | content |
//! |-----------|-------|--------------------|---------|
//! | `qweight` | I32   | `[in, out/8]`      | word `[i, c]` holds `codes[8c + ORDER[k], i]` in nibble `k` |
//! | `qzeros`  | I32   | `[in/G, out/8]`    | word `[g, c]` holds `zeros[g, 8c + ORDER[k]]` in nibble `k` |
//! | `scales`  | F16   | `[in/G, out]`      | |
//!
//! with `ORDER = [0, 2, 4, 6, 1, 3, 5, 7]` (the order AutoAWQ's CUDA kernel dequantizes in; loaders undo
//! it with `[0, 4, 1, 5, 2, 6, 3, 7]`). Zero points are stored as they are; `W = (q − z) · s`. There is
//! no `g_idx`: group `g` is input columns `g·G .. (g+1)·G`, and `G` must divide `in`.

use half::f16;
use serde_json::{json, Value};

use super::{
    f16_le_bytes, tensor_f16, tensor_i32, words_le_bytes, IntWeights, PackError, PackedTensor, UnpackedWeights,
};
use crate::safetensors::Dtype;
use crate::safetensors::TensorRef;
use crate::{Error, Result};

const FORMAT: &str = "AWQ GEMM";
/// Output column `8c + ORDER[k]` goes to nibble `k` of packed column `c`.
pub const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// The nibble holding output column `8c + j` (AutoAWQ's `AWQ_REVERSE_ORDER`).
const REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// One layer in the AWQ GEMM layout; words hold the int32 tensors' bits.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub group_size: usize,
    /// `[in, out/8]`, row-major.
    pub qweight: Vec<u32>,
    /// `[in/G, out/8]`, row-major.
    pub qzeros: Vec<u32>,
    /// `[in/G, out]`, row-major.
    pub scales: Vec<f16>,
}

/// What `config.json`'s `quantization_config` (and AutoAWQ's `quant_config.json`) say about an AWQ model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwqQuantizeConfig {
    pub group_size: usize,
    pub zero_point: bool,
}

impl AwqQuantizeConfig {
    /// `config.json`'s `quantization_config`, as AutoAWQ's `to_transformers_dict` writes it.
    pub fn quantization_config(&self) -> Value {
        json!({
            "quant_method": "awq",
            "zero_point": self.zero_point,
            "group_size": self.group_size,
            "bits": 4,
            "version": "gemm",
            "modules_to_not_convert": null,
        })
    }

    /// AutoAWQ's own `quant_config.json`.
    pub fn quant_config(&self) -> Value {
        json!({
            "zero_point": self.zero_point,
            "q_group_size": self.group_size,
            "w_bit": 4,
            "version": "GEMM",
            "modules_to_not_convert": null,
        })
    }
}

/// Packs `w` in the AWQ GEMM layout: its groups must be the consecutive runs of `group_size` input columns.
pub fn pack(w: &IntWeights<'_>, group_size: usize) -> std::result::Result<AwqLinear, PackError> {
    if w.bits != 4 {
        return Err(PackError::Bits { format: FORMAT, bits: w.bits });
    }
    w.validate()?;
    let (out, inp, groups) = (w.out_features, w.in_features, w.groups());
    if out % 8 != 0 {
        return Err(PackError::NotMultiple { format: FORMAT, what: "the output size", multiple: 8, got: out });
    }
    if group_size == 0 || inp % group_size != 0 {
        return Err(PackError::NotMultiple { format: FORMAT, what: "the input size", multiple: group_size, got: inp });
    }
    if groups != inp / group_size {
        return Err(PackError::Shape(format!(
            "{groups} groups of scales, but {inp} inputs make {} groups of {group_size}",
            inp / group_size
        )));
    }
    if let Some(c) = (0..inp).find(|&c| w.g_idx[c] as usize != c / group_size) {
        return Err(PackError::GroupOrder { format: FORMAT, column: c, group: w.g_idx[c] });
    }
    let packed_cols = out / 8;
    let qweight = (0..inp * packed_cols)
        .map(|i| interleave(|k| w.codes[(8 * (i % packed_cols) + ORDER[k]) * inp + i / packed_cols]))
        .collect();
    let qzeros = (0..groups * packed_cols)
        .map(|i| interleave(|k| w.zeros[(i / packed_cols) * out + 8 * (i % packed_cols) + ORDER[k]]))
        .collect();
    Ok(AwqLinear {
        out_features: out,
        in_features: inp,
        group_size,
        qweight,
        qzeros,
        scales: w.scales.iter().map(|&s| f16::from_f32(s)).collect(),
    })
}

/// A word whose nibble `k` is `nibble(k)`.
fn interleave(nibble: impl Fn(usize) -> u8) -> u32 {
    (0..8).map(|k| u32::from(nibble(k)) << (4 * k)).fold(0, |a, b| a | b)
}

/// The value a word holds for output `8c + j`.
fn deinterleave(word: u32, j: usize) -> u8 {
    ((word >> (4 * REVERSE_ORDER[j])) & 0xF) as u8
}

impl AwqLinear {
    pub fn groups(&self) -> usize {
        self.in_features / self.group_size
    }

    /// Codes, zero points, scales and the implied group indices, as the loaders see them.
    pub fn unpack(&self) -> UnpackedWeights {
        let (out, inp, packed_cols) = (self.out_features, self.in_features, self.out_features / 8);
        let codes = (0..out * inp)
            .map(|i| deinterleave(self.qweight[(i % inp) * packed_cols + (i / inp) / 8], (i / inp) % 8))
            .collect();
        let zeros = (0..self.groups() * out)
            .map(|i| deinterleave(self.qzeros[(i / out) * packed_cols + (i % out) / 8], (i % out) % 8))
            .collect();
        UnpackedWeights {
            out_features: out,
            in_features: inp,
            bits: 4,
            codes,
            zeros,
            scales: self.scales.iter().map(|s| s.to_f32()).collect(),
            g_idx: (0..inp).map(|c| (c / self.group_size) as u32).collect(),
        }
    }

    /// `qweight`, `qzeros`, `scales`, in that order.
    pub fn tensors(&self) -> Vec<PackedTensor> {
        let (out, inp, groups) = (self.out_features, self.in_features, self.groups());
        vec![
            PackedTensor {
                suffix: "qweight",
                dtype: Dtype::I32,
                shape: vec![inp, out / 8],
                data: words_le_bytes(&self.qweight),
            },
            PackedTensor {
                suffix: "qzeros",
                dtype: Dtype::I32,
                shape: vec![groups, out / 8],
                data: words_le_bytes(&self.qzeros),
            },
            PackedTensor {
                suffix: "scales",
                dtype: Dtype::F16,
                shape: vec![groups, out],
                data: f16_le_bytes(&self.scales),
            },
        ]
    }

    /// Reads a layer back from its three tensors; shapes give the sizes and the group size.
    pub fn from_tensors(qweight: &TensorRef<'_>, qzeros: &TensorRef<'_>, scales: &TensorRef<'_>) -> Result<Self> {
        let (&[inp, packed_cols], &[groups, out]) = (qweight.shape, scales.shape) else {
            return Err(Error::invalid(
                qweight.path,
                format!(
                    "AWQ tensors {} {:?} and {} {:?} are not [in, out/8] and [groups, out]",
                    qweight.name, qweight.shape, scales.name, scales.shape
                ),
            ));
        };
        if groups == 0 || inp % groups != 0 || out != 8 * packed_cols {
            return Err(Error::invalid(
                qweight.path,
                format!(
                    "AWQ tensors {} {:?} and {} {:?} do not describe one layer",
                    qweight.name, qweight.shape, scales.name, scales.shape
                ),
            ));
        }
        Ok(Self {
            out_features: out,
            in_features: inp,
            group_size: inp / groups,
            qweight: tensor_i32(qweight, &[inp, packed_cols])?,
            qzeros: tensor_i32(qzeros, &[groups, packed_cols])?,
            scales: tensor_f16(scales, &[groups, out])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn layer(out: usize, inp: usize, group: usize) -> UnpackedWeights {
        let groups = inp / group;
        UnpackedWeights {
            out_features: out,
            in_features: inp,
            bits: 4,
            codes: (0..out * inp).map(|i| ((i * 7 + i / inp) % 16) as u8).collect(),
            zeros: (0..groups * out).map(|i| ((i * 5) % 16) as u8).collect(),
            scales: (0..groups * out).map(|i| f16::from_f32(0.02 + i as f32 * 1e-3).to_f32()).collect(),
            g_idx: (0..inp).map(|c| (c / group) as u32).collect(),
        }
    }

    #[test]
    fn pack_unpack_round_trips() {
        for (out, inp, group) in [(64, 128, 32), (24, 256, 128), (8, 64, 64)] {
            let w = layer(out, inp, group);
            let packed = pack(&w.as_int_weights(), group).unwrap();
            assert_eq!(packed.group_size, group);
            assert_eq!(packed.unpack(), w);
        }
    }

    #[test]
    fn nibbles_follow_the_interleaved_order() {
        // Output j holds value j for every input: the word reads 0,2,4,6,1,3,5,7 from the low nibble up.
        let mut w = layer(8, 32, 32);
        w.codes = (0..8 * 32).map(|i| (i / 32) as u8).collect();
        w.zeros = (0..8).map(|o| 15 - o as u8).collect();
        let packed = pack(&w.as_int_weights(), 32).unwrap();
        assert!(packed.qweight.iter().all(|&q| q == 0x7531_6420), "{:x?}", packed.qweight);
        assert_eq!(packed.qzeros, [0x8ACE_9BDF]);
    }

    #[test]
    fn tensors_have_the_loader_shapes_and_read_back() {
        let packed = pack(&layer(64, 256, 128).as_int_weights(), 128).unwrap();
        let tensors = packed.tensors();
        let shapes: Vec<(&str, Vec<usize>)> = tensors.iter().map(|t| (t.suffix, t.shape.clone())).collect();
        assert_eq!(shapes, [("qweight", vec![256, 8]), ("qzeros", vec![2, 8]), ("scales", vec![2, 64])]);
        let refs: Vec<TensorRef<'_>> = tensors
            .iter()
            .map(|t| TensorRef {
                name: t.suffix,
                dtype: t.dtype,
                shape: &t.shape,
                data: &t.data,
                path: Path::new("a.safetensors"),
            })
            .collect();
        assert_eq!(AwqLinear::from_tensors(&refs[0], &refs[1], &refs[2]).unwrap(), packed);
        let err = AwqLinear::from_tensors(&refs[0], &refs[2], &refs[1]).unwrap_err().to_string();
        assert!(err.starts_with("a.safetensors: "), "{err}");
    }

    #[test]
    fn unpackable_layers_are_rejected_with_the_reason() {
        let w = layer(64, 128, 32);
        let three = IntWeights { bits: 3, ..w.as_int_weights() };
        assert_eq!(pack(&three, 32).unwrap_err(), PackError::Bits { format: "AWQ GEMM", bits: 3 });
        let odd = layer(60, 128, 32);
        let err = pack(&odd.as_int_weights(), 32).unwrap_err().to_string();
        assert!(err.contains("output size to be a multiple of 8, got 60"), "{err}");
        let mut act_order = w.clone();
        act_order.g_idx.swap(0, 127);
        let err = pack(&act_order.as_int_weights(), 32).unwrap_err();
        assert_eq!(err, PackError::GroupOrder { format: "AWQ GEMM", column: 0, group: 3 });
        // 96 inputs in groups of 64: GPTQ files allow a short last group, AWQ's do not.
        let mut ragged = layer(64, 96, 32);
        ragged.zeros.truncate(64 * 2);
        ragged.scales.truncate(64 * 2);
        ragged.g_idx = (0..96).map(|c| (c / 64) as u32).collect();
        let err = pack(&ragged.as_int_weights(), 64).unwrap_err().to_string();
        assert!(err.contains("input size to be a multiple of 64, got 96"), "{err}");
        let err = pack(&w.as_int_weights(), 64).unwrap_err().to_string();
        assert!(err.contains("4 groups of scales, but 128 inputs make 2 groups of 64"), "{err}");
    }

    #[test]
    fn configs_name_awq_gemm() {
        let config = AwqQuantizeConfig { group_size: 128, zero_point: true };
        let hf = config.quantization_config();
        assert_eq!(
            (hf["quant_method"].as_str(), hf["version"].as_str(), hf["bits"].as_u64()),
            (Some("awq"), Some("gemm"), Some(4))
        );
        let own = config.quant_config();
        assert_eq!(
            (own["w_bit"].as_u64(), own["q_group_size"].as_u64(), own["version"].as_str()),
            (Some(4), Some(128), Some("GEMM"))
        );
    }
}
