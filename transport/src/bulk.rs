//! Bulk byte streams (the KV cache): one unidirectional stream per transfer part, a small
//! header frame, then raw bytes with no per-chunk serialisation. A transfer can be striped over
//! several connections on several endpoints (UDP sockets), because one quinn connection is
//! driven by one task and so by one core.

use bytes::Bytes;
use quinn::VarInt;
use serde::{Deserialize, Serialize};

use crate::endpoint::{Connection, TransportError, stream_code};

/// Largest encoded bulk header.
pub const BULK_HEADER_BYTES_MAX: usize = 64 * 1024;

/// Says what the raw bytes after it are. `meta` is opaque to the transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkHeader {
    /// Chosen by the sender; the parts of one striped transfer share it.
    pub transfer_id: u64,
    /// Where this part's bytes start within the whole transfer.
    pub offset: u64,
    /// Bytes that follow on this stream.
    pub len: u64,
    /// Bytes in the whole transfer.
    pub total_len: u64,
    pub meta: Vec<u8>,
}

/// Writes the raw bytes of one bulk stream.
pub struct BulkWriter {
    send: quinn::SendStream,
    remaining: u64,
}

impl BulkWriter {
    pub(crate) fn new(send: quinn::SendStream, len: u64) -> Self {
        BulkWriter {
            send,
            remaining: len,
        }
    }

    /// Queues bytes without copying them.
    pub async fn write(&mut self, data: Bytes) -> Result<(), TransportError> {
        if data.len() as u64 > self.remaining {
            return Err(TransportError::Stream(format!(
                "bulk write of {} bytes exceeds the {} bytes left in the header's length",
                data.len(),
                self.remaining
            )));
        }
        self.remaining -= data.len() as u64;
        self.send
            .write_chunk(data)
            .await
            .map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Ends the stream and waits until the peer has acknowledged every byte (or stopped it).
    pub async fn finish(mut self) -> Result<(), TransportError> {
        if self.remaining != 0 {
            let _ = self.send.reset(VarInt::from_u32(stream_code::REFUSED));
            return Err(TransportError::Stream(format!(
                "bulk stream finished {} bytes short",
                self.remaining
            )));
        }
        self.send
            .finish()
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        match self.send.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(TransportError::Stream(format!(
                "peer stopped the bulk stream (code {code})"
            ))),
            Err(e) => Err(TransportError::Stream(e.to_string())),
        }
    }

    /// Abandons the transfer: the receiver learns at once.
    pub fn abort(mut self) {
        let _ = self.send.reset(VarInt::from_u32(stream_code::REFUSED));
    }
}

/// Reads the raw bytes of one bulk stream, checking that exactly `len` bytes arrive.
pub struct BulkReader {
    recv: quinn::RecvStream,
    remaining: u64,
}

impl BulkReader {
    pub(crate) fn new(recv: quinn::RecvStream, len: u64) -> Self {
        BulkReader {
            recv,
            remaining: len,
        }
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next chunk, without copying; `None` once all `len` bytes have arrived. A stream cut
    /// short (reset by the sender, connection lost) is an error at once.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        match self.recv.read_chunk(usize::MAX, true).await {
            Ok(Some(c)) => {
                if c.bytes.len() as u64 > self.remaining {
                    let _ = self.recv.stop(VarInt::from_u32(stream_code::TOO_LARGE));
                    return Err(TransportError::Stream(
                        "bulk stream carries more bytes than its header says".into(),
                    ));
                }
                self.remaining -= c.bytes.len() as u64;
                Ok(Some(c.bytes))
            }
            Ok(None) => Err(TransportError::Stream(format!(
                "bulk stream ended {} bytes short",
                self.remaining
            ))),
            Err(e) => Err(TransportError::Stream(format!("bulk stream cut: {e}"))),
        }
    }

    /// Refuses the rest of the transfer: the sender learns at once.
    pub fn refuse(mut self) {
        let _ = self.recv.stop(VarInt::from_u32(stream_code::REFUSED));
    }
}

/// Splits `[0, len)` into `parts` contiguous ranges of nearly equal size.
pub fn stripe_ranges(len: u64, parts: usize) -> Vec<(u64, u64)> {
    let parts = parts.max(1) as u64;
    let base = len / parts;
    let extra = len % parts;
    let mut out = Vec::with_capacity(parts as usize);
    let mut off = 0;
    for i in 0..parts {
        let l = base + u64::from(i < extra);
        out.push((off, l));
        off += l;
    }
    out
}

/// Sends `data` striped over `lanes` (connections to the same peer, ideally on different
/// endpoints), one part per lane, concurrently; returns when every part is acknowledged.
pub async fn send_striped(
    lanes: &[Connection],
    transfer_id: u64,
    meta: &[u8],
    data: Bytes,
) -> Result<(), TransportError> {
    if lanes.is_empty() {
        return Err(TransportError::Stream("no lanes to send on".into()));
    }
    let total = data.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for (lane, (off, len)) in lanes.iter().zip(stripe_ranges(total, lanes.len())) {
        let header = BulkHeader {
            transfer_id,
            offset: off,
            len,
            total_len: total,
            meta: meta.to_vec(),
        };
        let part = data.slice(off as usize..(off + len) as usize);
        let lane = lane.clone();
        tasks.spawn(async move { lane.send_bulk(&header, part).await });
    }
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        let r = r
            .map_err(|e| TransportError::Stream(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = r {
            first_err.get_or_insert(e);
            tasks.abort_all();
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_everything_once() {
        for (len, parts) in [(0u64, 3usize), (10, 3), (1 << 30, 8), (7, 7), (5, 8)] {
            let r = stripe_ranges(len, parts);
            assert_eq!(r.len(), parts);
            let mut off = 0;
            for (o, l) in &r {
                assert_eq!(*o, off);
                off += l;
            }
            assert_eq!(off, len);
            let (min, max) = (
                r.iter().map(|x| x.1).min().unwrap(),
                r.iter().map(|x| x.1).max().unwrap(),
            );
            assert!(max - min <= 1);
        }
    }
}
