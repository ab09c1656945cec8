//! Masquerade, isolation and published ports: the store's networks and endpoints compiled into
//! berth's nftables table (see `berth_dataplane::nftables`), and kept there.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use berth_dataplane::nftables::{self, Forward, NetworkRules};
use berth_dataplane::sysctl;
use berth_model::{Endpoint, Network, PortMapping};

use crate::{Agent, AgentError, Result, kernel, keys};

/// How often the guard checks that berth's rules are still in the kernel.
const GUARD_INTERVAL: Duration = Duration::from_secs(1);

/// The forwards that publish an endpoint's ports: a port on one host address goes to the
/// endpoint's address of that family, a port on every address to each of its addresses.
pub(crate) fn forwards_of(ep: &Endpoint) -> Vec<Forward> {
    let mut out = Vec::new();
    for m in &ep.ports {
        for ip in &ep.ips {
            let target = ip.addr();
            if m.host_ip.is_none_or(|h| h.is_ipv4() == target.is_ipv4()) {
                out.push(Forward {
                    mapping: *m,
                    target,
                });
            }
        }
    }
    out
}

impl Agent {
    /// Checks requested published ports against the network: normalised, each host port once,
    /// and something to forward to (an address of the host address's family).
    pub(crate) fn check_ports(
        &self,
        net: &Network,
        ports: &[PortMapping],
    ) -> Result<Vec<PortMapping>> {
        if ports.is_empty() {
            return Ok(Vec::new());
        }
        if net.internal {
            return Err(AgentError::Invalid(format!(
                "network {:?} is internal: it has no way in or out, so ports cannot be published",
                net.name
            )));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(ports.len());
        for m in ports {
            let m = m.normalized();
            m.validate()?;
            if let Some(ip) = m.host_ip {
                let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                if net
                    .subnets
                    .iter()
                    .all(|s| s.cidr.addr().is_ipv4() != ip.is_ipv4())
                {
                    return Err(AgentError::Invalid(format!(
                        "cannot publish {m}: network {:?} has no {family} subnet",
                        net.name
                    )));
                }
            }
            if !seen.insert(keys::port(&m)) {
                return Err(AgentError::Invalid(format!(
                    "host port {}/{} is published twice",
                    m.host_port, m.protocol
                )));
            }
            out.push(m);
        }
        Ok(out)
    }

    /// Checks that no other endpoint publishes these host ports on an overlapping host address
    /// (every address overlaps every one), and returns the guard that keeps it so: the caller
    /// holds it until the commit that records the new ports. `None` when there are no ports.
    pub(crate) async fn reserve_ports(
        &self,
        ports: &[PortMapping],
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>> {
        if ports.is_empty() {
            return Ok(None);
        }
        let held = self.publishing.lock().await;
        for m in ports {
            let prefix = keys::port_prefix(m.protocol, m.host_port);
            let mine = keys::port(m);
            for kv in self.store.list(&prefix).await?.items {
                let theirs = &kv.key[prefix.len()..];
                if m.host_ip.is_none() || theirs == keys::ALL_ADDRESSES || kv.key == mine {
                    let on = if theirs == keys::ALL_ADDRESSES {
                        "every address".to_string()
                    } else {
                        theirs.to_string()
                    };
                    return Err(AgentError::Conflict(format!(
                        "host port {}/{} is already published on {on} by endpoint {}",
                        m.host_port,
                        m.protocol,
                        String::from_utf8_lossy(&kv.value)
                    )));
                }
            }
        }
        Ok(Some(held))
    }

    /// Installs an endpoint's published ports. If the elements cannot be added (berth's
    /// table was removed a moment ago) the whole table is rebuilt from the store, which
    /// already holds this endpoint.
    pub(crate) async fn publish(&self, ep: &Endpoint) -> Result<()> {
        let forwards = forwards_of(ep);
        if forwards.is_empty() {
            return Ok(());
        }
        let _fw = self.firewall.lock().await;
        match kernel(move || nftables::add_forwards(&forwards)).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(endpoint = %ep.id, error = %e, "adding published ports failed; rebuilding berth's nftables table");
                self.install_firewall().await
            }
        }
    }

    /// Removes published ports (those already gone are fine) in one transaction.
    pub(crate) async fn unpublish(&self, forwards: Vec<Forward>) {
        if forwards.is_empty() {
            return;
        }
        let _fw = self.firewall.lock().await;
        if let Err(e) = kernel(move || nftables::delete_forwards(&forwards)).await {
            tracing::warn!(error = %e, "removing published ports failed");
        }
    }

    /// Rebuilds berth's whole table from the store, in one transaction.
    pub async fn sync_firewall(&self) -> Result<()> {
        let _fw = self.firewall.lock().await;
        self.install_firewall().await
    }

    /// [`Agent::sync_firewall`] with the firewall lock held.
    async fn install_firewall(&self) -> Result<()> {
        let networks = self.networks().await?;
        let endpoints: Vec<Endpoint> = self.load_all(keys::ENDPOINTS).await?;
        let forwards: Vec<Forward> = endpoints.iter().flat_map(forwards_of).collect();
        let rules: Vec<NetworkRules> = networks
            .iter()
            .map(|n| NetworkRules {
                bridge: n.bridge.clone(),
                internal: n.internal,
                subnets: n.subnets.iter().map(|s| s.cidr).collect(),
                dns: self.dns_addresses(n),
            })
            .collect();
        let ipv6 = networks.iter().any(|n| n.subnet_v6().is_some());
        kernel(move || {
            sysctl::enable_forwarding(ipv6)?;
            for n in &rules {
                sysctl::enable_route_localnet(&n.bridge)?;
            }
            nftables::install(&rules, &forwards)
        })
        .await
    }

    /// Puts berth's rules back whenever someone removes them (`nft flush ruleset`, a firewall
    /// reload), until the daemon stops.
    pub async fn run_firewall_guard(self: Arc<Self>) {
        let mut tick = tokio::time::interval(GUARD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match kernel(nftables::intact).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("berth's nftables rules were removed; restoring them");
                    if let Err(e) = self.sync_firewall().await {
                        tracing::error!(error = %e, "restoring berth's nftables rules failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "checking berth's nftables rules failed"),
            }
        }
    }
}
