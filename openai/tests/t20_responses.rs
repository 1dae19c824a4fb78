//! Response bodies, SSE chunks and error bodies have the shapes the OpenAI SDKs parse.

use pd_openai::{
    ApiError, ApiKind, FinishReason, ModelEntry, ResponseMeta, SSE_DONE, Usage, finish_chunk,
    model_object, models_list, response, role_chunk, text_chunk, usage_chunk,
};
use serde_json::{Value, json};

const META: ResponseMeta = ResponseMeta {
    id: "chatcmpl-1",
    created: 1_700_000_000,
    model: "llama",
};

const USAGE: Usage = Usage {
    prompt_tokens: 10,
    completion_tokens: 5,
};

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Checks the SSE framing of one event and returns its JSON.
#[track_caller]
fn event(sse: &str) -> Value {
    let json = sse
        .strip_prefix("data: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not one SSE data event: {sse:?}"));
    assert!(!json.contains('\n'), "an event's JSON is one line: {sse:?}");
    parse(json)
}

/// A chat completion: object, one choice with the assistant message, usage with the total.
#[test]
fn chat_response_shape() {
    let body = parse(&response(
        ApiKind::Chat,
        &META,
        "Hello!",
        FinishReason::Stop,
        USAGE,
    ));
    assert_eq!(
        body,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000u64,
            "model": "llama",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        })
    );
}

/// A text completion: object text_completion, choice text, finish reason length.
#[test]
fn completion_response_shape() {
    let meta = ResponseMeta {
        id: "cmpl-1",
        ..META
    };
    let body = parse(&response(
        ApiKind::Completions,
        &meta,
        "\"quoted\" ✓",
        FinishReason::Length,
        USAGE,
    ));
    assert_eq!(
        body,
        json!({
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1_700_000_000u64,
            "model": "llama",
            "choices": [{
                "text": "\"quoted\" ✓",
                "index": 0,
                "logprobs": null,
                "finish_reason": "length"
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        })
    );
}

/// A streamed chat response: role chunk, content chunks, finish chunk, [DONE]; no usage field.
#[test]
fn chat_stream_chunks() {
    let role = event(&role_chunk(&META, false));
    assert_eq!(role["object"], "chat.completion.chunk");
    assert_eq!(role["id"], "chatcmpl-1");
    assert_eq!(role["created"], 1_700_000_000u64);
    assert_eq!(
        role["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])
    );
    assert!(role.get("usage").is_none());

    let text = event(&text_chunk(ApiKind::Chat, &META, "Hel", false));
    assert_eq!(
        text["choices"],
        json!([{"index": 0, "delta": {"content": "Hel"}, "logprobs": null, "finish_reason": null}])
    );
    assert!(text.get("usage").is_none());

    let finish = event(&finish_chunk(
        ApiKind::Chat,
        &META,
        FinishReason::Stop,
        false,
    ));
    assert_eq!(
        finish["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(SSE_DONE, "data: [DONE]\n\n");
}

/// A streamed completions response: text chunks and a finish chunk with empty text.
#[test]
fn completion_stream_chunks() {
    let text = event(&text_chunk(ApiKind::Completions, &META, "lo\n", false));
    assert_eq!(text["object"], "text_completion");
    assert_eq!(
        text["choices"],
        json!([{"text": "lo\n", "index": 0, "logprobs": null, "finish_reason": null}])
    );
    let finish = event(&finish_chunk(
        ApiKind::Completions,
        &META,
        FinishReason::Length,
        false,
    ));
    assert_eq!(
        finish["choices"],
        json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}])
    );
}

/// With include_usage, every chunk carries "usage": null and a last chunk with empty choices
/// carries the usage.
#[test]
fn usage_chunk_and_null_usage() {
    for kind in [ApiKind::Chat, ApiKind::Completions] {
        let mut chunks = vec![
            text_chunk(kind, &META, "a", true),
            finish_chunk(kind, &META, FinishReason::Stop, true),
        ];
        if kind == ApiKind::Chat {
            chunks.push(role_chunk(&META, true));
        }
        for chunk in chunks {
            let chunk = event(&chunk);
            assert_eq!(chunk.get("usage"), Some(&Value::Null), "{chunk}");
        }
        let usage = event(&usage_chunk(kind, &META, USAGE));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        );
        assert_eq!(usage["id"], "chatcmpl-1");
    }
    assert_eq!(
        event(&usage_chunk(ApiKind::Chat, &META, USAGE))["object"],
        "chat.completion.chunk"
    );
}

/// Text that looks like SSE framing stays inside the JSON string.
#[test]
fn chunk_text_cannot_break_framing() {
    let chunk = text_chunk(ApiKind::Chat, &META, "a\n\ndata: [DONE]\n\n", false);
    assert_eq!(chunk.matches("\n\n").count(), 1);
    assert_eq!(
        event(&chunk)["choices"][0]["delta"]["content"],
        "a\n\ndata: [DONE]\n\n"
    );
}

/// GET /v1/models lists model objects.
#[test]
fn models() {
    let entries = [
        ModelEntry {
            id: "llama".into(),
            created: 1,
            owned_by: "pdagent".into(),
        },
        ModelEntry {
            id: "qwen".into(),
            created: 2,
            owned_by: "pdagent".into(),
        },
    ];
    assert_eq!(
        parse(&models_list(&entries)),
        json!({"object": "list", "data": [
            {"id": "llama", "object": "model", "created": 1, "owned_by": "pdagent"},
            {"id": "qwen", "object": "model", "created": 2, "owned_by": "pdagent"}
        ]})
    );
    assert_eq!(
        parse(&models_list(&[])),
        json!({"object": "list", "data": []})
    );
    assert_eq!(
        parse(&model_object(&entries[1])),
        json!({"id": "qwen", "object": "model", "created": 2, "owned_by": "pdagent"})
    );
}

/// Error bodies are exactly {"error": {message, type, param, code}}, nulls included.
#[test]
fn error_body_shape() {
    let error = ApiError::bad_request("bad \"x\"", Some("temperature"));
    assert_eq!(
        parse(&error.body()),
        json!({"error": {"message": "bad \"x\"", "type": "invalid_request_error", "param": "temperature", "code": null}})
    );
    let error = ApiError::internal("boom");
    assert_eq!(
        parse(&error.body()),
        json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}})
    );
    assert_eq!(event(&error.sse()), parse(&error.body()));
}

/// Each constructor has its status, type and code.
#[test]
fn error_constructors() {
    let cases: Vec<(ApiError, u16, &str, Option<&str>)> = vec![
        (
            ApiError::bad_request("m", None),
            400,
            "invalid_request_error",
            None,
        ),
        (
            ApiError::model_not_found("gpt-5"),
            404,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        (
            ApiError::not_found("GET /v1/engines"),
            404,
            "invalid_request_error",
            Some("unknown_url"),
        ),
        (
            ApiError::method_not_allowed("GET", "/v1/completions"),
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
        ),
        (
            ApiError::too_large(1 << 20),
            413,
            "invalid_request_error",
            Some("request_too_large"),
        ),
        (
            ApiError::unauthorized("no key"),
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        (
            ApiError::overloaded("busy", 3),
            429,
            "rate_limit_error",
            Some("overloaded"),
        ),
        (
            ApiError::unavailable("no engine", Some(5)),
            503,
            "service_unavailable",
            None,
        ),
        (
            ApiError::prompt_too_long(ApiKind::Chat, 9000, 8192),
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
        ),
        (ApiError::internal("x"), 500, "server_error", None),
        (ApiError::timeout("x"), 504, "server_error", Some("timeout")),
    ];
    for (error, status, kind, code) in cases {
        assert_eq!(error.status, status, "{error:?}");
        assert_eq!(error.kind, kind, "{error:?}");
        assert_eq!(error.code.as_deref(), code, "{error:?}");
        assert_eq!(parse(&error.body())["error"]["type"], kind);
    }
    let error = ApiError::model_not_found("gpt-5");
    assert_eq!(
        error.message,
        "The model `gpt-5` does not exist or you do not have access to it."
    );
    assert_eq!(ApiError::overloaded("busy", 3).retry_after_s, Some(3));
    assert_eq!(ApiError::unavailable("x", None).retry_after_s, None);
    assert!(
        ApiError::not_found("GET /v1/engines")
            .message
            .contains("GET /v1/engines")
    );
    let too_long = ApiError::prompt_too_long(ApiKind::Completions, 9000, 8192);
    assert_eq!(too_long.param.as_deref(), Some("prompt"));
    assert!(too_long.message.contains("8192") && too_long.message.contains("9000"));
    assert_eq!(
        ApiError::prompt_too_long(ApiKind::Chat, 9000, 8192)
            .param
            .as_deref(),
        Some("messages")
    );
}
