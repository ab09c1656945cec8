//! Hosts: each daemon registers itself under a short lease, and a host whose lease lapsed is
//! gone. Other hosts stop pointing at a gone host at once (the cluster reconciler), and free
//! its addresses and blocks only after a grace period, so that a host cut off for a moment
//! comes back to its own addresses.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_api::HostView;
use berth_model::{Endpoint, HostRecord, MacAddr};
use berth_store::{Compare, StoreError, Txn, TxnOutcome};
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

impl Agent {
    pub fn host(&self) -> &HostIdentity {
        &self.host
    }

    fn host_record(&self) -> HostRecord {
        HostRecord {
            id: self.host.id.clone(),
            address: self.host.address,
            vtep_mac: self.host.vtep_mac(),
            mtu: self.host.mtu,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Registers this host under a fresh lease (and clears a gone mark of an earlier life).
    pub async fn register_host(&self, ttl: Duration) -> Result<berth_store::LeaseId> {
        let lease = self.store.grant_lease(ttl).await?;
        self.commit(
            Txn::new()
                .put_leased(
                    keys::host(&self.host.id),
                    encode(&self.host_record()),
                    lease,
                )
                .delete(keys::host_gone(&self.host.id)),
        )
        .await?;
        Ok(lease)
    }

    /// Registers at start. A record of this id with another address may be this host's own
    /// earlier life (restarted with a new address): its lease lapses within a TTL. One still
    /// renewed after that is another daemon with the same id (a cloned machine-id): refused,
    /// as the two would take each other's sandboxes for dead.
    pub async fn register_host_at_start(&self, ttl: Duration) -> Result<berth_store::LeaseId> {
        let key = keys::host(&self.host.id);
        let deadline = tokio::time::Instant::now() + ttl + Duration::from_secs(2);
        let mut said = false;
        loop {
            let other = match self.store.get(&key).await? {
                Some(kv) => decode::<HostRecord>(&kv)
                    .ok()
                    .filter(|r| r.address != self.host.address),
                None => None,
            };
            let Some(other) = other else { break };
            let at = other
                .address
                .map_or_else(|| "no address".to_string(), |a| a.to_string());
            if tokio::time::Instant::now() > deadline {
                return Err(AgentError::Conflict(format!(
                    "host id {:?} is registered by a running daemon at {at}; give this host another --host-id",
                    self.host.id
                )));
            }
            if !said {
                tracing::warn!(host = %self.host.id, "host id registered at {at}; waiting for that registration to lapse");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.register_host(ttl).await
    }

    /// Keeps this host's registration alive for the life of the daemon: renews the lease
    /// three times per TTL, and registers again under a new lease when the old one lapsed
    /// (the store was unreachable for longer than the TTL).
    pub async fn run_host_lease(self: std::sync::Arc<Self>, ttl: Duration, mut lease: i64) {
        let every = (ttl / 3).max(Duration::from_millis(200));
        // After a failure, soon again rather than a third of a TTL later: two slow failures
        // in a row would otherwise let the lease lapse.
        let retry = Duration::from_millis(500).min(every);
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            match self.store.keep_alive(lease).await {
                Ok(()) => {
                    wait = every;
                    continue;
                }
                Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(host = %self.host.id, "host lease lapsed; registering again");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the host lease");
                    wait = retry;
                    continue;
                }
            }
            loop {
                match self.register_host(ttl).await {
                    Ok(l) => {
                        lease = l;
                        tracing::info!(host = %self.host.id, "host registered again");
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

    /// The registered (live) hosts.
    pub(crate) async fn live_hosts(&self) -> Result<HashMap<String, HostRecord>> {
        let mut hosts = HashMap::new();
        for kv in self.store.list(keys::HOSTS).await?.items {
            let h: HostRecord = decode(&kv)?;
            hosts.insert(h.id.clone(), h);
        }
        Ok(hosts)
    }

    /// `berth host ls`: live hosts, and gone hosts whose records are still kept.
    pub async fn hosts(&self) -> Result<Vec<HostView>> {
        let live = self.live_hosts().await?;
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
        for id in count.keys() {
            if !live.contains_key(id) {
                gone.entry(id.clone()).or_insert(0);
            }
        }
        let now = now_secs();
        let mut views: Vec<HostView> = live
            .values()
            .map(|h| HostView {
                id: h.id.clone(),
                address: h.address,
                vtep_mac: Some(h.vtep_mac),
                state: "up".into(),
                endpoints: count.get(&h.id).copied().unwrap_or(0),
                last_seen: now,
            })
            .collect();
        views.extend(
            gone.into_iter()
                .filter(|(id, _)| !live.contains_key(id))
                .map(|(id, since)| HostView {
                    endpoints: count.get(&id).copied().unwrap_or(0),
                    id,
                    address: None,
                    vtep_mac: None,
                    state: "gone".into(),
                    last_seen: since,
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
    /// step only while the host is still gone. Returns how many endpoints went.
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
                .delete(keys::host_gone(id)),
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

    #[test]
    fn vtep_macs_are_stable_unicast_and_differ_between_hosts() {
        let a = vtep_mac("h1");
        assert_eq!(a, vtep_mac("h1"));
        assert_ne!(a, vtep_mac("h2"));
        assert_eq!(a.0[0] & 0x01, 0, "unicast");
        assert_eq!(a.0[0] & 0x02, 0x02, "locally administered");
    }
}
