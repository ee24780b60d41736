//! Atomic output files.
//!
//! Outputs are written to a temporary file in the destination's directory and renamed into place only
//! when complete and flushed to disk, so an interrupted or failed run never leaves a partial file under
//! the final name and never damages an existing output. Dropping an uncommitted [`AtomicFile`] deletes
//! its temporary file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Prefix of every temporary output; stale ones (from a killed run) can be recognised and removed.
pub const TEMP_PREFIX: &str = ".qforge-tmp-";

pub struct AtomicFile {
    dest: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates the temporary file beside `dest`. Fails if `dest`'s directory is missing or not writable.
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = dest
            .file_name()
            .ok_or_else(|| Error::invalid(&dest, "output path has no file name"))?
            .to_string_lossy()
            .into_owned();
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{file_name}", std::process::id()));
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&temp).at(&dest)?;
        Ok(Self { dest, temp, writer: Some(BufWriter::with_capacity(1 << 20, file)) })
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes, fsyncs and renames the temporary file onto the destination.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("writer present until commit");
        let file = writer.into_inner().map_err(|e| Error::io(&self.dest, e.into_error()))?;
        file.sync_all().at(&self.dest)?;
        drop(file);
        std::fs::rename(&self.temp, &self.dest).at(&self.dest)?;
        if let Some(dir) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Persist the rename itself; not every filesystem supports syncing a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.as_mut().expect("writer present until commit").write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.writer.as_mut().expect("writer present until commit").write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.as_mut().expect("writer present until commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Fails when `output` names the same file as `input` (also through links), so an input is never
/// overwritten by its own conversion.
pub fn ensure_distinct(input: &Path, output: &Path) -> Result<()> {
    let same = match (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::invalid(output, "output path is the same as the input"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        std::fs::write(&dest, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"partial").unwrap();
            // dropped without commit
        }
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_output() {
        let err = AtomicFile::create("/nonexistent-dir/x/out.gguf").err().unwrap();
        assert!(err.to_string().starts_with("/nonexistent-dir/x/out.gguf: "), "{err}");
    }
}
