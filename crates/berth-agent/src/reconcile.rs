//! The start-up repair pass: make the kernel match the store, and the store match what still
//! exists. After it: every network has its bridge, every endpoint whose namespace still exists
//! has its veth, addresses and routes, endpoints whose namespace is gone are removed and their
//! addresses released, and no link berth marked as its own is left that the store does not
//! know.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use berth_dataplane::{LinkRef, Netlink, Repair, netns};
use berth_ipam::Pool;
use berth_model::{Driver, Endpoint, Network, Sandbox, is_berth_link_name, vxlan_name};
use berth_store::{Compare, Txn};
use serde::Serialize;

use crate::endpoints::{Held, default_gateways, endpoint_spec, install_default_route, next_holder};
use crate::networks::bridge_spec;
use crate::{Agent, Result, kernel, keys, remove_link};

/// What the repair pass found and did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    pub networks: usize,
    pub endpoints: usize,
    pub endpoints_repaired: usize,
    pub endpoints_removed: usize,
    pub sandboxes_removed: usize,
    pub links_removed: usize,
    /// Links with a berth name that the store does not know and that carry no berth mark: an
    /// operator's, or a stray of a berth from before links were marked. Left alone.
    pub unmarked_links_left: usize,
    pub stale_records_removed: usize,
    /// Namespaces whose default route (of a family) had no holder and got one.
    pub default_routes_assigned: usize,
}

impl std::fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernel reconciled with the store: {} networks, {} endpoints ({} repaired, {} removed), \
             {} sandboxes removed, {} stray links removed ({} unmarked left), \
             {} stale records removed, {} default routes assigned",
            self.networks,
            self.endpoints,
            self.endpoints_repaired,
            self.endpoints_removed,
            self.sandboxes_removed,
            self.links_removed,
            self.unmarked_links_left,
            self.stale_records_removed,
            self.default_routes_assigned
        )
    }
}

impl Agent {
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let _topology = self.topology.write().await;
        let mut report = ReconcileReport::default();

        // Networks and their bridges: this host's bridge networks, and the overlay networks
        // it has endpoints on (with their VXLAN devices).
        let all_networks: Vec<Network> = self.load_all(keys::NETWORKS).await?;
        let all_endpoints: Vec<Endpoint> = self.load_all(keys::ENDPOINTS).await?;
        let (endpoints, remote): (Vec<Endpoint>, Vec<Endpoint>) = all_endpoints
            .into_iter()
            .partition(|e| e.is_on(&self.host.id));
        let networks = self.networks_here(all_networks.clone(), &endpoints);
        let mut bridge_index = HashMap::new();
        for net in &networks {
            let idx = match net.driver {
                Driver::Bridge => {
                    let spec = bridge_spec(net);
                    kernel(move || berth_dataplane::ensure_bridge(&mut Netlink::open()?, &spec))
                        .await?
                }
                Driver::Overlay => match self.ensure_overlay(net).await {
                    Ok(idx) => idx,
                    Err(e) => {
                        tracing::error!(network = %net.name, error = %e, "cannot realize the overlay network");
                        continue;
                    }
                },
            };
            bridge_index.insert(net.name.clone(), idx);
        }
        report.networks = networks.len();
        let by_name: HashMap<_, _> = networks.iter().map(|n| (n.name.clone(), n)).collect();
        // Bridges and ports made by a berth before services: their traffic must meet
        // netfilter (same-bridge service connections), and a backend must be able to reach
        // itself through its service (hairpin). Setting both again changes nothing.
        let bridges: Vec<String> = by_name
            .values()
            .filter(|n| bridge_index.contains_key(&n.name))
            .map(|n| n.bridge.clone())
            .collect();
        let ports: Vec<String> = endpoints.iter().map(|e| e.host_ifname.clone()).collect();
        kernel(move || {
            let mut nl = Netlink::open()?;
            for b in &bridges {
                if let Err(e) = nl.set_bridge_netfilter(b) {
                    tracing::warn!(bridge = %b, error = %e, "cannot make the bridge's traffic pass netfilter");
                }
            }
            for p in &ports {
                // A port that is gone is repaired (with hairpin) below.
                let _ = nl.set_hairpin(p);
            }
            Ok(())
        })
        .await?;

        // Sandboxes whose namespace is gone (e.g. after a reboot) are gone.
        for sb in self.load_all::<Sandbox>(keys::SANDBOXES).await? {
            if sb.removing {
                // A removal the stop cut short. Should it fail again, the sandbox stays marked
                // (attaches refused) for `sandbox rm` or the next start; the daemon starts.
                match self.finish_sandbox_removal(&sb).await {
                    Ok(()) => report.sandboxes_removed += 1,
                    Err(e) => {
                        tracing::error!(sandbox = %sb.name, error = %e, "cannot finish removing the sandbox")
                    }
                }
                continue;
            }
            if netns::id_at(Path::new(&sb.path)).is_none() {
                let path = sb.path.clone();
                kernel(move || netns::remove(Path::new(&path))).await?;
                self.commit(Txn::new().delete(keys::sandbox(&sb.name)))
                    .await?;
                report.sandboxes_removed += 1;
                tracing::warn!(sandbox = %sb.name, "sandbox namespace is gone; record removed");
            }
        }

        // Endpoints detached before the stop: finish deleting their veths, release addresses.
        self.reap().await?;

        // Endpoints: repair the living, remove the dead.
        let host_links = kernel(|| Netlink::open()?.links()).await?;
        let route_holders = self.default_route_holders(keys::DEFAULT_ROUTES).await?;
        let mut live = Vec::new();
        for ep in endpoints {
            let net = by_name.get(&ep.network);
            // Docker tells us when its endpoints go (DeleteEndpoint); it owns their namespace.
            let alive = ep.runtime_configured
                || netns::id_at(Path::new(&ep.netns.path)).as_deref() == Some(&ep.netns.id);
            // A CNI container's veth goes only with its namespace: without its veth the
            // container is gone, even if a new namespace now has its identity (the kernel
            // reuses inode numbers) and its path (a runtime's /run/netns/NAME or a pid's).
            let container_gone =
                ep.container_id.is_some() && !host_links.iter().any(|l| l.name == ep.host_ifname);
            let Some(net) =
                net.filter(|n| alive && !container_gone && bridge_index.contains_key(&n.name))
            else {
                remove_link(ep.host_ifname.clone()).await?;
                self.commit(self.endpoint_records(&ep, Txn::new(), false, Held::PortsAndAddresses))
                    .await?;
                report.endpoints_removed += 1;
                let why = if container_gone {
                    "veth gone with its container"
                } else {
                    "namespace gone"
                };
                tracing::warn!(endpoint = %ep.id, netns = %ep.netns.path, "{why}; endpoint removed");
                continue;
            };
            let mut spec = endpoint_spec(&ep, net, bridge_index[&ep.network]);
            spec.gateways = default_gateways(&ep, net, &route_holders);
            let host_link = host_links
                .iter()
                .find(|l| l.name == ep.host_ifname)
                .cloned();
            if ep.runtime_configured {
                // Only the host side is ours to repair; the runtime made the sandbox side.
                match host_link {
                    Some(l) if l.controller != Some(spec.bridge_index) || !l.up => {
                        let (idx, mtu, br) = (l.index, spec.mtu, spec.bridge_index);
                        kernel(move || Netlink::open()?.set_link(idx, mtu, Some(br))).await?;
                        report.endpoints_repaired += 1;
                    }
                    Some(_) => {}
                    None => tracing::error!(
                        endpoint = %ep.id,
                        "runtime-configured endpoint lost its veth; the runtime must reconnect it"
                    ),
                }
                live.push(ep);
                continue;
            }
            let path = ep.netns.path.clone();
            let repair = kernel(move || {
                let ns = netns::open(Path::new(&path))?;
                berth_dataplane::ensure_endpoint(
                    &mut Netlink::open()?,
                    host_link.as_ref(),
                    &ns,
                    &spec,
                )
            })
            .await;
            match repair {
                Ok(Repair::Nothing) => {}
                Ok(r) => {
                    report.endpoints_repaired += 1;
                    let what = if r == Repair::Recreated {
                        "veth re-created"
                    } else {
                        "reconfigured"
                    };
                    tracing::info!(endpoint = %ep.id, netns = %ep.netns.path, "endpoint repaired: {what}");
                }
                Err(e) => {
                    tracing::error!(endpoint = %ep.id, error = %e, "endpoint could not be repaired")
                }
            }
            live.push(ep);
        }
        report.endpoints = live.len();

        // Links berth made (they carry its mark) that the store does not know: strays of a
        // crash or of a removal cut short. A link that only has a berth-like name is left, as
        // nothing proves it berth's: an operator's `berth-test`, or a stray of a berth from
        // before links were marked. Deleting an operator's link breaks what uses it, silently;
        // leaving a stray veth costs an idle interface, and the log names it.
        let vxlans: Vec<String> = networks
            .iter()
            .filter(|n| n.driver == Driver::Overlay)
            .map(|n| vxlan_name(&n.id))
            .collect();
        let known: HashSet<&str> = networks
            .iter()
            .map(|n| n.bridge.as_str())
            .chain(vxlans.iter().map(String::as_str))
            .chain(live.iter().map(|e| e.host_ifname.as_str()))
            .collect();
        let mut unmarked_known = Vec::new();
        for link in host_links {
            let kind_ours = matches!(link.kind.as_deref(), Some("bridge" | "veth" | "vxlan"));
            if !kind_ours || !is_berth_link_name(&link.name) {
                continue;
            }
            if known.contains(link.name.as_str()) {
                if !link.marked() {
                    unmarked_known.push(link.index);
                }
            } else if link.marked() {
                remove_link(link.name.clone()).await?;
                report.links_removed += 1;
                tracing::warn!(link = %link.name, "stray berth link removed: the store does not know it");
            } else {
                report.unmarked_links_left += 1;
                tracing::warn!(
                    link = %link.name,
                    "link with a berth name left alone: the store does not know it and it has no berth mark \
                     (made by hand, or by a berth before links were marked); `ip link del {}` if nothing uses it",
                    link.name
                );
            }
        }
        // Links the store knows that a berth before marks made get the mark now, so that they
        // are recognised should they ever be left behind.
        if !unmarked_known.is_empty() {
            let marks = unmarked_known
                .into_iter()
                .map(|i| Netlink::mark_msg(LinkRef::Index(i)))
                .collect();
            if let Err(e) = kernel(move || Netlink::open()?.batch(marks)).await {
                tracing::warn!(error = %e, "cannot mark berth's links as berth's");
            }
        }

        // Index records that point at nothing (defensive: they are written in the same
        // transactions as their endpoint, so this finds only damage from outside). On a shared
        // store only this host's bridge networks' addresses are looked at: other hosts
        // allocate in overlay networks while this pass runs, and hold addresses in records
        // this host cannot see (their `releasing/`).
        let live_ids: HashSet<&str> = live.iter().chain(&remote).map(|e| e.id.as_str()).collect();
        let mine = |key: &str| {
            let network = |n: &Network| key.starts_with(&keys::ipam_prefix(&n.name));
            if !self.shared {
                return true;
            }
            networks
                .iter()
                .any(|n| n.driver == Driver::Bridge && network(n))
        };
        let mut stale = Vec::new();
        for prefix in [
            keys::IPAM,
            keys::ATTACHMENTS,
            keys::MEMBERS,
            keys::CONTAINERS,
            keys::DEFAULT_ROUTES,
        ] {
            for kv in self.store.list(prefix).await?.items {
                let is_ipam = prefix == keys::IPAM;
                if is_ipam && !mine(&kv.key) {
                    continue;
                }
                let owner = String::from_utf8_lossy(&kv.value);
                let network_known = !is_ipam
                    || all_networks
                        .iter()
                        .any(|n| kv.key.starts_with(&keys::ipam_prefix(&n.name)));
                let reserved =
                    owner == keys::GATEWAY_OWNER || owner.starts_with(keys::DOCKER_OWNER_PREFIX);
                if (!reserved && !live_ids.contains(owner.as_ref())) || !network_known {
                    stale.push(kv);
                }
            }
        }
        // Each only as it was read, in transactions etcd accepts.
        for batch in stale.chunks(crate::MAX_TXN_OPS) {
            let mut txn = Txn::new();
            for kv in batch {
                txn = txn
                    .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                    .delete(kv.key.clone());
            }
            match self.commit(txn).await? {
                berth_store::TxnOutcome::Committed { .. } => {
                    report.stale_records_removed += batch.len()
                }
                berth_store::TxnOutcome::CompareFailed(c) => {
                    tracing::debug!(
                        ?c,
                        "stale records changed meanwhile; left for the next start"
                    )
                }
            }
        }

        report.default_routes_assigned = self.assign_default_routes(&live, &by_name).await?;

        // Rebuild the address pools from what the store now holds.
        let mut pools = HashMap::new();
        for net in &all_networks {
            let mut ps: Vec<Pool> = match net.driver {
                Driver::Bridge if net.is_usable_on(&self.host.id) => {
                    net.subnets.iter().map(|s| Pool::new(s.cidr)).collect()
                }
                Driver::Bridge => continue,
                Driver::Overlay => self
                    .blocks(&net.name)
                    .await?
                    .into_iter()
                    .filter(|b| b.host == self.host.id)
                    .filter_map(|b| {
                        let subnet = net.subnet_for(b.cidr.addr())?;
                        Some(crate::ipam::block_pool(
                            b.cidr,
                            subnet.cidr,
                            &[subnet.gateway],
                        ))
                    })
                    .collect(),
            };
            for kv in self.store.list(&keys::ipam_prefix(&net.name)).await?.items {
                let ip = keys::ipam_address(&kv.key);
                if let Some(ip) = ip {
                    for p in ps.iter_mut().filter(|p| p.subnet().contains(&ip)) {
                        let _ = p.take(ip);
                    }
                }
            }
            pools.insert(net.name.clone(), ps);
        }
        *self.pools.lock().expect("pools lock") = pools;
        self.recount_docker_pools().await?;
        Ok(report)
    }
}

impl Agent {
    /// Gives every namespace's default route of a family a holder where it has none: the
    /// endpoint attached first (its membership record's revision) among those with an address
    /// of that family. Covers a holder that died while the daemon was down, and records of
    /// versions that let every attach take the default route. Returns how many it assigned.
    async fn assign_default_routes(
        &self,
        live: &[Endpoint],
        networks: &HashMap<String, &Network>,
    ) -> Result<usize> {
        let holders = self.default_route_holders(keys::DEFAULT_ROUTES).await?;
        let mut by_netns: HashMap<&str, Vec<Endpoint>> = HashMap::new();
        for ep in live {
            by_netns
                .entry(ep.netns.id.as_str())
                .or_default()
                .push(ep.clone());
        }
        let mut assigned = 0;
        for (netns_id, eps) in by_netns {
            let eps = self.in_attach_order(eps).await?;
            for ipv4 in [true, false] {
                let key = keys::default_route(netns_id, ipv4);
                if holders.contains_key(&key) {
                    continue;
                }
                let Some((ep, gateway)) =
                    next_holder(&eps, ipv4, |name| networks.get(name).copied())
                else {
                    continue;
                };
                let txn = Txn::new()
                    .when(berth_store::Compare::Absent(key.clone()))
                    .put(key, ep.id.clone());
                self.commit(txn).await?;
                if let Err(e) = install_default_route(ep, gateway).await {
                    tracing::warn!(endpoint = %ep.id, error = %e, "cannot set the default route");
                }
                assigned += 1;
            }
        }
        Ok(assigned)
    }
}
