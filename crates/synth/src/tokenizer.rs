//! A deterministic byte-level BPE tokenizer for synthetic models, written both as HF `tokenizer.json` and as
//! GGUF `tokenizer.ggml.*` metadata.
//!
//! It is GPT-2/Qwen-shaped on purpose (byte-level alphabet, Qwen2 pre-tokenizer regex, ChatML special tokens), so
//! the code paths that real Qwen checkpoints take are the ones synthetic models exercise. Merges are built from a
//! fixed word list by growing each word left to right, which makes every merge's parts existing tokens. Ids past
//! the real vocabulary are padding: absent from `tokenizer.json` (as in Qwen checkpoints, whose embedding is
//! larger than the tokenizer) and `[PADn]` tokens of type UNUSED in GGUF, as llama.cpp's converter writes them.

use serde_json::{Value, json};

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
        }
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
}
