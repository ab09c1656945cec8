//! The embedded backend: one redb file in the state directory, fsynced on every commit.
//!
//! On disk (format 2): table "kv" maps a key to a 24-byte header (mod revision, create
//! revision, lease id: little-endian u64, u64, i64 with 0 for none) and then the value;
//! "meta" holds the store revision, the format and the next lease id; "leases" maps a lease
//! id to its TTL in milliseconds. Format 1 (an 8-byte mod revision, then the value; no
//! "format" entry) is rewritten to format 2 in one transaction at open.
//!
//! In memory: the events of the last [`HISTORY_EVENTS`] or so changes, so watches can start
//! at a past revision, and each lease's deadline and keys. Deadlines are not persisted: at open
//! every lease gets a fresh full TTL, so a daemon that restarts and keeps its leases alive
//! loses nothing, and the keys of a lease nobody renews vanish one TTL after open.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use tokio::sync::watch;

use crate::{
    Event, KeyValue, LeaseId, LeaseTtl, Listing, Op, Store, StoreError, Txn, TxnOutcome, Watch,
    WatchError, WatchSource,
};

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// lease id -> TTL in milliseconds.
const LEASES: TableDefinition<'_, i64, u64> = TableDefinition::new("leases");
const REVISION: &str = "revision";
const FORMAT: &str = "format";
const NEXT_LEASE: &str = "next_lease";
/// 8-byte mod revision + value, and no FORMAT entry in "meta".
const FORMAT_V1: u64 = 1;
/// [`HEADER`] + value.
const FORMAT_V2: u64 = 2;
const HEADER: usize = 24;

/// How many recent events are kept for watches that start in the past (and for slow
/// watchers): older revisions answer [`WatchError::Compacted`].
const HISTORY_EVENTS: usize = 10_000;
/// Transactions copied out of the history per lock, so one slow watcher cannot hold it long.
const PULL_TXNS: usize = 256;

pub struct RedbStore {
    inner: Arc<Inner>,
    /// The lease expiry thread; joined on drop so the database is closed when drop returns.
    expiry: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Held from the start of a write transaction until its events are published, so
    /// watchers see transactions in commit order. Lock order: writer, leases, history.
    writer: Mutex<()>,
    leases: Mutex<HashMap<LeaseId, Lease>>,
    history: Arc<Mutex<History>>,
    /// The newest published revision; dropping it (with the store) closes the watches.
    published: watch::Sender<u64>,
    expiry_ctl: Mutex<ExpiryCtl>,
    expiry_wake: Condvar,
    /// Held for the life of the store: one daemon per state directory.
    _lock: File,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Default)]
struct ExpiryCtl {
    closed: bool,
    /// A lease was granted since the thread last looked: recompute the next deadline.
    dirty: bool,
}

/// The retained events, one entry per transaction, and the revision before the oldest one.
struct History {
    entries: VecDeque<(u64, Arc<[Event]>)>,
    events: usize,
    /// Every transaction with a revision above this is in `entries`.
    compacted: u64,
    latest: u64,
}

impl History {
    fn push(&mut self, revision: u64, events: Arc<[Event]>) {
        self.events += events.len();
        self.entries.push_back((revision, events));
        self.latest = revision;
        while self.events > HISTORY_EVENTS && self.entries.len() > 1 {
            if let Some((r, e)) = self.entries.pop_front() {
                self.compacted = r;
                self.events -= e.len();
            }
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A poisoned lock only means another thread panicked while holding it; every critical
/// section here leaves the data consistent at each step, so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn deadline_after(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn decode(key: &str, raw: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt = || StoreError::Corrupt {
        key: key.to_string(),
        why: format!("{} bytes, shorter than the {HEADER}-byte header", raw.len()),
    };
    let (m, rest) = raw.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (c, rest) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (l, value) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let lease = i64::from_le_bytes(*l);
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision: u64::from_le_bytes(*c),
        mod_revision: u64::from_le_bytes(*m),
        lease: (lease != 0).then_some(lease),
    })
}

fn encode(
    mod_revision: u64,
    create_revision: u64,
    lease: Option<LeaseId>,
    value: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + value.len());
    v.extend_from_slice(&mod_revision.to_le_bytes());
    v.extend_from_slice(&create_revision.to_le_bytes());
    v.extend_from_slice(&lease.unwrap_or(0).to_le_bytes());
    v.extend_from_slice(value);
    v
}

fn read_kv(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<KeyValue>, StoreError> {
    match kv.get(key).map_err(backend)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

/// Keys under `prefix`, in order.
fn keys_under(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> Result<Vec<String>, StoreError> {
    let mut keys = Vec::new();
    for entry in kv.range(prefix..).map_err(backend)? {
        let (k, _) = entry.map_err(backend)?;
        let k = k.value();
        if !k.starts_with(prefix) {
            break;
        }
        keys.push(k.to_string());
    }
    Ok(keys)
}

/// Rewrites every format-1 value with the format-2 header: create revision = mod revision,
/// no lease. A value too short to carry even the old header is left as it is (it reads as
/// [`StoreError::Corrupt`]).
fn migrate_v1(w: &WriteTransaction) -> Result<(), StoreError> {
    let mut kv = w.open_table(KV).map_err(backend)?;
    let mut rows = Vec::new();
    for entry in kv.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        rows.push((k.value().to_string(), v.value().to_vec()));
    }
    for (k, v) in rows {
        let Some((rev, value)) = v.split_first_chunk::<8>() else {
            tracing::warn!(key = %k, "store value shorter than its revision header; left as is");
            continue;
        };
        let rev = u64::from_le_bytes(*rev);
        kv.insert(k.as_str(), encode(rev, rev, None, value).as_slice())
            .map_err(backend)?;
    }
    Ok(())
}

/// Creates the tables of a new store, migrates an old one, and returns the revision.
fn prepare(db: &Database) -> Result<u64, StoreError> {
    let w = db.begin_write().map_err(backend)?;
    let revision = {
        let mut meta = w.open_table(META).map_err(backend)?;
        let format = match meta.get(FORMAT).map_err(backend)?.map(|v| v.value()) {
            Some(f) => f,
            None if meta.get(REVISION).map_err(backend)?.is_some() => FORMAT_V1,
            None => FORMAT_V2,
        };
        match format {
            FORMAT_V1 => {
                tracing::info!("migrating the store from format 1 to format 2");
                migrate_v1(&w)?;
            }
            FORMAT_V2 => w.open_table(KV).map(drop).map_err(backend)?,
            f => {
                return Err(StoreError::Backend(format!(
                    "store format {f} is newer than this berth understands ({FORMAT_V2})"
                )));
            }
        }
        meta.insert(FORMAT, FORMAT_V2).map_err(backend)?;
        let revision = meta
            .get(REVISION)
            .map_err(backend)?
            .map(|v| v.value())
            .unwrap_or(0);
        meta.insert(REVISION, revision).map_err(backend)?;
        revision
    };
    w.open_table(LEASES).map_err(backend)?;
    w.commit().map_err(backend)?;
    Ok(revision)
}

/// The persisted leases, each with a full TTL from now, and the keys bound to them. A key
/// bound to a lease that is not in the table (only after corruption) gets a lease that
/// expires at once, so it is not stranded.
fn load_leases(db: &Database) -> Result<HashMap<LeaseId, Lease>, StoreError> {
    let r = db.begin_read().map_err(backend)?;
    let mut leases = HashMap::new();
    for entry in r
        .open_table(LEASES)
        .map_err(backend)?
        .iter()
        .map_err(backend)?
    {
        let (id, ttl_ms) = entry.map_err(backend)?;
        let ttl = Duration::from_millis(ttl_ms.value());
        leases.insert(
            id.value(),
            Lease {
                ttl,
                deadline: deadline_after(ttl),
                keys: BTreeSet::new(),
            },
        );
    }
    for entry in r.open_table(KV).map_err(backend)?.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        match decode(k.value(), v.value()) {
            Ok(KeyValue {
                key,
                lease: Some(id),
                ..
            }) => {
                leases
                    .entry(id)
                    .or_insert_with(|| Lease {
                        ttl: Duration::ZERO,
                        deadline: Instant::now(),
                        keys: BTreeSet::new(),
                    })
                    .keys
                    .insert(key);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    Ok(leases)
}

/// What a transaction's ops did, to apply to memory once it committed.
#[derive(Default)]
struct Applied {
    events: Vec<Event>,
    /// (key, lease before, lease after) for every change of a key's lease, in order.
    rebinds: Vec<(String, Option<LeaseId>, Option<LeaseId>)>,
}

impl Inner {
    fn lease_alive(&self, id: LeaseId) -> bool {
        lock(&self.leases)
            .get(&id)
            .is_some_and(|l| l.deadline > Instant::now())
    }

    fn put(
        kv: &mut Table<'_, &'static str, &'static [u8]>,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        revision: u64,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        // A corrupt old value is simply overwritten.
        let old = read_kv(kv, key).ok().flatten();
        let create_revision = old.as_ref().map_or(revision, |o| o.create_revision);
        kv.insert(
            key,
            encode(revision, create_revision, lease, value).as_slice(),
        )
        .map_err(backend)?;
        let old_lease = old.and_then(|o| o.lease);
        if old_lease != lease {
            applied.rebinds.push((key.to_string(), old_lease, lease));
        }
        applied.events.push(Event::Put(KeyValue {
            key: key.to_string(),
            value: value.to_vec(),
            create_revision,
            mod_revision: revision,
            lease,
        }));
        Ok(())
    }

    fn delete(
        kv: &mut Table<'_, &'static str, &'static [u8]>,
        key: &str,
        revision: u64,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        let Some(old) = kv.remove(key).map_err(backend)? else {
            return Ok(());
        };
        // A corrupt value is deleted all the same, without a previous value.
        let prev = decode(key, old.value()).ok();
        if let Some(l) = prev.as_ref().and_then(|p| p.lease) {
            applied.rebinds.push((key.to_string(), Some(l), None));
        }
        applied.events.push(Event::Delete {
            key: key.to_string(),
            revision,
            prev,
        });
        Ok(())
    }

    fn apply(
        &self,
        kv: &mut Table<'_, &'static str, &'static [u8]>,
        ops: &[Op],
        revision: u64,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        for op in ops {
            match op {
                Op::Put(k, v) => Self::put(kv, k, v, None, revision, &mut applied)?,
                Op::PutLeased(k, v, l) => {
                    if !self.lease_alive(*l) {
                        return Err(StoreError::LeaseNotFound(*l));
                    }
                    Self::put(kv, k, v, Some(*l), revision, &mut applied)?;
                }
                Op::Delete(k) => Self::delete(kv, k, revision, &mut applied)?,
                Op::DeletePrefix(p) => {
                    for k in keys_under(kv, p)? {
                        Self::delete(kv, &k, revision, &mut applied)?;
                    }
                }
            }
        }
        Ok(applied)
    }

    /// Memory follows a committed transaction: lease bindings, then the watchers. Called
    /// with the writer lock held.
    fn after_commit(&self, revision: u64, applied: Applied) {
        if !applied.rebinds.is_empty() {
            let mut leases = lock(&self.leases);
            for (key, old, new) in applied.rebinds {
                if let Some(l) = old.and_then(|o| leases.get_mut(&o)) {
                    l.keys.remove(&key);
                }
                if let Some(l) = new.and_then(|n| leases.get_mut(&n)) {
                    l.keys.insert(key);
                }
            }
        }
        if !applied.events.is_empty() {
            lock(&self.history).push(revision, applied.events.into());
            self.published.send_replace(revision);
        }
    }

    fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let _writer = lock(&self.writer);
        let w = self.db.begin_write().map_err(backend)?;
        let (outcome, revision, applied) = {
            let mut kv = w.open_table(KV).map_err(backend)?;
            let mut failed = None;
            for c in &txn.compares {
                if !c.holds(read_kv(&kv, c.key())?.as_ref()) {
                    failed = Some(c.clone());
                    break;
                }
            }
            let ops = if failed.is_none() {
                &txn.ops
            } else {
                &txn.otherwise
            };
            let mut meta = w.open_table(META).map_err(backend)?;
            let current = meta
                .get(REVISION)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            let applied = self.apply(&mut kv, ops, current + 1)?;
            // Like etcd: only a transaction that changed something takes a revision.
            let revision = if applied.events.is_empty() {
                current
            } else {
                meta.insert(REVISION, current + 1).map_err(backend)?;
                current + 1
            };
            let outcome = match failed {
                None => TxnOutcome::Committed { revision },
                Some(c) => TxnOutcome::CompareFailed(c),
            };
            (outcome, revision, applied)
        };
        if applied.events.is_empty() {
            w.abort().map_err(backend)?;
        } else {
            w.commit().map_err(backend)?;
            self.after_commit(revision, applied);
        }
        Ok(outcome)
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl = ttl.max(Duration::from_millis(1));
        let _writer = lock(&self.writer);
        let w = self.db.begin_write().map_err(backend)?;
        let id = {
            let mut meta = w.open_table(META).map_err(backend)?;
            let next = meta
                .get(NEXT_LEASE)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(1);
            meta.insert(NEXT_LEASE, next + 1).map_err(backend)?;
            let id = LeaseId::try_from(next).map_err(|_| backend("lease ids exhausted"))?;
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            w.open_table(LEASES)
                .map_err(backend)?
                .insert(id, ttl_ms)
                .map_err(backend)?;
            id
        };
        w.commit().map_err(backend)?;
        lock(&self.leases).insert(
            id,
            Lease {
                ttl,
                deadline: deadline_after(ttl),
                keys: BTreeSet::new(),
            },
        );
        lock(&self.expiry_ctl).dirty = true;
        self.expiry_wake.notify_all();
        Ok(id)
    }

    fn lease_ttl(&self, id: LeaseId) -> Option<LeaseTtl> {
        let now = Instant::now();
        lock(&self.leases)
            .get(&id)
            .filter(|l| l.deadline > now)
            .map(|l| LeaseTtl {
                granted: l.ttl,
                remaining: l.deadline - now,
            })
    }

    fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        match lock(&self.leases).get_mut(&id) {
            Some(l) if l.deadline > Instant::now() => {
                l.deadline = deadline_after(l.ttl);
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(id)),
        }
    }

    /// Deletes the lease and its keys in one transaction. With `only_expired`, a lease that
    /// is not past its deadline (any more) is left alone.
    fn revoke(&self, id: LeaseId, only_expired: bool) -> Result<(), StoreError> {
        let _writer = lock(&self.writer);
        let keys = match lock(&self.leases).get(&id) {
            None => return Err(StoreError::LeaseNotFound(id)),
            Some(l) if only_expired && l.deadline > Instant::now() => return Ok(()),
            Some(l) => l.keys.clone(),
        };
        let w = self.db.begin_write().map_err(backend)?;
        let (revision, applied) = {
            let mut kv = w.open_table(KV).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            let current = meta
                .get(REVISION)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut applied = Applied::default();
            for key in &keys {
                // The index is rebuilt from the table at open; trust the table.
                if read_kv(&kv, key).ok().flatten().and_then(|kv| kv.lease) == Some(id) {
                    Self::delete(&mut kv, key, current + 1, &mut applied)?;
                }
            }
            let revision = if applied.events.is_empty() {
                current
            } else {
                meta.insert(REVISION, current + 1).map_err(backend)?;
                current + 1
            };
            w.open_table(LEASES)
                .map_err(backend)?
                .remove(id)
                .map_err(backend)?;
            (revision, applied)
        };
        w.commit().map_err(backend)?;
        lock(&self.leases).remove(&id);
        self.after_commit(revision, applied);
        Ok(())
    }

    /// The expiry thread: revokes each lease past its deadline, in one transaction each.
    fn expire_loop(&self) {
        loop {
            let now = Instant::now();
            let (due, next): (Vec<LeaseId>, Option<Instant>) = {
                let leases = lock(&self.leases);
                let due = leases
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                let next = leases
                    .values()
                    .map(|l| l.deadline)
                    .filter(|d| *d > now)
                    .min();
                (due, next)
            };
            let mut failed = false;
            for id in due {
                match self.revoke(id, true) {
                    Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(
                            lease = id,
                            "cannot delete the keys of an expired lease: {e}"
                        );
                        failed = true;
                    }
                }
            }
            let mut ctl = lock(&self.expiry_ctl);
            if ctl.closed {
                return;
            }
            if std::mem::take(&mut ctl.dirty) && !failed {
                continue;
            }
            let wait = match next {
                _ if failed => Duration::from_secs(1),
                Some(d) => d.saturating_duration_since(Instant::now()),
                // Nothing to expire: sleep until a grant wakes us.
                None => Duration::from_secs(3600),
            };
            // Spurious wakeups and keep-alives only cost a recomputation.
            drop(
                self.expiry_wake
                    .wait_timeout(ctl, wait)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }
}

/// Opens (creating if needed) a file only its owner may read or write, also one made before
/// with a wider mode.
fn private_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

impl RedbStore {
    /// Opens (creating if needed) the store in `dir`, taking an exclusive lock on the directory
    /// so a second daemon on the same state fails at once instead of corrupting it. Does not
    /// need a tokio runtime: lease expiry runs on a thread of its own.
    ///
    /// The store holds every network, endpoint, name and label: the directory is made the
    /// owner's alone (0700) and so are its files (0600), whatever the umask.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let lock = private_file(&dir.join("lock"))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked {
                path: dir.display().to_string(),
            });
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let path = dir.join("berth.redb");
        // Made (empty, which redb initialises) or narrowed before redb opens it.
        drop(private_file(&path)?);
        let db = Database::create(&path).map_err(backend)?;
        let revision = prepare(&db)?;
        let leases = load_leases(&db)?;
        let (published, _) = watch::channel(revision);
        let inner = Arc::new(Inner {
            db,
            path,
            writer: Mutex::new(()),
            leases: Mutex::new(leases),
            history: Arc::new(Mutex::new(History {
                entries: VecDeque::new(),
                events: 0,
                compacted: revision,
                latest: revision,
            })),
            published,
            expiry_ctl: Mutex::new(ExpiryCtl::default()),
            expiry_wake: Condvar::new(),
            _lock: lock,
        });
        let expiry = std::thread::Builder::new()
            .name("berth-store-leases".into())
            .spawn({
                let inner = inner.clone();
                move || inner.expire_loop()
            })?;
        Ok(RedbStore {
            inner,
            expiry: Some(expiry),
        })
    }

    /// Test hook: forgets the retained watch history, as if it had overflowed, so a watch
    /// from any earlier revision gets [`WatchError::Compacted`].
    #[doc(hidden)]
    pub fn compact_history(&self) {
        let mut h = lock(&self.inner.history);
        h.entries.clear();
        h.events = 0;
        h.compacted = h.latest;
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        lock(&self.inner.expiry_ctl).closed = true;
        self.inner.expiry_wake.notify_all();
        if let Some(t) = self.expiry.take() {
            // It finishes at most one expiry transaction first.
            let _ = t.join();
        }
    }
}

/// A watch on the in-memory history: a cursor (the last revision looked at) and a wakeup.
pub(crate) struct RedbWatch {
    prefix: String,
    cursor: u64,
    history: Arc<Mutex<History>>,
    published: watch::Receiver<u64>,
}

impl RedbWatch {
    /// Copies the events of retained transactions after the cursor into `out`, at most
    /// [`PULL_TXNS`] of them; whether more are waiting.
    fn pull(&mut self, out: &mut VecDeque<Event>) -> Result<bool, WatchError> {
        let h = lock(&self.history);
        if self.cursor < h.compacted {
            return Err(WatchError::Compacted {
                compact_revision: h.compacted,
            });
        }
        let start = h.entries.partition_point(|(r, _)| *r <= self.cursor);
        for (revision, events) in h.entries.range(start..).take(PULL_TXNS) {
            out.extend(
                events
                    .iter()
                    .filter(|e| e.key().starts_with(&self.prefix))
                    .cloned(),
            );
            self.cursor = *revision;
        }
        Ok(h.entries.len() - start > PULL_TXNS)
    }

    pub(crate) async fn next_batch(&mut self, out: &mut VecDeque<Event>) -> Result<(), WatchError> {
        loop {
            // Seen before looking, so a publish after the look wakes `changed` below.
            self.published.borrow_and_update();
            let more = self.pull(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            if more {
                // Other prefixes' transactions only, and more already retained: look on
                // rather than wait for a commit that may not come.
                continue;
            }
            if self.published.changed().await.is_err() {
                // The store is gone: deliver what it published before, then end.
                self.pull(out)?;
                return if out.is_empty() {
                    Err(WatchError::Closed)
                } else {
                    Ok(())
                };
            }
        }
    }
}

#[async_trait]
impl Store for RedbStore {
    /// Read in place: a point read is served from redb's cache in microseconds, less than
    /// handing it to the blocking pool and back costs. (Lists and commits still go there.)
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.inner.db.begin_read().map_err(backend)?;
        let t = r.open_table(KV).map_err(backend)?;
        read_kv(&t, key)
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let r = inner.db.begin_read().map_err(backend)?;
            let revision = r
                .open_table(META)
                .map_err(backend)?
                .get(REVISION)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            let t = r.open_table(KV).map_err(backend)?;
            let mut items = Vec::new();
            for entry in t.range(prefix.as_str()..).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                items.push(decode(k.value(), v.value())?);
            }
            Ok(Listing { revision, items })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.blocking(move |inner| inner.txn(txn)).await
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<Watch, StoreError> {
        Ok(Watch::new(WatchSource::Redb(RedbWatch {
            prefix: prefix.to_string(),
            cursor: after,
            history: self.inner.history.clone(),
            published: self.inner.published.subscribe(),
        })))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |inner| inner.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.revoke(lease, false)).await
    }

    async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<LeaseTtl>, StoreError> {
        Ok(self.inner.lease_ttl(lease))
    }

    fn describe(&self) -> String {
        format!("redb {}", self.inner.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Compare;

    fn rev(o: TxnOutcome) -> u64 {
        match o {
            TxnOutcome::Committed { revision } => revision,
            other => panic!("expected commit, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn txn_compares_revisions_and_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let r1 = rev(s
            .txn(
                Txn::new()
                    .when(Compare::Absent("a/1".into()))
                    .put("a/1", "x"),
            )
            .await
            .unwrap());
        assert_eq!(r1, 1);
        // create-if-absent fails the second time and changes nothing
        let again = s
            .txn(
                Txn::new()
                    .when(Compare::Absent("a/1".into()))
                    .put("a/1", "y")
                    .put("a/2", "z"),
            )
            .await
            .unwrap();
        assert_eq!(
            again,
            TxnOutcome::CompareFailed(Compare::Absent("a/1".into()))
        );
        assert_eq!(s.get("a/2").await.unwrap(), None);
        assert_eq!(s.get("a/1").await.unwrap().unwrap().value, b"x");
        // CAS on revision
        let stale = s
            .txn(
                Txn::new()
                    .when(Compare::ModRevision("a/1".into(), 0))
                    .delete("a/1"),
            )
            .await
            .unwrap();
        assert!(matches!(stale, TxnOutcome::CompareFailed(_)));
        let r2 = rev(s
            .txn(
                Txn::new()
                    .when(Compare::ModRevision("a/1".into(), r1))
                    .put("a/1", "y")
                    .put("a/2", "z")
                    .put("b/1", "w"),
            )
            .await
            .unwrap());
        assert_eq!(r2, 2);
        let l = s.list("a/").await.unwrap();
        assert_eq!(l.revision, 2);
        let keys: Vec<_> = l.items.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        assert!(l.items.iter().all(|kv| kv.mod_revision == 2));
    }

    /// Also a state directory and store made before with wide modes (an old berth, umask 000).
    #[test]
    fn the_state_directory_and_its_files_are_the_owners_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let state = dir.path().join("state");
        drop(RedbStore::open(&state).unwrap());
        for (path, wide) in [
            (state.clone(), 0o777),
            (state.join("berth.redb"), 0o666),
            (state.join("lock"), 0o666),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wide)).unwrap();
        }
        let fresh = dir.path().join("fresh");
        for s in [&state, &fresh] {
            drop(RedbStore::open(s).unwrap());
            assert_eq!(mode(s), 0o700, "{s:?}");
            assert_eq!(mode(&s.join("berth.redb")), 0o600);
            assert_eq!(mode(&s.join("lock")), 0o600);
        }
    }

    #[tokio::test]
    async fn durable_across_reopen_and_locked_while_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.txn(Txn::new().put("k", "v")).await.unwrap();
            assert!(matches!(
                RedbStore::open(dir.path()),
                Err(StoreError::Locked { .. })
            ));
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let kv = s.get("k").await.unwrap().unwrap();
        assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"v"[..], 1));
        assert_eq!(
            rev(s.txn(Txn::new().put("k", "w")).await.unwrap()),
            2,
            "revision survives reopen"
        );
    }

    #[tokio::test]
    async fn watch_sees_changes_under_prefix_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let mut w = s.watch("net/", 0).await.unwrap();
        s.txn(Txn::new().put("net/a", "1").put("other", "x"))
            .await
            .unwrap();
        s.txn(Txn::new().delete("net/a").delete("net/missing"))
            .await
            .unwrap();
        let put = KeyValue {
            key: "net/a".into(),
            value: b"1".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        };
        assert_eq!(w.next().await.unwrap(), Event::Put(put.clone()));
        assert_eq!(
            w.next().await.unwrap(),
            Event::Delete {
                key: "net/a".into(),
                revision: 2,
                prev: Some(put),
            }
        );
        drop(s);
        assert_eq!(w.next().await, Err(WatchError::Closed));
    }

    #[tokio::test]
    async fn a_watcher_that_falls_out_of_the_history_gets_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let mut w = s.watch("k/", 0).await.unwrap();
        let batch: Vec<Op> = (0..1000)
            .map(|i| Op::Put(format!("k/{i}"), b"v".to_vec()))
            .collect();
        for _ in 0..=HISTORY_EVENTS / 1000 {
            let txn = Txn {
                ops: batch.clone(),
                ..Txn::default()
            };
            s.txn(txn).await.unwrap();
        }
        assert_eq!(
            w.next().await,
            Err(WatchError::Compacted {
                compact_revision: 1
            })
        );
        // ...for good; a fresh list and watch work.
        assert!(matches!(w.next().await, Err(WatchError::Compacted { .. })));
        let l = s.list("k/").await.unwrap();
        let mut w = s.watch("k/", l.revision).await.unwrap();
        s.txn(Txn::new().delete("k/7")).await.unwrap();
        assert_eq!(w.next().await.unwrap().revision(), l.revision + 1);
    }

    #[tokio::test]
    async fn corrupt_values_are_errors_and_can_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        s.txn(Txn::new().put("a/ok", "v")).await.unwrap();
        {
            let w = s.inner.db.begin_write().unwrap();
            w.open_table(KV)
                .unwrap()
                .insert("a/bad", &b"short"[..])
                .unwrap();
            w.commit().unwrap();
        }
        assert!(matches!(
            s.get("a/bad").await,
            Err(StoreError::Corrupt { key, .. }) if key == "a/bad"
        ));
        assert!(matches!(
            s.list("a/").await,
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            s.txn(Txn::new().when(Compare::Value("a/bad".into(), b"x".to_vec())))
                .await,
            Err(StoreError::Corrupt { .. })
        ));
        s.txn(Txn::new().delete("a/bad")).await.unwrap();
        assert_eq!(s.list("a/").await.unwrap().items.len(), 1);
    }

    /// Writes a store exactly as the format-1 code did: "kv" values are an 8-byte
    /// little-endian mod revision and the value; "meta" has only "revision".
    fn write_v1_store(dir: &Path, rows: &[(&str, u64, &[u8])], revision: u64) {
        let db = Database::create(dir.join("berth.redb")).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut kv = w.open_table(KV).unwrap();
            for (k, rev, v) in rows {
                let mut raw = rev.to_le_bytes().to_vec();
                raw.extend_from_slice(v);
                kv.insert(*k, raw.as_slice()).unwrap();
            }
            w.open_table(META)
                .unwrap()
                .insert(REVISION, revision)
                .unwrap();
        }
        w.commit().unwrap();
    }

    #[tokio::test]
    async fn a_format_1_store_opens_and_migrates() {
        let dir = tempfile::tempdir().unwrap();
        write_v1_store(
            dir.path(),
            &[
                ("net/a", 3, b"{\"x\":1}"),
                ("net/b", 5, b""),
                ("ip/1", 4, b"b"),
            ],
            5,
        );
        for _ in 0..2 {
            // Twice: the second open finds format 2 and changes nothing.
            let s = RedbStore::open(dir.path()).unwrap();
            let a = s.get("net/a").await.unwrap().unwrap();
            assert_eq!(
                a,
                KeyValue {
                    key: "net/a".into(),
                    value: b"{\"x\":1}".to_vec(),
                    create_revision: 3,
                    mod_revision: 3,
                    lease: None,
                }
            );
            let l = s.list("net/").await.unwrap();
            assert_eq!(l.revision, 5);
            assert_eq!(
                l.items
                    .iter()
                    .map(|kv| (kv.key.as_str(), kv.mod_revision, kv.value.len()))
                    .collect::<Vec<_>>(),
                [("net/a", 3, 7), ("net/b", 5, 0)]
            );
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let r = rev(s
            .txn(
                Txn::new()
                    .when(Compare::ModRevision("ip/1".into(), 4))
                    .put("ip/1", "c"),
            )
            .await
            .unwrap());
        assert_eq!(r, 6);
        let ip = s.get("ip/1").await.unwrap().unwrap();
        assert_eq!((ip.create_revision, ip.mod_revision), (4, 6));
    }

    #[tokio::test]
    async fn leases_persist_with_a_fresh_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let lease = {
            let s = RedbStore::open(dir.path()).unwrap();
            let lease = s.grant_lease(Duration::from_millis(600)).await.unwrap();
            s.txn(Txn::new().put_leased("l/a", "1", lease))
                .await
                .unwrap();
            lease
        };
        // Let the deadline pass while closed: the lease still holds after open...
        std::thread::sleep(Duration::from_millis(700));
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(s.get("l/a").await.unwrap().unwrap().lease, Some(lease));
        s.keep_alive(lease).await.unwrap();
        let next = s.grant_lease(Duration::from_secs(5)).await.unwrap();
        assert_ne!(next, lease, "lease ids are not reused");
        // ...and ends one TTL later without keep-alives.
        let until = Instant::now() + Duration::from_secs(10);
        while s.get("l/a").await.unwrap().is_some() {
            assert!(Instant::now() < until, "leased key never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(l)) if l == lease
        ));
        drop(s);
        let s = RedbStore::open(dir.path()).unwrap();
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
        s.keep_alive(next).await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_create_if_absent_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(RedbStore::open(dir.path()).unwrap());
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.txn(
                        Txn::new()
                            .when(Compare::Absent("ip/10.0.0.2".into()))
                            .put("ip/10.0.0.2", format!("{i}")),
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), TxnOutcome::Committed { .. }) {
                wins += 1;
            }
        }
        assert_eq!(wins, 1);
    }
}
