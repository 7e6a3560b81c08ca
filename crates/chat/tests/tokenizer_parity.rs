//! The Qwen3 tokenizer (assets/qwen3-tokenizer/tokenizer.json) through `chat::Tokenizer` against HF
//! `tokenizers` (Python): ids, decode with and without special tokens, and stream decoding, over the committed
//! corpus of tests/fixtures/chat/tokenizer_parity.json (scripts/fixtures/make_tokenizer_fixtures.py).

mod common;

use common::{Corpus, assert_no_mismatch, qwen3_tokenizer};
use moestream_chat::{Specials, StreamDecoder};

#[test]
fn ids_match_hf_tokenizers_for_the_whole_corpus() {
    let tok = qwen3_tokenizer();
    let corpus = Corpus::load();
    assert!(corpus.cases.len() >= 1000, "corpus has only {} strings", corpus.cases.len());
    let mut bad = Vec::new();
    for c in &corpus.cases {
        let ids = tok.encode(&c.text).expect("encode");
        if ids != c.ids {
            bad.push(format!("{:?}: ours {ids:?}, HF {:?}", c.text, c.ids));
        }
    }
    assert_no_mismatch("encode", &bad, corpus.cases.len());
}

#[test]
fn decode_matches_hf_with_and_without_special_tokens() {
    let tok = qwen3_tokenizer();
    let corpus = Corpus::load();
    let mut bad = Vec::new();
    for c in &corpus.cases {
        let keep = tok.decode(&c.ids).expect("decode");
        let skip = tok.decode_with(&c.ids, Specials::Skip).expect("decode");
        if keep != c.decoded {
            bad.push(format!("keep {:?}: ours {keep:?}, HF {:?}", c.text, c.decoded));
        }
        if skip != c.decoded_skip_special {
            bad.push(format!("skip {:?}: ours {skip:?}, HF {:?}", c.text, c.decoded_skip_special));
        }
    }
    assert_no_mismatch("decode", &bad, corpus.cases.len());
    // The corpus must exercise both behaviours, or the comparison above proves nothing about skipping.
    assert!(corpus.cases.iter().any(|c| c.decoded != c.decoded_skip_special));
    assert!(corpus.cases.iter().any(|c| c.text != c.decoded), "no NFC-normalised case in the corpus");
}

#[test]
fn added_tokens_are_matched_whole() {
    let tok = qwen3_tokenizer();
    let corpus = Corpus::load();
    assert_eq!(corpus.added_tokens.len(), 26);
    for (content, &id) in &corpus.added_tokens {
        assert_eq!(tok.token_id(content), Some(id), "{content}");
        assert_eq!(tok.encode(content).expect("encode"), vec![id], "{content}");
        assert_eq!(tok.encode(&format!("x{content}x")).expect("encode").len(), 3, "{content} inside text");
    }
    // Look-alikes are ordinary text.
    let think = corpus.added_tokens["<think>"];
    for s in ["<think", "< think>", "<Think>", "<think >", "<<think>"] {
        let ids = tok.encode(s).expect("encode");
        assert!(ids.len() > 1 || !ids.contains(&think), "{s:?} -> {ids:?}");
    }
    // Qwen3 marks `<think>`/`<tool_call>` not special: skipping specials keeps them and drops `<|im_end|>`.
    let ids = tok.encode("<think>a</think><tool_call>b</tool_call><|im_end|>").expect("encode");
    assert_eq!(tok.decode_with(&ids, Specials::Skip).expect("decode"), "<think>a</think><tool_call>b</tool_call>");
    assert_eq!(tok.vocab_size(), 151_669);
}

#[test]
fn stream_decoding_concatenates_to_decode_and_never_shows_half_a_character() {
    let tok = qwen3_tokenizer();
    let corpus = Corpus::load();
    let mut bad = Vec::new();
    let mut held_back = 0;
    for c in &corpus.cases {
        for specials in [Specials::Keep, Specials::Skip] {
            let whole = tok.decode_with(&c.ids, specials).expect("decode");
            let mut s = StreamDecoder::with_specials(specials);
            let mut out = String::new();
            for &id in &c.ids {
                let piece = s.push(&tok, id).expect("push");
                if piece.is_empty() {
                    held_back += 1;
                }
                if piece.contains('\u{fffd}') && !whole.contains('\u{fffd}') {
                    bad.push(format!("{:?}: piece {piece:?} has U+FFFD", c.text));
                }
                out += &piece;
            }
            out += &s.finish(&tok).expect("finish");
            if out != whole {
                bad.push(format!("{:?} ({specials:?}): stream {out:?} != decode {whole:?}", c.text));
            }
        }
    }
    assert_no_mismatch("stream decode", &bad, corpus.cases.len());
    // Characters split over byte tokens (emoji, CJK extension B) must have occurred, or this proved nothing.
    assert!(held_back > 100, "only {held_back} tokens were held back");
}

#[test]
fn stream_decoder_holds_an_emoji_split_over_byte_tokens() {
    let tok = qwen3_tokenizer();
    // U+20000 (CJK extension B) is not in the vocabulary: it is four byte tokens.
    let ids = tok.encode("a\u{20000}b").expect("encode");
    assert!(ids.len() >= 4, "{ids:?}");
    let mut s = StreamDecoder::new();
    let pieces: Vec<String> = ids.iter().map(|&id| s.push(&tok, id).expect("push")).collect();
    assert_eq!(pieces.concat(), "a\u{20000}b");
    assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
    assert!(pieces.iter().any(String::is_empty), "nothing was held back: {pieces:?}");
    // A sequence that ends inside a character gives its bytes lossily on finish, and the decoder resets.
    let cut = &ids[..ids.len() - 2];
    let mut shown: String = cut.iter().map(|&id| s.push(&tok, id).expect("push")).collect();
    assert!(!shown.contains('\u{fffd}'), "{shown:?}");
    shown += &s.finish(&tok).expect("finish");
    assert_eq!(shown, tok.decode(cut).expect("decode"));
    assert!(shown.ends_with('\u{fffd}'));
}

#[test]
fn embedded_bytes_load_the_same_tokenizer_and_garbage_is_an_error() {
    let bytes = std::fs::read(common::repo_path("assets/qwen3-tokenizer/tokenizer.json")).expect("asset");
    let a = moestream_chat::Tokenizer::from_json_bytes(&bytes).expect("from bytes");
    let b = qwen3_tokenizer();
    let text = "<|im_start|>user\n你好 🚀 world<|im_end|>";
    assert_eq!(a.encode(text).expect("encode"), b.encode(text).expect("encode"));
    for bad in [&b"not json"[..], b"{}", b"", &bytes[..bytes.len() / 2]] {
        let e = moestream_chat::Tokenizer::from_json_bytes(bad).expect_err("garbage");
        assert!(e.to_string().contains("tokenizer"), "{e}");
    }
    // Ids the vocabulary does not have decode to nothing rather than failing or panicking.
    assert_eq!(b.decode(&[u32::MAX, 151_935]).expect("decode"), "");
}
