//! OpenAI and llama-server request bodies, and their translation into engine requests. Unknown fields are
//! ignored (clients send many we do not use); known fields with the wrong shape are a 400 naming the field.

use moestream_engine::{GenerationRequest, SamplingParams};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Parse a JSON body; a syntax or shape error names the field path (`messages[0].role`).
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request("", format!("the request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request("", format!("invalid request body: {inner}"))
        } else {
            ApiError::bad_request(path.clone(), format!("`{path}`: {inner}"))
        }
    })
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The sampling and length fields both completion endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: generate through end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
}

impl SamplingFields {
    /// The engine request for `prompt`, validating what only the wire knows (n, negative counts).
    pub fn to_request(&self, prompt: Vec<u32>) -> Result<GenerationRequest, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad_request("n", format!("only n = 1 is supported, got {n}")));
        }
        let d = SamplingParams::default();
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k <= 0 => 0, // llama.cpp and vLLM: 0 or -1 mean off
            Some(k) => k as usize,
        };
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(n) if n < 1 => {
                let field = if self.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
                return Err(ApiError::bad_request(field, format!("`{field}` must be at least 1, got {n}")));
            }
            Some(n) => Some(n as usize),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::bad_request("stop", "at most 16 stop strings"));
        }
        Ok(GenerationRequest {
            prompt,
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(d.temperature),
                top_p: self.top_p.unwrap_or(d.top_p),
                top_k,
                min_p: self.min_p.unwrap_or(d.min_p),
                repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
                presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
                frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
                seed: self.seed.map(|s| s as u64),
            },
            max_tokens,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }

    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }
}

/// A chat message as clients send it. `content` may be a string, a list of parts, or null (an assistant turn
/// that only calls tools).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl ChatMessage {
    /// The text of the message: a string, or its text parts joined.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(MessageContent::Text(s)) => s.clone(),
            Some(MessageContent::Parts(p)) => p.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }

    /// The message as the chat template sees it (HF conventions: content a string, tool calls with parsed
    /// arguments).
    pub fn to_template_value(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), Value::String(self.role.clone()));
        m.insert("content".into(), Value::String(self.text()));
        if let Some(n) = &self.name {
            m.insert("name".into(), Value::String(n.clone()));
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), Value::String(id.clone()));
        }
        if let Some(r) = &self.reasoning_content {
            m.insert("reasoning_content".into(), Value::String(r.clone()));
        }
        if let Some(calls) = &self.tool_calls {
            let calls = calls.iter().cloned().map(parse_call_arguments).collect();
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        Value::Object(m)
    }
}

/// OpenAI sends tool-call arguments as a JSON string; HF templates expect the object (`tojson` re-encodes it).
fn parse_call_arguments(mut call: Value) -> Value {
    if let Some(f) = call.get_mut("function")
        && let Some(Value::String(s)) = f.get("arguments")
        && let Ok(v) = serde_json::from_str::<Value>(s)
    {
        f["arguments"] = v;
    }
    call
}

/// Check roles and content shapes; `messages[i].role` etc. name the offender.
pub fn validate_messages(msgs: &[ChatMessage]) -> Result<(), ApiError> {
    if msgs.is_empty() {
        return Err(ApiError::bad_request("messages", "`messages` must not be empty"));
    }
    for (i, m) in msgs.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role"),
                format!("`messages[{i}].role` must be system, developer, user, assistant or tool, got `{}`", m.role),
            ));
        }
        if m.content.is_none() && !(m.role == "assistant" && m.tool_calls.is_some()) {
            return Err(ApiError::bad_request(
                format!("messages[{i}].content"),
                format!("`messages[{i}].content` is required for a {} message", m.role),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Accepted; the model decides whether to call a tool.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub enable_thinking: Option<bool>,
    /// Parsed from the same body by [`ChatRequest::parse`] (serde's `flatten` would lose field paths in errors).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let mut r: Self = parse_body(bytes)?;
        r.sampling = parse_body(bytes)?;
        Ok(r)
    }

    /// `enable_thinking` from the top level or `chat_template_kwargs` (the latter wins, as in vLLM).
    pub fn enable_thinking(&self) -> Option<bool> {
        self.chat_template_kwargs
            .as_ref()
            .and_then(|k| k.get("enable_thinking"))
            .and_then(Value::as_bool)
            .or(self.enable_thinking)
    }
}

/// `prompt` of `/v1/completions`: text, a one-element list of text, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(skip)]
    pub sampling: SamplingFields,
}

impl CompletionRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let mut r: Self = parse_body(bytes)?;
        r.sampling = parse_body(bytes)?;
        Ok(r)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub content: String,
    /// Qwen tokenizers add no BOS, so this changes nothing for them; accepted for llama-server compatibility.
    #[serde(default)]
    pub add_special: bool,
    #[serde(default)]
    pub with_pieces: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApplyTemplateRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub enable_thinking: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_name_the_field() {
        let e = ChatRequest::parse(br#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{}", e.message);
        let e = ChatRequest::parse(br#"{"model": "x"}"#).unwrap_err();
        assert!(e.message.contains("messages"), "{}", e.message);
        let e = ChatRequest::parse(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{}", e.message);
        let e = ChatRequest::parse(b"{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        // Unknown fields are ignored.
        let r = ChatRequest::parse(br#"{"messages": [], "logit_bias": {}, "user": "u", "stop": "x"}"#).unwrap();
        assert!(matches!(r.sampling.stop, Some(StopField::One(_))));
    }

    #[test]
    fn sampling_fields_map_to_the_engine() {
        let r = ChatRequest::parse(
            br#"{"messages": [], "temperature": 0, "top_k": -1, "seed": 5, "stop": ["a", "b"],
                 "max_tokens": 9, "max_completion_tokens": 7, "chat_template_kwargs": {"enable_thinking": false},
                 "enable_thinking": true}"#,
        )
        .unwrap();
        let g = r.sampling.to_request(vec![1]).unwrap();
        assert_eq!(g.sampling.temperature, 0.0);
        assert_eq!(g.sampling.top_k, 0);
        assert_eq!(g.sampling.seed, Some(5));
        assert_eq!(g.stop, vec!["a", "b"]);
        assert_eq!(g.max_tokens, Some(7));
        let bad = ChatRequest::parse(br#"{"messages": [], "n": 2}"#).unwrap();
        assert_eq!(bad.sampling.to_request(vec![1]).unwrap_err().param.as_deref(), Some("n"));
        let bad = ChatRequest::parse(br#"{"messages": [], "max_tokens": 0}"#).unwrap();
        assert_eq!(bad.sampling.to_request(vec![1]).unwrap_err().param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn messages_are_validated_and_flattened() {
        let r = ChatRequest::parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                 {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                   "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "42"}]}"#,
        )
        .unwrap();
        validate_messages(&r.messages).unwrap();
        assert_eq!(r.messages[0].text(), "ab");
        let v = r.messages[1].to_template_value();
        assert_eq!(v["tool_calls"][0]["function"]["arguments"]["x"], 1);
        let bad = ChatRequest::parse(br#"{"messages": [{"role": "wizard", "content": "x"}]}"#).unwrap();
        assert_eq!(validate_messages(&bad.messages).unwrap_err().param.as_deref(), Some("messages[0].role"));
        let bad = ChatRequest::parse(br#"{"messages": [{"role": "user"}]}"#).unwrap();
        assert_eq!(validate_messages(&bad.messages).unwrap_err().param.as_deref(), Some("messages[0].content"));
        assert!(validate_messages(&[]).is_err());
    }
}
