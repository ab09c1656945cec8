//! The reaper: detached endpoints wait under `releasing/` until their veths are deleted, in
//! batches, and only then are their addresses and host ports released.

use std::net::IpAddr;
use std::sync::Arc;

use berth_dataplane::Netlink;
use berth_model::Endpoint;
use berth_store::{Compare, Txn, TxnOutcome};

use crate::{Agent, MAX_TXN_OPS, Result, firewall, kernel, keys};

impl Agent {
    /// Waits for detached endpoints and reaps them, until the daemon stops.
    pub async fn run_reaper(self: Arc<Self>) {
        loop {
            self.reaper.notified().await;
            if let Err(e) = self.reap().await {
                tracing::error!(error = %e, "reaping detached endpoints failed");
            }
            // Here, where no lock is held: giving a block back takes the topology lock.
            let networks: Vec<String> = self
                .freed_in
                .lock()
                .expect("freed networks lock")
                .drain()
                .collect();
            for network in networks {
                self.release_empty_blocks(&network).await;
            }
        }
    }

    /// Deletes the veths of all detached endpoints at once, then releases the addresses of
    /// those whose veth is gone. Returns how many were released.
    pub async fn reap(&self) -> Result<usize> {
        let _one = self.reaping.lock().await;
        let pending: Vec<Endpoint> = self.load_all(keys::RELEASING).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        // Removing map elements costs the kernel an RCU grace period per transaction (~10 ms
        // measured): one transaction for the whole batch, off the detach path.
        let forwards: Vec<_> = pending.iter().flat_map(firewall::forwards_of).collect();
        self.unpublish(forwards).await;
        let names: Vec<String> = pending.iter().map(|e| e.host_ifname.clone()).collect();
        kernel(move || {
            let mut host = Netlink::open()?;
            berth_dataplane::reap(&mut host)?;
            // Any not in the reap group (its retire failed, or the daemon died before it) is
            // deleted on its own: slower, but nothing stays pending.
            for n in &names {
                berth_dataplane::delete_link(&mut host, n)?;
            }
            Ok(())
        })
        .await?;
        self.end_flows_of_released(&pending).await;
        let done: Vec<&Endpoint> = pending.iter().collect();
        self.release_records(&done).await?;
        Ok(done.len())
    }

    /// Drops `releasing/` records and the addresses they hold (where they still hold them),
    /// in transactions of at most [`MAX_TXN_OPS`] operations (etcd's limit).
    async fn release_records(&self, eps: &[&Endpoint]) -> Result<()> {
        let mut txn = Txn::new();
        let mut freed: Vec<(String, IpAddr)> = Vec::new();
        let mut networks = std::collections::HashSet::new();
        for ep in eps {
            let mut part = Txn::new().delete(keys::releasing(&ep.id));
            let mut part_freed = Vec::new();
            let ports = ep.ports.iter().map(|m| (keys::port(m), None));
            let ips = ep
                .ips
                .iter()
                .map(|ip| (keys::ipam(&ep.network, ip.addr()), Some(ip.addr())));
            for (key, ip) in ports.chain(ips) {
                if let Some(kv) = self.store.get(&key).await?
                    && kv.value == ep.id.as_bytes()
                {
                    part = part
                        .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                        .delete(key);
                    part_freed.extend(ip.map(|ip| (ep.network.clone(), ip)));
                }
            }
            if !txn.ops.is_empty() && txn.ops.len() + part.ops.len() > MAX_TXN_OPS {
                self.release_batch(std::mem::take(&mut txn), std::mem::take(&mut freed))
                    .await?;
            }
            txn.compares.extend(part.compares);
            txn.ops.extend(part.ops);
            freed.extend(part_freed);
            networks.insert(ep.network.clone());
        }
        if !txn.ops.is_empty() {
            self.release_batch(txn, freed).await?;
        }
        self.freed_in
            .lock()
            .expect("freed networks lock")
            .extend(networks);
        Ok(())
    }

    /// Commits one batch of [`Agent::release_records`]; then its addresses are free in
    /// memory too (only what the store released).
    async fn release_batch(&self, txn: Txn, freed: Vec<(String, IpAddr)>) -> Result<()> {
        if let TxnOutcome::CompareFailed(c) = self.commit(txn).await? {
            // Someone changed an address record meanwhile; the next pass sees the new state.
            tracing::debug!(?c, "release raced with another change; will retry");
            self.reaper.notify_one();
            return Ok(());
        }
        for (network, ip) in freed {
            self.release_ip(&network, ip);
        }
        Ok(())
    }
}
