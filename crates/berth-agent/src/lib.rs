//! The per-host agent.
//!
//! Data flows one way: an API call validates its input, commits the desired state to the store
//! in one transaction (addresses included, so an address is never handed out twice), and only
//! then changes the kernel. If the kernel step fails the transaction is undone; if the daemon
//! dies in between, [`Agent::reconcile`] finishes or undoes the work at the next start.
//!
//! Where things are (each file adds its own `impl Agent`):
//!
//! - `lib.rs`: [`Agent`] and its builders, and the helpers every file shares (store, kernel).
//! - `networks.rs`: creating, listing and removing bridge and overlay networks.
//! - `sandboxes.rs`: berth's named network namespaces, made and removed.
//! - `endpoints.rs`: attach and detach: an endpoint's records, addresses and default routes.
//! - `reaper.rs`: deleting detached endpoints' veths in batches, then freeing their addresses.
//! - `ipam.rs`: the in-memory address pools, and overlay networks' per-host address blocks.
//! - `overlay.rs`: overlay networks across hosts, and the reconciler that follows other hosts.
//! - `hosts.rs`: hosts registered under a lease, and what is freed when one is gone.
//! - `firewall.rs`: berth's nftables table: masquerade, isolation, published ports.
//! - `services.rs`: services (VIPs load-balanced over selected endpoints) and their
//!   reconciler.
//! - `dns.rs`: which names berth's DNS serves on each network, and sandboxes' resolv.conf.
//! - `reconcile.rs`: the start-up repair pass between the store and the kernel.
//! - `watch.rs`: noticing, while the daemon runs, that berth's links vanished.
//! - `docker.rs`: the Docker front-end: libnetwork's network and IPAM drivers.
//! - `api.rs`: the `/v1` HTTP/JSON API.
//! - `daemon.rs`: `berth daemon`: start-up, serving, and a stop that leaves containers be.
//! - `keys.rs`: the store's key layout.
//! - `scope.rs`: one host's view of a shared store.
//! - `error.rs`: [`AgentError`].

pub mod api;
pub mod daemon;
mod dns;
pub mod docker;
mod endpoints;
mod error;
mod firewall;
pub mod hosts;
mod ipam;
mod keys;
mod networks;
pub mod overlay;
mod policies;
mod reaper;
mod reconcile;
mod sandboxes;
pub mod scope;
pub mod serve;
mod services;
mod watch;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_api::Status;
use berth_dataplane::Netlink;
use berth_ipam::Pool;
use berth_model::{Driver, Endpoint, Network};
use berth_store::{KeyValue, Store, Txn, TxnOutcome};
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
    /// The ranges service VIPs come from (the same on every host).
    service_cidrs: Vec<ipnet::IpNet>,
    /// The services' load balancer and what it was programmed from.
    service_state: tokio::sync::Mutex<services::ServiceState>,
    /// The policy compiler and what the kernel was programmed with from it.
    policy_state: tokio::sync::Mutex<policies::PolicyState>,
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

/// Adds to `events` what the watches have ready now, without waiting (at most 1,024 in all):
/// a reconciler then applies a burst of changes as one. The error of a watch that failed.
async fn ready_events(
    watches: &mut [&mut berth_store::Watch],
    events: &mut Vec<berth_store::Event>,
) -> std::result::Result<(), String> {
    for w in watches {
        while events.len() < 1024 {
            let mut next = std::pin::pin!(w.next());
            match std::future::poll_fn(|cx| std::task::Poll::Ready(next.as_mut().poll(cx))).await {
                std::task::Poll::Ready(Ok(e)) => events.push(e),
                std::task::Poll::Ready(Err(e)) => return Err(e.to_string()),
                std::task::Poll::Pending => break,
            }
        }
    }
    Ok(())
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
            service_cidrs: Vec::new(),
            service_state: tokio::sync::Mutex::new(services::ServiceState::new("local", false)),
            policy_state: tokio::sync::Mutex::new(policies::PolicyState::new("local")),
        }
    }

    /// The ranges service VIPs are taken from (agreed with the cluster at start).
    pub fn with_service_cidrs(mut self, cidrs: Vec<ipnet::IpNet>) -> Self {
        self.service_cidrs = cidrs;
        self
    }

    /// Who this daemon is in the cluster, and whether the store is shared with other hosts
    /// (then every record says which host it belongs to).
    pub fn with_host(mut self, host: HostIdentity, shared: bool) -> Self {
        self.service_state = tokio::sync::Mutex::new(services::ServiceState::new(&host.id, shared));
        self.policy_state = tokio::sync::Mutex::new(policies::PolicyState::new(&host.id));
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

fn already_exists(e: &AgentError) -> bool {
    matches!(e, AgentError::Dataplane(d) if d.errno() == Some(nix::errno::Errno::EEXIST as i32))
}

/// The kernel's answer when a bridge already has its 1,024 ports (BR_MAX_PORTS).
fn bridge_full(e: &AgentError) -> bool {
    matches!(e, AgentError::Dataplane(d) if d.errno() == Some(nix::errno::Errno::EXFULL as i32))
}
