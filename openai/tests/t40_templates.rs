//! Chat templates: the default, Hugging Face templates from tokenizer_config.json, and
//! raise_exception.

use pd_openai::{
    ChatMessage, ChatTemplate, DEFAULT_CHAT_TEMPLATE, Limits, PromptInput, parse_chat,
};
use serde_json::json;

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Alternation check as Mistral and Llama 2 templates write it, with Python string methods.
const ALTERNATING: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn config(template: serde_json::Value) -> String {
    json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": false},
        "chat_template": template,
    })
    .to_string()
}

/// The default template is the documented one.
#[test]
fn default_template() {
    let template = ChatTemplate::default_template();
    assert_eq!(template.source(), DEFAULT_CHAT_TEMPLATE);
    let prompt = template
        .render(&[message("system", "You are terse."), message("user", "Hi")])
        .unwrap();
    assert_eq!(
        prompt,
        "<|system|>\nYou are terse.\n<|user|>\nHi\n<|assistant|>\n"
    );
}

/// Content is not HTML-escaped.
#[test]
fn no_escaping() {
    let prompt = ChatTemplate::default_template()
        .render(&[message("user", "<b>&\"'</b>")])
        .unwrap();
    assert_eq!(prompt, "<|user|>\n<b>&\"'</b>\n<|assistant|>\n");
}

/// The Llama 3 Instruct template renders as transformers renders it.
#[test]
fn llama3_template() {
    let template = ChatTemplate::from_tokenizer_config(&config(json!(LLAMA3))).unwrap();
    let prompt = template
        .render(&[message("system", " Be brief. "), message("user", "Hi")])
        .unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

/// A list of named templates uses "default"; a list without one is refused.
#[test]
fn named_templates() {
    let named = json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}
    ]);
    let template = ChatTemplate::from_tokenizer_config(&config(named)).unwrap();
    assert_eq!(
        template.render(&[message("user", "x")]).unwrap(),
        "<|begin_of_text|>x"
    );
    let error =
        ChatTemplate::from_tokenizer_config(&config(json!([{"name": "rag", "template": "x"}])))
            .unwrap_err();
    assert!(error.contains("default"), "{error}");
}

/// Missing, malformed or uncompilable templates are refused with a message.
#[test]
fn bad_configs() {
    for (json, needle) in [
        ("{}".to_string(), "no chat_template"),
        ("{\"chat_template\": null}".to_string(), "no chat_template"),
        ("{\"chat_template\": 3}".to_string(), "must be a string"),
        ("not json".to_string(), "not valid JSON"),
        (config(json!("{% for m in messages %}")), "does not compile"),
        (
            json!({"chat_template": "x", "bos_token": 3}).to_string(),
            "bos_token",
        ),
    ] {
        let error = ChatTemplate::from_tokenizer_config(&json).unwrap_err();
        assert!(error.contains(needle), "{json}: {error}");
    }
}

/// Without special tokens in the config, they render empty.
#[test]
fn absent_special_tokens_are_empty() {
    let config = json!({"chat_template": "[{{ bos_token }}|{{ eos_token }}]"}).to_string();
    let template = ChatTemplate::from_tokenizer_config(&config).unwrap();
    assert_eq!(template.render(&[message("user", "x")]).unwrap(), "[|]");
}

/// raise_exception fails the render with the template's message, as a 400 on messages.
#[test]
fn raise_exception_is_a_400() {
    let template = ChatTemplate::from_tokenizer_config(&config(json!(ALTERNATING))).unwrap();
    let ok = template
        .render(&[
            message("user", "  Hi  "),
            message("assistant", "Hello"),
            message("user", "Bye"),
        ])
        .unwrap();
    assert_eq!(
        ok,
        "<|begin_of_text|>[INST] Hi [/INST]Hello<|eot_id|>[INST] Bye [/INST]"
    );
    let error = template
        .render(&[message("user", "a"), message("user", "b")])
        .unwrap_err();
    assert_eq!(error.status, 400);
    assert_eq!(error.param.as_deref(), Some("messages"));
    assert_eq!(
        error.message,
        "Conversation roles must alternate user/assistant/user/assistant/..."
    );
}

/// Through parse_chat, a template's refusal reaches the client as the same 400.
#[test]
fn parse_chat_reports_template_refusal() {
    let template = ChatTemplate::from_tokenizer_config(&config(json!(ALTERNATING))).unwrap();
    let body = json!({"model": "m", "messages": [{"role": "assistant", "content": "a"}]});
    let error = parse_chat(
        body.to_string().as_bytes(),
        &Limits { max_tokens_max: 16 },
        &template,
    )
    .unwrap_err();
    assert_eq!(error.status, 400);
    assert!(error.message.contains("must alternate"));
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "a"}]});
    let generation = parse_chat(
        body.to_string().as_bytes(),
        &Limits { max_tokens_max: 16 },
        &template,
    )
    .unwrap();
    assert_eq!(
        generation.prompt,
        PromptInput::Text("<|begin_of_text|>[INST] a [/INST]".into())
    );
}

/// A template that breaks for reasons of its own is a server error, not the client's.
#[test]
fn broken_template_is_a_500() {
    let template = ChatTemplate::from_source("{{ messages[0].content + 1 }}", "", "").unwrap();
    let error = template.render(&[message("user", "x")]).unwrap_err();
    assert_eq!(error.status, 500);
}

/// The Python methods, filters and whitespace control that Hugging Face templates rely on.
#[test]
fn hugging_face_template_idioms() {
    let source = "
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message.role == 'system' -%}
        {%- set ns.system = message.content.strip() -%}
    {%- endif -%}
{%- endfor -%}
{{ ns.system | upper }}|
{% for message in messages if message.role != 'system' %}
    {% if message.content.startswith('!') %}{{ message.content.lstrip('!') | tojson }}{% else %}{{ message.content.replace('a', 'b') }}{% endif %}
{% endfor %}
{{ {'k': 1}.items() | list | length }}";
    let template = ChatTemplate::from_source(source, "", "").unwrap();
    let prompt = template
        .render(&[
            message("system", " sys "),
            message("user", "!hi\""),
            message("user", "aa"),
        ])
        .unwrap();
    assert_eq!(prompt, "SYS|\n\"hi\\\"\"bb1");
}
