//! `pd-openai`: the OpenAI API surface of pdagent.
//!
//! This crate owns everything a client of `/v1/completions`, `/v1/chat/completions` and
//! `/v1/models` can observe about the wire format:
//!
//! - request parsing and validation into a [`Generation`] ([`parse_completion`],
//!   [`parse_chat`]), refusing with a 400 that names the field whatever this server does not do;
//! - response bodies ([`response`], [`models_list`]) and the SSE framing of streamed ones
//!   ([`role_chunk`], [`text_chunk`], [`finish_chunk`], [`usage_chunk`], [`SSE_DONE`]);
//! - error bodies in OpenAI's shape ([`ApiError`]);
//! - stop sequences over streamed text ([`StopMatcher`]).
//!
//! Chat messages are validated here and rendered by the engine, with the model's own chat
//! template (`pd_engine::Tokenizer::encode_chat`): one renderer, next to the tokenizer that
//! knows the special tokens.
//!
//! Architecture invariant: the crate is pure. It never does IO, never opens sockets, never reads
//! a clock or a random source: the caller passes response ids and `created` timestamps, and
//! turns [`ApiError::retry_after_s`] into a header. Everything here is tested without a server.

#![forbid(unsafe_code)]

mod error;
mod request;
mod response;
mod stop;

pub use error::ApiError;
pub use request::{
    CHAT_ROLES, ChatMessage, Generation, Limits, PromptInput, STOP_SEQUENCES_MAX, parse_chat,
    parse_completion,
};
pub use response::{
    FinishReason, ModelEntry, ResponseMeta, SSE_DONE, Usage, finish_chunk, model_object,
    models_list, response, role_chunk, text_chunk, usage_chunk,
};
pub use stop::StopMatcher;

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    Completions,
    Chat,
}
