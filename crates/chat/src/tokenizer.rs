//! The model's tokenizer: HF `tokenizer.json`, or the same byte-level BPE rebuilt from GGUF `tokenizer.ggml.*`
//! metadata, so that one code path (the `tokenizers` crate, without C features) serves both.
//!
//! Owns encoding and whole-sequence decoding; incremental decoding is `stream`'s. It must not know chat
//! formats: special tokens are matched whole because the tokenizer's added-token table says so, not because this
//! module knows `<|im_start|>`.

use std::path::Path;

use moestream_format::TensorIndex;
use moestream_format::gguf::{GgufFile, GgufValue};

use crate::ChatError;

/// The Qwen2 pre-tokenizer split; llama.cpp's `qwen2` pre-tokenizer is the same expression.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`) that are added tokens, matched whole before BPE.
const GGUF_TOKEN_CONTROL: i64 = 3;
const GGUF_TOKEN_USER_DEFINED: i64 = 4;

/// Whether decoding keeps the tokens the tokenizer marks special (`<|im_end|>`, …). Qwen3 marks `<think>` and
/// `<tool_call>` as *not* special, so they survive [`Specials::Skip`], which is what the output parsers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Specials {
    #[default]
    Keep,
    Skip,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    /// The model's tokenizer (GGUF metadata, or `tokenizer.json` in a safetensors directory), or `Ok(None)` when
    /// it ships none.
    pub fn from_index(index: &TensorIndex) -> Result<Option<Self>, ChatError> {
        if let Some(g) = &index.gguf {
            return Self::from_gguf(g).map(Some);
        }
        let p = index.root.join("tokenizer.json");
        if p.exists() { Self::from_file(&p).map(Some) } else { Ok(None) }
    }

    /// An HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ChatError::Tokenizer { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// The bytes of an HF `tokenizer.json` (e.g. `include_bytes!` of `assets/qwen3-tokenizer/tokenizer.json`).
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| ChatError::Tokenizer { path: "<embedded tokenizer.json>".into(), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    fn from_gguf(g: &GgufFile) -> Result<Self, ChatError> {
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
            .ok_or_else(|| err("tokenizer.ggml.merges: a merge is not two space-separated tokens".into()))?;
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
        // Control and user-defined tokens are HF's added tokens: matched whole on the raw text before
        // normalisation (`normalized: false`, as Qwen's tokenizer.json has them). Only control tokens are
        // special, i.e. dropped by `Specials::Skip`; llama.cpp's converter makes every `<|…|>` token control.
        let added: Vec<tokenizers::AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, GGUF_TOKEN_CONTROL | GGUF_TOKEN_USER_DEFINED))
            .filter_map(|(i, t)| {
                let special = *t == GGUF_TOKEN_CONTROL;
                tokens.get(i).map(|s| tokenizers::AddedToken::from(s.clone(), special).normalized(false))
            })
            .collect();
        inner.add_tokens(&added);
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, with added tokens (`<|im_start|>`, `<think>`, …) matched whole and no BOS added
    /// (Qwen adds none; a chat template writes every special token it wants).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        let enc = self.inner.encode(text, false).map_err(|e| ChatError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.decode_with(ids, Specials::Keep)
    }

    pub fn decode_with(&self, ids: &[u32], specials: Specials) -> Result<String, ChatError> {
        self.inner.decode(ids, specials == Specials::Skip).map_err(|e| ChatError::Decode(e.to_string()))
    }

    /// The id of one token, by its exact text (a special token's content, or a BPE token in byte-level form).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer knows, added tokens included (models may pad their embedding beyond it).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
