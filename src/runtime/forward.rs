//! The forward pass, straight down: embed, then per block norm → attention → residual → norm →
//! SwiGLU MLP → residual, then the final norm and the output head. One small function per operation;
//! activations are row-major `tokens × width` f32 buffers.

use std::ops::Range;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::attention::{attention, KvCache};
use super::kernels::Linear;
use super::math;
use super::model::{Layer, Model};
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

impl Model<'_> {
    /// A KV cache for up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), self.heads, capacity)
    }

    /// Runs `tokens`, which follow the positions already in `cache`, through the model and returns
    /// the logits (`outputs.len() × vocab`, row-major) of the batch rows in `outputs`.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], outputs: Range<usize>) -> Result<Vec<f32>> {
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
            self.attention_block(layer, l, &mut x, cache, &rope, &mut buf);
            self.mlp_block(layer, &mut x, &mut buf);
        }
        cache.advance(n);
        let hidden = self.config.hidden_size;
        let last = &mut x[outputs.start * hidden..outputs.end * hidden];
        rms_norm(last, &self.output_norm, self.config.rms_norm_eps);
        let mut logits = vec![0f32; outputs.len() * self.output.out_features()];
        self.output.forward(last, &mut logits);
        Ok(logits)
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
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

    fn attention_block(
        &self,
        layer: &Layer,
        l: usize,
        x: &mut [f32],
        cache: &mut KvCache,
        rope: &RopeTable,
        buf: &mut Buffers,
    ) {
        buf.h.copy_from_slice(x);
        rms_norm(&mut buf.h, &layer.attn_norm, self.config.rms_norm_eps);
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
        layer.wo.forward(&buf.att, &mut buf.out);
        add(x, &buf.out);
    }

    fn mlp_block(&self, layer: &Layer, x: &mut [f32], buf: &mut Buffers) {
        buf.h.copy_from_slice(x);
        rms_norm(&mut buf.h, &layer.ffn_norm, self.config.rms_norm_eps);
        layer.w_gate.forward(&buf.h, &mut buf.gate);
        layer.w_up.forward(&buf.h, &mut buf.up);
        let ffn = self.config.intermediate_size;
        buf.gate.par_chunks_mut(ffn).zip(buf.up.par_chunks(ffn)).for_each(|(g, u)| math::silu_mul(g, u));
        layer.w_down.forward(&buf.gate, &mut buf.out);
        add(x, &buf.out);
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
