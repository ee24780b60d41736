//! The model a merge starts from: an HF directory (any architecture; every tensor of its checkpoint),
//! a GPTQ/AWQ HF directory or a GGUF file (the llama family, both through [`ModelSource`]), seen as one
//! list of tensors, each with its shape, storage, and whether its rows are in llama.cpp's permuted q/k
//! order. A packed linear is one tensor (`….weight`, `[out, in]`), decoded by dequantizing it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use formats::safetensors::Checkpoint;

use super::adapter::TargetName;
use crate::model::packed::PackedFormat;
use crate::model::source::{SourceTensor, Storage};
use crate::model::ModelSource;

pub enum Base {
    Hf {
        dir: PathBuf,
        checkpoint: Checkpoint,
    },
    /// An HF directory whose block linears are GPTQ/AWQ packed; tensors named and ordered as HF names.
    Packed(Box<ModelSource>),
    Gguf(Box<ModelSource>),
}

/// One tensor of the base.
#[derive(Clone, Debug)]
pub struct BaseTensor {
    /// Its name in the file.
    pub name: String,
    /// HF order: outermost first (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    pub storage: Storage,
    /// A llama q/k projection stored in GGUF row order, permuted over this many heads.
    pub qk_heads: Option<usize>,
}

impl BaseTensor {
    /// Values per row (the innermost dim).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
}

impl Base {
    /// An HF directory, or a GGUF file.
    pub fn open(path: &Path) -> Result<Base> {
        if path.is_dir() && PackedFormat::from_dir(path)?.is_some() {
            return Ok(Base::Packed(Box::new(ModelSource::open(path)?)));
        }
        if path.is_dir() {
            let checkpoint = Checkpoint::open(path)?;
            return Ok(Base::Hf { dir: path.to_path_buf(), checkpoint });
        }
        Ok(Base::Gguf(Box::new(ModelSource::open(path)?)))
    }

    pub fn path(&self) -> &Path {
        match self {
            Base::Hf { dir, .. } => dir,
            Base::Packed(s) | Base::Gguf(s) => &s.path,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self, Base::Gguf(_))
    }

    /// `general.architecture` of a GGUF base.
    pub fn gguf_architecture(&self) -> Option<&str> {
        match self {
            Base::Hf { .. } | Base::Packed(_) => None,
            Base::Gguf(s) => s.gguf()?.architecture(),
        }
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> Vec<BaseTensor> {
        match self {
            Base::Hf { checkpoint, .. } => checkpoint
                .tensors()
                .map(|t| BaseTensor {
                    name: t.name.to_string(),
                    shape: t.shape.to_vec(),
                    storage: Storage::Safetensors(t.dtype),
                    qk_heads: None,
                })
                .collect(),
            Base::Packed(s) => s
                .tensors()
                .iter()
                .map(|t| BaseTensor {
                    name: t.hf_name.clone().expect("HF directories name every tensor"),
                    shape: t.shape.clone(),
                    storage: t.storage,
                    qk_heads: None,
                })
                .collect(),
            Base::Gguf(s) => s
                .tensors()
                .iter()
                .map(|t| BaseTensor {
                    name: t.gguf_name.clone(),
                    shape: t.shape.clone(),
                    storage: t.storage,
                    qk_heads: s.qk_heads(t),
                })
                .collect(),
        }
    }

    /// Where each target name lands: its index in [`Base::tensors`].
    pub fn index(&self) -> HashMap<TargetName, usize> {
        let mut index = HashMap::new();
        match self {
            Base::Hf { checkpoint, .. } => {
                for (i, t) in checkpoint.tensors().enumerate() {
                    index.insert(TargetName::Hf(t.name.to_string()), i);
                }
            }
            Base::Packed(s) => {
                for (i, t) in s.tensors().iter().enumerate() {
                    index.insert(TargetName::Hf(t.hf_name.clone().expect("HF directories name every tensor")), i);
                }
            }
            Base::Gguf(s) => {
                for (i, t) in s.tensors().iter().enumerate() {
                    index.insert(TargetName::Gguf(t.gguf_name.clone()), i);
                    if let Some(hf) = &t.hf_name {
                        index.insert(TargetName::Hf(hf.clone()), i);
                    }
                }
            }
        }
        index
    }

    /// The tensor's bytes as stored.
    ///
    /// # Panics
    /// For a packed linear, which has no bytes of its own.
    pub fn raw(&self, t: &BaseTensor) -> &[u8] {
        match self {
            Base::Hf { checkpoint, .. } => checkpoint.tensor(&t.name).expect("listed tensors exist").data,
            Base::Packed(s) | Base::Gguf(s) => s.raw(self.source_tensor(t)),
        }
    }

    /// The tensor as f32 in file row order (a packed linear dequantized).
    pub fn decode(&self, t: &BaseTensor) -> Result<Vec<f32>> {
        match self {
            Base::Hf { checkpoint, .. } => Ok(checkpoint.tensor(&t.name).expect("listed tensors exist").to_f32()?),
            Base::Packed(s) => s.load_hf_order(self.source_tensor(t)),
            Base::Gguf(s) => s.load_gguf_order(self.source_tensor(t)),
        }
    }

    pub fn release(&self, t: &BaseTensor) {
        match self {
            Base::Hf { checkpoint, .. } => checkpoint.release(&t.name),
            Base::Packed(s) | Base::Gguf(s) => s.release(self.source_tensor(t)),
        }
    }

    pub fn data_bytes(&self) -> u64 {
        match self {
            Base::Hf { checkpoint, .. } => checkpoint.total_bytes(),
            Base::Packed(s) | Base::Gguf(s) => s.data_bytes(),
        }
    }

    /// The source's entry for a tensor of a packed or GGUF base.
    pub fn source_tensor(&self, t: &BaseTensor) -> &SourceTensor {
        match self {
            Base::Hf { .. } => panic!("an HF base has no model source"),
            Base::Packed(s) => {
                s.tensors().iter().find(|s| s.hf_name.as_ref() == Some(&t.name)).expect("listed tensors exist")
            }
            Base::Gguf(s) => s.tensor(&t.name).expect("listed tensors exist"),
        }
    }
}
