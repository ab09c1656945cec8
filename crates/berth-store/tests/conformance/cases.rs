//! The conformance cases: each runs against every backend and relies only on the [`Store`]
//! contract. On etcd several cases share one server, so no case assumes revision numbers of
//! its own (other cases' writes advance the shared revision), only their order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth_store::{
    Compare, Event, KeyValue, Op, Store, StoreError, Txn, TxnOutcome, Watch, WatchError,
};

use crate::fixture::{Backend, within};

fn committed(o: Result<TxnOutcome, StoreError>) -> u64 {
    match o {
        Ok(TxnOutcome::Committed { revision }) => revision,
        other => panic!("expected a commit, got {other:?}"),
    }
}

async fn next(w: &mut Watch) -> Event {
    within("a watch event", w.next()).await.unwrap()
}

async fn get(s: &dyn Store, key: &str) -> Option<KeyValue> {
    s.get(key).await.unwrap()
}

/// Polls `get` until the key is gone; panics after `limit`.
async fn until_gone(s: &dyn Store, key: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while get(s, key).await.is_some() {
        assert!(start.elapsed() < limit, "{key} still there after {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

pub async fn create_if_absent_has_one_winner(b: &Backend) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = b.store.clone();
            tokio::spawn(async move {
                let o = s
                    .txn(
                        Txn::new()
                            .when(Compare::Absent("ip/10.0.0.2".into()))
                            .put("ip/10.0.0.2", format!("{i}")),
                    )
                    .await
                    .unwrap();
                (i, o)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match within("a txn", t).await.unwrap() {
            (i, TxnOutcome::Committed { .. }) => winners.push(i),
            (_, TxnOutcome::CompareFailed(c)) => {
                assert_eq!(c, Compare::Absent("ip/10.0.0.2".into()))
            }
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let kv = get(&*b.store, "ip/10.0.0.2").await.unwrap();
    assert_eq!(kv.value, format!("{}", winners[0]).into_bytes());
}

pub async fn cas_on_mod_revision(b: &Backend) {
    let s = &*b.store;
    let r1 = committed(s.txn(Txn::new().put("cas/k", "1")).await);
    let kv = get(s, "cas/k").await.unwrap();
    assert_eq!((kv.mod_revision, kv.create_revision), (r1, r1));
    let wrong = Compare::ModRevision("cas/k".into(), r1 + 1_000_000);
    assert_eq!(
        s.txn(Txn::new().when(wrong.clone()).put("cas/k", "x"))
            .await
            .unwrap(),
        TxnOutcome::CompareFailed(wrong)
    );
    let r2 = committed(
        s.txn(
            Txn::new()
                .when(Compare::ModRevision("cas/k".into(), r1))
                .put("cas/k", "2"),
        )
        .await,
    );
    assert!(r2 > r1);
    let kv = get(s, "cas/k").await.unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"2"[..], r2));
    // The old revision is stale now.
    let stale = Compare::ModRevision("cas/k".into(), r1);
    assert_eq!(
        s.txn(Txn::new().when(stale.clone()).delete("cas/k"))
            .await
            .unwrap(),
        TxnOutcome::CompareFailed(stale)
    );
    // A missing key matches no mod revision, not even 0.
    for rev in [0, r1, r2] {
        let c = Compare::ModRevision("cas/missing".into(), rev);
        assert_eq!(
            s.txn(Txn::new().when(c.clone()).put("cas/missing", "x"))
                .await
                .unwrap(),
            TxnOutcome::CompareFailed(c)
        );
    }
    assert_eq!(get(s, "cas/missing").await, None);
    // A txn that holds but changes nothing commits at the current revision.
    let r3 = committed(
        s.txn(Txn::new().when(Compare::ModRevision("cas/k".into(), r2)))
            .await,
    );
    assert!(r3 >= r2);
}

pub async fn compare_value(b: &Backend) {
    let s = &*b.store;
    s.txn(Txn::new().put("val/k", "a")).await.unwrap();
    committed(
        s.txn(
            Txn::new()
                .when(Compare::Value("val/k".into(), b"a".to_vec()))
                .put("val/k", "b"),
        )
        .await,
    );
    for c in [
        Compare::Value("val/k".into(), b"a".to_vec()),
        Compare::Value("val/missing".into(), Vec::new()),
        Compare::Absent("val/k".into()),
    ] {
        assert_eq!(
            s.txn(Txn::new().when(c.clone()).put("val/k", "c"))
                .await
                .unwrap(),
            TxnOutcome::CompareFailed(c)
        );
    }
    assert_eq!(get(s, "val/k").await.unwrap().value, b"b");
}

pub async fn else_branch_applies_and_names_the_failing_compare(b: &Backend) {
    let s = &*b.store;
    s.txn(Txn::new().put("else/cur", "1").put("else/old", "x"))
        .await
        .unwrap();
    let cur = get(s, "else/cur").await.unwrap();
    let failing = Compare::Value("else/cur".into(), b"2".to_vec());
    let outcome = s
        .txn(
            Txn::new()
                .when(Compare::Absent("else/new".into()))
                .when(failing.clone())
                // fails too, but is not the first to fail
                .when(Compare::ModRevision(
                    "else/cur".into(),
                    cur.mod_revision + 99,
                ))
                .put("else/new", "n")
                .or_else(Op::Put("else/flag".into(), b"f".to_vec()))
                .or_else(Op::Delete("else/old".into())),
        )
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::CompareFailed(failing));
    assert_eq!(get(s, "else/new").await, None);
    assert_eq!(get(s, "else/flag").await.unwrap().value, b"f");
    assert_eq!(get(s, "else/old").await, None);
    // The first compare fails: named, and the else branch wipes the prefix.
    let absent = Compare::Absent("else/flag".into());
    let outcome = s
        .txn(
            Txn::new()
                .when(absent.clone())
                .when(Compare::Value("else/cur".into(), b"1".to_vec()))
                .put("else/new", "n")
                .or_else(Op::DeletePrefix("else/".into())),
        )
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::CompareFailed(absent));
    assert!(s.list("else/").await.unwrap().items.is_empty());
}

pub async fn list_then_watch_has_no_gap_and_no_duplicate(b: &Backend) {
    let s = &*b.store;
    s.txn(Txn::new().put("w/a", "1").put("w/b", "1"))
        .await
        .unwrap();
    s.txn(Txn::new().put("w/a", "2")).await.unwrap();
    let l = s.list("w/").await.unwrap();
    let listed: Vec<_> = l
        .items
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(listed, [("w/a", &b"2"[..]), ("w/b", &b"1"[..])]);
    let b_created = l.items[1].create_revision;
    // Changes after the listing, before the watch exists.
    let r_c = committed(s.txn(Txn::new().put("w/c", "1")).await);
    let r_del = committed(s.txn(Txn::new().delete("w/a")).await);
    s.txn(Txn::new().put("wx", "outside the prefix"))
        .await
        .unwrap();
    let mut w = s.watch("w/", l.revision).await.unwrap();
    let r_b = committed(s.txn(Txn::new().put("w/b", "2")).await);

    let Event::Put(c) = next(&mut w).await else {
        panic!("expected w/c")
    };
    assert_eq!((c.key.as_str(), c.mod_revision), ("w/c", r_c));
    match next(&mut w).await {
        Event::Delete {
            key,
            revision,
            prev: Some(prev),
        } => {
            assert_eq!((key.as_str(), revision), ("w/a", r_del));
            assert_eq!(prev.value, b"2");
        }
        other => panic!("expected the delete of w/a, got {other:?}"),
    }
    let Event::Put(bb) = next(&mut w).await else {
        panic!("expected w/b")
    };
    assert_eq!(
        (bb.key.as_str(), bb.value.as_slice(), bb.mod_revision),
        ("w/b", &b"2"[..], r_b)
    );
    assert_eq!(bb.create_revision, b_created);
    assert!(l.revision < r_c && r_c < r_del && r_del < r_b);

    // From the current revision: only what comes next.
    let now = s.list("w/").await.unwrap().revision;
    let mut w = s.watch("w/", now).await.unwrap();
    s.txn(Txn::new().put("w/d", "1")).await.unwrap();
    assert_eq!(next(&mut w).await.key(), "w/d");
}

pub async fn concurrent_txns_reach_watchers_whole_and_in_order(b: &Backend) {
    const TASKS: usize = 8;
    const TXNS: usize = 50;
    let s = &*b.store;
    let l = s.list("cc/").await.unwrap();
    let mut w = s.watch("cc/", l.revision).await.unwrap();
    let writers: Vec<_> = (0..TASKS)
        .map(|t| {
            let s = b.store.clone();
            tokio::spawn(async move {
                for i in 0..TXNS {
                    committed(
                        s.txn(
                            Txn::new()
                                .put(format!("cc/{t}/a"), format!("{i}"))
                                .put(format!("cc/{t}/b"), format!("{i}")),
                        )
                        .await,
                    );
                }
            })
        })
        .collect();
    let mut last_revision = l.revision;
    let mut next_txn = HashMap::new();
    for _ in 0..TASKS * TXNS {
        let (a, b) = (next(&mut w).await, next(&mut w).await);
        let (Event::Put(a), Event::Put(b)) = (a, b) else {
            panic!("expected puts")
        };
        assert!(
            a.mod_revision > last_revision,
            "revision {} after {last_revision}",
            a.mod_revision
        );
        assert_eq!(a.mod_revision, b.mod_revision, "{a:?} and {b:?} split");
        last_revision = a.mod_revision;
        let (t, key) = a.key.rsplit_once('/').unwrap();
        assert_eq!(key, "a");
        assert_eq!(b.key, format!("{t}/b"));
        assert_eq!(a.value, b.value);
        let expected = next_txn.entry(t.to_string()).or_insert(0);
        assert_eq!(a.value, format!("{expected}").into_bytes(), "task {t}");
        *expected += 1;
    }
    for wr in writers {
        within("the writers", wr).await.unwrap();
    }
    assert_eq!(next_txn.len(), TASKS);
}

pub async fn delete_carries_the_previous_value(b: &Backend) {
    let s = &*b.store;
    let l = s.list("del/").await.unwrap();
    let mut w = s.watch("del/", l.revision).await.unwrap();
    let r1 = committed(s.txn(Txn::new().put("del/a", "1")).await);
    let r2 = committed(s.txn(Txn::new().put("del/a", "2")).await);
    // Deleting what is not there changes nothing and tells no watcher.
    s.txn(Txn::new().delete("del/missing")).await.unwrap();
    let r3 = committed(s.txn(Txn::new().delete("del/a")).await);
    assert_eq!(next(&mut w).await.revision(), r1);
    assert_eq!(next(&mut w).await.revision(), r2);
    assert_eq!(
        next(&mut w).await,
        Event::Delete {
            key: "del/a".into(),
            revision: r3,
            prev: Some(KeyValue {
                key: "del/a".into(),
                value: b"2".to_vec(),
                create_revision: r1,
                mod_revision: r2,
                lease: None,
            }),
        }
    );
    s.txn(Txn::new().put("del/sentinel", "")).await.unwrap();
    assert_eq!(next(&mut w).await.key(), "del/sentinel");
}

pub async fn delete_prefix(b: &Backend) {
    let s = &*b.store;
    s.txn(
        Txn::new()
            .put("dp/p/1", "1")
            .put("dp/p/2", "2")
            .put("dp/p2", "sibling")
            .put("dp/q", "q"),
    )
    .await
    .unwrap();
    let l = s.list("dp/").await.unwrap();
    let mut w = s.watch("dp/", l.revision).await.unwrap();
    let r = committed(s.txn(Txn::new().delete_prefix("dp/p/")).await);
    for (key, value) in [("dp/p/1", b"1"), ("dp/p/2", b"2")] {
        match next(&mut w).await {
            Event::Delete {
                key: k,
                revision,
                prev: Some(prev),
            } => {
                assert_eq!((k.as_str(), revision), (key, r));
                assert_eq!(prev.value, value);
            }
            other => panic!("expected the delete of {key}, got {other:?}"),
        }
    }
    let keys: Vec<_> = s
        .list("dp/")
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["dp/p2", "dp/q"]);
    s.txn(Txn::new().put("dp/sentinel", "")).await.unwrap();
    assert_eq!(next(&mut w).await.key(), "dp/sentinel");
}

pub async fn create_revision_stays_across_updates(b: &Backend) {
    let s = &*b.store;
    let r1 = committed(s.txn(Txn::new().put("cr/k", "1")).await);
    let r2 = committed(s.txn(Txn::new().put("cr/k", "2")).await);
    let kv = get(s, "cr/k").await.unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
    let l = s.list("cr/").await.unwrap();
    assert_eq!(l.items[0], kv);
    s.txn(Txn::new().delete("cr/k")).await.unwrap();
    let r4 = committed(s.txn(Txn::new().put("cr/k", "3")).await);
    let kv = get(s, "cr/k").await.unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r4, r4));
}

/// TTL 2 s: etcd's minimum with its default election timeout, and etcd checks expiry every
/// 500 ms.
const TTL: Duration = Duration::from_secs(2);

pub async fn leased_keys_vanish_without_keep_alive(b: &Backend) {
    let s = &*b.store;
    let lease = s.grant_lease(TTL).await.unwrap();
    let start = Instant::now();
    committed(s.txn(Txn::new().put_leased("lx/a", "1", lease)).await);
    let kv = get(s, "lx/a").await.unwrap();
    assert_eq!(kv.lease, Some(lease));
    let l = s.list("lx/").await.unwrap();
    let mut w = s.watch("lx/", l.revision).await.unwrap();
    until_gone(s, "lx/a", Duration::from_secs(10)).await;
    let gone_after = start.elapsed();
    assert!(
        gone_after >= TTL - Duration::from_millis(200),
        "gone after {gone_after:?}"
    );
    match next(&mut w).await {
        Event::Delete {
            key,
            prev: Some(prev),
            ..
        } => {
            assert_eq!(key, "lx/a");
            assert_eq!(prev.lease, Some(lease));
        }
        other => panic!("expected the delete of lx/a, got {other:?}"),
    }
    assert!(matches!(
        s.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
}

pub async fn leased_keys_stay_while_kept_alive_and_go_on_revoke(b: &Backend) {
    let s = &*b.store;
    let lease = s.grant_lease(TTL).await.unwrap();
    committed(
        s.txn(
            Txn::new()
                .put_leased("lk/a", "1", lease)
                .put_leased("lk/b", "1", lease),
        )
        .await,
    );
    let start = Instant::now();
    while start.elapsed() < TTL * 2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.keep_alive(lease).await.unwrap();
        assert!(get(s, "lk/a").await.is_some(), "expired while kept alive");
    }
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(get(s, "lk/a").await, None);
    assert!(s.list("lk/").await.unwrap().items.is_empty());
    assert!(matches!(
        s.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
    assert!(matches!(
        s.revoke_lease(lease).await,
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
    assert!(matches!(
        s.txn(Txn::new().put("lk/c", "1").put_leased("lk/d", "1", lease)).await,
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
    assert_eq!(get(s, "lk/c").await, None, "a failed txn changed something");
}

/// A lease's TTL shows the time since it was last kept alive (whole seconds on etcd), and
/// reading it does not keep it alive.
pub async fn lease_ttl_shows_the_time_since_the_last_keep_alive(b: &Backend) {
    let s = &*b.store;
    let granted = Duration::from_secs(6);
    let lease = s.grant_lease(granted).await.unwrap();
    let fresh = s.lease_ttl(lease).await.unwrap().expect("a live lease");
    assert_eq!(fresh.granted, granted);
    assert!(fresh.since_renewal() <= Duration::from_secs(1), "{fresh:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let aged = s.lease_ttl(lease).await.unwrap().expect("a live lease");
    assert!(
        (Duration::from_secs(2)..=Duration::from_secs(4)).contains(&aged.since_renewal()),
        "2.5 s after the grant: {aged:?}"
    );
    s.keep_alive(lease).await.unwrap();
    let renewed = s.lease_ttl(lease).await.unwrap().expect("a live lease");
    assert!(
        renewed.since_renewal() <= Duration::from_secs(1),
        "{renewed:?}"
    );
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(s.lease_ttl(lease).await.unwrap(), None, "a revoked lease");
}

pub async fn plain_put_detaches_from_the_lease(b: &Backend) {
    let s = &*b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    let other = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    committed(
        s.txn(
            Txn::new()
                .put_leased("pd/a", "1", lease)
                .put_leased("pd/b", "1", lease)
                .put_leased("pd/c", "1", lease),
        )
        .await,
    );
    s.txn(Txn::new().put("pd/a", "2")).await.unwrap();
    s.txn(Txn::new().put_leased("pd/c", "2", other))
        .await
        .unwrap();
    assert_eq!(get(s, "pd/a").await.unwrap().lease, None);
    assert_eq!(get(s, "pd/c").await.unwrap().lease, Some(other));
    s.revoke_lease(lease).await.unwrap();
    let keys: Vec<_> = s
        .list("pd/")
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["pd/a", "pd/c"]);
    s.revoke_lease(other).await.unwrap();
    assert_eq!(get(s, "pd/c").await, None);
}

pub async fn watch_from_a_compacted_revision(b: &Backend) {
    let s = &*b.store;
    s.txn(Txn::new().put("cp/1", "1")).await.unwrap();
    let old = s.list("cp/").await.unwrap();
    s.txn(Txn::new().put("cp/2", "1")).await.unwrap();
    s.txn(Txn::new().put("cp/3", "1")).await.unwrap();
    b.compact().await;
    let mut w = s.watch("cp/", old.revision).await.unwrap();
    let first = within("the compaction error", w.next()).await;
    assert!(
        matches!(first, Err(WatchError::Compacted { compact_revision }) if compact_revision > old.revision),
        "{first:?} (etcd: {})",
        b.is_etcd()
    );
    assert_eq!(
        within("the same error", w.next()).await,
        first,
        "errors are final"
    );
    // Relist and watch again.
    let l = s.list("cp/").await.unwrap();
    assert_eq!(l.items.len(), 3);
    let mut w = s.watch("cp/", l.revision).await.unwrap();
    s.txn(Txn::new().put("cp/4", "1")).await.unwrap();
    assert_eq!(next(&mut w).await.key(), "cp/4");
}
