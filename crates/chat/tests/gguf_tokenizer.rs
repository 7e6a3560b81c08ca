//! The tokenizer rebuilt from GGUF metadata must give the same ids as the HF `tokenizer.json` of the same model
//! (synth writes both from one vocabulary), and stream decoding must reassemble the text exactly: for synth's
//! small tokenizer, and for Qwen3's real one over the whole parity corpus.

mod common;

use common::{Corpus, assert_no_mismatch, repo_path};
use moestream_chat::{Specials, StreamDecoder, Tokenizer};
use moestream_format::TensorIndex;
use moestream_synth::{Preset, SynthFormat, SynthOptions, SynthTokenizer, synth};

#[test]
fn gguf_and_tokenizer_json_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("m.gguf");
    let hf = dir.path().join("hf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &gguf)).expect("synth gguf");
    synth(&SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::HfBf16, &hf)).expect("synth hf");
    let a = Tokenizer::from_index(&TensorIndex::open(&gguf).expect("index")).expect("gguf tok").expect("present");
    let b = Tokenizer::from_index(&TensorIndex::open(&hf).expect("index")).expect("hf tok").expect("present");
    let texts = [
        "hello world, the model reads the cache",
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "  leading   spaces\tand\ttabs\n\n\nnewlines",
        "数字 123456 and emoji 🚀🧪 mixed: Ünïcödé",
        "fn main() { let mut x = 3; return x; }",
        "",
    ];
    for t in texts {
        let ia = a.encode(t).expect("encode gguf");
        let ib = b.encode(t).expect("encode hf");
        assert_eq!(ia, ib, "{t:?}");
        assert_eq!(a.decode(&ia).expect("decode"), t, "{t:?}");
        let mut s = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ia {
            out += &s.push(&a, id).expect("push");
        }
        assert_eq!(out, t, "stream {t:?}");
    }
    // Specials are single ids.
    assert_eq!(a.encode("<|im_start|>").expect("encode").len(), 1);
}

#[test]
fn gguf_with_qwen3_tokenizer_matches_tokenizer_json_on_the_parity_corpus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("q.gguf");
    let hf = dir.path().join("hf");
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ4_0, &gguf);
    o.tokenizer = SynthTokenizer::Qwen3;
    o.layers = Some(1);
    let summary = synth(&o).expect("synth gguf --tokenizer qwen3");
    assert_eq!(summary.config.vocab_size, 151_936);
    let index = TensorIndex::open(&gguf).expect("index");
    assert_eq!(index.config.vocab_size, 151_936);
    let tok = Tokenizer::from_index(&index).expect("gguf tokenizer").expect("present");
    let corpus = Corpus::load();
    // llama.cpp's converter makes every `<|…|>` token CONTROL, so in GGUF these three non-special (in HF) tokens
    // are special too; `Specials::Skip` differs from HF exactly where they occur.
    let control_in_gguf_only: Vec<u32> =
        ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
            .iter()
            .map(|t| corpus.added_tokens[*t])
            .collect();
    let mut bad = Vec::new();
    for c in &corpus.cases {
        let ids = tok.encode(&c.text).expect("encode");
        if ids != c.ids {
            bad.push(format!("{:?}: GGUF {ids:?}, tokenizer.json {:?}", c.text, c.ids));
        }
        let keep = tok.decode(&c.ids).expect("decode");
        if keep != c.decoded {
            bad.push(format!("decode {:?}: GGUF {keep:?}, tokenizer.json {:?}", c.text, c.decoded));
        }
        if !c.ids.iter().any(|i| control_in_gguf_only.contains(i)) {
            let skip = tok.decode_with(&c.ids, Specials::Skip).expect("decode");
            if skip != c.decoded_skip_special {
                bad.push(format!("skip {:?}: GGUF {skip:?}, tokenizer.json {:?}", c.text, c.decoded_skip_special));
            }
        }
    }
    assert_no_mismatch("GGUF qwen3 tokenizer", &bad, corpus.cases.len());
    for (content, &id) in &corpus.added_tokens {
        assert_eq!(tok.encode(content).expect("encode"), vec![id], "{content}");
    }

    // HF output of the same option: the asset files byte for byte, and config ids that agree with them.
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::HfBf16, &hf);
    o.tokenizer = SynthTokenizer::Qwen3;
    o.layers = Some(1);
    synth(&o).expect("synth hf --tokenizer qwen3");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let ours = std::fs::read(hf.join(f)).expect(f);
        let asset = std::fs::read(repo_path("assets/qwen3-tokenizer").join(f)).expect(f);
        assert!(ours == asset, "{f} differs from the asset");
    }
    let index = TensorIndex::open(&hf).expect("index");
    assert_eq!(index.config.vocab_size, 151_936);
    assert_eq!(index.config.bos_token_id, Some(corpus.added_tokens["<|endoftext|>"]));
    assert_eq!(index.config.eos_token_ids, vec![corpus.added_tokens["<|im_end|>"]]);
}
