//! The tokenizer rebuilt from GGUF metadata must give the same ids as the HF `tokenizer.json` of the same model
//! (synth writes both from one vocabulary), and stream decoding must reassemble the text exactly.

use moestream_chat::{StreamDecoder, Tokenizer};
use moestream_format::TensorIndex;
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};

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
