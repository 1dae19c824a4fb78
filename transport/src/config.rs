//! Transport tuning. Every value has a default chosen for bulk KV transfer (see the README's
//! performance section for how they were measured) and a bound checked by `validate`.

use serde::{Deserialize, Serialize};

/// A configuration value that is out of bounds: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct FieldError {
    pub field: String,
    pub why: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            why: why.into(),
        }
    }
}

pub const MIB: u64 = 1024 * 1024;

/// Congestion controllers quinn offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    Bbr,
    NewReno,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Per-stream flow-control window (bytes). 32 MiB keeps one stream busy on a fast link.
    pub stream_receive_window_bytes: u64,
    /// Per-connection receive window (bytes).
    pub receive_window_bytes: u64,
    /// Per-connection send window (bytes): how much unacknowledged data may be buffered.
    pub send_window_bytes: u64,
    /// SO_RCVBUF and SO_SNDBUF of the UDP socket. Below ~4 MiB, bursts overflow the kernel
    /// queue and packets are lost on a busy host.
    pub udp_buffer_bytes: usize,
    /// Largest UDP payload this endpoint sends or accepts. Path-MTU discovery probes up to it;
    /// 1452 fits Ethernet (1500 MTU over IPv6), 8952 fits 9000-byte jumbo frames.
    pub max_datagram_bytes: u16,
    /// UDP payload size used before path-MTU discovery has confirmed anything (≥ 1200). Raise
    /// it only where every path is known to carry it.
    pub initial_datagram_bytes: u16,
    /// Generic segmentation offload: hand the kernel several datagrams per system call.
    pub gso: bool,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Largest encoded message (RPC request or response) accepted, in bytes.
    pub frame_bytes_max: usize,
    /// Concurrent streams a peer may open on one connection, per direction.
    pub streams_per_connection_max: u32,
    /// Connections an endpoint accepts at once; more are refused.
    pub connections_max: usize,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout_ms: u64,
    /// Keep-alive interval (must be below the idle timeout).
    pub keep_alive_ms: u64,
    /// Time allowed for TLS plus the protocol-version hello.
    pub handshake_timeout_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            stream_receive_window_bytes: 32 * MIB,
            receive_window_bytes: 256 * MIB,
            send_window_bytes: 256 * MIB,
            udp_buffer_bytes: 4 * MIB as usize,
            max_datagram_bytes: 8952,
            initial_datagram_bytes: 1200,
            gso: true,
            congestion: Congestion::Cubic,
            frame_bytes_max: crate::codec::FRAME_BYTES_MAX_DEFAULT,
            streams_per_connection_max: 256,
            connections_max: 4096,
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
            handshake_timeout_ms: 5_000,
        }
    }
}

/// Datagrams a single `sendmsg` may carry so that their sum stays under the kernel's 64 KiB
/// GSO limit; quinn itself allows up to 10, which fails above ~6.5 KB per datagram.
pub fn gso_segments_max(datagram_bytes: u16) -> usize {
    const GSO_BYTES_MAX: usize = 65_000;
    (GSO_BYTES_MAX / datagram_bytes.max(1) as usize).clamp(1, 10)
}

impl TransportConfig {
    /// Checks every bound; `prefix` names the section in error messages (e.g. "transport").
    pub fn validate(&self, prefix: &str) -> Result<(), FieldError> {
        let f = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        let range = |name: &str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(FieldError::new(
                    f(name),
                    format!("{v} is out of range {lo}..={hi}"),
                ))
            } else {
                Ok(())
            }
        };
        // quinn's flow-control windows are QUIC varints (< 2^62); stay far below.
        range(
            "stream_receive_window_bytes",
            self.stream_receive_window_bytes,
            64 * 1024,
            1 << 32,
        )?;
        range(
            "receive_window_bytes",
            self.receive_window_bytes,
            64 * 1024,
            1 << 34,
        )?;
        range(
            "send_window_bytes",
            self.send_window_bytes,
            64 * 1024,
            1 << 34,
        )?;
        if self.stream_receive_window_bytes > self.receive_window_bytes {
            return Err(FieldError::new(
                f("stream_receive_window_bytes"),
                "must not exceed receive_window_bytes",
            ));
        }
        range(
            "udp_buffer_bytes",
            self.udp_buffer_bytes as u64,
            64 * 1024,
            1 << 30,
        )?;
        range(
            "max_datagram_bytes",
            self.max_datagram_bytes as u64,
            1200,
            65_527,
        )?;
        range(
            "initial_datagram_bytes",
            self.initial_datagram_bytes as u64,
            1200,
            65_527,
        )?;
        if self.initial_datagram_bytes > self.max_datagram_bytes {
            return Err(FieldError::new(
                f("initial_datagram_bytes"),
                "must not exceed max_datagram_bytes",
            ));
        }
        range(
            "frame_bytes_max",
            self.frame_bytes_max as u64,
            1024,
            256 * MIB,
        )?;
        range(
            "streams_per_connection_max",
            self.streams_per_connection_max as u64,
            1,
            65_536,
        )?;
        range("connections_max", self.connections_max as u64, 1, 1 << 20)?;
        range("idle_timeout_ms", self.idle_timeout_ms, 100, 3_600_000)?;
        range("keep_alive_ms", self.keep_alive_ms, 10, 3_600_000)?;
        range(
            "handshake_timeout_ms",
            self.handshake_timeout_ms,
            10,
            600_000,
        )?;
        if self.keep_alive_ms >= self.idle_timeout_ms {
            return Err(FieldError::new(
                f("keep_alive_ms"),
                "must be below idle_timeout_ms",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        TransportConfig::default().validate("transport").unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut c = TransportConfig {
            max_datagram_bytes: 900,
            ..Default::default()
        };
        assert_eq!(
            c.validate("transport").unwrap_err().field,
            "transport.max_datagram_bytes"
        );
        c = TransportConfig {
            initial_datagram_bytes: 9000,
            ..Default::default()
        };
        assert_eq!(
            c.validate("t").unwrap_err().field,
            "t.initial_datagram_bytes"
        );
        c = TransportConfig {
            keep_alive_ms: 20_000,
            ..Default::default()
        };
        assert_eq!(c.validate("").unwrap_err().field, "keep_alive_ms");
    }

    #[test]
    fn gso_segments_stay_under_the_kernel_limit() {
        assert_eq!(gso_segments_max(1452), 10);
        assert_eq!(gso_segments_max(6500), 10);
        assert_eq!(gso_segments_max(8952), 7);
        assert_eq!(gso_segments_max(65_000), 1);
        for d in [1200u16, 1452, 4000, 6600, 8952, 9000, 16_000] {
            assert!(gso_segments_max(d) * d as usize <= 65_000 || gso_segments_max(d) == 1);
        }
    }
}
