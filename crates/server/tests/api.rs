//! The router end to end on a tiny synthetic model: every error status with an OpenAI error body, SSE framing,
//! usage, stop strings, seed determinism, the utility routes, metrics, and cancellation on disconnect (over a
//! real loopback socket).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use moestream_engine::{Engine, EngineOptions, GenerationRequest, SamplingParams};
use moestream_format::TensorIndex;
use moestream_models::{ModelOptions, Qwen3Moe};
use moestream_server::{ServerOptions, router};
use moestream_synth::{Preset, SynthFormat, SynthOptions, synth};
use serde_json::{Value, json};
use tower::ServiceExt;

struct Api {
    app: Router,
    engine: Arc<Engine>,
    _dir: tempfile::TempDir,
}

fn api(opts: EngineOptions, server: ServerOptions) -> Api {
    api_with(opts, server, moestream_synth::SynthTokenizer::Synthetic)
}

fn api_with(opts: EngineOptions, server: ServerOptions, tokenizer: moestream_synth::SynthTokenizer) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    let mut o = SynthOptions::new(Preset::TinyQwen3Moe, SynthFormat::GgufQ8_0, &path);
    o.progress = false;
    o.tokenizer = tokenizer;
    synth(&o).expect("synth");
    let index = TensorIndex::open(&path).expect("index");
    let m = Qwen3Moe::load(&index, &ModelOptions { threads: 1, ..ModelOptions::default() }).expect("load");
    let t = moestream_chat::Tokenizer::from_index(&index).expect("tokenizer").expect("has one");
    let template = moestream_chat::ChatTemplate::from_index(&index).expect("template");
    assert!(template.is_some(), "synth writes a chat template");
    let engine = Arc::new(Engine::start(m, t, opts).expect("engine"));
    Api { app: router(engine.clone(), template, server), engine, _dir: dir }
}

fn default_api() -> Api {
    api(
        EngineOptions { ctx: 256, ..Default::default() },
        ServerOptions { model_name: "tiny".into(), ..Default::default() },
    )
}

async fn call(app: &Router, method: &str, path: &str, body: &str, key: Option<&str>) -> (StatusCode, String) {
    let mut b = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let resp = app.clone().oneshot(b.body(Body::from(body.to_string())).expect("request")).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body");
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8 body"))
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, text) = call(app, "POST", path, &body.to_string(), None).await;
    (s, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
}

/// The error object of an OpenAI error body (and a check that it has every field).
fn error_of(v: &Value) -> &Value {
    let e = &v["error"];
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error body lacks `{k}`: {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    e
}

/// The `data:` payloads of an SSE body, checking the framing (every event is one `data:` line and a blank line).
fn sse_data(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let lines: Vec<&str> = block.lines().filter(|l| !l.starts_with(':')).collect();
        if lines.is_empty() {
            continue; // keep-alive comment
        }
        assert_eq!(lines.len(), 1, "one data line per event: {block:?}");
        out.push(lines[0].strip_prefix("data: ").unwrap_or_else(|| panic!("not a data line: {block:?}")).to_string());
    }
    out
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": "whatever", "messages": [{"role": "user", "content": "hello world"}],
                       "temperature": 0, "max_tokens": 12});
    for (k, v) in extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

#[tokio::test]
async fn error_statuses_have_openai_bodies() {
    let a = api(
        EngineOptions { ctx: 64, ..Default::default() },
        ServerOptions { api_key: Some("sekret".into()), max_body_bytes: 4096, ..Default::default() },
    );
    let key = Some("sekret");
    // 401 without or with a wrong key; /health stays open.
    for k in [None, Some("wrong")] {
        let (s, body) = call(&a.app, "POST", "/v1/chat/completions", &chat(json!({})).to_string(), k).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(error_of(&serde_json::from_str(&body).unwrap())["code"], "invalid_api_key");
    }
    let (s, _) = call(&a.app, "GET", "/health", "", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&a.app, "GET", "/metrics", "", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // 404 as JSON.
    let (s, body) = call(&a.app, "GET", "/v1/nope", "", key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    error_of(&serde_json::from_str(&body).unwrap());
    // 400: bad JSON, wrong shapes (naming the field), n > 1, empty messages, prompt too long.
    let cases: Vec<(String, Option<&str>)> = vec![
        ("{oops".into(), None),
        (json!({"messages": [{"role": "user", "content": 5}]}).to_string(), Some("messages[0].content")),
        (json!({"messages": [{"role": "pirate", "content": "x"}]}).to_string(), Some("messages[0].role")),
        (chat(json!({"temperature": "warm"})).to_string(), Some("temperature")),
        (chat(json!({"n": 3})).to_string(), Some("n")),
        (chat(json!({"top_p": 7})).to_string(), Some("top_p")),
        (json!({"messages": []}).to_string(), Some("messages")),
        (chat(json!({"messages": [{"role": "user", "content": "word ".repeat(200)}]})).to_string(), Some("messages")),
    ];
    for (body, param) in cases {
        let (s, resp) = call(&a.app, "POST", "/v1/chat/completions", &body, key).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {resp}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        let e = error_of(&v);
        assert_eq!(e["type"], "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{resp}");
        }
    }
    // 413 as JSON.
    let big = chat(json!({"messages": [{"role": "user", "content": "x".repeat(10_000)}]})).to_string();
    let (s, body) = call(&a.app, "POST", "/v1/chat/completions", &big, key).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    error_of(&serde_json::from_str(&body).unwrap());
}

#[tokio::test]
async fn full_queue_is_429() {
    let a =
        api(EngineOptions { ctx: 4096, parallel: 1, max_queued: 0, ..Default::default() }, ServerOptions::default());
    let long = GenerationRequest {
        prompt: vec![1, 2, 3],
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        max_tokens: Some(4000),
        stop: vec![],
        ignore_eos: true,
    };
    let _busy = a.engine.submit(long).expect("first request takes the only session");
    let (s, v) = post(&a.app, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(error_of(&v)["code"], "queue_full");
}

#[tokio::test]
async fn chat_stream_and_json_agree() {
    let a = default_api();
    let (s, v) = post(&a.app, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let finish = choice["finish_reason"].as_str().unwrap().to_string();
    assert!(finish == "stop" || finish == "length");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(u["completion_tokens"].as_u64().unwrap() <= 12);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );

    let body = chat(json!({"stream": true, "stream_options": {"include_usage": true}})).to_string();
    let (s, sse) = call(&a.app, "POST", "/v1/chat/completions", &body, None).await;
    assert_eq!(s, StatusCode::OK);
    let data = sse_data(&sse);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{sse}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "tiny");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], v["usage"]);
    let fin = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(fin["finish_reason"], finish.as_str());
    assert_eq!(fin["delta"], json!({}));
    let mut streamed = String::new();
    for c in &chunks[1..chunks.len() - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        streamed.push_str(c["choices"][0]["delta"]["content"].as_str().expect("content delta"));
    }
    assert_eq!(streamed, text);

    // Without include_usage: no usage chunk.
    let (_, sse) = call(&a.app, "POST", "/v1/chat/completions", &chat(json!({"stream": true})).to_string(), None).await;
    let data = sse_data(&sse);
    let before_done: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(before_done["choices"][0]["finish_reason"].is_string());
}

#[tokio::test]
async fn stop_strings_and_seeds() {
    let a = default_api();
    let content = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let (_, v) = post(&a.app, "/v1/chat/completions", chat(json!({"max_tokens": 24}))).await;
    let full = content(&v);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "greedy output too short: {full:?}");
    let stop: String = chars[2..4].iter().collect();
    let (_, v) = post(&a.app, "/v1/chat/completions", chat(json!({"max_tokens": 24, "stop": stop}))).await;
    assert_eq!(content(&v), full[..full.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let sampled = |seed: u64| chat(json!({"temperature": 1.5, "seed": seed, "max_tokens": 24}));
    let (_, a1) = post(&a.app, "/v1/chat/completions", sampled(11)).await;
    let (_, a2) = post(&a.app, "/v1/chat/completions", sampled(11)).await;
    let (_, b) = post(&a.app, "/v1/chat/completions", sampled(12)).await;
    assert_eq!(content(&a1), content(&a2));
    assert_ne!(content(&a1), content(&b));
}

#[tokio::test]
async fn completions_tokenize_and_friends() {
    let a = default_api();
    let (s, v) = post(&a.app, "/v1/completions", json!({"prompt": "hello", "max_tokens": 8, "temperature": 0})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let body = json!({"prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": true}).to_string();
    let (_, sse) = call(&a.app, "POST", "/v1/completions", &body, None).await;
    let data = sse_data(&sse);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);
    // Token-id prompts and the prompt-list shape.
    let (s, _) = post(&a.app, "/v1/completions", json!({"prompt": [1, 2, 3], "max_tokens": 2})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = post(&a.app, "/v1/completions", json!({"prompt": ["a", "b"], "max_tokens": 2})).await;
    assert_eq!((s, error_of(&v)["param"].clone()), (StatusCode::BAD_REQUEST, json!("prompt")));

    let (_, t) = post(&a.app, "/tokenize", json!({"content": "hello world"})).await;
    let ids = t["tokens"].clone();
    assert!(ids.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_u64)), "{t}");
    let (_, d) = post(&a.app, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(d["content"], "hello world");
    let (_, p) = post(&a.app, "/tokenize", json!({"content": "hello world", "with_pieces": true})).await;
    let pieces: String =
        p["tokens"].as_array().unwrap().iter().map(|x| x["piece"].as_str().unwrap().to_string()).collect();
    assert_eq!(pieces, "hello world");
    let (s, v) = post(&a.app, "/detokenize", json!({"tokens": [1, 99999999]})).await;
    assert_eq!((s, error_of(&v)["param"].clone()), (StatusCode::BAD_REQUEST, json!("tokens[1]")));
    // The synthetic tokenizer's template is plain ChatML.
    let (_, t) = post(&a.app, "/apply-template", json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(t["prompt"], "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    let (s, m) = call(&a.app, "GET", "/v1/models", "", None).await;
    assert_eq!(s, StatusCode::OK);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["data"][0]["id"], "tiny");
    let (s, metrics) = call(&a.app, "GET", "/metrics", "", None).await;
    assert_eq!(s, StatusCode::OK);
    for name in [
        "moestream_requests_total 3",
        "moestream_generated_tokens_total",
        "moestream_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3",
        "moestream_requests_queued 0",
        "moestream_expert_cache_hits_total",
        "moestream_expert_read_latency_seconds{quantile=\"0.99\"}",
        "moestream_decode_tokens_per_second",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_generation() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = api(EngineOptions { ctx: 4096, parallel: 1, ..Default::default() }, ServerOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(moestream_server::serve(listener, a.app.clone()));
    let body = chat(json!({"stream": true, "max_tokens": 4000, "ignore_eos": true})).to_string();
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.expect("write");
    // Read until a few content chunks have arrived, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < 4 {
        let n = tokio::time::timeout(Duration::from_secs(30), sock.read(&mut buf))
            .await
            .expect("read timeout")
            .expect("read");
        assert!(n > 0, "server closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = a.engine.metrics();
        if m.active == 0 && m.requests_cancelled == 1 {
            assert!(m.generated_tokens < 4000, "{m:?}");
            break;
        }
        assert!(Instant::now() < deadline, "generation not cancelled: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still serving.
    let (s, _) = post(&a.app, "/v1/chat/completions", chat(json!({"max_tokens": 2}))).await;
    assert_eq!(s, StatusCode::OK);
    server.abort();
}

#[tokio::test]
async fn qwen3_template_renders_tools_tool_calls_and_thinking() {
    let a = api_with(
        EngineOptions { ctx: 512, ..Default::default() },
        ServerOptions::default(),
        moestream_synth::SynthTokenizer::Qwen3,
    );
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let messages = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]);
    let (s, t) =
        post(&a.app, "/apply-template", json!({"messages": messages, "tools": tools, "enable_thinking": false})).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let p = t["prompt"].as_str().unwrap();
    assert!(p.starts_with("<|im_start|>system\n# Tools"), "{p}");
    assert!(p.contains("\"name\": \"get_weather\""), "{p}");
    assert!(
        p.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        "{p}"
    );
    assert!(p.contains("<tool_response>\nsunny\n</tool_response>"), "{p}");
    assert!(p.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{p}");
    // chat_template_kwargs wins over the top-level field.
    let (_, t) = post(
        &a.app,
        "/apply-template",
        json!({"messages": [{"role": "user", "content": "x"}], "enable_thinking": false,
               "chat_template_kwargs": {"enable_thinking": true}}),
    )
    .await;
    assert!(t["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"), "{t}");
    let (s, v) = post(
        &a.app,
        "/v1/chat/completions",
        json!({"messages": messages, "tools": tools, "tool_choice": "auto", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 50);
}
