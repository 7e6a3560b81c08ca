//! Model output text → content, reasoning and tool calls. PLACEHOLDER until the `chat` crate's `OutputParser`
//! is merged: everything is content.

/// One piece of parsed output.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    Reasoning(String),
    /// A complete tool call: function name and its arguments as JSON text.
    ToolCall {
        name: String,
        arguments: String,
    },
}

#[derive(Debug, Default)]
pub struct OutputSplitter;

impl OutputSplitter {
    pub fn new(_thinking: bool) -> Self {
        OutputSplitter
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        if text.is_empty() { Vec::new() } else { vec![Piece::Content(text.to_string())] }
    }

    pub fn finish(&mut self) -> Vec<Piece> {
        Vec::new()
    }
}
