//! The GPTQ "v1" checkpoint layout (`checkpoint_format: "gptq"`), as AutoGPTQ's `pack` writes it and
//! transformers/optimum, vLLM and GPTQModel read it, per quantized linear layer:
//!
//! | tensor    | dtype | shape                     | content |
//! |-----------|-------|---------------------------|---------|
//! | `qweight` | I32   | `[in·bits/32, out]`       | each column `o` is the bit stream of `codes[o, 0..in]` |
//! | `qzeros`  | I32   | `[groups, out·bits/32]`   | each row `g` is the bit stream of `zeros[g, 0..out] − 1` |
//! | `scales`  | F16   | `[groups, out]`           | |
//! | `g_idx`   | I32   | `[in]`                    | group of each input column |
//!
//! Loaders compute `W[o, c] = scales[g, o] · (code − (stored zero + 1))` with `g = g_idx[c]`. The `− 1`
//! cannot store a zero point of 0 (AutoGPTQ's packer silently corrupts the neighbouring values there);
//! packing reports it instead. `groups = ceil(in / group_size)`, as AutoGPTQ shapes it; vLLM additionally
//! requires `group_size` to divide `in`, which is the caller's choice to enforce. Both sizes must be
//! multiples of 32: the loaders size `qweight` as `in // 32 * bits` and `qzeros` as `out // 32 * bits`,
//! which match the packed sizes only then (for 3 bits it is needed anyway).

use half::f16;
use serde_json::{json, Value};

use super::{
    f16_le_bytes, pack_stream, stream_value, tensor_f16, tensor_i32, words_le_bytes, IntWeights, PackError,
    PackedTensor, UnpackedWeights,
};
use crate::safetensors::Dtype;
use crate::safetensors::TensorRef;
use crate::{Error, Result};

const FORMAT: &str = "GPTQ";

/// One layer in the GPTQ v1 layout; words hold the int32 tensors' bits.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    pub groups: usize,
    /// `[in·bits/32, out]`, row-major.
    pub qweight: Vec<u32>,
    /// `[groups, out·bits/32]`, row-major.
    pub qzeros: Vec<u32>,
    /// `[groups, out]`, row-major.
    pub scales: Vec<f16>,
    pub g_idx: Vec<u32>,
}

/// What `quantize_config.json` and `config.json`'s `quantization_config` say about a GPTQ model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqQuantizeConfig {
    pub bits: u32,
    /// `None` is GPTQ's `-1`: one group per row.
    pub group_size: Option<usize>,
    pub desc_act: bool,
    pub sym: bool,
    pub static_groups: bool,
    pub true_sequential: bool,
    pub damp_percent: f64,
}

impl GptqQuantizeConfig {
    /// The dictionary AutoGPTQ's `BaseQuantizeConfig.to_dict` writes (with `checkpoint_format` and
    /// `quant_method`), used both as `quantize_config.json` and as `config.json`'s `quantization_config`.
    pub fn to_json(&self) -> Value {
        json!({
            "bits": self.bits,
            "group_size": self.group_size.map_or(-1, |g| g as i64),
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        })
    }
}

/// Packs `w` in the GPTQ v1 layout.
pub fn pack(w: &IntWeights<'_>) -> std::result::Result<GptqLinear, PackError> {
    if ![2, 3, 4, 8].contains(&w.bits) {
        return Err(PackError::Bits { format: FORMAT, bits: w.bits });
    }
    w.validate()?;
    let (out, inp, bits, groups) = (w.out_features, w.in_features, w.bits, w.groups());
    for (what, got) in [("the input size", inp), ("the output size", out)] {
        if got % 32 != 0 {
            return Err(PackError::NotMultiple { format: FORMAT, what, multiple: 32, got });
        }
    }
    if let Some(i) = w.zeros.iter().position(|&z| z == 0) {
        return Err(PackError::ZeroPointUnderflow { output: i % out, group: i / out });
    }
    let (in_words, out_words) = (inp * bits as usize / 32, out * bits as usize / 32);
    let mut qweight = vec![0u32; in_words * out];
    let mut column = vec![0u32; in_words];
    for o in 0..out {
        column.fill(0);
        pack_stream(w.codes[o * inp..][..inp].iter().map(|&c| u32::from(c)), bits, &mut column);
        for (r, &word) in column.iter().enumerate() {
            qweight[r * out + o] = word;
        }
    }
    let mut qzeros = vec![0u32; groups * out_words];
    for (g, words) in qzeros.chunks_mut(out_words).enumerate() {
        pack_stream(w.zeros[g * out..][..out].iter().map(|&z| u32::from(z) - 1), bits, words);
    }
    Ok(GptqLinear {
        out_features: out,
        in_features: inp,
        bits,
        groups,
        qweight,
        qzeros,
        scales: w.scales.iter().map(|&s| f16::from_f32(s)).collect(),
        g_idx: w.g_idx.to_vec(),
    })
}

impl GptqLinear {
    /// Codes, true zero points (stored + 1), scales and groups, as the loaders see them.
    pub fn unpack(&self) -> UnpackedWeights {
        let (out, inp, bits) = (self.out_features, self.in_features, self.bits);
        let in_words = inp * bits as usize / 32;
        let out_words = out * bits as usize / 32;
        let mut codes = vec![0u8; out * inp];
        let mut column = vec![0u32; in_words];
        for o in 0..out {
            for (r, word) in column.iter_mut().enumerate() {
                *word = self.qweight[r * out + o];
            }
            for (c, code) in codes[o * inp..][..inp].iter_mut().enumerate() {
                *code = stream_value(&column, bits, c) as u8;
            }
        }
        let zeros = (0..self.groups * out)
            .map(|i| (stream_value(&self.qzeros[(i / out) * out_words..][..out_words], bits, i % out) + 1) as u8)
            .collect();
        UnpackedWeights {
            out_features: out,
            in_features: inp,
            bits,
            codes,
            zeros,
            scales: self.scales.iter().map(|s| s.to_f32()).collect(),
            g_idx: self.g_idx.clone(),
        }
    }

    /// `qweight`, `qzeros`, `scales`, `g_idx`, in that order.
    pub fn tensors(&self) -> Vec<PackedTensor> {
        let (out, inp, bits) = (self.out_features, self.in_features, self.bits as usize);
        vec![
            PackedTensor {
                suffix: "qweight",
                dtype: Dtype::I32,
                shape: vec![inp * bits / 32, out],
                data: words_le_bytes(&self.qweight),
            },
            PackedTensor {
                suffix: "qzeros",
                dtype: Dtype::I32,
                shape: vec![self.groups, out * bits / 32],
                data: words_le_bytes(&self.qzeros),
            },
            PackedTensor {
                suffix: "scales",
                dtype: Dtype::F16,
                shape: vec![self.groups, out],
                data: f16_le_bytes(&self.scales),
            },
            PackedTensor { suffix: "g_idx", dtype: Dtype::I32, shape: vec![inp], data: words_le_bytes(&self.g_idx) },
        ]
    }

    /// Reads a layer back from its four tensors, `bits` from the model's quantization config.
    pub fn from_tensors(
        bits: u32,
        qweight: &TensorRef<'_>,
        qzeros: &TensorRef<'_>,
        scales: &TensorRef<'_>,
        g_idx: &TensorRef<'_>,
    ) -> Result<Self> {
        if ![2, 3, 4, 8].contains(&bits) {
            return Err(Error::unsupported(qweight.path, format!("GPTQ with {bits} bits")));
        }
        let (&[groups, out], &[inp]) = (scales.shape, g_idx.shape) else {
            return Err(Error::invalid(
                scales.path,
                format!(
                    "GPTQ tensors {} {:?} and {} {:?} are not [groups, out] and [in]",
                    scales.name, scales.shape, g_idx.name, g_idx.shape
                ),
            ));
        };
        let b = bits as usize;
        if inp % 32 != 0 || out % 32 != 0 {
            return Err(Error::invalid(qweight.path, format!("a {out} x {inp} layer cannot be packed at {bits} bits")));
        }
        let qweight_words = tensor_i32(qweight, &[inp * b / 32, out])?;
        let qzeros_words = tensor_i32(qzeros, &[groups, out * b / 32])?;
        let scale_values = tensor_f16(scales, &[groups, out])?;
        let g_idx_values = tensor_i32(g_idx, &[inp])?;
        if let Some(g) = g_idx_values.iter().find(|&&g| g as usize >= groups) {
            return Err(Error::invalid(g_idx.path, format!("{} names group {} of {groups}", g_idx.name, *g as i32)));
        }
        Ok(Self {
            out_features: out,
            in_features: inp,
            bits,
            groups,
            qweight: qweight_words,
            qzeros: qzeros_words,
            scales: scale_values,
            g_idx: g_idx_values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A layer with every code and zero point reachable, act-order style g_idx.
    fn layer(out: usize, inp: usize, bits: u32, group: usize) -> UnpackedWeights {
        let groups = inp.div_ceil(group);
        let levels = 1u32 << bits;
        UnpackedWeights {
            out_features: out,
            in_features: inp,
            bits,
            codes: (0..out * inp).map(|i| ((i * 7 + i / inp) as u32 % levels) as u8).collect(),
            zeros: (0..groups * out).map(|i| (1 + (i as u32 * 5) % (levels - 1)) as u8).collect(),
            scales: (0..groups * out).map(|i| f16::from_f32(0.01 + i as f32 * 1e-3).to_f32()).collect(),
            g_idx: (0..inp).map(|c| (((c * 37) % inp) / group) as u32).collect(),
        }
    }

    #[test]
    fn pack_unpack_round_trips_at_every_width() {
        for bits in [2, 3, 4, 8] {
            let w = layer(64, 96, bits, 32);
            let packed = pack(&w.as_int_weights()).unwrap();
            assert_eq!(packed.qweight.len(), 96 * bits as usize / 32 * 64);
            assert_eq!(packed.unpack(), w, "{bits} bits");
        }
    }

    #[test]
    fn four_bit_words_hold_eight_consecutive_inputs_lsb_first() {
        let mut w = layer(32, 32, 4, 32);
        w.codes = (0..32 * 32).map(|i| (i % 16) as u8).collect();
        let packed = pack(&w.as_int_weights()).unwrap();
        // qweight[0, 0] holds inputs 0..8 of output 0, qweight[1, 0] inputs 8..16.
        assert_eq!(packed.qweight[0], 0x7654_3210);
        assert_eq!(packed.qweight[32], 0xFEDC_BA98);
    }

    #[test]
    fn symmetric_four_bit_zero_points_are_stored_as_seven() {
        let mut w = layer(32, 32, 4, 32);
        w.zeros.fill(8);
        let packed = pack(&w.as_int_weights()).unwrap();
        assert!(packed.qzeros.iter().all(|&z| z == 0x7777_7777), "{:x?}", packed.qzeros);
        let mut w = layer(32, 32, 8, 32);
        w.zeros.fill(128);
        assert!(pack(&w.as_int_weights()).unwrap().qzeros.iter().all(|&z| z == 0x7F7F_7F7F));
    }

    #[test]
    fn tensors_have_the_loader_shapes_and_read_back() {
        let w = layer(64, 128, 3, 64);
        let packed = pack(&w.as_int_weights()).unwrap();
        let tensors = packed.tensors();
        let shapes: Vec<(&str, Dtype, Vec<usize>)> =
            tensors.iter().map(|t| (t.suffix, t.dtype, t.shape.clone())).collect();
        assert_eq!(
            shapes,
            [
                ("qweight", Dtype::I32, vec![12, 64]),
                ("qzeros", Dtype::I32, vec![2, 6]),
                ("scales", Dtype::F16, vec![2, 64]),
                ("g_idx", Dtype::I32, vec![128]),
            ]
        );
        let refs: Vec<TensorRef<'_>> = tensors
            .iter()
            .map(|t| TensorRef {
                name: t.suffix,
                dtype: t.dtype,
                shape: &t.shape,
                data: &t.data,
                path: Path::new("m.safetensors"),
            })
            .collect();
        let back = GptqLinear::from_tensors(3, &refs[0], &refs[1], &refs[2], &refs[3]).unwrap();
        assert_eq!(back, packed);
        let err = GptqLinear::from_tensors(4, &refs[0], &refs[1], &refs[2], &refs[3]).unwrap_err().to_string();
        assert!(err.starts_with("m.safetensors: tensor qweight is I32 [12, 64], expected I32 [16, 64]"), "{err}");
        let err = GptqLinear::from_tensors(3, &refs[0], &refs[1], &refs[3], &refs[2]).unwrap_err().to_string();
        assert!(err.contains("are not [groups, out] and [in]"), "{err}");
    }

    #[test]
    fn unpackable_layers_are_rejected_with_the_reason() {
        let w = layer(64, 96, 4, 32);
        let err = pack(&IntWeights { bits: 5, ..w.as_int_weights() }).unwrap_err();
        assert_eq!(err, PackError::Bits { format: "GPTQ", bits: 5 });
        let odd = layer(60, 96, 3, 32);
        let err = pack(&odd.as_int_weights()).unwrap_err();
        assert!(err.to_string().contains("the output size to be a multiple of 32, got 60"), "{err}");
        let odd = layer(64, 36, 4, 32);
        assert!(pack(&odd.as_int_weights()).unwrap_err().to_string().contains("input size to be a multiple of 32"));
        let mut zero = w.clone();
        zero.zeros[70] = 0;
        assert_eq!(pack(&zero.as_int_weights()).unwrap_err(), PackError::ZeroPointUnderflow { output: 6, group: 1 });
        let mut big = w.clone();
        big.codes[3] = 16;
        assert!(pack(&big.as_int_weights()).unwrap_err().to_string().contains("code value 16 does not fit in 4 bits"));
        let mut short = w.clone();
        short.g_idx.pop();
        assert!(matches!(pack(&short.as_int_weights()), Err(PackError::Shape(_))));
        let mut bad_group = w;
        bad_group.g_idx[0] = 3;
        assert!(pack(&bad_group.as_int_weights()).unwrap_err().to_string().contains("names group 3"));
    }

    #[test]
    fn config_says_gptq_v1() {
        let config = GptqQuantizeConfig {
            bits: 4,
            group_size: None,
            desc_act: true,
            sym: true,
            static_groups: false,
            true_sequential: true,
            damp_percent: 0.01,
        };
        let json = config.to_json();
        assert_eq!(json["group_size"], -1);
        assert_eq!((json["quant_method"].as_str(), json["checkpoint_format"].as_str()), (Some("gptq"), Some("gptq")));
        assert_eq!(GptqQuantizeConfig { group_size: Some(128), ..config }.to_json()["group_size"], 128);
    }
}
