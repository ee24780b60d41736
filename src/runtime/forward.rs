//! The forward pass, straight down: embed, then per block norm → attention → residual → norm →
//! SwiGLU MLP → residual, then the final norm and the output head. One small function per operation;
//! activations are row-major `tokens × width` f32 buffers.
//!
//! [`Model::forward_observed`] shows a [`LinearObserver`] the input rows of every block's linear layer
//! (what `llama-imatrix` collects); [`Model::forward`] passes the no-op `()` observer, which compiles
//! away.

use std::ops::{ControlFlow, Range};

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::attention::{attention, KvCache};
use super::kernels::Linear;
use super::math;
use super::model::{Layer, LayerLinear, Model};
use super::rope::RopeTable;

/// Activation buffers for one batch, sized once and reused by every layer (as llama2.c's `RunState`).
struct Buffers {
    /// Normalized input of the current sub-block (`n × hidden`).
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, before the output projection (`n × q_width`).
    att: Vec<f32>,
    /// Output of the sub-block's last projection, added to the residual stream (`n × hidden`).
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Buffers {
    fn new(model: &Model, n: usize) -> Self {
        let c = &model.config;
        let zeros = |width: usize| vec![0f32; n * width];
        Self {
            h: zeros(c.hidden_size),
            q: zeros(model.heads.q_width()),
            k: zeros(model.heads.kv_width()),
            v: zeros(model.heads.kv_width()),
            att: zeros(model.heads.q_width()),
            out: zeros(c.hidden_size),
            gate: zeros(c.intermediate_size),
            up: zeros(c.intermediate_size),
        }
    }
}

/// The linear layers of a transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockLinear {
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl BlockLinear {
    /// In the order the forward pass runs them.
    pub const ALL: [Self; 7] =
        [Self::AttnQ, Self::AttnK, Self::AttnV, Self::AttnOutput, Self::FfnGate, Self::FfnUp, Self::FfnDown];

    /// The weight's GGUF name within block `blk.N.`, e.g. `attn_q.weight`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::AttnQ => "attn_q.weight",
            Self::AttnK => "attn_k.weight",
            Self::AttnV => "attn_v.weight",
            Self::AttnOutput => "attn_output.weight",
            Self::FfnGate => "ffn_gate.weight",
            Self::FfnUp => "ffn_up.weight",
            Self::FfnDown => "ffn_down.weight",
        }
    }

    /// This linear layer of `layer`.
    pub fn of<'l, 'a>(self, layer: &'l Layer<'a>) -> &'l LayerLinear<'a> {
        match self {
            Self::AttnQ => &layer.wq,
            Self::AttnK => &layer.wk,
            Self::AttnV => &layer.wv,
            Self::AttnOutput => &layer.wo,
            Self::FfnGate => &layer.w_gate,
            Self::FfnUp => &layer.w_up,
            Self::FfnDown => &layer.w_down,
        }
    }
}

/// Sees what every block's linear layers are fed during a forward pass.
pub trait LinearObserver {
    /// `x` is the input of `linear` in block `layer`: `tokens × in_features`, row-major, one row per
    /// token of the batch.
    fn observe(&mut self, layer: usize, linear: BlockLinear, x: &[f32]);

    /// Whether the observer has seen all it needs: [`Model::block_forward`] then stops before the next
    /// linear, leaving `x` partly updated, and [`Model::forward_observed`] fails.
    #[inline(always)]
    fn done(&self) -> bool {
        false
    }
}

/// Observes nothing: the plain forward pass.
impl LinearObserver for () {
    #[inline(always)]
    fn observe(&mut self, _: usize, _: BlockLinear, _: &[f32]) {}
}

impl Model<'_> {
    /// A KV cache for up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), self.heads, capacity)
    }

    /// Runs `tokens`, which follow the positions already in `cache`, through the model and returns
    /// the logits (`outputs.len() × vocab`, row-major) of the batch rows in `outputs`.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], outputs: Range<usize>) -> Result<Vec<f32>> {
        // Runs on a pool thread: called from outside the pool, each of the pass's ~200 parallel
        // products would hand its work to the pool and put the caller to sleep until it is done (two
        // thread switches per product, which dominate a one-token pass on small models).
        rayon::scope(|_| self.forward_observed(cache, tokens, outputs, &mut ()))
    }

    /// [`forward`](Self::forward), showing `observer` the input of every block's linear layers.
    pub fn forward_observed<O: LinearObserver + ?Sized>(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        outputs: Range<usize>,
        observer: &mut O,
    ) -> Result<Vec<f32>> {
        let (n, first_pos) = (tokens.len(), cache.len());
        if first_pos + n > cache.capacity() {
            bail!("{} positions exceed the KV cache's {}", first_pos + n, cache.capacity());
        }
        if outputs.end > n {
            bail!("outputs {outputs:?} lie outside a batch of {n} tokens");
        }
        let rope = self.rope.table(first_pos..first_pos + n);
        let mut buf = Buffers::new(self, n);
        let mut x = self.embed(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let attention = self.attention_block(layer, l, &mut x, cache, &rope, &mut buf, observer);
            if attention.is_break() || self.mlp_block(layer, l, &mut x, &mut buf, observer).is_break() {
                bail!("the observer stopped the forward pass in block {l}");
            }
        }
        cache.advance(n);
        let hidden = self.config.hidden_size;
        let last = &mut x[outputs.start * hidden..outputs.end * hidden];
        rms_norm(last, &self.output_norm, self.config.rms_norm_eps);
        let mut logits = vec![0f32; outputs.len() * self.output.out_features()];
        self.output.forward(last, &mut logits);
        Ok(logits)
    }

    /// Runs block `l` with the weights `layer` (the model's own, or stand-ins such as GPTQ's quantized
    /// ones) over `x`, one whole sequence from position 0 (`tokens × hidden`), updating it in place.
    /// Breaks as soon as `observer` is [done](LinearObserver::done).
    pub fn block_forward<O: LinearObserver + ?Sized>(
        &self,
        layer: &Layer,
        l: usize,
        x: &mut [f32],
        observer: &mut O,
    ) -> ControlFlow<()> {
        let n = x.len() / self.config.hidden_size;
        let mut cache = self.new_cache(n);
        let mut buf = Buffers::new(self, n);
        self.attention_block(layer, l, x, &mut cache, &self.rope.table(0..n), &mut buf, observer)?;
        self.mlp_block(layer, l, x, &mut buf, observer)
    }

    /// The embedding rows of `tokens` (`tokens × hidden`).
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (vocab, hidden) = (self.token_embd.rows(), self.token_embd.cols());
        let mut x = vec![0f32; tokens.len() * hidden];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(hidden)) {
            if t as usize >= vocab {
                bail!("token id {t} is outside the vocabulary of {vocab}");
            }
            self.token_embd.decode_rows(t as usize..t as usize + 1, row);
        }
        Ok(x)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_block<O: LinearObserver + ?Sized>(
        &self,
        layer: &Layer,
        l: usize,
        x: &mut [f32],
        cache: &mut KvCache,
        rope: &RopeTable,
        buf: &mut Buffers,
        observer: &mut O,
    ) -> ControlFlow<()> {
        buf.h.copy_from_slice(x);
        rms_norm(&mut buf.h, &layer.attn_norm, self.config.rms_norm_eps);
        show(observer, l, &[BlockLinear::AttnQ, BlockLinear::AttnK, BlockLinear::AttnV], &buf.h)?;
        layer.wq.forward(&buf.h, &mut buf.q);
        layer.wk.forward(&buf.h, &mut buf.k);
        layer.wv.forward(&buf.h, &mut buf.v);
        if let Some(b) = &layer.bias {
            add_bias(&mut buf.q, &b.q);
            add_bias(&mut buf.k, &b.k);
            add_bias(&mut buf.v, &b.v);
        }
        self.rope.apply(rope, &mut buf.q, self.heads.dim);
        self.rope.apply(rope, &mut buf.k, self.heads.dim);
        let first_pos = cache.len();
        cache.append(l, &buf.k, &buf.v);
        let (keys, values) = cache.layer(l);
        attention(&buf.q, keys, values, self.heads, first_pos, &mut buf.att);
        show(observer, l, &[BlockLinear::AttnOutput], &buf.att)?;
        layer.wo.forward(&buf.att, &mut buf.out);
        add(x, &buf.out);
        ControlFlow::Continue(())
    }

    fn mlp_block<O: LinearObserver + ?Sized>(
        &self,
        layer: &Layer,
        l: usize,
        x: &mut [f32],
        buf: &mut Buffers,
        observer: &mut O,
    ) -> ControlFlow<()> {
        buf.h.copy_from_slice(x);
        rms_norm(&mut buf.h, &layer.ffn_norm, self.config.rms_norm_eps);
        show(observer, l, &[BlockLinear::FfnGate, BlockLinear::FfnUp], &buf.h)?;
        layer.w_gate.forward(&buf.h, &mut buf.gate);
        layer.w_up.forward(&buf.h, &mut buf.up);
        let ffn = self.config.intermediate_size;
        buf.gate.par_chunks_mut(ffn).zip(buf.up.par_chunks(ffn)).for_each(|(g, u)| math::silu_mul(g, u));
        show(observer, l, &[BlockLinear::FfnDown], &buf.gate)?;
        layer.w_down.forward(&buf.gate, &mut buf.out);
        add(x, &buf.out);
        ControlFlow::Continue(())
    }
}

/// Shows `observer` the input `x` of `linears` (which share it), and breaks once it is done.
#[inline(always)]
fn show<O: LinearObserver + ?Sized>(observer: &mut O, l: usize, linears: &[BlockLinear], x: &[f32]) -> ControlFlow<()> {
    for &linear in linears {
        observer.observe(l, linear, x);
    }
    if observer.done() {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// `x / rms(x) · weight` per row; the mean square is summed in f64 as ggml does.
fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let mean_square = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64;
        let scale = 1.0 / (mean_square as f32 + eps).sqrt();
        row.iter_mut().zip(weight).for_each(|(v, &w)| *v = *v * scale * w);
    }
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add(row, bias);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
