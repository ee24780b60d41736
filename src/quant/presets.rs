//! The quantization presets (`Q4_K_M`, ...) and the per-tensor type plan they imply.
//!
//! This is a port of llama.cpp's `src/llama-quant.cpp` (`llama_tensor_get_type` and its helpers) for
//! the llama-family models qforge reads: which tensors may be quantized, which get more bits in the
//! `_M`/`_L` mixes (attn_v, ffn_down, attn_output, the output/tied embedding), the per-layer counters
//! those rules walk, and the fallback to a 32-wide block type when a row is not a multiple of 256.
//! Branches that only concern architectures or presets qforge does not offer (Falcon, Mixtral-style
//! experts, IQ1–IQ3, TQ, MXFP4) are left out. [`plan`] is a pure function of the tensor list.

use std::fmt;

use anyhow::{bail, Result};
use formats::GgmlType;
use regex::Regex;

use crate::model::{Architecture, ModelConfig};

/// A `--type` preset, named and numbered (`general.file_type`) as llama.cpp's `llama_ftype`.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

/// (preset, name, `llama_ftype`, type of the bulk of the matrices).
const PRESETS: &[(Preset, &str, u32, GgmlType)] = &[
    (Preset::F32, "F32", 0, GgmlType::F32),
    (Preset::F16, "F16", 1, GgmlType::F16),
    (Preset::BF16, "BF16", 32, GgmlType::BF16),
    (Preset::Q4_0, "Q4_0", 2, GgmlType::Q4_0),
    (Preset::Q4_1, "Q4_1", 3, GgmlType::Q4_1),
    (Preset::Q5_0, "Q5_0", 8, GgmlType::Q5_0),
    (Preset::Q5_1, "Q5_1", 9, GgmlType::Q5_1),
    (Preset::Q8_0, "Q8_0", 7, GgmlType::Q8_0),
    (Preset::Q2_K, "Q2_K", 10, GgmlType::Q2_K),
    (Preset::Q3_K_S, "Q3_K_S", 11, GgmlType::Q3_K),
    (Preset::Q3_K_M, "Q3_K_M", 12, GgmlType::Q3_K),
    (Preset::Q3_K_L, "Q3_K_L", 13, GgmlType::Q3_K),
    (Preset::Q4_K_S, "Q4_K_S", 14, GgmlType::Q4_K),
    (Preset::Q4_K_M, "Q4_K_M", 15, GgmlType::Q4_K),
    (Preset::Q5_K_S, "Q5_K_S", 16, GgmlType::Q5_K),
    (Preset::Q5_K_M, "Q5_K_M", 17, GgmlType::Q5_K),
    (Preset::Q6_K, "Q6_K", 18, GgmlType::Q6_K),
    (Preset::IQ4_NL, "IQ4_NL", 25, GgmlType::IQ4_NL),
    (Preset::IQ4_XS, "IQ4_XS", 30, GgmlType::IQ4_XS),
];

/// llama-quantize's short aliases for the `_M` mixes.
const ALIASES: &[(&str, Preset)] = &[("Q3_K", Preset::Q3_K_M), ("Q4_K", Preset::Q4_K_M), ("Q5_K", Preset::Q5_K_M)];

impl Preset {
    fn row(self) -> &'static (Preset, &'static str, u32, GgmlType) {
        PRESETS.iter().find(|p| p.0 == self).expect("every preset has a row")
    }

    /// Case-insensitive, accepting llama-quantize's aliases (`Q4_K` is `Q4_K_M`).
    pub fn from_name(name: &str) -> Option<Self> {
        let found = PRESETS.iter().find(|p| p.1.eq_ignore_ascii_case(name)).map(|p| p.0);
        found.or_else(|| ALIASES.iter().find(|a| a.0.eq_ignore_ascii_case(name)).map(|a| a.1))
    }

    pub fn all() -> impl Iterator<Item = Preset> {
        PRESETS.iter().map(|p| p.0)
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// `general.file_type` of a file made with this preset.
    pub fn file_type(self) -> u32 {
        self.row().2
    }

    /// The type most matrices get; the mix rules move some tensors off it.
    pub fn default_type(self) -> GgmlType {
        self.row().3
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--tensor-type REGEX=TYPE` rule: tensors whose name the regex finds a match in get `ty`.
#[derive(Clone, Debug)]
pub struct TensorTypeRule {
    pub pattern: Regex,
    pub ty: GgmlType,
}

impl TensorTypeRule {
    /// Parses `REGEX=TYPE`, splitting at the first `=`; the pattern is lower-cased, as llama-quantize does.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (pattern, ty) = spec.split_once('=').ok_or_else(|| format!("{spec:?} is not REGEX=TYPE"))?;
        if pattern.is_empty() {
            return Err(format!("{spec:?} has no tensor name pattern before '='"));
        }
        let ty = GgmlType::from_name(ty).ok_or_else(|| format!("{spec:?}: unknown tensor type {ty:?}"))?;
        let pattern = Regex::new(&pattern.to_lowercase()).map_err(|e| format!("{spec:?}: {e}"))?;
        Ok(Self { pattern, ty })
    }
}

/// The hyper-parameters llama.cpp's mix rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub n_layer: usize,
    /// Query heads per key/value head.
    pub n_gqa: usize,
    /// llama.cpp classifies the model as a 70B (attn_v then never drops below Q5_K).
    pub is_70b: bool,
}

impl ModelShape {
    pub fn of(config: &ModelConfig) -> Self {
        let is_70b = config.num_layers == 80
            && match config.arch {
                Architecture::Llama | Architecture::Mistral => config.num_heads != config.num_kv_heads,
                Architecture::Qwen2 => true,
            };
        Self { n_layer: config.num_layers, n_gqa: config.num_heads / config.num_kv_heads.max(1), is_70b }
    }
}

/// A tensor as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    /// GGUF order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// The type it has now (what a non-quantized tensor keeps).
    pub current: GgmlType,
}

impl TensorDesc {
    /// ggml's `ggml_n_dims`: trailing dimensions of size 1 do not count.
    fn n_dims(&self) -> usize {
        self.dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1)
    }

    fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
}

/// Everything besides the tensor list that decides the plan.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub preset: Preset,
    /// Checked in order; the first match wins.
    pub rules: Vec<TensorTypeRule>,
    pub output_type: Option<GgmlType>,
    pub token_embedding_type: Option<GgmlType>,
    pub leave_output_tensor: bool,
    /// Every quantizable tensor gets the preset's type (no mix rules).
    pub pure: bool,
    pub has_imatrix: bool,
}

impl PlanOptions {
    pub fn new(preset: Preset) -> Self {
        Self {
            preset,
            rules: Vec::new(),
            output_type: None,
            token_embedding_type: None,
            leave_output_tensor: false,
            pure: false,
            has_imatrix: false,
        }
    }
}

/// One tensor's decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Index into the planner's input list.
    pub index: usize,
    pub name: String,
    pub ty: GgmlType,
    /// Set when the chosen type did not fit the row length and `ty` is llama.cpp's replacement.
    pub fell_back_from: Option<GgmlType>,
}

/// The type of every tensor, in llama.cpp's processing (and output) order: tensors outside the blocks
/// first, then block by block, by name within each. That order matters: the mixes spread extra bits
/// over attn_v tensors by counting them as they come.
pub fn plan(shape: &ModelShape, tensors: &[TensorDesc], opts: &PlanOptions) -> Result<Vec<PlannedTensor>> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |t: &TensorDesc| (block_index(&t.name), t.name.clone());
        key(&tensors[a]).cmp(&key(&tensors[b]))
    });
    let mut mixer = Mixer {
        shape,
        opts,
        tied_embeddings: !tensors.iter().any(|t| Category::of(&t.name) == Category::Output),
        n_attention_wv: tensors.iter().filter(|t| Category::of(&t.name).is_attn_v()).count(),
        i_attention_wv: 0,
        i_ffn_down: 0,
    };
    order.into_iter().map(|i| mixer.choose(i, &tensors[i])).collect()
}

/// `N` for `blk.N.*` (parsed as C's `sscanf("blk.%d.")` does), -1 for tensors outside the blocks.
fn block_index(name: &str) -> i64 {
    let Some(rest) = name.strip_prefix("blk.") else { return -1 };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    match (rest[..digits].parse(), rest.as_bytes().get(digits)) {
        (Ok(n), Some(b'.')) => n,
        _ => -1,
    }
}

/// llama.cpp's broad tensor roles, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    /// attn_v and the fused projections that contain it (attn_qkv, attn_kv_b).
    AttnV,
    AttnOutput,
    FfnDown,
    Output,
    Other,
}

impl Category {
    fn of(name: &str) -> Self {
        if name == "output.weight" {
            Self::Output
        } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
            Self::TokenEmbd
        } else if ["attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"].iter().any(|s| name.contains(s)) {
            Self::AttnV
        } else if name.contains("attn_output.weight") {
            Self::AttnOutput
        } else if name.contains("ffn_down") && !name.contains("ffn_up") && !name.contains("ffn_gate") {
            Self::FfnDown
        } else {
            Self::Other
        }
    }

    fn is_attn_v(self) -> bool {
        self == Self::AttnV
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third in between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The walk over the tensors, with the counters the mix rules read.
struct Mixer<'a> {
    shape: &'a ModelShape,
    opts: &'a PlanOptions,
    tied_embeddings: bool,
    n_attention_wv: usize,
    i_attention_wv: usize,
    i_ffn_down: usize,
}

impl Mixer<'_> {
    /// `llama_tensor_get_type`.
    fn choose(&mut self, index: usize, t: &TensorDesc) -> Result<PlannedTensor> {
        let category = Category::of(&t.name);
        let planned = |ty, fell_back_from| PlannedTensor { index, name: t.name.clone(), ty, fell_back_from };
        if !self.allows_quantization(t) {
            return Ok(planned(t.current, None));
        }
        let explicit = match category {
            Category::TokenEmbd => self.opts.token_embedding_type.map(|ty| (ty, "--token-embedding-type")),
            Category::Output => self.opts.output_type.map(|ty| (ty, "--output-type")),
            _ => None,
        };
        if let Some((ty, option)) = explicit {
            if !t.row_len().is_multiple_of(ty.block_size() as u64) {
                bail!(
                    "{option} {ty}: {} has rows of {} values, not a multiple of {}",
                    t.name,
                    t.row_len(),
                    ty.block_size()
                );
            }
            return Ok(planned(ty, None));
        }
        let default = self.opts.preset.default_type();
        if !default.is_quantized() {
            return Ok(planned(default, None));
        }
        let chosen = match self.opts.rules.iter().find(|r| r.pattern.is_match(&t.name)) {
            Some(rule) => rule.ty,
            None if self.opts.pure => default,
            None => self.mix(default, t, category),
        };
        let ty = fallback(t, chosen)?;
        Ok(planned(ty, (ty != chosen).then_some(chosen)))
    }

    /// `tensor_allows_quantization`, for the tensor names of the llama family.
    fn allows_quantization(&self, t: &TensorDesc) -> bool {
        t.n_dims() >= 2
            && t.name.ends_with("weight")
            && !t.name.contains("_norm.weight")
            && !(self.opts.leave_output_tensor && t.name == "output.weight")
    }

    /// `llama_tensor_get_type_impl`: the preset's mix rules.
    fn mix(&mut self, ty: GgmlType, t: &TensorDesc, category: Category) -> GgmlType {
        use GgmlType as T;
        use Preset as P;
        let preset = self.opts.preset;
        // With tied embeddings the token embedding is also the output projection, so it is treated as one.
        if category == Category::Output || (self.tied_embeddings && category == Category::TokenEmbd) {
            return match self.opts.output_type {
                Some(ty) => ty,
                None if !t.row_len().is_multiple_of(ty.block_size() as u64) => T::Q8_0,
                None if ty != T::Q8_0 => T::Q6_K,
                None => ty,
            };
        }
        match category {
            Category::AttnV => {
                let (i, n, gqa) = (self.i_attention_wv, self.n_attention_wv, self.shape.n_gqa);
                self.i_attention_wv += 1;
                let ty = match preset {
                    P::Q2_K if gqa >= 4 => T::Q4_K,
                    P::Q2_K => T::Q3_K,
                    P::Q3_K_M if i < 2 => T::Q5_K,
                    P::Q3_K_M => T::Q4_K,
                    P::Q3_K_L => T::Q5_K,
                    P::IQ4_NL | P::IQ4_XS if gqa >= 4 => T::Q5_K,
                    P::Q4_K_M | P::Q5_K_M if use_more_bits(i, n) => T::Q6_K,
                    P::Q4_K_S if i < 4 => T::Q5_K,
                    _ => ty,
                };
                // A 70B's attn_v is 8x smaller than attn_q (8 heads share it), so more bits cost little.
                if self.shape.is_70b && matches!(ty, T::Q3_K | T::Q4_K) {
                    T::Q5_K
                } else {
                    ty
                }
            }
            Category::FfnDown => {
                // Without experts llama.cpp takes the layer from the running count of ffn_down tensors.
                let (i, n) = (self.i_ffn_down, self.shape.n_layer);
                self.i_ffn_down += 1;
                let imatrix = self.opts.has_imatrix;
                match preset {
                    P::Q2_K => T::Q3_K,
                    P::Q3_K_M if i < n / 16 => T::Q5_K,
                    P::Q3_K_M => T::Q4_K,
                    P::Q3_K_L => T::Q5_K,
                    P::Q4_K_M | P::Q5_K_M if use_more_bits(i, n) => T::Q6_K,
                    P::IQ4_NL | P::IQ4_XS if i < n / 8 && !imatrix => T::Q5_K,
                    P::Q4_K_S if i < n / 8 => T::Q5_K,
                    // Q4_0/Q5_0's first ffn_down layers can go badly even with an imatrix.
                    P::Q4_0 if imatrix && i < n / 8 => T::Q4_1,
                    P::Q5_0 if imatrix && i < n / 8 => T::Q5_1,
                    _ => ty,
                }
            }
            Category::AttnOutput => match preset {
                P::Q2_K => T::Q3_K,
                P::Q3_K_M => T::Q4_K,
                P::Q3_K_L => T::Q5_K,
                _ => ty,
            },
            Category::TokenEmbd | Category::Output | Category::Other => ty,
        }
    }
}

/// `tensor_type_fallback`: a type whose blocks do not divide the row length is replaced by a 32-wide
/// type of similar size, or F16 when even that does not fit.
fn fallback(t: &TensorDesc, ty: GgmlType) -> Result<GgmlType> {
    use GgmlType as T;
    let row_len = t.row_len();
    if row_len.is_multiple_of(ty.block_size() as u64) {
        return Ok(ty);
    }
    let replacement = match ty {
        T::IQ1_S | T::IQ1_M | T::IQ2_XXS | T::IQ2_XS | T::IQ2_S | T::IQ3_XXS | T::IQ3_S | T::IQ4_XS => T::IQ4_NL,
        T::Q2_K | T::Q3_K | T::TQ1_0 | T::TQ2_0 => T::Q4_0,
        T::Q4_K => T::Q5_0,
        T::Q5_K => T::Q5_1,
        T::Q6_K => T::Q8_0,
        _ if ty.block_size() <= 32 => ty,
        _ => bail!("{}: rows of {row_len} values do not fit {ty} and no smaller type replaces it", t.name),
    };
    Ok(if row_len.is_multiple_of(replacement.block_size() as u64) { replacement } else { T::F16 })
}

#[cfg(test)]
mod tests;
