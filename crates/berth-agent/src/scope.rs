//! One host's view of a shared store: the host-scoped keys ([`keys::HOST_SCOPED`]) are kept
//! under `local/<host>/`, added on the way in and stripped on the way out. The rest of the
//! agent names keys as if its host were the only one, and two hosts' namespaces, sandboxes
//! and Docker objects can never collide (a namespace id is only unique on its own kernel).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_store::{
    Compare, KeyValue, LeaseId, LeaseTtl, Listing, Op, Store, StoreError, Txn, TxnOutcome, Watch,
};

use crate::keys;

pub struct HostScoped {
    inner: Arc<dyn Store>,
    /// `local/<host>/`.
    scope: String,
}

impl HostScoped {
    pub fn new(inner: Arc<dyn Store>, host: &str) -> Self {
        HostScoped {
            inner,
            scope: keys::local_prefix(host),
        }
    }

    fn scoped(key: &str) -> bool {
        keys::HOST_SCOPED.iter().any(|p| key.starts_with(p))
    }

    fn key_in(&self, key: String) -> String {
        if Self::scoped(&key) {
            format!("{}{key}", self.scope)
        } else {
            key
        }
    }

    fn key_out(&self, key: String) -> String {
        match key.strip_prefix(&self.scope) {
            Some(k) => k.to_string(),
            None => key,
        }
    }

    fn kv_out(&self, mut kv: KeyValue) -> KeyValue {
        kv.key = self.key_out(kv.key);
        kv
    }

    fn compare_in(&self, c: Compare) -> Compare {
        match c {
            Compare::Absent(k) => Compare::Absent(self.key_in(k)),
            Compare::ModRevision(k, r) => Compare::ModRevision(self.key_in(k), r),
            Compare::Value(k, v) => Compare::Value(self.key_in(k), v),
        }
    }

    fn compare_out(&self, c: Compare) -> Compare {
        match c {
            Compare::Absent(k) => Compare::Absent(self.key_out(k)),
            Compare::ModRevision(k, r) => Compare::ModRevision(self.key_out(k), r),
            Compare::Value(k, v) => Compare::Value(self.key_out(k), v),
        }
    }

    fn op_in(&self, op: Op) -> Op {
        match op {
            Op::Put(k, v) => Op::Put(self.key_in(k), v),
            Op::PutLeased(k, v, l) => Op::PutLeased(self.key_in(k), v, l),
            Op::Delete(k) => Op::Delete(self.key_in(k)),
            Op::DeletePrefix(k) => Op::DeletePrefix(self.key_in(k)),
        }
    }
}

#[async_trait]
impl Store for HostScoped {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kv = self.inner.get(&self.key_in(key.to_string())).await?;
        Ok(kv.map(|kv| self.kv_out(kv)))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let mut l = self.inner.list(&self.key_in(prefix.to_string())).await?;
        l.items = l.items.into_iter().map(|kv| self.kv_out(kv)).collect();
        Ok(l)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let txn = Txn {
            compares: txn
                .compares
                .into_iter()
                .map(|c| self.compare_in(c))
                .collect(),
            ops: txn.ops.into_iter().map(|o| self.op_in(o)).collect(),
            otherwise: txn.otherwise.into_iter().map(|o| self.op_in(o)).collect(),
        };
        Ok(match self.inner.txn(txn).await? {
            TxnOutcome::CompareFailed(c) => TxnOutcome::CompareFailed(self.compare_out(c)),
            committed => committed,
        })
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<Watch, StoreError> {
        // Only cluster-wide prefixes are watched (hosts, endpoints, networks): another host's
        // scoped keys are never this host's business, and this host's own it writes itself.
        debug_assert!(!Self::scoped(prefix), "watching a host-scoped prefix");
        self.inner.watch(prefix, after).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }

    async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<LeaseTtl>, StoreError> {
        self.inner.lease_ttl(lease).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_scoped_keys_move_under_the_host_and_back() {
        let s = HostScoped {
            inner: Arc::new(NoStore),
            scope: keys::local_prefix("h1"),
        };
        assert_eq!(
            s.key_in("attachments/4:5/eth0".into()),
            "local/h1/attachments/4:5/eth0"
        );
        assert_eq!(s.key_in("docker/pools/x".into()), "local/h1/docker/pools/x");
        assert_eq!(s.key_in("endpoints/abc".into()), "endpoints/abc");
        assert_eq!(s.key_in("ipam/blue/10.0.0.2".into()), "ipam/blue/10.0.0.2");
        assert_eq!(
            s.key_out("local/h1/sandboxes/a".into()),
            "sandboxes/a",
            "stripped on the way out"
        );
        assert_eq!(
            s.compare_out(s.compare_in(Compare::Absent("members/blue/1:2".into()))),
            Compare::Absent("members/blue/1:2".into())
        );
    }

    /// A store that is never called: the key mapping is pure.
    struct NoStore;

    #[async_trait]
    impl Store for NoStore {
        async fn get(&self, _: &str) -> Result<Option<KeyValue>, StoreError> {
            unreachable!()
        }
        async fn list(&self, _: &str) -> Result<Listing, StoreError> {
            unreachable!()
        }
        async fn txn(&self, _: Txn) -> Result<TxnOutcome, StoreError> {
            unreachable!()
        }
        async fn watch(&self, _: &str, _: u64) -> Result<Watch, StoreError> {
            unreachable!()
        }
        async fn grant_lease(&self, _: Duration) -> Result<LeaseId, StoreError> {
            unreachable!()
        }
        async fn keep_alive(&self, _: LeaseId) -> Result<(), StoreError> {
            unreachable!()
        }
        async fn revoke_lease(&self, _: LeaseId) -> Result<(), StoreError> {
            unreachable!()
        }
        async fn lease_ttl(&self, _: LeaseId) -> Result<Option<LeaseTtl>, StoreError> {
            unreachable!()
        }
        fn describe(&self) -> String {
            unreachable!()
        }
    }
}
