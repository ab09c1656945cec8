//! The desired-state store.
//!
//! The [`Store`] trait is the contract every backend meets: keys and values are bytes under
//! string keys, every transaction that changes something gets the next store-wide revision,
//! transactions are all-or-nothing with compare conditions on several keys (and an `otherwise`
//! branch applied when a compare fails), keys can be bound to leases that expire, and watchers
//! see every change under a prefix in commit order, starting from any revision the backend still
//! remembers. This is etcd's model on purpose: the embedded [`RedbStore`] serves one host, and
//! [`EtcdStore`] serves many without any change to the callers.

mod etcd_store;
mod redb_store;

use std::collections::VecDeque;

use async_trait::async_trait;

pub use etcd_store::{ClientCert, EtcdStore, TlsFiles};
pub use redb_store::RedbStore;

/// A lease handle, as etcd numbers them.
pub type LeaseId = i64;

/// What is left of a lease: how long it was granted for and how long until it lapses unless
/// kept alive. `granted - remaining` is the time since it was last kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTtl {
    pub granted: std::time::Duration,
    /// etcd counts whole seconds, rounded down.
    pub remaining: std::time::Duration,
}

impl LeaseTtl {
    /// How long ago the lease was last kept alive (or granted).
    pub fn since_renewal(&self) -> std::time::Duration {
        self.granted.saturating_sub(self.remaining)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("state directory {path} is in use by another berth daemon")]
    Locked { path: String },
    #[error("store backend failed: {0}")]
    Backend(String),
    #[error("store I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The store cannot be reached or did not answer in time: retry later (HTTP 503, CNI 11).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The lease expired, was revoked or never existed.
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A stored value that cannot be decoded.
    #[error("stored value of {key} is corrupt: {why}")]
    Corrupt { key: String, why: String },
}

/// A key with its value, the revisions that created and last changed it, and its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the transaction that created the key (kept across updates).
    pub create_revision: u64,
    /// The revision of the transaction that last changed the key.
    pub mod_revision: u64,
    /// The lease the key is bound to: it is deleted when the lease ends.
    pub lease: Option<LeaseId>,
}

/// A condition a transaction checks atomically before applying its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last changed at exactly this revision.
    ModRevision(String, u64),
    /// The key exists and its value equals this.
    Value(String, Vec<u8>),
}

impl Compare {
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(k) | Compare::ModRevision(k, _) | Compare::Value(k, _) => k,
        }
    }

    /// Whether the compare holds for the key's current state.
    pub(crate) fn holds(&self, current: Option<&KeyValue>) -> bool {
        match self {
            Compare::Absent(_) => current.is_none(),
            Compare::ModRevision(_, rev) => current.is_some_and(|kv| kv.mod_revision == *rev),
            Compare::Value(_, v) => current.is_some_and(|kv| kv.value == *v),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets the value; a key bound to a lease is detached from it (as etcd does).
    Put(String, Vec<u8>),
    /// Sets the value and binds the key to the lease; fails the whole txn with
    /// [`StoreError::LeaseNotFound`] if the lease is gone.
    PutLeased(String, Vec<u8>, LeaseId),
    Delete(String),
    /// Deletes every key starting with the prefix.
    DeletePrefix(String),
}

/// All compares hold, then all `ops` apply, in one atomic and durable step; otherwise the
/// `otherwise` ops apply instead, equally atomically.
///
/// Backends may reject a txn that changes the same key twice (etcd does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
    pub otherwise: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put(key.into(), value.into()));
        self
    }
    pub fn put_leased(
        mut self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        self.ops
            .push(Op::PutLeased(key.into(), value.into(), lease));
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }
    pub fn delete_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.ops.push(Op::DeletePrefix(prefix.into()));
        self
    }
    /// An op applied instead of `ops` when a compare fails.
    pub fn or_else(mut self, op: Op) -> Self {
        self.otherwise.push(op);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The compares held and the ops applied; the store is now at this revision (unchanged
    /// if the ops changed nothing).
    Committed { revision: u64 },
    /// A compare failed (the first failing one is named); the `otherwise` ops were applied.
    CompareFailed(Compare),
}

/// A snapshot of all keys under a prefix, taken at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub revision: u64,
    pub items: Vec<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// `prev` is the key as it was before the delete, when the backend still knows it.
    Delete {
        key: String,
        revision: u64,
        prev: Option<KeyValue>,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the transaction that made this change.
    pub fn revision(&self) -> u64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// Why a watch ended. Every variant is final: re-list and watch again from the new listing.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    /// The requested revisions are no longer kept (or the watcher fell that far behind).
    #[error("watch revision compacted (store history starts at revision {compact_revision})")]
    Compacted { compact_revision: u64 },
    /// The watcher fell behind and events were dropped.
    #[error("watcher lagged behind and missed {0} transactions")]
    Lagged(u64),
    #[error("store closed")]
    Closed,
    #[error("watch failed: {0}")]
    Backend(String),
}

/// The changes under one prefix after a revision, in commit order; all events of one
/// transaction come consecutively.
pub struct Watch {
    source: WatchSource,
    pending: VecDeque<Event>,
    ended: Option<WatchError>,
}

enum WatchSource {
    Redb(redb_store::RedbWatch),
    Etcd(Box<etcd_store::EtcdWatch>),
}

impl Watch {
    fn new(source: WatchSource) -> Self {
        Watch {
            source,
            pending: VecDeque::new(),
            ended: None,
        }
    }

    /// The next change under the prefix. Once it returns an error, it returns that error
    /// for good. Cancel-safe: a `tokio::select!` that drops it loses no event.
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            if let Some(err) = &self.ended {
                return Err(err.clone());
            }
            let got = match &mut self.source {
                WatchSource::Redb(w) => w.next_batch(&mut self.pending).await,
                WatchSource::Etcd(w) => w.next_batch(&mut self.pending).await,
            };
            if let Err(e) = got {
                self.ended = Some(e);
            }
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    /// Changes under `prefix` with revision > `after` (`after` = a Listing's revision: list
    /// then watch, no gap, no duplicate). A revision older than what the backend still has
    /// gives a watch whose first next() is Err(Compacted).
    async fn watch(&self, prefix: &str, after: u64) -> Result<Watch, StoreError>;
    /// A new lease; keys put with it are deleted once it is not kept alive for `ttl`
    /// (backends may round `ttl` up: etcd to whole seconds and its minimum TTL).
    async fn grant_lease(&self, ttl: std::time::Duration) -> Result<LeaseId, StoreError>;
    /// Restarts the lease's TTL. Err(StoreError::LeaseNotFound) once it expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends the lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// The lease's granted and remaining TTL; `None` once it expired or was revoked. A read:
    /// it does not keep the lease alive.
    async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<LeaseTtl>, StoreError>;
    /// A line for `berth status`: the backend and where its data lives.
    fn describe(&self) -> String;
}
