//! Incremental detokenization: token ids in, text pieces out, such that the pieces concatenate to the decode
//! of all ids and no piece ends in half a character.
//!
//! A byte-level BPE splits multi-byte characters (emoji, rare CJK) over several tokens, and decoding a prefix
//! then ends in U+FFFD. We keep HF's `DecodeStream` scheme (also vLLM's): decode a short window of ids and its
//! already-emitted prefix, emit the difference only when it does not end in U+FFFD. Unlike decoding everything
//! on each token this is O(window) per token. Owns no tokenizer state; it borrows the [`Tokenizer`] per call.

use crate::{ChatError, Specials, Tokenizer};

/// Turns a growing token sequence into text pieces.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    /// Ids from the window start: `ids[..read]` has been emitted, `ids[prefix..read]` is the context that the
    /// next decode starts from (some decoders, e.g. SentencePiece's, depend on the preceding token).
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    specials: Specials,
}

impl StreamDecoder {
    /// A decoder that keeps special tokens in the text.
    pub fn new() -> Self {
        Self::with_specials(Specials::Keep)
    }

    pub fn with_specials(specials: Specials) -> Self {
        StreamDecoder { ids: Vec::new(), prefix: 0, read: 0, specials }
    }

    /// Add a token; returns the new text that is safe to show (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, ChatError> {
        self.ids.push(id);
        let (done, text) = self.pending(tok)?;
        // A trailing U+FFFD is (almost always) an incomplete character: wait for its next bytes. A genuine
        // U+FFFD is emitted with the next token, or by `finish`.
        if text.len() <= done.len() || text.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        let new = split_new(&done, &text);
        self.prefix = self.read;
        self.read = self.ids.len();
        // Ids before the context window are never decoded again.
        self.ids.drain(..self.prefix);
        self.read -= self.prefix;
        self.prefix = 0;
        Ok(new)
    }

    /// The text still held back (an incomplete or invalid trailing sequence, lossily decoded); resets the
    /// decoder for a new sequence.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String, ChatError> {
        let (done, text) = self.pending(tok)?;
        let rest = if text.len() > done.len() { split_new(&done, &text) } else { String::new() };
        *self = Self::with_specials(self.specials);
        Ok(rest)
    }

    fn pending(&self, tok: &Tokenizer) -> Result<(String, String), ChatError> {
        let done = tok.decode_with(&self.ids[self.prefix..self.read], self.specials)?;
        let text = tok.decode_with(&self.ids[self.prefix..], self.specials)?;
        Ok((done, text))
    }
}

/// `text` minus its already-emitted start `done`. Decoders that rewrite text (cleanup, prefix spaces) can make
/// `done` not a byte prefix of `text`; then the longest common prefix on a char boundary is what was shown.
fn split_new(done: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(done) {
        return rest.to_string();
    }
    let common = done.char_indices().zip(text.chars()).take_while(|((_, a), b)| a == b).count();
    let at = text.char_indices().nth(common).map_or(text.len(), |(i, _)| i);
    text[at..].to_string()
}
