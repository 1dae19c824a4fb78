//! Response bodies and SSE chunks, in the shapes the OpenAI SDKs parse.
//!
//! A streamed response is, in order: for chat, [`role_chunk`]; then one [`text_chunk`] per
//! piece of text; [`finish_chunk`]; with `include_usage`, [`usage_chunk`]; then [`SSE_DONE`].
//! With `include_usage` on, every chunk but the usage chunk carries `"usage": null`, as
//! OpenAI's do; with it off, no chunk has a `usage` field.

use serde::Serialize;

use crate::ApiKind;

/// The event that ends every successful stream.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Token counts of one request; serialized with `total_tokens` too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Why generation ended: a stop sequence or end-of-sequence token, or the token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What every response and chunk of one request repeats. The caller makes the id (`cmpl-…`
/// or `chatcmpl-…`) and reads the clock: this crate does neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseMeta<'a> {
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    pub model: &'a str,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
}

/// Frames one server-sent event.
pub(crate) fn sse_event(json: &str) -> String {
    format!("data: {json}\n\n")
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("response types always serialize")
}

#[derive(Serialize)]
struct UsageBody {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
        }
    }
}

/// The envelope shared by full responses and chunks.
#[derive(Serialize)]
struct Envelope<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    /// Outer `None`: no `usage` field; `Some(None)`: `"usage": null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageBody>>,
}

impl<'a, C> Envelope<'a, C> {
    fn new(meta: &ResponseMeta<'a>, object: &'static str, choices: Vec<C>) -> Self {
        Self {
            id: meta.id,
            object,
            created: meta.created,
            model: meta.model,
            choices,
            usage: None,
        }
    }

    fn with_usage(mut self, usage: Option<Usage>) -> Self {
        self.usage = Some(usage.map(UsageBody::from));
        self
    }

    /// A chunk that is not the usage chunk: `"usage": null` exactly when usage was asked for.
    fn null_usage_if(self, include_usage: bool) -> Self {
        if include_usage {
            self.with_usage(None)
        } else {
            self
        }
    }
}

/// A completions choice, in full responses and chunks alike.
#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: ChatMessageBody<'a>,
    logprobs: (),
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ChatMessageBody<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

const TEXT_COMPLETION: &str = "text_completion";
const CHAT_COMPLETION: &str = "chat.completion";
const CHAT_COMPLETION_CHUNK: &str = "chat.completion.chunk";
const ASSISTANT: &str = "assistant";

/// The whole (non-streamed) response body.
pub fn response(
    kind: ApiKind,
    meta: &ResponseMeta,
    text: &str,
    finish: FinishReason,
    usage: Usage,
) -> String {
    let finish_reason = finish.as_str();
    match kind {
        ApiKind::Completions => to_json(
            &Envelope::new(
                meta,
                TEXT_COMPLETION,
                vec![TextChoice {
                    text,
                    index: 0,
                    logprobs: (),
                    finish_reason: Some(finish_reason),
                }],
            )
            .with_usage(Some(usage)),
        ),
        ApiKind::Chat => to_json(
            &Envelope::new(
                meta,
                CHAT_COMPLETION,
                vec![ChatChoice {
                    index: 0,
                    message: ChatMessageBody {
                        role: ASSISTANT,
                        content: text,
                    },
                    logprobs: (),
                    finish_reason,
                }],
            )
            .with_usage(Some(usage)),
        ),
    }
}

/// One streamed choice for either endpoint.
fn chunk(
    kind: ApiKind,
    meta: &ResponseMeta,
    delta: Delta,
    finish: Option<FinishReason>,
    include_usage: bool,
) -> String {
    let finish_reason = finish.map(FinishReason::as_str);
    let json = match kind {
        ApiKind::Completions => to_json(
            &Envelope::new(
                meta,
                TEXT_COMPLETION,
                vec![TextChoice {
                    text: delta.content.unwrap_or(""),
                    index: 0,
                    logprobs: (),
                    finish_reason,
                }],
            )
            .null_usage_if(include_usage),
        ),
        ApiKind::Chat => to_json(
            &Envelope::new(
                meta,
                CHAT_COMPLETION_CHUNK,
                vec![ChatChunkChoice {
                    index: 0,
                    delta,
                    logprobs: (),
                    finish_reason,
                }],
            )
            .null_usage_if(include_usage),
        ),
    };
    sse_event(&json)
}

/// The first event of a streamed chat response: delta `{"role": "assistant", "content": ""}`.
/// Completions streams have no such event.
pub fn role_chunk(meta: &ResponseMeta, include_usage: bool) -> String {
    let delta = Delta {
        role: Some(ASSISTANT),
        content: Some(""),
    };
    chunk(ApiKind::Chat, meta, delta, None, include_usage)
}

/// One event carrying newly generated text (`delta.content` for chat, `text` for completions).
pub fn text_chunk(kind: ApiKind, meta: &ResponseMeta, text: &str, include_usage: bool) -> String {
    let delta = Delta {
        role: None,
        content: Some(text),
    };
    chunk(kind, meta, delta, None, include_usage)
}

/// The last choice event: empty delta (chat) or empty text (completions), with the finish
/// reason.
pub fn finish_chunk(
    kind: ApiKind,
    meta: &ResponseMeta,
    finish: FinishReason,
    include_usage: bool,
) -> String {
    chunk(kind, meta, Delta::default(), Some(finish), include_usage)
}

/// The usage event (`stream_options.include_usage`): `choices: []` and `usage` set; sent after
/// the finish chunk and before [`SSE_DONE`].
pub fn usage_chunk(kind: ApiKind, meta: &ResponseMeta, usage: Usage) -> String {
    let object = match kind {
        ApiKind::Completions => TEXT_COMPLETION,
        ApiKind::Chat => CHAT_COMPLETION_CHUNK,
    };
    let envelope: Envelope<()> = Envelope::new(meta, object, Vec::new()).with_usage(Some(usage));
    sse_event(&to_json(&envelope))
}

#[derive(Serialize)]
struct ModelBody<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

impl<'a> From<&'a ModelEntry> for ModelBody<'a> {
    fn from(entry: &'a ModelEntry) -> Self {
        Self {
            id: &entry.id,
            object: "model",
            created: entry.created,
            owned_by: &entry.owned_by,
        }
    }
}

/// `GET /v1/models`: `{"object": "list", "data": [{"id", "object": "model", "created",
/// "owned_by"}]}`.
pub fn models_list(models: &[ModelEntry]) -> String {
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<ModelBody<'a>>,
    }
    to_json(&List {
        object: "list",
        data: models.iter().map(ModelBody::from).collect(),
    })
}

/// `GET /v1/models/{id}`: one model object.
pub fn model_object(model: &ModelEntry) -> String {
    to_json(&ModelBody::from(model))
}
