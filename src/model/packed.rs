//! GPTQ (v1 checkpoint format) and AWQ (GEMM) linears in an HF directory: the `quantization_config`
//! that says how they are packed, and each linear's `qweight`/`qzeros`/`scales`/`g_idx` tensors seen as
//! one logical `[out, in]` weight, whose shapes are checked against the config before any data is read.
//! Layouts: `shared/research/anchors.md` §2a/2b and [`formats::packed`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use formats::packed::awq::AwqLinear;
use formats::packed::gptq::GptqLinear;
use formats::packed::UnpackedWeights;
use formats::safetensors::{Checkpoint, Dtype, TensorRef};
use serde_json::Value;

/// Name suffixes of a packed linear's tensors; `qweight` stands for the linear.
pub const QWEIGHT: &str = "qweight";
const PARTS: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackMethod {
    Gptq,
    Awq,
}

/// How every packed linear of a checkpoint is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedFormat {
    pub method: PackMethod,
    pub bits: u32,
    /// `None` is GPTQ's `-1`: one group per row.
    pub group_size: Option<usize>,
}

impl PackedFormat {
    pub fn name(self) -> &'static str {
        match (self.method, self.bits) {
            (PackMethod::Gptq, 2) => "GPTQ w2",
            (PackMethod::Gptq, 3) => "GPTQ w3",
            (PackMethod::Gptq, 4) => "GPTQ w4",
            (PackMethod::Gptq, _) => "GPTQ w8",
            (PackMethod::Awq, _) => "AWQ w4",
        }
    }

    /// Codes plus each group's f16 scale and packed zero point (GPTQ's g_idx not counted).
    pub fn bits_per_weight(self) -> f64 {
        let bits = f64::from(self.bits);
        self.group_size.map_or(bits, |g| bits + (16.0 + bits) / g as f64)
    }

    /// The checkpoint's packing, from `config.json`'s `quantization_config` (or, for older AutoGPTQ
    /// directories, `quantize_config.json`); `None` for an unquantized checkpoint.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let (path, q) = match &config["quantization_config"] {
            Value::Null => {
                let legacy = dir.join("quantize_config.json");
                if !legacy.exists() {
                    return Ok(None);
                }
                let q = read_json(&legacy)?;
                (legacy, q)
            }
            q => (config_path, q.clone()),
        };
        Self::from_json(&q).map(Some).with_context(|| format!("{}: quantization_config", path.display()))
    }

    fn from_json(q: &Value) -> Result<Self> {
        let int = |key: &str| -> Result<Option<i64>> {
            match &q[key] {
                Value::Null => Ok(None),
                v => v.as_i64().map(Some).with_context(|| format!("{key} {v} is not an integer")),
            }
        };
        let text = |key: &str| q[key].as_str().map(str::to_ascii_lowercase);
        // AutoGPTQ's own quantize_config.json predates `quant_method`.
        let method = match text("quant_method").as_deref().unwrap_or("gptq") {
            "gptq" => PackMethod::Gptq,
            "awq" => PackMethod::Awq,
            other => bail!("quant_method {other:?} is not supported (qforge reads gptq and awq)"),
        };
        let bits = int("bits")?.or(int("w_bit")?).context("bits is missing")?;
        let group_size = int("group_size")?.or(int("q_group_size")?).unwrap_or(-1);
        let group_size = match group_size {
            -1 => None,
            g if g > 0 => Some(g as usize),
            g => bail!("group_size {g} is neither -1 nor positive"),
        };
        match method {
            PackMethod::Gptq => {
                // GPTQModel writes `format`, AutoGPTQ `checkpoint_format`; both default to v1.
                let format = text("format").or(text("checkpoint_format")).unwrap_or_else(|| "gptq".into());
                if format != "gptq" || q["is_marlin_format"].as_bool() == Some(true) {
                    bail!(
                        "checkpoint format {format:?} is not supported: qforge reads the GPTQ v1 format \
                         (\"gptq\"), not gptq_v2 or marlin"
                    );
                }
                if ![2, 3, 4, 8].contains(&bits) {
                    bail!("GPTQ with {bits}-bit weights is not supported (2, 3, 4 or 8)");
                }
                Ok(Self { method: PackMethod::Gptq, bits: bits as u32, group_size })
            }
            PackMethod::Awq => {
                let version = text("version").unwrap_or_else(|| "gemm".into());
                if version != "gemm" {
                    bail!("AWQ version {version:?} is not supported: qforge reads the GEMM layout (\"gemm\")");
                }
                if bits != 4 {
                    bail!("AWQ with {bits}-bit weights is not supported (its GEMM layout is 4-bit)");
                }
                if group_size.is_none() {
                    bail!("AWQ needs a positive group_size");
                }
                Ok(Self { method: PackMethod::Awq, bits: 4, group_size })
            }
        }
    }

    /// The packed linear whose tensors are `<prefix>.qweight` etc.: its `[out, in]` shape, checked with
    /// every part's dtype and shape against this format. Reads no tensor data.
    pub fn shape_of(self, checkpoint: &Checkpoint, prefix: &str) -> Result<[usize; 2]> {
        let part = |suffix: &str| -> Result<TensorRef<'_>> {
            let qweight = checkpoint.tensor(&format!("{prefix}.{QWEIGHT}")).expect("called for listed qweights");
            checkpoint.tensor(&format!("{prefix}.{suffix}")).with_context(|| {
                format!("{}: {prefix}.{QWEIGHT} has no {prefix}.{suffix} beside it", qweight.path.display())
            })
        };
        let qweight = part(QWEIGHT)?;
        let scales = part("scales")?;
        let qzeros = part("qzeros")?;
        let b = self.bits as usize;
        let &[qrows, qcols] = qweight.shape else {
            return Err(mismatch(&qweight, "two dimensions"));
        };
        if self.method == PackMethod::Gptq && qrows * 32 % b != 0 {
            return Err(mismatch(&qweight, &format!("a whole number of {b}-bit codes per column")));
        }
        let [out, inp] = match self.method {
            PackMethod::Gptq => [qcols, qrows * 32 / b],
            PackMethod::Awq => [qcols * 8, qrows],
        };
        let what = format!("a {} layer of {out} x {inp}", self.name());
        if out == 0 || inp == 0 || (self.method == PackMethod::Gptq && (inp % 32 != 0 || out % 32 != 0)) {
            return Err(mismatch(&qweight, &format!("{what}, whose sizes must be positive multiples of 32")));
        }
        let group = self.group_size.unwrap_or(inp);
        if self.method == PackMethod::Awq && inp % group != 0 {
            return Err(mismatch(&qweight, &format!("{what} in groups of {group}, which must divide {inp}")));
        }
        let groups = inp.div_ceil(group);
        let mut expected = vec![(&qweight, Dtype::I32, vec![qrows, qcols]), (&scales, Dtype::F16, vec![groups, out])];
        expected.push((&qzeros, Dtype::I32, vec![groups, out * b / 32]));
        let g_idx;
        if self.method == PackMethod::Gptq {
            g_idx = part("g_idx")?;
            expected.push((&g_idx, Dtype::I32, vec![inp]));
        }
        for (t, dtype, shape) in expected {
            if t.dtype != dtype || t.shape != shape.as_slice() {
                return Err(mismatch(t, &format!("{dtype} {shape:?} for {what} in groups of {group}")));
            }
        }
        Ok([out, inp])
    }

    /// Reads and unpacks a linear whose shapes [`shape_of`](Self::shape_of) checked.
    pub fn load(self, checkpoint: &Checkpoint, prefix: &str) -> Result<UnpackedWeights> {
        let part = |suffix: &str| checkpoint.tensor(&format!("{prefix}.{suffix}")).expect("parts were checked at open");
        Ok(match self.method {
            PackMethod::Gptq => {
                GptqLinear::from_tensors(self.bits, &part(QWEIGHT), &part("qzeros"), &part("scales"), &part("g_idx"))?
                    .unpack()
            }
            PackMethod::Awq => AwqLinear::from_tensors(&part(QWEIGHT), &part("qzeros"), &part("scales"))?.unpack(),
        })
    }

    /// Lets the OS drop the linear's mapped pages.
    pub fn release(self, checkpoint: &Checkpoint, prefix: &str) {
        for suffix in PARTS {
            checkpoint.release(&format!("{prefix}.{suffix}"));
        }
    }

    /// Bytes of the linear's tensors as stored.
    pub fn stored_bytes(self, checkpoint: &Checkpoint, prefix: &str) -> u64 {
        PARTS.iter().filter_map(|s| checkpoint.tensor(&format!("{prefix}.{s}"))).map(|t| t.data.len() as u64).sum()
    }
}

/// The linear a packed tensor belongs to and its part (`qweight`, `qzeros`, `scales`, `g_idx`).
pub fn split_part(name: &str) -> Option<(&str, &str)> {
    let (prefix, suffix) = name.rsplit_once('.')?;
    PARTS.contains(&suffix).then_some((prefix, suffix))
}

fn mismatch(t: &TensorRef<'_>, expected: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: tensor {} is {} {:?}, expected {expected}", t.path.display(), t.name, t.dtype, t.shape)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use formats::packed::{awq, gptq, UnpackedWeights};
    use formats::safetensors::{self, Dtype};
    use formats::GgmlType;
    use serde_json::{json, Value};

    use super::*;
    use crate::model::{Architecture, ModelSource};
    use crate::runtime::synthetic::{self, Rng, Synthetic};
    use crate::runtime::Model;

    struct Packing {
        method: PackMethod,
        bits: u32,
        /// `None`: one group per row.
        group: Option<usize>,
        act_order: bool,
    }

    impl Packing {
        fn config(&self) -> Value {
            match self.method {
                PackMethod::Gptq => json!({"quant_method": "gptq", "bits": self.bits, "desc_act": self.act_order,
                    "group_size": self.group.map_or(-1, |g| g as i64), "sym": false, "checkpoint_format": "gptq"}),
                PackMethod::Awq => json!({"quant_method": "awq", "bits": 4, "group_size": self.group,
                    "zero_point": true, "version": "gemm"}),
            }
        }
    }

    /// Round-to-nearest asymmetric group quantization (zero points ≥ 1, which GPTQ v1 can store), with
    /// groups in runs of a random column order under act-order.
    fn quantize(values: &[f32], rows: usize, cols: usize, p: &Packing, rng: &mut Rng) -> UnpackedWeights {
        let group = p.group.unwrap_or(cols);
        let groups = cols.div_ceil(group);
        let mut order: Vec<usize> = (0..cols).collect();
        if p.act_order {
            for i in (1..cols).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
        }
        let mut g_idx = vec![0u32; cols];
        for (position, &c) in order.iter().enumerate() {
            g_idx[c] = (position / group) as u32;
        }
        let maxq = ((1u32 << p.bits) - 1) as f32;
        let (mut lo, mut hi) = (vec![0f32; groups * rows], vec![0f32; groups * rows]);
        for (i, &v) in values.iter().enumerate() {
            let g = g_idx[i % cols] as usize * rows + i / cols;
            (lo[g], hi[g]) = (lo[g].min(v), hi[g].max(v));
        }
        let scales: Vec<f32> =
            lo.iter().zip(&hi).map(|(l, h)| half::f16::from_f32(((h - l) / maxq).max(1e-4)).to_f32()).collect();
        let zeros: Vec<u8> = lo.iter().zip(&scales).map(|(l, s)| (-l / s).round().clamp(1.0, maxq) as u8).collect();
        let codes = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let g = g_idx[i % cols] as usize * rows + i / cols;
                ((v / scales[g]).round() + f32::from(zeros[g])).clamp(0.0, maxq) as u8
            })
            .collect();
        UnpackedWeights { out_features: rows, in_features: cols, bits: p.bits, codes, zeros, scales, g_idx }
    }

    type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

    fn write_dir(dir: &Path, m: &Synthetic, tensors: &Tensors, quantization: Option<Value>) {
        let plan = tensors
            .iter()
            .map(|(name, dtype, shape, _)| safetensors::TensorPlan {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
            })
            .collect();
        let mut w = safetensors::Writer::create(dir, plan, BTreeMap::new(), None).unwrap();
        for (name, _, _, data) in tensors {
            w.write_tensor(name, data).unwrap();
        }
        w.finish().unwrap();
        let mut config = m.config.to_hf_json("float16");
        if let Some(q) = quantization {
            config["quantization_config"] = q;
        }
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The synthetic model with its block linears packed, and the same model with those linears
    /// dequantized to F32, as written tensors.
    fn packed_and_dequantized(m: &Synthetic, p: &Packing, rng: &mut Rng) -> (Tensors, Tensors) {
        let (mut packed, mut dense) = (Vec::new(), Vec::new());
        for t in &m.tensors {
            let prefix =
                t.hf_name.strip_suffix(".weight").filter(|_| t.shape.len() == 2 && t.hf_name.contains("layers"));
            let Some(prefix) = prefix else {
                let tensor = (t.hf_name.clone(), Dtype::F32, t.shape.clone(), f32_bytes(&t.values));
                packed.push(tensor.clone());
                dense.push(tensor);
                continue;
            };
            let w = quantize(&t.values, t.shape[0], t.shape[1], p, rng);
            let (parts, unpacked) = match p.method {
                PackMethod::Gptq => {
                    let layer = gptq::pack(&w.as_int_weights()).unwrap();
                    (layer.tensors(), layer.unpack())
                }
                PackMethod::Awq => {
                    let layer = awq::pack(&w.as_int_weights(), p.group.unwrap()).unwrap();
                    (layer.tensors(), layer.unpack())
                }
            };
            packed.extend(parts.into_iter().map(|t| (format!("{prefix}.{}", t.suffix), t.dtype, t.shape, t.data)));
            dense.push((t.hf_name.clone(), Dtype::F32, t.shape.clone(), f32_bytes(&unpacked.dequantize())));
        }
        (packed, dense)
    }

    fn logits(dir: &Path, tokens: &[u32]) -> Vec<f32> {
        let source = ModelSource::open(dir).unwrap();
        let model = Model::load(&source).unwrap();
        let mut cache = model.new_cache(tokens.len());
        model.forward(&mut cache, tokens, 0..tokens.len()).unwrap()
    }

    fn packings() -> Vec<Packing> {
        let gptq = |bits, group, act_order| Packing { method: PackMethod::Gptq, bits, group, act_order };
        vec![
            gptq(4, Some(32), false),
            gptq(4, Some(32), true),
            gptq(3, Some(64), true),
            gptq(2, Some(32), false),
            gptq(8, None, false),
            Packing { method: PackMethod::Awq, bits: 4, group: Some(32), act_order: false },
        ]
    }

    #[test]
    fn packed_directories_run_as_their_dequantized_weights() {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 21);
        let mut rng = Rng(4);
        let tokens: Vec<u32> = (0..40).map(|_| (rng.next_u64() % 256) as u32).collect();
        for p in packings() {
            let what = format!("{:?} w{} g{:?} act_order={}", p.method, p.bits, p.group, p.act_order);
            let tmp = tempfile::tempdir().unwrap();
            let (packed_dir, dense_dir) = (tmp.path().join("packed"), tmp.path().join("dense"));
            let (packed, dense) = packed_and_dequantized(&m, &p, &mut rng);
            write_dir(&packed_dir, &m, &packed, Some(p.config()));
            write_dir(&dense_dir, &m, &dense, None);

            // `inspect` counts a packed linear as its logical weight, all its parts' bytes together.
            let (inspected, inspected_dense) =
                (crate::inspect::inspect(&packed_dir).unwrap(), crate::inspect::inspect(&dense_dir).unwrap());
            assert_eq!(inspected.parameters, inspected_dense.parameters, "{what}");
            let format = PackedFormat::from_dir(&packed_dir).unwrap().unwrap();
            let linears = &inspected.by_type[format.name()];
            assert_eq!(linears.tensors, 7 * m.config.num_layers, "{what}");
            // Codes, scales and zeros, plus GPTQ's g_idx (32 bits per input column, large next to this model's
            // few output rows).
            let expected = format.bits_per_weight()..format.bits_per_weight() + 1.0;
            assert!(expected.contains(&linears.bits_per_weight), "{what}: {linears:?}");

            // The loaders' weights, through the source (what convert and quantize read).
            let (src, reference) = (ModelSource::open(&packed_dir).unwrap(), ModelSource::open(&dense_dir).unwrap());
            let q = src.tensor("blk.1.attn_q.weight").unwrap();
            assert_eq!(
                q.storage,
                crate::model::source::Storage::Packed(PackedFormat::from_dir(&packed_dir).unwrap().unwrap())
            );
            let q_ref = reference.tensor("blk.1.attn_q.weight").unwrap();
            assert_eq!(q.shape, q_ref.shape, "{what}");
            assert_eq!(src.load_hf_order(q).unwrap(), reference.load_hf_order(q_ref).unwrap(), "{what}");
            assert_eq!(src.load_gguf_order(q).unwrap(), reference.load_gguf_order(q_ref).unwrap(), "{what}");

            // A batch (the GEMM path) and a few tokens at a time.
            for n in [40, 3] {
                let (got, want) = (logits(&packed_dir, &tokens[..n]), logits(&dense_dir, &tokens[..n]));
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(diff <= 1e-5 * scale, "{what} n={n}: logits differ by {diff} (scale {scale})");
            }
        }
    }

    /// A small GPTQ directory with `edit` applied to its tensors and quantization config; the error
    /// opening it.
    fn open_error(edit: impl FnOnce(&mut Tensors, &mut Value)) -> String {
        let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 5);
        let p = Packing { method: PackMethod::Gptq, bits: 4, group: Some(32), act_order: false };
        let (mut tensors, _) = packed_and_dequantized(&m, &p, &mut Rng(1));
        let mut config = p.config();
        edit(&mut tensors, &mut config);
        let tmp = tempfile::tempdir().unwrap();
        write_dir(tmp.path(), &m, &tensors, Some(config));
        let err = ModelSource::open(tmp.path()).and_then(|s| Model::load(&s).map(|_| ())).unwrap_err();
        format!("{err:#}")
    }

    const Q: &str = "model.layers.0.self_attn.q_proj";

    #[test]
    fn bad_packed_directories_fail_clearly() {
        let err = open_error(|t, _| {
            let qweight = t.iter_mut().find(|t| t.0 == format!("{Q}.qweight")).unwrap();
            qweight.2[0] -= 1;
            qweight.3.truncate(qweight.3.len() - 4 * qweight.2[1]);
        });
        assert!(err.contains("model.safetensors") && err.contains(&format!("{Q}.qweight is I32 [7, 64]")), "{err}");
        let err = open_error(|t, _| t.retain(|t| t.0 != format!("{Q}.qzeros")));
        assert!(err.contains("model.safetensors") && err.contains(&format!("has no {Q}.qzeros")), "{err}");
        let err = open_error(|t, _| t.retain(|t| t.0 != format!("{Q}.qweight")));
        assert!(err.contains(&format!("{Q}.g_idx")) && err.contains("has no"), "{err}");
        let err = open_error(|_, c| c["bits"] = json!(5));
        assert!(err.contains("config.json") && err.contains("5-bit"), "{err}");
        let err = open_error(|_, c| c["checkpoint_format"] = json!("gptq_v2"));
        assert!(err.contains("config.json") && err.contains("\"gptq_v2\" is not supported"), "{err}");
        let err =
            open_error(|_, c| *c = json!({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}));
        assert!(err.contains("config.json") && err.contains("\"gemv\""), "{err}");
        let err = open_error(|_, c| *c = json!({"quant_method": "bitsandbytes"}));
        assert!(err.contains("config.json") && err.contains("bitsandbytes"), "{err}");
    }
}
