//! Stopping cleanly on Ctrl-C (SIGINT, and SIGTERM on Unix).
//!
//! The handler runs on its own thread: it deletes every uncommitted temporary output, says so, and exits
//! with 130 (the shell's code for death by SIGINT) while still holding the output lock, so no half-written
//! file is renamed into place after the message. Committed outputs stay as they are.

use anyhow::{Context, Result};

/// Exit code of a run stopped by an interrupt.
pub const EXIT_CODE: i32 = 130;

pub fn install_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        let _no_more_commits = formats::output::discard_uncommitted();
        eprintln!("error: interrupted; unfinished output files were removed");
        std::process::exit(EXIT_CODE);
    })
    .context("cannot install the Ctrl-C handler")
}
