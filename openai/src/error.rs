//! Error bodies: every failure a client sees, with OpenAI's status codes and body shape.
//!
//! The official SDKs pick their exception class from the status code and retry 429 and 5xx
//! responses, honouring a `Retry-After` header; `type` and `code` are for people and logs.

use serde::Serialize;

use crate::ApiKind;

/// A failed request, as the client will see it.
///
/// `retry_after_s` is not part of the body: the caller turns it into a `Retry-After` header.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status} {kind}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// The body's `type`.
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    pub retry_after_s: Option<u32>,
}

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    fn with_param(mut self, param: Option<&str>) -> Self {
        self.param = param.map(str::to_owned);
        self
    }

    fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    /// 400: the request is malformed or asks for something this server does not do; `param`
    /// names the offending field.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(400, INVALID_REQUEST, message).with_param(param)
    }

    /// 404 for a model this cluster does not serve, worded as OpenAI words it.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            INVALID_REQUEST,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param(Some("model"))
        .with_code("model_not_found")
    }

    /// 404 for a route that does not exist; `path` is what the client asked for, e.g.
    /// `"GET /v1/engines"`.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            INVALID_REQUEST,
            format!("Unknown request URL: {path}. Check the URL for typos; this server serves /v1/completions, /v1/chat/completions and /v1/models."),
        )
        .with_code("unknown_url")
    }

    /// 405 for a known route asked with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            INVALID_REQUEST,
            format!("Invalid method for URL ({method} {path})."),
        )
        .with_code("method_not_allowed")
    }

    /// 413 for a body over the caller's size bound.
    pub fn too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            INVALID_REQUEST,
            format!("The request body is larger than this server's limit of {limit_bytes} bytes."),
        )
        .with_code("request_too_large")
    }

    /// 408 for a request body that did not arrive within the server's bound.
    pub fn body_timeout(limit_ms: u64) -> Self {
        Self::new(
            408,
            INVALID_REQUEST,
            format!("The request body did not arrive within {limit_ms} ms."),
        )
        .with_code("request_timeout")
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, INVALID_REQUEST, message).with_code("invalid_api_key")
    }

    /// 429: the cluster is saturated; the client should come back after `retry_after_s`.
    pub fn overloaded(message: impl Into<String>, retry_after_s: u32) -> Self {
        let mut error = Self::new(429, "rate_limit_error", message).with_code("overloaded");
        error.retry_after_s = Some(retry_after_s);
        error
    }

    /// 503: nothing can serve the request right now (no engine ready, the cluster has no
    /// leader, the node is draining).
    pub fn unavailable(message: impl Into<String>, retry_after_s: Option<u32>) -> Self {
        let mut error = Self::new(503, "service_unavailable", message);
        error.retry_after_s = retry_after_s;
        error
    }

    /// 400: the prompt alone does not fit the model's context. `param` is `prompt` or
    /// `messages` following the endpoint.
    pub fn prompt_too_long(kind: ApiKind, prompt_tokens: u32, context_tokens: u32) -> Self {
        let param = match kind {
            ApiKind::Completions => "prompt",
            ApiKind::Chat => "messages",
        };
        Self::bad_request(
            format!(
                "This model's maximum context length is {context_tokens} tokens, however your {param} has {prompt_tokens} tokens. Please reduce the length of the {param}."
            ),
            Some(param),
        )
        .with_code("context_length_exceeded")
    }

    /// 500: a fault on this side (an engine crashed, a template is broken).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, SERVER_ERROR, message)
    }

    /// 504: the request did not complete within the server's deadline.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, SERVER_ERROR, message).with_code("timeout")
    }

    /// `{"error": {"message", "type", "param", "code"}}`: exactly OpenAI's shape, with `param`
    /// and `code` present as `null` when absent.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            r#type: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        let body = Body {
            error: Inner {
                message: &self.message,
                r#type: self.kind,
                param: self.param.as_deref(),
                code: self.code.as_deref(),
            },
        };
        serde_json::to_string(&body).expect("an error body always serializes")
    }

    /// One SSE event carrying the same error object, for a stream that fails after it started
    /// (the status line has already gone out as 200).
    pub fn sse(&self) -> String {
        crate::response::sse_event(&self.body())
    }
}
