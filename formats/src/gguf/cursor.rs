//! A bounds-checked little-endian reader over a file's bytes.
//!
//! Every read says what it was reading, so running off the end of the file is reported as
//! "truncated at byte N while reading X" rather than a panic or a short read. Descriptions are only
//! formatted when a read fails, so the hot path of parsing large arrays allocates nothing.

use std::fmt::Display;
use std::path::Path;

use crate::error::Error;

/// Why a file could not be parsed.
#[derive(Debug)]
pub(super) struct Problem {
    unsupported: bool,
    message: String,
    /// Indices of the (nested) array items being read, innermost first; written into the message by
    /// [`Problem::within`].
    item_path: Vec<u64>,
}

impl Problem {
    pub(super) fn unsupported(message: impl Into<String>) -> Self {
        Problem { unsupported: true, message: message.into(), item_path: Vec::new() }
    }

    pub(super) fn in_array_item(mut self, index: u64) -> Self {
        self.item_path.push(index);
        self
    }

    /// Adds where the problem was found, e.g. `in item [4000] of metadata entry 27 'tokenizer.ggml.tokens'`.
    pub(super) fn within(mut self, context: impl Display) -> Self {
        let items: String = self.item_path.drain(..).rev().map(|i| format!("[{i}]")).collect();
        self.message = if items.is_empty() {
            format!("{}, in {context}", self.message)
        } else {
            format!("{}, in item {items} of {context}", self.message)
        };
        self
    }

    pub(super) fn into_error(self, path: &Path) -> Error {
        if self.unsupported {
            Error::unsupported(path, self.message)
        } else {
            Error::invalid(path, self.message)
        }
    }
}

pub(super) fn invalid(message: impl Into<String>) -> Problem {
    Problem { unsupported: false, message: message.into(), item_path: Vec::new() }
}

pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(super) fn position(&self) -> u64 {
        self.pos as u64
    }

    pub(super) fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// Fails unless at least `len` bytes are left; checks counts read from the file (times the fewest
    /// bytes an item can take) before anything is allocated from them.
    pub(super) fn ensure(&self, len: u128, what: impl Display) -> Result<(), Problem> {
        if len > u128::from(self.remaining()) {
            return Err(self.truncated(what, format_args!("at least {len} bytes")));
        }
        Ok(())
    }

    pub(super) fn take(&mut self, len: u64, what: impl Display) -> Result<&'a [u8], Problem> {
        if len > self.remaining() {
            return Err(self.truncated(what, format_args!("{len} bytes")));
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn truncated(&self, what: impl Display, needed: impl Display) -> Problem {
        invalid(format!(
            "truncated at byte {} while reading {what} ({needed} from byte {})",
            self.bytes.len(),
            self.pos
        ))
    }

    fn array<const N: usize>(&mut self, what: impl Display) -> Result<[u8; N], Problem> {
        let bytes = self.take(N as u64, what)?;
        Ok(bytes.try_into().expect("take returns exactly the requested length"))
    }

    pub(super) fn u8(&mut self, what: impl Display) -> Result<u8, Problem> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn u16(&mut self, what: impl Display) -> Result<u16, Problem> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self, what: impl Display) -> Result<u32, Problem> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: impl Display) -> Result<u64, Problem> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: `u64` length, then that many bytes, which must be UTF-8.
    pub(super) fn string(&mut self, what: impl Display) -> Result<&'a str, Problem> {
        let at = self.position();
        let len = self.u64(format_args!("the length of {what}"))?;
        let bytes = self.take(len, &what)?;
        std::str::from_utf8(bytes).map_err(|e| invalid(format!("{what} at byte {at} is not valid UTF-8 ({e})")))
    }
}
