//! Shared by the CLI's integration tests: making a synthetic model, and reading the figures `moestream run`
//! prints.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// `moestream synth ARGS --quiet --out OUT`, which must succeed; returns `out`.
pub fn synth(out: &Path, args: &[&str]) -> PathBuf {
    let st = Command::new(env!("CARGO_BIN_EXE_moestream"))
        .arg("synth")
        .args(args)
        .args(["--quiet", "--out"])
        .arg(out)
        .status()
        .expect("synth");
    assert!(st.success(), "synth {args:?} failed");
    out.to_path_buf()
}

/// The `memory: peak RSS …` line of `run`'s stderr.
pub fn memory_line(stderr: &str) -> &str {
    stderr.lines().find(|l| l.starts_with("memory: peak RSS")).unwrap_or_else(|| panic!("{stderr}"))
}

/// The number (MB) printed right after `key` in `line`.
pub fn mb_after(line: &str, key: &str) -> f64 {
    let at = line.find(key).unwrap_or_else(|| panic!("no `{key}` in {line}")) + key.len();
    line[at..].split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}
