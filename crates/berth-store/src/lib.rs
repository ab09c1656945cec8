//! The desired-state store.
//!
//! The [`Store`] trait is the contract every backend meets: keys and values are bytes under
//! string keys, every committed transaction gets the next store-wide revision, transactions are
//! all-or-nothing with compare conditions on several keys, and watchers see every change under a
//! prefix in commit order. This is etcd's model on purpose: the embedded [`RedbStore`] serves one
//! host, and an etcd backend serves many without any change to the callers.

mod redb_store;

use async_trait::async_trait;

pub use redb_store::RedbStore;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("state directory {path} is in use by another berth daemon")]
    Locked { path: String },
    #[error("store backend failed: {0}")]
    Backend(String),
    #[error("store I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A key with its value and the revision of the transaction that last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: u64,
}

/// A condition a transaction checks atomically before applying its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last changed at exactly this revision.
    ModRevision(String, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// All compares hold, then all ops apply, in one atomic and durable step; or nothing changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
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
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied; the store is now at this revision.
    Committed { revision: u64 },
    /// A compare failed (the first failing one is named); nothing changed.
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
    Delete { key: String, revision: u64 },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// The changes under one prefix, from the moment the watch was made.
pub struct Watch {
    prefix: String,
    rx: tokio::sync::broadcast::Receiver<std::sync::Arc<Vec<Event>>>,
    pending: std::collections::VecDeque<Event>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    /// The watcher fell behind and events were dropped: re-list and watch again.
    #[error("watcher lagged behind and missed {0} transactions")]
    Lagged(u64),
    #[error("store closed")]
    Closed,
}

impl Watch {
    /// The next change under the prefix.
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            match self.rx.recv().await {
                Ok(batch) => self.pending.extend(
                    batch
                        .iter()
                        .filter(|e| e.key().starts_with(&self.prefix))
                        .cloned(),
                ),
                Err(RecvError::Lagged(n)) => return Err(WatchError::Lagged(n)),
                Err(RecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    /// Changes under `prefix` committed after this call.
    fn watch(&self, prefix: &str) -> Watch;
    /// A line for `berth status`: the backend and where its data lives.
    fn describe(&self) -> String;
}
