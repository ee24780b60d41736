//! A PEFT LoRA adapter directory: `adapter_config.json` and `adapter_model.safetensors`.
//!
//! - [`config`]: the configuration fields that decide what a merge computes.
//! - [`keys`]: the grammar of the tensor names PEFT saves.
//!
//! `adapter_model.bin` (a PyTorch pickle) is refused: unpickling can run arbitrary code, and qforge reads
//! only formats whose parsing cannot.

mod config;
mod keys;

use std::path::{Path, PathBuf};

pub use config::{Bias, Modules, PeftConfig, ALL_LINEAR};
pub use keys::{LoraPart, PeftKey, BASE_MODEL_PREFIX};

use crate::error::{Error, Result};
use crate::safetensors::Checkpoint;

pub const CONFIG_FILE_NAME: &str = "adapter_config.json";
pub const WEIGHTS_FILE_NAME: &str = "adapter_model.safetensors";
pub const PICKLE_FILE_NAME: &str = "adapter_model.bin";

/// An opened adapter: its configuration and its memory-mapped tensors.
#[derive(Debug)]
pub struct PeftAdapter {
    pub dir: PathBuf,
    pub config: PeftConfig,
    pub weights: Checkpoint,
}

impl PeftAdapter {
    /// Whether `path` is a directory holding an `adapter_config.json`.
    pub fn is_adapter_dir(path: &Path) -> bool {
        path.is_dir() && path.join(CONFIG_FILE_NAME).is_file()
    }

    pub fn open(dir: impl AsRef<Path>) -> Result<PeftAdapter> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE_NAME);
        if !config_path.is_file() {
            return Err(Error::invalid(dir, format!("not a PEFT adapter directory: it has no {CONFIG_FILE_NAME}")));
        }
        let config = PeftConfig::read(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE_NAME);
        if !weights_path.is_file() {
            let pickle = dir.join(PICKLE_FILE_NAME);
            if pickle.is_file() {
                return Err(Error::unsupported(
                    pickle,
                    format!(
                        "a PyTorch pickle, which qforge does not load (unpickling can run arbitrary code); \
                         convert it to {WEIGHTS_FILE_NAME} first, e.g. in Python: `import torch; \
                         from safetensors.torch import save_file; save_file(torch.load(\"{PICKLE_FILE_NAME}\", \
                         weights_only=True), \"{WEIGHTS_FILE_NAME}\")`, or load the adapter with PEFT and \
                         save_pretrained(..., safe_serialization=True)"
                    ),
                ));
            }
            return Err(Error::invalid(dir, format!("PEFT adapter directory has no {WEIGHTS_FILE_NAME}")));
        }
        let weights = Checkpoint::open(&weights_path)?;
        Ok(PeftAdapter { dir: dir.to_path_buf(), config, weights })
    }
}
