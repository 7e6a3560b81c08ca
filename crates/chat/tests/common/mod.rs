//! Shared by the chat crate's integration tests: the committed Qwen3 tokenizer and parity corpus.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use moestream_chat::Tokenizer;
use serde_json::Value;

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

pub fn qwen3_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&repo_path("assets/qwen3-tokenizer/tokenizer.json")).expect("assets/qwen3-tokenizer")
}

pub struct Case {
    pub text: String,
    pub ids: Vec<u32>,
    pub decoded: String,
    pub decoded_skip_special: String,
}

pub struct Corpus {
    pub cases: Vec<Case>,
    pub added_tokens: BTreeMap<String, u32>,
}

impl Corpus {
    pub fn load() -> Corpus {
        let p = repo_path("tests/fixtures/chat/tokenizer_parity.json");
        let text = std::fs::read_to_string(&p).expect("read tokenizer_parity.json");
        let v: Value = serde_json::from_str(&text).expect("parse tokenizer_parity.json");
        let s = |c: &Value, k: &str| c[k].as_str().unwrap_or_else(|| panic!("{k} missing")).to_string();
        let cases = v["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|c| Case {
                text: s(c, "text"),
                ids: c["ids"].as_array().expect("ids").iter().map(|i| i.as_u64().expect("id") as u32).collect(),
                decoded: s(c, "decoded"),
                decoded_skip_special: s(c, "decoded_skip_special"),
            })
            .collect();
        let added_tokens = v["added_tokens"]
            .as_object()
            .expect("added_tokens")
            .iter()
            .map(|(k, id)| (k.clone(), id.as_u64().expect("id") as u32))
            .collect();
        Corpus { cases, added_tokens }
    }
}

/// Fails listing the first mismatches and how many there were.
pub fn assert_no_mismatch(what: &str, bad: &[String], total: usize) {
    if !bad.is_empty() {
        let first: Vec<&str> = bad.iter().take(10).map(String::as_str).collect();
        panic!("{what}: {} of {total} cases differ; first:\n{}", bad.len(), first.join("\n"));
    }
}
