//! Text in and out: the tokenizer of a model, from its `tokenizer.json` or from GGUF metadata, and incremental
//! detokenization that never emits half a UTF-8 character.
//!
//! Tokenization is the `tokenizers` crate's (built without C features). For GGUF files we rebuild the same
//! byte-level BPE from `tokenizer.ggml.tokens`/`merges` and the pre-tokenizer that `tokenizer.ggml.pre` names,
//! so one code path serves both. This crate does not run the model and knows no wire formats.

use std::path::Path;

use moestream_format::TensorIndex;
use moestream_format::gguf::GgufValue;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: String, msg: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// The Qwen2 pre-tokenizer split; llama.cpp's `qwen2` pre-tokenizer is the same expression.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// The model's tokenizer, or `Ok(None)` when it ships none.
    pub fn from_index(index: &TensorIndex) -> Result<Option<Self>, ChatError> {
        if let Some(g) = &index.gguf {
            return Self::from_gguf(g).map(Some);
        }
        let p = index.root.join("tokenizer.json");
        if p.exists() { Self::from_file(&p).map(Some) } else { Ok(None) }
    }

    pub fn from_file(path: &Path) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ChatError::Tokenizer { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    fn from_gguf(g: &moestream_format::gguf::GgufFile) -> Result<Self, ChatError> {
        let path = g.path.display().to_string();
        let err = |msg: String| ChatError::Tokenizer { path: path.clone(), msg };
        let model = g.get_str("tokenizer.ggml.model").map_err(|e| err(e.to_string()))?;
        if model != "gpt2" {
            return Err(err(format!("tokenizer.ggml.model `{model}` is not supported (only gpt2-style BPE)")));
        }
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        if !matches!(pre, "qwen2" | "qwen35") {
            return Err(err(format!("tokenizer.ggml.pre `{pre}` is not supported (qwen2, qwen35)")));
        }
        let tokens = g.get_str_array("tokenizer.ggml.tokens").map_err(|e| err(e.to_string()))?;
        let merges = g.get_str_array("tokenizer.ggml.merges").map_err(|e| err(e.to_string()))?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(GgufValue::Array(a)) => a.to_i64_vec().unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| err("a merge is not two space-separated tokens".into()))?;
        let bpe = tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("building BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let split = tokenizers::pre_tokenizers::split::Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(QWEN2_SPLIT.into()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err(format!("pre-tokenizer: {e}")))?;
        let byte_level = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, false, false);
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
            split.into(),
            byte_level.into(),
        ])));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::new(false, false, false)));
        inner.with_normalizer(Some(tokenizers::normalizers::unicode::NFC));
        // Control (3) and user-defined (4) tokens match whole before BPE, as HF added tokens do.
        let added: Vec<tokenizers::AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, 3 | 4))
            .filter_map(|(i, t)| tokens.get(i).map(|s| tokenizers::AddedToken::from(s.clone(), *t == 3)))
            .collect();
        inner.add_special_tokens(&added);
        Ok(Tokenizer { inner })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        let enc = self.inner.encode(text, false).map_err(|e| ChatError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.inner.decode(ids, false).map_err(|e| ChatError::Encode(e.to_string()))
    }
}

/// Turns a growing token sequence into text pieces, holding back bytes that do not yet form whole UTF-8
/// characters (a byte-level BPE splits multi-byte characters across tokens).
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder { ids: Vec::new(), emitted: 0 }
    }

    /// Add a token; returns the new text that is safe to show (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, ChatError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        // An incomplete character decodes to U+FFFD at the end; wait for the next token.
        if text.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(new)
    }
}
