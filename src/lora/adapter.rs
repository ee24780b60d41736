//! Adapters as a merge sees them: LoRA modules (target base tensor, layout, rank, scale) and whole
//! tensors that replace base tensors, read from a PEFT directory or a llama.cpp LoRA GGUF.
//!
//! Every tensor name is accounted for here, against the adapter's own config: names PEFT would not
//! load are collected as unknown keys (the caller decides whether they are warnings or errors), and
//! inconsistent factors (missing halves, rank mismatches, a config rank the tensors do not have) are
//! errors naming the file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use formats::lora::gguf::{LoraGguf, LoraPair};
use formats::lora::peft::{Bias, LoraPart, PeftAdapter, PeftKey};
use formats::safetensors::{Dtype, TensorRef};

use super::math::Orientation;
use super::select::Selection;

/// `--adapter PATH[:WEIGHT]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl AdapterSpec {
    /// `PATH` or `PATH:WEIGHT`; a suffix after the last `:` that is not a number belongs to the path.
    pub fn parse(s: &str) -> Result<AdapterSpec, String> {
        if let Some((path, weight)) = s.rsplit_once(':') {
            if let Ok(w) = weight.parse::<f64>() {
                if !w.is_finite() {
                    return Err(format!("adapter weight {weight:?} is not a finite number"));
                }
                if path.is_empty() {
                    return Err(format!("{s:?} names no adapter"));
                }
                return Ok(AdapterSpec { path: path.into(), weight: w });
            }
        }
        if s.is_empty() {
            return Err("empty adapter path".into());
        }
        Ok(AdapterSpec { path: s.into(), weight: 1.0 })
    }
}

/// A base tensor as an adapter names it; the naming also fixes the row order of its factors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetName {
    /// Hugging Face name; factors in HF row order.
    Hf(String),
    /// GGUF name; factors in GGUF row order (llama q/k rows interleaved).
    Gguf(String),
}

impl TargetName {
    pub fn as_str(&self) -> &str {
        match self {
            TargetName::Hf(n) | TargetName::Gguf(n) => n,
        }
    }
}

impl fmt::Display for TargetName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One adapted module.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The module's name in the adapter (`model.layers.0.self_attn.q_proj`, `blk.0.attn_q.weight`).
    pub name: String,
    pub target: TargetName,
    pub orientation: Orientation,
    pub rank: usize,
    /// `alpha / r` (or `alpha / sqrt(r)`); the user's adapter weight is not included.
    pub scale: f64,
    /// `[r, in]`.
    pub a_shape: [usize; 2],
    /// `[out, r]`.
    pub b_shape: [usize; 2],
    /// DoRA magnitude: its length.
    pub magnitude: Option<usize>,
    /// `lora_B.bias`: the base bias it adds to, and its length.
    pub bias: Option<(TargetName, usize)>,
    tensors: Factors,
}

impl LoraModule {
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// `(out, in)` of the adapted weight, whatever its stored orientation.
    pub fn out_in(&self) -> (usize, usize) {
        (self.b_shape[0], self.a_shape[1])
    }

    /// The base weight's shape as stored.
    pub fn stored_shape(&self) -> [usize; 2] {
        let (out, inp) = self.out_in();
        match self.orientation {
            Orientation::OutputRows => [out, inp],
            Orientation::OutputColumns => [inp, out],
        }
    }
}

#[derive(Clone, Debug)]
enum Factors {
    Peft { a: String, b: String, magnitude: Option<String>, bias: Option<String> },
    Gguf(LoraPair),
}

/// A whole tensor saved with the adapter that takes the place of a base tensor.
#[derive(Clone, Debug)]
pub struct Replacement {
    pub target: TargetName,
    pub tensor: String,
    pub shape: Vec<usize>,
}

enum Files {
    Peft(PeftAdapter),
    Gguf(LoraGguf),
}

pub struct Adapter {
    pub path: PathBuf,
    pub weight: f64,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
    /// The base architecture (GGUF name) a llama.cpp adapter was made for.
    pub gguf_architecture: Option<String>,
    pub modules: Vec<LoraModule>,
    pub replacements: Vec<Replacement>,
    /// Tensors PEFT (or llama.cpp) would not load, each with why.
    pub unknown: Vec<String>,
    files: Files,
}

/// Modules PEFT saves whole when they are adapted or resized (`EMBEDDING_LAYER_NAMES`).
const EMBEDDING_LAYERS: &[&str] = &["embed_tokens", "lm_head"];

impl Adapter {
    /// Opens a PEFT adapter directory or a llama.cpp LoRA GGUF.
    pub fn open(spec: &AdapterSpec) -> Result<Adapter> {
        let path = &spec.path;
        let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot open adapter", path.display()))?;
        let adapter = if meta.is_dir() { Self::open_peft(spec)? } else { Self::open_gguf(spec)? };
        if adapter.modules.is_empty() && adapter.replacements.is_empty() {
            bail!(
                "{}: the adapter targets nothing: none of its tensors is a LoRA factor of a module it targets \
                 or a tensor it saves whole ({} unknown: {})",
                path.display(),
                adapter.unknown.len(),
                adapter.unknown.first().map_or("none", String::as_str)
            );
        }
        Ok(adapter)
    }

    fn open_peft(spec: &AdapterSpec) -> Result<Adapter> {
        let peft = PeftAdapter::open(&spec.path)?;
        let weights_path = peft.dir.join(formats::lora::peft::WEIGHTS_FILE_NAME);
        let config_path = peft.dir.join(formats::lora::peft::CONFIG_FILE_NAME);
        let config = &peft.config;
        let selection = Selection::new(config).map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
        let fail = |msg: String| anyhow::anyhow!("{}: {msg}", weights_path.display());

        let mut parts: BTreeMap<String, BTreeMap<LoraPart, TensorRef>> = BTreeMap::new();
        let mut whole = Vec::new();
        let mut unknown = Vec::new();
        for t in peft.weights.tensors() {
            if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
                bail!(fail(format!("tensor '{}' is {}; LoRA tensors are floats", t.name, t.dtype)));
            }
            match PeftKey::parse(t.name) {
                PeftKey::Lora { module, part } => {
                    if let Some(other) = parts.entry(module.clone()).or_default().insert(part, t) {
                        bail!(fail(format!(
                            "tensors '{}' and '{}' are both {part:?} of module {module}",
                            other.name, t.name
                        )));
                    }
                }
                PeftKey::Full { module, param } => whole.push((module, param, t)),
                PeftKey::Unknown => unknown.push(format!("'{}': not a tensor name PEFT writes", t.name)),
            }
        }

        let mut modules = Vec::new();
        for (module, mut p) in parts {
            if !selection.is_target(&module) {
                let names: Vec<&str> = p.values().map(|t| t.name).collect();
                unknown.push(format!(
                    "{names:?}: adapter_config.json does not target module {module}, so PEFT ignores them"
                ));
                continue;
            }
            let (a, b, orientation) = match (p.remove(&LoraPart::A), p.remove(&LoraPart::B)) {
                (Some(a), Some(b)) => {
                    let o = if config.fan_in_fan_out { Orientation::OutputColumns } else { Orientation::OutputRows };
                    (a, b, o)
                }
                (None, None) => match (p.remove(&LoraPart::EmbeddingA), p.remove(&LoraPart::EmbeddingB)) {
                    (Some(a), Some(b)) => (a, b, Orientation::OutputColumns),
                    (a, b) => bail!(fail(half_missing(&module, "lora_embedding_A", a, "lora_embedding_B", b))),
                },
                (a, b) => bail!(fail(half_missing(&module, "lora_A", a, "lora_B", b))),
            };
            let (a_shape, b_shape) = factor_shapes(&a, &b).map_err(fail)?;
            let (rank, scale) = selection.rank_scale(&module);
            if rank != a_shape[0] {
                bail!(fail(format!(
                    "adapter_config.json gives module {module} rank {rank}, but its '{}' is {:?}",
                    a.name, a.shape
                )));
            }
            let out = b_shape[0];
            let magnitude = match p.remove(&LoraPart::Magnitude) {
                Some(m) if config.use_dora => Some((vector_len(&m, out).map_err(fail)?, m.name.to_string())),
                Some(m) => {
                    unknown.push(format!("'{}': a DoRA magnitude, but use_dora is not set", m.name));
                    None
                }
                None if config.use_dora => {
                    bail!(fail(format!("use_dora is set but module {module} has no lora_magnitude_vector")))
                }
                None => None,
            };
            let bias = match p.remove(&LoraPart::BBias) {
                Some(t) if config.lora_bias => Some((vector_len(&t, out).map_err(fail)?, t.name.to_string())),
                Some(t) => {
                    unknown.push(format!("'{}': a lora_B bias, but lora_bias is not set", t.name));
                    None
                }
                None => None,
            };
            for t in p.values() {
                unknown.push(format!("'{}': does not belong with the module's other LoRA tensors", t.name));
            }
            modules.push(LoraModule {
                target: TargetName::Hf(format!("{module}.weight")),
                orientation,
                rank,
                scale,
                a_shape,
                b_shape,
                magnitude: magnitude.as_ref().map(|(n, _)| *n),
                bias: bias.as_ref().map(|(n, _)| (TargetName::Hf(format!("{module}.bias")), *n)),
                tensors: Factors::Peft {
                    a: a.name.to_string(),
                    b: b.name.to_string(),
                    magnitude: magnitude.map(|(_, name)| name),
                    bias: bias.map(|(_, name)| name),
                },
                name: module,
            });
        }

        let adapted = |module: &str| modules.iter().any(|m| m.name == module);
        let mut replacements = Vec::new();
        for (module, param, t) in whole {
            let explained = selection.is_saved_module(&module)
                || EMBEDDING_LAYERS.contains(&module.rsplit('.').next().unwrap_or(""))
                || (param == "bias" && config.bias == Bias::All)
                || (param == "bias" && config.bias == Bias::LoraOnly && adapted(&module))
                || (param == "weight" && adapted(&module));
            if explained {
                let target = TargetName::Hf(format!("{module}.{param}"));
                replacements.push(Replacement { target, tensor: t.name.to_string(), shape: t.shape.to_vec() });
            } else {
                unknown.push(format!(
                    "'{}': a whole tensor adapter_config.json does not account for (modules_to_save, bias)",
                    t.name
                ));
            }
        }
        Ok(Adapter {
            path: spec.path.clone(),
            weight: spec.weight,
            base_model: config.base_model_name_or_path.clone(),
            gguf_architecture: None,
            modules,
            replacements,
            unknown,
            files: Files::Peft(peft),
        })
    }

    fn open_gguf(spec: &AdapterSpec) -> Result<Adapter> {
        let lora = LoraGguf::open(&spec.path)?;
        let modules = lora
            .pairs
            .iter()
            .map(|pair| {
                let rank = pair.rank();
                let [rows, cols] = pair.base_shape();
                // llama.cpp: scale = alpha / r, or 1 when alpha is 0.
                let scale = if lora.alpha == 0.0 { 1.0 } else { lora.alpha as f64 / rank as f64 };
                LoraModule {
                    name: pair.base.clone(),
                    target: TargetName::Gguf(pair.base.clone()),
                    // The transposed-A pairs are embeddings, whose rows are tokens.
                    orientation: if pair.a_transposed { Orientation::OutputColumns } else { Orientation::OutputRows },
                    rank,
                    scale,
                    a_shape: if pair.a_transposed { [rank, rows] } else { [rank, cols] },
                    b_shape: if pair.a_transposed { [cols, rank] } else { [rows, rank] },
                    magnitude: None,
                    bias: None,
                    tensors: Factors::Gguf(pair.clone()),
                }
            })
            .collect();
        let unknown = lora.unrecognized.iter().map(|n| format!("'{n}': not a .lora_a/.lora_b tensor")).collect();
        Ok(Adapter {
            path: spec.path.clone(),
            weight: spec.weight,
            base_model: None,
            gguf_architecture: Some(lora.architecture.clone()),
            modules,
            replacements: Vec::new(),
            unknown,
            files: Files::Gguf(lora),
        })
    }

    /// `(A [r, in], B [out, r])`, row-major, checked finite.
    pub fn factors(&self, m: &LoraModule) -> Result<(Vec<f32>, Vec<f32>)> {
        match (&m.tensors, &self.files) {
            (Factors::Peft { a, b, .. }, Files::Peft(_)) => Ok((self.peft_tensor(a)?, self.peft_tensor(b)?)),
            (Factors::Gguf(pair), Files::Gguf(lora)) => {
                let (a, b) = lora.load(pair)?;
                self.check_finite(&pair.a.name, &a)?;
                self.check_finite(&pair.b.name, &b)?;
                let a = if pair.a_transposed { transposed(&a, m.a_shape[1], m.rank) } else { a };
                Ok((a, b))
            }
            _ => unreachable!("a module's tensors come from its own adapter's files"),
        }
    }

    /// DoRA's magnitude vector.
    pub fn magnitude(&self, m: &LoraModule) -> Result<Option<Vec<f32>>> {
        match &m.tensors {
            Factors::Peft { magnitude: Some(name), .. } => Ok(Some(self.peft_tensor(name)?)),
            _ => Ok(None),
        }
    }

    /// `lora_B.bias`.
    pub fn lora_bias(&self, m: &LoraModule) -> Result<Option<Vec<f32>>> {
        match &m.tensors {
            Factors::Peft { bias: Some(name), .. } => Ok(Some(self.peft_tensor(name)?)),
            _ => Ok(None),
        }
    }

    pub fn replacement(&self, r: &Replacement) -> Result<Vec<f32>> {
        self.peft_tensor(&r.tensor)
    }

    fn peft_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let Files::Peft(peft) = &self.files else { unreachable!("only PEFT adapters have named tensors") };
        let t = peft.weights.tensor(name).expect("listed tensors exist");
        let values = t.to_f32()?;
        self.check_finite(name, &values)?;
        Ok(values)
    }

    fn check_finite(&self, name: &str, values: &[f32]) -> Result<()> {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor '{name}' holds {} at index {i}; a merge would spread it over the weight",
                self.weights_path().display(),
                values[i]
            );
        }
        Ok(())
    }

    /// The file the adapter's tensors are in.
    pub fn weights_path(&self) -> PathBuf {
        match &self.files {
            Files::Peft(p) => p.dir.join(formats::lora::peft::WEIGHTS_FILE_NAME),
            Files::Gguf(g) => g.file.path().to_path_buf(),
        }
    }

    /// The PEFT config, for adapters read from a PEFT directory.
    pub fn peft_config(&self) -> Option<&formats::lora::peft::PeftConfig> {
        match &self.files {
            Files::Peft(p) => Some(&p.config),
            Files::Gguf(_) => None,
        }
    }
}

fn half_missing(module: &str, a_name: &str, a: Option<TensorRef>, b_name: &str, b: Option<TensorRef>) -> String {
    let (has, lacks) = if a.is_some() { (a_name, b_name) } else { (b_name, a_name) };
    if a.is_none() && b.is_none() {
        return format!("module {module} has LoRA tensors but neither {a_name} nor {b_name}");
    }
    format!("module {module} has {has} but no {lacks}")
}

fn factor_shapes(a: &TensorRef, b: &TensorRef) -> Result<([usize; 2], [usize; 2]), String> {
    let two = |t: &TensorRef| -> Result<[usize; 2], String> {
        match *t.shape {
            [x, y] if x > 0 && y > 0 => Ok([x, y]),
            _ => Err(format!("tensor '{}' has shape {:?}; LoRA factors are non-empty matrices", t.name, t.shape)),
        }
    };
    let (a_shape, b_shape) = (two(a)?, two(b)?);
    if a_shape[0] != b_shape[1] {
        return Err(format!(
            "rank mismatch: '{}' is {:?} (rank {}) but '{}' is {:?} (rank {})",
            a.name, a.shape, a_shape[0], b.name, b.shape, b_shape[1]
        ));
    }
    Ok((a_shape, b_shape))
}

fn vector_len(t: &TensorRef, expected: usize) -> Result<usize, String> {
    let n = t.n_elements();
    if n != expected || t.shape.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(format!(
            "tensor '{}' has shape {:?}; it needs {expected} values, one per output feature",
            t.name, t.shape
        ));
    }
    Ok(n)
}

/// `m` (`rows × cols`, row-major) transposed.
pub(super) fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| m[r * cols + c])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_specs_take_an_optional_weight() {
        assert_eq!(AdapterSpec::parse("dir").unwrap(), AdapterSpec { path: "dir".into(), weight: 1.0 });
        assert_eq!(AdapterSpec::parse("a/b:0.25").unwrap(), AdapterSpec { path: "a/b".into(), weight: 0.25 });
        assert_eq!(AdapterSpec::parse("a:b").unwrap(), AdapterSpec { path: "a:b".into(), weight: 1.0 });
        assert_eq!(AdapterSpec::parse("x:-1").unwrap().weight, -1.0);
        assert!(AdapterSpec::parse(":0.5").is_err());
        assert!(AdapterSpec::parse("x:inf").is_err());
        assert!(AdapterSpec::parse("").is_err());
    }
}
