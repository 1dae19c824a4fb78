//! `pd-planner`: decides how many prefill and decode engines a deployment needs.
//!
//! Owns: model and system catalogs, the roofline performance model, the serving simulator and
//! the layout search. Must never: do IO, read the clock or spawn threads.

#![forbid(unsafe_code)]
