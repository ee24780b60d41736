//! [`Corpus`]: the calibration text, either the default one compiled into the binary or what `--calib`
//! names.
//!
//! `--calib` takes a `.txt` file, a `.jsonl` file (one JSON object per line with a string `text` field),
//! or a directory holding such files (not recursive, read in byte order of their names). Documents are
//! joined with a blank line, as GPTQ's loaders join WikiText/C4 records, so that tokenization does not
//! glue the last word of one document to the first of the next.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

const EMBEDDED_TEXT: &str = include_str!("../data/tinyshakespeare.txt");
const DOCUMENT_SEPARATOR: &str = "\n\n";

/// Calibration text and where it came from (named in every error about it).
#[derive(Clone, Debug)]
pub struct Corpus {
    pub name: String,
    pub text: String,
}

impl Corpus {
    /// The default corpus: 270 KB of Shakespeare (see `calibration/data/README.md`).
    pub fn embedded() -> Self {
        Self { name: "the embedded calibration corpus (tinyshakespeare)".into(), text: EMBEDDED_TEXT.into() }
    }

    /// Reads a `.txt` or `.jsonl` file, or every such file in a directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = if path.is_dir() {
            let files = corpus_files(path)?;
            let mut documents = Vec::new();
            for file in &files {
                documents.extend(read_documents(file)?);
            }
            documents.join(DOCUMENT_SEPARATOR)
        } else {
            read_documents(path)?.join(DOCUMENT_SEPARATOR)
        };
        if text.trim().is_empty() {
            bail!("calibration data {}: no text", path.display());
        }
        Ok(Self { name: path.display().to_string(), text })
    }
}

/// The `.txt`/`.jsonl` files directly inside `dir`, sorted by name.
fn corpus_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("calibration data {}: cannot list", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("calibration data {}: cannot list", dir.display()))?.path();
        if path.is_file() && Format::of(&path).is_some() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("calibration data {}: the directory holds no .txt or .jsonl file", dir.display());
    }
    Ok(files)
}

#[derive(Clone, Copy)]
enum Format {
    Text,
    JsonLines,
}

impl Format {
    fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "txt" => Some(Self::Text),
            "jsonl" => Some(Self::JsonLines),
            _ => None,
        }
    }
}

fn read_documents(path: &Path) -> Result<Vec<String>> {
    let Some(format) = Format::of(path) else {
        bail!("calibration data {}: expected a .txt or .jsonl file or a directory of them", path.display());
    };
    let bytes = std::fs::read(path).with_context(|| format!("calibration data {}: cannot read", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("calibration data {}: not UTF-8 text ({e})", path.display()))?;
    match format {
        Format::Text => Ok(vec![text]),
        Format::JsonLines => json_lines_documents(path, &text),
    }
}

/// The `text` field of each non-blank line.
fn json_lines_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let mut documents = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = index + 1;
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("calibration data {} line {line_no}: not JSON", path.display()))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => documents.push(s.clone()),
            Some(_) => bail!("calibration data {} line {line_no}: `text` is not a string", path.display()),
            None => bail!("calibration data {} line {line_no}: no `text` field", path.display()),
        }
    }
    Ok(documents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn embedded_corpus_is_shakespeare_not_wikitext() {
        let corpus = Corpus::embedded();
        assert!(corpus.text.starts_with("First Citizen:"));
        assert!(corpus.text.len() > 250_000);
        assert!(!corpus.text.contains("<unk>") && !corpus.text.contains(" @-@ "));
    }

    #[test]
    fn text_jsonl_and_directories_load_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let txt = write(dir.path(), "b.txt", "plain text");
        let jsonl = write(dir.path(), "a.jsonl", "{\"text\": \"first\", \"id\": 1}\n\n{\"text\": \"second\"}\n");
        write(dir.path(), "notes.md", "ignored");
        assert_eq!(Corpus::load(&txt).unwrap().text, "plain text");
        assert_eq!(Corpus::load(&jsonl).unwrap().text, "first\n\nsecond");
        assert_eq!(Corpus::load(dir.path()).unwrap().text, "first\n\nsecond\n\nplain text");
    }

    #[test]
    fn bad_inputs_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (write(dir.path(), "x.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"no\"}\n"), "line 2: no `text` field"),
            (write(dir.path(), "y.jsonl", "{\"text\": 3}\n"), "line 1: `text` is not a string"),
            (write(dir.path(), "z.jsonl", "not json\n"), "line 1: not JSON"),
            (write(dir.path(), "e.txt", "  \n"), "no text"),
            (write(dir.path(), "d.csv", "a,b"), "expected a .txt or .jsonl"),
            (dir.path().join("missing.txt"), "cannot read"),
        ];
        for (path, expected) in cases {
            let err = format!("{:#}", Corpus::load(&path).unwrap_err());
            assert!(err.contains(&path.display().to_string()) && err.contains(expected), "{err}");
        }
        std::fs::write(dir.path().join("bad.txt"), [0xff, 0xfe]).unwrap();
        let err = format!("{:#}", Corpus::load(&dir.path().join("bad.txt")).unwrap_err());
        assert!(err.contains("not UTF-8"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = format!("{:#}", Corpus::load(empty.path()).unwrap_err());
        assert!(err.contains("no .txt or .jsonl file"), "{err}");
    }
}
