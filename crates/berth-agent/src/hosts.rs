//! Hosts: each daemon registers itself under a short lease, and a host whose lease lapsed is
//! gone. A gone host may be dead or only its daemon stopped, stalled or cut off from the
//! store, while its containers run on: other hosts stop choosing it (its service backends
//! and names go at once) but keep sending what is addressed to its endpoints to its last
//! registered address, and free its addresses, blocks and that address only after a grace
//! period (or `berth host rm`), so that a host back in time finds everything as it was.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_api::HostView;
use berth_model::{Endpoint, HostRecord, MacAddr};
use berth_store::{Compare, LeaseId, Op, Store, StoreError, Txn, TxnOutcome};
use serde::{Deserialize, Serialize};

use crate::{Agent, AgentError, Result, decode, encode, keys};

/// Who this daemon is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub id: String,
    /// The underlay address other hosts send overlay traffic to; `None` when the host has
    /// none (no default route and no `--advertise-address`): overlay networks then refuse.
    pub address: Option<IpAddr>,
    /// The underlay interface's MTU.
    pub mtu: u32,
}

impl HostIdentity {
    /// The MAC of this host's VXLAN devices: derived from the id (FNV-1a), so it is the same
    /// after every restart and peers' entries never go stale because of it.
    pub fn vtep_mac(&self) -> MacAddr {
        vtep_mac(&self.id)
    }
}

pub fn vtep_mac(id: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    // Locally administered, unicast.
    MacAddr([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

/// The default host id: the first 12 characters of `/etc/machine-id`.
pub fn default_host_id() -> std::io::Result<String> {
    let id = std::fs::read_to_string("/etc/machine-id")?;
    let id = id.trim();
    if id.len() < 12 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "/etc/machine-id is empty or short; pass --host-id",
        ));
    }
    Ok(id[..12].to_string())
}

/// When a host's lease was first seen lapsed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GoneRecord {
    since: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// This host's registration: a record under a lease (while the lease lives, the host is up)
/// and a durable record of its address (other hosts keep sending its endpoints' traffic there
/// while the lease has lapsed, until the host is freed). [`HostLease::keep`] renews it; the
/// daemon runs that on a thread and store connection of its own (see `daemon.rs`), so a busy
/// daemon does not starve its renewals.
#[derive(Debug, Clone)]
pub struct HostLease {
    record: HostRecord,
    ttl: Duration,
}

impl HostLease {
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Registers under a fresh lease (and clears a gone mark of an earlier life). The address
    /// record is written only when it changed: a registration after a lapse then wakes no
    /// other host's reconcilers.
    pub async fn register(&self, store: &dyn Store) -> Result<LeaseId> {
        let lease = store.grant_lease(self.ttl).await?;
        let id = &self.record.id;
        let value = encode(&self.record);
        let address = keys::host_address(id);
        store
            .txn(
                Txn::new()
                    .when(Compare::Value(address.clone(), value.clone()))
                    .put_leased(keys::host(id), value.clone(), lease)
                    .delete(keys::host_gone(id))
                    .or_else(Op::PutLeased(keys::host(id), value.clone(), lease))
                    .or_else(Op::Delete(keys::host_gone(id)))
                    .or_else(Op::Put(address, value)),
            )
            .await?;
        Ok(lease)
    }

    /// Registers at start. A record of this id with another address may be this host's own
    /// earlier life (restarted with a new address): its lease lapses within a TTL. One still
    /// renewed after that is another daemon with the same id (a cloned machine-id): refused,
    /// as the two would take each other's sandboxes for dead.
    pub async fn register_at_start(&self, store: &dyn Store) -> Result<LeaseId> {
        let key = keys::host(&self.record.id);
        let deadline = tokio::time::Instant::now() + self.ttl + Duration::from_secs(2);
        let mut said = false;
        loop {
            let other = match store.get(&key).await? {
                Some(kv) => decode::<HostRecord>(&kv)
                    .ok()
                    .filter(|r| r.address != self.record.address),
                None => None,
            };
            let Some(other) = other else { break };
            let at = other
                .address
                .map_or_else(|| "no address".to_string(), |a| a.to_string());
            if tokio::time::Instant::now() > deadline {
                return Err(AgentError::Conflict(format!(
                    "host id {:?} is registered by a running daemon at {at}; give this host another --host-id",
                    self.record.id
                )));
            }
            if !said {
                tracing::warn!(host = %self.record.id, "host id registered at {at}; waiting for that registration to lapse");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.register(store).await
    }

    /// Keeps the registration alive until dropped: renews the lease three times per TTL, and
    /// registers again under a new lease when the old one lapsed (the daemon was stopped or
    /// the store unreachable for longer than the TTL). A renewal that comes late (more than a
    /// third of the TTL after it was due) is logged with its delay.
    pub async fn keep(&self, store: &dyn Store, mut lease: LeaseId) {
        let id = &self.record.id;
        let every = (self.ttl / 3).max(Duration::from_millis(200));
        // After a failure, soon again rather than a third of a TTL later: two slow failures
        // in a row would otherwise let the lease lapse.
        let retry = Duration::from_millis(500).min(every);
        let mut renewed = Instant::now();
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            match store.keep_alive(lease).await {
                Ok(()) => {
                    let since = renewed.elapsed();
                    renewed = Instant::now();
                    if since > every * 2 {
                        tracing::warn!(
                            host = %id, late_ms = (since - every).as_millis(),
                            "host lease renewed late: {since:.1?} after the previous renewal (it lapses after {:?})",
                            self.ttl
                        );
                    }
                    wait = every;
                    continue;
                }
                Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(
                        host = %id, late_ms = renewed.elapsed().saturating_sub(every).as_millis(),
                        "host lease lapsed ({:.1?} after the last renewal); registering again",
                        renewed.elapsed()
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the host lease");
                    wait = retry;
                    continue;
                }
            }
            loop {
                match self.register(store).await {
                    Ok(l) => {
                        lease = l;
                        renewed = Instant::now();
                        tracing::info!(host = %id, "host registered again");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register the host");
                        tokio::time::sleep(retry).await;
                    }
                }
            }
            wait = every;
        }
    }
}

impl Agent {
    pub fn host(&self) -> &HostIdentity {
        &self.host
    }

    /// This host's registration under a lease of `ttl`.
    pub fn host_lease(&self, ttl: Duration) -> HostLease {
        HostLease {
            record: HostRecord {
                id: self.host.id.clone(),
                address: self.host.address,
                vtep_mac: self.host.vtep_mac(),
                mtu: self.host.mtu,
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            ttl,
        }
    }

    /// The registered (live) hosts.
    pub(crate) async fn live_hosts(&self) -> Result<HashMap<String, HostRecord>> {
        let mut hosts = HashMap::new();
        for kv in self.store.list(keys::HOSTS).await?.items {
            let h: HostRecord = decode(&kv)?;
            hosts.insert(h.id.clone(), h);
        }
        Ok(hosts)
    }

    /// Every host's last registered address (the durable records), by id.
    async fn host_addresses(&self) -> Result<HashMap<String, HostRecord>> {
        let mut hosts = HashMap::new();
        for kv in self.store.list(keys::HOST_ADDRESSES).await?.items {
            let h: HostRecord = decode(&kv)?;
            hosts.insert(h.id.clone(), h);
        }
        Ok(hosts)
    }

    /// `berth host ls`: live hosts, and gone hosts whose records are still kept. An up host's
    /// `last_seen` is its last renewal, read from its lease's remaining TTL (one lease query
    /// per up host, made only here: renewals themselves write nothing); a gone host's is
    /// when its lapse was first noticed.
    pub async fn hosts(&self) -> Result<Vec<HostView>> {
        let listing = self.store.list(keys::HOSTS).await?;
        let mut renewals = tokio::task::JoinSet::new();
        let mut live: HashMap<String, HostRecord> = HashMap::new();
        for kv in &listing.items {
            let h: HostRecord = decode(kv)?;
            if let Some(lease) = kv.lease {
                let (store, id) = (self.store.clone(), h.id.clone());
                renewals.spawn(async move { (id, store.lease_ttl(lease).await) });
            }
            live.insert(h.id.clone(), h);
        }
        let now = now_secs();
        let mut last_seen: HashMap<String, u64> = HashMap::new();
        while let Some(done) = renewals.join_next().await {
            let (id, ttl) = done.map_err(|e| AgentError::Internal(format!("lease query: {e}")))?;
            // A lease that lapsed since the listing: unknown, as for a host without one.
            if let Some(ttl) = ttl? {
                last_seen.insert(id, now.saturating_sub(ttl.since_renewal().as_secs()));
            }
        }
        let addresses = self.host_addresses().await?;
        let endpoints: Vec<Endpoint> = self.load_all(keys::ENDPOINTS).await?;
        let mut count: HashMap<String, usize> = HashMap::new();
        for ep in &endpoints {
            let host = ep.host.clone().unwrap_or_else(|| self.host.id.clone());
            *count.entry(host).or_default() += 1;
        }
        let mut gone: BTreeMap<String, u64> = BTreeMap::new();
        for kv in self.store.list(keys::HOSTS_GONE).await?.items {
            let since = decode::<GoneRecord>(&kv).map(|g| g.since).unwrap_or(0);
            gone.insert(kv.key[keys::HOSTS_GONE.len()..].to_string(), since);
        }
        // Also hosts not marked gone yet, and (on a shared store, where an address record
        // lives from a host's first registration until it is freed) hosts whose gone mark
        // went between the listings above: a host coming or going is always listed.
        let unmarked = count.keys().chain(addresses.keys().filter(|_| self.shared));
        for id in unmarked {
            if !live.contains_key(id) {
                gone.entry(id.clone()).or_insert(0);
            }
        }
        let mut views: Vec<HostView> = live
            .values()
            .map(|h| HostView {
                id: h.id.clone(),
                address: h.address,
                vtep_mac: Some(h.vtep_mac),
                state: "up".into(),
                endpoints: count.get(&h.id).copied().unwrap_or(0),
                last_seen: last_seen.get(&h.id).copied().unwrap_or(0),
            })
            .collect();
        views.extend(
            gone.into_iter()
                .filter(|(id, _)| !live.contains_key(id))
                .map(|(id, since)| {
                    let known = addresses.get(&id);
                    HostView {
                        endpoints: count.get(&id).copied().unwrap_or(0),
                        address: known.and_then(|h| h.address),
                        vtep_mac: known.map(|h| h.vtep_mac),
                        id,
                        state: "gone".into(),
                        last_seen: since,
                    }
                }),
        );
        views.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(views)
    }

    /// `berth host rm`: frees a gone host's records now, without waiting for the grace.
    pub async fn remove_host(&self, id: &str) -> Result<usize> {
        if id == self.host.id || self.store.get(&keys::host(id)).await?.is_some() {
            return Err(AgentError::Conflict(format!(
                "host {id:?} is up; stop its daemon first"
            )));
        }
        let known = self.store.get(&keys::host_gone(id)).await?.is_some()
            || self.store.get(&keys::host_address(id)).await?.is_some()
            || self
                .load_all::<Endpoint>(keys::ENDPOINTS)
                .await?
                .iter()
                .any(|e| e.host.as_deref() == Some(id));
        if !known {
            return Err(AgentError::NotFound(format!("no host {id:?}")));
        }
        self.free_host(id).await
    }

    /// Marks hosts that hold records but have no lease as gone, and frees those gone for
    /// longer than `grace`. Run by every host; the store's compares make it safe to race.
    pub(crate) async fn collect_gone_hosts(&self, grace: Duration) -> Result<()> {
        let live = self.live_hosts().await?;
        let mut holders: Vec<String> = self
            .load_all::<Endpoint>(keys::ENDPOINTS)
            .await?
            .into_iter()
            .filter_map(|e| e.host)
            .collect();
        for kv in self.store.list(keys::BLOCKS).await?.items {
            holders.push(String::from_utf8_lossy(&kv.value).into_owned());
        }
        // A host without endpoints or blocks holds its address record: freed too, in time.
        holders.extend(self.host_addresses().await?.into_keys());
        holders.sort();
        holders.dedup();
        let now = now_secs();
        for id in holders.iter().filter(|h| !live.contains_key(*h)) {
            if *id == self.host.id {
                continue;
            }
            let key = keys::host_gone(id);
            let since = match self.store.get(&key).await? {
                Some(kv) => decode::<GoneRecord>(&kv).map(|g| g.since).unwrap_or(0),
                None => {
                    let txn = Txn::new()
                        .when(Compare::Absent(keys::host(id)))
                        .when(Compare::Absent(key.clone()))
                        .put(key, encode(&GoneRecord { since: now }));
                    self.commit(txn).await?;
                    tracing::warn!(host = %id, "host lease lapsed: host is gone");
                    continue;
                }
            };
            if now.saturating_sub(since) >= grace.as_secs() {
                let n = self.free_host(id).await?;
                tracing::warn!(host = %id, endpoints = n, "gone host's records freed after the grace period");
            }
        }
        Ok(())
    }

    /// Deletes a gone host's endpoints (with their addresses), blocks and own records; each
    /// step only while the host is still gone. Its address record goes last: until then the
    /// other hosts keep their entries for whatever of its endpoints is left. Returns how many
    /// endpoints went.
    async fn free_host(&self, id: &str) -> Result<usize> {
        let gone = || Compare::Absent(keys::host(id));
        let mut freed = 0;
        for kv in self.store.list(keys::ENDPOINTS).await?.items {
            let ep: Endpoint = decode(&kv)?;
            if ep.host.as_deref() != Some(id) {
                continue;
            }
            let mut txn = Txn::new()
                .when(gone())
                .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                .delete(kv.key.clone());
            for ip in &ep.ips {
                txn = txn.delete(keys::ipam(&ep.network, ip.addr()));
            }
            match self.commit(txn).await? {
                TxnOutcome::Committed { .. } => {
                    freed += 1;
                    self.forget_remote_endpoint(&ep);
                }
                TxnOutcome::CompareFailed(Compare::Absent(_)) => {
                    return Err(AgentError::Conflict(format!("host {id:?} came back")));
                }
                TxnOutcome::CompareFailed(_) => {}
            }
        }
        // Addresses its detached endpoints still held (its `releasing/`, which only it reads).
        let releasing = format!("{}{}", keys::local_prefix(id), keys::RELEASING);
        for kv in self.store.list(&releasing).await?.items {
            let Ok(ep) = decode::<Endpoint>(&kv) else {
                continue;
            };
            for ip in &ep.ips {
                let key = keys::ipam(&ep.network, ip.addr());
                self.free_of_gone(id, key, ep.id.clone().into_bytes())
                    .await?;
            }
        }
        // Addresses its Docker engine's IPAM pools reserved in berth networks (`docker:<pool>`
        // owners; the pools are its own records, gone with it below).
        let pools = format!("{}{}", keys::local_prefix(id), keys::DOCKER_POOLS);
        let owners: std::collections::HashSet<Vec<u8>> = self
            .store
            .list(&pools)
            .await?
            .items
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next())
            .map(|pool| format!("{}{pool}", keys::DOCKER_OWNER_PREFIX).into_bytes())
            .collect();
        if !owners.is_empty() {
            for kv in self.store.list(keys::IPAM).await?.items {
                if owners.contains(&kv.value) {
                    self.free_of_gone(id, kv.key, kv.value).await?;
                }
            }
        }
        // Its bridge networks: no other host can use or remove them.
        for net in self.networks().await? {
            if net.host.as_deref() == Some(id) {
                let mut txn = Txn::new()
                    .when(gone())
                    .delete(keys::network(&net.name))
                    .delete_prefix(keys::ipam_prefix(&net.name));
                for s in &net.subnets {
                    txn = txn.delete(keys::subnet(s.cidr));
                }
                self.commit(txn).await?;
            }
        }
        for kv in self.store.list(keys::BLOCKS).await?.items {
            if kv.value == id.as_bytes() {
                self.free_of_gone(id, kv.key, kv.value).await?;
            }
        }
        self.commit(
            Txn::new()
                .when(gone())
                .delete_prefix(keys::local_prefix(id))
                .delete(keys::host_gone(id))
                .delete(keys::host_address(id)),
        )
        .await?;
        Ok(freed)
    }

    /// Deletes `key` if it still holds `value`, and only while host `id` is gone.
    async fn free_of_gone(&self, id: &str, key: String, value: Vec<u8>) -> Result<()> {
        self.commit(
            Txn::new()
                .when(Compare::Absent(keys::host(id)))
                .when(Compare::Value(key.clone(), value))
                .delete(key),
        )
        .await?;
        Ok(())
    }

    /// Runs [`Agent::collect_gone_hosts`] every `every` for the life of the daemon.
    pub async fn run_host_collector(self: std::sync::Arc<Self>, every: Duration, grace: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.collect_gone_hosts(grace).await {
                tracing::debug!(error = %e, "gone-host collection failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use berth_store::RedbStore;

    #[tokio::test]
    async fn registration_keeps_the_address_record_and_replaces_a_lapsed_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        let agent = Agent::new(store.clone(), dir.path().join("netns"), 1500).with_host(
            HostIdentity {
                id: "h1".into(),
                address: Some("198.51.100.11".parse().unwrap()),
                mtu: 1500,
            },
            true,
        );
        let lease = agent.host_lease(Duration::from_millis(1500));
        let first = lease.register(&*store).await.unwrap();
        let live = store.get("hosts/h1").await.unwrap().unwrap();
        assert_eq!(live.lease, Some(first));
        let address = store.get("host-addresses/h1").await.unwrap().unwrap();
        assert_eq!(address.lease, None, "the address record outlives the lease");
        assert_eq!(decode::<HostRecord>(&address).unwrap(), lease.record);

        // The lease lapses and other hosts mark the host gone: the address stays; the next
        // registration clears the mark and leaves the unchanged address record alone (no
        // event for every other host's reconcilers).
        store.revoke_lease(first).await.unwrap();
        assert!(store.get("hosts/h1").await.unwrap().is_none());
        store
            .txn(Txn::new().put(keys::host_gone("h1"), encode(&GoneRecord { since: 1 })))
            .await
            .unwrap();
        let second = lease.register(&*store).await.unwrap();
        assert_eq!(
            store.get("hosts/h1").await.unwrap().unwrap().lease,
            Some(second)
        );
        assert!(store.get("hosts-gone/h1").await.unwrap().is_none());
        let again = store.get("host-addresses/h1").await.unwrap().unwrap();
        assert_eq!(again.mod_revision, address.mod_revision, "not rewritten");

        // keep(): a lease lapsed under it is replaced by a new registration.
        let keeper = {
            let (lease, store) = (lease.clone(), store.clone());
            tokio::spawn(async move { lease.keep(&*store, second).await })
        };
        store.revoke_lease(second).await.unwrap();
        let mut renewed = None;
        for _ in 0..100 {
            renewed = store.get("hosts/h1").await.unwrap().and_then(|kv| kv.lease);
            if renewed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            renewed.is_some_and(|l| l != second),
            "registered again: {renewed:?}"
        );
        keeper.abort();
    }

    #[test]
    fn vtep_macs_are_stable_unicast_and_differ_between_hosts() {
        let a = vtep_mac("h1");
        assert_eq!(a, vtep_mac("h1"));
        assert_ne!(a, vtep_mac("h2"));
        assert_eq!(a.0[0] & 0x01, 0, "unicast");
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
    }
}
