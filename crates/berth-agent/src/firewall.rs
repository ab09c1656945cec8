//! Masquerade, isolation and published ports: the store's networks and endpoints compiled into
//! berth's nftables table (see `berth_dataplane::nftables`), and kept there.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use berth_dataplane::nftables::{self, Forward, NetworkRules, ServiceRules};
use berth_dataplane::sockets::{self, Listener};
use berth_dataplane::sysctl;
use berth_model::{Endpoint, Network, PortMapping, Protocol};

use crate::{Agent, AgentError, Result, kernel, keys};

/// How often the guard checks that berth's rules are still in the kernel.
const GUARD_INTERVAL: Duration = Duration::from_secs(1);

/// How long the guard gives a change of berth's own to reach the kernel before it takes a
/// difference for damage.
const SETTLE: Duration = Duration::from_millis(200);

/// Published ports per endpoint on a shared store (see [`Agent::check_ports`]).
const MAX_SHARED_PORTS: usize = 64;

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
        // Each host port is a record in the endpoint's one transaction, and etcd takes at
        // most 128 operations in one.
        if self.shared && ports.len() > MAX_SHARED_PORTS {
            return Err(AgentError::Invalid(format!(
                "{} published ports: at most {MAX_SHARED_PORTS} per endpoint on a shared store (etcd)",
                ports.len()
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
            // A service's published port takes it on every host's addresses.
            if berth_model::NODE_PORTS.contains(&m.host_port)
                && let Some(kv) = self
                    .store
                    .get(&keys::node_port(m.protocol, m.host_port))
                    .await?
            {
                return Err(AgentError::Conflict(format!(
                    "host port {}/{} is published by service {:?} on every host",
                    m.host_port,
                    m.protocol,
                    String::from_utf8_lossy(&kv.value)
                )));
            }
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

    /// Refuses host ports that a socket of the host already serves: the published port would
    /// take their traffic from the process silently, where Docker's proxy fails to bind them
    /// ("address already in use"). A socket on every address (`0.0.0.0`, `::`) meets every
    /// published address of its family, one on an address meets that address and a port
    /// published on every address. berth's own DNS servers on the network gateways do not
    /// count: their UDP is never NATed (berth's table leaves it untracked), and a container
    /// publishing DNS (port 53) on every address is a use to keep. `how_to_force` is what
    /// the front-end's user gives to publish the port anyway, if it has a way.
    pub(crate) async fn refuse_host_listeners(
        &self,
        ports: &[PortMapping],
        how_to_force: Option<&str>,
    ) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        let ours: HashSet<std::net::SocketAddr> = self
            .networks()
            .await?
            .iter()
            .flat_map(|n| self.dns_addresses(n))
            .collect();
        let wanted: HashSet<(Protocol, u16)> =
            ports.iter().map(|m| (m.protocol, m.host_port)).collect();
        let listeners: Vec<Listener> = kernel(sockets::listeners)
            .await?
            .into_iter()
            .filter(|l| wanted.contains(&(l.protocol, l.port)))
            .filter(|l| !ours.contains(&std::net::SocketAddr::new(l.address, l.port)))
            .collect();
        let taken = ports.iter().find_map(|m| {
            listeners
                .iter()
                .find(|l| l.protocol == m.protocol && l.port == m.host_port && l.serves(m.host_ip))
                .map(|l| (m, l.clone()))
        });
        let Some((m, l)) = taken else {
            return Ok(());
        };
        let inode = l.inode;
        let by = match kernel(move || Ok(sockets::holder(inode))).await? {
            Some((pid, comm)) => format!(" ({comm}, pid {pid})"),
            None => String::new(),
        };
        let on = m
            .host_ip
            .map_or_else(|| "every address".to_string(), |ip| ip.to_string());
        let force = how_to_force
            .map(|f| format!(", or give {f} to take it from the host process"))
            .unwrap_or_default();
        Err(AgentError::Conflict(format!(
            "cannot publish host port {}/{} on {on}: address already in use on the host by {}{by}; publish another host port{force}",
            m.host_port,
            m.protocol,
            l.describe()
        )))
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

    /// Brings the elements of berth's table (networks, published ports) in line with the
    /// store, in one transaction: when a network comes or goes here. The rules stay; a table
    /// found missing or damaged is rebuilt whole.
    pub async fn sync_firewall(&self) -> Result<()> {
        let _fw = self.firewall.lock().await;
        self.write_firewall(false).await
    }

    /// Rebuilds berth's whole table from the store, rules included, in one transaction: at
    /// start and when something else changed it.
    pub async fn restore_firewall(&self) -> Result<()> {
        let _fw = self.firewall.lock().await;
        self.write_firewall(true).await
    }

    /// [`Agent::restore_firewall`] with the firewall lock held.
    async fn install_firewall(&self) -> Result<()> {
        self.write_firewall(true).await
    }

    /// The elements only (`whole`: the rules too) of berth's table, with the sysctls a new
    /// bridge needs. The firewall lock is held.
    async fn write_firewall(&self, whole: bool) -> Result<()> {
        let (rules, forwards) = self.desired_firewall().await?;
        let services = self.service_rules();
        let ipv6 = rules
            .iter()
            .any(|n| n.subnets.iter().any(|s| s.addr().is_ipv6()));
        kernel(move || {
            sysctl::enable_forwarding(ipv6)?;
            for n in &rules {
                match sysctl::enable_route_localnet(&n.bridge) {
                    // An overlay network whose first endpoint here is being attached: its
                    // bridge is not made yet, and whoever makes it syncs the table again.
                    Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT as i32) => {}
                    other => other?,
                }
            }
            if !whole {
                match nftables::set_elements(&rules, &forwards, &services) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::info!(error = %e, "berth's table is not whole; rebuilding it")
                    }
                }
            }
            nftables::install(&rules, &forwards, &services)
        })
        .await
    }

    /// The service ranges, and the address connections through a published service port
    /// are source-NATed to: this host's own, where other hosts' backends reply to.
    fn service_rules(&self) -> ServiceRules {
        let address = self.host.address;
        ServiceRules {
            ranges: self.service_cidrs().to_vec(),
            nodeport_source4: match address {
                Some(std::net::IpAddr::V4(a)) => Some(a),
                _ => None,
            },
            nodeport_source6: match address {
                Some(std::net::IpAddr::V6(a)) => Some(a),
                _ => None,
            },
        }
    }

    /// What berth's table should hold: every network's and every published port's elements.
    async fn desired_firewall(&self) -> Result<(Vec<NetworkRules>, Vec<Forward>)> {
        let endpoints = self.local_endpoints().await?;
        let networks = self.networks_here(self.networks().await?, &endpoints);
        let forwards = endpoints.iter().flat_map(forwards_of).collect();
        let rules = networks
            .iter()
            .map(|n| NetworkRules {
                bridge: n.bridge.clone(),
                internal: n.internal,
                subnets: n.subnets.iter().map(|s| s.cidr).collect(),
                dns: self.dns_addresses(n),
            })
            .collect();
        Ok((rules, forwards))
    }

    /// nftables' generation when it was read, and how berth's table differs from the store
    /// (empty: not at all). Under the firewall lock, so that no change of berth's own is
    /// halfway through its kernel part.
    async fn firewall_damage(&self) -> Result<(u32, Vec<String>)> {
        let _fw = self.firewall.lock().await;
        // Read before the table: a change after this shows as a new generation next time.
        let generation = kernel(nftables::generation).await?;
        let (rules, forwards) = self.desired_firewall().await?;
        let services = self.service_rules();
        let damage = kernel(move || nftables::check(&rules, &forwards, &services)).await?;
        Ok((generation, damage))
    }

    /// Puts berth's table back whenever something else changed it: rules, chains, set and
    /// map elements (`nft flush ruleset`, `nft flush set inet berth bridges`, a firewall
    /// reload), until the daemon stops.
    ///
    /// Each tick reads nftables' generation id, which every change to any table bumps; only
    /// when it moved since the last check that found the table intact is the table read back
    /// and compared with the store (about 3 ms with 1,000 published ports).
    pub async fn run_firewall_guard(self: Arc<Self>) {
        let mut tick = tokio::time::interval(GUARD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut intact_at = None;
        loop {
            tick.tick().await;
            match self.guard_firewall(intact_at).await {
                Ok(generation) => intact_at = generation,
                Err(e) => {
                    intact_at = None;
                    tracing::error!(error = %e, "checking berth's nftables table failed");
                }
            }
        }
    }

    /// One guard tick: the generation at which the table was found intact, `None` if it had
    /// to be restored (the next tick checks the restored table).
    async fn guard_firewall(&self, intact_at: Option<u32>) -> Result<Option<u32>> {
        if let Some(at) = intact_at
            && kernel(nftables::generation).await? == at
        {
            return Ok(intact_at);
        }
        let (generation, damage) = self.firewall_damage().await?;
        if damage.is_empty() {
            return Ok(Some(generation));
        }
        // A front-end commits to the store before it changes the kernel, so an attach or
        // detach halfway looks like a missing or extra element. Only what is still wrong a
        // moment later is damage.
        tokio::time::sleep(SETTLE).await;
        let (generation, damage) = self.firewall_damage().await?;
        if damage.is_empty() {
            return Ok(Some(generation));
        }
        tracing::info!(
            "restoring berth's nftables table, changed from outside: {}",
            damage.join("; ")
        );
        if let Err(e) = self.restore_firewall().await {
            tracing::error!(error = %e, "restoring berth's nftables table failed");
        }
        // The services' maps may have gone with the table: read back and refilled.
        if let Err(e) = self.resync_services().await {
            tracing::error!(error = %e, "restoring the services' maps failed");
        }
        if let Err(e) = self.resync_policies().await {
            tracing::error!(error = %e, "restoring the policy sets failed");
        }
        Ok(None)
    }
}
