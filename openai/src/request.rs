//! Request parsing and validation for `/v1/completions` and `/v1/chat/completions`.
//!
//! Bodies are read as JSON values and checked field by field so that every refusal names the
//! field (`param`), as OpenAI's do. Unknown fields are ignored: clients send many. `null` for
//! an optional field means absent. Features this server does not have (several choices,
//! logprobs, penalties, tools, JSON mode) are refused with a 400 rather than silently ignored,
//! except where the request asks for the neutral value (`n: 1`, `presence_penalty: 0`, …).

use serde_json::{Map, Value};

use crate::{ApiError, ApiKind};

/// How many stop sequences one request may carry (OpenAI's bound).
pub const STOP_SEQUENCES_MAX: usize = 4;

/// The message roles a chat request may use.
pub const CHAT_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// What a request is continued from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
    /// Chat messages, rendered by the engine with the model's own chat template (it alone
    /// knows the template and the special tokens).
    Chat(Vec<ChatMessage>),
}

/// One chat message; `content` is the text of its parts, concatenated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A validated generation request, ready for the router and the engines.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub kind: ApiKind,
    pub model: String,
    /// For chat: the messages (`Chat`).
    pub prompt: PromptInput,
    /// `None`: the caller's default (until the context is full).
    pub max_tokens: Option<u32>,
    /// Default 1.0, within [0, 2].
    pub temperature: f32,
    /// Default 1.0, within (0, 1].
    pub top_p: f32,
    /// A negative JSON seed is taken bit for bit (`-1` is `u64::MAX`).
    pub seed: Option<u64>,
    /// At most [`STOP_SEQUENCES_MAX`], none empty.
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`; always false when not streaming.
    pub include_usage: bool,
    pub user: Option<String>,
    /// vLLM's extension: keep generating past the model's end-of-sequence token, to
    /// `max_tokens` (benchmarks that need outputs of a set length).
    pub ignore_eos: bool,
}

/// Server-side bounds on what a request may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// A `max_tokens` above this is a 400 on `max_tokens`.
    pub max_tokens_max: u32,
}

/// Parses and validates a `/v1/completions` body.
pub fn parse_completion(body: &[u8], limits: &Limits) -> Result<Generation, ApiError> {
    let fields = Fields::parse(body)?;
    fields.refuse_unsupported(COMMON_UNSUPPORTED)?;
    fields.refuse_unsupported(COMPLETIONS_UNSUPPORTED)?;
    let prompt = parse_prompt(fields.get("prompt"))?;
    let max_tokens = fields.max_tokens("max_tokens", limits)?;
    fields.generation(ApiKind::Completions, prompt, max_tokens)
}

/// Parses and validates a `/v1/chat/completions` body. `developer` messages become `system`,
/// which is what they mean and what Hugging Face chat templates know.
pub fn parse_chat(body: &[u8], limits: &Limits) -> Result<Generation, ApiError> {
    let fields = Fields::parse(body)?;
    fields.refuse_unsupported(COMMON_UNSUPPORTED)?;
    fields.refuse_unsupported(CHAT_UNSUPPORTED)?;
    let messages = parse_messages(fields.get("messages"))?;
    // The newer name wins when a client sends both.
    let max_tokens = match fields.get("max_completion_tokens") {
        Some(_) => fields.max_tokens("max_completion_tokens", limits)?,
        None => fields.max_tokens("max_tokens", limits)?,
    };
    fields.generation(ApiKind::Chat, PromptInput::Chat(messages), max_tokens)
}

/// A field this server refuses unless it carries the value that asks for nothing.
struct Unsupported {
    field: &'static str,
    accepts: fn(&Value) -> bool,
    why: &'static str,
}

const COMMON_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        field: "n",
        accepts: is_one,
        why: "only one choice per request is supported (n must be 1)",
    },
    Unsupported {
        field: "frequency_penalty",
        accepts: is_off,
        why: "frequency_penalty is not supported by this engine (send 0 or leave it out)",
    },
    Unsupported {
        field: "presence_penalty",
        accepts: is_off,
        why: "presence_penalty is not supported by this engine (send 0 or leave it out)",
    },
    Unsupported {
        field: "logit_bias",
        accepts: is_empty_object,
        why: "logit_bias is not supported by this engine",
    },
    Unsupported {
        field: "logprobs",
        accepts: is_off,
        why: "logprobs are not supported by this engine",
    },
];

const COMPLETIONS_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        field: "echo",
        accepts: is_off,
        why: "echo is not supported by this engine",
    },
    Unsupported {
        field: "best_of",
        accepts: is_one,
        why: "best_of is not supported by this engine (best_of must be 1)",
    },
    Unsupported {
        field: "suffix",
        accepts: is_empty_string,
        why: "suffix (insertion) is not supported by this engine",
    },
];

const CHAT_UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        field: "top_logprobs",
        accepts: is_off,
        why: "logprobs are not supported by this engine",
    },
    Unsupported {
        field: "tools",
        accepts: is_empty_array,
        why: "tools (function calling) are not supported by this engine",
    },
    Unsupported {
        field: "tool_choice",
        accepts: is_no_tool_choice,
        why: "tool_choice is not supported by this engine (only \"none\" or \"auto\" without tools)",
    },
    Unsupported {
        field: "functions",
        accepts: is_empty_array,
        why: "functions (function calling) are not supported by this engine",
    },
    Unsupported {
        field: "function_call",
        accepts: is_no_tool_choice,
        why: "function_call is not supported by this engine",
    },
    Unsupported {
        field: "response_format",
        accepts: is_text_format,
        why: "only the \"text\" response_format is supported by this engine",
    },
];

fn is_one(value: &Value) -> bool {
    value.as_u64() == Some(1)
}

/// `false` or zero: what asks for no logprobs, no echo, no penalty.
fn is_off(value: &Value) -> bool {
    value == &Value::Bool(false) || value.as_f64() == Some(0.0)
}

fn is_empty_object(value: &Value) -> bool {
    value.as_object().is_some_and(Map::is_empty)
}

fn is_empty_array(value: &Value) -> bool {
    value.as_array().is_some_and(Vec::is_empty)
}

fn is_empty_string(value: &Value) -> bool {
    value.as_str() == Some("")
}

fn is_no_tool_choice(value: &Value) -> bool {
    matches!(value.as_str(), Some("none" | "auto"))
}

fn is_text_format(value: &Value) -> bool {
    value.get("type").and_then(Value::as_str) == Some("text")
}

/// How a JSON value is named in "expected X, got Y" messages.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::bad_request(
        format!(
            "Invalid type for '{param}': expected {expected}, got {}.",
            describe(got)
        ),
        Some(param),
    )
}

/// The top-level object of a request body, read field by field.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        match serde_json::from_slice(body) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(other) => Err(ApiError::bad_request(
                format!(
                    "The request body must be a JSON object, got {}.",
                    describe(&other)
                ),
                None,
            )),
            Err(e) => Err(ApiError::bad_request(
                format!("We could not parse the JSON body of your request: {e}."),
                None,
            )),
        }
    }

    /// The field's value; `null` reads as absent.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn refuse_unsupported(&self, rules: &[Unsupported]) -> Result<(), ApiError> {
        for rule in rules {
            if let Some(value) = self.get(rule.field)
                && !(rule.accepts)(value)
            {
                return Err(ApiError::bad_request(rule.why, Some(rule.field)));
            }
        }
        Ok(())
    }

    fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(name, "a string", other)),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        optional_bool(self.get(name), name)
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_f64()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "a number", value)),
        }
    }

    /// An integer of either sign, widened so that the full `u64` and `i64` ranges fit.
    fn integer(&self, name: &str) -> Result<Option<i128>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => as_integer(value)
                .map(Some)
                .ok_or_else(|| wrong_type(name, "an integer", value)),
        }
    }

    fn max_tokens(&self, name: &str, limits: &Limits) -> Result<Option<u32>, ApiError> {
        let Some(value) = self.integer(name)? else {
            return Ok(None);
        };
        if value < 1 {
            return Err(ApiError::bad_request(
                format!("{name} must be at least 1, got {value}."),
                Some(name),
            ));
        }
        match u32::try_from(value) {
            Ok(tokens) if tokens <= limits.max_tokens_max => Ok(Some(tokens)),
            _ => Err(ApiError::bad_request(
                format!(
                    "{name} is too large: {value}. This server generates at most {} tokens per request.",
                    limits.max_tokens_max
                ),
                Some(name),
            )),
        }
    }

    /// A number within bounds; `low_open` excludes the lower bound.
    fn ranged(
        &self,
        name: &str,
        default: f32,
        (low, high): (f64, f64),
        low_open: bool,
    ) -> Result<f32, ApiError> {
        let Some(value) = self.number(name)? else {
            return Ok(default);
        };
        let above_low = if low_open { value > low } else { value >= low };
        if !above_low || value > high {
            let low_bracket = if low_open { '(' } else { '[' };
            return Err(ApiError::bad_request(
                format!("{name} must be within {low_bracket}{low}, {high}], got {value}."),
                Some(name),
            ));
        }
        Ok(value as f32)
    }

    fn seed(&self) -> Result<Option<u64>, ApiError> {
        let Some(seed) = self.integer("seed")? else {
            return Ok(None);
        };
        u64::try_from(seed)
            .or_else(|_| i64::try_from(seed).map(|s| s as u64))
            .map(Some)
            .map_err(|_| ApiError::bad_request("seed is out of range.", Some("seed")))
    }

    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let stops: Vec<&Value> = match self.get("stop") {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().collect(),
            Some(single) => vec![single],
        };
        if stops.len() > STOP_SEQUENCES_MAX {
            return Err(ApiError::bad_request(
                format!(
                    "At most {STOP_SEQUENCES_MAX} stop sequences are allowed, got {}.",
                    stops.len()
                ),
                Some("stop"),
            ));
        }
        stops
            .into_iter()
            .map(|value| match value {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                Value::String(_) => Err(ApiError::bad_request(
                    "Stop sequences must not be empty.",
                    Some("stop"),
                )),
                other => Err(wrong_type("stop", "a string or an array of strings", other)),
            })
            .collect()
    }

    /// `(stream, include_usage)`.
    fn stream(&self) -> Result<(bool, bool), ApiError> {
        let stream = self.bool("stream")?.unwrap_or(false);
        let Some(options) = self.get("stream_options") else {
            return Ok((stream, false));
        };
        if !stream {
            return Err(ApiError::bad_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                Some("stream_options"),
            ));
        }
        let Value::Object(options) = options else {
            return Err(wrong_type("stream_options", "an object", options));
        };
        let include_usage = optional_bool(
            options.get("include_usage").filter(|v| !v.is_null()),
            "stream_options.include_usage",
        )?;
        Ok((stream, include_usage.unwrap_or(false)))
    }

    /// The fields both endpoints share.
    fn generation(
        &self,
        kind: ApiKind,
        prompt: PromptInput,
        max_tokens: Option<u32>,
    ) -> Result<Generation, ApiError> {
        let model = match self.string("model")? {
            Some(model) if !model.is_empty() => model.to_owned(),
            _ => {
                return Err(ApiError::bad_request(
                    "You must provide a model parameter.",
                    Some("model"),
                ));
            }
        };
        let (stream, include_usage) = self.stream()?;
        Ok(Generation {
            kind,
            model,
            prompt,
            max_tokens,
            temperature: self.ranged("temperature", 1.0, (0.0, 2.0), false)?,
            top_p: self.ranged("top_p", 1.0, (0.0, 1.0), true)?,
            seed: self.seed()?,
            stop: self.stop()?,
            stream,
            include_usage,
            user: self.string("user")?.map(str::to_owned),
            ignore_eos: self.bool("ignore_eos")?.unwrap_or(false),
        })
    }
}

fn optional_bool(value: Option<&Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(name, "a boolean", other)),
    }
}

fn as_integer(value: &Value) -> Option<i128> {
    value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from))
}

fn prompt_error(message: &str) -> ApiError {
    ApiError::bad_request(message, Some("prompt"))
}

/// A completions prompt: a string, `[string]`, token ids, or `[[token ids]]`.
fn parse_prompt(value: Option<&Value>) -> Result<PromptInput, ApiError> {
    const SEVERAL: &str = "Only one prompt per request is supported.";
    const SHAPE: &str = "prompt must be a string, an array of one string, an array of token ids, or an array of one array of token ids.";
    let items = match value {
        None => return Err(prompt_error("You must provide a prompt.")),
        Some(Value::String(text)) => return Ok(PromptInput::Text(text.clone())),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(prompt_error(SHAPE)),
    };
    match items.first() {
        None => Err(prompt_error("prompt must not be an empty array.")),
        Some(Value::String(_) | Value::Array(_)) if items.len() > 1 => {
            let uniform = items.iter().all(Value::is_string) || items.iter().all(Value::is_array);
            Err(prompt_error(if uniform { SEVERAL } else { SHAPE }))
        }
        Some(Value::String(text)) => Ok(PromptInput::Text(text.clone())),
        Some(Value::Array(tokens)) => token_ids(tokens),
        Some(Value::Number(_)) => token_ids(items),
        Some(_) => Err(prompt_error(SHAPE)),
    }
}

fn token_ids(items: &[Value]) -> Result<PromptInput, ApiError> {
    if items.is_empty() {
        return Err(prompt_error(
            "prompt must not be an empty array of token ids.",
        ));
    }
    items
        .iter()
        .map(|item| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    prompt_error("prompt token ids must be integers between 0 and 4294967295.")
                })
        })
        .collect::<Result<_, _>>()
        .map(PromptInput::Tokens)
}

fn messages_error(message: String) -> ApiError {
    ApiError::bad_request(message, Some("messages"))
}

/// Chat messages: a non-empty array of `{role, content}`.
fn parse_messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = match value {
        None => return Err(messages_error("You must provide messages.".to_owned())),
        Some(Value::Array(messages)) if messages.is_empty() => {
            return Err(messages_error("messages must not be empty.".to_owned()));
        }
        Some(Value::Array(messages)) => messages,
        Some(other) => return Err(wrong_type("messages", "an array", other)),
    };
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect()
}

fn parse_message(index: usize, message: &Value) -> Result<ChatMessage, ApiError> {
    let at = format!("messages[{index}]");
    let Value::Object(message) = message else {
        return Err(messages_error(format!(
            "{at} must be an object, got {}.",
            describe(message)
        )));
    };
    let role = match message.get("role") {
        Some(Value::String(role)) if CHAT_ROLES.contains(&role.as_str()) => role.as_str(),
        Some(Value::String(role)) => {
            return Err(messages_error(format!(
                "{at}.role '{role}' is not one of {}.",
                CHAT_ROLES.join(", ")
            )));
        }
        _ => return Err(messages_error(format!("{at}.role must be a string."))),
    };
    let content = match message.get("content").filter(|c| !c.is_null()) {
        None if role == "assistant" => String::new(),
        None => return Err(messages_error(format!("{at}.content is required."))),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => text_parts(&at, parts)?,
        Some(other) => {
            return Err(messages_error(format!(
                "{at}.content must be a string or an array of content parts, got {}.",
                describe(other)
            )));
        }
    };
    let role = if role == "developer" { "system" } else { role };
    Ok(ChatMessage {
        role: role.to_owned(),
        content,
    })
}

/// Content parts: only `{"type": "text", "text": ...}`, concatenated without separator.
fn text_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut content = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (
            part.get("type").and_then(Value::as_str),
            part.get("text").and_then(Value::as_str),
        ) {
            (Some("text"), Some(text)) => content.push_str(text),
            (Some("text"), None) => {
                return Err(messages_error(format!(
                    "{at}.content[{j}].text must be a string."
                )));
            }
            (Some(kind), _) => {
                return Err(messages_error(format!(
                    "{at}.content[{j}]: content parts of type '{kind}' are not supported; this server takes text only."
                )));
            }
            (None, _) => {
                return Err(messages_error(format!(
                    "{at}.content[{j}] must be an object with a 'type'."
                )));
            }
        }
    }
    Ok(content)
}
