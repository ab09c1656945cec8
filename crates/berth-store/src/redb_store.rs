//! The embedded backend: one redb file in the state directory, fsynced on every commit.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use crate::{Compare, Event, KeyValue, Listing, Op, Store, StoreError, Txn, TxnOutcome, Watch};

/// key -> 8 bytes of little-endian mod revision, then the value.
const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    /// Held for the life of the store: one daemon per state directory.
    _lock: File,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (creating if needed) the store in `dir`, taking an exclusive lock on the directory
    /// so a second daemon on the same state fails at once instead of corrupting it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked {
                path: dir.display().to_string(),
            });
        }
        let path = dir.join("berth.redb");
        let db = Database::create(&path).map_err(backend)?;
        let w = db.begin_write().map_err(backend)?;
        {
            w.open_table(KV).map_err(backend)?;
            let mut meta = w.open_table(META).map_err(backend)?;
            if meta.get(REVISION).map_err(backend)?.is_none() {
                meta.insert(REVISION, 0).map_err(backend)?;
            }
        }
        w.commit().map_err(backend)?;
        let (events, _) = broadcast::channel(1024);
        Ok(RedbStore {
            db: Arc::new(db),
            path,
            events,
            _lock: lock,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }
}

fn decode(key: &str, raw: &[u8]) -> KeyValue {
    let (rev, value) = raw.split_at(8);
    KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        mod_revision: u64::from_le_bytes(rev.try_into().expect("8-byte revision header")),
    }
}

fn encode(rev: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&rev.to_le_bytes());
    v.extend_from_slice(value);
    v
}

/// The smallest string greater than every string starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

#[async_trait]
impl Store for RedbStore {
    /// Read in place: a point read is served from redb's cache in microseconds, less than
    /// handing it to the blocking pool and back costs. (Lists and commits still go there.)
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.db.begin_read().map_err(backend)?;
        let t = r.open_table(KV).map_err(backend)?;
        Ok(t.get(key).map_err(backend)?.map(|v| decode(key, v.value())))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let r = db.begin_read().map_err(backend)?;
            let revision = r
                .open_table(META)
                .map_err(backend)?
                .get(REVISION)
                .map_err(backend)?
                .map(|v| v.value())
                .unwrap_or(0);
            let t = r.open_table(KV).map_err(backend)?;
            let end = prefix_end(&prefix);
            let mut items = Vec::new();
            for entry in t.range(prefix.as_str()..end.as_str()).map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                items.push(decode(k.value(), v.value()));
            }
            Ok(Listing { revision, items })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let (outcome, events) = self
            .blocking(move |db| {
                let w = db.begin_write().map_err(backend)?;
                let mut events = Vec::with_capacity(txn.ops.len());
                let outcome = {
                    let mut kv = w.open_table(KV).map_err(backend)?;
                    let mut failed = None;
                    for c in &txn.compares {
                        let holds = match c {
                            Compare::Absent(k) => kv.get(k.as_str()).map_err(backend)?.is_none(),
                            Compare::ModRevision(k, rev) => kv
                                .get(k.as_str())
                                .map_err(backend)?
                                .is_some_and(|v| decode(k, v.value()).mod_revision == *rev),
                        };
                        if !holds {
                            failed = Some(c.clone());
                            break;
                        }
                    }
                    if let Some(c) = failed {
                        TxnOutcome::CompareFailed(c)
                    } else {
                        let mut meta = w.open_table(META).map_err(backend)?;
                        let revision = meta
                            .get(REVISION)
                            .map_err(backend)?
                            .map(|v| v.value())
                            .unwrap_or(0)
                            + 1;
                        meta.insert(REVISION, revision).map_err(backend)?;
                        for op in txn.ops {
                            match op {
                                Op::Put(k, v) => {
                                    kv.insert(k.as_str(), encode(revision, &v).as_slice())
                                        .map_err(backend)?;
                                    events.push(Event::Put(KeyValue {
                                        key: k,
                                        value: v,
                                        mod_revision: revision,
                                    }));
                                }
                                Op::Delete(k) => {
                                    if kv.remove(k.as_str()).map_err(backend)?.is_some() {
                                        events.push(Event::Delete { key: k, revision });
                                    }
                                }
                            }
                        }
                        TxnOutcome::Committed { revision }
                    }
                };
                match outcome {
                    TxnOutcome::Committed { .. } => w.commit().map_err(backend)?,
                    TxnOutcome::CompareFailed(_) => w.abort().map_err(backend)?,
                }
                Ok((outcome, events))
            })
            .await?;
        if !events.is_empty() {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(Arc::new(events));
        }
        Ok(outcome)
    }

    fn watch(&self, prefix: &str) -> Watch {
        Watch {
            prefix: prefix.to_string(),
            rx: self.events.subscribe(),
            pending: Default::default(),
        }
    }

    fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WatchError;

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
        let mut w = s.watch("net/");
        s.txn(Txn::new().put("net/a", "1").put("other", "x"))
            .await
            .unwrap();
        s.txn(Txn::new().delete("net/a").delete("net/missing"))
            .await
            .unwrap();
        assert_eq!(
            w.next().await.unwrap(),
            Event::Put(KeyValue {
                key: "net/a".into(),
                value: b"1".to_vec(),
                mod_revision: 1
            })
        );
        assert_eq!(
            w.next().await.unwrap(),
            Event::Delete {
                key: "net/a".into(),
                revision: 2
            }
        );
        drop(s);
        assert_eq!(w.next().await, Err(WatchError::Closed));
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
