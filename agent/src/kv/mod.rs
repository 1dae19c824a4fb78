//! KV shipping, in one home: how a prefill engine's KV reaches a decode engine.
//!
//! - `protocol` — the one prefill/decode exchange with the reference engine, shared by the
//!   serving path (`serving::legs`) and `pdagent engine generate`: a prefill engine's replies
//!   read as steps (`PrefillReplies`: begin the shipment, ship a piece, done, failed), and a
//!   decode engine started from a whole shipment (`decode_from`).
//! - `ship` — KV pieces over QUIC bulk streams: `KvSender` on the prefill side, `KvInbox` on
//!   the decode side (bounded in shipments and bytes).
//!
//! - `bridge` — the local channel to an engine's KV connector (pdagent's vLLM connector): the
//!   prefill engine's pieces come in over a unix socket and go out through `ship`; a decode
//!   engine's connector takes its shipment from the inbox the same way.
//!
//! The other KV path, engines that move their own KV (vLLM over NIXL), never passes through
//! here: the serving path carries only its `kv_transfer_params` (`serving::http_legs`).

pub mod bridge;
pub mod protocol;
pub mod ship;
