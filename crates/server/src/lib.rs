//! The HTTP server: axum routes for the OpenAI API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`),
//! the llama-server utility routes (`/tokenize`, `/detokenize`, `/apply-template`, `/health`), Prometheus
//! `/metrics`, bearer auth, CORS and the body limit.
//!
//! This crate owns every JSON wire type and all of SSE; it turns requests into engine [`GenerationRequest`]s
//! and engine events into OpenAI chunks. It never touches weights or runs the model: the engine does that on its
//! own thread, and a client that goes away drops its [`moestream_engine::Generation`], which cancels it.
//!
//! [`GenerationRequest`]: moestream_engine::GenerationRequest

pub mod error;
pub mod metrics;
pub mod openai;
pub mod prompt;
pub mod wire;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use moestream_chat::ChatTemplate;
use moestream_engine::Engine;
use serde_json::json;

pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id reported by `/v1/models` and in every response.
    pub model_name: String,
    /// When set, every route but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Allow any origin (browser clients).
    pub cors: bool,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { model_name: "moestream".into(), api_key: None, cors: false, max_body_bytes: 8 << 20 }
    }
}

pub struct AppState {
    pub engine: Arc<Engine>,
    /// The model's chat template; `None` falls back to plain ChatML ([`prompt::chatml`]).
    pub template: Option<ChatTemplate>,
    pub opts: ServerOptions,
    /// Unix seconds at start (the `created` of `/v1/models`).
    pub started: u64,
}

pub type SharedState = Arc<AppState>;

/// The whole API as a router (tests drive it with `oneshot`; `serve` binds it). `template` is the model's chat
/// template (`ChatTemplate::from_index`).
pub fn router(engine: Arc<Engine>, template: Option<ChatTemplate>, opts: ServerOptions) -> Router {
    let limit = opts.max_body_bytes;
    let cors = opts.cors;
    let state = Arc::new(AppState { engine, template, opts, started: unix_now() });
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(openai::tokenize))
        .route("/detokenize", post(openai::detokenize))
        .route("/apply-template", post(openai::apply_template))
        .route("/metrics", get(metrics::render))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    let mut app = Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // axum's own limit (rather than tower-http's) so that a 413 comes back as an OpenAI error body from
        // the `Bytes` extractor's rejection.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state);
    if cors {
        app = app.layer(tower_http::cors::CorsLayer::permissive());
    }
    app
}

/// How long in-flight requests may run on after Ctrl-C or SIGTERM before the server stops anyway (a streaming
/// generation can last minutes).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serve `router` on `listener` until Ctrl-C or SIGTERM; then stop accepting, and give in-flight requests
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let mut rx = rx;
    tokio::select! {
        r = server => r,
        _ = async move {
            let _ = rx.wait_for(|&stop| stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(req.uri().path())
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        code: Some("method_not_allowed"),
        ..ApiError::bad_request("", format!("{} is not allowed on {}", req.method(), req.uri().path()))
    }
    .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

async fn require_api_key(State(s): State<SharedState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Comparison whose time does not depend on where the first difference is (key guessing by timing).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A body extractor whose failures (too large, unreadable) are OpenAI errors.
pub(crate) fn body_bytes(b: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's limit".to_string()
        } else {
            e.body_text()
        };
        ApiError { code: Some("request_rejected"), ..ApiError::bad_request("", msg) }.with_status(status)
    })
}
