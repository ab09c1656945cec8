//! One conformance suite, run against the embedded redb store and against a real etcd (which
//! the tests start themselves in private network namespaces; they need root, `ip`, `nsenter`
//! and `etcd`).

mod cases;
mod fixture;

use std::time::{Duration, Instant};

use berth_store::{ClientCert, EtcdStore, Store, StoreError, TlsFiles, Txn};
use fixture::{ETCD_URL, Etcd, Instance, shared_etcd};
use nix::sys::signal::Signal;

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redb {
            $( #[test] fn $case() { crate::fixture::run_redb(crate::cases::$case) } )*
        }
        mod etcd {
            $(
                #[test]
                fn $case() {
                    crate::fixture::run_etcd(
                        stringify!($case),
                        crate::fixture::Instance::Shared,
                        crate::cases::$case,
                    )
                }
            )*
        }
    };
}

conformance!(
    create_if_absent_has_one_winner,
    cas_on_mod_revision,
    compare_value,
    else_branch_applies_and_names_the_failing_compare,
    list_then_watch_has_no_gap_and_no_duplicate,
    concurrent_txns_reach_watchers_whole_and_in_order,
    delete_carries_the_previous_value,
    delete_prefix,
    create_revision_stays_across_updates,
    leased_keys_vanish_without_keep_alive,
    leased_keys_stay_while_kept_alive_and_go_on_revoke,
    lease_ttl_shows_the_time_since_the_last_keep_alive,
    plain_put_detaches_from_the_lease,
);

// Compaction would break the watches of cases running beside it: etcd gets its own server.
#[test]
fn redb_watch_from_a_compacted_revision() {
    fixture::run_redb(cases::watch_from_a_compacted_revision);
}

#[test]
fn etcd_watch_from_a_compacted_revision() {
    fixture::run_etcd(
        "compaction",
        Instance::Private,
        cases::watch_from_a_compacted_revision,
    );
}

fn assert_unavailable_within<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    start: Instant,
    r: Result<T, StoreError>,
) {
    let took = start.elapsed();
    match r {
        Err(StoreError::Unavailable(msg)) => {
            assert!(
                msg.contains("127.0.0.1"),
                "{what}: message names no endpoint: {msg}"
            );
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(took < limit, "{what} took {took:?}");
}

#[test]
fn etcd_unreachable_endpoint_is_unavailable_quickly() {
    let etcd = shared_etcd();
    etcd.run(async || {
        // A closed port in the test namespace.
        let start = Instant::now();
        let r = EtcdStore::connect(&["http://127.0.0.1:2399".to_string()], "/x/", None).await;
        assert_unavailable_within(
            "connect to a closed port",
            Duration::from_secs(3),
            start,
            r.map(drop),
        );
    });
}

/// A call's deadline is 2 s; the rest is slack for a busy machine.
const CALL_LIMIT: Duration = Duration::from_millis(2500);

#[test]
fn etcd_stopped_is_unavailable_and_recovers_by_itself() {
    let etcd = Etcd::start();
    etcd.run(async || {
        let s = fixture::connect("/stop/").await;
        s.txn(Txn::new().put("k", "1")).await.unwrap();
        etcd.signal(Signal::SIGSTOP);
        let start = Instant::now();
        let r = s.get("k").await;
        assert_unavailable_within("get while stopped", CALL_LIMIT, start, r);
        let start = Instant::now();
        let r = s.txn(Txn::new().put("k", "2")).await;
        assert_unavailable_within("txn while stopped", CALL_LIMIT, start, r);
        let start = Instant::now();
        let r = s.grant_lease(Duration::from_secs(5)).await;
        assert_unavailable_within("lease grant while stopped", CALL_LIMIT, start, r);
        etcd.signal(Signal::SIGCONT);
        // The same store, with no reconnect by hand.
        let until = Instant::now() + Duration::from_secs(15);
        let kv = loop {
            match s.get("k").await {
                Ok(kv) => break kv,
                Err(StoreError::Unavailable(_)) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("no recovery after SIGCONT: {e}"),
            }
        };
        // The txn that timed out may or may not have been applied.
        assert!(kv.is_some());
        s.txn(Txn::new().put("k", "3")).await.unwrap();
        let lease = s.grant_lease(Duration::from_secs(5)).await.unwrap();
        s.keep_alive(lease).await.unwrap();
    });
}

#[test]
fn etcd_watch_sees_the_store_prefix_stripped_and_other_prefixes_not() {
    shared_etcd().run(async || {
        let a = fixture::connect("/prefix-a/").await;
        let b = fixture::connect("/prefix-b/").await;
        let l = a.list("").await.unwrap();
        let mut w = a.watch("", l.revision).await.unwrap();
        b.txn(Txn::new().put("k", "b")).await.unwrap();
        a.txn(Txn::new().put("k", "a")).await.unwrap();
        assert_eq!(w.next().await.unwrap().key(), "k");
        assert_eq!(a.get("k").await.unwrap().unwrap().value, b"a");
        assert_eq!(b.get("k").await.unwrap().unwrap().value, b"b");
        let keys: Vec<_> = a
            .list("")
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, ["k"]);
        assert!(a.describe().contains(ETCD_URL));
    });
}

#[tokio::test]
async fn etcd_missing_tls_files_are_an_error() {
    let r = EtcdStore::connect(
        &["https://127.0.0.1:2379".to_string()],
        "/",
        Some(TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            client: Some(ClientCert {
                cert: "/nonexistent/cert.pem".into(),
                key: "/nonexistent/key.pem".into(),
            }),
        }),
    )
    .await;
    match r {
        Err(StoreError::Backend(msg)) => assert!(msg.contains("/nonexistent/ca.pem"), "{msg}"),
        other => panic!("expected an error, got {:?}", other.map(|s| s.describe())),
    }
}
