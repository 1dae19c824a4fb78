//! `pd-router`: picks a (prefill, decode) pair per request (pure, no IO). Work in progress.
