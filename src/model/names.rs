//! The mapping between Hugging Face and GGUF tensor names, and llama.cpp's Q/K row permutation.
//!
//! HF stores a linear weight as `[out, in]` row-major; GGUF stores the same bytes with dims `[in, out]`
//! (dims[0] innermost), so only names and dim order change, except for the `llama` architecture's
//! q/k projections, whose rows llama.cpp reorders from HF's rotate-half RoPE layout to interleaved pairs.

/// Which projection's rows a Q/K permutation applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkRole {
    Query,
    Key,
}

/// Per-block tensors: (HF suffix after `model.layers.N.`, GGUF suffix after `blk.N.`).
const BLOCK_TENSORS: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Whole-model tensors.
const GLOBAL_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Tensors HF checkpoints carry that have no GGUF counterpart (recomputed at load time).
pub fn hf_is_ignored(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

pub fn hf_to_gguf(name: &str) -> Option<String> {
    if let Some((_, g)) = GLOBAL_TENSORS.iter().find(|(h, _)| *h == name) {
        return Some((*g).to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = BLOCK_TENSORS.iter().find(|(h, _)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some((h, _)) = GLOBAL_TENSORS.iter().find(|(_, g)| *g == name) {
        return Some((*h).to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (h, _) = BLOCK_TENSORS.iter().find(|(_, g)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{h}"))
}

/// The projection role of a GGUF tensor name whose rows llama.cpp permutes (weights and biases).
pub fn qk_role(gguf_name: &str) -> Option<QkRole> {
    let suffix = gguf_name.strip_prefix("blk.")?.split_once('.')?.1;
    match suffix {
        "attn_q.weight" | "attn_q.bias" => Some(QkRole::Query),
        "attn_k.weight" | "attn_k.bias" => Some(QkRole::Key),
        _ => None,
    }
}

/// Layer index of a GGUF block tensor (`blk.N.*`).
pub fn gguf_layer(gguf_name: &str) -> Option<usize> {
    gguf_name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// Reorders rows from HF's rotate-half layout to llama.cpp's interleaved layout.
///
/// Rows are grouped per head as `[2, head_dim/2]` and become `[head_dim/2, 2]`; `row_len` is the number
/// of values per row (1 for a bias).
pub fn permute_rows_hf_to_gguf<T: Copy>(data: &[T], heads: usize, row_len: usize) -> Vec<T> {
    permute(data, heads, row_len, false)
}

/// The inverse of [`permute_rows_hf_to_gguf`].
pub fn permute_rows_gguf_to_hf<T: Copy>(data: &[T], heads: usize, row_len: usize) -> Vec<T> {
    permute(data, heads, row_len, true)
}

fn permute<T: Copy>(data: &[T], heads: usize, row_len: usize, inverse: bool) -> Vec<T> {
    let rows = data.len() / row_len;
    assert!(rows.is_multiple_of(2 * heads), "{rows} rows cannot be split into {heads} heads of pairs");
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(data.len());
    for dst_row in 0..rows {
        let head = dst_row / (2 * half);
        let within = dst_row % (2 * half);
        // HF row (head, pair, i) sits at GGUF row (head, i, pair).
        let src_within = if inverse { (within % half) * 2 + within / half } else { (within % 2) * half + within / 2 };
        let src_row = head * 2 * half + src_within;
        out.extend_from_slice(&data[src_row * row_len..(src_row + 1) * row_len]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
            "model.layers.3.self_attn.k_proj.bias",
        ] {
            let g = hf_to_gguf(hf).unwrap();
            assert_eq!(gguf_to_hf(&g).as_deref(), Some(hf));
        }
        assert_eq!(hf_to_gguf("model.layers.7.mlp.up_proj.weight").unwrap(), "blk.7.ffn_up.weight");
        assert_eq!(hf_to_gguf("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp_reshape_swapaxes() {
        // llama.cpp: W.reshape(heads, 2, rows/heads/2, cols).swapaxes(1, 2).reshape(W.shape)
        let (heads, rows, cols) = (3, 12, 2);
        let half = rows / heads / 2;
        let w: Vec<usize> = (0..rows * cols).collect();
        let p = permute_rows_hf_to_gguf(&w, heads, cols);
        for h in 0..heads {
            for i in 0..half {
                for pair in 0..2 {
                    let gguf_row = h * 2 * half + i * 2 + pair;
                    let hf_row = h * 2 * half + pair * half + i;
                    assert_eq!(p[gguf_row * cols..(gguf_row + 1) * cols], w[hf_row * cols..(hf_row + 1) * cols]);
                }
            }
        }
        assert_eq!(permute_rows_gguf_to_hf(&p, heads, cols), w);
    }
}
