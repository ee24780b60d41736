//! [`Model`]: a llama-family decoder whose weights are borrowed, in their storage format, from an
//! opened [`ModelSource`].
//!
//! Matrices become [`GgmlLinear`]s over the mapped bytes (safetensors F32/F16/BF16 have the same byte
//! layout as the GGML types of those names); GPTQ/AWQ linears are repacked once into a
//! [`PackedLinear`] of about their stored size; only the small vectors (norms, biases, RoPE factors)
//! are decoded to f32. Rows keep the file's order, and the RoPE pair layout follows from it.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use formats::safetensors::Dtype;
use formats::GgmlType;

use super::attention::Heads;
use super::kernels::packed::PackedLinear;
use super::kernels::{DecodeRows, GgmlLinear, Linear};
use super::rope::{PairLayout, Rope};
use crate::model::source::Storage;
use crate::model::{ModelConfig, ModelSource, SourceTensor};

/// Weights of one transformer block.
pub struct Layer<'a> {
    pub attn_norm: Vec<f32>,
    pub wq: LayerLinear<'a>,
    pub wk: LayerLinear<'a>,
    pub wv: LayerLinear<'a>,
    /// q/k/v biases (Qwen2).
    pub bias: Option<QkvBias>,
    pub wo: LayerLinear<'a>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: LayerLinear<'a>,
    pub w_up: LayerLinear<'a>,
    pub w_down: LayerLinear<'a>,
}

/// A block linear's weights: a GGML-typed matrix borrowed from the mapped file, or GPTQ/AWQ codes
/// repacked at load (shared, so copies of a layer cost nothing).
#[derive(Clone, Debug)]
pub enum LayerLinear<'a> {
    Ggml(GgmlLinear<'a>),
    Packed(Arc<PackedLinear>),
}

impl LayerLinear<'_> {
    pub fn rows(&self) -> usize {
        self.decoder().rows()
    }

    pub fn cols(&self) -> usize {
        self.decoder().cols()
    }

    /// Decodes the weight rows in `rows` into `dst` (`rows.len() × cols`): the f32 weights the
    /// products use.
    pub fn decode_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        self.decoder().decode_rows(rows, dst)
    }

    fn decoder(&self) -> &dyn DecodeRows {
        match self {
            LayerLinear::Ggml(w) => w,
            LayerLinear::Packed(w) => w.as_ref(),
        }
    }

    fn linear(&self) -> &dyn Linear {
        match self {
            LayerLinear::Ggml(w) => w,
            LayerLinear::Packed(w) => w.as_ref(),
        }
    }
}

impl<'a> From<GgmlLinear<'a>> for LayerLinear<'a> {
    fn from(w: GgmlLinear<'a>) -> Self {
        LayerLinear::Ggml(w)
    }
}

impl Linear for LayerLinear<'_> {
    fn in_features(&self) -> usize {
        self.linear().in_features()
    }

    fn out_features(&self) -> usize {
        self.linear().out_features()
    }

    fn forward(&self, x: &[f32], y: &mut [f32]) {
        self.linear().forward(x, y)
    }
}

pub struct QkvBias {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

pub struct Model<'a> {
    pub config: ModelConfig,
    pub heads: Heads,
    pub rope: Rope,
    /// `vocab × hidden`; rows are looked up, not multiplied.
    pub token_embd: GgmlLinear<'a>,
    pub layers: Vec<Layer<'a>>,
    pub output_norm: Vec<f32>,
    /// `vocab × hidden`: `output.weight`, or `token_embd` again when the head is tied.
    pub output: GgmlLinear<'a>,
    source: &'a ModelSource,
}

impl<'a> Model<'a> {
    pub fn load(source: &'a ModelSource) -> Result<Self> {
        let c = &source.config;
        let heads = Heads { query: c.num_heads, kv: c.num_kv_heads, dim: c.head_dim };
        let loader = Loader { source };
        let (hidden, ffn, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_width, kv_width) = (heads.q_width(), heads.kv_width());
        let layers = (0..c.num_layers)
            .map(|i| {
                let name = |t: &str| format!("blk.{i}.{t}");
                let bias = match source.tensor(&name("attn_q.bias")) {
                    None => None,
                    Some(_) => Some(QkvBias {
                        q: loader.vector(&name("attn_q.bias"), q_width)?,
                        k: loader.vector(&name("attn_k.bias"), kv_width)?,
                        v: loader.vector(&name("attn_v.bias"), kv_width)?,
                    }),
                };
                Ok(Layer {
                    attn_norm: loader.vector(&name("attn_norm.weight"), hidden)?,
                    wq: loader.linear(&name("attn_q.weight"), q_width, hidden)?,
                    wk: loader.linear(&name("attn_k.weight"), kv_width, hidden)?,
                    wv: loader.linear(&name("attn_v.weight"), kv_width, hidden)?,
                    bias,
                    wo: loader.linear(&name("attn_output.weight"), hidden, q_width)?,
                    ffn_norm: loader.vector(&name("ffn_norm.weight"), hidden)?,
                    w_gate: loader.linear(&name("ffn_gate.weight"), ffn, hidden)?,
                    w_up: loader.linear(&name("ffn_up.weight"), ffn, hidden)?,
                    w_down: loader.linear(&name("ffn_down.weight"), hidden, ffn)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_embd = loader.matrix("token_embd.weight", vocab, hidden)?;
        let output = match source.tensor("output.weight") {
            Some(_) => loader.matrix("output.weight", vocab, hidden)?,
            None => token_embd,
        };
        Ok(Self {
            config: c.clone(),
            heads,
            rope: loader.rope()?,
            token_embd,
            layers,
            output_norm: loader.vector("output_norm.weight", hidden)?,
            output,
            source,
        })
    }

    /// Lets the OS drop the mapped pages of the source tensor `gguf_name` (a no-op for a tensor the
    /// source does not have): for a weight that will not be read again, or only rarely. Reading it
    /// later still works; the pages come back from the file.
    pub fn release_source(&self, gguf_name: &str) {
        if let Some(t) = self.source.tensor(gguf_name) {
            self.source.release(t);
        }
    }
}

struct Loader<'a> {
    source: &'a ModelSource,
}

impl<'a> Loader<'a> {
    fn tensor(&self, name: &str) -> Result<&'a SourceTensor> {
        self.source.tensor(name).with_context(|| format!("{}: tensor {name} is missing", self.source.path.display()))
    }

    /// A block linear: packed GPTQ/AWQ codes are repacked for the runtime, other types borrowed.
    fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<LayerLinear<'a>> {
        let t = self.tensor(name)?;
        if !matches!(t.storage, Storage::Packed(_)) {
            return Ok(self.matrix(name, rows, cols)?.into());
        }
        let fail = |msg: String| anyhow::anyhow!("{}: tensor {name}: {msg}", self.source.path.display());
        if t.shape != [rows, cols] {
            return Err(fail(format!("shape {:?}, expected [{rows}, {cols}] from the config", t.shape)));
        }
        let packed = PackedLinear::new(&self.source.packed(t)?).map_err(fail)?;
        self.source.release(t);
        Ok(LayerLinear::Packed(Arc::new(packed)))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<GgmlLinear<'a>> {
        let t = self.tensor(name)?;
        let fail = |msg: String| anyhow::anyhow!("{}: tensor {name}: {msg}", self.source.path.display());
        if t.shape != [rows, cols] {
            return Err(fail(format!("shape {:?}, expected [{rows}, {cols}] from the config", t.shape)));
        }
        let ty = match t.storage {
            Storage::Ggml(ty) => ty,
            Storage::Safetensors(Dtype::F32) => GgmlType::F32,
            Storage::Safetensors(Dtype::F16) => GgmlType::F16,
            Storage::Safetensors(Dtype::BF16) => GgmlType::BF16,
            Storage::Safetensors(other) => return Err(fail(format!("{} weights are not supported", other.name()))),
            Storage::Packed(f) => return Err(fail(format!("{} weights are not supported here", f.name()))),
        };
        GgmlLinear::new(ty, rows, cols, self.source.raw(t)).map_err(fail)
    }

    /// A 1-D tensor decoded to f32, in the same row order as the matrices (that matters for q/k
    /// biases).
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        if t.shape != [len] {
            bail!("{}: tensor {name}: shape {:?}, expected [{len}]", self.source.path.display(), t.shape);
        }
        if self.source.is_gguf() {
            self.source.load_gguf_order(t)
        } else {
            self.source.load_hf_order(t)
        }
    }

    /// Pairs are adjacent exactly when the file stores q/k rows in llama.cpp's permuted order.
    fn rope(&self) -> Result<Rope> {
        let c = &self.source.config;
        let layout =
            if self.source.is_gguf() && c.arch.permutes_qk() { PairLayout::Adjacent } else { PairLayout::HalfSplit };
        let factors = match (self.source.tensor("rope_freqs.weight"), &c.rope_scaling) {
            (Some(_), _) => Some(self.vector("rope_freqs.weight", c.head_dim / 2)?),
            (None, Some(scaling)) => Some(scaling.frequency_factors(c.head_dim, c.rope_theta)),
            (None, None) => None,
        };
        Ok(Rope::new(layout, c.head_dim, c.rope_theta, factors.as_deref()))
    }
}
