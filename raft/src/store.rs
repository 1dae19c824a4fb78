//! Raft log, vote and snapshots on disk in one redb database under the data dir. Every write
//! commits with redb's default durability (fsync) before openraft is told it is done, so
//! nothing acknowledged is lost to a crash; the commits run on blocking threads, never on the
//! async runtime. The state machine lives in memory: on start it is
//! restored from the last snapshot and openraft re-applies the committed log after it.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{
    LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot, SnapshotMeta,
};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::state::{Applied, ClusterState, CommandResult, SCHEMA_VERSION};
use crate::types::{NodeId, TypeConfig};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT: &str = "snapshot";
/// The file under the data dir.
pub const RAFT_DB_FILE: &str = "raft.redb";
/// Largest encoded snapshot or log entry read back.
const RECORD_BYTES_MAX: usize = 256 * 1024 * 1024;

type SResult<T> = Result<T, StorageError<NodeId>>;

/// openraft 0.9 builds its IO errors as `StorageIOError`s; these wrap them.
mod err {
    use openraft::storage::SnapshotSignature;
    use openraft::{AnyError, StorageError, StorageIOError};

    use crate::types::NodeId;

    type E = StorageError<NodeId>;

    pub fn read_logs(e: AnyError) -> E {
        StorageIOError::read_logs(e).into()
    }
    pub fn write_logs(e: AnyError) -> E {
        StorageIOError::write_logs(e).into()
    }
    pub fn read_vote(e: AnyError) -> E {
        StorageIOError::read_vote(e).into()
    }
    pub fn write_vote(e: AnyError) -> E {
        StorageIOError::write_vote(e).into()
    }
    pub fn read_state_machine(e: AnyError) -> E {
        StorageIOError::read_state_machine(e).into()
    }
    pub fn write_snapshot(sig: Option<SnapshotSignature<NodeId>>, e: AnyError) -> E {
        StorageIOError::write_snapshot(sig, e).into()
    }
    pub fn read_snapshot(sig: Option<SnapshotSignature<NodeId>>, e: AnyError) -> E {
        StorageIOError::read_snapshot(sig, e).into()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the Raft database {path}: {why}")]
    Open { path: String, why: String },
    #[error(
        "the Raft database holds a snapshot of schema {found}; this pdagent knows up to {SCHEMA_VERSION}: upgrade pdagent"
    )]
    NewerSchema { found: u32 },
    #[error("reading the Raft database: {0}")]
    Read(String),
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    pd_transport::codec::encode(v).map_err(|e| AnyError::new(&e))
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, AnyError> {
    pd_transport::codec::decode(b, RECORD_BYTES_MAX).map_err(|e| AnyError::new(&e))
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
) -> impl Fn(AnyError) -> StorageError<NodeId> {
    move |e| StorageIOError::new(subject.clone(), verb, e).into()
}

fn any<E: std::error::Error + 'static>(e: E) -> AnyError {
    AnyError::new(&e)
}

/// Runs a redb write (its commit waits for fsync) on a blocking thread, so that a Raft write
/// never stalls the async runtime that serves requests. openraft calls the storage one call at
/// a time, so writes still happen in order.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AnyError> + Send + 'static,
) -> Result<T, AnyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AnyError::error(format!("the storage thread failed: {e}")))?
}

/// Writes `bytes` under `key` in the META table, committed.
async fn put_meta_bytes(
    db: Arc<Database>,
    key: &'static str,
    bytes: Vec<u8>,
) -> Result<(), AnyError> {
    off_runtime(move || {
        let txn = db.begin_write().map_err(any)?;
        {
            let mut t = txn.open_table(META).map_err(any)?;
            t.insert(key, bytes.as_slice()).map_err(any)?;
        }
        txn.commit().map_err(any)
    })
    .await
}

/// Opens (or creates) the database under `dir` and returns the log store and the state
/// machine, the latter restored from the last snapshot.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
        path: dir.display().to_string(),
        why: e.to_string(),
    })?;
    let path = dir.join(RAFT_DB_FILE);
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let db = Database::create(&path).map_err(|e| open_err(&e))?;
    let txn = db.begin_write().map_err(|e| open_err(&e))?;
    txn.open_table(LOGS).map_err(|e| open_err(&e))?;
    txn.open_table(META).map_err(|e| open_err(&e))?;
    txn.commit().map_err(|e| open_err(&e))?;
    let db = Arc::new(db);
    let log = LogStore { db: db.clone() };
    let sm = StateMachineStore {
        db,
        data: SharedState::default(),
        snapshots_built: 0,
    };
    if let Some(stored) = sm
        .read_snapshot()
        .map_err(|e| StoreError::Read(e.to_string()))?
    {
        let data =
            StateMachineData::decode(&stored.data).map_err(|e| StoreError::Read(e.to_string()))?;
        if data.state.schema_version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                found: data.state.schema_version,
            });
        }
        *sm.write() = data;
    }
    Ok((log, sm))
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let txn = self.db.begin_read().map_err(any)?;
        let t = txn.open_table(META).map_err(any)?;
        match t.get(key).map_err(any)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, v: &T) -> Result<(), AnyError> {
        put_meta_bytes(self.db.clone(), key, encode(v)?).await
    }

    async fn remove_logs(&self, range: (Bound<u64>, Bound<u64>)) -> Result<(), AnyError> {
        let db = self.db.clone();
        off_runtime(move || {
            let txn = db.begin_write().map_err(any)?;
            {
                let mut t = txn.open_table(LOGS).map_err(any)?;
                t.retain_in(range, |_, _| false).map_err(any)?;
            }
            txn.commit().map_err(any)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let txn = self.db.begin_read().map_err(any)?;
            let t = txn.open_table(LOGS).map_err(any)?;
            let start = match range.start_bound() {
                Bound::Included(x) => *x,
                Bound::Excluded(x) => x.saturating_add(1),
                Bound::Unbounded => 0,
            };
            let mut out = Vec::new();
            for item in t.range(start..).map_err(any)? {
                let (k, v) = item.map_err(any)?;
                if !range.contains(&k.value()) {
                    break;
                }
                out.push(decode(v.value())?);
            }
            Ok(out)
        };
        read().map_err(err::read_logs)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let read = || -> Result<LogState<TypeConfig>, AnyError> {
            let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(KEY_PURGED)?;
            let txn = self.db.begin_read().map_err(any)?;
            let t = txn.open_table(LOGS).map_err(any)?;
            let last = match t.last().map_err(any)? {
                Some((_, v)) => Some(decode::<Entry<TypeConfig>>(v.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.or(last_purged_log_id),
            })
        };
        read().map_err(err::read_logs)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        self.put_meta(KEY_VOTE, vote).await.map_err(err::write_vote)
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE).map_err(err::read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        self.put_meta(KEY_COMMITTED, &committed)
            .await
            .map_err(io_err(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)
            .map_err(io_err(ErrorSubject::Store, ErrorVerb::Read))?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode(&e)?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, AnyError>>();
        let db = self.db.clone();
        let written = match encoded {
            Ok(encoded) => {
                off_runtime(move || {
                    let txn = db.begin_write().map_err(any)?;
                    {
                        let mut t = txn.open_table(LOGS).map_err(any)?;
                        for (index, bytes) in &encoded {
                            t.insert(*index, bytes.as_slice()).map_err(any)?;
                        }
                    }
                    txn.commit().map_err(any)
                })
                .await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(err::write_logs(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.remove_logs((Bound::Included(log_id.index), Bound::Unbounded))
            .await
            .map_err(err::write_logs)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        // Record the purge point first: entries at or before it are ignored from then on.
        self.put_meta(KEY_PURGED, &log_id)
            .await
            .map_err(err::write_logs)?;
        self.remove_logs((Bound::Unbounded, Bound::Included(log_id.index)))
            .await
            .map_err(err::write_logs)
    }
}

/// What the state machine holds: the cluster state and Raft's bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateMachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, crate::types::RaftPeer>,
    pub state: ClusterState,
}

impl StateMachineData {
    /// Reads a snapshot's state machine, of this schema or an older one (converted).
    pub fn decode(bytes: &[u8]) -> Result<StateMachineData, AnyError> {
        let current = match decode::<StateMachineData>(bytes) {
            Ok(d) => return Ok(d),
            Err(e) => e,
        };
        if let Ok(v3) = decode::<StateMachineDataV3>(bytes) {
            return Ok(StateMachineData {
                last_applied: v3.last_applied,
                last_membership: v3.last_membership,
                state: v3.state.into(),
            });
        }
        if let Ok(v2) = decode::<StateMachineDataV2>(bytes) {
            return Ok(StateMachineData {
                last_applied: v2.last_applied,
                last_membership: v2.last_membership,
                state: v2.state.into(),
            });
        }
        match decode::<StateMachineDataV1>(bytes) {
            Ok(v1) => Ok(StateMachineData {
                last_applied: v1.last_applied,
                last_membership: v1.last_membership,
                state: v1.state.into(),
            }),
            Err(_) => Err(current),
        }
    }
}

/// `StateMachineData` as schema 3 wrote it (before the re-planner's settings and decisions).
#[derive(Deserialize)]
struct StateMachineDataV3 {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, crate::types::RaftPeer>,
    state: crate::state::ClusterStateV3,
}

/// `StateMachineData` as schema 2 wrote it (before engine arguments).
#[derive(Deserialize)]
struct StateMachineDataV2 {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, crate::types::RaftPeer>,
    state: crate::state::ClusterStateV2,
}

/// `StateMachineData` as schema 1 wrote it (before plans).
#[derive(Deserialize)]
struct StateMachineDataV1 {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, crate::types::RaftPeer>,
    state: crate::state::ClusterStateV1,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, crate::types::RaftPeer>,
    data: Vec<u8>,
}

/// The applied state, shared between the state machine (which writes it) and readers in the
/// agent (status, placement), who take the read lock briefly.
pub type SharedState = Arc<std::sync::RwLock<StateMachineData>>;

/// The state machine: `ClusterState` in memory, snapshots on disk.
pub struct StateMachineStore {
    db: Arc<Database>,
    data: SharedState,
    snapshots_built: u64,
}

impl StateMachineStore {
    /// A copy of the current cluster state.
    pub fn state(&self) -> ClusterState {
        self.read().state.clone()
    }

    /// A handle on the applied state that stays valid after the store moves into Raft.
    pub fn shared(&self) -> SharedState {
        self.data.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, StateMachineData> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, StateMachineData> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, AnyError> {
        let txn = self.db.begin_read().map_err(any)?;
        let t = txn.open_table(META).map_err(any)?;
        match t.get(KEY_SNAPSHOT).map_err(any)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    async fn write_snapshot(&self, s: &StoredSnapshot) -> Result<(), AnyError> {
        put_meta_bytes(self.db.clone(), KEY_SNAPSHOT, encode(s)?).await
    }
}

/// Builds snapshots from a copy of the state taken when openraft asks for a builder.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    data: StateMachineData,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let bytes = encode(&self.data).map_err(err::read_state_machine)?;
        let snapshot_id = match self.data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("--{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.data.last_applied,
            last_membership: self.data.last_membership.clone(),
            snapshot_id,
        };
        let store = StateMachineStore {
            db: self.db.clone(),
            data: SharedState::default(),
            snapshots_built: 0,
        };
        store
            .write_snapshot(&StoredSnapshot {
                meta: meta.clone(),
                data: bytes.clone(),
            })
            .await
            .map_err(|e| err::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> SResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, crate::types::RaftPeer>,
    )> {
        let d = self.read();
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut d = self.write();
        for e in entries {
            d.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Ok(Applied::Done),
                EntryPayload::Normal(cmd) => d.state.apply(e.log_id.index, &cmd),
                EntryPayload::Membership(m) => {
                    d.last_membership = StoredMembership::new(Some(e.log_id), m);
                    Ok(Applied::Done)
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            data: self.read().clone(),
            seq: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, crate::types::RaftPeer>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let bytes = snapshot.into_inner();
        let data = StateMachineData::decode(&bytes)
            .map_err(|e| err::read_snapshot(Some(meta.signature()), e))?;
        if data.state.schema_version > SCHEMA_VERSION {
            let e = AnyError::error(format!(
                "snapshot has schema {}, this pdagent knows up to {SCHEMA_VERSION}",
                data.state.schema_version
            ));
            return Err(err::read_snapshot(Some(meta.signature()), e));
        }
        self.write_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        })
        .await
        .map_err(|e| err::write_snapshot(Some(meta.signature()), e))?;
        *self.write() = data;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let s = self
            .read_snapshot()
            .map_err(|e| err::read_snapshot(None, e))?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
