//! Text in and out for a model: its tokenizer (from `tokenizer.json` or GGUF metadata), incremental
//! detokenization, chat templates (HF's Jinja dialect) and the parsers that split generated text into content,
//! reasoning and tool calls.
//!
//! Everything here works on text and token ids. This crate does not run the model, does not open model weights
//! (the GGUF metadata it reads comes through `format`'s `TensorIndex`) and knows no wire format: the server maps
//! its OpenAI types onto [`TemplateInput`] and back from the parsers' events.

mod error;
pub mod parse;
mod stream;
pub mod template;
mod tokenizer;

pub use error::ChatError;
pub use parse::{Event, OutputParser, ParserConfig};
pub use stream::StreamDecoder;
pub use template::{ChatTemplate, TemplateInput};
pub use tokenizer::{Specials, Tokenizer};

#[cfg(test)]
mod tests {
    /// The server shares one tokenizer and template across request threads and moves parsers between tasks.
    #[test]
    fn shared_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::Tokenizer>();
        send_sync::<crate::ChatTemplate>();
        send_sync::<crate::StreamDecoder>();
        send_sync::<crate::OutputParser>();
        send_sync::<crate::ChatError>();
    }
}
