//! KV shipping, in one home: how a prefill engine's KV reaches a decode engine.
//!
//! - `protocol` — the one prefill/decode exchange with the reference engine, shared by the
//!   serving path (`serving::legs`) and `pdagent engine generate`: a prefill engine's replies
//!   read as steps (`PrefillReplies`: begin the shipment, ship a piece, done, failed), and a
//!   decode engine started from a whole shipment (`decode_from`).
//! - `ship` — KV pieces over QUIC bulk streams: `KvSender` on the prefill side, `KvInbox` on
//!   the decode side (bounded in shipments and bytes).
//!
//! The other KV path, engines that move their own KV (vLLM over NIXL), never passes through
//! here: the serving path carries only its `kv_transfer_params` (`serving::http_legs`).

pub mod protocol;
pub mod ship;
