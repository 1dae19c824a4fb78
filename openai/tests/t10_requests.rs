//! Request parsing: what real clients send is accepted, and every refusal is a 400 that names
//! the field.

use pd_openai::{
    ApiError, ApiKind, ChatMessage, Generation, Limits, PromptInput, parse_chat, parse_completion,
};
use serde_json::{Value, json};

const LIMITS: Limits = Limits {
    max_tokens_max: 4096,
};

fn completion(body: Value) -> Result<Generation, ApiError> {
    parse_completion(body.to_string().as_bytes(), &LIMITS)
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn chat(body: Value) -> Result<Generation, ApiError> {
    parse_chat(body.to_string().as_bytes(), &LIMITS)
}

/// A completions body with `extra` merged in.
fn completion_with(extra: Value) -> Result<Generation, ApiError> {
    let mut body = json!({"model": "m", "prompt": "Hello"});
    merge(&mut body, extra);
    completion(body)
}

/// A chat body with `extra` merged in.
fn chat_with(extra: Value) -> Result<Generation, ApiError> {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
    merge(&mut body, extra);
    chat(body)
}

fn merge(body: &mut Value, extra: Value) {
    let body = body.as_object_mut().unwrap();
    for (key, value) in extra.as_object().unwrap() {
        body.insert(key.clone(), value.clone());
    }
}

/// Asserts a 400 invalid_request_error naming `param`.
#[track_caller]
fn assert_400(result: Result<Generation, ApiError>, param: Option<&str>) -> ApiError {
    let error = result.expect_err("the request should be refused");
    assert_eq!(error.status, 400, "{error:?}");
    assert_eq!(error.kind, "invalid_request_error");
    assert_eq!(error.param.as_deref(), param, "{error:?}");
    error
}

/// Both endpoints, for the rules they share.
fn both(extra: Value) -> [Result<Generation, ApiError>; 2] {
    [completion_with(extra.clone()), chat_with(extra)]
}

/// A minimal request gets the documented defaults.
#[test]
fn defaults() {
    let generation = completion(json!({"model": "m", "prompt": "Hello"})).unwrap();
    assert_eq!(
        generation,
        Generation {
            kind: ApiKind::Completions,
            model: "m".into(),
            prompt: PromptInput::Text("Hello".into()),
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            stop: vec![],
            stream: false,
            include_usage: false,
            user: None,
            ignore_eos: false,
        }
    );
}

/// `ignore_eos` (vLLM's extension) is taken; a wrong type names the field.
#[test]
fn ignore_eos_is_taken() {
    let g = completion(json!({"model": "m", "prompt": "Hi", "ignore_eos": true})).unwrap();
    assert!(g.ignore_eos);
    let e = completion(json!({"model": "m", "prompt": "Hi", "ignore_eos": "yes"})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("ignore_eos"));
}

/// What the Python SDK and LangChain send, with nulls and unknown fields, is accepted.
#[test]
fn typical_sdk_request_is_accepted() {
    let generation = chat(json!({
        "model": "llama",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "alice"}
        ],
        "max_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "stream": true,
        "stream_options": {"include_usage": true},
        "n": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "logit_bias": {},
        "logprobs": false,
        "user": "u-1",
        "tools": null,
        "tool_choice": null,
        "response_format": {"type": "text"},
        "parallel_tool_calls": true,
        "metadata": {"a": "b"},
        "store": false
    }))
    .unwrap();
    assert_eq!(generation.kind, ApiKind::Chat);
    assert_eq!(generation.model, "llama");
    assert_eq!(
        generation.prompt,
        PromptInput::Chat(vec![msg("system", "Be brief."), msg("user", "Hi")])
    );
    assert_eq!(generation.max_tokens, Some(64));
    assert_eq!(generation.temperature, 0.7);
    assert_eq!(generation.top_p, 0.9);
    assert_eq!(generation.seed, Some(7));
    assert_eq!(generation.stop, vec!["\n\n".to_string()]);
    assert!(generation.stream && generation.include_usage);
    assert_eq!(generation.user.as_deref(), Some("u-1"));
}

/// Null for any optional field reads as absent.
#[test]
fn null_is_absent() {
    let nulls = json!({
        "max_tokens": null, "temperature": null, "top_p": null, "seed": null, "stop": null,
        "stream": null, "stream_options": null, "n": null, "logprobs": null, "user": null,
        "frequency_penalty": null, "presence_penalty": null, "logit_bias": null
    });
    let completion_generation = completion_with(nulls.clone()).unwrap();
    assert_eq!(
        completion_generation,
        completion(json!({"model": "m", "prompt": "Hello"})).unwrap()
    );
    let mut chat_nulls = nulls;
    merge(
        &mut chat_nulls,
        json!({"max_completion_tokens": null, "tools": null, "response_format": null, "top_logprobs": null}),
    );
    assert!(chat_with(chat_nulls).is_ok());
    assert!(
        completion_with(json!({"echo": null, "best_of": null, "suffix": null, "logprobs": 0}))
            .is_ok()
    );
}

/// A body that is not JSON says where it broke; a body that is not an object is refused.
#[test]
fn malformed_bodies() {
    let error = parse_completion(b"{\"model\": \"m\",\n \"prompt\": }", &LIMITS).unwrap_err();
    assert_eq!(error.status, 400);
    assert!(error.message.contains("line 2 column"), "{}", error.message);
    for body in [&b"[1, 2]"[..], b"\"text\"", b"null", b"", b"\xff\xfe"] {
        let error = parse_completion(body, &LIMITS).unwrap_err();
        assert_eq!(error.status, 400, "{body:?}");
        assert_eq!(error.param, None);
    }
}

/// The model is required and must be a non-empty string.
#[test]
fn model_is_required() {
    assert_400(completion(json!({"prompt": "x"})), Some("model"));
    assert_400(
        completion(json!({"model": null, "prompt": "x"})),
        Some("model"),
    );
    assert_400(
        completion(json!({"model": "", "prompt": "x"})),
        Some("model"),
    );
    assert_400(
        completion(json!({"model": 3, "prompt": "x"})),
        Some("model"),
    );
    assert_400(
        chat(json!({"messages": [{"role": "user", "content": "x"}]})),
        Some("model"),
    );
}

/// Every accepted shape of a completions prompt.
#[test]
fn prompt_shapes() {
    let prompt = |p: Value| completion(json!({"model": "m", "prompt": p})).map(|g| g.prompt);
    assert_eq!(prompt(json!("a")).unwrap(), PromptInput::Text("a".into()));
    assert_eq!(prompt(json!("")).unwrap(), PromptInput::Text("".into()));
    assert_eq!(prompt(json!(["a"])).unwrap(), PromptInput::Text("a".into()));
    assert_eq!(
        prompt(json!([1, 2, 4294967295u64])).unwrap(),
        PromptInput::Tokens(vec![1, 2, u32::MAX])
    );
    assert_eq!(
        prompt(json!([[5, 6]])).unwrap(),
        PromptInput::Tokens(vec![5, 6])
    );
}

/// Several prompts, empty token lists and odd shapes are refused on `prompt`.
#[test]
fn prompt_refusals() {
    let prompt = |p: Value| completion(json!({"model": "m", "prompt": p}));
    let several = assert_400(prompt(json!(["a", "b"])), Some("prompt"));
    assert!(
        several.message.contains("Only one prompt"),
        "{}",
        several.message
    );
    assert_400(prompt(json!([[1], [2]])), Some("prompt"));
    assert_400(prompt(json!([])), Some("prompt"));
    assert_400(prompt(json!([[]])), Some("prompt"));
    assert_400(prompt(json!([1, -2])), Some("prompt"));
    assert_400(prompt(json!([1, 4294967296u64])), Some("prompt"));
    assert_400(prompt(json!([1.5])), Some("prompt"));
    assert_400(prompt(json!([1, "a"])), Some("prompt"));
    let mixed = assert_400(prompt(json!(["a", 1])), Some("prompt"));
    assert!(
        mixed.message.starts_with("prompt must be"),
        "{}",
        mixed.message
    );
    assert_400(prompt(json!([{"a": 1}])), Some("prompt"));
    assert_400(prompt(json!(3)), Some("prompt"));
    assert_400(completion(json!({"model": "m"})), Some("prompt"));
}

/// max_tokens: an integer from 1 to the server's bound.
#[test]
fn max_tokens_bounds() {
    for r in both(json!({"max_tokens": 4096})) {
        assert_eq!(r.unwrap().max_tokens, Some(4096));
    }
    for bad in [
        json!(0),
        json!(-1),
        json!(4097),
        json!(1e3),
        json!("10"),
        json!(u64::MAX),
    ] {
        for r in both(json!({ "max_tokens": bad })) {
            assert_400(r, Some("max_tokens"));
        }
    }
}

/// Chat's max_completion_tokens is checked the same way and wins over max_tokens.
#[test]
fn max_completion_tokens_wins() {
    let g = chat_with(json!({"max_tokens": 10, "max_completion_tokens": 20})).unwrap();
    assert_eq!(g.max_tokens, Some(20));
    let g = chat_with(json!({"max_tokens": 10, "max_completion_tokens": null})).unwrap();
    assert_eq!(g.max_tokens, Some(10));
    assert_400(
        chat_with(json!({"max_completion_tokens": 0})),
        Some("max_completion_tokens"),
    );
    assert_400(
        chat_with(json!({"max_completion_tokens": 5000})),
        Some("max_completion_tokens"),
    );
}

/// temperature in [0, 2], top_p in (0, 1], both numbers.
#[test]
fn sampling_ranges() {
    for (field, ok, bad) in [
        (
            "temperature",
            vec![json!(0), json!(2), json!(1.3)],
            vec![json!(-0.1), json!(2.01), json!("hot"), json!(true)],
        ),
        (
            "top_p",
            vec![json!(1), json!(0.01)],
            vec![json!(0), json!(1.5), json!(-1), json!("x")],
        ),
    ] {
        for value in ok {
            for r in both(json!({ field: value })) {
                r.unwrap();
            }
        }
        for value in bad {
            for r in both(json!({ field: value })) {
                assert_400(r, Some(field));
            }
        }
    }
    let g = completion_with(json!({"temperature": 0})).unwrap();
    assert_eq!(g.temperature, 0.0);
}

/// seed: any 64-bit integer; a negative one is taken bit for bit.
#[test]
fn seed() {
    assert_eq!(
        completion_with(json!({"seed": -1})).unwrap().seed,
        Some(u64::MAX)
    );
    assert_eq!(
        completion_with(json!({"seed": u64::MAX})).unwrap().seed,
        Some(u64::MAX)
    );
    assert_400(completion_with(json!({"seed": 1.5})), Some("seed"));
    assert_400(completion_with(json!({"seed": "1"})), Some("seed"));
}

/// stop: a string or up to four non-empty strings.
#[test]
fn stop_sequences() {
    assert_eq!(
        completion_with(json!({"stop": "\n"})).unwrap().stop,
        vec!["\n"]
    );
    assert_eq!(
        chat_with(json!({"stop": ["a", "b", "c", "d"]}))
            .unwrap()
            .stop,
        vec!["a", "b", "c", "d"]
    );
    assert!(
        completion_with(json!({"stop": []}))
            .unwrap()
            .stop
            .is_empty()
    );
    for bad in [
        json!(["a", "b", "c", "d", "e"]),
        json!(""),
        json!(["a", ""]),
        json!(3),
        json!([1]),
    ] {
        for r in both(json!({ "stop": bad })) {
            assert_400(r, Some("stop"));
        }
    }
}

/// stream_options is only allowed with stream; include_usage only counts when streaming.
#[test]
fn stream_options() {
    for r in both(json!({"stream": true, "stream_options": {"include_usage": true}})) {
        let g = r.unwrap();
        assert!(g.stream && g.include_usage);
    }
    for r in both(json!({"stream": true, "stream_options": {}})) {
        let g = r.unwrap();
        assert!(g.stream && !g.include_usage);
    }
    for r in both(json!({"stream": false, "stream_options": {"include_usage": true}})) {
        assert_400(r, Some("stream_options"));
    }
    for r in both(json!({"stream_options": {"include_usage": true}})) {
        assert_400(r, Some("stream_options"));
    }
    for r in both(json!({"stream": true, "stream_options": true})) {
        assert_400(r, Some("stream_options"));
    }
    for r in both(json!({"stream": true, "stream_options": {"include_usage": "yes"}})) {
        assert_400(r, Some("stream_options.include_usage"));
    }
    for r in both(json!({"stream": "true"})) {
        assert_400(r, Some("stream"));
    }
}

/// Features this engine lacks are refused unless the request asks for the neutral value.
#[test]
fn unsupported_features_shared() {
    for (field, neutral, refused) in [
        ("n", json!(1), vec![json!(2), json!(0), json!("1")]),
        (
            "frequency_penalty",
            json!(0),
            vec![json!(0.5), json!(-1), json!("x")],
        ),
        ("presence_penalty", json!(0.0), vec![json!(1)]),
        (
            "logit_bias",
            json!({}),
            vec![json!({"50256": -100}), json!([])],
        ),
        ("logprobs", json!(false), vec![json!(true), json!(5)]),
    ] {
        for r in both(json!({ field: neutral })) {
            r.unwrap();
        }
        for value in refused {
            for r in both(json!({ field: value })) {
                assert_400(r, Some(field));
            }
        }
    }
    let error = assert_400(
        completion_with(json!({"frequency_penalty": 0.5})),
        Some("frequency_penalty"),
    );
    assert!(error.message.contains("not supported by this engine"));
}

/// Completions-only features: echo, best_of, suffix.
#[test]
fn unsupported_features_completions() {
    completion_with(json!({"echo": false, "best_of": 1, "suffix": ""})).unwrap();
    assert_400(completion_with(json!({"echo": true})), Some("echo"));
    assert_400(completion_with(json!({"best_of": 2})), Some("best_of"));
    assert_400(completion_with(json!({"suffix": "end"})), Some("suffix"));
}

/// Chat-only features: tools, tool_choice, functions, response_format other than text.
#[test]
fn unsupported_features_chat() {
    chat_with(json!({"tools": [], "tool_choice": "none"})).unwrap();
    chat_with(json!({"tool_choice": "auto"})).unwrap();
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    assert_400(chat_with(json!({ "tools": tool })), Some("tools"));
    assert_400(
        chat_with(json!({"tool_choice": "required"})),
        Some("tool_choice"),
    );
    assert_400(
        chat_with(json!({"tool_choice": {"type": "function", "function": {"name": "f"}}})),
        Some("tool_choice"),
    );
    assert_400(
        chat_with(json!({"functions": [{"name": "f"}]})),
        Some("functions"),
    );
    for format in [
        json!({"type": "json_object"}),
        json!({"type": "json_schema", "json_schema": {}}),
        json!("text"),
    ] {
        assert_400(
            chat_with(json!({ "response_format": format })),
            Some("response_format"),
        );
    }
    assert_400(chat_with(json!({"top_logprobs": 3})), Some("top_logprobs"));
}

/// Chat messages: roles, string or text-part content, null content for the assistant.
#[test]
fn chat_messages_accepted() {
    let g = chat(json!({"model": "m", "messages": [
        {"role": "developer", "content": "D"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": null, "tool_calls": []},
        {"role": "assistant"},
        {"role": "tool", "content": "42", "tool_call_id": "t"},
        {"role": "user", "content": []}
    ]}))
    .unwrap();
    assert_eq!(
        g.prompt,
        PromptInput::Chat(vec![
            msg("system", "D"),
            msg("user", "ab"),
            msg("assistant", ""),
            msg("assistant", ""),
            msg("tool", "42"),
            msg("user", ""),
        ])
    );
}

/// Every malformed message is a 400 on `messages` that says which one.
#[test]
fn chat_messages_refused() {
    let messages = |m: Value| chat(json!({"model": "m", "messages": m}));
    assert_400(chat(json!({"model": "m"})), Some("messages"));
    assert_400(messages(json!([])), Some("messages"));
    assert_400(messages(json!("Hi")), Some("messages"));
    assert_400(messages(json!(["Hi"])), Some("messages"));
    let error = assert_400(
        messages(json!([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])),
        Some("messages"),
    );
    assert!(error.message.contains("messages[1]"), "{}", error.message);
    assert_400(messages(json!([{"content": "a"}])), Some("messages"));
    assert_400(messages(json!([{"role": "user"}])), Some("messages"));
    assert_400(
        messages(json!([{"role": "user", "content": null}])),
        Some("messages"),
    );
    assert_400(
        messages(json!([{"role": "user", "content": 3}])),
        Some("messages"),
    );
    let image = json!([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    ]}]);
    let error = assert_400(messages(image), Some("messages"));
    assert!(error.message.contains("image_url"), "{}", error.message);
    assert_400(
        messages(
            json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        ),
        Some("messages"),
    );
    assert_400(
        messages(json!([{"role": "user", "content": [{"text": "a"}]}])),
        Some("messages"),
    );
    assert_400(
        messages(json!([{"role": "user", "content": [{"type": "text"}]}])),
        Some("messages"),
    );
}

/// Wrong types for the remaining fields name the field.
#[test]
fn wrong_types_name_the_param() {
    for r in both(json!({"user": 5})) {
        assert_400(r, Some("user"));
    }
    for r in both(json!({"max_tokens": true})) {
        assert_400(r, Some("max_tokens"));
    }
}
