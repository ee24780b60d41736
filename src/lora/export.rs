//! `qforge convert ADAPTER_DIR -o adapter.gguf`: a PEFT adapter as llama.cpp's LoRA GGUF.
//!
//! The format names tensors after the base model's GGUF tensors and stores B's rows of llama q/k
//! projections in the base's permuted RoPE order, so the base model is opened for its config and tensor
//! list: `base_model_name_or_path` when it is a local directory or GGUF file, else that repository in
//! the Hugging Face cache. llama.cpp scales every pair by one `alpha / r`; a module whose PEFT scale
//! differs (rsLoRA, rank or alpha patterns) gets the ratio folded into its B. DoRA magnitudes, `lora_B`
//! biases and saved whole tensors have no place in the format and are refused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use formats::gguf::{GgufWriter, TensorPlan};
use formats::lora::gguf::{self as lora_gguf, TRANSPOSED_A};
use formats::output::ensure_distinct;

use super::adapter::{transposed, Adapter, AdapterSpec, LoraModule};
use super::math::Orientation;
use super::select;
use crate::convert::{ConvertOptions, ConvertReport, FloatType, Target};
use crate::model::{names, ModelSource};

/// One `.lora_a` / `.lora_b` pair to write.
struct Pair<'a> {
    module: &'a LoraModule,
    base: String,
    /// Rows of B permuted over this many heads.
    qk_heads: Option<usize>,
    /// Written as `Aᵀ` (embeddings).
    a_transposed: bool,
}

pub fn convert_adapter(dir: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let started = Instant::now();
    ensure_distinct(dir, output)?;
    if opts.target != Target::Gguf {
        bail!("{}: an adapter directory converts to a llama.cpp LoRA GGUF only", dir.display());
    }
    if output.is_dir() {
        bail!("{}: is a directory; a LoRA GGUF is a single file", output.display());
    }
    let dtype = opts.dtype.unwrap_or(FloatType::F32);
    if dtype == FloatType::Bf16 {
        bail!("llama.cpp reads LoRA tensors as F32 or F16; choose --dtype f32 or f16");
    }
    let adapter = Adapter::open(&AdapterSpec { path: dir.to_path_buf(), weight: 1.0 })?;
    let config = adapter.peft_config().expect("opened from a directory");
    for u in &adapter.unknown {
        eprintln!("warning: {}: ignored {u}", adapter.weights_path().display());
    }
    if let Some(m) = adapter.modules.iter().find(|m| m.is_dora()) {
        bail!(
            "{}: module {} is DoRA, which llama.cpp's LoRA GGUF cannot hold; merge it with `qforge merge-lora`",
            dir.display(),
            m.name
        );
    }
    if let Some(m) = adapter.modules.iter().find(|m| m.bias.is_some()) {
        bail!("{}: module {} has a lora_B bias, which llama.cpp's LoRA GGUF cannot hold; merge it with `qforge merge-lora`", dir.display(), m.name);
    }
    if let Some(r) = adapter.replacements.first() {
        bail!(
            "{}: the adapter saves whole tensors ('{}'), which llama.cpp's LoRA GGUF cannot hold; merge it with `qforge merge-lora`",
            dir.display(),
            r.tensor
        );
    }

    let base_path = locate_base(config.base_model_name_or_path.as_deref(), dir)?;
    let base = ModelSource::open(&base_path).with_context(|| format!("opening the base model of {}", dir.display()))?;
    let pairs = adapter.modules.iter().map(|m| pair(&adapter, m, &base)).collect::<Result<Vec<_>>>()?;

    // The file's alpha reproduces the config's own scale at the config's own rank.
    let alpha = select::scale(config.lora_alpha, config.r, config.use_rslora) * config.r as f64;
    let plan = pairs
        .iter()
        .flat_map(|p| {
            let [r, n_in] = p.module.a_shape;
            let out = p.module.b_shape[0];
            let a_dims = if p.a_transposed { vec![r as u64, n_in as u64] } else { vec![n_in as u64, r as u64] };
            [
                TensorPlan { name: lora_gguf::a_name(&p.base), dims: a_dims, ggml_type: dtype.ggml() },
                TensorPlan {
                    name: lora_gguf::b_name(&p.base),
                    dims: vec![r as u64, out as u64],
                    ggml_type: dtype.ggml(),
                },
            ]
        })
        .collect::<Vec<_>>();
    let metadata = lora_gguf::metadata(base.config.arch.gguf_name(), alpha as f32);
    let mut writer = GgufWriter::create(output, &metadata, plan)?;
    let mut written = 0u64;
    for p in &pairs {
        let m = p.module;
        let (a, b) = adapter.factors(m)?;
        let a = if p.a_transposed { transposed(&a, m.rank, m.a_shape[1]) } else { a };
        // llama.cpp scales by alpha / r, or by 1 when alpha is 0.
        let file_scale = if alpha == 0.0 { 1.0 } else { alpha / m.rank as f64 };
        let fold = m.scale / file_scale;
        let b: Vec<f32> = if fold == 1.0 { b } else { b.iter().map(|&x| (x as f64 * fold) as f32).collect() };
        let b = match p.qk_heads {
            Some(heads) => names::permute_rows_hf_to_gguf(&b, heads, m.rank),
            None => b,
        };
        for (name, values) in [(lora_gguf::a_name(&p.base), a), (lora_gguf::b_name(&p.base), b)] {
            let bytes = dtype.encode(&values);
            writer.write_tensor(&name, &bytes)?;
            written += bytes.len() as u64;
        }
    }
    writer.finish()?;
    Ok(ConvertReport {
        output: output.to_path_buf(),
        tensors: pairs.len() * 2,
        bytes_written: written,
        dtype,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn pair<'a>(adapter: &Adapter, m: &'a LoraModule, base: &ModelSource) -> Result<Pair<'a>> {
    let at = || adapter.path.display();
    let gguf_name = names::hf_to_gguf(m.target.as_str())
        .with_context(|| format!("{}: module {} adapts {}, which has no GGUF name", at(), m.name, m.target))?;
    let t = base.tensor(&gguf_name).with_context(|| {
        format!("{}: module {} adapts {gguf_name}, which {} does not have", at(), m.name, base.path.display())
    })?;
    if t.shape[..] != m.stored_shape() {
        bail!(
            "{}: module {}: lora_B {:?} x lora_A {:?} does not fit {gguf_name} {:?} of {}",
            at(),
            m.name,
            m.b_shape,
            m.a_shape,
            t.shape,
            base.path.display()
        );
    }
    let a_transposed = TRANSPOSED_A.contains(&gguf_name.as_str());
    match (m.orientation, a_transposed) {
        (Orientation::OutputRows, false) | (Orientation::OutputColumns, true) => {}
        _ => bail!("{}: module {} ({:?}) has no llama.cpp LoRA layout for {gguf_name}", at(), m.name, m.orientation),
    }
    Ok(Pair { module: m, qk_heads: base.qk_heads(t), base: gguf_name, a_transposed })
}

/// The base model named by `base_model_name_or_path`: a local path (as given, or relative to the
/// adapter directory), or the repository's snapshot in the Hugging Face cache.
fn locate_base(name: Option<&str>, adapter_dir: &Path) -> Result<PathBuf> {
    let Some(name) = name else {
        bail!("{}: adapter_config.json names no base_model_name_or_path; the LoRA GGUF needs the base model's tensor names", adapter_dir.display());
    };
    for candidate in [PathBuf::from(name), adapter_dir.join(name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    if let Some(snapshot) = hf_cache_snapshot(name) {
        return Ok(snapshot);
    }
    bail!(
        "{}: the base model {name:?} is neither a local path nor in the Hugging Face cache; llama.cpp's LoRA GGUF \
         needs its tensor names and q/k layout: set base_model_name_or_path in adapter_config.json to a local copy \
         of the base (HF directory or GGUF file)",
        adapter_dir.display()
    )
}

fn hf_cache_snapshot(repo: &str) -> Option<PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))?;
        Some(home.join("hub"))
    })?;
    let repo_dir = hub.join(format!("models--{}", repo.replace('/', "--")));
    let revision = std::fs::read_to_string(repo_dir.join("refs/main")).ok()?;
    let snapshot = repo_dir.join("snapshots").join(revision.trim());
    snapshot.join("config.json").is_file().then_some(snapshot)
}
