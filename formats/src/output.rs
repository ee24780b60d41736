//! Atomic output files.
//!
//! Outputs are written to a temporary file in the destination's directory and renamed into place only
//! when complete and flushed to disk, so an interrupted or failed run never leaves a partial file under
//! the final name and never damages an existing output. Dropping an uncommitted [`AtomicFile`] deletes
//! its temporary file.
//!
//! Temporary files are named `.qforge-tmp-PID-NAME`. Every live one is registered, so an interrupt
//! handler can delete them all with [`discard_uncommitted`] before the process exits. A run killed
//! outright (SIGKILL, power loss) cannot clean up; the next run writing the same output removes the
//! temporary files for that name whose process is gone (on Linux, where `/proc` tells), and elsewhere
//! they are left alone and never read.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, IoContext, Result};

/// Prefix of every temporary output; stale ones (from a killed run) can be recognised and removed.
pub const TEMP_PREFIX: &str = ".qforge-tmp-";

/// Temporary files not yet committed or dropped. Commits rename while holding the lock, so once
/// [`discard_uncommitted`] holds it no output can appear any more.
static LIVE_TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live_temps() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves the list intact (pushes and removes are atomic).
    LIVE_TEMPS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Deletes every uncommitted temporary file and returns a guard that blocks all commits until dropped:
/// an interrupt handler calls this and exits while holding the guard, so a run stopped at any point
/// leaves neither a temporary file nor a partial output.
pub fn discard_uncommitted() -> impl Drop {
    let mut live = live_temps();
    for temp in live.drain(..) {
        let _ = std::fs::remove_file(temp);
    }
    live
}

/// Removes `dir`'s temporary files for `file_name` left by processes that no longer run.
fn remove_stale_temps(dir: &Path, file_name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|rest| rest.strip_suffix(file_name))
            .and_then(|rest| rest.strip_suffix('-'))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if process_is_gone(pid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether no process `pid` runs; `false` when that cannot be known.
fn process_is_gone(pid: u32) -> bool {
    let proc = Path::new("/proc");
    cfg!(target_os = "linux") && proc.join("self").exists() && !proc.join(pid.to_string()).exists()
}

pub struct AtomicFile {
    dest: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates the temporary file beside `dest`. Fails if `dest`'s directory is missing or not writable,
    /// or if `dest` exists and is not a regular file (renaming onto a device such as `/dev/null` would
    /// replace it).
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
        if let Ok(meta) = std::fs::metadata(&dest) {
            if !meta.is_file() {
                return Err(Error::invalid(&dest, "output path exists and is not a regular file"));
            }
        }
        remove_stale_temps(&dir, &file_name);
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{file_name}", std::process::id()));
        let mut live = live_temps();
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&temp).at(&dest)?;
        live.push(temp.clone());
        drop(live);
        Ok(Self { dest, temp, writer: Some(BufWriter::with_capacity(1 << 20, file)) })
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes, fsyncs and renames the temporary file onto the destination. On failure the temporary
    /// file is deleted and the destination is left as it was.
    pub fn commit(mut self) -> Result<()> {
        let writer = self.writer.take().expect("writer present until commit");
        let committed = self.flush_and_rename(writer);
        if committed.is_err() {
            self.discard_temp();
        }
        committed
    }

    fn discard_temp(&self) {
        let mut live = live_temps();
        let _ = std::fs::remove_file(&self.temp);
        live.retain(|t| t != &self.temp);
    }

    fn flush_and_rename(&self, writer: BufWriter<File>) -> Result<()> {
        let file = writer.into_inner().map_err(|e| Error::io(&self.dest, e.into_error()))?;
        file.sync_all().at(&self.dest)?;
        drop(file);
        let mut live = live_temps();
        std::fs::rename(&self.temp, &self.dest).at(&self.dest)?;
        live.retain(|t| t != &self.temp);
        drop(live);
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
            self.discard_temp();
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
    fn stale_temps_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        // PIDs never exceed 2^22 on Linux, so this one cannot be running.
        let dead = dir.path().join(format!("{TEMP_PREFIX}4294967295-out.bin"));
        let alive = dir.path().join(format!("{TEMP_PREFIX}1-out.bin"));
        let other_output = dir.path().join(format!("{TEMP_PREFIX}4294967295-other.bin"));
        for p in [&dead, &alive, &other_output] {
            std::fs::write(p, b"stale").unwrap();
        }
        let mut f = AtomicFile::create(&dest).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(dead.exists(), !cfg!(target_os = "linux"));
        assert!(alive.exists() && other_output.exists());
    }

    #[test]
    fn a_destination_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = AtomicFile::create(dir.path()).err().unwrap();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_output() {
        let err = AtomicFile::create("/nonexistent-dir/x/out.gguf").err().unwrap();
        assert!(err.to_string().starts_with("/nonexistent-dir/x/out.gguf: "), "{err}");
    }
}
