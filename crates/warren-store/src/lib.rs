//! Durable state of Warren in RocksDB.
//!
//! This is the only crate that names `rocksdb`. The layout (see docs/storage.md for the
//! measurements behind it) is a fixed set of column families, never one per queue:
//!
//! * `meta` — vhosts, exchanges, queues, bindings, users, … as opaque key/value records
//!   owned by the core, plus the `schema_version` key;
//! * `msgs` — persistent messages, keyed `queue id (u64 BE) ‖ seq (u64 BE)`, so a queue's
//!   messages are one contiguous key range: recovery is a prefix scan, purge and delete are
//!   one `DeleteRange`;
//! * `delivered` — the same keys, empty values, for messages handed to a consumer at least
//!   once, so a restart marks exactly those `redelivered`.
//!
//! All writes go through one writer thread ([`Store::submit`]) that drains its inbox into a
//! single `WriteBatch` and syncs it once: group commit. Each submission gets a [`Ticket`];
//! [`Store::synced`] publishes the highest ticket whose batch is on disk, which is what
//! publisher confirms wait for.

mod keys;
mod writer;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, DB};
use tokio::sync::{mpsc, watch};

pub use keys::{message_key, queue_range};

/// The on-disk format version. Bump it with a migration when a key or value layout changes.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";
const CF_META: &str = "meta";
const CF_MSGS: &str = "msgs";
const CF_DELIVERED: &str = "delivered";
/// Bound of the writer's inbox: publishers wait (backpressure) rather than queue without limit.
const INBOX_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("the store has been closed")]
    Closed,
    #[error("data dir has schema version {found}, this build understands {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// Identifies a queue's key range in the `msgs` CF. Assigned by the core, persisted with the
/// queue's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreQueueId(pub u64);

/// Position of one submission in the writer's order. A ticket is durable once
/// [`Store::synced`] has reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// One write. A submission's ops are applied atomically and in order.
#[derive(Debug, Clone)]
pub enum Op {
    PutMessage {
        queue: StoreQueueId,
        seq: u64,
        data: Bytes,
    },
    MarkDelivered {
        queue: StoreQueueId,
        seq: u64,
    },
    DeleteMessage {
        queue: StoreQueueId,
        seq: u64,
    },
    /// Removes every message of a queue (purge or delete): O(1) with DeleteRange.
    DeleteQueueMessages {
        queue: StoreQueueId,
    },
    /// Removes the messages `first..=last` of a queue (a purged paged-out range).
    DeleteMessageRange {
        queue: StoreQueueId,
        first: u64,
        last: u64,
    },
    /// A transient message of a queue whose backlog is paged out to the store. Not synced
    /// (nobody waits for it); recovery drops it, as a restart drops transient messages.
    PageOut {
        queue: StoreQueueId,
        seq: u64,
        data: Bytes,
    },
    PutMeta {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteMeta {
        key: Vec<u8>,
    },
}

impl Op {
    /// Whether the op must be on disk before anyone is told it happened. Deletes after acks
    /// and delivery marks may ride along unsynced: losing them in a crash only causes an
    /// allowed redelivery.
    fn needs_sync(&self) -> bool {
        matches!(
            self,
            Op::PutMessage { .. } | Op::PutMeta { .. } | Op::DeleteMeta { .. }
        )
    }
}

/// A metadata record: key and value.
pub type MetaRecord = (Vec<u8>, Vec<u8>);

/// A persistent message read back at recovery.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub seq: u64,
    pub data: Bytes,
    /// The message had been delivered before the restart.
    pub delivered: bool,
}

struct Submission {
    ticket: u64,
    ops: Vec<Op>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    /// `None` only while dropping (so the writer sees the channel close).
    tx: Option<mpsc::Sender<Submission>>,
    /// Next ticket to hand out; held only while sending a reserved permit, so the inbox
    /// order equals ticket order (the writer relies on it).
    next_ticket: parking_lot::Mutex<u64>,
    synced: watch::Receiver<u64>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    sync_writes: bool,
}

/// Options of [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync each batch before confirming it. Off only for benchmarks of the rest.
    pub sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { sync: true }
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_open_files(4096);
        db_opts.set_keep_log_file_num(4);
        let mut msg_opts = Options::default();
        msg_opts.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(8));
        msg_opts.set_memtable_prefix_bloom_ratio(0.1);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_MSGS, msg_opts.clone()),
            ColumnFamilyDescriptor::new(CF_DELIVERED, msg_opts),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, dir, cfs)?);
        check_schema(&db)?;
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let (synced_tx, synced_rx) = watch::channel(0u64);
        let writer_db = db.clone();
        let sync = options.sync;
        let handle = std::thread::Builder::new()
            .name("warren-store-writer".into())
            .spawn(move || writer::run(writer_db, rx, synced_tx, sync))
            .map_err(|e| StoreError::Corrupt(format!("cannot start writer thread: {e}")))?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                tx: Some(tx),
                next_ticket: parking_lot::Mutex::new(0),
                synced: synced_rx,
                writer: parking_lot::Mutex::new(Some(handle)),
                sync_writes: options.sync,
            }),
        })
    }

    /// Queues `ops` for the writer; waits only while its inbox is full (backpressure).
    pub async fn submit(&self, ops: Vec<Op>) -> Result<Ticket, StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        let permit = tx.reserve().await.map_err(|_| StoreError::Closed)?;
        Ok(self.send_with(permit, ops))
    }

    /// Blocking variant for threads outside the runtime (recovery, shutdown).
    pub fn submit_blocking(&self, ops: Vec<Op>) -> Result<Ticket, StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        let permit = tx.blocking_send_permit().map_err(|_| StoreError::Closed)?;
        Ok(self.send_with(permit, ops))
    }

    fn send_with(&self, permit: mpsc::Permit<'_, Submission>, ops: Vec<Op>) -> Ticket {
        let mut next = self.inner.next_ticket.lock();
        *next += 1;
        let ticket = *next;
        permit.send(Submission { ticket, ops });
        Ticket(ticket)
    }

    /// Highest ticket known to be durable; `changed()` wakes after every batch.
    pub fn synced(&self) -> watch::Receiver<u64> {
        self.inner.synced.clone()
    }

    /// Whether the batch of `ticket` is on disk already (no waiting).
    pub fn is_synced(&self, ticket: Ticket) -> bool {
        *self.inner.synced.borrow() >= ticket.0
    }

    /// Waits until `ticket` is durable.
    pub async fn wait_synced(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut rx = self.inner.synced.clone();
        rx.wait_for(|s| *s >= ticket.0)
            .await
            .map(|_| ())
            .map_err(|_| StoreError::Closed)
    }

    /// Whether batches are fsynced (the default).
    pub fn syncs_writes(&self) -> bool {
        self.inner.sync_writes
    }

    /// Every metadata record whose key starts with `prefix`, in key order.
    pub fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<MetaRecord>, StoreError> {
        let cf = self.cf(CF_META)?;
        let mut out = Vec::new();
        let iter = self
            .inner
            .db
            .iterator_cf(cf, IteratorMode::From(prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            if k.as_ref() == SCHEMA_KEY {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The persistent messages of one queue, in sequence order.
    pub fn load_queue(&self, queue: StoreQueueId) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out = Vec::new();
        self.scan_queue(queue, 0, u64::MAX, |m| {
            out.push(m);
            true
        })?;
        Ok(out)
    }

    /// Visits the messages `first..=last` of `queue` in sequence order, one at a time (a
    /// backlog is never all in memory), until `visit` returns false.
    pub fn scan_queue(
        &self,
        queue: StoreQueueId,
        first: u64,
        last: u64,
        mut visit: impl FnMut(StoredMessage) -> bool,
    ) -> Result<(), StoreError> {
        let msgs = self.cf(CF_MSGS)?;
        let delivered_cf = self.cf(CF_DELIVERED)?;
        let start = message_key(queue, first);
        let end = queue_range(queue).1;
        let in_range = |k: &[u8]| -> Result<Option<u64>, StoreError> {
            if k >= end.as_slice() {
                return Ok(None);
            }
            let seq = keys::seq_of(k)?;
            Ok((seq <= last).then_some(seq))
        };
        // Delivery marks are few (messages handed out before a restart): a set is small.
        let mut delivered = std::collections::HashSet::new();
        for item in self.inner.db.iterator_cf(
            delivered_cf,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, _) = item?;
            let Some(seq) = in_range(&k)? else { break };
            delivered.insert(seq);
        }
        for item in self.inner.db.iterator_cf(
            msgs,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            let Some(seq) = in_range(&k)? else { break };
            let m = StoredMessage {
                seq,
                data: Bytes::from(v.into_vec()),
                delivered: delivered.contains(&seq),
            };
            if !visit(m) {
                break;
            }
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Corrupt(format!("missing column family {name}")))
    }

    /// Stops the writer after it has written everything submitted so far. Idempotent; later
    /// submissions fail with [`StoreError::Closed`] once every handle is dropped.
    pub fn close(&self) {
        // The writer exits when the last sender is gone; we cannot drop `tx` while handles
        // live, so send an empty marker and wait for it to be synced instead.
        if let Ok(t) = self.submit_blocking(Vec::new()) {
            let mut rx = self.inner.synced.clone();
            let _ = futures_wait(&mut rx, t.0);
        }
    }
}

/// Blocks the current (non-runtime) thread until `synced >= ticket`.
fn futures_wait(rx: &mut watch::Receiver<u64>, ticket: u64) -> Result<(), StoreError> {
    loop {
        if *rx.borrow_and_update() >= ticket {
            return Ok(());
        }
        if rx.has_changed().is_err() {
            return Err(StoreError::Closed);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

impl Drop for Inner {
    /// Closes the inbox, lets the writer finish what was submitted, and waits for it, so
    /// the database is closed (and its lock released) when the last handle is gone.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.lock().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

trait BlockingPermit<T> {
    fn blocking_send_permit(&self) -> Result<mpsc::Permit<'_, T>, ()>;
}

impl<T> BlockingPermit<T> for mpsc::Sender<T> {
    fn blocking_send_permit(&self) -> Result<mpsc::Permit<'_, T>, ()> {
        loop {
            match self.try_reserve() {
                Ok(p) => return Ok(p),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    std::thread::sleep(std::time::Duration::from_micros(200))
                }
            }
        }
    }
}

fn check_schema(db: &DB) -> Result<(), StoreError> {
    let cf = db
        .cf_handle(CF_META)
        .ok_or_else(|| StoreError::Corrupt("missing meta CF".into()))?;
    match db.get_cf(cf, SCHEMA_KEY)? {
        Some(v) => {
            let found = <[u8; 4]>::try_from(v.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("schema_version".into()))?;
            if found != SCHEMA_VERSION {
                return Err(StoreError::Schema {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        None => {
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(cf, SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes(), &wo)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
