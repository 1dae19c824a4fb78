//! `pd-openai`: the OpenAI-compatible API surface (pure, no IO). Work in progress.
