//! A bounds-checked little-endian reader over a file's bytes.
//!
//! Every read says what it was reading, so running off the end of the file is reported as
//! "truncated at byte N while reading X" rather than a panic or a short read. Descriptions are only
//! formatted when a read fails, so the hot path of parsing large arrays allocates nothing.

use std::fmt::Display;

/// Why a file could not be parsed; the reader attaches the file's path.
#[derive(Debug)]
pub(super) enum Problem {
    Invalid(String),
    Unsupported(String),
}

impl Problem {
    /// Adds where the problem was found, e.g. `in metadata entry 3 'general.name'`.
    pub(super) fn within(self, context: impl Display) -> Self {
        match self {
            Problem::Invalid(m) => Problem::Invalid(format!("{m}, {context}")),
            Problem::Unsupported(m) => Problem::Unsupported(format!("{m}, {context}")),
        }
    }
}

pub(super) fn invalid(msg: impl Into<String>) -> Problem {
    Problem::Invalid(msg.into())
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

    pub(super) fn take(&mut self, len: u64, what: impl Display) -> Result<&'a [u8], Problem> {
        if len > self.remaining() {
            return Err(invalid(format!(
                "truncated at byte {} while reading {what} ({len} bytes from byte {})",
                self.bytes.len(),
                self.pos
            )));
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(&self.bytes[start..self.pos])
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
        if len > self.remaining() {
            return Err(invalid(format!(
                "{what} at byte {at} claims {len} bytes but only {} bytes are left in the file",
                self.remaining()
            )));
        }
        let bytes = self.take(len, &what)?;
        std::str::from_utf8(bytes).map_err(|e| invalid(format!("{what} at byte {at} is not valid UTF-8 ({e})")))
    }
}
