//! The tokenizer a synthetic model ships, written both as HF `tokenizer.json` + `tokenizer_config.json` and as
//! GGUF `tokenizer.ggml.*` metadata (plus `tokenizer.chat_template`).
//!
//! Two kinds ([`SynthTokenizer`]). The default is a small deterministic byte-level BPE, GPT-2/Qwen-shaped on
//! purpose (byte-level alphabet, Qwen2 pre-tokenizer regex, ChatML special tokens), so the code paths that real
//! Qwen checkpoints take are the ones synthetic models exercise. Its merges are built from a fixed word list by
//! growing each word left to right, which makes every merge's parts existing tokens. The other is Qwen3's real
//! tokenizer (`assets/qwen3-tokenizer`, embedded), for tests that need real ids and the real chat template.
//!
//! Ids past the tokenizer's vocabulary are padding: absent from `tokenizer.json` (as in Qwen checkpoints, whose
//! embedding is larger than the tokenizer) and `[PADn]` tokens of type UNUSED in GGUF, as llama.cpp's converter
//! writes them. This module only builds bytes and values; `write_gguf` and `lib` put them in files.

use serde_json::{Value, json};

use crate::SynthError;

/// The Qwen2 pre-tokenizer split; llama.cpp's `qwen2` pre-tokenizer is the same expression.
pub const QWEN2_PRETOKENIZE_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A ChatML template in the shape of Qwen's (system, user, assistant turns; generation prompt).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

const WORDS: &str = "the of and to in is you that it he was for on are as with his they at be this have from or one had by \
word but not what all were we when your can said there use an each which she do how their if will up other about out \
many then them these so some her would make like him into time has look two more write go see number no way could \
people my than first water been call who oil its now find long down day did get come made may part hello world model \
expert token layer weight cache stream read fast slow memory disk mixture router gate fn let mut pub struct impl def \
return import class self print true false none null int float string value error result ok";

/// GGUF token types (llama.cpp `llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;

/// Which tokenizer a synthetic model ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynthTokenizer {
    /// The small deterministic byte-level BPE of this module (a few hundred merges, ChatML specials).
    #[default]
    Synthetic,
    /// Qwen3's tokenizer and chat template, byte for byte; the vocabulary becomes at least 151,936 ids.
    Qwen3,
}

impl SynthTokenizer {
    pub const ALL: [SynthTokenizer; 2] = [SynthTokenizer::Synthetic, SynthTokenizer::Qwen3];

    pub fn name(self) -> &'static str {
        match self {
            SynthTokenizer::Synthetic => "synthetic",
            SynthTokenizer::Qwen3 => "qwen3",
        }
    }

    pub fn from_name(s: &str) -> Option<SynthTokenizer> {
        SynthTokenizer::ALL.into_iter().find(|t| t.name() == s)
    }

    /// The vocabulary of a model whose preset asks for `preset_vocab` ids.
    pub fn vocab(self, preset_vocab: usize) -> Result<SynthVocab, SynthError> {
        match self {
            SynthTokenizer::Synthetic => Ok(SynthVocab::new(preset_vocab)),
            SynthTokenizer::Qwen3 => SynthVocab::qwen3(preset_vocab.max(QWEN3_PADDED_VOCAB)),
        }
    }
}

/// Qwen3's `tokenizer.json` and `tokenizer_config.json` (see assets/qwen3-tokenizer/README.md).
pub const QWEN3_TOKENIZER_JSON: &[u8] = include_bytes!("../../../assets/qwen3-tokenizer/tokenizer.json");
pub const QWEN3_TOKENIZER_CONFIG_JSON: &[u8] = include_bytes!("../../../assets/qwen3-tokenizer/tokenizer_config.json");
/// Qwen3 checkpoints' embedding rows (`vocab_size` in their config.json): the tokenizer's 151,669 ids, padded.
pub const QWEN3_PADDED_VOCAB: usize = 151_936;

pub struct SynthVocab {
    /// Every id below `vocab_size`, including padding.
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub merges: Vec<(String, String)>,
    /// Number of ids that the HF tokenizer knows (the rest are padding).
    pub real_len: usize,
    pub endoftext: u32,
    pub im_start: u32,
    pub im_end: u32,
    pub chat_template: String,
    /// The HF files verbatim, when the tokenizer is a real one (its JSON must not be re-serialised: tests
    /// compare the files byte for byte with the assets).
    embedded: Option<(&'static [u8], &'static [u8])>,
}

/// GPT-2's reversible byte → printable-char map.
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('?')
        };
    }
    map
}

impl SynthVocab {
    /// Build a vocabulary of exactly `vocab_size` ids (≥ 256 + 7).
    pub fn new(vocab_size: usize) -> SynthVocab {
        let specials: [(&str, i32); 7] = [
            ("<|endoftext|>", TOKEN_CONTROL),
            ("<|im_start|>", TOKEN_CONTROL),
            ("<|im_end|>", TOKEN_CONTROL),
            ("<think>", TOKEN_USER_DEFINED),
            ("</think>", TOKEN_USER_DEFINED),
            ("<tool_call>", TOKEN_USER_DEFINED),
            ("</tool_call>", TOKEN_USER_DEFINED),
        ];
        let map = byte_to_char();
        let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
        let mut types = vec![TOKEN_NORMAL; 256];
        let mut merges = Vec::new();
        let budget = vocab_size.saturating_sub(256 + specials.len());
        let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
        'outer: for w in WORDS.split_whitespace() {
            for variant in [format!("{}{w}", map[b' ' as usize]), w.to_string()] {
                let chars: Vec<String> = variant.chars().map(|c| c.to_string()).collect();
                let mut acc = chars[0].clone();
                for c in &chars[1..] {
                    let next = format!("{acc}{c}");
                    if !seen.contains(&next) {
                        if merges.len() == budget {
                            break 'outer;
                        }
                        merges.push((acc.clone(), c.clone()));
                        seen.insert(next.clone());
                        tokens.push(next.clone());
                        types.push(TOKEN_NORMAL);
                    }
                    acc = next;
                }
            }
        }
        let first_special = tokens.len() as u32;
        for (s, ty) in specials {
            tokens.push(s.to_string());
            types.push(ty);
        }
        let real_len = tokens.len();
        while tokens.len() < vocab_size {
            tokens.push(format!("[PAD{}]", tokens.len()));
            types.push(TOKEN_UNUSED);
        }
        SynthVocab {
            tokens,
            types,
            merges,
            real_len,
            endoftext: first_special,
            im_start: first_special + 1,
            im_end: first_special + 2,
            chat_template: CHATML_TEMPLATE.to_string(),
            embedded: None,
        }
    }

    /// Qwen3's vocabulary padded to `vocab_size` ids, with GGUF token types as llama.cpp's converter assigns
    /// them: added tokens that are special or look like `<|…|>` are CONTROL, other added tokens (`<think>`,
    /// `<tool_call>`) USER_DEFINED, ids missing from the tokenizer UNUSED.
    pub fn qwen3(vocab_size: usize) -> Result<SynthVocab, SynthError> {
        let bad = |msg: String| SynthError::Invalid(format!("embedded Qwen3 tokenizer.json: {msg}"));
        let j: Value = serde_json::from_slice(QWEN3_TOKENIZER_JSON).map_err(|e| bad(e.to_string()))?;
        let cfg: Value = serde_json::from_slice(QWEN3_TOKENIZER_CONFIG_JSON).map_err(|e| bad(e.to_string()))?;
        let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
        let mut put = |id: u64, tok: &str, ty: i32| -> Result<(), SynthError> {
            let id = usize::try_from(id).map_err(|_| bad(format!("id {id}")))?;
            if id >= by_id.len() {
                by_id.resize(id + 1, None);
            }
            if by_id[id].replace((tok.to_string(), ty)).is_some() {
                return Err(bad(format!("id {id} appears twice")));
            }
            Ok(())
        };
        let vocab = j["model"]["vocab"].as_object().ok_or_else(|| bad("no model.vocab".into()))?;
        for (tok, id) in vocab {
            put(id.as_u64().ok_or_else(|| bad(format!("id of {tok}")))?, tok, TOKEN_NORMAL)?;
        }
        for t in j["added_tokens"].as_array().ok_or_else(|| bad("no added_tokens".into()))? {
            let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
                return Err(bad(format!("added token {t}")));
            };
            let looks_special = content.starts_with("<|") && content.ends_with("|>");
            let ty =
                if t["special"].as_bool() == Some(true) || looks_special { TOKEN_CONTROL } else { TOKEN_USER_DEFINED };
            put(id, content, ty)?;
        }
        let real_len = by_id.len();
        if real_len > vocab_size {
            return Err(bad(format!("{real_len} ids do not fit a vocabulary of {vocab_size}")));
        }
        let mut tokens = Vec::with_capacity(vocab_size);
        let mut types = Vec::with_capacity(vocab_size);
        for i in 0..vocab_size {
            let (t, ty) = by_id.get(i).cloned().flatten().unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED));
            tokens.push(t);
            types.push(ty);
        }
        let merges = j["model"]["merges"]
            .as_array()
            .ok_or_else(|| bad("no model.merges".into()))?
            .iter()
            .map(|m| match m {
                // tokenizers ≥ 0.20 writes pairs; older files "a b" strings.
                Value::Array(p) => match (p.first().and_then(Value::as_str), p.get(1).and_then(Value::as_str)) {
                    (Some(a), Some(b)) if p.len() == 2 => Some((a.to_string(), b.to_string())),
                    _ => None,
                },
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("a merge is not a pair".into()))?;
        let id_of = |s: &str| -> Result<u32, SynthError> {
            tokens.iter().position(|t| t == s).map(|i| i as u32).ok_or_else(|| bad(format!("no {s} token")))
        };
        let (endoftext, im_start, im_end) = (id_of("<|endoftext|>")?, id_of("<|im_start|>")?, id_of("<|im_end|>")?);
        let chat_template =
            cfg["chat_template"].as_str().ok_or_else(|| bad("tokenizer_config.json has no chat_template".into()))?;
        Ok(SynthVocab {
            chat_template: chat_template.to_string(),
            tokens,
            types,
            merges,
            real_len,
            endoftext,
            im_start,
            im_end,
            embedded: Some((QWEN3_TOKENIZER_JSON, QWEN3_TOKENIZER_CONFIG_JSON)),
        })
    }

    /// `tokenizer.json` and `tokenizer_config.json`, as written into HF/MLX directories.
    pub fn hf_files(&self) -> Result<(Vec<u8>, Vec<u8>), SynthError> {
        if let Some((t, c)) = self.embedded {
            return Ok((t.to_vec(), c.to_vec()));
        }
        let pretty = |v: &Value| serde_json::to_vec_pretty(v).map_err(|e| SynthError::Invalid(e.to_string()));
        Ok((pretty(&self.tokenizer_json())?, pretty(&self.tokenizer_config_json())?))
    }

    /// HF `tokenizer.json` (tokenizers' serialisation of a byte-level BPE with Qwen2 splitting).
    pub fn tokenizer_json(&self) -> Value {
        let mut vocab = serde_json::Map::new();
        let n_normal = self.real_len - 7;
        for (i, t) in self.tokens[..n_normal].iter().enumerate() {
            vocab.insert(t.clone(), json!(i));
        }
        let added: Vec<Value> = (n_normal..self.real_len)
            .map(|i| {
                json!({
                    "id": i, "content": self.tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": self.types[i] == TOKEN_CONTROL,
                })
            })
            .collect();
        let merges: Vec<Value> = self.merges.iter().map(|(a, b)| json!([a, b])).collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
            ]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        })
    }

    pub fn tokenizer_config_json(&self) -> Value {
        let mut decoder = serde_json::Map::new();
        for i in (self.real_len - 7)..self.real_len {
            decoder.insert(
                i.to_string(),
                json!({"content": self.tokens[i], "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": self.types[i] == TOKEN_CONTROL}),
            );
        }
        json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": 131072,
            "tokenizer_class": "Qwen2Tokenizer",
            "clean_up_tokenization_spaces": false,
            "errors": "replace",
            "split_special_tokens": false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_use_existing_tokens_and_sizes_are_exact() {
        for size in [300, 1024, 4096] {
            let v = SynthVocab::new(size);
            assert_eq!(v.tokens.len(), size);
            assert_eq!(v.types.len(), size);
            let known: std::collections::HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
            for (a, b) in &v.merges {
                assert!(known.contains(a.as_str()) && known.contains(b.as_str()));
                assert!(known.contains(format!("{a}{b}").as_str()));
            }
            assert_eq!(v.tokens[v.im_end as usize], "<|im_end|>");
        }
        let m = byte_to_char();
        let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
    }

    #[test]
    fn qwen3_vocab_is_the_assets_padded_with_llama_cpp_types() {
        let v = SynthVocab::qwen3(QWEN3_PADDED_VOCAB).expect("qwen3 vocab");
        assert_eq!((v.tokens.len(), v.types.len(), v.real_len), (151_936, 151_936, 151_669));
        assert_eq!(v.merges.len(), 151_387);
        assert_eq!((v.endoftext, v.im_start, v.im_end), (151_643, 151_644, 151_645));
        assert_eq!(v.tokens[0], "!");
        assert_eq!(v.tokens[151_669], "[PAD151669]");
        let ty = |s: &str| v.types[v.tokens.iter().position(|t| t == s).expect(s)];
        assert_eq!(ty("<|im_start|>"), TOKEN_CONTROL);
        assert_eq!(ty("<|fim_prefix|>"), TOKEN_CONTROL); // not special in HF, but looks it (llama.cpp's rule)
        assert_eq!(ty("<think>"), TOKEN_USER_DEFINED);
        assert_eq!(ty("</tool_call>"), TOKEN_USER_DEFINED);
        assert_eq!(ty("Ġthe"), TOKEN_NORMAL);
        assert_eq!(v.types[151_935], TOKEN_UNUSED);
        assert!(v.chat_template.contains("<tool_call>"));
        assert!(SynthVocab::qwen3(1000).is_err());
    }
}
