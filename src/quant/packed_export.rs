//! GPTQ and AWQ Hugging Face directories: a model whose block linears are group-quantized integers,
//! written as transformers, vLLM, GPTQModel and AutoAWQ load it.
//!
//! Every block linear `model.layers.N.{self_attn,mlp}.X` becomes the packed tensors of
//! [`formats::packed`] (GPTQ v1: `qweight`, `qzeros`, `scales`, `g_idx`; AWQ GEMM: `qweight`, `qzeros`,
//! `scales`); everything else (embedding, norms, biases, an untied `lm_head`) is stored as f16. Beside
//! the weights: `config.json` with its `quantization_config`, `quantize_config.json` (GPTQ) or
//! `quant_config.json` (AWQ), `generation_config.json` and the tokenizer files, shared with
//! `qforge convert`.
//!
//! The quantized linears arrive from a producer (RTN, the GPTQ pipeline, AWQ) block by block. The
//! safetensors header is fixed up front from the source's shapes, so each tensor is written as soon as
//! every tensor planned before it has been; only what a producer hands over ahead of its turn waits,
//! which keeps memory at about one block. Rows of a GGUF source's q/k projections are in llama.cpp's
//! permuted order; they are put back in HF order here. Groups run along the input dimension, so moving
//! whole rows (codes, and each group's scales and zero points) is exact.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use formats::packed::awq::{self, AwqQuantizeConfig};
use formats::packed::gptq::{self, GptqQuantizeConfig};
use formats::packed::{IntWeights, PackedTensor, UnpackedWeights};
use formats::safetensors::{self, Dtype, TensorPlan};

use super::gptq::GroupQuantized;
use crate::convert::{safetensors_metadata, write_hf_side_files, write_json, FloatType};
use crate::model::names::{self, permute_rows_gguf_to_hf};
use crate::model::source::SourceTensor;
use crate::model::ModelSource;
use crate::runtime::forward::BlockLinear;

/// The packed layout and what its config files say.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PackedFormat {
    Gptq(GptqQuantizeConfig),
    Awq(AwqQuantizeConfig),
}

impl PackedFormat {
    fn name(&self) -> &'static str {
        match self {
            PackedFormat::Gptq(_) => "GPTQ",
            PackedFormat::Awq(_) => "AWQ",
        }
    }

    /// Suffix, dtype and shape of each packed tensor of an `out × in` linear, in write order.
    fn tensor_shapes(&self, out: usize, inp: usize) -> Vec<(&'static str, Dtype, Vec<usize>)> {
        match self {
            PackedFormat::Gptq(c) => {
                let (bits, groups) = (c.bits as usize, c.group_size.map_or(1, |g| inp.div_ceil(g)));
                vec![
                    ("qweight", Dtype::I32, vec![inp * bits / 32, out]),
                    ("qzeros", Dtype::I32, vec![groups, out * bits / 32]),
                    ("scales", Dtype::F16, vec![groups, out]),
                    ("g_idx", Dtype::I32, vec![inp]),
                ]
            }
            PackedFormat::Awq(c) => {
                let groups = inp / c.group_size;
                vec![
                    ("qweight", Dtype::I32, vec![inp, out / 8]),
                    ("qzeros", Dtype::I32, vec![groups, out / 8]),
                    ("scales", Dtype::F16, vec![groups, out]),
                ]
            }
        }
    }

    /// Why an `out × in` linear cannot be stored in this layout.
    fn unfit(&self, out: usize, inp: usize) -> Option<String> {
        match self {
            PackedFormat::Gptq(c) => {
                if !inp.is_multiple_of(32) || !out.is_multiple_of(32) {
                    return Some("GPTQ packs layers whose sizes are multiples of 32".into());
                }
                c.group_size
                    .filter(|&g| !inp.is_multiple_of(g))
                    .map(|g| format!("--group-size {g} does not divide {inp}"))
            }
            PackedFormat::Awq(c) => {
                if !out.is_multiple_of(8) {
                    return Some("AWQ packs layers whose output size is a multiple of 8".into());
                }
                (c.group_size == 0 || !inp.is_multiple_of(c.group_size))
                    .then(|| format!("--group-size {} does not divide {inp}", c.group_size))
            }
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct PackedReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub quantized_linears: usize,
    pub bytes_written: u64,
}

impl PackedReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "wrote {} ({} tensors, {} quantized linears, {:.2} MiB)",
            self.output.display(),
            self.tensors,
            self.quantized_linears,
            self.bytes_written as f64 / (1024.0 * 1024.0)
        );
        out
    }
}

/// Where a planned tensor's bytes come from.
enum Content<'s> {
    /// Stored as f16 from the source.
    Source(&'s SourceTensor),
    /// Handed over by the producer.
    Produced,
}

/// An HF directory being written; see the module doc.
pub struct PackedExport<'s> {
    source: &'s ModelSource,
    format: PackedFormat,
    output: PathBuf,
    /// Set when the directory did not exist before, so a failed export removes it again.
    created_dir: bool,
    writer: Option<safetensors::Writer>,
    plan: Vec<(TensorPlan, Content<'s>)>,
    /// The planned tensor to write next.
    next: usize,
    /// Produced tensors waiting for their turn, by HF name.
    pending: BTreeMap<String, Vec<u8>>,
    quantized_linears: usize,
    bytes_written: u64,
}

impl<'s> PackedExport<'s> {
    /// Plans the directory and opens its safetensors file. With `produced_norms`, the producer also hands
    /// over every block's two RMSNorm weights (AWQ folds its scales into them).
    pub fn create(source: &'s ModelSource, output: &Path, format: PackedFormat, produced_norms: bool) -> Result<Self> {
        if output.exists() && !output.is_dir() {
            bail!(
                "{}: exists and is not a directory; {} output is an HF model directory",
                output.display(),
                format.name()
            );
        }
        let plan = plan_tensors(source, &format, produced_norms)?;
        let created_dir = !output.exists();
        let writer_plan = plan.iter().map(|(p, _)| p.clone()).collect();
        let writer = match safetensors::Writer::create(output, writer_plan, safetensors_metadata(source), None) {
            Ok(writer) => writer,
            Err(e) => {
                if created_dir {
                    let _ = std::fs::remove_dir(output);
                }
                return Err(e.into());
            }
        };
        Ok(Self {
            source,
            format,
            output: output.to_path_buf(),
            created_dir,
            writer: Some(writer),
            plan,
            next: 0,
            pending: BTreeMap::new(),
            quantized_linears: 0,
            bytes_written: 0,
        })
    }

    /// Packs and writes the block linear `gguf_name` (e.g. `blk.3.attn_q.weight`), its rows in the
    /// source's order.
    pub fn linear(&mut self, gguf_name: &str, q: &GroupQuantized) -> Result<()> {
        let prefix = self.produced_prefix(gguf_name, ".weight")?;
        let heads = self.gguf_qk_heads(gguf_name);
        let unpermute = |values: &[u8], row_len: usize| match heads {
            Some(h) => permute_rows_gguf_to_hf(values, h, row_len),
            None => values.to_vec(),
        };
        let codes = unpermute(&q.codes, q.cols);
        let zeros: Vec<u8> = q.zeros.chunks(q.rows).flat_map(|group| unpermute(group, 1)).collect();
        let scales: Vec<f32> = match heads {
            Some(h) => q.scales.chunks(q.rows).flat_map(|group| permute_rows_gguf_to_hf(group, h, 1)).collect(),
            None => q.scales.clone(),
        };
        let weights = IntWeights {
            out_features: q.rows,
            in_features: q.cols,
            bits: q.bits,
            codes: &codes,
            zeros: &zeros,
            scales: &scales,
            g_idx: &q.g_idx,
        };
        self.write_packed(&prefix, &weights)
    }

    /// Packs and writes the block linear `gguf_name` as it was read from a packed checkpoint
    /// ([`ModelSource::packed`], rows in HF order): codes, zero points, f16 scales and `g_idx` are stored
    /// as they are, so a linear read from a checkpoint of this format is written back byte for byte.
    pub fn packed_linear(&mut self, gguf_name: &str, w: &UnpackedWeights) -> Result<()> {
        let prefix = self.produced_prefix(gguf_name, ".weight")?;
        self.write_packed(&prefix, &w.as_int_weights())
    }

    fn write_packed(&mut self, prefix: &str, weights: &IntWeights) -> Result<()> {
        let packed = match &self.format {
            PackedFormat::Gptq(_) => gptq::pack(weights).map(|p| p.tensors()),
            PackedFormat::Awq(c) => awq::pack(weights, c.group_size).map(|p| p.tensors()),
        }
        .map_err(|e| anyhow!("{}: {prefix}: {e}", self.output.display()))?;
        for PackedTensor { suffix, dtype, shape, data } in packed {
            let name = format!("{prefix}.{suffix}");
            let planned = self.plan.iter().find(|(p, _)| p.name == name).map(|(p, _)| p);
            if planned.is_none_or(|p| p.dtype != dtype || p.shape != shape) {
                bail!("{}: {name}: packed as {dtype} {shape:?}, which the plan does not expect", self.output.display());
            }
            self.pending.insert(name, data);
        }
        self.quantized_linears += 1;
        self.flush()
    }

    /// Writes a block's RMSNorm weight `gguf_name` (`blk.N.attn_norm.weight` / `ffn_norm.weight`) as the
    /// producer changed it.
    pub fn norm(&mut self, gguf_name: &str, values: &[f32]) -> Result<()> {
        let name = self.produced_prefix(gguf_name, "")?;
        self.pending.insert(name, FloatType::F16.encode(values));
        self.flush()
    }

    /// Writes what is left, then the config and tokenizer files.
    pub fn finish(mut self) -> Result<PackedReport> {
        self.flush()?;
        if let Some((p, _)) = self.plan.get(self.next) {
            bail!("{}: {} was never produced", self.output.display(), p.name);
        }
        self.writer.take().expect("open until finished").finish()?;
        let mut config = self.source.config.to_hf_json(FloatType::F16.torch_name());
        let quantization_config = match &self.format {
            PackedFormat::Gptq(c) => {
                write_json(&self.output.join("quantize_config.json"), &c.to_json())?;
                c.to_json()
            }
            PackedFormat::Awq(c) => {
                write_json(&self.output.join("quant_config.json"), &c.quant_config())?;
                c.quantization_config()
            }
        };
        config["quantization_config"] = quantization_config;
        write_hf_side_files(self.source, &self.output, &config)?;
        self.created_dir = false;
        Ok(PackedReport {
            output: self.output.clone(),
            tensors: self.plan.len(),
            quantized_linears: self.quantized_linears,
            bytes_written: self.bytes_written,
        })
    }

    /// The HF name of a produced tensor (without `strip`), checked to be one the plan expects.
    fn produced_prefix(&self, gguf_name: &str, strip: &str) -> Result<String> {
        let hf = names::gguf_to_hf(gguf_name).unwrap_or_default();
        let prefix = hf.strip_suffix(strip).unwrap_or(&hf).to_string();
        let expected = self.plan.iter().any(|(p, c)| {
            matches!(c, Content::Produced)
                && p.name.strip_prefix(&prefix).is_some_and(|s| s.is_empty() || s.starts_with('.'))
        });
        if !expected {
            bail!("{}: {gguf_name} is not a tensor this export expects from the quantizer", self.output.display());
        }
        Ok(prefix)
    }

    /// Heads to unpermute over when `gguf_name` is a q/k projection whose rows are in llama.cpp's order.
    fn gguf_qk_heads(&self, gguf_name: &str) -> Option<usize> {
        let t = self.source.tensor(gguf_name)?;
        self.source.is_gguf().then(|| self.source.qk_heads(t)).flatten()
    }

    /// Writes planned tensors in order for as long as their bytes are at hand.
    fn flush(&mut self) -> Result<()> {
        let writer = self.writer.as_mut().expect("open until finished");
        while let Some((plan, content)) = self.plan.get(self.next) {
            match content {
                Content::Source(t) => {
                    // Row chunks: the embedding alone would be hundreds of MB of f32 at once.
                    self.source.for_each_hf_rows(t, |values| {
                        let bytes = FloatType::F16.encode(values);
                        self.bytes_written += bytes.len() as u64;
                        Ok(writer.write_tensor_part(&plan.name, &bytes)?)
                    })?;
                    self.source.release(t);
                }
                Content::Produced => match self.pending.remove(&plan.name) {
                    Some(bytes) => {
                        writer.write_tensor(&plan.name, &bytes)?;
                        self.bytes_written += bytes.len() as u64;
                    }
                    None => break,
                },
            }
            self.next += 1;
        }
        Ok(())
    }
}

impl Drop for PackedExport<'_> {
    /// An unfinished export leaves nothing: the writer discards its files, then a directory this export
    /// created is removed (only if empty, so nothing else is ever deleted).
    fn drop(&mut self) {
        drop(self.writer.take());
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.output);
        }
    }
}

/// Whether `gguf_name` is a block linear's weight.
fn is_block_linear(gguf_name: &str) -> bool {
    names::gguf_layer(gguf_name).is_some()
        && BlockLinear::ALL.iter().any(|l| gguf_name.ends_with(&format!(".{}", l.gguf_name())))
}

fn is_block_norm(gguf_name: &str) -> bool {
    names::gguf_layer(gguf_name).is_some()
        && (gguf_name.ends_with(".attn_norm.weight") || gguf_name.ends_with(".ffn_norm.weight"))
}

/// Every output tensor in write order: the embedding, the blocks in order (each block's tensors in the
/// source's order), then the rest.
fn plan_tensors<'s>(
    source: &'s ModelSource,
    format: &PackedFormat,
    produced_norms: bool,
) -> Result<Vec<(TensorPlan, Content<'s>)>> {
    let mut tensors: Vec<(&SourceTensor, &str)> =
        source.tensors().iter().filter_map(|t| Some((t, t.hf_name.as_deref()?))).collect();
    let section = |t: &SourceTensor| match names::gguf_layer(&t.gguf_name) {
        _ if t.gguf_name == "token_embd.weight" => (0, 0),
        Some(layer) => (1, layer),
        None => (2, 0),
    };
    tensors.sort_by_key(|(t, _)| section(t));
    let mut plan = Vec::new();
    for (t, hf_name) in tensors {
        if is_block_linear(&t.gguf_name) {
            let &[out, inp] = t.shape.as_slice() else {
                bail!("{}: {} has shape {:?}, not a matrix", source.path.display(), t.gguf_name, t.shape);
            };
            if let Some(why) = format.unfit(out, inp) {
                bail!("{}: {hf_name} is {out} x {inp}: {why}", source.path.display());
            }
            let prefix = hf_name.strip_suffix(".weight").unwrap_or(hf_name);
            for (suffix, dtype, shape) in format.tensor_shapes(out, inp) {
                plan.push((TensorPlan { name: format!("{prefix}.{suffix}"), dtype, shape }, Content::Produced));
            }
        } else {
            let content =
                if produced_norms && is_block_norm(&t.gguf_name) { Content::Produced } else { Content::Source(t) };
            plan.push((TensorPlan { name: hf_name.to_string(), dtype: Dtype::F16, shape: t.shape.clone() }, content));
        }
    }
    Ok(plan)
}
