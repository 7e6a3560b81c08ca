//! OpenAI-shaped errors: every failure the server returns is `{"error": {"message", "type", "param", "code"}}`
//! with the HTTP status the OpenAI clients map to their exception classes (400 → BadRequestError, 401 →
//! AuthenticationError, 404, 413, 429 → RateLimitError, 500).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use moestream_engine::EngineError;
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400, naming the request field at fault.
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param: String = param.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then_some(param),
            code: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided: pass the server's --api-key as `Authorization: Bearer KEY`".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for {path}"),
            kind: "not_found_error",
            param: None,
            code: Some("not_found"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::QueueFull { .. } => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message,
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
            },
            EngineError::InvalidRequest { param, message } => ApiError::bad_request(param, message),
            EngineError::ContextLength { .. } => {
                ApiError { code: Some("context_length_exceeded"), ..ApiError::bad_request("messages", message) }
            }
            EngineError::Stopped => ApiError::internal(message).with_status(StatusCode::SERVICE_UNAVAILABLE),
            EngineError::Config(_) | EngineError::Generation(_) => ApiError::internal(message),
        }
    }
}
