//! Chat templates: turning a list of messages into the one prompt string a model was trained on.
//!
//! Templates are Hugging Face's Jinja, rendered with minijinja configured as `transformers`
//! configures Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) and given the Python
//! string and dict methods those templates call. The context is `messages` (a list of
//! `{role, content}`), `add_generation_prompt = true`, `bos_token`, `eos_token` and the function
//! `raise_exception(message)`, which fails the render with a 400 carrying `message`.
//!
//! Deliberately absent: `strftime_now`, which newer `transformers` offer, since this crate reads
//! no clock; the templates that call it (Llama 3.1 and later) test `strftime_now is defined` and
//! fall back to a fixed date.

use std::fmt;

use crate::ApiError;
use minijinja::{Environment, ErrorKind, Value};

/// The template of models without a `tokenizer_config.json` (presets): each message as
/// `<|role|>\n{content}\n`, then `<|assistant|>\n`.
///
/// ```text
/// <|system|>
/// You are terse.
/// <|user|>
/// Hi
/// <|assistant|>
/// ```
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// One message as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    fn to_value(&self) -> Value {
        Value::from_pairs([
            ("role", self.role.as_str()),
            ("content", self.content.as_str()),
        ])
    }
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// What `raise_exception` puts in the error chain, so that a render failure the template asked
/// for (a 400) can be told from a broken template (a 500).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TemplateRaised(String);

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(TemplateRaised(message)),
    )
}

fn raised_message(error: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<TemplateRaised>() {
            return Some(raised.0.clone());
        }
        source = current.source();
    }
    None
}

impl ChatTemplate {
    /// The documented default for presets: [`DEFAULT_CHAT_TEMPLATE`], with no special tokens.
    pub fn default_template() -> Self {
        Self::from_source(DEFAULT_CHAT_TEMPLATE, "", "")
            .expect("the default chat template compiles")
    }

    /// Compiles a Jinja chat template (for example the text of a `chat_template.jinja`).
    pub fn from_source(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| format!("the chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// From the text of a Hugging Face `tokenizer_config.json`: its `chat_template` (a string,
    /// or a list of `{name, template}` of which `default` is used) with `bos_token` and
    /// `eos_token` (a string or `{"content": ...}`; absent means empty).
    pub fn from_tokenizer_config(json: &str) -> Result<Self, String> {
        let config: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| format!("tokenizer_config.json is not valid JSON: {e}"))?;
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(source)) => source.as_str(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or("tokenizer_config.json lists chat templates but none named \"default\"")?,
            None | Some(serde_json::Value::Null) => {
                return Err("tokenizer_config.json has no chat_template".to_owned());
            }
            Some(_) => {
                return Err(
                    "tokenizer_config.json: chat_template must be a string or a list of {name, template}"
                        .to_owned(),
                );
            }
        };
        let bos_token = special_token(&config, "bos_token")?;
        let eos_token = special_token(&config, "eos_token")?;
        Self::from_source(source, &bos_token, &eos_token)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` followed by the generation prompt. A `raise_exception` in the
    /// template is the client's fault (400 on `messages`); any other failure is a broken
    /// template (500).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ApiError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added at construction");
        let context = minijinja::context! {
            messages => messages.iter().map(ChatMessage::to_value).collect::<Value>(),
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template
            .render(context)
            .map_err(|e| match raised_message(&e) {
                Some(message) => ApiError::bad_request(message, Some("messages")),
                None => ApiError::internal(format!("the model's chat template failed: {e:#}")),
            })
    }
}

/// A special token as `tokenizer_config.json` writes it: a string, `{"content": ...}` (an
/// `AddedToken`), or absent / null (empty).
fn special_token(config: &serde_json::Value, name: &str) -> Result<String, String> {
    match config.get(name) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(token)) => Ok(token.clone()),
        Some(token) => token
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                format!("tokenizer_config.json: {name} must be a string or {{\"content\": ...}}")
            }),
    }
}
