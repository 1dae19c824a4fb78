//! `pd-transport`: pdagent's wire.
//!
//! Owns: the codec (bincode 2.0.1, in `codec` only), the protocol-version hello, the cluster
//! PKI (CA, node and admin certificates, join tokens), the quinn endpoint with mutual TLS,
//! typed request/response and streaming RPC, raw bulk byte streams striped over several connections, and the
//! transport benchmark.
//!
//! Must never: know what a request, an engine or a Raft entry means. Callers bring their own
//! message types through `Service` and `Connection::call`.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bulk;
pub mod codec;
pub mod config;
pub mod endpoint;
pub mod enroll;
pub mod pki;
pub mod socket;
pub mod tls;

pub use bulk::{BulkHeader, BulkReader, BulkWriter, send_striped};
pub use config::{FieldError, TransportConfig};
pub use endpoint::{
    Connection, Endpoint, PROTOCOL_VERSION, ResponseSink, ResponseStream, RevocationList, Service,
    TransportError,
};
pub use pki::PeerIdentity;
pub use tls::Identity;
