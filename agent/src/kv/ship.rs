//! KV shipping between hosts: the prefill side sends each KV piece (one layer, a token range)
//! on its own QUIC bulk stream the moment its engine hands it out; the decode side collects
//! the pieces of a shipment and hands them to its engine in order.
//!
//! On the wire a piece is one bulk stream: `BulkHeader { transfer_id: shipment, offset: piece
//! sequence number, len: piece bytes, meta: the 48-byte KV header, then the piece's checksum }`,
//! then the piece as `KvPiece::to_bytes` (16-byte piece header, then K rows, then V rows). Every
//! piece carries the KV header, so a receiver can check model fingerprint and layout on the
//! first byte it sees, and the CRC-32 (IEEE, as zlib computes it) of its K and V rows, taken
//! where the piece was made (the agent for the reference engine, the engine's KV connector for
//! vLLM) and checked before the piece is kept: a mismatch fails the shipment and is counted.
//! How many pieces make a shipment is told separately, when the prefill ends (the prefill
//! engine's first token comes last, after the last layer).
//!
//! A stream cut short fails its shipment at once: the waiting decode side learns immediately,
//! not after a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pd_engine::{KV_HEADER_BYTES, KvHeader, KvPiece};
use pd_transport::{BulkHeader, BulkReader, Connection, TransportError};
use tokio::sync::Notify;

use crate::util::Unpoisoned;
use crate::wire::kv::Seal;

/// Shipments a decode side holds at once; more are refused.
pub const SHIPMENTS_IN_FLIGHT_MAX: usize = 1024;
/// Largest piece accepted (one layer of a long context).
pub const KV_PIECE_BYTES_MAX: u64 = 512 << 20;

/// The checksum of a piece's K and V rows: CRC-32 (IEEE), as zlib's `crc32` computes it.
pub fn checksum(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// A test fault: with `PDAGENT_FAULT_KV_CORRUPT=PATH`, the next piece this agent sends after
/// a file appears at PATH has one byte flipped after its checksum was taken (what a bad copy
/// or bad memory would do); the file is removed, so one file corrupts one piece. Unset in
/// production (the variable is read once).
fn corrupt_now() -> bool {
    static PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::var_os("PDAGENT_FAULT_KV_CORRUPT").map(Into::into))
        .as_ref()
        .is_some_and(|p| std::fs::remove_file(p).is_ok())
}

/// Sends the pieces of one shipment over `conn`.
pub struct KvSender {
    conn: Connection,
    shipment: u64,
    header: [u8; KV_HEADER_BYTES],
    sent_pieces: u64,
    /// KV payload bytes (the K and V rows, without headers).
    pub payload_bytes: u64,
}

impl KvSender {
    pub fn new(conn: Connection, shipment: u64, header: &KvHeader) -> Self {
        KvSender {
            conn,
            shipment,
            header: header.to_bytes(),
            sent_pieces: 0,
            payload_bytes: 0,
        }
    }

    /// Sends one piece on its own stream and waits until the peer has it.
    pub async fn send(&mut self, piece: &KvPiece) -> Result<(), TransportError> {
        let crc = checksum(&piece.data);
        self.start(piece, crc).await
    }

    /// Counts one piece and returns the sending of it, which completes once the peer has it;
    /// several may be in flight at once (each is its own QUIC stream). `crc` is the piece's
    /// checksum as taken where it was made.
    pub fn start(
        &mut self,
        piece: &KvPiece,
        crc: u32,
    ) -> impl Future<Output = Result<(), TransportError>> + Send + 'static {
        let mut raw = piece.to_bytes();
        if corrupt_now()
            && let Some(b) = raw.last_mut()
        {
            *b ^= 0x5a;
            tracing::warn!(
                shipment = self.shipment,
                layer = piece.layer,
                "test fault: a KV piece corrupted after its checksum"
            );
        }
        let bytes = Bytes::from(raw);
        let mut meta = self.header.to_vec();
        meta.extend_from_slice(&crc.to_le_bytes());
        let header = BulkHeader {
            transfer_id: self.shipment,
            offset: self.sent_pieces,
            len: bytes.len() as u64,
            total_len: 0,
            meta,
        };
        self.sent_pieces += 1;
        self.payload_bytes += piece.data.len() as u64;
        let conn = self.conn.clone();
        async move { conn.send_bulk(&header, bytes).await }
    }

    pub fn pieces(&self) -> u64 {
        self.sent_pieces
    }
}

#[derive(Default)]
struct Shipment {
    /// Bytes of it the inbox's budget counts.
    held_bytes: u64,
    /// A decode leg waits for it (an unclaimed one is dropped after a short bound).
    claimed: bool,
    seal: Option<Seal>,
    /// When its first piece arrived.
    began: Option<std::time::Instant>,
    /// Pieces came from this host (not over the network).
    local: bool,
    header: Option<KvHeader>,
    /// Pieces with their checksums (verified on arrival).
    pieces: Vec<(KvPiece, u32)>,
    payload_bytes: u64,
    failed: Option<String>,
}

/// What arrived for a shipment, pieces in the order an engine imports them.
#[derive(Debug)]
pub struct Arrived {
    pub header: KvHeader,
    pub pieces: Vec<KvPiece>,
    /// Each piece's checksum, as its maker took it (and this host verified).
    pub checksums: Vec<u32>,
    pub payload_bytes: u64,
    /// The pieces came from this host, not over the network.
    pub local: bool,
}

/// The decode side's collection of shipments in progress, bounded in count
/// (`SHIPMENTS_IN_FLIGHT_MAX`, on every path that creates one) and in bytes (`bytes_max`, on
/// every path that adds a piece).
#[derive(Clone)]
pub struct KvInbox {
    shipments: Arc<Mutex<HashMap<u64, Shipment>>>,
    /// Bytes held by shipments and by pieces being received.
    held: Arc<AtomicU64>,
    bytes_max: u64,
    /// Shipments whose request is over (claimed, failed or cancelled), and when: pieces, seals
    /// or failures that still arrive for them are dropped, never held again.
    forgotten: Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    changed: Arc<Notify>,
    /// Pieces refused because their bytes did not match their checksum.
    integrity_failures: Arc<AtomicU64>,
}

impl Default for KvInbox {
    fn default() -> Self {
        KvInbox::new(INBOX_BYTES_MAX_DEFAULT)
    }
}

/// The inbox's byte budget when none is configured.
pub const INBOX_BYTES_MAX_DEFAULT: u64 = 8 << 30;

/// How long a forgotten shipment's id is remembered (late pieces come within moments).
const FORGOTTEN_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KvShipError {
    #[error("KV shipment {shipment} failed: {why}")]
    Failed { shipment: u64, why: String },
    #[error("KV shipment {shipment}: {got} of {expected} pieces after {ms} ms")]
    Timeout {
        shipment: u64,
        got: usize,
        expected: u64,
        ms: u64,
    },
}

impl KvInbox {
    pub fn new(bytes_max: u64) -> Self {
        KvInbox {
            shipments: Arc::default(),
            held: Arc::default(),
            bytes_max,
            forgotten: Arc::default(),
            changed: Arc::default(),
            integrity_failures: Arc::default(),
        }
    }

    /// Pieces refused so far because their bytes did not match their checksum.
    pub fn integrity_failures(&self) -> u64 {
        self.integrity_failures.load(Ordering::Relaxed)
    }

    /// Bytes held now (shipments, and pieces being received).
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Counts `bytes` against the budget, or says why not.
    fn reserve(&self, bytes: u64) -> Result<(), String> {
        let mut now = self.held.load(Ordering::Relaxed);
        loop {
            let next = now.saturating_add(bytes);
            if next > self.bytes_max {
                return Err(format!(
                    "this host's KV inbox is full: it holds {now} of {} bytes, a piece of {bytes} \
                     bytes does not fit (serving.kv_inbox_bytes_max)",
                    self.bytes_max
                ));
            }
            match self
                .held
                .compare_exchange(now, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => now = seen,
            }
        }
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(bytes))
            });
    }

    /// Removes a shipment, releasing its bytes.
    fn take(&self, s: &mut HashMap<u64, Shipment>, shipment: u64) -> Option<Shipment> {
        let sh = s.remove(&shipment)?;
        self.release(sh.held_bytes);
        Some(sh)
    }

    /// Consumes one piece stream (from `Service::bulk`). Refused or cut streams fail their
    /// shipment at once.
    pub async fn accept(&self, header: BulkHeader, mut body: BulkReader) -> Result<(), String> {
        let shipment = header.transfer_id;
        let fail = |why: String| {
            self.fail(shipment, &why);
            why
        };
        if header.len > KV_PIECE_BYTES_MAX {
            body.refuse();
            return Err(fail(format!(
                "a KV piece of {} bytes is over the limit",
                header.len
            )));
        }
        let kv = KvHeader::from_bytes(&header.meta).map_err(|e| fail(e.to_string()))?;
        let Some(crc) = header
            .meta
            .get(KV_HEADER_BYTES..KV_HEADER_BYTES + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            body.refuse();
            return Err(fail(
                "a KV piece without its checksum (the sending agent is older)".into(),
            ));
        };
        {
            let s = self.shipments.locked();
            if !s.contains_key(&shipment) && s.len() >= SHIPMENTS_IN_FLIGHT_MAX {
                drop(s);
                body.refuse();
                return Err(format!(
                    "{SHIPMENTS_IN_FLIGHT_MAX} KV shipments in flight; refusing more"
                ));
            }
        }
        // The announced length counts against the budget before a byte is read; more than
        // announced is refused.
        if let Err(why) = self.reserve(header.len) {
            body.refuse();
            return Err(fail(why));
        }
        let mut data = Vec::with_capacity((header.len as usize).min(1 << 20));
        loop {
            match body.chunk().await {
                Ok(Some(c)) if (data.len() + c.len()) as u64 <= header.len => {
                    data.extend_from_slice(&c)
                }
                Ok(Some(_)) => {
                    self.release(header.len);
                    body.refuse();
                    return Err(fail("a KV piece longer than announced".into()));
                }
                Ok(None) => break,
                Err(e) => {
                    self.release(header.len);
                    return Err(fail(e.to_string()));
                }
            }
        }
        let piece = match KvPiece::from_bytes(&data, &kv.geometry) {
            Ok(p) => p,
            Err(e) => {
                self.release(header.len);
                return Err(fail(e.to_string()));
            }
        };
        let got = checksum(&piece.data);
        if got != crc {
            self.release(header.len);
            self.integrity_failures.fetch_add(1, Ordering::Relaxed);
            return Err(fail(format!(
                "KV piece {} (layer {}, tokens {}..{}) failed its checksum: sent {crc:08x}, \
                 received {got:08x}; its KV is not used",
                header.offset,
                piece.layer,
                piece.token_start,
                piece.token_start + piece.token_count
            )));
        }
        self.insert(shipment, kv, piece, crc, false, header.len);
        Ok(())
    }

    /// Adds one piece of a shipment that did not cross the network (prefill and decode engine
    /// on the same host). Over the byte budget the shipment fails instead.
    pub fn put(&self, shipment: u64, header: KvHeader, piece: KvPiece, crc: u32) {
        let bytes = piece.data.len() as u64;
        match self.reserve(bytes) {
            Ok(()) => self.insert(shipment, header, piece, crc, true, bytes),
            Err(why) => self.fail(shipment, &why),
        }
    }

    fn is_forgotten(&self, shipment: u64) -> bool {
        self.forgotten.locked().contains_key(&shipment)
    }

    /// Adds a piece whose `bytes` were reserved; they are released if it is not kept.
    fn insert(
        &self,
        shipment: u64,
        header: KvHeader,
        piece: KvPiece,
        crc: u32,
        local: bool,
        bytes: u64,
    ) {
        let kept = self.update(shipment, |entry| {
            if entry.header.is_some_and(|h| h != header) {
                entry.failed = Some("pieces of one shipment disagree on the KV header".into());
            }
            entry.header = Some(header);
            entry.local = local;
            entry.payload_bytes += piece.data.len() as u64;
            entry.held_bytes += bytes;
            entry.pieces.push((piece, crc));
        });
        if !kept {
            self.release(bytes);
        }
    }

    /// Changes a live shipment (made on first use, while fewer than `SHIPMENTS_IN_FLIGHT_MAX`
    /// are held), then wakes its waiters; a forgotten shipment is left alone. Returns whether
    /// the change was made.
    fn update(&self, shipment: u64, change: impl FnOnce(&mut Shipment)) -> bool {
        if self.is_forgotten(shipment) {
            return false;
        }
        {
            let mut s = self.shipments.locked();
            if !s.contains_key(&shipment) && s.len() >= SHIPMENTS_IN_FLIGHT_MAX {
                tracing::warn!(
                    shipment,
                    "{SHIPMENTS_IN_FLIGHT_MAX} KV shipments held: dropped what came for another"
                );
                return false;
            }
            change(s.entry(shipment).or_insert_with(|| Shipment {
                began: Some(std::time::Instant::now()),
                ..Shipment::default()
            }));
        }
        self.changed.notify_waiters();
        true
    }

    /// Drops shipments that began more than `age` ago and that no decode leg claimed (their
    /// request ended elsewhere, or they were never asked for); returns how many.
    pub fn sweep(&self, age: Duration) -> usize {
        self.forgotten
            .locked()
            .retain(|_, t| t.elapsed() < FORGOTTEN_FOR);
        let mut s = self.shipments.locked();
        let stale: Vec<u64> = s
            .iter()
            .filter(|(_, sh)| !sh.claimed && sh.began.is_some_and(|t| t.elapsed() >= age))
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.take(&mut s, *id);
        }
        stale.len()
    }

    /// Marks a shipment as waited for (kept past the unclaimed bound).
    pub fn claim(&self, shipment: u64) {
        if let Some(sh) = self.shipments.locked().get_mut(&shipment) {
            sh.claimed = true;
        }
    }

    /// Shipments held now.
    pub fn len(&self) -> usize {
        self.shipments.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks a shipment failed (a cut stream, a cancelled request).
    pub fn fail(&self, shipment: u64, why: &str) {
        self.update(shipment, |entry| entry.failed = Some(why.to_string()));
    }

    /// Drops what is held for a shipment; whatever still arrives for it is dropped too.
    pub fn forget(&self, shipment: u64) {
        {
            let mut s = self.shipments.locked();
            self.take(&mut s, shipment);
        }
        self.forgotten
            .locked()
            .insert(shipment, std::time::Instant::now());
    }

    /// Records a shipment's seal (it may come before its last pieces were processed).
    pub fn seal(&self, seal: Seal) {
        let shipment = seal.shipment;
        if seal.pieces == 0 {
            self.fail(shipment, "a KV seal named no pieces");
            return;
        }
        self.update(shipment, |entry| entry.seal = Some(seal));
    }

    /// Waits until `shipment` is sealed and all its pieces arrived (or it failed, or `timeout`
    /// passed); returns the seal and the pieces, and forgets the shipment.
    pub async fn sealed(
        &self,
        shipment: u64,
        timeout: Duration,
    ) -> Result<(Seal, Arrived), KvShipError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            self.claim(shipment);
            let seal = self
                .shipments
                .locked()
                .get(&shipment)
                .and_then(|s| s.seal.clone());
            if let Some(seal) = seal {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                let arrived = self.complete(shipment, seal.pieces, left).await?;
                return Ok((seal, arrived));
            }
            let failed = self
                .shipments
                .locked()
                .get(&shipment)
                .and_then(|s| s.failed.clone());
            if let Some(why) = failed {
                self.forget(shipment);
                return Err(KvShipError::Failed { shipment, why });
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                self.forget(shipment);
                return Err(KvShipError::Timeout {
                    shipment,
                    got: 0,
                    expected: 0,
                    ms: timeout.as_millis() as u64,
                });
            }
        }
    }

    /// Waits until `pieces` pieces of `shipment` arrived (or it failed, or `timeout` passed);
    /// returns them sorted by layer and token range, and forgets the shipment.
    pub async fn complete(
        &self,
        shipment: u64,
        pieces: u64,
        timeout: Duration,
    ) -> Result<Arrived, KvShipError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.shipments.locked();
                if let Some(sh) = s.get(&shipment) {
                    if let Some(why) = &sh.failed {
                        let why = why.clone();
                        drop(s);
                        self.forget(shipment);
                        return Err(KvShipError::Failed { shipment, why });
                    }
                    if pieces > 0 && sh.pieces.len() as u64 >= pieces {
                        let mut sh = self.take(&mut s, shipment).expect("present");
                        drop(s);
                        self.forget(shipment);
                        sh.pieces.sort_by_key(|(p, _)| (p.layer, p.token_start));
                        let Some(header) = sh.header else {
                            return Err(KvShipError::Failed {
                                shipment,
                                why: "no KV header arrived".into(),
                            });
                        };
                        let (pieces, checksums) = sh.pieces.into_iter().unzip();
                        return Ok(Arrived {
                            header,
                            pieces,
                            checksums,
                            payload_bytes: sh.payload_bytes,
                            local: sh.local,
                        });
                    }
                }
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                let got = self
                    .shipments
                    .locked()
                    .get(&shipment)
                    .map_or(0, |s| s.pieces.len());
                self.forget(shipment);
                return Err(KvShipError::Timeout {
                    shipment,
                    got,
                    expected: pieces,
                    ms: timeout.as_millis() as u64,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_engine::KvGeometry;

    fn header() -> KvHeader {
        KvHeader {
            geometry: KvGeometry {
                model_fingerprint: 7,
                dtype: pd_engine::kv_format::DTYPE_F32,
                layers: 2,
                kv_heads: 1,
                head_dim: 2,
                block_size_tokens: 16,
            },
            token_count: 1,
        }
    }

    fn piece(layer: u32) -> KvPiece {
        KvPiece {
            layer,
            token_start: 0,
            token_count: 1,
            data: vec![0; 16],
        }
    }

    fn seal(pieces: u64) -> Seal {
        Seal {
            shipment: 9,
            pieces,
            header: header(),
            prompt_tokens: vec![1],
            first_token: 2,
        }
    }

    /// Pieces and the seal in either order; the shipment is handed over once, sorted.
    #[tokio::test]
    async fn sealed_shipments_are_handed_over_whole() {
        let inbox = KvInbox::default();
        inbox.put(9, header(), piece(1), 0);
        inbox.seal(seal(2));
        inbox.put(9, header(), piece(0), 0);
        let (s, arrived) = inbox.sealed(9, Duration::from_secs(5)).await.unwrap();
        assert_eq!(s.first_token, 2);
        assert_eq!(
            arrived.pieces.iter().map(|p| p.layer).collect::<Vec<_>>(),
            [0, 1]
        );
        assert!(arrived.local);
        assert!(inbox.is_empty());
    }

    /// A seal naming no pieces fails the shipment (regression: a panic on the missing header).
    #[tokio::test]
    async fn a_seal_without_pieces_fails_the_shipment() {
        let inbox = KvInbox::default();
        inbox.seal(seal(0));
        assert!(matches!(
            inbox.sealed(9, Duration::from_secs(5)).await,
            Err(KvShipError::Failed { .. })
        ));
    }

    /// What arrives for a forgotten shipment is dropped, not held until the sweep (regression:
    /// late pieces, seals and failures re-created entries).
    #[tokio::test]
    async fn forgotten_shipments_stay_forgotten() {
        let inbox = KvInbox::default();
        inbox.put(9, header(), piece(0), 0);
        inbox.forget(9);
        inbox.put(9, header(), piece(1), 0);
        inbox.seal(seal(2));
        inbox.fail(9, "cut");
        assert!(inbox.is_empty());
        assert_eq!(inbox.sweep(Duration::from_secs(600)), 0);
    }

    fn seal_of(shipment: u64, pieces: u64) -> Seal {
        Seal {
            shipment,
            ..seal(pieces)
        }
    }

    /// Over the byte budget a piece is refused with a clear error and its shipment fails;
    /// the other shipments go on, and the budget is given back as shipments are handed over.
    #[tokio::test]
    async fn a_shipment_over_the_byte_budget_is_refused_and_nothing_else_suffers() {
        let inbox = KvInbox::new(40);
        inbox.put(1, header(), piece(0), 0);
        inbox.put(1, header(), piece(1), 0);
        assert_eq!(inbox.held_bytes(), 32);
        inbox.put(2, header(), piece(0), 0);
        inbox.seal(seal_of(2, 1));
        match inbox.sealed(2, Duration::from_secs(5)).await {
            Err(KvShipError::Failed { why, .. }) => {
                assert!(why.contains("KV inbox is full"), "{why}");
                assert!(why.contains("kv_inbox_bytes_max"), "{why}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        inbox.seal(seal_of(1, 2));
        let (_, arrived) = inbox.sealed(1, Duration::from_secs(5)).await.unwrap();
        assert_eq!(arrived.pieces.len(), 2);
        assert_eq!(
            inbox.held_bytes(),
            0,
            "handed over: the budget is free again"
        );
        inbox.put(3, header(), piece(0), 0);
        assert_eq!(inbox.held_bytes(), 16);
    }

    /// Seals, failures and local pieces for new shipments are bounded like network pieces
    /// (regression: only the network path checked the count).
    #[test]
    fn every_path_that_creates_a_shipment_is_bounded() {
        let inbox = KvInbox::default();
        for id in 0..(SHIPMENTS_IN_FLIGHT_MAX as u64 + 10) {
            inbox.seal(seal_of(id, 1));
        }
        assert_eq!(inbox.len(), SHIPMENTS_IN_FLIGHT_MAX);
        inbox.fail(1_000_000, "x");
        inbox.put(1_000_001, header(), piece(0), 0);
        assert_eq!(inbox.len(), SHIPMENTS_IN_FLIGHT_MAX);
        assert_eq!(inbox.held_bytes(), 0, "a dropped piece holds no budget");
    }

    /// A shipment nobody claimed is dropped after the short bound, with its bytes; one a
    /// decode leg waits for is kept.
    #[test]
    fn unclaimed_shipments_are_swept_and_claimed_ones_kept() {
        let inbox = KvInbox::default();
        inbox.put(1, header(), piece(0), 0);
        inbox.put(2, header(), piece(0), 0);
        inbox.claim(2);
        assert_eq!(inbox.sweep(Duration::from_secs(600)), 0);
        assert_eq!(inbox.sweep(Duration::ZERO), 1);
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox.held_bytes(), 16);
    }
}
