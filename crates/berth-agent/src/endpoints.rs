//! Endpoints: attaching a namespace to a network and detaching it again, with everything an
//! endpoint holds: its store records and unique indexes, its addresses, and the namespace's
//! default routes, which pass from endpoint to endpoint in attach order.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use berth_api::Attach;
use berth_dataplane::{EndpointSpec, Netlink, hostns, netns};
use berth_model::{
    Driver, Endpoint, IFNAME_MAX, MAX_CONTAINER_ID, MAX_GC_ATTACHMENTS, MacAddr, NetnsRef, Network,
    Sandbox, Shown, check_count, check_length, parse_requested_ips, tombstone_name,
    validate_aliases, validate_container_id, validate_ifname, validate_labels, validate_name,
    validate_named_ports, validate_netns_ref, veth_name,
};
use berth_store::{Compare, KeyValue, Txn, TxnOutcome};
use ipnet::IpNet;

use crate::networks::bridge_spec;
use crate::sandboxes::removing;
use crate::{
    Agent, AgentError, Result, already_exists, bridge_full, docker, encode, firewall, kernel, keys,
    random_id, remove_link,
};

/// What of an endpoint's holdings [`Agent::endpoint_records`] covers beside its records. A
/// detached endpoint keeps its addresses and host ports until it is reaped (`Neither`); a
/// Docker endpoint takes its addresses over from the IPAM reservations separately (`Ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    Neither,
    Ports,
    PortsAndAddresses,
}

/// Refuses a namespace that is a host's (see [`hostns::host_namespace`]): an attach there
/// would take over that host's addresses and default route. "is a host's network namespace"
/// is what clients (`berth-cni`) recognise the refusal by.
pub(crate) fn refuse_host_namespace(ns: &File, given: &str) -> Result<()> {
    match hostns::host_namespace(ns)? {
        Some(why) => Err(AgentError::Invalid(format!(
            "{} is a host's network namespace, not a container's ({why}); berth attaches \
             only containers' namespaces",
            Shown(given)
        ))),
        None => Ok(()),
    }
}

/// The gateways of `net` the sandbox's default routes go through because `ep` holds them,
/// after the default-route records `holders` (key → endpoint id).
pub(crate) fn default_gateways(
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

impl Agent {
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
    pub(crate) async fn default_route_holders(
        &self,
        prefix: &str,
    ) -> Result<HashMap<String, String>> {
        Ok(self
            .store
            .list(prefix)
            .await?
            .items
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect())
    }

    pub(crate) async fn endpoints_in(&self, netns_id: &str) -> Result<Vec<Endpoint>> {
        self.endpoints_in_knowing(netns_id, None).await
    }

    /// [`Agent::endpoints_in`], taking `known` as it is rather than reading it again.
    pub(crate) async fn endpoints_in_knowing(
        &self,
        netns_id: &str,
        known: Option<&Endpoint>,
    ) -> Result<Vec<Endpoint>> {
        let mut out = Vec::new();
        for kv in self
            .store
            .list(&keys::attachments_prefix(netns_id))
            .await?
            .items
        {
            let id = String::from_utf8_lossy(&kv.value).to_string();
            match known {
                Some(ep) if ep.id == id => out.push(ep.clone()),
                _ => {
                    if let Some((ep, _)) = self.load::<Endpoint>(&keys::endpoint(&id)).await? {
                        out.push(ep);
                    }
                }
            }
        }
        Ok(out)
    }

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
                "no sandbox named {}",
                Shown(sandbox)
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
        // Everything the request carries is checked, and its lists and strings held to their
        // caps (docs/api.md), before anything is read or changed.
        validate_name("network", &req.network)?;
        validate_netns_ref(&req.sandbox)?;
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".into());
        validate_ifname(&ifname)?;
        if let Some(name) = &req.name {
            validate_name("endpoint", name)?;
        }
        validate_aliases(&req.aliases)?;
        validate_labels(&req.labels)?;
        validate_named_ports(&req.named_ports)?;
        berth_model::validate_published_ports(&req.ports)?;
        if let Some(cid) = &req.container_id {
            validate_container_id(cid)?;
        }
        let requested_mac = req.mac.as_deref().map(str::parse::<MacAddr>).transpose()?;
        let requested: Vec<IpAddr> = parse_requested_ips(&req.ips)?;

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
        refuse_host_namespace(&ns, &req.sandbox)?;
        if let Some((sb, _)) = &sandbox
            && sb.removing
        {
            return Err(removing(&sb.name));
        }
        // The namespace's default-route records are read beside the membership (one round
        // trip on etcd instead of two); the first commit attempt decides with them.
        let (v4_key, v6_key) = (
            keys::default_route(&netns_ref.id, true),
            keys::default_route(&netns_ref.id, false),
        );
        let member = keys::member(&net.name, &netns_ref.id);
        let (holder, route_v4, route_v6) = tokio::join!(
            self.endpoint_holding(&member),
            self.store.get(&v4_key),
            self.store.get(&v6_key)
        );
        let mut routes_read = Some([route_v4?, route_v6?]);
        if let Some(holder) = holder? {
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
        if !req.force {
            // CNI has no way to force, so a CNI request is not told of one.
            let how_to_force = req
                .container_id
                .is_none()
                .then_some("--force (\"force\": true in the API)");
            self.refuse_host_listeners(&ports, how_to_force).await?;
        }

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
            labels: req.labels.clone(),
            named_ports: req.named_ports.clone(),
        };
        let mut attempts = 0;
        let outcome = loop {
            let (claims, kept) = match self
                .default_route_claims(&ep, req.default_route, routes_read.take())
                .await
            {
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
            for c in kept {
                txn = txn.when(c);
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
        // Judged by policy before its interface exists: its first packet already is.
        if let Err(e) = self.policy_endpoint_up(&ep).await {
            self.policy_endpoint_gone(&ep).await;
            self.undo_attach_records(&ep).await?;
            self.unpublish(firewall::forwards_of(&ep)).await;
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
                // Its elements go once its interface has (else they stay, failing closed).
                remove_link(ep.host_ifname.clone()).await?;
                self.policy_endpoint_gone(&ep).await;
                return Err(AgentError::Conflict(format!(
                    "{} was detached from {:?} while being attached",
                    req.sandbox, ep.network
                )));
            }
            self.undo_attach_records(&ep).await?;
            self.unpublish(firewall::forwards_of(&ep)).await;
            self.policy_endpoint_gone(&ep).await;
            self.release(&ep);
            if already_exists(&e) {
                return Err(AgentError::Conflict(format!(
                    "{} already has an interface named {}",
                    req.sandbox, ep.ifname
                )));
            }
            if bridge_full(&e) {
                return Err(AgentError::Conflict(format!(
                    "network {:?} is full on this host: a Linux bridge takes at most 1024 ports",
                    ep.network
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
            self.policy_endpoint_gone(&ep).await;
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
        self.services_endpoint_up(&ep).await;
        if let Some(sandbox) = &ep.netns.sandbox {
            self.write_resolv_conf_knowing(sandbox, &ep.netns.id, Some((&ep, &net)))
                .await;
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
    /// Also the compares that keep the records it leaves to their holders as they were read:
    /// a holder detached meanwhile found no one to hand its route to (this endpoint was not
    /// committed yet), and the attach must then decide again rather than leave none.
    async fn default_route_claims(
        &self,
        ep: &Endpoint,
        take: bool,
        read: Option<[Option<KeyValue>; 2]>,
    ) -> Result<(Vec<(String, Option<u64>)>, Vec<Compare>)> {
        let mut claims = Vec::new();
        let mut kept = Vec::new();
        let [mut v4, mut v6] = read.map_or([None, None], |r| r.map(Some));
        for ipv4 in [true, false] {
            if !ep.ips.iter().any(|ip| ip.addr().is_ipv4() == ipv4) {
                continue;
            }
            let key = keys::default_route(&ep.netns.id, ipv4);
            let record = match if ipv4 { v4.take() } else { v6.take() } {
                Some(read) => read,
                None => self.store.get(&key).await?,
            };
            match record {
                None => claims.push((key, None)),
                Some(kv) => {
                    let holder = String::from_utf8_lossy(&kv.value).to_string();
                    if take || self.store.get(&keys::endpoint(&holder)).await?.is_none() {
                        claims.push((key, Some(kv.mod_revision)));
                    } else {
                        kept.push(Compare::ModRevision(key, kv.mod_revision));
                    }
                }
            }
        }
        Ok((claims, kept))
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
    pub(crate) fn endpoint_records(
        &self,
        ep: &Endpoint,
        mut txn: Txn,
        create: bool,
        held: Held,
    ) -> Txn {
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
                validate_netns_ref(sandbox)?;
                let (_, netns_ref, _) = self.resolve_netns(sandbox).await?;
                (keys::member(network, &netns_ref.id), sandbox.clone())
            }
            (None, Some(cid), Some(ifname)) => {
                check_length("container id", cid, MAX_CONTAINER_ID)?;
                check_length("interface name", ifname, IFNAME_MAX)?;
                (
                    keys::container(network, cid, ifname),
                    format!("container {cid} interface {ifname}"),
                )
            }
            _ => {
                return Err(AgentError::Invalid(
                    "detach takes either sandbox, or container_id and ifname".into(),
                ));
            }
        };
        let not_attached = || {
            AgentError::NotFound(format!(
                "{who} is not attached to network {}",
                Shown(network)
            ))
        };
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
        check_count(
            "valid attachments",
            req.valid.len(),
            MAX_GC_ATTACHMENTS,
            "per request",
        )?;
        // Held to the lengths berth takes; the characters are not checked, since an entry
        // berth could not have made only matches nothing.
        for a in &req.valid {
            check_length("container id", &a.container_id, MAX_CONTAINER_ID)?;
            check_length("interface name", &a.ifname, IFNAME_MAX)?;
        }
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
    pub(crate) async fn remove_endpoint(&self, ep: &Endpoint) -> Result<()> {
        // The store first, against the record as it is now: a second removal of the same
        // endpoint (a retried DEL, detach racing sandbox rm) finds it gone and does nothing,
        // rather than retiring whatever now holds the interface name.
        let mut attempts = 0;
        // Its elements stay until its interface is retired, whatever the watch says meanwhile.
        self.policy_endpoint_detaching(&ep.id).await;
        let (current, handover, revision) = loop {
            let Some((current, rev)) = self.load::<Endpoint>(&keys::endpoint(&ep.id)).await? else {
                self.policy_detach_found_gone(ep).await;
                return Ok(());
            };
            let handover = self.default_route_handover(&current).await?;
            let txn = handover.apply(
                self.endpoint_records(&current, Txn::new(), false, Held::Neither)
                    .when(Compare::ModRevision(keys::endpoint(&ep.id), rev))
                    .put(keys::releasing(&ep.id), encode(&current)),
            );
            match self.commit(txn).await? {
                TxnOutcome::Committed { revision } => break (current, handover, revision),
                // The endpoint changed or went, or its namespace's default routes moved
                // meanwhile: look again (gone is done).
                TxnOutcome::CompareFailed(_) if attempts < 5 => attempts += 1,
                TxnOutcome::CompareFailed(c) => {
                    self.policy_detach_abandoned(&ep.id).await;
                    return Err(AgentError::Conflict(format!(
                        "endpoint {} kept changing while being detached ({c:?}); try again",
                        ep.id
                    )));
                }
            }
        };
        self.unname_endpoint(&current);
        // Out of its services before its interface goes: no new connection reaches it.
        self.services_endpoint_down(&current, revision).await;
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
        let ips = current.ips.clone();
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
                &ips,
            )
        })
        .await;
        if let Err(e) = &retired {
            // Its elements go only once it is off its bridge: now, rather than by the reaper.
            tracing::warn!(endpoint = %ep.id, error = %e, "retiring the veth failed; deleting it");
            if let Err(e) = remove_link(current.host_ifname.clone()).await {
                tracing::warn!(endpoint = %ep.id, error = %e, "deleting the veth failed too");
            }
        }
        // Retired (off its bridge): no longer judged, its elements go.
        self.policy_endpoint_down(&current, revision).await;
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
    pub(crate) async fn in_attach_order(&self, eps: Vec<Endpoint>) -> Result<Vec<Endpoint>> {
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
pub(crate) fn next_holder<'a, 'n>(
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
pub(crate) async fn install_default_route(ep: &Endpoint, gateway: IpAddr) -> Result<()> {
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
pub(crate) fn endpoint_on_bridge(
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

pub(crate) fn endpoint_spec(ep: &Endpoint, net: &Network, bridge_index: u32) -> EndpointSpec {
    EndpointSpec {
        host_ifname: ep.host_ifname.clone(),
        bridge_index,
        mtu: net.mtu,
        ifname: ep.ifname.clone(),
        mac: ep.mac.0,
        ips: ep.ips.clone(),
        gateways: net.subnets.iter().map(|s| s.gateway).collect(),
        // Any endpoint may be a service's backend, and one that reaches its own service gets
        // its connection back through the port it came in by (br_netfilter DNATs it there).
        hairpin: true,
    }
}
