//! Route handlers: OpenAI chat and text completions (JSON and SSE), `/v1/models`, and the llama-server
//! utilities (`/tokenize`, `/detokenize`, `/apply-template`).
//!
//! SSE framing follows OpenAI exactly: a first chunk with `delta: {role: "assistant", content: ""}`, content
//! (or `reasoning_content` / `tool_calls`) chunks, a chunk with `finish_reason` and an empty delta, a
//! `choices: []` usage chunk when `stream_options.include_usage`, then `data: [DONE]`. The SSE stream owns the
//! engine's `Generation`; when the client disconnects, hyper drops the stream and with it the generation, which
//! the engine then cancels.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use moestream_chat::{Event as Parsed, OutputParser, ParserConfig};
use moestream_engine::{Event, FinishReason, Generation, Usage};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::prompt::{chat_prompt, ends_in_think};
use crate::wire::{
    ApplyTemplateRequest, ChatRequest, CompletionRequest, DetokenizeRequest, PromptField, TokenizeRequest, parse_body,
    validate_messages,
};
use crate::{SharedState, body_bytes, unix_now};

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", moestream_engine::rng::fresh_seed(), moestream_engine::rng::fresh_seed() as u32)
}

fn usage_json(u: Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens})
}

fn encode(s: &SharedState, text: &str) -> Result<Vec<u32>, ApiError> {
    s.engine.tokenizer().encode(text).map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))
}

pub async fn chat_completions(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = ChatRequest::parse(&body_bytes(body)?)?;
    validate_messages(&req.messages)?;
    let text =
        chat_prompt(&s, &req.messages, req.tools.as_ref(), req.chat_template_kwargs.as_ref(), req.enable_thinking)?;
    let parser = OutputParser::new(ParserConfig {
        starts_in_reasoning: ends_in_think(&text),
        reasoning: true,
        // Without tools offered, `<tool_call>` text is content (as vLLM does).
        tool_calls: req.tools.as_ref().is_some_and(|t| !t.is_empty()),
    });
    let greq = req.sampling.to_request(encode(&s, &text)?)?;
    let generation = s.engine.submit(greq)?;
    let chunks = ChatChunks::new(s.opts.model_name.clone(), parser, req.sampling.include_usage());
    if req.sampling.stream() {
        return Ok(chat_sse(generation, chunks));
    }
    Ok(Json(chat_json(generation, chunks).await?).into_response())
}

/// The first SSE chunk, then the rest as the generation produces them.
fn chat_sse(generation: Generation, chunks: ChatChunks) -> Response {
    let first = chunks.chunk(json!({"role": "assistant", "content": ""}), None);
    sse(generation, first, chunks)
}

/// The non-streaming `chat.completion` object.
async fn chat_json(mut g: Generation, mut c: ChatChunks) -> Result<Value, ApiError> {
    let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    let mut take = |pieces: Vec<Parsed>| {
        for p in pieces {
            match p {
                Parsed::Content(t) => content.push_str(&t),
                Parsed::Reasoning(t) => reasoning.push_str(&t),
                Parsed::ToolCall { id, name, arguments, .. } => calls.push(json!({"id": id, "type": "function",
                    "function": {"name": name, "arguments": arguments}})),
            }
        }
    };
    let (reason, usage) = loop {
        match g.next_event().await {
            Some(Event::Text(t)) => take(c.parser.push(&t)),
            Some(Event::Finish { reason, usage }) => {
                take(c.parser.finish());
                break (reason, usage);
            }
            Some(Event::Error(m)) => return Err(ApiError::internal(format!("generation failed: {m}"))),
            None => return Err(ApiError::internal("the engine stopped before the generation finished")),
        }
    };
    let mut message = json!({"role": "assistant", "content": content});
    if !reasoning.is_empty() {
        message["reasoning_content"] = Value::String(reasoning);
    }
    let finish = if calls.is_empty() { reason.as_str() } else { "tool_calls" };
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(json!({
        "id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage_json(usage),
    }))
}

/// Turns engine events into the chunks of one SSE stream.
trait Chunker: Send + 'static {
    fn text(&mut self, t: &str, out: &mut VecDeque<String>);
    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<String>);
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    parser: OutputParser,
    tool_calls: usize,
    include_usage: bool,
}

impl ChatChunks {
    fn new(model: String, parser: OutputParser, include_usage: bool) -> Self {
        ChatChunks { id: new_id("chatcmpl"), created: unix_now(), model, parser, tool_calls: 0, include_usage }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
        .to_string()
    }

    fn pieces(&mut self, pieces: Vec<Parsed>, out: &mut VecDeque<String>) {
        for p in pieces {
            let delta = match p {
                Parsed::Content(t) => json!({"content": t}),
                Parsed::Reasoning(t) => json!({"reasoning_content": t}),
                // A call is sent whole, in one chunk (name and complete arguments), which every OpenAI
                // client's delta accumulator handles.
                Parsed::ToolCall { index, id, name, arguments } => {
                    self.tool_calls += 1;
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                        "function": {"name": name, "arguments": arguments}}]})
                }
            };
            out.push_back(self.chunk(delta, None));
        }
    }
}

impl Chunker for ChatChunks {
    fn text(&mut self, t: &str, out: &mut VecDeque<String>) {
        let p = self.parser.push(t);
        self.pieces(p, out);
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<String>) {
        let p = self.parser.finish();
        self.pieces(p, out);
        let reason = if self.tool_calls > 0 { "tool_calls" } else { reason.as_str() };
        out.push_back(self.chunk(json!({}), Some(reason)));
        if self.include_usage {
            out.push_back(
                json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                       "model": self.model, "choices": [], "usage": usage_json(usage)})
                .to_string(),
            );
        }
    }
}

struct SseState<C> {
    generation: Generation,
    out: VecDeque<String>,
    done: bool,
    chunker: C,
}

fn sse<C: Chunker>(generation: Generation, first: String, chunker: C) -> Response {
    let st = SseState { generation, out: VecDeque::from([first]), done: false, chunker };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            match st.generation.next_event().await {
                Some(Event::Text(t)) => st.chunker.text(&t, &mut st.out),
                Some(Event::Finish { reason, usage }) => {
                    st.chunker.finish(reason, usage, &mut st.out);
                    st.out.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Event::Error(m)) => {
                    st.out.push_back(ApiError::internal(format!("generation failed: {m}")).body().to_string());
                    st.out.push_back("[DONE]".into());
                    st.done = true;
                }
                None => {
                    let e = ApiError::internal("the engine stopped before the generation finished");
                    st.out.push_back(e.body().to_string());
                    st.out.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

pub async fn completions(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = CompletionRequest::parse(&body_bytes(body)?)?;
    let ids = match &req.prompt {
        PromptField::Text(t) => encode(&s, t)?,
        PromptField::Texts(v) if v.len() == 1 => encode(&s, &v[0])?,
        PromptField::Texts(v) => {
            return Err(ApiError::bad_request("prompt", format!("one prompt per request, got {}", v.len())));
        }
        PromptField::Tokens(ids) => ids.clone(),
    };
    let generation = s.engine.submit(req.sampling.to_request(ids)?)?;
    let c = TextChunks {
        id: new_id("cmpl"),
        created: unix_now(),
        model: s.opts.model_name.clone(),
        include_usage: req.sampling.include_usage(),
    };
    if req.sampling.stream() {
        let first = c.chunk("", None);
        return Ok(sse(generation, first, c));
    }
    let done = generation.collect().await?;
    Ok(Json(json!({
        "id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
        "choices": [{"index": 0, "text": done.text, "logprobs": null, "finish_reason": done.reason.as_str()}],
        "usage": usage_json(done.usage),
    }))
    .into_response())
}

struct TextChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl TextChunks {
    fn chunk(&self, text: &str, finish: Option<&str>) -> String {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
        .to_string()
    }
}

impl Chunker for TextChunks {
    fn text(&mut self, t: &str, out: &mut VecDeque<String>) {
        out.push_back(self.chunk(t, None));
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage, out: &mut VecDeque<String>) {
        out.push_back(self.chunk("", Some(reason.as_str())));
        if self.include_usage {
            out.push_back(
                json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [], "usage": usage_json(usage)})
                .to_string(),
            );
        }
    }
}

pub async fn models(State(s): State<SharedState>) -> Json<Value> {
    let i = s.engine.info();
    Json(json!({"object": "list", "data": [{
        "id": s.opts.model_name, "object": "model", "created": s.started, "owned_by": "moestream",
        "meta": {"n_vocab": i.vocab_size, "n_ctx": i.ctx, "parallel": i.parallel},
    }]}))
}

pub async fn tokenize(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_body(&body_bytes(body)?)?;
    let _ = req.add_special;
    let tok = s.engine.tokenizer();
    let ids = tok.encode(&req.content).map_err(|e| ApiError::bad_request("content", e.to_string()))?;
    if !req.with_pieces {
        return Ok(Json(json!({"tokens": ids})));
    }
    let mut pieces = Vec::with_capacity(ids.len());
    for &id in &ids {
        let piece = tok.decode(&[id]).map_err(|e| ApiError::internal(e.to_string()))?;
        pieces.push(json!({"id": id, "piece": piece}));
    }
    Ok(Json(json!({"tokens": pieces})))
}

pub async fn detokenize(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_body(&body_bytes(body)?)?;
    let vocab = s.engine.info().vocab_size;
    if let Some((i, t)) = req.tokens.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
        return Err(ApiError::bad_request(
            format!("tokens[{i}]"),
            format!("token id {t} is outside the vocabulary of {vocab}"),
        ));
    }
    let content =
        s.engine.tokenizer().decode(&req.tokens).map_err(|e| ApiError::bad_request("tokens", e.to_string()))?;
    Ok(Json(json!({"content": content})))
}

pub async fn apply_template(
    State(s): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: ApplyTemplateRequest = parse_body(&body_bytes(body)?)?;
    validate_messages(&req.messages)?;
    let prompt =
        chat_prompt(&s, &req.messages, req.tools.as_ref(), req.chat_template_kwargs.as_ref(), req.enable_thinking)?;
    Ok(Json(json!({"prompt": prompt})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage() -> Usage {
        Usage { prompt_tokens: 5, completion_tokens: 9 }
    }

    /// A model output with reasoning and a tool call, split mid-tag across engine events.
    fn events() -> Vec<Event> {
        let text = "<think>\nlet me look\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \
                    \"Paris\"}}\n</tool_call>";
        let mut ev: Vec<Event> =
            text.as_bytes().chunks(7).map(|c| Event::Text(String::from_utf8_lossy(c).into())).collect();
        ev.push(Event::Finish { reason: FinishReason::Stop, usage: usage() });
        ev
    }

    fn chunks(tools: bool) -> ChatChunks {
        let parser = OutputParser::new(ParserConfig { starts_in_reasoning: false, reasoning: true, tool_calls: tools });
        ChatChunks::new("m".into(), parser, true)
    }

    #[tokio::test]
    async fn tool_calls_and_reasoning_in_the_json_answer() {
        let v = chat_json(Generation::scripted(events()), chunks(true)).await.unwrap();
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls");
        assert_eq!(c["message"]["reasoning_content"], "let me look");
        assert_eq!(c["message"]["content"], "");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        assert_eq!(v["usage"]["total_tokens"], 14);
        // Without tools offered, the block stays content and the finish reason is the engine's.
        let v = chat_json(Generation::scripted(events()), chunks(false)).await.unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["message"]["content"].as_str().unwrap().contains("<tool_call>"));
    }

    #[tokio::test]
    async fn tool_calls_and_reasoning_stream_as_deltas() {
        let resp = chat_sse(Generation::scripted(events()), chunks(true));
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["delta"]).collect();
        let reasoning: String = deltas.iter().filter_map(|d| d["reasoning_content"].as_str()).collect();
        assert_eq!(reasoning, "let me look");
        let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0][0]["index"], 0);
        assert_eq!(calls[0][0]["function"]["name"], "get_weather");
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, vec!["tool_calls"]);
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 9);
    }

    #[tokio::test]
    async fn engine_errors_end_the_stream_with_an_error_body() {
        let resp =
            chat_sse(Generation::scripted(vec![Event::Text("a".into()), Event::Error("disk".into())]), chunks(false));
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("\"type\":\"server_error\"") && text.contains("disk"), "{text}");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        let e = chat_json(Generation::scripted(vec![Event::Error("disk".into())]), chunks(false)).await.unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }
}
