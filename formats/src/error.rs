//! Errors that name the file they came from.

use std::fmt;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error tied to a file: displayed as `PATH: problem`.
#[derive(Debug)]
pub struct Error {
    pub path: PathBuf,
    pub kind: ErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file's contents break the format's rules.
    #[error("{0}")]
    Invalid(String),
    /// Well-formed, but asks for something qforge does not handle.
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    pub fn new(path: impl AsRef<Path>, kind: ErrorKind) -> Self {
        Self { path: path.as_ref().to_path_buf(), kind }
    }

    pub fn invalid(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Self::new(path, ErrorKind::Invalid(msg.into()))
    }

    pub fn unsupported(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Self::new(path, ErrorKind::Unsupported(msg.into()))
    }

    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Self::new(path, ErrorKind::Io(err))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.kind)
    }
}

/// No `source()`: the I/O error's text is already part of the message, and error reporters that walk
/// the chain (anyhow's `{:#}`) would print it twice.
impl std::error::Error for Error {}

/// Attaches a path to `io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
