//! Splits generated text into what the server reports separately: answer content, reasoning (`<think>…</think>`)
//! and tool calls (`<tool_call>{"name": …, "arguments": …}</tool_call>`, Qwen3's Hermes-style format), while it
//! streams.
//!
//! Text arrives in arbitrary deltas (a tag may be split, `<to` + `ol_call>`). The parser emits everything it can
//! and holds back only text that may still turn out to be part of a tag or of the formatting around one (the
//! newlines the chat template writes around tags), so a client sees content as soon as it cannot be a tag.
//! Whitespace the template puts around tags is stripped the way the template writes it: one `\n` after
//! `<think>` and before `</think>`, the newlines after `</think>`, one `\n` before `<tool_call>`, and whitespace
//! between or after tool calls. A tool-call block that is not valid JSON with a string `name` is passed through as
//! content, never dropped. Owns no tokenizer and no wire types: events are plain strings.

use std::hash::{BuildHasher, Hasher};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

/// One piece of parsed output. Consecutive pieces of one kind from one `push` are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Content(String),
    Reasoning(String),
    /// A complete tool call. `index` counts calls from 0 within one output; `arguments` is a JSON string
    /// (re-serialised compactly when the model wrote an object, verbatim when it wrote a string).
    ToolCall {
        index: usize,
        id: String,
        name: String,
        arguments: String,
    },
}

/// How the parser starts and which blocks it recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParserConfig {
    /// The prompt ended inside a reasoning block (`…<think>\n`, as thinking-only templates write): the output
    /// is reasoning until `</think>`. When the template wrote an empty think block instead, leave it false.
    pub starts_in_reasoning: bool,
    /// Split out `<think>` blocks; false leaves them in the content.
    pub reasoning: bool,
    /// Parse `<tool_call>` blocks; false leaves them in the content (e.g. the request offered no tools).
    pub tool_calls: bool,
}

impl Default for ParserConfig {
    fn default() -> Self {
        ParserConfig { starts_in_reasoning: false, reasoning: true, tool_calls: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Content,
    Reasoning,
    ToolCall,
}

/// Streaming parser of one generated output.
#[derive(Debug)]
pub struct OutputParser {
    config: ParserConfig,
    mode: Mode,
    /// Text received and not yet emitted: a possible tag prefix, or a tool-call body.
    held: String,
    /// Reasoning just started: one leading `\n` is formatting.
    strip_one_newline: bool,
    /// Content right after `</think>`: leading newlines are formatting.
    strip_newlines: bool,
    /// Content right after a tool call: whitespace is a separator unless other text follows.
    after_tool_call: bool,
    /// In a tool call: `held[..scanned]` is known to hold no complete close tag.
    scanned: usize,
    next_index: usize,
    id_base: u64,
}

impl OutputParser {
    pub fn new(config: ParserConfig) -> Self {
        let starts_in_reasoning = config.starts_in_reasoning && config.reasoning;
        OutputParser {
            config,
            mode: if starts_in_reasoning { Mode::Reasoning } else { Mode::Content },
            held: String::new(),
            strip_one_newline: starts_in_reasoning,
            strip_newlines: false,
            after_tool_call: false,
            scanned: 0,
            next_index: 0,
            // Tool-call ids only need to be unique within a conversation; std's randomly keyed hasher gives a
            // per-process random value without a dependency.
            id_base: std::collections::hash_map::RandomState::new().build_hasher().finish(),
        }
    }

    /// Feed a text delta; returns the events it completes (possibly none).
    pub fn push(&mut self, delta: &str) -> Vec<Event> {
        self.held.push_str(delta);
        let mut out = Vec::new();
        while self.step(&mut out) {}
        out
    }

    /// The output ended: emit whatever was held back (a partial tag is text; an unterminated tool call is a
    /// call if its body is complete JSON, else content). The parser is then ready for a new output.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while self.step(&mut out) {}
        let held = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Content => {
                let separator = (self.after_tool_call && held.trim().is_empty())
                    || (self.strip_newlines && held.chars().all(|c| c == '\n'));
                if !separator {
                    emit(&mut out, Event::Content(held));
                }
            }
            Mode::Reasoning => emit(&mut out, Event::Reasoning(held)),
            Mode::ToolCall => match self.tool_call(&held) {
                Some(call) => emit(&mut out, call),
                None => emit(&mut out, Event::Content(format!("{TOOL_OPEN}{held}"))),
            },
        }
        *self = OutputParser::new(self.config);
        out
    }

    /// Consume what can be decided from `held`; true when the mode changed and there may be more to do.
    fn step(&mut self, out: &mut Vec<Event>) -> bool {
        match self.mode {
            Mode::Content => self.step_content(out),
            Mode::Reasoning => self.step_reasoning(out),
            Mode::ToolCall => self.step_tool_call(out),
        }
    }

    fn step_content(&mut self, out: &mut Vec<Event>) -> bool {
        if self.strip_newlines {
            let rest = self.held.trim_start_matches('\n');
            if rest.is_empty() {
                self.held.clear();
                return false;
            }
            self.held = rest.to_string();
            self.strip_newlines = false;
        }
        let think = self.config.reasoning.then(|| self.held.find(THINK_OPEN)).flatten();
        let tool = self.config.tool_calls.then(|| self.held.find(TOOL_OPEN)).flatten();
        let found = match (think, tool) {
            (Some(a), Some(b)) if b < a => Some((b, TOOL_OPEN)),
            (Some(a), _) => Some((a, THINK_OPEN)),
            (None, Some(b)) => Some((b, TOOL_OPEN)),
            (None, None) => None,
        };
        if let Some((at, tag)) = found {
            let mut text = &self.held[..at];
            if tag == TOOL_OPEN {
                text = text.strip_suffix('\n').unwrap_or(text);
            }
            if !(self.after_tool_call && text.trim().is_empty()) {
                emit(out, Event::Content(text.to_string()));
            }
            self.after_tool_call = false;
            self.held.drain(..at + tag.len());
            if tag == THINK_OPEN {
                self.mode = Mode::Reasoning;
                self.strip_one_newline = true;
            } else {
                self.mode = Mode::ToolCall;
            }
            return true;
        }
        if self.after_tool_call {
            if self.held.trim().is_empty() {
                return false;
            }
            self.after_tool_call = false;
        }
        let mut tags: Vec<&str> = Vec::new();
        if self.config.reasoning {
            tags.push(THINK_OPEN);
        }
        if self.config.tool_calls {
            tags.extend([TOOL_OPEN, "\n<tool_call>"]);
        }
        let keep = partial_tag_suffix(&self.held, &tags);
        let text: String = self.held.drain(..self.held.len() - keep).collect();
        emit(out, Event::Content(text));
        false
    }

    fn step_reasoning(&mut self, out: &mut Vec<Event>) -> bool {
        if self.strip_one_newline {
            if self.held.is_empty() {
                return false;
            }
            if self.held.starts_with('\n') {
                self.held.remove(0);
            }
            self.strip_one_newline = false;
        }
        if let Some(at) = self.held.find(THINK_CLOSE) {
            let text = &self.held[..at];
            emit(out, Event::Reasoning(text.strip_suffix('\n').unwrap_or(text).to_string()));
            self.held.drain(..at + THINK_CLOSE.len());
            self.mode = Mode::Content;
            self.strip_newlines = true;
            return true;
        }
        let keep = partial_tag_suffix(&self.held, &[THINK_CLOSE, "\n</think>"]);
        let text: String = self.held.drain(..self.held.len() - keep).collect();
        emit(out, Event::Reasoning(text));
        false
    }

    fn step_tool_call(&mut self, out: &mut Vec<Event>) -> bool {
        // The body accumulates in `held`; only its tail can hold a close tag that this delta completed.
        let mut from = self.scanned.min(self.held.len());
        while !self.held.is_char_boundary(from) {
            from -= 1;
        }
        let Some(at) = self.held[from..].find(TOOL_CLOSE).map(|i| i + from) else {
            self.scanned = self.held.len().saturating_sub(TOOL_CLOSE.len() - 1);
            return false;
        };
        self.scanned = 0;
        let body = self.held[..at].to_string();
        self.held.drain(..at + TOOL_CLOSE.len());
        self.mode = Mode::Content;
        match self.tool_call(&body) {
            Some(call) => {
                emit(out, call);
                self.after_tool_call = true;
            }
            None => emit(out, Event::Content(format!("{TOOL_OPEN}{body}{TOOL_CLOSE}"))),
        }
        true
    }

    /// `{"name": "...", "arguments": {...}}` (or `"parameters"`, which some Qwen fine-tunes write) → a call.
    fn tool_call(&mut self, body: &str) -> Option<Event> {
        let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            None | Some(serde_json::Value::Null) => "{}".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        let index = self.next_index;
        self.next_index += 1;
        Some(Event::ToolCall { index, id: format!("call_{:016x}{index:02}", self.id_base), name, arguments })
    }
}

/// Append, merging with the previous event of the same text kind and dropping empty text.
fn emit(out: &mut Vec<Event>, e: Event) {
    match (out.last_mut(), e) {
        (_, Event::Content(s) | Event::Reasoning(s)) if s.is_empty() => {}
        (Some(Event::Content(a)), Event::Content(b)) | (Some(Event::Reasoning(a)), Event::Reasoning(b)) => {
            a.push_str(&b)
        }
        (_, e) => out.push(e),
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `tags` (all ASCII, so the cut is a
/// char boundary).
fn partial_tag_suffix(text: &str, tags: &[&str]) -> usize {
    let b = text.as_bytes();
    tags.iter()
        .flat_map(|t| (1..t.len()).rev().filter(move |&k| b.ends_with(&t.as_bytes()[..k])).take(1))
        .max()
        .unwrap_or(0)
}
