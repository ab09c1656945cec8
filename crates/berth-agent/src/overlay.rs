//! Overlay networks across hosts, and the reconciler that keeps this host's kernel and DNS in
//! step with what other hosts do.
//!
//! An overlay network is realized on a host (its bridge, with the anycast gateway, and a
//! VXLAN device on it) while the host has endpoints on it. Remote endpoints reach the kernel
//! only as static entries on the VXLAN device: an FDB entry (their MAC → their host's
//! underlay address) and a neighbour entry (their address → their MAC, answered by the
//! device's ARP/ND proxy). Nothing is learned and nothing floods. A host whose lease lapsed
//! keeps its entries, at its last registered address, until it is freed: its daemon may be
//! stopped, restarting or stalled while its containers run on. Only its names go.
//!
//! The [`ClusterReconciler`] lists hosts, networks and endpoints, then watches them from the
//! listing's revision. Each change marks networks dirty; a dirty network's entries are
//! diffed against the kernel and its remote names against DNS. A watch that fails (compacted,
//! lagging, the store gone) is dropped and everything is listed again: the diff makes a
//! relist cheap and leaves nothing stale.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_dataplane::{Netlink, VXLAN_PORT};
use berth_model::{Driver, Endpoint, HostRecord, MacAddr, Network, vxlan_name};
use berth_store::{Event, Watch};

use crate::networks::bridge_spec;
use crate::{Agent, AgentError, Result, decode, kernel, keys, remove_link};

/// One remote endpoint address as this host's VXLAN device must know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Remote {
    pub mac: MacAddr,
    pub ip: IpAddr,
    /// The underlay address of the endpoint's host.
    pub vtep: IpAddr,
}

/// The kernel edge of the overlay, small enough to fake in unit tests.
pub trait OverlayKernel: Send + Sync + 'static {
    /// Makes the network's VXLAN device hold exactly `desired` (FDB and neighbour entries,
    /// stale halves included); returns how many entries changed, or `None` when the network
    /// is not realized on this host.
    fn sync(&self, net: &Network, desired: &BTreeSet<Remote>) -> Result<Option<usize>>;
}

/// The real kernel, over netlink in the daemon's namespace.
pub struct Kernel;

impl OverlayKernel for Kernel {
    fn sync(&self, net: &Network, desired: &BTreeSet<Remote>) -> Result<Option<usize>> {
        let mut nl = Netlink::open()?;
        let Some(link) = nl.link_by_name(&vxlan_name(&net.id))? else {
            return Ok(None);
        };
        let desired: Vec<berth_dataplane::RemoteEntry> = desired
            .iter()
            .map(|r| berth_dataplane::RemoteEntry {
                mac: r.mac.0,
                ip: r.ip,
                vtep: r.vtep,
            })
            .collect();
        Ok(Some(berth_dataplane::sync_remotes(
            &mut nl,
            link.index,
            link.controller,
            &desired,
        )?))
    }
}

/// What this host knows of the cluster: the input of every decision the reconciler makes.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// Hosts whose lease is alive (`hosts/`): their endpoints are named in DNS.
    pub hosts: HashMap<String, HostRecord>,
    /// Every host's last registered address (`host-addresses/`, not leased): where a host
    /// whose lease lapsed still gets its endpoints' traffic, until it is freed.
    pub addresses: HashMap<String, HostRecord>,
    pub networks: HashMap<String, Network>,
    pub endpoints: HashMap<String, Endpoint>,
    /// Overlay networks deleted since the last sync: a device left here goes too.
    pub removed: Vec<Network>,
    /// This host's id: its own endpoints are no entries, so their comings and goings
    /// matter only when they are a network's first or last here.
    pub me: String,
}

impl ClusterView {
    /// The entries `net`'s VXLAN device on host `me` should have: every address of every
    /// endpoint of the network on another host, sent to that host's [`Self::vtep`]. A host
    /// whose lease lapsed keeps its entries: its daemon may only be stopped or stalled while
    /// its containers talk on.
    pub fn desired(&self, net: &Network, me: &str) -> BTreeSet<Remote> {
        let claimed: HashSet<IpAddr> = self.hosts.values().filter_map(|h| h.address).collect();
        self.endpoints
            .values()
            .filter(|ep| ep.network == net.name)
            .filter_map(|ep| {
                let host = ep.host.as_deref().filter(|h| *h != me)?;
                Some((ep, self.vtep(host, &claimed)?))
            })
            .flat_map(|(ep, vtep)| {
                ep.ips.iter().map(move |ip| Remote {
                    mac: ep.mac,
                    ip: ip.addr(),
                    vtep,
                })
            })
            .collect()
    }

    /// Where `host`'s endpoints are sent: its registered address while its lease lives;
    /// after that its last registered one, until the host is freed (its address record
    /// goes) or a live host registers that address (`claimed`: the address now belongs to
    /// another machine, which would only drop the traffic).
    fn vtep(&self, host: &str, claimed: &HashSet<IpAddr>) -> Option<IpAddr> {
        match self.hosts.get(host) {
            Some(live) => live.address,
            None => self
                .addresses
                .get(host)?
                .address
                .filter(|a| !claimed.contains(a)),
        }
    }

    /// Endpoints of `network` on other hosts that are alive, with their host: those named in
    /// DNS. A lapsed host's names go at once (NXDOMAIN rather than an address that may be
    /// dead), although its entries stay.
    pub fn remote_endpoints<'a>(
        &'a self,
        network: &'a str,
        me: &'a str,
    ) -> impl Iterator<Item = (&'a Endpoint, &'a HostRecord)> + 'a {
        self.endpoints.values().filter_map(move |ep| {
            let host = ep.host.as_deref()?;
            if ep.network != network || host == me {
                return None;
            }
            Some((ep, self.hosts.get(host)?))
        })
    }

    pub fn has_local_endpoints(&self, network: &str, me: &str) -> bool {
        self.endpoints
            .values()
            .any(|ep| ep.network == network && ep.is_on(me))
    }

    fn overlay(&self, name: &str) -> Option<&Network> {
        self.networks
            .get(name)
            .filter(|n| n.driver == Driver::Overlay)
    }

    /// Applies one watch event; returns the networks it affects (`None`: all of them).
    fn apply(&mut self, event: &Event) -> Result<Option<Vec<String>>> {
        let key = event.key();
        let put = match event {
            Event::Put(kv) => Some(kv),
            Event::Delete { .. } => None,
        };
        if let Some(id) = key.strip_prefix(keys::HOSTS) {
            match put {
                Some(kv) => self.hosts.insert(id.to_string(), decode(kv)?),
                None => self.hosts.remove(id),
            };
            return Ok(None);
        }
        if let Some(id) = key.strip_prefix(keys::HOST_ADDRESSES) {
            match put {
                Some(kv) => self.addresses.insert(id.to_string(), decode(kv)?),
                None => self.addresses.remove(id),
            };
            return Ok(None);
        }
        if let Some(name) = key.strip_prefix(keys::NETWORKS) {
            match put {
                Some(kv) => {
                    self.networks.insert(name.to_string(), decode(kv)?);
                }
                None => {
                    if let Some(net) = self.networks.remove(name)
                        && net.driver == Driver::Overlay
                    {
                        self.removed.push(net);
                    }
                }
            }
            return Ok(Some(vec![name.to_string()]));
        }
        if let Some(id) = key.strip_prefix(keys::ENDPOINTS) {
            let old = match put {
                Some(kv) => self.endpoints.insert(id.to_string(), decode(kv)?),
                None => self.endpoints.remove(id),
            };
            let new = self.endpoints.get(id);
            let local = |e: &Endpoint| !self.me.is_empty() && e.is_on(&self.me);
            let nets: Vec<String> = old
                .iter()
                .chain(new)
                .filter(|e| {
                    // One of this host's among others here: nothing to program.
                    !(local(e)
                        && self
                            .endpoints
                            .values()
                            .any(|o| o.id != e.id && o.network == e.network && local(o)))
                })
                .map(|e| e.network.clone())
                .collect();
            return Ok(Some(nets));
        }
        Ok(Some(vec![]))
    }
}

/// The most events applied before a sync, so that a steady stream of them cannot hold syncs
/// (and this host's own realization notices) back.
const MAX_BATCH: usize = 1024;

/// The watched prefixes: everything the reconciler decides from.
const WATCHED: [&str; 4] = [
    keys::HOSTS,
    keys::HOST_ADDRESSES,
    keys::NETWORKS,
    keys::ENDPOINTS,
];

/// The reconciler's own state between passes.
pub struct ClusterReconciler {
    agent: Arc<Agent>,
    kernel: Arc<dyn OverlayKernel>,
    view: ClusterView,
    /// Remote endpoints named in DNS, by network: to unname what is no longer there.
    named: HashMap<String, HashSet<String>>,
}

impl ClusterReconciler {
    pub fn new(agent: Arc<Agent>, kernel: Arc<dyn OverlayKernel>) -> Self {
        ClusterReconciler {
            agent,
            kernel,
            view: ClusterView::default(),
            named: HashMap::new(),
        }
    }

    /// Runs for the life of the daemon: list, sync everything, then follow the watches
    /// until one fails, and start over.
    pub async fn run(mut self, mut realized: tokio::sync::mpsc::UnboundedReceiver<String>) {
        loop {
            match self.list_and_watch().await {
                Ok(watches) => {
                    let why = self.follow(watches, &mut realized).await;
                    tracing::info!("cluster watch ended ({why}); listing again");
                    // Never a hot loop, whatever ends watches at once.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the cluster's state; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Lists the watched prefixes into a fresh view, syncs every overlay network, and opens
    /// one watch per prefix from its listing's revision (so nothing between is missed).
    async fn list_and_watch(&mut self) -> Result<Vec<Watch>> {
        let store = self.agent.store.clone();
        let mut view = ClusterView {
            me: self.agent.host.id.clone(),
            ..ClusterView::default()
        };
        let mut watches = Vec::new();
        for prefix in WATCHED {
            let listing = store.list(prefix).await?;
            for kv in &listing.items {
                // One bad record (another version's, a damaged one) must not stop this host
                // from following the rest of the cluster.
                if let Err(e) = view.apply(&Event::Put(kv.clone())) {
                    tracing::error!(key = %kv.key, error = %e, "bad record in the store; skipped");
                }
            }
            watches.push(store.watch(prefix, listing.revision).await?);
        }
        // Overlay networks deleted while the watch was down: their devices go too.
        view.removed = std::mem::take(&mut self.view.removed);
        view.removed.extend(
            std::mem::take(&mut self.view.networks)
                .into_values()
                .filter(|n| {
                    n.driver == Driver::Overlay
                        && view.networks.get(&n.name).is_none_or(|now| now.id != n.id)
                }),
        );
        self.view = view;
        let all: Vec<String> = self.view.networks.keys().cloned().collect();
        self.sync(all).await;
        Ok(watches)
    }

    /// Applies events as they come; returns why it stopped. The events already waiting when
    /// one arrives (those that came in during the last sync) are applied with it and synced
    /// once: a burst of attaches elsewhere costs a kernel pass per network per sync, not one
    /// per attach, and a lone event is synced at once.
    async fn follow(
        &mut self,
        mut watches: Vec<Watch>,
        realized: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> String {
        let mut resync = tokio::time::interval(Duration::from_secs(30));
        resync.tick().await;
        loop {
            let mut dirty: Vec<String> = Vec::new();
            let mut taken = 0;
            loop {
                let [hosts, addresses, networks, endpoints] = &mut watches[..] else {
                    return "watches missing".into();
                };
                let next = async {
                    tokio::select! {
                        e = hosts.next() => Some(e),
                        e = addresses.next() => Some(e),
                        e = networks.next() => Some(e),
                        e = endpoints.next() => Some(e),
                        Some(net) = realized.recv() => {
                            dirty.push(net);
                            None
                        }
                        _ = resync.tick() => {
                            // The kernel can change under us (someone deletes an entry); a
                            // periodic pass over the cached view puts it back.
                            dirty.extend(self.view.networks.keys().cloned());
                            None
                        }
                    }
                };
                let got = if taken == 0 {
                    next.await
                } else if taken >= MAX_BATCH {
                    break;
                } else {
                    // Only what is ready now: polled once, not waited for.
                    let mut next = std::pin::pin!(next);
                    match std::future::poll_fn(|cx| std::task::Poll::Ready(next.as_mut().poll(cx)))
                        .await
                    {
                        std::task::Poll::Ready(got) => got,
                        std::task::Poll::Pending => break,
                    }
                };
                taken += 1;
                let event = match got {
                    None => continue,
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        // What this batch applied is synced before the relist replaces the
                        // view (a deleted network's teardown would be lost otherwise).
                        dirty.sort();
                        dirty.dedup();
                        self.sync(dirty).await;
                        return e.to_string();
                    }
                };
                match self.view.apply(&event) {
                    Ok(Some(nets)) => dirty.extend(nets),
                    Ok(None) => dirty.extend(self.view.networks.keys().cloned()),
                    Err(e) => {
                        tracing::error!(key = %event.key(), error = %e, "bad record in the store")
                    }
                }
            }
            dirty.sort();
            dirty.dedup();
            self.sync(dirty).await;
        }
    }

    /// Brings the kernel entries and DNS names of these networks in line with the view.
    async fn sync(&mut self, networks: Vec<String>) {
        let me = self.agent.host.id.clone();
        let mut gone: Vec<String> = Vec::new();
        for name in networks {
            let Some(net) = self.view.overlay(&name).cloned() else {
                // Not (or no longer) an overlay network: its remote names go.
                gone.push(name);
                continue;
            };
            self.sync_names(&net, &me);
            // Without endpoints here the network has no business on this host: entries
            // are not programmed, and a device left over is removed.
            let want = if self.view.has_local_endpoints(&net.name, &me) {
                self.view.desired(&net, &me)
            } else {
                BTreeSet::new()
            };
            let empty = want.is_empty() && !self.view.has_local_endpoints(&net.name, &me);
            let kernel = self.kernel.clone();
            let net2 = net.clone();
            match kernel_call(move || kernel.sync(&net2, &want)).await {
                // Not here, but still holding blocks (the device went with a restart's
                // repair pass, or was never made): they go back.
                Ok(None) if empty && self.agent.holds_blocks(&net.name) => {
                    self.agent.teardown_overlay(&net).await;
                }
                Ok(None) => {}
                Ok(Some(_)) if empty => {
                    if self.agent.teardown_overlay(&net).await {
                        self.named.remove(&net.name);
                    }
                }
                Ok(Some(0)) => {}
                Ok(Some(changed)) => {
                    tracing::debug!(network = %name, changed, "overlay entries synced")
                }
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "cannot program overlay entries")
                }
            }
        }
        for net in std::mem::take(&mut self.view.removed) {
            let kernel = self.kernel.clone();
            let net2 = net.clone();
            // Emptied first: realized or not, that is what `sync` tells.
            let realized = kernel_call(move || kernel.sync(&net2, &BTreeSet::new())).await;
            if let Ok(Some(_)) = realized
                && !self.agent.teardown_overlay(&net).await
            {
                // Endpoints here on a new network of the same name keep it.
                tracing::debug!(network = %net.name, "deleted overlay network kept for now");
            }
        }
        for name in gone {
            if let Some(ids) = self.named.remove(&name) {
                for id in ids {
                    self.agent.unname(&name, &id);
                }
            }
        }
    }

    /// Names the network's remote endpoints in this host's DNS; unnames those gone.
    fn sync_names(&mut self, net: &Network, me: &str) {
        let mut now: HashSet<String> = HashSet::new();
        for (ep, host) in self.view.remote_endpoints(&net.name, me) {
            self.agent.name_remote_endpoint(ep, &host.id);
            now.insert(ep.id.clone());
        }
        let before = self.named.insert(net.name.clone(), now.clone());
        for id in before.unwrap_or_default().difference(&now) {
            self.agent.unname(&net.name, id);
        }
    }
}

async fn kernel_call<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("kernel task failed: {e}")))?
}

impl Agent {
    /// Makes an overlay network exist on this host (bridge with the anycast gateway, VXLAN
    /// device) and serves its DNS; tells the reconciler, which programs the remote entries.
    /// Returns the bridge's index.
    pub(crate) async fn ensure_overlay(&self, net: &Network) -> Result<u32> {
        let Some(local) = self.host.address else {
            return Err(AgentError::Invalid(format!(
                "host {} has no underlay address (--advertise-address), so it cannot carry overlay network {:?}",
                self.host.id, net.name
            )));
        };
        let vni = net.vni.ok_or_else(|| AgentError::Corrupt {
            key: keys::network(&net.name),
            why: "overlay network without a VNI".into(),
        })?;
        if self
            .realized
            .lock()
            .expect("realized lock")
            .contains(&net.id)
        {
            // Both links there and up: nothing to do (no bridge or VXLAN checks).
            let (bridge, vxlan) = (net.bridge.clone(), vxlan_name(&net.id));
            let found = kernel(move || {
                let mut nl = Netlink::open()?;
                let vxlan_up = nl.link_by_name(&vxlan)?.is_some_and(|l| l.up);
                Ok(nl
                    .link_by_name(&bridge)?
                    .filter(|l| l.up && vxlan_up)
                    .map(|l| l.index))
            })
            .await?;
            if let Some(index) = found {
                return Ok(index);
            }
            // Gone or down since: made again below.
            self.realized.lock().expect("realized lock").remove(&net.id);
        }
        let _one = self.overlay_realizing.lock().await;
        let (bridge, name, mtu, mac) = (
            bridge_spec(net),
            vxlan_name(&net.id),
            net.mtu,
            self.host.vtep_mac(),
        );
        let (index, created) = kernel(move || {
            let mut nl = Netlink::open()?;
            let created = nl.link_by_name(&name)?.is_none();
            let bridge_index = berth_dataplane::ensure_bridge(&mut nl, &bridge)?;
            berth_dataplane::ensure_vxlan(
                &mut nl,
                &berth_dataplane::VxlanSpec {
                    name,
                    vni,
                    local,
                    port: VXLAN_PORT,
                    mtu,
                    mac: mac.0,
                    bridge_index,
                    underlay_index: None,
                },
            )?;
            Ok((bridge_index, created))
        })
        .await?;
        if created {
            // The network's bridge joins berth's table (masquerade, isolation, DNS).
            self.sync_firewall().await?;
            tracing::info!(network = %net.name, vni, "overlay network realized on this host");
        }
        self.serve_dns(net);
        self.realized
            .lock()
            .expect("realized lock")
            .insert(net.id.clone());
        // The reconciler may have seen this host's first endpoint before the device existed.
        let _ = self.overlay_realized.send(net.name.clone());
        Ok(index)
    }

    /// Removes an overlay network from this host once it has no endpoints here: under the
    /// topology lock, so no attach is half way, and after checking the store, not a cache.
    /// Whether it did.
    pub(crate) async fn teardown_overlay(&self, net: &Network) -> bool {
        let topology = self.topology.write().await;
        // A network deleted and made again under its name is another network (other links):
        // endpoints of the new one do not keep the old one's.
        let same = match self.load::<Network>(&keys::network(&net.name)).await {
            Ok(current) => current.is_some_and(|(c, _)| c.id == net.id),
            Err(e) => {
                tracing::warn!(network = %net.name, error = %e, "cannot read the network");
                return false;
            }
        };
        let local = match self.local_endpoints().await {
            Ok(eps) => same && eps.iter().any(|e| e.network == net.name),
            Err(e) => {
                tracing::warn!(network = %net.name, error = %e, "cannot check the network's endpoints");
                return false;
            }
        };
        if local {
            return false;
        }
        self.stop_dns(&net.name);
        self.realized.lock().expect("realized lock").remove(&net.id);
        for link in [vxlan_name(&net.id), net.bridge.clone()] {
            if let Err(e) = remove_link(link.clone()).await {
                tracing::warn!(network = %net.name, link = %link, error = %e, "cannot remove overlay link");
            }
        }
        if let Err(e) = self.release_blocks(&net.name).await {
            tracing::warn!(network = %net.name, error = %e, "cannot release address blocks");
        }
        // The table is written from the store under its own lock (an attach that makes the
        // network again syncs it too): attaches and detaches need not wait for it.
        drop(topology);
        if let Err(e) = self.sync_firewall().await {
            tracing::warn!(network = %net.name, error = %e, "cannot update the firewall");
        }
        tracing::info!(network = %net.name, "overlay network left this host (no endpoints here)");
        true
    }

    /// Names another host's endpoint in this host's DNS. Its namespace id is only unique on
    /// its own host, so it is qualified with the host.
    pub(crate) fn name_remote_endpoint(&self, ep: &Endpoint, host: &str) {
        let mut ep = ep.clone();
        ep.netns.id = format!("{host}/{}", ep.netns.id);
        self.name_endpoint(&ep);
    }

    pub(crate) fn unname(&self, network: &str, id: &str) {
        if let Some(d) = &self.discovery {
            d.dns.remove_endpoint(network, id);
        }
    }

    /// Drops a freed remote endpoint from DNS at once (the reconciler would too, later).
    pub(crate) fn forget_remote_endpoint(&self, ep: &Endpoint) {
        self.unname(&ep.network, &ep.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use berth_model::{NetnsRef, Subnet};

    fn host(id: &str, last: u8) -> HostRecord {
        HostRecord {
            id: id.into(),
            address: Some(IpAddr::from([198, 51, 100, last])),
            vtep_mac: crate::hosts::vtep_mac(id),
            mtu: 1500,
            version: "test".into(),
        }
    }

    fn overlay(name: &str) -> Network {
        Network {
            id: format!("{name}0123456789"),
            name: name.into(),
            subnets: vec![Subnet {
                cidr: "10.188.0.0/16".parse().unwrap(),
                gateway: "10.188.0.1".parse().unwrap(),
            }],
            mtu: 1450,
            internal: false,
            bridge: format!("berth-{name}"),
            dns: None,
            docker_networks: vec![],
            driver: Driver::Overlay,
            vni: Some(4096),
            host: None,
            blocks: vec![],
            removing: false,
        }
    }

    fn endpoint(id: &str, network: &str, host: &str, ip: [u8; 4]) -> Endpoint {
        Endpoint {
            id: id.into(),
            network: network.into(),
            netns: NetnsRef {
                path: "/run/netns/x".into(),
                id: "1:2".into(),
                sandbox: None,
            },
            ifname: "eth0".into(),
            host_ifname: format!("berth{id}"),
            name: Some(id.into()),
            aliases: vec![],
            container_id: None,
            runtime_configured: false,
            mac: MacAddr::from_ipv4(ip.into()),
            ips: vec![ipnet::IpNet::new(IpAddr::from(ip), 16).unwrap()],
            ports: vec![],
            default_gateways: vec![],
            host: Some(host.into()),
            labels: Default::default(),
            named_ports: vec![],
        }
    }

    fn view() -> ClusterView {
        let mut v = ClusterView::default();
        for (id, last) in [("h1", 11), ("h2", 12), ("h3", 13)] {
            v.hosts.insert(id.into(), host(id, last));
            v.addresses.insert(id.into(), host(id, last));
        }
        v.networks.insert("ov".into(), overlay("ov"));
        for ep in [
            endpoint("a", "ov", "h1", [10, 188, 0, 2]),
            endpoint("b", "ov", "h2", [10, 188, 0, 66]),
            endpoint("c", "ov", "h3", [10, 188, 0, 130]),
            endpoint("d", "other", "h2", [10, 189, 0, 2]),
        ] {
            v.endpoints.insert(ep.id.clone(), ep);
        }
        v
    }

    /// `(ip, vtep)` of each entry, sorted.
    fn entries(want: &BTreeSet<Remote>) -> Vec<String> {
        want.iter()
            .map(|r| format!("{}@{}", r.ip, r.vtep))
            .collect()
    }

    #[test]
    fn a_host_wants_entries_for_every_remote_endpoint_but_never_the_gateway() {
        let v = view();
        let want = v.desired(&overlay("ov"), "h1");
        assert_eq!(
            entries(&want),
            ["10.188.0.66@198.51.100.12", "10.188.0.130@198.51.100.13"]
        );
        assert!(
            want.iter().all(|r| r.ip.to_string() != "10.188.0.1"),
            "never the gateway"
        );
        // A host that registered before address records existed: its live record will do.
        let mut old = view();
        old.addresses.clear();
        assert_eq!(old.desired(&overlay("ov"), "h1"), want);
    }

    #[test]
    fn a_lapsed_host_keeps_its_entries_until_freed_or_its_address_is_taken() {
        let mut v = view();
        let ov = overlay("ov");
        let before = entries(&v.desired(&ov, "h1"));
        let named = |v: &ClusterView| -> Vec<String> {
            let mut ids: Vec<String> = v
                .remote_endpoints("ov", "h1")
                .map(|(ep, _)| ep.id.clone())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(named(&v), ["b", "c"]);

        // h3's lease lapses (its daemon is stopped or stalled): its containers stay reachable
        // at its last address; only its names go.
        v.hosts.remove("h3");
        assert_eq!(entries(&v.desired(&ov, "h1")), before);
        assert_eq!(named(&v), ["b"]);

        // Another live host registers h3's address: that machine is not h3 any more.
        v.hosts.insert("h4".into(), host("h4", 13));
        assert_eq!(
            entries(&v.desired(&ov, "h1")),
            ["10.188.0.66@198.51.100.12"]
        );
        v.hosts.remove("h4");
        assert_eq!(entries(&v.desired(&ov, "h1")), before);

        // h3 is freed (grace over, or `berth host rm`): its address record goes.
        v.addresses.remove("h3");
        assert_eq!(
            entries(&v.desired(&ov, "h1")),
            ["10.188.0.66@198.51.100.12"]
        );

        // h2 comes back with a new address: the live record wins over an older address
        // record, and the entry moves.
        v.hosts.insert("h2".into(), host("h2", 50));
        assert_eq!(
            entries(&v.desired(&ov, "h1")),
            ["10.188.0.66@198.51.100.50"]
        );
    }

    #[test]
    fn watch_events_update_the_view_and_name_the_networks_they_touch() {
        let mut v = view();
        let kv = |key: &str, value: Vec<u8>| berth_store::KeyValue {
            key: key.into(),
            value,
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        };
        let moved = endpoint("d", "ov", "h2", [10, 188, 0, 67]);
        let nets = v
            .apply(&Event::Put(kv(
                "endpoints/d",
                serde_json::to_vec(&moved).unwrap(),
            )))
            .unwrap()
            .unwrap();
        assert_eq!(nets, ["other", "ov"], "old and new network");
        for key in ["hosts/h2", "host-addresses/h2"] {
            assert_eq!(
                v.apply(&Event::Delete {
                    key: key.into(),
                    revision: 2,
                    prev: None
                })
                .unwrap(),
                None,
                "a host change touches every network"
            );
        }
        assert!(!v.hosts.contains_key("h2"));
        assert!(!v.addresses.contains_key("h2"));
        assert_eq!(
            v.apply(&Event::Put(kv(
                "host-addresses/h2",
                serde_json::to_vec(&host("h2", 12)).unwrap()
            )))
            .unwrap(),
            None
        );
        assert_eq!(v.addresses["h2"].address, host("h2", 12).address);
        assert!(
            v.apply(&Event::Put(kv("endpoints/e", b"not json".to_vec())))
                .is_err(),
            "a corrupt record is an error, not a panic"
        );
    }

    #[test]
    fn this_hosts_own_endpoints_matter_only_as_a_networks_first_or_last_here() {
        let mut v = view();
        v.me = "h1".into();
        let kv = |ep: &Endpoint| berth_store::KeyValue {
            key: format!("endpoints/{}", ep.id),
            value: serde_json::to_vec(ep).unwrap(),
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        };
        let gone = |id: &str| Event::Delete {
            key: format!("endpoints/{id}"),
            revision: 2,
            prev: None,
        };
        // "a" is h1's only endpoint on ov: a second one changes nothing to program.
        let x = endpoint("x", "ov", "h1", [10, 188, 0, 3]);
        assert_eq!(v.apply(&Event::Put(kv(&x))).unwrap(), Some(vec![]));
        assert_eq!(
            v.apply(&gone("a")).unwrap(),
            Some(vec![]),
            "x is still here"
        );
        assert_eq!(
            v.apply(&gone("x")).unwrap(),
            Some(vec!["ov".to_string()]),
            "the last one here: the network leaves this host"
        );
        let first = endpoint("y", "ov", "h1", [10, 188, 0, 4]);
        assert_eq!(
            v.apply(&Event::Put(kv(&first))).unwrap(),
            Some(vec!["ov".to_string()]),
            "the first one here again"
        );
        // Another host's endpoints always matter.
        let remote = endpoint("z", "ov", "h2", [10, 188, 0, 70]);
        assert_eq!(
            v.apply(&Event::Put(kv(&remote))).unwrap(),
            Some(vec!["ov".to_string()])
        );
    }

    /// The kernel as a map of realized networks to their entries.
    #[derive(Default)]
    struct FakeKernel {
        entries: Mutex<HashMap<String, BTreeSet<Remote>>>,
    }

    impl OverlayKernel for FakeKernel {
        fn sync(&self, net: &Network, desired: &BTreeSet<Remote>) -> Result<Option<usize>> {
            let mut e = self.entries.lock().unwrap();
            let Some(have) = e.get_mut(&net.name) else {
                return Ok(None);
            };
            let changed = have.symmetric_difference(desired).count();
            *have = desired.clone();
            Ok(Some(changed))
        }
    }

    #[test]
    fn syncing_a_stale_kernel_leaves_exactly_the_desired_entries() {
        let v = view();
        let k = FakeKernel::default();
        let stale = Remote {
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            ip: "10.188.0.9".parse().unwrap(),
            vtep: "198.51.100.99".parse().unwrap(),
        };
        k.entries
            .lock()
            .unwrap()
            .insert("ov".into(), BTreeSet::from([stale]));
        let net = overlay("ov");
        let want = v.desired(&net, "h1");
        assert_eq!(
            k.sync(&net, &want).unwrap(),
            Some(3),
            "one stale out, two in"
        );
        assert_eq!(k.entries.lock().unwrap()["ov"], want);
        assert_eq!(
            k.sync(&net, &want).unwrap(),
            Some(0),
            "in step: nothing to do"
        );
        assert_eq!(
            k.sync(&overlay("unrealized"), &want).unwrap(),
            None,
            "a network without a device here is left alone"
        );
    }

    /// The whole loop on a real (embedded) store and the fake kernel: entries follow the
    /// store through a lease lapse (kept), a forced relist (still kept), an address taken by
    /// another host, the host freed, and the host back at a new address.
    #[tokio::test]
    async fn the_reconciler_keeps_a_lapsed_hosts_entries_until_it_is_freed() {
        use berth_store::{RedbStore, Store, Txn};

        let dir = tempfile::tempdir().unwrap();
        let redb = Arc::new(RedbStore::open(dir.path()).unwrap());
        let store: Arc<dyn Store> = redb.clone();
        let agent = Arc::new(
            Agent::new(store.clone(), dir.path().join("netns"), 1500).with_host(
                crate::HostIdentity {
                    id: "h1".into(),
                    address: Some("198.51.100.11".parse().unwrap()),
                    mtu: 1500,
                },
                true,
            ),
        );
        let put = |k: &str, v: Vec<u8>| Txn::new().put(k.to_string(), v);
        store
            .txn(
                put("networks/ov", json(&overlay("ov")))
                    .put("hosts/h1", json(&host("h1", 11)))
                    .put("host-addresses/h1", json(&host("h1", 11)))
                    .put("hosts/h2", json(&host("h2", 12)))
                    .put("host-addresses/h2", json(&host("h2", 12)))
                    .put(
                        "endpoints/a",
                        json(&endpoint("a", "ov", "h1", [10, 188, 0, 2])),
                    )
                    .put(
                        "endpoints/b",
                        json(&endpoint("b", "ov", "h2", [10, 188, 0, 66])),
                    ),
            )
            .await
            .unwrap();
        let kernel = Arc::new(FakeKernel::default());
        kernel
            .entries
            .lock()
            .unwrap()
            .insert("ov".into(), BTreeSet::new());
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(ClusterReconciler::new(agent, kernel.clone()).run(rx));

        let vteps = || -> Vec<String> { entries(&kernel.entries.lock().unwrap()["ov"]) };
        let eventually = |want: Vec<&str>| {
            let want: Vec<String> = want.into_iter().map(String::from).collect();
            let vteps = &vteps;
            async move {
                for _ in 0..200 {
                    if vteps() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("entries {:?}, want {want:?}", vteps());
            }
        };
        eventually(vec!["10.188.0.66@198.51.100.12"]).await;

        // h2's lease lapses, then one more endpoint of it shows up: the sync that follows
        // keeps the old entry and adds the new one.
        store.txn(Txn::new().delete("hosts/h2")).await.unwrap();
        store
            .txn(put(
                "endpoints/c",
                json(&endpoint("c", "ov", "h2", [10, 188, 0, 67])),
            ))
            .await
            .unwrap();
        eventually(vec![
            "10.188.0.66@198.51.100.12",
            "10.188.0.67@198.51.100.12",
        ])
        .await;

        // The watch history is gone (as after an etcd compaction): the reconciler lists again
        // and picks up what changed meanwhile, still keeping the lapsed host's entries.
        redb.compact_history();
        store.txn(Txn::new().delete("endpoints/c")).await.unwrap();
        eventually(vec!["10.188.0.66@198.51.100.12"]).await;

        // Another host registers h2's address: the entry goes; and comes back with it gone.
        store
            .txn(put("hosts/h3", json(&host("h3", 12))))
            .await
            .unwrap();
        eventually(vec![]).await;
        store.txn(Txn::new().delete("hosts/h3")).await.unwrap();
        eventually(vec!["10.188.0.66@198.51.100.12"]).await;

        // h2 is freed: its address record goes, and the entry with it.
        store
            .txn(Txn::new().delete("host-addresses/h2"))
            .await
            .unwrap();
        eventually(vec![]).await;

        // h2 comes back with a new address: the entries point there.
        store
            .txn(
                put("hosts/h2", json(&host("h2", 50)))
                    .put("host-addresses/h2", json(&host("h2", 50))),
            )
            .await
            .unwrap();
        eventually(vec!["10.188.0.66@198.51.100.50"]).await;
        task.abort();
    }

    fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }
}
