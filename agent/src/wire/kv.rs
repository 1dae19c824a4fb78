//! What crosses hosts about a KV shipment besides its pieces (those are bulk streams: see
//! `kv::ship`).

use pd_engine::KvHeader;

/// What the prefill side tells the decode side once a shipment is whole: how many pieces make
/// it and what the decode engine needs besides the KV.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Seal {
    pub shipment: u64,
    pub pieces: u64,
    pub header: KvHeader,
    pub prompt_tokens: Vec<u32>,
    pub first_token: u32,
}
