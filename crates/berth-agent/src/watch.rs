//! Noticing, while the daemon runs, that berth's links vanished: a bridge deleted by hand, a
//! veth gone with the namespace that held its other end (a container runtime that removed a
//! container without telling its CNI plugin). The start-up repair pass covers what happened
//! while the daemon was down; this covers what happens while it runs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_dataplane::{LinkEvent, LinkWatch, Netlink, netns};
use berth_model::{Driver, Endpoint, Network, is_berth_link_name, vxlan_name};

use crate::endpoints::{default_gateways, endpoint_spec};
use crate::networks::bridge_spec;
use crate::{Agent, Result, kernel, keys};

/// Deletions come in bursts (a namespace with several interfaces, a reap batch): one pass for
/// each burst.
const SETTLE: Duration = Duration::from_millis(100);

/// What a running daemon does about one endpoint whose veth is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vanished {
    /// Its namespace is gone too: the container is gone, the endpoint is released.
    Released,
    /// Its namespace is still there: the veth was made again.
    Repaired,
    /// Docker's endpoint: the engine owns its sandbox side and tells berth when it goes.
    LeftToRuntime,
}

impl Agent {
    /// Watches the daemon's namespace for deleted links and repairs or releases what they
    /// belonged to, until the daemon stops.
    pub async fn run_link_watch(self: Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // A thread of its own: it blocks in recv for the daemon's lifetime.
        let spawned = std::thread::Builder::new()
            .name("berth-link-watch".into())
            .spawn(move || {
                let mut watch = match LinkWatch::open() {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    let events = watch.wait();
                    let failed = events.is_err();
                    if tx.send(events).is_err() || failed {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot watch links; vanished links are repaired at the next start only");
            return;
        }
        while let Some(events) = rx.recv().await {
            let mut gone = HashSet::new();
            let mut overrun = false;
            let mut absorb = |events: berth_dataplane::Result<Vec<LinkEvent>>| match events {
                Ok(events) => {
                    for e in events {
                        match e {
                            LinkEvent::Gone(name) if is_berth_link_name(&name) => {
                                gone.insert(name);
                            }
                            LinkEvent::Gone(_) => {}
                            LinkEvent::Overrun => overrun = true,
                        }
                    }
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "watching links failed; vanished links are repaired at the next start only");
                    false
                }
            };
            if !absorb(events) {
                return;
            }
            tokio::time::sleep(SETTLE).await;
            while let Ok(more) = rx.try_recv() {
                if !absorb(more) {
                    return;
                }
            }
            if gone.is_empty() && !overrun {
                continue;
            }
            if let Err(e) = self.repair_vanished(&gone, overrun).await {
                tracing::error!(error = %e, "repairing vanished links failed");
            }
        }
    }

    /// Re-creates deleted bridges and handles endpoints whose veth is gone. `gone` names the
    /// deleted berth links; with `everything`, all are checked (events were lost).
    async fn repair_vanished(&self, gone: &HashSet<String>, everything: bool) -> Result<()> {
        // Most deletions are berth's own (detached endpoints being reaped, whose records are
        // gone already): those need no lock and no work.
        let concerned = |networks: &[Network], endpoints: &[Endpoint]| {
            everything
                || networks.iter().any(|n| {
                    gone.contains(&n.bridge)
                        || (n.driver == Driver::Overlay && gone.contains(&vxlan_name(&n.id)))
                })
                || endpoints.iter().any(|e| gone.contains(&e.host_ifname))
        };
        let endpoints = self.local_endpoints().await?;
        if !concerned(
            &self.networks_here(self.networks().await?, &endpoints),
            &endpoints,
        ) {
            return Ok(());
        }
        // Under the write lock, so no attach or detach is half done, and from a fresh look.
        let _topology = self.topology.write().await;
        let endpoints = self.local_endpoints().await?;
        let networks = self.networks_here(self.networks().await?, &endpoints);
        let mut links = kernel(|| Netlink::open()?.links()).await?;
        for net in &networks {
            let vxlan_missing = net.driver == Driver::Overlay
                && !links.iter().any(|l| l.name == vxlan_name(&net.id));
            if links.iter().any(|l| l.name == net.bridge) && !vxlan_missing {
                continue;
            }
            match net.driver {
                Driver::Bridge => {
                    let spec = bridge_spec(net);
                    kernel(move || berth_dataplane::ensure_bridge(&mut Netlink::open()?, &spec))
                        .await?;
                }
                Driver::Overlay => {
                    self.realized.lock().expect("realized lock").remove(&net.id);
                    self.ensure_overlay(net).await?;
                }
            }
            tracing::warn!(network = %net.name, bridge = %net.bridge, "bridge was deleted; re-created");
        }
        if networks.iter().any(|n| gone.contains(&n.bridge)) {
            self.sync_firewall().await?;
            links = kernel(|| Netlink::open()?.links()).await?;
        }
        for ep in &endpoints {
            let Some(net) = networks.iter().find(|n| n.name == ep.network) else {
                continue;
            };
            let Some(bridge) = links.iter().find(|l| l.name == net.bridge) else {
                continue;
            };
            let host_link = links.iter().find(|l| l.name == ep.host_ifname).cloned();
            let on_bridge = host_link
                .as_ref()
                .is_some_and(|l| l.controller == Some(bridge.index) && l.up);
            if on_bridge {
                continue;
            }
            match self.handle_vanished(ep, net, bridge.index, host_link).await {
                Ok(Vanished::Released) => tracing::warn!(
                    endpoint = %ep.id, network = %ep.network, netns = %ep.netns.path,
                    "veth and namespace are gone; endpoint released"
                ),
                Ok(Vanished::Repaired) => tracing::warn!(
                    endpoint = %ep.id, network = %ep.network, netns = %ep.netns.path,
                    "veth was deleted or left its bridge; repaired"
                ),
                Ok(Vanished::LeftToRuntime) => {}
                Err(e) => {
                    tracing::error!(endpoint = %ep.id, error = %e, "cannot repair the endpoint")
                }
            }
        }
        Ok(())
    }

    async fn handle_vanished(
        &self,
        ep: &Endpoint,
        net: &Network,
        bridge_index: u32,
        host_link: Option<berth_dataplane::Link>,
    ) -> Result<Vanished> {
        let mut spec = endpoint_spec(ep, net, bridge_index);
        if let Some(l) = host_link {
            // The veth is there (so is its namespace): the bridge was re-created, or the port
            // taken off it or down. Put it back.
            let (idx, mtu) = (l.index, spec.mtu);
            kernel(move || Netlink::open()?.set_link(idx, mtu, Some(bridge_index))).await?;
            return Ok(Vanished::Repaired);
        }
        if ep.runtime_configured {
            return Ok(Vanished::LeftToRuntime);
        }
        if netns::id_at(Path::new(&ep.netns.path)).as_deref() != Some(ep.netns.id.as_str()) {
            self.remove_endpoint(ep).await?;
            return Ok(Vanished::Released);
        }
        let holders = self
            .default_route_holders(&keys::default_routes_prefix(&ep.netns.id))
            .await?;
        spec.gateways = default_gateways(ep, net, &holders);
        let path = ep.netns.path.clone();
        kernel(move || {
            let ns = netns::open(Path::new(&path))?;
            berth_dataplane::attach_endpoint(&mut Netlink::open()?, &ns, &spec)
        })
        .await?;
        Ok(Vanished::Repaired)
    }

    /// Whether the endpoint still exists in the kernel: its host veth is there. A veth goes
    /// with the namespace that holds its other end, so a missing veth means a dead endpoint
    /// even when a new namespace now has the dead one's identity (the kernel reuses inodes).
    pub(crate) async fn endpoint_alive(&self, ep: &Endpoint) -> Result<bool> {
        let name = ep.host_ifname.clone();
        Ok(kernel(move || Netlink::open()?.link_by_name(&name))
            .await?
            .is_some())
    }
}
