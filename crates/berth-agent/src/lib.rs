//! The per-host agent.
//!
//! Data flows one way: an API call validates its input, commits the desired state to the store
//! in one transaction (addresses included, so an address is never handed out twice), and only
//! then changes the kernel. If the kernel step fails the transaction is undone; if the daemon
//! dies in between, [`Agent::reconcile`] finishes or undoes the work at the next start.

pub mod api;
pub mod daemon;
mod dns;
pub mod docker;
mod error;
mod firewall;
pub mod hosts;
mod ipam;
mod keys;
pub mod overlay;
mod reconcile;
pub mod scope;
mod watch;

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_api::{Allocation, Attach, CreateNetwork, Status};
use berth_dataplane::{BridgeSpec, EndpointSpec, Netlink, netns};
use berth_ipam::{IpamError, Pool};
use berth_model::{
    DEFAULT_POOL, DEFAULT_POOL_PREFIX, Driver, Endpoint, MacAddr, NetnsRef, Network, Sandbox,
    Subnet, bridge_name, parse_subnet, tombstone_name, validate_ifname, validate_name,
    validate_network_mtu, validate_sandbox_name, veth_name, vxlan_name,
};
use berth_store::{Compare, KeyValue, Store, Txn, TxnOutcome};
use ipnet::IpNet;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use dns::Discovery;
pub use error::{AgentError, Result};
pub use hosts::HostIdentity;
pub use reconcile::ReconcileReport;

pub struct Agent {
    store: Arc<dyn Store>,
    netns_dir: PathBuf,
    /// MTU for networks created without one: the host's default-route interface's.
    default_mtu: u32,
    /// The in-memory index of taken addresses per network, rebuilt from the store at start.
    pools: Mutex<HashMap<String, Vec<Pool>>>,
    /// Docker plugin calls run one at a time: they read-modify-write shared pool records.
    docker_calls: tokio::sync::Mutex<()>,
    /// Addresses Docker's IPAM calls handed out on berth networks, (network, address) → pool
    /// id: taken in memory only, and committed with the endpoint that uses them
    /// (CreateEndpoint). After a restart they are simply free again; a CreateEndpoint that
    /// then brings one finds it free (and takes it) or taken (and is refused): never twice.
    docker_reserved: Mutex<HashMap<(String, IpAddr), String>>,
    /// Docker endpoints created and not joined yet, by Docker endpoint id.
    docker_pending: Mutex<HashMap<String, docker::PendingEndpoint>>,
    /// Creating or removing a network excludes attach and detach; those run in parallel.
    topology: Arc<tokio::sync::RwLock<()>>,
    /// Wakes the reaper, which deletes detached endpoints' veths in batches.
    reaper: tokio::sync::Notify,
    /// One reap pass at a time.
    reaping: tokio::sync::Mutex<()>,
    /// Changes to berth's nftables table, one at a time: a rebuild reads the store under it,
    /// so no endpoint's elements are lost to a rebuild racing its attach.
    firewall: tokio::sync::Mutex<()>,
    /// Held by an attach that publishes ports from its conflict check to its commit.
    publishing: tokio::sync::Mutex<()>,
    /// DNS service discovery; `None` when the daemon runs without.
    discovery: Option<Discovery>,
    /// This daemon's host in the cluster.
    host: HostIdentity,
    /// The store is shared with other hosts (etcd): records carry their host.
    shared: bool,
    /// One overlay network realization at a time (two attaches would both create the device).
    overlay_realizing: tokio::sync::Mutex<()>,
    /// Ids of the overlay networks realized here since the last check of the kernel: an
    /// attach to one of them skips the netlink round trips. Forgotten at teardown and when
    /// the link watch sees one of their links go.
    pub(crate) realized: Mutex<std::collections::HashSet<String>>,
    /// Tells the cluster reconciler that an overlay network was just realized here.
    overlay_realized: tokio::sync::mpsc::UnboundedSender<String>,
    overlay_events: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Address blocks claimed by this host (all hosts' claims race on one key each).
    block_claims: tokio::sync::Mutex<()>,
    /// Networks whose addresses the reaper freed: their empty blocks may go back.
    freed_in: Mutex<std::collections::HashSet<String>>,
    /// Block claims that lost a race to another host: the cost of sharing a subnet.
    pub(crate) block_claim_retries: std::sync::atomic::AtomicU64,
}

/// What of an endpoint's holdings [`Agent::endpoint_records`] covers beside its records. A
/// detached endpoint keeps its addresses and host ports until it is reaped (`Neither`); a
/// Docker endpoint takes its addresses over from the IPAM reservations separately (`Ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Neither,
    Ports,
    PortsAndAddresses,
}

/// Claims the network's subnets in its creating transaction: the overlap check reads the
/// networks there are, and a network another host creates at the same moment with the same
/// subnet (both carving the first free /24) would pass it too.
fn claim_subnets(net: &Network, mut txn: Txn) -> Txn {
    for s in &net.subnets {
        let key = keys::subnet(s.cidr);
        txn = txn
            .when(Compare::Absent(key.clone()))
            .put(key, net.name.clone());
    }
    txn
}

/// Why a network's creating transaction failed.
fn create_conflict(net: &Network, c: &Compare) -> AgentError {
    match c.key().strip_prefix(keys::SUBNETS) {
        Some(_) => AgentError::Conflict(format!(
            "a subnet of network {:?} was taken by another network meanwhile; try again",
            net.name
        )),
        None => AgentError::Conflict(format!("network {:?} already exists", net.name)),
    }
}

/// The most operations berth puts in one transaction: etcd refuses more than 128 (its
/// `--max-txn-ops` default) in any branch.
const MAX_TXN_OPS: usize = 100;

fn random_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("model types serialise")
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| AgentError::Corrupt {
        key: kv.key.clone(),
        why: e.to_string(),
    })
}

/// Deletes a link of the host namespace by name (a veth's peer goes with it); gone already
/// is fine. Whether it was there.
async fn remove_link(name: String) -> Result<bool> {
    kernel(move || berth_dataplane::delete_link(&mut Netlink::open()?, &name)).await
}

/// Runs blocking kernel work off the async workers.
async fn kernel<T: Send + 'static>(
    f: impl FnOnce() -> berth_dataplane::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("kernel task failed: {e}")))?
        .map_err(AgentError::from)
}

fn removing(sandbox: &str) -> AgentError {
    AgentError::Conflict(format!("sandbox {sandbox:?} is being removed"))
}

fn gateway_nets(net: &Network) -> Vec<IpNet> {
    net.subnets
        .iter()
        .map(|s| IpNet::new(s.gateway, s.cidr.prefix_len()).expect("prefix from a valid subnet"))
        .collect()
}

/// The gateways of `net` the sandbox's default routes go through because `ep` holds them,
/// after the default-route records `holders` (key → endpoint id).
fn default_gateways(
    ep: &Endpoint,
    net: &Network,
    holders: &HashMap<String, String>,
) -> Vec<IpAddr> {
    [true, false]
        .into_iter()
        .filter(|ipv4| holders.get(&keys::default_route(&ep.netns.id, *ipv4)) == Some(&ep.id))
        .filter_map(|ipv4| gateway_of(net, ipv4))
        .collect()
}

/// The network's gateway of one address family.
fn gateway_of(net: &Network, ipv4: bool) -> Option<IpAddr> {
    net.subnets
        .iter()
        .map(|s| s.gateway)
        .find(|g| g.is_ipv4() == ipv4)
}

fn bridge_spec(net: &Network) -> BridgeSpec {
    // The bridge MAC is derived from the network id: stable across re-creation by reconcile.
    let id = u64::from_str_radix(&net.id, 16).unwrap_or(0).to_be_bytes();
    BridgeSpec {
        name: net.bridge.clone(),
        mtu: net.mtu,
        // 02:62 never meets the 02:42 space of endpoint MACs.
        mac: [0x02, 0x62, id[4], id[5], id[6], id[7]],
        addresses: gateway_nets(net),
    }
}

impl Agent {
    pub fn new(store: Arc<dyn Store>, netns_dir: PathBuf, default_mtu: u32) -> Self {
        let (overlay_realized, overlay_events) = tokio::sync::mpsc::unbounded_channel();
        Agent {
            store,
            netns_dir,
            default_mtu,
            pools: Mutex::new(HashMap::new()),
            topology: Arc::new(tokio::sync::RwLock::new(())),
            docker_calls: tokio::sync::Mutex::new(()),
            docker_reserved: Mutex::new(HashMap::new()),
            docker_pending: Mutex::new(HashMap::new()),
            reaper: tokio::sync::Notify::new(),
            reaping: tokio::sync::Mutex::new(()),
            firewall: tokio::sync::Mutex::new(()),
            publishing: tokio::sync::Mutex::new(()),
            discovery: None,
            host: HostIdentity {
                id: "local".into(),
                address: None,
                mtu: default_mtu,
            },
            shared: false,
            overlay_realizing: tokio::sync::Mutex::new(()),
            realized: Mutex::new(Default::default()),
            overlay_realized,
            overlay_events: Mutex::new(Some(overlay_events)),
            block_claims: tokio::sync::Mutex::new(()),
            freed_in: Mutex::new(Default::default()),
            block_claim_retries: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Who this daemon is in the cluster, and whether the store is shared with other hosts
    /// (then every record says which host it belongs to).
    pub fn with_host(mut self, host: HostIdentity, shared: bool) -> Self {
        self.host = host;
        self.shared = shared;
        self
    }

    /// The realization notices for the cluster reconciler (taken once, by the daemon).
    pub fn take_overlay_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        self.overlay_events
            .lock()
            .expect("overlay events lock")
            .take()
    }

    /// The host tag of records this host writes: its id on a shared store, none on its own.
    fn host_tag(&self) -> Option<String> {
        self.shared.then(|| self.host.id.clone())
    }

    /// This host's endpoints. Another host's record that cannot be read is skipped (it may
    /// be a newer version's): this host's work must not stop for it.
    async fn local_endpoints(&self) -> Result<Vec<Endpoint>> {
        let mut eps = Vec::new();
        for kv in self.store.list(keys::ENDPOINTS).await?.items {
            match decode::<Endpoint>(&kv) {
                Ok(ep) if ep.is_on(&self.host.id) => eps.push(ep),
                Ok(_) => {}
                Err(e) if self.shared => {
                    tracing::warn!(key = %kv.key, error = %e, "bad endpoint record; skipped")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(eps)
    }

    /// The networks this host carries: its bridge networks, and overlay networks it has
    /// endpoints on (`with_endpoints`, from [`Agent::local_endpoints`]).
    fn networks_here(&self, networks: Vec<Network>, with_endpoints: &[Endpoint]) -> Vec<Network> {
        networks
            .into_iter()
            .filter(|n| match n.driver {
                Driver::Bridge => n.is_usable_on(&self.host.id),
                Driver::Overlay => with_endpoints.iter().any(|e| e.network == n.name),
            })
            .collect()
    }

    /// Serves DNS on every network (see [`Discovery`]).
    pub fn with_discovery(mut self, discovery: Discovery) -> Self {
        self.discovery = Some(discovery);
        self
    }

    pub fn netns_dir(&self) -> &Path {
        &self.netns_dir
    }

    async fn load<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    async fn load_all<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        self.store
            .list(prefix)
            .await?
            .items
            .iter()
            .map(decode)
            .collect()
    }

    async fn commit(&self, txn: Txn) -> Result<TxnOutcome> {
        Ok(self.store.txn(txn).await?)
    }

    // ---------------------------------------------------------------- networks

    pub async fn networks(&self) -> Result<Vec<Network>> {
        self.load_all(keys::NETWORKS).await
    }

    pub async fn network(&self, name: &str) -> Result<Network> {
        self.load::<Network>(&keys::network(name))
            .await?
            .map(|(n, _)| n)
            .ok_or_else(|| AgentError::NotFound(format!("no network named {name:?}")))
    }

    pub async fn create_network(&self, req: CreateNetwork) -> Result<Network> {
        self.create_network_adopting(req, &[]).await
    }

    /// Creates a network; subnets in `adopting` may be Docker pools this network takes over.
    async fn create_network_adopting(
        &self,
        req: CreateNetwork,
        adopting: &[IpNet],
    ) -> Result<Network> {
        validate_name("network", &req.name)?;
        let driver: Driver = req.driver.as_deref().unwrap_or("bridge").parse()?;
        if let Some(vni) = req.vni {
            if driver != Driver::Overlay {
                return Err(AgentError::Invalid("--vni needs --driver overlay".into()));
            }
            if !(1..=0xff_ffff).contains(&vni) {
                return Err(berth_model::ModelError::InvalidVni(vni).into());
            }
        }
        let v4 = req.subnet.as_deref().map(parse_subnet).transpose()?;
        let v6 = req.ipv6_subnet.as_deref().map(parse_subnet).transpose()?;
        // An overlay network's packets carry VXLAN's 50 bytes on the underlay: without room
        // for them, full-size packets would vanish (no fragmentation with DF set).
        let ipv6_underlay = self.host.address.is_some_and(|a| a.is_ipv6());
        let default_mtu = match driver {
            Driver::Bridge => self.default_mtu,
            Driver::Overlay => self
                .host
                .mtu
                // An IPv6 outer header is 20 bytes longer.
                .saturating_sub(
                    berth_dataplane::VXLAN_OVERHEAD + if ipv6_underlay { 20 } else { 0 },
                ),
        };
        let mtu = validate_network_mtu(req.mtu.unwrap_or(default_mtu), v6.is_some())?;
        if driver == Driver::Overlay && self.host.address.is_none() {
            return Err(AgentError::Invalid(format!(
                "host {} has no underlay address (--advertise-address), so it cannot carry overlay networks",
                self.host.id
            )));
        }
        if let Some(n) = v4.filter(|n| !n.addr().is_ipv4()) {
            return Err(AgentError::Invalid(format!(
                "--subnet {n} is not IPv4; use --ipv6-subnet"
            )));
        }
        if let Some(n) = v6.filter(|n| !n.addr().is_ipv6()) {
            return Err(AgentError::Invalid(format!(
                "--ipv6-subnet {n} is not IPv6"
            )));
        }
        if v4.is_none() && req.gateway.is_some() {
            return Err(AgentError::Invalid("--gateway needs --subnet".into()));
        }
        if v6.is_none() && req.ipv6_gateway.is_some() {
            return Err(AgentError::Invalid(
                "--ipv6-gateway needs --ipv6-subnet".into(),
            ));
        }

        let _topology = self.topology.write().await;
        if self.store.get(&keys::network(&req.name)).await?.is_some() {
            return Err(AgentError::Conflict(format!(
                "network {:?} already exists",
                req.name
            )));
        }
        let existing = self.networks().await?;
        // Pools Docker's IPAM holds without a berth network of their own (another driver
        // uses them, or their network is being created) are taken too.
        let held: Vec<IpNet> = self
            .load_all::<docker::DockerPool>(keys::DOCKER_POOLS)
            .await?
            .into_iter()
            .filter(|p| p.network.is_none() && !adopting.contains(&p.cidr))
            .map(|p| p.cidr)
            .collect();
        let overlap = |cidr: &IpNet| overlapping(&existing, &held, cidr);
        let v4 = match v4 {
            Some(c) => c,
            None => carve_default(&overlap)?,
        };
        let mut subnets = Vec::new();
        for (cidr, gw) in [(Some(v4), &req.gateway), (v6, &req.ipv6_gateway)] {
            let Some(cidr) = cidr else { continue };
            if let Some((other, theirs)) = overlap(&cidr) {
                return Err(AgentError::Conflict(format!(
                    "subnet {cidr} overlaps {theirs} of {other}"
                )));
            }
            let mut pool = Pool::new(cidr);
            let gateway = match gw {
                Some(g) => {
                    let ip: IpAddr = g.parse().map_err(|_| {
                        AgentError::Invalid(format!("invalid gateway address {g:?}"))
                    })?;
                    if !cidr.contains(&ip) {
                        return Err(AgentError::Invalid(format!(
                            "gateway {ip} is outside subnet {cidr}"
                        )));
                    }
                    pool.take(ip).map_err(|e| match e {
                        IpamError::Reserved { .. } => AgentError::Invalid(format!(
                            "gateway {ip} is the network or broadcast address of {cidr}"
                        )),
                        other => other.into(),
                    })?;
                    ip
                }
                None => pool.allocate()?,
            };
            subnets.push((Subnet { cidr, gateway }, pool));
        }

        let id = random_id();
        let net = Network {
            bridge: bridge_name(&id),
            id,
            name: req.name.clone(),
            subnets: subnets.iter().map(|(s, _)| s.clone()).collect(),
            mtu,
            internal: req.internal,
            dns: None,
            docker_networks: vec![],
            driver,
            vni: None,
            // Bridge networks stay on the host that made them.
            host: match driver {
                Driver::Bridge => self.host_tag(),
                Driver::Overlay => None,
            },
            blocks: vec![],
            removing: false,
        };
        let net = match driver {
            Driver::Bridge => net,
            Driver::Overlay => return self.create_overlay(net, req.vni).await,
        };
        let mut txn = Txn::new()
            .when(Compare::Absent(keys::network(&net.name)))
            .put(keys::network(&net.name), encode(&net));
        for s in &net.subnets {
            txn = txn.put(keys::ipam(&net.name, s.gateway), keys::GATEWAY_OWNER);
        }
        let txn = claim_subnets(&net, txn);
        if let TxnOutcome::CompareFailed(c) = self.commit(txn).await? {
            return Err(create_conflict(&net, &c));
        }
        let spec = bridge_spec(&net);
        let made =
            kernel(move || berth_dataplane::ensure_bridge(&mut Netlink::open()?, &spec)).await;
        let made = match made {
            Ok(_) => self.sync_firewall().await,
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            let _ = remove_link(net.bridge.clone()).await;
            self.forget_network(&net).await?;
            return Err(e);
        }
        self.pools.lock().expect("pools lock").insert(
            net.name.clone(),
            subnets.into_iter().map(|(_, p)| p).collect(),
        );
        self.serve_dns(&net);
        tracing::info!(
            "network {} created: bridge {}, {}",
            net.name,
            net.bridge,
            net.subnets
                .iter()
                .map(|s| format!("{} via {}", s.cidr, s.gateway))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(net)
    }

    /// Every address the network's IPAM holds, and who holds it.
    pub async fn allocations(&self, name: &str) -> Result<Vec<Allocation>> {
        self.network(name).await?;
        let prefix = keys::ipam_prefix(name);
        Ok(self
            .store
            .list(&prefix)
            .await?
            .items
            .into_iter()
            .map(|kv| Allocation {
                ip: kv.key[prefix.len()..].to_string(),
                owner: String::from_utf8_lossy(&kv.value).into_owned(),
            })
            .collect())
    }

    pub async fn delete_network(&self, name: &str) -> Result<()> {
        let _topology = self.topology.write().await;
        let net = self.network(name).await?;
        if net.driver == Driver::Overlay {
            return self.delete_overlay(net).await;
        }
        self.check_usable(&net)?;
        // Detached endpoints still hold addresses of this network until their veths are gone;
        // finish that first so nothing of the old network is released into a new one.
        self.reap().await?;
        let members = self
            .store
            .list(&keys::members_prefix(name))
            .await?
            .items
            .len();
        if members > 0 {
            return Err(AgentError::Conflict(format!(
                "network {name:?} is in use by {members} endpoint(s); detach them first"
            )));
        }
        remove_link(net.bridge.clone()).await?;
        self.forget_network(&net).await?;
        self.stop_dns(name);
        self.sync_firewall().await?;
        tracing::info!(network = %name, "network removed");
        Ok(())
    }

    /// Removes an overlay network once no host has endpoints on it. It is first marked
    /// `removing`, which fails every attach that has not committed yet (they compare the
    /// network's revision); endpoints committed before the mark are then all in the listing.
    async fn delete_overlay(&self, net: Network) -> Result<()> {
        let key = keys::network(&net.name);
        let (_, rev) = self
            .load::<Network>(&key)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("no network named {:?}", net.name)))?;
        let marked = Network {
            removing: true,
            ..net.clone()
        };
        let rev = match self
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), rev))
                    .put(key.clone(), encode(&marked)),
            )
            .await?
        {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::CompareFailed(_) => {
                return Err(AgentError::Conflict(format!(
                    "network {:?} changed meanwhile; try again",
                    net.name
                )));
            }
        };
        let users = async {
            self.reap().await?;
            Ok::<_, AgentError>(
                self.load_all::<Endpoint>(keys::ENDPOINTS)
                    .await?
                    .into_iter()
                    .filter(|e| e.network == net.name)
                    .collect::<Vec<_>>(),
            )
        }
        .await;
        let refusal = match users {
            Err(e) => Some(e),
            Ok(users) if users.is_empty() => None,
            Ok(users) => {
                let mut hosts: Vec<&str> = users.iter().filter_map(|e| e.host.as_deref()).collect();
                hosts.sort();
                hosts.dedup();
                Some(AgentError::Conflict(format!(
                    "network {:?} is in use by {} endpoint(s) on host(s) {}; detach them first",
                    net.name,
                    users.len(),
                    hosts.join(", ")
                )))
            }
        };
        if let Some(refusal) = refusal {
            // The mark goes again, whatever failed: left, it would refuse every attach.
            self.commit(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), rev))
                    .put(key, encode(&net)),
            )
            .await?;
            return Err(refusal);
        }
        let mut txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), rev))
            .delete(key)
            .delete_prefix(keys::ipam_prefix(&net.name))
            .delete_prefix(keys::blocks_prefix(&net.name));
        for s in &net.subnets {
            txn = txn.delete(keys::subnet(s.cidr));
        }
        if let Some(vni) = net.vni {
            txn = txn.delete(keys::vni(vni));
        }
        self.commit(txn).await?;
        self.pools.lock().expect("pools lock").remove(&net.name);
        self.realized.lock().expect("realized lock").remove(&net.id);
        // This host's part goes now; other hosts' reconcilers remove theirs from the watch.
        for link in [vxlan_name(&net.id), net.bridge.clone()] {
            remove_link(link).await?;
        }
        self.stop_dns(&net.name);
        self.sync_firewall().await?;
        tracing::info!(network = %net.name, "overlay network removed");
        Ok(())
    }

    /// Removes a network's records (it has no endpoints) and its pool.
    async fn forget_network(&self, net: &Network) -> Result<()> {
        let mut txn = Txn::new().delete(keys::network(&net.name));
        for s in &net.subnets {
            txn = txn.delete(keys::subnet(s.cidr));
        }
        for kv in self.store.list(&keys::ipam_prefix(&net.name)).await?.items {
            txn = txn.delete(kv.key);
        }
        self.commit(txn).await?;
        self.pools.lock().expect("pools lock").remove(&net.name);
        self.docker_reserved
            .lock()
            .expect("reservations lock")
            .retain(|(network, _), _| *network != net.name);
        let pending: Vec<_> = self
            .docker_pending
            .lock()
            .expect("pending endpoints lock")
            .extract_if(|_, p| p.is_on(&net.name))
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            p.discard_veth();
        }
        Ok(())
    }

    // ---------------------------------------------------------------- sandboxes

    pub async fn sandboxes(&self) -> Result<Vec<Sandbox>> {
        self.load_all(keys::SANDBOXES).await
    }

    pub async fn sandbox(&self, name: &str) -> Result<Sandbox> {
        self.load::<Sandbox>(&keys::sandbox(name))
            .await?
            .map(|(s, _)| s)
            .ok_or_else(|| AgentError::NotFound(format!("no sandbox named {name:?}")))
    }

    pub async fn create_sandbox(&self, name: &str) -> Result<Sandbox> {
        validate_sandbox_name(name)?;
        let path = self.netns_dir.join(name);
        let sb = Sandbox {
            name: name.to_string(),
            path: path.display().to_string(),
            removing: false,
        };
        let txn = Txn::new()
            .when(Compare::Absent(keys::sandbox(name)))
            .put(keys::sandbox(name), encode(&sb));
        if let TxnOutcome::CompareFailed(_) = self.commit(txn).await? {
            return Err(AgentError::Conflict(format!(
                "sandbox {name:?} already exists"
            )));
        }
        if let Err(e) = kernel(move || netns::create(&path)).await {
            self.commit(Txn::new().delete(keys::sandbox(name))).await?;
            if already_exists(&e) {
                return Err(AgentError::Conflict(format!(
                    "{} already exists and is not a berth sandbox",
                    sb.path
                )));
            }
            return Err(e);
        }
        tracing::info!(sandbox = %name, path = %sb.path, "sandbox created");
        Ok(sb)
    }

    /// Detaches the sandbox from every network, then removes its namespace.
    pub async fn delete_sandbox(&self, name: &str) -> Result<()> {
        let _topology = self.topology.read().await;
        let sb = self.mark_removing(name).await?;
        self.finish_sandbox_removal(&sb).await
    }

    /// The removal of a sandbox marked `removing`: its endpoints, its resolv.conf, its
    /// namespace, then its record. Also what reconcile does for a removal a stop cut short.
    async fn finish_sandbox_removal(&self, sb: &Sandbox) -> Result<()> {
        if let Some(id) = netns::id_at(Path::new(&sb.path)) {
            for ep in self.endpoints_in(&id).await? {
                self.remove_endpoint(&ep).await?;
            }
        }
        self.remove_sandbox_resolv_conf(&sb.name);
        let path = PathBuf::from(&sb.path);
        kernel(move || netns::remove(&path)).await?;
        self.commit(Txn::new().delete(keys::sandbox(&sb.name)))
            .await?;
        tracing::info!(sandbox = %sb.name, "sandbox removed");
        Ok(())
    }

    /// Marks a sandbox as being removed. An attach checks the sandbox's record in its commit,
    /// so once this commits, every attach either committed before (and its endpoint is found
    /// and removed) or fails.
    async fn mark_removing(&self, name: &str) -> Result<Sandbox> {
        loop {
            let (mut sb, rev) = self
                .load::<Sandbox>(&keys::sandbox(name))
                .await?
                .ok_or_else(|| AgentError::NotFound(format!("no sandbox named {name:?}")))?;
            if sb.removing {
                return Ok(sb);
            }
            sb.removing = true;
            let txn = Txn::new()
                .when(Compare::ModRevision(keys::sandbox(name), rev))
                .put(keys::sandbox(name), encode(&sb));
            if let TxnOutcome::Committed { .. } = self.commit(txn).await? {
                return Ok(sb);
            }
        }
    }

    // ---------------------------------------------------------------- endpoints

    pub async fn endpoints(&self, network: Option<&str>) -> Result<Vec<Endpoint>> {
        let mut all: Vec<Endpoint> = self.load_all(keys::ENDPOINTS).await?;
        if let Some(n) = network {
            all.retain(|e| e.network == n);
        }
        let holders = self.default_route_holders(keys::DEFAULT_ROUTES).await?;
        let networks: HashMap<String, Network> = self
            .networks()
            .await?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        for ep in &mut all {
            if let Some(net) = networks.get(&ep.network) {
                ep.default_gateways = default_gateways(ep, net, &holders);
            }
        }
        Ok(all)
    }

    pub async fn endpoint(&self, id: &str) -> Result<Endpoint> {
        let mut ep = self
            .load::<Endpoint>(&keys::endpoint(id))
            .await?
            .map(|(e, _)| e)
            .ok_or_else(|| AgentError::NotFound(format!("no endpoint {id:?}")))?;
        if let Ok(net) = self.network(&ep.network).await {
            let holders = self
                .default_route_holders(&keys::default_routes_prefix(&ep.netns.id))
                .await?;
            ep.default_gateways = default_gateways(&ep, &net, &holders);
        }
        Ok(ep)
    }

    /// The default-route records under `prefix`: key → the endpoint holding it.
    async fn default_route_holders(&self, prefix: &str) -> Result<HashMap<String, String>> {
        Ok(self
            .store
            .list(prefix)
            .await?
            .items
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect())
    }

    async fn endpoints_in(&self, netns_id: &str) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        for kv in self
            .store
            .list(&keys::attachments_prefix(netns_id))
            .await?
            .items
        {
            let id = String::from_utf8_lossy(&kv.value).to_string();
            if let Some((ep, _)) = self.load::<Endpoint>(&keys::endpoint(&id)).await? {
                out.push(ep);
            }
        }
        Ok(out)
    }

    /// A sandbox name or a namespace path, opened.
    /// The namespace a path or a sandbox name refers to; for a sandbox, also its record and
    /// the record's revision (an attach commits against it).
    async fn resolve_netns(
        &self,
        sandbox: &str,
    ) -> Result<(File, NetnsRef, Option<(Sandbox, u64)>)> {
        // A name, or a path to a berth sandbox's namespace, is that sandbox.
        let named = !sandbox.contains('/');
        let candidate = match Path::new(sandbox) {
            _ if named => Some(sandbox),
            p if p.parent() == Some(self.netns_dir.as_path()) => {
                p.file_name().and_then(|n| n.to_str())
            }
            _ => None,
        };
        let record = match candidate {
            Some(n) => self
                .load::<Sandbox>(&keys::sandbox(n))
                .await?
                .filter(|(sb, _)| named || sb.path == sandbox),
            None => None,
        };
        if named && record.is_none() {
            return Err(AgentError::NotFound(format!(
                "no sandbox named {sandbox:?}"
            )));
        }
        let (path, name) = match &record {
            Some((sb, _)) => (sb.path.clone(), Some(sb.name.clone())),
            None => (sandbox.to_string(), None),
        };
        let file = match netns::open(Path::new(&path)) {
            Ok(f) => f,
            Err(e) => {
                if let Some(name) = &name {
                    // Its removal may have got as far as the namespace since the record was
                    // read.
                    match self.load::<Sandbox>(&keys::sandbox(name)).await? {
                        None => {
                            return Err(AgentError::NotFound(format!("no sandbox named {name:?}")));
                        }
                        Some((sb, _)) if sb.removing => return Err(removing(name)),
                        Some(_) => {}
                    }
                }
                return Err(match e {
                    berth_dataplane::DataplaneError::NotNetns { .. } => e.into(),
                    e => AgentError::Invalid(format!(
                        "{path} is not a usable network namespace: {e}"
                    )),
                });
            }
        };
        let id = netns::id_of(&file)?;
        Ok((
            file,
            NetnsRef {
                path,
                id,
                sandbox: name,
            },
            record,
        ))
    }

    pub async fn attach(&self, req: Attach) -> Result<Endpoint> {
        match self.attach_once(&req).await? {
            Ok(ep) => Ok(ep),
            Err(dead) => {
                // The namespace's interface name, membership or container interface is held
                // by an endpoint whose veth is gone: its namespace died without a detach (a
                // runtime that never calls DEL) and the kernel gave the new namespace the dead
                // one's identity. It is released, and the attach goes ahead.
                {
                    // Under the write lock no attach is half done: an endpoint whose veth is
                    // missing now is dead, not one still being made.
                    let _topology = self.topology.write().await;
                    if let Some((dead, _)) =
                        self.load::<Endpoint>(&keys::endpoint(&dead.id)).await?
                        && !self.endpoint_alive(&dead).await?
                    {
                        tracing::warn!(
                            endpoint = %dead.id, network = %dead.network, netns = %dead.netns.path,
                            "endpoint's veth is gone (its namespace died without a detach); released"
                        );
                        self.remove_endpoint(&dead).await?;
                    }
                }
                match self.attach_once(&req).await? {
                    Ok(ep) => Ok(ep),
                    Err(again) => Err(AgentError::Conflict(format!(
                        "{} is held by endpoint {} being released; try again",
                        req.sandbox, again.id
                    ))),
                }
            }
        }
    }

    /// One attempt at an attach; `Ok(Err(endpoint))` when a dead endpoint holds what the
    /// attach needs.
    async fn attach_once(&self, req: &Attach) -> Result<Result<Endpoint, Endpoint>> {
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
        validate_ifname(&ifname)?;
        for n in req.name.iter().chain(&req.aliases) {
            validate_name("endpoint", n)?;
        }
        if let Some(cid) = &req.container_id {
            validate_name("container id", cid).map_err(|_| {
                AgentError::Invalid(format!(
                    "invalid container id {cid:?}: letters, digits, '_', '.' and '-', starting with a letter or digit"
                ))
            })?;
        }
        let requested_mac = req.mac.as_deref().map(str::parse::<MacAddr>).transpose()?;
        let requested: Vec<IpAddr> = req
            .ips
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|_| AgentError::Invalid(format!("invalid IP address {s:?}")))
            })
            .collect::<Result<_>>()?;

        let _topology = self.topology.read().await;
        // Both at once: on etcd each read is a round trip.
        let net_key = keys::network(&req.network);
        let (net, resolved) = tokio::join!(
            self.load::<Network>(&net_key),
            self.resolve_netns(&req.sandbox)
        );
        let (net, net_rev) = net?
            .ok_or_else(|| AgentError::NotFound(format!("no network named {:?}", req.network)))?;
        self.check_usable(&net)?;
        let (ns, netns_ref, sandbox) = resolved?;
        if let Some((sb, _)) = &sandbox
            && sb.removing
        {
            return Err(removing(&sb.name));
        }
        if let Some(holder) = self
            .endpoint_holding(&keys::member(&net.name, &netns_ref.id))
            .await?
        {
            if !holder.runtime_configured && !self.endpoint_alive(&holder).await? {
                return Ok(Err(holder));
            }
            return Err(AgentError::Conflict(format!(
                "{} is already attached to network {:?} (endpoint {})",
                req.sandbox, net.name, holder.id
            )));
        }
        if (!requested.is_empty() || !req.ports.is_empty())
            && !self.store.list(keys::RELEASING).await?.items.is_empty()
        {
            // A requested address or host port may still be held by an endpoint detached a
            // moment ago (a container restarted with its static address): release those first.
            self.reap().await?;
        }

        let ports = self.check_ports(&net, &req.ports)?;
        let publishing_guard = self.reserve_ports(&ports).await?;

        let ips = self.allocate(&net, &requested).await?;
        let mac = requested_mac.unwrap_or_else(|| {
            match ips.iter().find_map(|ip| match ip {
                IpNet::V4(v4) => Some(v4.addr()),
                IpNet::V6(_) => None,
            }) {
                Some(v4) => MacAddr::from_ipv4(v4),
                None => MacAddr::random_local(|| fastrand::u8(..)),
            }
        });
        let id = random_id();
        let mut ep = Endpoint {
            host_ifname: veth_name(&id),
            id,
            network: net.name.clone(),
            name: req.name.clone().or_else(|| netns_ref.sandbox.clone()),
            aliases: req.aliases.clone(),
            container_id: req.container_id.clone(),
            runtime_configured: false,
            netns: netns_ref,
            ifname,
            mac,
            ips,
            ports,
            default_gateways: vec![],
            host: self.host_tag(),
        };
        let mut attempts = 0;
        let outcome = loop {
            let claims = match self.default_route_claims(&ep, req.default_route).await {
                Ok(c) => c,
                Err(e) => {
                    self.release(&ep);
                    return Err(e);
                }
            };
            let mut txn = Txn::new().when(Compare::ModRevision(keys::network(&net.name), net_rev));
            for c in self.block_compares(&net, &ep.ips) {
                txn = txn.when(c);
            }
            if let Some((sb, rev)) = &sandbox {
                txn = txn.when(Compare::ModRevision(keys::sandbox(&sb.name), *rev));
            }
            let mut txn = self.endpoint_records(&ep, txn, true, Held::PortsAndAddresses);
            for (key, rev) in &claims {
                txn = match rev {
                    None => txn.when(Compare::Absent(key.clone())),
                    Some(rev) => txn.when(Compare::ModRevision(key.clone(), *rev)),
                }
                .put(key.clone(), ep.id.clone());
            }
            ep.default_gateways = claims
                .iter()
                .filter_map(|(key, _)| gateway_of(&net, keys::default_route_is_ipv4(key)))
                .collect();
            let outcome = match self.commit(txn).await {
                Ok(o) => o,
                Err(e) => {
                    self.release(&ep);
                    return Err(e);
                }
            };
            match outcome {
                // Another attach to this namespace took a default route meanwhile: decide again.
                TxnOutcome::CompareFailed(Compare::Absent(k) | Compare::ModRevision(k, _))
                    if k.starts_with(keys::DEFAULT_ROUTES) && attempts < 3 =>
                {
                    attempts += 1;
                }
                other => break other,
            }
        };
        if let TxnOutcome::CompareFailed(c) = outcome {
            self.release(&ep);
            if let Some(dead) = self.dead_holder(&c).await? {
                return Ok(Err(dead));
            }
            return Err(self.explain_attach_conflict(&c, &ep, req));
        }
        drop(publishing_guard);
        if let Err(e) = self.publish(&ep).await {
            self.undo_attach_records(&ep).await?;
            self.release(&ep);
            return Err(e);
        }

        let (spec_ep, spec_net) = (ep.clone(), net.clone());
        let realized = match net.driver {
            Driver::Bridge => Ok(()),
            Driver::Overlay => self.ensure_overlay(&net).await.map(|_| ()),
        };
        let made = match realized {
            Err(e) => Err(e),
            Ok(()) => {
                kernel(move || {
                    let mut host = Netlink::open()?;
                    let mut spec = endpoint_on_bridge(&mut host, &spec_ep, &spec_net)?;
                    spec.gateways = spec_ep.default_gateways.clone();
                    berth_dataplane::attach_endpoint(&mut host, &ns, &spec)
                })
                .await
            }
        };
        if let Err(e) = made {
            if self.store.get(&keys::endpoint(&ep.id)).await?.is_none() {
                // A detach or sandbox removal took the interface away mid-way (and the record
                // with its addresses, which the reaper releases): that, not the kernel, is
                // what failed.
                remove_link(ep.host_ifname.clone()).await?;
                return Err(AgentError::Conflict(format!(
                    "{} was detached from {:?} while being attached",
                    req.sandbox, ep.network
                )));
            }
            self.undo_attach_records(&ep).await?;
            self.unpublish(firewall::forwards_of(&ep)).await;
            self.release(&ep);
            if already_exists(&e) {
                return Err(AgentError::Conflict(format!(
                    "{} already has an interface named {}",
                    req.sandbox, ep.ifname
                )));
            }
            return Err(e);
        }
        // Named before the check below, so that a detach racing from here on finds the name
        // to remove, and one that ran before is seen by the check (one store read for both).
        self.name_endpoint_of(&net, &ep);
        // A detach or sandbox removal that ran between the commit and now found no interface
        // to remove (and may have released the addresses): what this attach made goes too.
        if self.store.get(&keys::endpoint(&ep.id)).await?.is_none() {
            self.unname_endpoint(&ep);
            remove_link(ep.host_ifname.clone()).await?;
            if !ep.ports.is_empty() {
                // From the store, not by deleting this endpoint's forwards: its host ports may
                // be another endpoint's by now.
                self.sync_firewall().await?;
            }
            return Err(AgentError::Conflict(format!(
                "{} was detached from {:?} while being attached",
                req.sandbox, ep.network
            )));
        }
        if let Some(sandbox) = &ep.netns.sandbox {
            self.write_sandbox_resolv_conf(sandbox, &ep.netns.id).await;
        }
        tracing::info!(
            "attached {} to {}: endpoint {}, {}{}",
            req.sandbox,
            ep.network,
            ep.id,
            ep.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if ep.default_gateways.is_empty() {
                ""
            } else {
                ", default route"
            }
        );
        Ok(Ok(ep))
    }

    /// Undoes the records of an attach that failed after its commit, with the default routes
    /// it took: they pass on as at a detach, so the namespace is never left without a holder.
    async fn undo_attach_records(&self, ep: &Endpoint) -> Result<()> {
        let handover = self.default_route_handover(ep).await?;
        let txn =
            handover.apply(self.endpoint_records(ep, Txn::new(), false, Held::PortsAndAddresses));
        if let TxnOutcome::CompareFailed(_) = self.commit(txn).await? {
            // The namespace's default routes moved meanwhile; they are no longer this
            // endpoint's to hand on.
            self.commit(self.endpoint_records(ep, Txn::new(), false, Held::PortsAndAddresses))
                .await?;
            return Ok(());
        }
        handover.install().await;
        Ok(())
    }

    /// The default-route records this endpoint takes in its commit, with the revision each
    /// must still have (`None`: must be absent): for each family it has an address in, the
    /// namespace's record if there is none yet, if its holder is gone, or if `take` says so.
    async fn default_route_claims(
        &self,
        ep: &Endpoint,
        take: bool,
    ) -> Result<Vec<(String, Option<u64>)>> {
        let mut claims = Vec::new();
        for ipv4 in [true, false] {
            if !ep.ips.iter().any(|ip| ip.addr().is_ipv4() == ipv4) {
                continue;
            }
            let key = keys::default_route(&ep.netns.id, ipv4);
            match self.store.get(&key).await? {
                None => claims.push((key, None)),
                Some(kv) => {
                    let holder = String::from_utf8_lossy(&kv.value).to_string();
                    if take || self.store.get(&keys::endpoint(&holder)).await?.is_none() {
                        claims.push((key, Some(kv.mod_revision)));
                    }
                }
            }
        }
        Ok(claims)
    }

    /// The endpoint a failed compare of an attach ran into, if that endpoint is dead: the key
    /// is one of a namespace's unique records (interface name, membership, container
    /// interface) and the endpoint holding it has lost its veth.
    async fn dead_holder(&self, c: &Compare) -> Result<Option<Endpoint>> {
        let Compare::Absent(key) = c else {
            return Ok(None);
        };
        let unique_per_netns = [keys::ATTACHMENTS, keys::MEMBERS, keys::CONTAINERS];
        if !unique_per_netns.iter().any(|p| key.starts_with(p)) {
            return Ok(None);
        }
        let Some(ep) = self.endpoint_holding(key).await? else {
            return Ok(None);
        };
        if ep.runtime_configured || self.endpoint_alive(&ep).await? {
            return Ok(None);
        }
        Ok(Some(ep))
    }

    /// The endpoint an index record (its value an endpoint id) points at, if both exist.
    async fn endpoint_holding(&self, key: &str) -> Result<Option<Endpoint>> {
        let Some(kv) = self.store.get(key).await? else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&kv.value);
        Ok(self
            .load::<Endpoint>(&keys::endpoint(&id))
            .await?
            .map(|(ep, _)| ep))
    }

    /// The store records of one endpoint and its unique indexes (interface name per
    /// namespace, membership per network, CNI container interface), and what it holds as
    /// `held` says. Created with absence checks so each is unique, or deleted.
    fn endpoint_records(&self, ep: &Endpoint, mut txn: Txn, create: bool, held: Held) -> Txn {
        let id = || ep.id.clone().into_bytes();
        let mut keyed = vec![
            (keys::endpoint(&ep.id), encode(ep)),
            (keys::attachment(&ep.netns.id, &ep.ifname), id()),
            (keys::member(&ep.network, &ep.netns.id), id()),
        ];
        if let Some(cid) = &ep.container_id {
            keyed.push((keys::container(&ep.network, cid, &ep.ifname), id()));
        }
        if held != Held::Neither {
            keyed.extend(ep.ports.iter().map(|m| (keys::port(m), id())));
        }
        if held == Held::PortsAndAddresses {
            keyed.extend(
                ep.ips
                    .iter()
                    .map(|ip| (keys::ipam(&ep.network, ip.addr()), id())),
            );
        }
        for (k, v) in keyed {
            txn = if create {
                txn.when(Compare::Absent(k.clone())).put(k, v)
            } else {
                txn.delete(k)
            };
        }
        txn
    }

    /// Refuses a network this host cannot attach to: another host's bridge network, or a
    /// network being removed.
    fn check_usable(&self, net: &Network) -> Result<()> {
        if net.removing {
            return Err(AgentError::NotFound(format!(
                "network {:?} is being removed",
                net.name
            )));
        }
        if !net.is_usable_on(&self.host.id) {
            return Err(AgentError::Conflict(format!(
                "network {:?} is a bridge network of host {}; only an overlay network spans hosts",
                net.name,
                net.host.as_deref().unwrap_or("?")
            )));
        }
        Ok(())
    }

    fn explain_attach_conflict(&self, c: &Compare, ep: &Endpoint, req: &Attach) -> AgentError {
        let key = match c {
            Compare::Absent(k) | Compare::ModRevision(k, _) | Compare::Value(k, _) => k.as_str(),
        };
        if key.starts_with(keys::BLOCKS) {
            // Freed while this host was thought gone: it is not ours to allocate from.
            self.forget_block(key);
            AgentError::Conflict(format!(
                "the address block of network {:?} was given up meanwhile; try again",
                ep.network
            ))
        } else if key.starts_with(keys::NETWORKS) {
            AgentError::NotFound(format!("network {:?} was removed meanwhile", ep.network))
        } else if key.starts_with(keys::SANDBOXES) {
            removing(&req.sandbox)
        } else if key.starts_with(keys::ATTACHMENTS) {
            AgentError::Conflict(format!(
                "{} already has an interface named {}",
                req.sandbox, ep.ifname
            ))
        } else if key.starts_with(keys::CONTAINERS) {
            AgentError::Conflict(format!(
                "container {} already has interface {} on network {:?}",
                ep.container_id.as_deref().unwrap_or("?"),
                ep.ifname,
                ep.network
            ))
        } else if key.starts_with(keys::PORTS) {
            AgentError::Conflict(format!(
                "a host port of {} was published by another endpoint meanwhile",
                req.sandbox
            ))
        } else if key.starts_with(keys::DEFAULT_ROUTES) {
            AgentError::Conflict(format!(
                "the default route of {} kept changing meanwhile; try again",
                req.sandbox
            ))
        } else if key.starts_with(keys::MEMBERS) {
            AgentError::Conflict(format!(
                "{} is already attached to network {:?}",
                req.sandbox, ep.network
            ))
        } else {
            let ip = key.rsplit('/').next().unwrap_or(key);
            AgentError::Conflict(format!(
                "address {ip} is already in use on network {:?}",
                ep.network
            ))
        }
    }

    /// Picks the endpoint's addresses: the requested ones, and the next free one for every
    /// subnet without a request. On failure nothing stays taken.
    async fn allocate(&self, net: &Network, requested: &[IpAddr]) -> Result<Vec<IpNet>> {
        for ip in requested {
            net.check_endpoint_ip(*ip)?;
            if net.subnet_for(*ip).is_none() {
                let subnets: Vec<_> = net.subnets.iter().map(|s| s.cidr.to_string()).collect();
                return Err(AgentError::Invalid(format!(
                    "address {ip} is outside network {:?} ({})",
                    net.name,
                    subnets.join(", ")
                )));
            }
        }
        let mut got: Vec<IpNet> = Vec::new();
        for subnet in &net.subnets {
            let mine: Vec<IpAddr> = requested
                .iter()
                .copied()
                .filter(|ip| subnet.cidr.contains(ip))
                .collect();
            let taken = match mine.as_slice() {
                [] => self.take_in_subnet(&net.name, subnet.cidr, None).await,
                [ip] => self.take_in_subnet(&net.name, subnet.cidr, Some(*ip)).await,
                _ => Err(AgentError::Invalid(format!(
                    "more than one address requested in {}",
                    subnet.cidr
                ))),
            };
            match taken {
                Ok(ip) => got.push(IpNet::new(ip, subnet.cidr.prefix_len()).expect("valid prefix")),
                Err(e) => {
                    for ip in &got {
                        self.release_ip(&net.name, ip.addr());
                    }
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    fn release(&self, ep: &Endpoint) {
        for ip in &ep.ips {
            self.release_ip(&ep.network, ip.addr());
        }
    }

    pub async fn detach(&self, req: &berth_api::Detach) -> Result<()> {
        let _topology = self.topology.read().await;
        let network = req.network.as_str();
        self.network(network).await?;
        let (key, who) = match (&req.sandbox, &req.container_id, &req.ifname) {
            (Some(sandbox), None, None) => {
                let (_, netns_ref, _) = self.resolve_netns(sandbox).await?;
                (keys::member(network, &netns_ref.id), sandbox.clone())
            }
            (None, Some(cid), Some(ifname)) => (
                keys::container(network, cid, ifname),
                format!("container {cid} interface {ifname}"),
            ),
            _ => {
                return Err(AgentError::Invalid(
                    "detach takes either sandbox, or container_id and ifname".into(),
                ));
            }
        };
        let not_attached =
            || AgentError::NotFound(format!("{who} is not attached to network {network:?}"));
        let kv = self.store.get(&key).await?.ok_or_else(not_attached)?;
        let id = String::from_utf8_lossy(&kv.value).to_string();
        let ep = self.endpoint(&id).await.map_err(|_| not_attached())?;
        self.remove_endpoint(&ep).await
    }

    /// The endpoint of a CNI container interface, if there is one.
    pub async fn container_endpoint(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Endpoint> {
        let missing = || {
            AgentError::NotFound(format!(
                "container {container_id} has no interface {ifname} on network {network:?}"
            ))
        };
        let kv = self
            .store
            .get(&keys::container(network, container_id, ifname))
            .await?
            .ok_or_else(missing)?;
        self.endpoint(&String::from_utf8_lossy(&kv.value))
            .await
            .map_err(|_| missing())
    }

    /// Compares an endpoint's kernel state with its record: the veth on the bridge and up,
    /// and inside the namespace the interface with its MAC, addresses and default routes.
    pub async fn check(&self, id: &str) -> Result<berth_api::CheckReport> {
        let ep = self.endpoint(id).await?;
        if !ep.is_on(&self.host.id) {
            return Err(AgentError::Conflict(format!(
                "endpoint {id} is on host {}; check it there",
                ep.host.as_deref().unwrap_or("?")
            )));
        }
        let net = self.network(&ep.network).await?;
        let bridge = net.bridge.clone();
        let expect = ep.clone();
        let gateways = ep.default_gateways.clone();
        let problems = kernel(move || {
            let mut problems = Vec::new();
            let mut host = Netlink::open()?;
            let bridge_index = host.link_by_name(&bridge)?.map(|l| l.index);
            match host.link_by_name(&expect.host_ifname)? {
                None => problems.push(format!("host interface {} is missing", expect.host_ifname)),
                Some(l) => {
                    if bridge_index.is_none() || l.controller != bridge_index {
                        problems.push(format!("{} is not on bridge {bridge}", expect.host_ifname));
                    }
                    if !l.up {
                        problems.push(format!("{} is down", expect.host_ifname));
                    }
                }
            }
            if expect.runtime_configured {
                // The runtime owns the sandbox side (name, addresses, routes).
                problems.extend(docker::docker_endpoint_problem(&mut host, &expect)?);
                return Ok(problems);
            }
            let ns = match netns::open(Path::new(&expect.netns.path)) {
                Ok(f) if netns::id_of(&f).ok().as_deref() == Some(expect.netns.id.as_str()) => f,
                _ => {
                    problems.push(format!("network namespace {} is gone", expect.netns.path));
                    return Ok(problems);
                }
            };
            let st = berth_dataplane::sandbox_state(&mut Netlink::open_in(&ns)?, &expect.ifname)?;
            let Some(link) = st.link else {
                problems.push(format!("{} is missing in the namespace", expect.ifname));
                return Ok(problems);
            };
            if !link.up {
                problems.push(format!("{} is down in the namespace", expect.ifname));
            }
            if link.mac != Some(expect.mac.0) {
                problems.push(format!("{} has not MAC {}", expect.ifname, expect.mac));
            }
            for ip in &expect.ips {
                if !st.addresses.contains(ip) {
                    problems.push(format!("address {ip} is missing on {}", expect.ifname));
                }
            }
            for gw in &gateways {
                if !st.gateways.contains(gw) {
                    problems.push(format!("default route via {gw} is missing"));
                }
            }
            Ok(problems)
        })
        .await?;
        Ok(berth_api::CheckReport { problems })
    }

    /// CNI garbage collection: removes every CNI endpoint of a network whose (container id,
    /// interface) the runtime no longer knows. Endpoints made otherwise (sandboxes, Docker)
    /// are not the runtime's to collect and are left alone.
    pub async fn gc(&self, req: &berth_api::Gc) -> Result<berth_api::GcReport> {
        self.network(&req.network).await?;
        let valid: std::collections::HashSet<(&str, &str)> = req
            .valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let mut removed = Vec::new();
        let _topology = self.topology.read().await;
        for kv in self
            .store
            .list(&keys::containers_prefix(&req.network))
            .await?
            .items
        {
            let id = String::from_utf8_lossy(&kv.value).to_string();
            let Ok(ep) = self.endpoint(&id).await else {
                continue;
            };
            let known = ep
                .container_id
                .as_deref()
                .is_some_and(|cid| valid.contains(&(cid, ep.ifname.as_str())));
            if !known {
                self.remove_endpoint(&ep).await?;
                removed.push(ep.id);
            }
        }
        Ok(berth_api::GcReport { removed })
    }

    pub async fn delete_endpoint(&self, id: &str) -> Result<()> {
        let _topology = self.topology.read().await;
        let ep = self.endpoint(id).await?;
        if !ep.is_on(&self.host.id) {
            return Err(AgentError::Conflict(format!(
                "endpoint {id} is on host {}; remove it there",
                ep.host.as_deref().unwrap_or("?")
            )));
        }
        self.remove_endpoint(&ep).await
    }

    /// Detaching is two steps. Now: the host end goes down, the sandbox end goes down and is
    /// renamed out of the way (the sandbox is off the network and may reuse the interface
    /// name), and the endpoint moves to `releasing/`. Later, the reaper deletes the veths of
    /// all detached endpoints in one kernel operation and only then releases their addresses,
    /// so an address is never reused while an interface still holds it.
    async fn remove_endpoint(&self, ep: &Endpoint) -> Result<()> {
        // The store first, against the record as it is now: a second removal of the same
        // endpoint (a retried DEL, detach racing sandbox rm) finds it gone and does nothing,
        // rather than retiring whatever now holds the interface name.
        let mut attempts = 0;
        let (current, handover) = loop {
            let Some((current, rev)) = self.load::<Endpoint>(&keys::endpoint(&ep.id)).await? else {
                return Ok(());
            };
            let handover = self.default_route_handover(&current).await?;
            let txn = handover.apply(
                self.endpoint_records(&current, Txn::new(), false, Held::Neither)
                    .when(Compare::ModRevision(keys::endpoint(&ep.id), rev))
                    .put(keys::releasing(&ep.id), encode(&current)),
            );
            match self.commit(txn).await? {
                TxnOutcome::Committed { .. } => break (current, handover),
                // The endpoint changed or went, or its namespace's default routes moved
                // meanwhile: look again (gone is done).
                TxnOutcome::CompareFailed(_) if attempts < 5 => attempts += 1,
                TxnOutcome::CompareFailed(c) => {
                    return Err(AgentError::Conflict(format!(
                        "endpoint {} kept changing while being detached ({c:?}); try again",
                        ep.id
                    )));
                }
            }
        };
        self.unname_endpoint(&current);
        if let Some(sandbox) = &current.netns.sandbox {
            self.write_sandbox_resolv_conf(sandbox, &current.netns.id)
                .await;
        }
        let (host_ifname, ifname, tomb, mac) = (
            current.host_ifname.clone(),
            current.ifname.clone(),
            tombstone_name(&current.id),
            current.mac.0,
        );
        let (path, nsid) = (current.netns.path.clone(), current.netns.id.clone());
        let retired = kernel(move || {
            // Only the namespace we attached: the path may now name another one.
            let ns = netns::open(Path::new(&path))
                .ok()
                .filter(|f| netns::id_of(f).ok().as_deref() == Some(nsid.as_str()));
            berth_dataplane::retire_endpoint(
                &mut Netlink::open()?,
                &host_ifname,
                ns.as_ref().map(|f| (f, ifname.as_str(), mac)),
                &tomb,
            )
        })
        .await;
        // Whatever happened in the kernel, the detach is recorded and the reaper deletes the
        // veth (on its own if retiring failed) before releasing the addresses.
        self.reaper.notify_one();
        if let Err(e) = retired {
            tracing::warn!(endpoint = %ep.id, error = %e, "retiring the veth failed; the reaper deletes it");
        }
        handover.install().await;
        tracing::info!(
            "detached {} from {}: endpoint {}",
            current
                .netns
                .sandbox
                .as_deref()
                .unwrap_or(&current.netns.path),
            current.network,
            current.id
        );
        Ok(())
    }

    /// What happens to the default routes `ep` holds when it goes: each passes to the
    /// endpoint attached earliest among the namespace's others with an address of that
    /// family.
    async fn default_route_handover(&self, ep: &Endpoint) -> Result<Handover> {
        let mut handover = Handover::default();
        let mut others: Option<(Vec<Endpoint>, HashMap<String, Network>)> = None;
        for ipv4 in [true, false] {
            let key = keys::default_route(&ep.netns.id, ipv4);
            let Some(kv) = self.store.get(&key).await? else {
                continue;
            };
            if kv.value != ep.id.as_bytes() {
                continue;
            }
            if others.is_none() {
                let mut eps = self.endpoints_in(&ep.netns.id).await?;
                eps.retain(|e| e.id != ep.id);
                let eps = self.in_attach_order(eps).await?;
                let mut networks = HashMap::new();
                for e in &eps {
                    if !networks.contains_key(&e.network)
                        && let Ok(net) = self.network(&e.network).await
                    {
                        networks.insert(e.network.clone(), net);
                    }
                }
                others = Some((eps, networks));
            }
            let (eps, networks) = others.as_ref().expect("filled above");
            match next_holder(eps, ipv4, |name| networks.get(name)) {
                Some((next, gateway)) => {
                    handover
                        .records
                        .push((key, kv.mod_revision, Some(next.id.clone())));
                    handover.routes.push((next.clone(), gateway));
                }
                None => handover.records.push((key, kv.mod_revision, None)),
            }
        }
        Ok(handover)
    }

    /// `eps`, endpoints of one namespace, in attach order: the revision of their membership
    /// records, which are written once, at attach. Endpoints a runtime configures (Docker)
    /// take no part in default routes and are left out.
    async fn in_attach_order(&self, eps: Vec<Endpoint>) -> Result<Vec<Endpoint>> {
        let mut ordered = Vec::with_capacity(eps.len());
        for ep in eps.into_iter().filter(|e| !e.runtime_configured) {
            let member = keys::member(&ep.network, &ep.netns.id);
            if let Some(m) = self.store.get(&member).await? {
                ordered.push((m.mod_revision, ep));
            }
        }
        ordered.sort_by_key(|(rev, _)| *rev);
        Ok(ordered.into_iter().map(|(_, ep)| ep).collect())
    }

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

    /// Frees one address in a network's in-memory pools.
    fn release_ip(&self, network: &str, ip: IpAddr) {
        if let Some(pools) = self.pools.lock().expect("pools lock").get_mut(network) {
            pools.iter_mut().for_each(|p| p.release(ip));
        }
    }

    pub async fn status(&self) -> Result<Status> {
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            store: self.store.describe(),
            netns_dir: self.netns_dir.display().to_string(),
            networks: self.store.list(keys::NETWORKS).await?.items.len(),
            endpoints: self.local_endpoints().await?.len(),
            sandboxes: self.store.list(keys::SANDBOXES).await?.items.len(),
            host: self.host.id.clone(),
            address: self.host.address,
            block_claim_retries: self
                .block_claim_retries
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// The store line of the start-up log.
    pub fn status_store(&self) -> String {
        self.store.describe()
    }
}

/// What becomes of the default routes an endpoint holds when it goes (see
/// [`Agent::default_route_handover`]).
#[derive(Default)]
struct Handover {
    /// Default-route records to change: key, the revision it was read at, the next holder
    /// (none: the namespace has no other endpoint of that family).
    records: Vec<(String, u64, Option<String>)>,
    /// Default routes to install: the next holder and its gateway.
    routes: Vec<(Endpoint, IpAddr)>,
}

impl Handover {
    /// `txn` with the record changes, each against the revision it was read at.
    fn apply(&self, mut txn: Txn) -> Txn {
        for (key, rev, next) in &self.records {
            txn = txn.when(Compare::ModRevision(key.clone(), *rev));
            txn = match next {
                Some(id) => txn.put(key.clone(), id.clone()),
                None => txn.delete(key.clone()),
            };
        }
        txn
    }

    /// Points each namespace's default route at its next holder (after the commit).
    async fn install(self) {
        for (next, gateway) in self.routes {
            match install_default_route(&next, gateway).await {
                Ok(()) => tracing::info!(
                    "default route of {} now via {gateway} ({}, endpoint {})",
                    next.netns.path,
                    next.network,
                    next.id
                ),
                Err(e) => tracing::warn!(
                    endpoint = %next.id, error = %e,
                    "cannot move the default route to the next network"
                ),
            }
        }
    }
}

/// The first of `ordered` (endpoints in attach order) with an address of the family, and its
/// network's gateway of that family: who holds a namespace's default route next.
fn next_holder<'a, 'n>(
    ordered: &'a [Endpoint],
    ipv4: bool,
    network: impl Fn(&str) -> Option<&'n Network>,
) -> Option<(&'a Endpoint, IpAddr)> {
    ordered
        .iter()
        .filter(|e| e.ips.iter().any(|ip| ip.addr().is_ipv4() == ipv4))
        .find_map(|e| Some((e, gateway_of(network(&e.network)?, ipv4)?)))
}

/// Points the default route of `ep`'s family of `gateway` in `ep`'s namespace at `gateway`
/// through `ep`'s interface (replacing the route there was).
async fn install_default_route(ep: &Endpoint, gateway: IpAddr) -> Result<()> {
    let (path, nsid, ifname, mac) = (
        ep.netns.path.clone(),
        ep.netns.id.clone(),
        ep.ifname.clone(),
        ep.mac.0,
    );
    kernel(move || {
        let ns = netns::open(Path::new(&path))?;
        if netns::id_of(&ns)? != nsid {
            return Ok(());
        }
        let mut sb = Netlink::open_in(&ns)?;
        if let Some(link) = sb.link_by_name(&ifname)?.filter(|l| l.mac == Some(mac)) {
            let (msg, flags, op) = Netlink::default_route_msg(link.index, gateway);
            sb.request(msg, flags, &op)?;
        }
        Ok(())
    })
    .await
}

/// An endpoint's kernel spec on its network's bridge, re-creating the bridge if someone
/// deleted it.
fn endpoint_on_bridge(
    host: &mut Netlink,
    ep: &Endpoint,
    net: &Network,
) -> berth_dataplane::Result<EndpointSpec> {
    let bridge = bridge_spec(net);
    let index = match host.link_by_name(&bridge.name)? {
        Some(l) => l.index,
        None => berth_dataplane::ensure_bridge(host, &bridge)?,
    };
    Ok(endpoint_spec(ep, net, index))
}

fn endpoint_spec(ep: &Endpoint, net: &Network, bridge_index: u32) -> EndpointSpec {
    EndpointSpec {
        host_ifname: ep.host_ifname.clone(),
        bridge_index,
        mtu: net.mtu,
        ifname: ep.ifname.clone(),
        mac: ep.mac.0,
        ips: ep.ips.clone(),
        gateways: net.subnets.iter().map(|s| s.gateway).collect(),
        hairpin: !ep.ports.is_empty(),
    }
}

/// The first subnet in use that overlaps `cidr`, named for an error message: a berth
/// network's, or one of `pools` (Docker IPAM pools).
fn overlapping(networks: &[Network], pools: &[IpNet], cidr: &IpNet) -> Option<(String, IpNet)> {
    networks
        .iter()
        .flat_map(|n| {
            n.subnets
                .iter()
                .map(move |s| (format!("network {:?}", n.name), s.cidr))
        })
        .chain(pools.iter().map(|c| ("a Docker IPAM pool".to_string(), *c)))
        .find(|(_, theirs)| theirs.contains(cidr) || cidr.contains(theirs))
}

/// The first /24 of the default pool that overlaps no existing network.
fn carve_default(overlap: &dyn Fn(&IpNet) -> Option<(String, IpNet)>) -> Result<IpNet> {
    let pool: IpNet = DEFAULT_POOL.parse().expect("valid default pool");
    pool.subnets(DEFAULT_POOL_PREFIX)
        .expect("valid prefix")
        .find(|c| overlap(c).is_none())
        .ok_or_else(|| {
            AgentError::Conflict(format!(
                "the default pool {DEFAULT_POOL} is used up; give --subnet"
            ))
        })
}

fn already_exists(e: &AgentError) -> bool {
    matches!(e, AgentError::Dataplane(d) if d.errno() == Some(nix::errno::Errno::EEXIST as i32))
}
