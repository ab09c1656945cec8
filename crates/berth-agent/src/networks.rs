//! Networks: creating one (validation, subnets carved or checked for overlap, the bridge),
//! listing, and removing a bridge or an overlay network once nothing uses it.

use std::net::IpAddr;

use berth_api::{Allocation, CreateNetwork};
use berth_dataplane::{BridgeSpec, Netlink, ROUTE_PROTOCOL};
use berth_ipam::{IpamError, Pool};
use berth_model::{
    DEFAULT_POOL, DEFAULT_POOL_PREFIX, Driver, Endpoint, Network, Shown, Subnet, bridge_name,
    parse_subnet, validate_name, validate_network_mtu, vxlan_name,
};
use berth_store::{Compare, Txn, TxnOutcome};
use ipnet::IpNet;

use crate::{Agent, AgentError, Result, docker, encode, kernel, keys, random_id, remove_link};

/// Claims the network's subnets in its creating transaction: the overlap check reads the
/// networks there are, and a network another host creates at the same moment with the same
/// subnet (both carving the first free /24) would pass it too.
pub(crate) fn claim_subnets(net: &Network, mut txn: Txn) -> Txn {
    for s in &net.subnets {
        let key = keys::subnet(s.cidr);
        txn = txn
            .when(Compare::Absent(key.clone()))
            .put(key, net.name.clone());
    }
    txn
}

/// Why a network's creating transaction failed.
pub(crate) fn create_conflict(net: &Network, c: &Compare) -> AgentError {
    match c.key().strip_prefix(keys::SUBNETS) {
        Some(_) => AgentError::Conflict(format!(
            "a subnet of network {:?} was taken by another network meanwhile; try again",
            net.name
        )),
        None => AgentError::Conflict(format!("network {:?} already exists", net.name)),
    }
}

fn gateway_nets(net: &Network) -> Vec<IpNet> {
    net.subnets
        .iter()
        .map(|s| IpNet::new(s.gateway, s.cidr.prefix_len()).expect("prefix from a valid subnet"))
        .collect()
}

pub(crate) fn bridge_spec(net: &Network) -> BridgeSpec {
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
    pub async fn networks(&self) -> Result<Vec<Network>> {
        self.load_all(keys::NETWORKS).await
    }

    pub async fn network(&self, name: &str) -> Result<Network> {
        self.load::<Network>(&keys::network(name))
            .await?
            .map(|(n, _)| n)
            .ok_or_else(|| AgentError::NotFound(format!("no network named {}", Shown(name))))
    }

    pub async fn create_network(&self, req: CreateNetwork) -> Result<Network> {
        self.create_network_adopting(req, &[]).await
    }

    /// Creates a network; subnets in `adopting` may be Docker pools this network takes over.
    pub(crate) async fn create_network_adopting(
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
        let host_routes = self.host_routes(&existing).await?;
        let overlap = |cidr: &IpNet| overlapping(&existing, &held, &host_routes, cidr);
        let v4 = match v4 {
            Some(c) => c,
            None => carve_default(
                &|c: &IpNet| {
                    overlap(c).or_else(|| {
                        self.service_cidrs()
                            .iter()
                            .find(|r| r.contains(c) || c.contains(*r))
                            .map(|r| format!("the service range {r}"))
                    })
                },
                &host_routes,
            )?,
        };
        let mut subnets = Vec::new();
        for (cidr, gw) in [(Some(v4), &req.gateway), (v6, &req.ipv6_gateway)] {
            let Some(cidr) = cidr else { continue };
            if let Some(theirs) = overlap(&cidr) {
                return Err(AgentError::Conflict(format!(
                    "subnet {cidr} overlaps {theirs}"
                )));
            }
            if let Some(range) = self
                .service_cidrs()
                .iter()
                .find(|r| r.contains(&cidr) || cidr.contains(*r))
            {
                return Err(AgentError::Invalid(format!(
                    "subnet {cidr} overlaps the service range {range} (--service-cidr)"
                )));
            }
            let mut pool = Pool::new(cidr);
            let gateway = match gw {
                Some(g) => {
                    let ip: IpAddr = g.parse().map_err(|_| {
                        AgentError::Invalid(format!("invalid gateway address {}", Shown(g)))
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
            subnets_line(&net)
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
        let services = self.services_on(name).await?;
        if !services.is_empty() {
            return Err(AgentError::Conflict(format!(
                "network {name:?} has services ({}); remove them first",
                services.join(", ")
            )));
        }
        let policies = self.policies_on(name).await?;
        if !policies.is_empty() {
            return Err(AgentError::Conflict(format!(
                "network {name:?} has policies ({}); remove them first",
                policies.join(", ")
            )));
        }
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

    /// Refuses a network this host cannot attach to: another host's bridge network, or a
    /// network being removed.
    pub(crate) fn check_usable(&self, net: &Network) -> Result<()> {
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
}

/// A route of this host (one of its addresses is a `local` route) that no network's subnet
/// may overlap: the host would then send that range's traffic to the network's bridge (the
/// bridge taking the router's address makes the router itself `local`).
pub(crate) struct HostRoute {
    pub destination: IpNet,
    /// `the host's route 192.168.78.0/24 dev eth0`, `the host's address 192.168.78.2 (dev eth0)`.
    pub named: String,
}

impl Agent {
    /// The routes of every table and family that a new network's subnet must stay clear of:
    /// all but the default routes (every subnet is inside them) and berth's own (those of its
    /// bridges and VXLAN devices, and those it makes). Main-table routes come first, so that
    /// an overlap is named by the route `ip route` shows rather than by a `local` entry.
    /// Link-local and multicast routes need no rule of their own: subnets in those ranges are
    /// refused before this is asked (see `berth_model::validate_subnet`), so none can meet them.
    pub(crate) async fn host_routes(&self, networks: &[Network]) -> Result<Vec<HostRoute>> {
        let berth_links: Vec<String> = networks
            .iter()
            .flat_map(|n| [n.bridge.clone(), vxlan_name(&n.id)])
            .collect();
        kernel(move || {
            let mut nl = Netlink::open()?;
            let links = nl.links()?;
            let mut routes = nl.routes()?;
            routes.sort_by_key(|r| !r.is_main_unicast());
            let link = |index: Option<u32>| index.and_then(|i| links.iter().find(|l| l.index == i));
            Ok(routes
                .into_iter()
                .filter(|r| r.destination.prefix_len() != 0 && r.protocol != ROUTE_PROTOCOL)
                .filter(|r| {
                    link(r.oif).is_none_or(|l| !l.marked() && !berth_links.contains(&l.name))
                })
                .map(|r| {
                    let dev = link(r.oif).map(|l| l.name.as_str());
                    let named = match (r.is_local(), dev) {
                        (true, Some(dev)) => {
                            format!("the host's address {} (dev {dev})", r.destination.addr())
                        }
                        _ => format!("the host's route {}", r.describe(dev)),
                    };
                    HostRoute {
                        destination: r.destination,
                        named,
                    }
                })
                .collect())
        })
        .await
    }
}

/// What `cidr` would overlap, named for an error message: a berth network's subnet, one of
/// `pools` (Docker IPAM pools) or one of the host's routes.
pub(crate) fn overlapping(
    networks: &[Network],
    pools: &[IpNet],
    host: &[HostRoute],
    cidr: &IpNet,
) -> Option<String> {
    let meets = |theirs: &IpNet| theirs.contains(cidr) || cidr.contains(theirs);
    networks
        .iter()
        .flat_map(|n| {
            n.subnets
                .iter()
                .map(move |s| (format!("{} of network {:?}", s.cidr, n.name), s.cidr))
        })
        .chain(
            pools
                .iter()
                .map(|c| (format!("{c} of a Docker IPAM pool"), *c)),
        )
        .find(|(_, theirs)| meets(theirs))
        .map(|(named, _)| named)
        .or_else(|| {
            host.iter()
                .find(|r| meets(&r.destination))
                .map(|r| r.named.clone())
        })
}

/// The first subnet of `len` in `pool` that overlaps nothing. When none is left, the error
/// names a host route that covers the whole pool (a VPN's `10.0.0.0/8`), if one does.
pub(crate) fn carve(
    pool: IpNet,
    len: u8,
    overlap: &dyn Fn(&IpNet) -> Option<String>,
    host: &[HostRoute],
) -> Result<IpNet> {
    pool.subnets(len)
        .expect("valid prefix")
        .find(|c| overlap(c).is_none())
        .ok_or_else(|| {
            let why = host
                .iter()
                .find(|r| r.destination.contains(&pool))
                .map(|r| format!(": all of it is under {}", r.named))
                .unwrap_or_default();
            AgentError::Conflict(format!(
                "the default pool {pool} is used up{why}; give --subnet"
            ))
        })
}

/// The first /24 of berth's default pool that overlaps nothing.
fn carve_default(overlap: &dyn Fn(&IpNet) -> Option<String>, host: &[HostRoute]) -> Result<IpNet> {
    let pool: IpNet = DEFAULT_POOL.parse().expect("valid default pool");
    carve(pool, DEFAULT_POOL_PREFIX, overlap, host)
}

/// "10.91.0.0/24 via 10.91.0.1, ..." for the log.
pub(crate) fn subnets_line(net: &Network) -> String {
    net.subnets
        .iter()
        .map(|s| format!("{} via {}", s.cidr, s.gateway))
        .collect::<Vec<_>>()
        .join(", ")
}
