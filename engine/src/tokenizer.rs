//! Tokenizers and the incremental detokenizer.
//!
//! Presets use a byte tokenizer: ids 0..=255 are the bytes, 256 is BOS, 257 is EOS; a prompt
//! is BOS followed by its UTF-8 bytes. Checkpoints use their `tokenizer.json` through the
//! `tokenizers` crate built without its C/C++ parts (fancy-regex instead of onig).
//!
//! **Text output is always valid UTF-8.** A model (above all a byte model on random weights)
//! can emit a token stream that stops inside a multi-byte character or is not UTF-8 at all. The
//! [`Detokenizer`] therefore:
//! - holds back the bytes of an incomplete UTF-8 sequence until the tokens that complete it
//!   arrive (for `tokenizer.json` models: holds back text that ends in U+FFFD, for at most
//!   [`HOLD_BACK_TOKENS_MAX`] tokens, since a character spans at most 4 byte tokens);
//! - replaces each invalid byte sequence with U+FFFD (the same maximal-subpart rule as
//!   `String::from_utf8_lossy`);
//! - at the end of the request ([`Detokenizer::finish`]) emits U+FFFD for bytes still held.
//!
//! For the byte tokenizer the concatenation of all pieces equals `String::from_utf8_lossy` of
//! the whole byte stream. For `tokenizer.json` models the text is what the tokenizer's own
//! decoder makes of the tokens (its `ByteFallback`, for one, turns a whole run of byte tokens
//! that holds an invalid sequence into U+FFFDs), still always valid UTF-8.

use std::path::Path;
use std::sync::Arc;

use crate::error::EngineError;
use crate::model::{BYTE_BOS, BYTE_EOS};

/// Tokens a `tokenizer.json` detokenizer waits for a character to complete before it gives
/// up and emits U+FFFD.
pub const HOLD_BACK_TOKENS_MAX: usize = 4;

/// One chat message for [`Tokenizer::encode_chat`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The template of models without one (the presets): `<|role|>content` lines, then
/// `<|assistant|>`.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// Text to token ids and back.
#[derive(Clone)]
pub enum Tokenizer {
    Bytes,
    Hf {
        inner: Arc<tokenizers::Tokenizer>,
        chat_template: Option<String>,
        eos_token_id: Option<u32>,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => f.write_str("Tokenizer::Bytes"),
            Tokenizer::Hf { .. } => f.write_str("Tokenizer::Hf"),
        }
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (and the chat template and EOS of `tokenizer_config.json` when
    /// present) from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, EngineError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let mut chat_template = None;
        let mut eos_token_id = None;
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                EngineError::Tokenizer(format!("cannot parse {}: {e}", cfg_path.display()))
            })?;
            chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // The list form: [{"name": "default", "template": "..."}, ...].
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| a.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
            let eos = match v.get("eos_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                None => None,
            };
            eos_token_id = eos.and_then(|e| inner.token_to_id(&e));
        }
        Ok(Tokenizer::Hf {
            inner: Arc::new(inner),
            chat_template,
            eos_token_id,
        })
    }

    /// Token ids of a prompt, with the BOS (or whatever the tokenizer's post-processor adds).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        match self {
            Tokenizer::Bytes => {
                let mut ids = Vec::with_capacity(text.len() + 1);
                ids.push(BYTE_BOS);
                ids.extend(text.bytes().map(u32::from));
                Ok(ids)
            }
            Tokenizer::Hf { inner, .. } => inner
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::Tokenizer(format!("cannot encode prompt: {e}"))),
        }
    }

    /// The whole text of `ids`, invalid UTF-8 replaced by U+FFFD, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut d = self.detokenizer();
        let mut s: String = ids.iter().map(|&t| d.push(t)).collect();
        s.push_str(&d.finish());
        s
    }

    /// A fresh incremental detokenizer for one request's output.
    pub fn detokenizer(&self) -> Detokenizer {
        match self {
            Tokenizer::Bytes => Detokenizer::Bytes {
                pending: Vec::new(),
            },
            Tokenizer::Hf { inner, .. } => Detokenizer::Hf {
                inner: inner.clone(),
                ids: Vec::new(),
                prefix: 0,
                read: 0,
            },
        }
    }

    /// The raw Jinja chat template from `tokenizer_config.json`, if any (rendering it is the
    /// caller's business).
    pub fn chat_template(&self) -> Option<&str> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf { chat_template, .. } => chat_template.as_deref(),
        }
    }

    /// Renders `messages` with the model's chat template (or [`DEFAULT_CHAT_TEMPLATE`]) and
    /// tokenizes the result. A template that writes the BOS itself does not get a second one.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let (bos, eos) = match self {
            Tokenizer::Bytes => (String::new(), String::new()),
            Tokenizer::Hf {
                inner,
                eos_token_id,
                ..
            } => (
                // The BOS is whatever the post-processor puts in front of an empty text.
                inner
                    .encode("", true)
                    .ok()
                    .and_then(|e| e.get_ids().first().copied())
                    .and_then(|id| inner.id_to_token(id))
                    .unwrap_or_default(),
                eos_token_id
                    .and_then(|e| inner.id_to_token(e))
                    .unwrap_or_default(),
            ),
        };
        let template = self.chat_template().unwrap_or(DEFAULT_CHAT_TEMPLATE);
        let text = render_chat(template, messages, add_generation_prompt, &bos, &eos)?;
        match self {
            Tokenizer::Hf { inner, .. } if !bos.is_empty() && text.starts_with(&bos) => inner
                .encode(text.as_str(), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::Tokenizer(format!("cannot encode chat: {e}"))),
            _ => self.encode(&text),
        }
    }

    /// The EOS id named by `tokenizer_config.json`, if any.
    pub(crate) fn eos_token_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(BYTE_EOS),
            Tokenizer::Hf { eos_token_id, .. } => *eos_token_id,
        }
    }
}

/// Renders an HF chat template (Jinja) with `messages`, `add_generation_prompt`, `bos_token`,
/// `eos_token` and `raise_exception`.
fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String, EngineError> {
    use minijinja::{Environment, Error, ErrorKind, Value};
    use std::collections::BTreeMap;
    let err = |e: Error| EngineError::Tokenizer(format!("chat template: {e:#}"));
    let mut env = Environment::new();
    // As transformers renders chat templates.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(err)?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    let tmpl = env.template_from_str(template).map_err(err)?;
    let msgs: Vec<Value> = messages
        .iter()
        .map(|m| {
            let mut o = BTreeMap::new();
            o.insert("role".to_string(), Value::from(m.role.as_str()));
            o.insert("content".to_string(), Value::from(m.content.as_str()));
            Value::from(o)
        })
        .collect();
    let mut ctx = BTreeMap::new();
    ctx.insert("messages".to_string(), Value::from(msgs));
    ctx.insert(
        "add_generation_prompt".to_string(),
        Value::from(add_generation_prompt),
    );
    ctx.insert("bos_token".to_string(), Value::from(bos));
    ctx.insert("eos_token".to_string(), Value::from(eos));
    tmpl.render(Value::from(ctx)).map_err(err)
}

/// Turns one request's token stream into text pieces that are always valid UTF-8 (see the
/// module doc for the hold-back and replacement rules).
pub enum Detokenizer {
    Bytes {
        pending: Vec<u8>,
    },
    Hf {
        inner: Arc<tokenizers::Tokenizer>,
        ids: Vec<u32>,
        /// Start of the window decoded for context (tokenizers merge spaces across tokens).
        prefix: usize,
        /// End of the text already emitted.
        read: usize,
    },
}

impl Detokenizer {
    /// Adds one token; returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        match self {
            Detokenizer::Bytes { pending } => {
                if let Ok(b) = u8::try_from(id) {
                    pending.push(b);
                }
                drain_utf8(pending, false)
            }
            Detokenizer::Hf {
                inner,
                ids,
                prefix,
                read,
            } => {
                ids.push(id);
                let before = inner.decode(&ids[*prefix..*read], true).unwrap_or_default();
                let now = inner.decode(&ids[*prefix..], true).unwrap_or_default();
                let held = ids.len() - *read;
                let complete = !now.ends_with('\u{FFFD}') || held >= HOLD_BACK_TOKENS_MAX;
                if complete && now.len() > before.len() {
                    // Normally `now` extends `before`. When a new token changes how earlier
                    // ones render (a decoder that replaces a whole run of byte tokens), the
                    // earlier text is already out: emit only the new tokens' own text.
                    let delta = match now.strip_prefix(before.as_str()) {
                        Some(d) => d.to_string(),
                        None => inner.decode(&ids[*read..], true).unwrap_or_default(),
                    };
                    *prefix = *read;
                    *read = ids.len();
                    return delta;
                }
                String::new()
            }
        }
    }

    /// Ends the stream: emits what is still held, with U+FFFD for incomplete characters.
    pub fn finish(&mut self) -> String {
        match self {
            Detokenizer::Bytes { pending } => drain_utf8(pending, true),
            Detokenizer::Hf {
                inner,
                ids,
                prefix,
                read,
            } => {
                let before = inner.decode(&ids[*prefix..*read], true).unwrap_or_default();
                let now = inner.decode(&ids[*prefix..], true).unwrap_or_default();
                let rest = match now.strip_prefix(before.as_str()) {
                    Some(d) => d.to_string(),
                    None => inner.decode(&ids[*read..], true).unwrap_or_default(),
                };
                *prefix = ids.len();
                *read = ids.len();
                rest
            }
        }
    }
}

/// Takes the longest valid prefix of `pending`, replacing invalid sequences with U+FFFD; an
/// incomplete sequence at the end stays in `pending` unless `end`.
fn drain_utf8(pending: &mut Vec<u8>, end: bool) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(pending) {
            Ok(s) => {
                out.push_str(s);
                pending.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&pending[..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        pending.drain(..valid + n);
                    }
                    None => {
                        pending.drain(..valid);
                        if end {
                            out.push('\u{FFFD}');
                            pending.clear();
                        }
                        return out;
                    }
                }
            }
        }
    }
}

/// Writes a `tokenizer.json` that encodes exactly like [`Tokenizer::Bytes`] (a BPE with no
/// merges whose vocabulary is the 256 byte-fallback tokens, `<s>` = 256, `</s>` = 257, and a
/// post-processor that puts `<s>` in front), plus a `tokenizer_config.json` with a minimal
/// chat template.
pub(crate) fn write_byte_tokenizer(dir: &Path) -> Result<(), EngineError> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence;
    use tokenizers::models::bpe::BPE;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, DecoderWrapper};

    let err = |e: String| EngineError::Tokenizer(format!("cannot write byte tokenizer: {e}"));
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), b);
    }
    vocab.insert("<s>".to_string(), BYTE_BOS);
    vocab.insert("</s>".to_string(), BYTE_EOS);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .byte_fallback(true)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.add_special_tokens(&[
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ]);
    let decoder = Sequence::new(vec![
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ]);
    tok.with_decoder(Some(decoder));
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| err(e.to_string()))?
        .special_tokens(vec![("<s>", BYTE_BOS)])
        .build()
        .map_err(|e| err(e.to_string()))?;
    tok.with_post_processor(Some(post));
    tok.save(dir.join("tokenizer.json"), true)
        .map_err(|e| err(e.to_string()))?;
    let cfg = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg).map_err(|e| err(e.to_string()))?,
    )
    .map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The Llama 3 Instruct template renders as transformers renders it; a template's
    /// `raise_exception` is an error with the template's words.
    #[test]
    fn hugging_face_templates_render_as_transformers_does() {
        const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
        let m = |role: &str, content: &str| super::ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        let text = super::render_chat(
            LLAMA3,
            &[m("system", " Be brief. "), m("user", "Hi")],
            true,
            "<|begin_of_text|>",
            "<|eot_id|>",
        )
        .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Block tags on their own lines leave no blank lines (trim_blocks, lstrip_blocks).
        let text = super::render_chat(
            "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}",
            &[m("user", " x ")],
            true,
            "",
            "",
        )
        .unwrap();
        assert_eq!(text, "[x]\n");
        let e = super::render_chat(
            "{{ raise_exception('Conversation roles must alternate') }}",
            &[m("user", "x")],
            true,
            "",
            "",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("Conversation roles must alternate"),
            "{e}"
        );
    }

    use super::*;

    fn pieces(ids: &[u32]) -> Vec<String> {
        let mut d = Tokenizer::Bytes.detokenizer();
        let mut out: Vec<String> = ids.iter().map(|&t| d.push(t)).collect();
        out.push(d.finish());
        out
    }

    #[test]
    fn byte_detokenizer_holds_back_incomplete_characters() {
        // "é" is C3 A9: nothing is emitted until the second byte arrives.
        assert_eq!(
            pieces(&[0x61, 0xC3, 0xA9, 0x62]),
            vec!["a", "", "é", "b", ""]
        );
    }

    #[test]
    fn byte_detokenizer_replaces_invalid_and_truncated_sequences() {
        // A lone continuation byte, a lead byte followed by ASCII, and a truncated tail.
        let ids = [0x80, 0x41, 0xE2, 0x42, 0xF0, 0x9F];
        let out = pieces(&ids);
        let joined: String = out.concat();
        let bytes: Vec<u8> = ids.iter().map(|&b| b as u8).collect();
        assert_eq!(joined, String::from_utf8_lossy(&bytes));
        assert_eq!(out.last().unwrap(), "\u{FFFD}");
        // Special tokens produce no text.
        assert_eq!(pieces(&[BYTE_BOS, 0x41, BYTE_EOS]).concat(), "A");
    }

    /// A Llama-2 style template that writes the BOS itself, uses Python string methods and
    /// raises on bad input.
    #[test]
    fn hf_chat_templates_render() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_tokenizer(dir.path()).unwrap();
        let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}";
        let cfg = serde_json::json!({"eos_token": "</s>", "chat_template": template});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let hf = Tokenizer::from_dir(dir.path()).unwrap();
        let msg = |r: &str, c: &str| ChatMessage {
            role: r.into(),
            content: c.into(),
        };
        let ids = hf
            .encode_chat(
                &[
                    msg("user", "  hi  "),
                    msg("assistant", "yo"),
                    msg("user", "q"),
                ],
                true,
            )
            .unwrap();
        let mut want = vec![BYTE_BOS];
        want.extend("[INST] hi [/INST]yo".bytes().map(u32::from));
        want.push(BYTE_EOS);
        want.extend("[INST] q [/INST]".bytes().map(u32::from));
        assert_eq!(
            ids, want,
            "one BOS, stripped content, EOS after the assistant turn"
        );
        let e = hf.encode_chat(&[msg("tool", "x")], true).unwrap_err();
        assert!(e.to_string().contains("unknown role tool"), "{e}");
    }

    #[test]
    fn written_byte_tokenizer_matches_the_builtin_one() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_tokenizer(dir.path()).unwrap();
        let hf = Tokenizer::from_dir(dir.path()).unwrap();
        let chat = [
            ChatMessage {
                role: "system".into(),
                content: "be brief".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "hi ✓".into(),
            },
        ];
        let want = "<|system|>be brief\n<|user|>hi ✓\n<|assistant|>";
        assert_eq!(
            hf.encode_chat(&chat, true).unwrap(),
            Tokenizer::Bytes.encode(want).unwrap()
        );
        assert_eq!(
            Tokenizer::Bytes.encode_chat(&chat, true).unwrap(),
            Tokenizer::Bytes.encode(want).unwrap()
        );
        let text = "héllo wörld ✓";
        assert_eq!(
            hf.encode(text).unwrap(),
            Tokenizer::Bytes.encode(text).unwrap()
        );
        assert!(hf.chat_template().is_some());
        assert_eq!(hf.eos_token_id(), Some(BYTE_EOS));
        let ids = Tokenizer::Bytes.encode(text).unwrap();
        assert_eq!(hf.decode(&ids), text);
        // Incremental: the pieces concatenate to the text and none holds a partial character.
        let mut d = hf.detokenizer();
        let mut s = String::new();
        for &t in &ids {
            s.push_str(&d.push(t));
        }
        s.push_str(&d.finish());
        assert_eq!(s, text);
    }
}
