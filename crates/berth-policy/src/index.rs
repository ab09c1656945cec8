//! Everything the policy decisions depend on, and the compiler from it to elements: per target
//! endpoint and direction, the clauses that allow traffic (each with the rule it comes from,
//! for `explain`), then those clauses cut into elements that never partly overlap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use berth_model::{Endpoint, Peer, Policy, PolicyRule, PortName, PortRef, Protocol, Selector};

use crate::ranges::{self, Rect, Spans};
use crate::{AddrRange, Direction, PolicyElement};

/// The policies, endpoints and networks of the cluster, as far as policies care.
///
/// Every `put_`/`remove_` returns the ids of the local endpoints whose
/// [`elements_of`](PolicyIndex::elements_of) may have changed, so the caller re-applies those
/// and no others.
#[derive(Debug, Clone)]
pub struct PolicyIndex {
    me: String,
    /// Each network's gateways, which egress-isolated endpoints may still ask for DNS.
    gateways: BTreeMap<String, Vec<IpAddr>>,
    /// The network each policy is filed under, by name.
    policy_networks: BTreeMap<String, String>,
    /// The network each endpoint is filed under, by id.
    endpoint_networks: BTreeMap<String, String>,
    /// Policies and endpoints by network: a policy selects endpoints of its own network only,
    /// so decisions cost what the network holds, not what the cluster holds.
    networks: BTreeMap<String, Members>,
    /// Policies with egress rules whose named ports resolve on whatever endpoint of the
    /// cluster is at a peer address (rules with CIDR peers or none): a change to an endpoint
    /// of any network may change what they allow.
    wide: BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
struct Members {
    policies: BTreeMap<String, Policy>,
    endpoints: BTreeMap<String, Endpoint>,
    /// By policy, the ids of the endpoints it selects (on any host), kept up to date so that
    /// finding the targets of a change costs what it finds.
    selected: BTreeMap<String, BTreeSet<String>>,
}

impl Members {
    fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.endpoints.is_empty()
    }
}

/// Where an allowance comes from, as `explain` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source<'a> {
    /// The `index`th (from 1) rule of `policy` in `direction`.
    Rule {
        policy: &'a str,
        direction: Direction,
        index: usize,
    },
    /// Egress-isolated endpoints may still ask the gateway for DNS.
    GatewayDns,
}

impl fmt::Display for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Rule {
                policy,
                direction,
                index,
            } => write!(f, "{policy} ({direction} rule {index})"),
            Source::GatewayDns => f.write_str("gateway DNS (default)"),
        }
    }
}

/// What one rule (or the gateway-DNS default) allows one target, resolved to addresses and
/// port numbers.
#[derive(Debug, Clone)]
pub(crate) struct Clause<'a> {
    pub(crate) source: Source<'a>,
    pub(crate) peers: Spans,
    /// `None`: every protocol and port.
    pub(crate) ports: Option<Vec<(Protocol, u16, u16)>>,
}

impl Clause<'_> {
    /// The same decision as [`crate::allows`] makes on the elements compiled from the clause.
    pub(crate) fn matches(&self, peer: IpAddr, protocol: u8, port: Option<u16>) -> bool {
        self.peers.contains(peer)
            && self.ports.as_ref().is_none_or(|ports| {
                ports.iter().any(|&(p, lo, hi)| {
                    p.number() == protocol && port.is_some_and(|n| lo <= n && n <= hi)
                })
            })
    }
}

/// One endpoint's decisions in one direction.
#[derive(Debug, Clone)]
pub(crate) struct Compiled<'a> {
    /// The policies that isolate it, by name; empty: everything is allowed.
    pub(crate) isolated_by: Vec<&'a str>,
    pub(crate) clauses: Vec<Clause<'a>>,
}

fn isolates(p: &Policy, direction: Direction) -> bool {
    match direction {
        Direction::Ingress => p.ingress_isolated,
        Direction::Egress => p.egress_isolated,
    }
}

/// The rules of `p` that count in `direction`: none where it does not isolate, as in
/// Kubernetes.
fn rules(p: &Policy, direction: Direction) -> &[PolicyRule] {
    match direction {
        Direction::Ingress if p.ingress_isolated => &p.ingress,
        Direction::Egress if p.egress_isolated => &p.egress,
        _ => &[],
    }
}

fn addrs(ep: &Endpoint) -> impl Iterator<Item = IpAddr> + '_ {
    ep.ips.iter().map(|n| n.addr())
}

/// The port `name` of `protocol` on `ep`, if it names one.
fn resolve(ep: &Endpoint, name: PortName, protocol: Protocol) -> Option<u16> {
    ep.named_ports
        .iter()
        .find(|n| n.name == name && n.protocol == protocol)
        .map(|n| n.port)
}

/// Whether `p` has egress rules that resolve named ports on any endpoint at a peer address.
fn is_wide(p: &Policy) -> bool {
    rules(p, Direction::Egress).iter().any(|r| {
        has_named_port(r)
            && (r.peers.is_empty() || r.peers.iter().any(|p| matches!(p, Peer::Cidr { .. })))
    })
}

fn has_named_port(r: &PolicyRule) -> bool {
    r.ports
        .iter()
        .any(|pp| matches!(pp.port, Some(PortRef::Named(_))))
}

impl PolicyIndex {
    /// An empty index for the host `me`: local endpoints are those with `ep.is_on(me)`.
    pub fn new(me: &str) -> PolicyIndex {
        PolicyIndex {
            me: me.to_string(),
            gateways: BTreeMap::new(),
            policy_networks: BTreeMap::new(),
            endpoint_networks: BTreeMap::new(),
            networks: BTreeMap::new(),
            wide: BTreeSet::new(),
        }
    }

    /// Sets a network's gateways (the addresses gateway DNS is allowed to).
    pub fn put_network(&mut self, name: &str, gateways: Vec<IpAddr>) -> BTreeSet<String> {
        let old = self.gateways.insert(name.to_string(), gateways);
        if old.as_ref() == self.gateways.get(name) {
            return BTreeSet::new();
        }
        self.egress_isolated_locals(name)
    }

    /// Forgets a network's gateways; its policies and endpoints stay until removed.
    pub fn remove_network(&mut self, name: &str) -> BTreeSet<String> {
        match self.gateways.remove(name) {
            Some(_) => self.egress_isolated_locals(name),
            None => BTreeSet::new(),
        }
    }

    /// Adds a policy, or replaces the one of the same name.
    pub fn put_policy(&mut self, policy: Policy) -> BTreeSet<String> {
        let mut changed = self.remove_policy(&policy.name);
        let name = policy.name.clone();
        let network = policy.network.clone();
        if is_wide(&policy) {
            self.wide.insert(name.clone());
        }
        let m = self.networks.entry(network.clone()).or_default();
        let selected = m
            .endpoints
            .values()
            .filter(|ep| policy.selector.matches(&ep.labels))
            .map(|ep| ep.id.clone())
            .collect();
        m.selected.insert(name.clone(), selected);
        m.policies.insert(name.clone(), policy);
        self.policy_networks.insert(name.clone(), network.clone());
        self.local_targets(&network, &name, &mut changed);
        changed
    }

    pub fn remove_policy(&mut self, name: &str) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        let Some(network) = self.policy_networks.remove(name) else {
            return changed;
        };
        self.local_targets(&network, name, &mut changed);
        self.wide.remove(name);
        if let Some(m) = self.networks.get_mut(&network) {
            m.policies.remove(name);
            m.selected.remove(name);
            if m.is_empty() {
                self.networks.remove(&network);
            }
        }
        changed
    }

    /// Adds an endpoint, or replaces the one of the same id.
    pub fn put_endpoint(&mut self, ep: Endpoint) -> BTreeSet<String> {
        let mut changed = self.remove_endpoint(&ep.id);
        let id = ep.id.clone();
        let network = ep.network.clone();
        let m = self.networks.entry(network.clone()).or_default();
        for (name, p) in &m.policies {
            if p.selector.matches(&ep.labels) {
                m.selected
                    .entry(name.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
        m.endpoints.insert(id.clone(), ep);
        self.endpoint_networks.insert(id.clone(), network);
        if let Some(new) = self.endpoint(&id) {
            self.touched_by(new, &mut changed);
        }
        changed
    }

    pub fn remove_endpoint(&mut self, id: &str) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        let Some(network) = self.endpoint_networks.remove(id) else {
            return changed;
        };
        let Some(m) = self.networks.get_mut(&network) else {
            return changed;
        };
        let old = m.endpoints.remove(id);
        for selected in m.selected.values_mut() {
            selected.remove(id);
        }
        if m.is_empty() {
            self.networks.remove(&network);
        }
        // Its targets are found without it; it is itself among them if it was local.
        if let Some(old) = old {
            self.touched_by(&old, &mut changed);
        }
        changed
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        let network = self.policy_networks.get(name)?;
        self.networks.get(network)?.policies.get(name)
    }

    /// All policies, by name.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policy_networks
            .keys()
            .filter_map(|name| self.policy(name))
    }

    pub fn endpoint(&self, id: &str) -> Option<&Endpoint> {
        let network = self.endpoint_networks.get(id)?;
        self.networks.get(network)?.endpoints.get(id)
    }

    /// The endpoints on this host, by id.
    pub fn local_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints().filter(|ep| self.is_local(ep))
    }

    /// The elements of one endpoint as a target (either direction), sorted and never partly
    /// overlapping; empty if no policy isolates it or it is unknown. Works for remote endpoints
    /// too (`explain` judges them).
    pub fn elements_of(&self, endpoint_id: &str) -> Vec<PolicyElement> {
        let Some(ep) = self.endpoint(endpoint_id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let compiled = self.compile(ep, direction);
            if compiled.isolated_by.is_empty() {
                continue;
            }
            for target in addrs(ep) {
                push_elements(direction, target, &compiled.clauses, &mut out);
            }
        }
        out.sort_unstable();
        // An endpoint listing one address twice would repeat its elements.
        out.dedup();
        out
    }

    /// The endpoints (on any host) a policy selects, by id; empty for an unknown policy.
    pub fn selected_by(&self, policy: &str) -> Vec<&Endpoint> {
        let Some(m) = self
            .policy_networks
            .get(policy)
            .and_then(|network| self.networks.get(network))
        else {
            return Vec::new();
        };
        m.selected
            .get(policy)
            .into_iter()
            .flatten()
            .filter_map(|id| m.endpoints.get(id))
            .collect()
    }

    /// Finds an endpoint by id, by name or by one of its addresses.
    pub fn find(&self, what: &str) -> Option<&Endpoint> {
        if let Some(ep) = self.endpoint(what) {
            return Some(ep);
        }
        if let Some(ep) = self.endpoints().find(|ep| ep.name.as_deref() == Some(what)) {
            return Some(ep);
        }
        let ip: IpAddr = what.parse().ok()?;
        self.owner(ip)
    }

    /// The endpoint that has `ip`, if any (the first by id, should two share it).
    pub(crate) fn owner(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.endpoints().find(|ep| addrs(ep).any(|a| a == ip))
    }

    /// Every endpoint, by id.
    fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoint_networks
            .keys()
            .filter_map(|id| self.endpoint(id))
    }

    /// Every endpoint, in no particular order but quickly.
    fn all_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.networks.values().flat_map(|m| m.endpoints.values())
    }

    /// The policies that isolate `ep` in `direction` and the clauses of their rules, resolved
    /// against the current endpoints.
    pub(crate) fn compile(&self, ep: &Endpoint, direction: Direction) -> Compiled<'_> {
        let isolating: Vec<&Policy> = self
            .selecting(ep)
            .filter(|p| isolates(p, direction))
            .collect();
        let mut clauses = Vec::new();
        // Policies often share peer selectors: each is resolved once.
        let mut resolved = HashMap::new();
        for p in &isolating {
            for (i, rule) in rules(p, direction).iter().enumerate() {
                let source = Source::Rule {
                    policy: &p.name,
                    direction,
                    index: i + 1,
                };
                let peers = self.peer_spans(&p.network, &rule.peers, &mut resolved);
                self.rule_clauses(p, direction, source, rule, peers, ep, &mut clauses);
            }
        }
        if direction == Direction::Egress
            && !isolating.is_empty()
            && isolating.iter().all(|p| p.gateway_dns)
        {
            let gateways = self.gateways.get(&ep.network).into_iter().flatten();
            clauses.push(Clause {
                source: Source::GatewayDns,
                peers: Spans::from_addrs(gateways.copied()),
                ports: Some(vec![(Protocol::Udp, 53, 53), (Protocol::Tcp, 53, 53)]),
            });
        }
        Compiled {
            isolated_by: isolating.iter().map(|p| p.name.as_str()).collect(),
            clauses,
        }
    }

    /// Adds the clauses of one rule, whose peers stand for `peers`.
    #[allow(clippy::too_many_arguments)]
    fn rule_clauses<'a>(
        &'a self,
        p: &'a Policy,
        direction: Direction,
        source: Source<'a>,
        rule: &PolicyRule,
        peers: Spans,
        target: &Endpoint,
        clauses: &mut Vec<Clause<'a>>,
    ) {
        if rule.ports.is_empty() {
            clauses.push(Clause {
                source,
                peers,
                ports: None,
            });
            return;
        }
        let mut ports = Vec::new();
        // Egress named ports: the peers whose own port of that name is each port number.
        let mut named: BTreeMap<(Protocol, u16), Vec<IpAddr>> = BTreeMap::new();
        for pp in &rule.ports {
            let protocol = pp.protocol;
            match pp.port {
                None => ports.push((protocol, 0, u16::MAX)),
                Some(PortRef::Number(first)) => {
                    let last = pp.end_port.unwrap_or(first);
                    // A range ending before it starts holds no port.
                    if last >= first {
                        ports.push((protocol, first, last));
                    }
                }
                Some(PortRef::Named(name)) => match direction {
                    Direction::Ingress => {
                        if let Some(n) = resolve(target, name, protocol) {
                            ports.push((protocol, n, n));
                        }
                    }
                    Direction::Egress => {
                        self.named_peers(&p.network, &rule.peers, name, protocol, &mut named)
                    }
                },
            }
        }
        for ((protocol, port), addrs) in named {
            clauses.push(Clause {
                source,
                peers: Spans::from_addrs(addrs),
                ports: Some(vec![(protocol, port, port)]),
            });
        }
        if !ports.is_empty() {
            clauses.push(Clause {
                source,
                peers,
                ports: Some(ports),
            });
        }
    }

    /// The addresses a rule's peers stand for: no peers, every address. `resolved` holds the
    /// addresses of the selectors resolved so far.
    fn peer_spans<'a>(
        &self,
        network: &str,
        peers: &'a [Peer],
        resolved: &mut HashMap<&'a Selector, Spans>,
    ) -> Spans {
        if peers.is_empty() {
            return Spans::all();
        }
        let mut spans = Spans::default();
        for peer in peers {
            spans = match peer {
                Peer::Endpoints(sel) => spans.union(resolved.entry(sel).or_insert_with(|| {
                    Spans::from_addrs(
                        self.members(network)
                            .filter(|ep| sel.matches(&ep.labels))
                            .flat_map(addrs),
                    )
                })),
                Peer::Cidr { cidr, except } => spans.union(&Spans::from_cidr(cidr, except)),
            };
        }
        spans
    }

    /// Adds to `out`, by port number, the addresses among `peers` of endpoints that name a
    /// port `name` of `protocol`: as Kubernetes resolves egress named ports, on the pod the
    /// connection goes to, so only known endpoints match.
    fn named_peers(
        &self,
        network: &str,
        peers: &[Peer],
        name: PortName,
        protocol: Protocol,
        out: &mut BTreeMap<(Protocol, u16), Vec<IpAddr>>,
    ) {
        let mut add = |ep: &Endpoint, inside: &dyn Fn(IpAddr) -> bool| {
            if let Some(port) = resolve(ep, name, protocol) {
                out.entry((protocol, port))
                    .or_default()
                    .extend(addrs(ep).filter(|&a| inside(a)));
            }
        };
        if peers.is_empty() {
            for ep in self.all_endpoints() {
                add(ep, &|_| true);
            }
        }
        for peer in peers {
            match peer {
                Peer::Endpoints(sel) => {
                    for ep in self.members(network).filter(|ep| sel.matches(&ep.labels)) {
                        add(ep, &|_| true);
                    }
                }
                Peer::Cidr { cidr, except } => {
                    let spans = Spans::from_cidr(cidr, except);
                    for ep in self.all_endpoints() {
                        add(ep, &|a| spans.contains(a));
                    }
                }
            }
        }
    }

    /// The endpoints of a network (on any host).
    fn members(&self, network: &str) -> impl Iterator<Item = &Endpoint> {
        self.networks
            .get(network)
            .into_iter()
            .flat_map(|m| m.endpoints.values())
    }

    /// The policies that select `ep`.
    fn selecting<'a>(&'a self, ep: &Endpoint) -> impl Iterator<Item = &'a Policy> {
        self.networks
            .get(&ep.network)
            .into_iter()
            .flat_map(|m| m.policies.values())
            .filter(|p| p.selector.matches(&ep.labels))
    }

    fn is_local(&self, ep: &Endpoint) -> bool {
        ep.is_on(&self.me)
    }

    /// Adds the local endpoints the policy `name` of `network` selects to `out`.
    fn local_targets(&self, network: &str, name: &str, out: &mut BTreeSet<String>) {
        let Some(m) = self.networks.get(network) else {
            return;
        };
        out.extend(
            m.selected
                .get(name)
                .into_iter()
                .flatten()
                .filter(|id| !out.contains(*id))
                .filter(|id| m.endpoints.get(*id).is_some_and(|ep| self.is_local(ep)))
                .cloned()
                .collect::<Vec<_>>(),
        );
    }

    /// The local endpoints of `network` that some policy isolates for egress: those whose
    /// gateway-DNS allowance depends on the network's gateways.
    fn egress_isolated_locals(&self, network: &str) -> BTreeSet<String> {
        self.members(network)
            .filter(|ep| {
                self.is_local(ep) && self.selecting(ep).any(|p| isolates(p, Direction::Egress))
            })
            .map(|ep| ep.id.clone())
            .collect()
    }

    /// Adds to `out` the local endpoints whose elements depend on `ep` as it is (or was): the
    /// endpoint itself, and the local targets of policies whose peers may include it.
    fn touched_by(&self, ep: &Endpoint, out: &mut BTreeSet<String>) {
        if self.is_local(ep) {
            out.insert(ep.id.clone());
        }
        let peer_of = |p: &Policy| {
            [Direction::Ingress, Direction::Egress]
                .into_iter()
                .flat_map(|d| rules(p, d))
                .flat_map(|r| &r.peers)
                .any(|peer| matches!(peer, Peer::Endpoints(sel) if sel.matches(&ep.labels)))
        };
        for p in self.members_policies(&ep.network).filter(|p| peer_of(p)) {
            self.local_targets(&p.network, &p.name, out);
        }
        for p in self.wide.iter().filter_map(|name| self.policy(name)) {
            if wide_peer(p, ep) {
                self.local_targets(&p.network, &p.name, out);
            }
        }
    }

    /// The policies of a network.
    fn members_policies(&self, network: &str) -> impl Iterator<Item = &Policy> {
        self.networks
            .get(network)
            .into_iter()
            .flat_map(|m| m.policies.values())
    }
}

/// Whether `ep` may be a peer of one of `p`'s egress rules through a named port it names, to
/// every address or through a CIDR (its peer selectors are looked at with the others).
fn wide_peer(p: &Policy, ep: &Endpoint) -> bool {
    rules(p, Direction::Egress).iter().any(|r| {
        let names_one = r.ports.iter().any(|pp| match pp.port {
            Some(PortRef::Named(name)) => resolve(ep, name, pp.protocol).is_some(),
            _ => false,
        });
        names_one
            && (r.peers.is_empty()
                || r.peers.iter().any(|peer| {
                    matches!(peer, Peer::Cidr { cidr, .. } if addrs(ep).any(|a| cidr.contains(&a)))
                }))
    })
}

/// Adds the elements of one target address in one direction: isolated, then the clauses cut
/// into disjoint pieces of its family (peers that an `Any` element lets through entirely are
/// left out of the port elements).
fn push_elements(
    direction: Direction,
    target: IpAddr,
    clauses: &[Clause<'_>],
    out: &mut Vec<PolicyElement>,
) {
    let (family, _) = ranges::split(target);
    let range = |(first, last): ranges::Span| AddrRange {
        first: ranges::join(family, first),
        last: ranges::join(family, last),
    };
    out.push(PolicyElement::Isolated { direction, target });
    let any = ranges::merge(
        clauses
            .iter()
            .filter(|c| c.ports.is_none())
            .flat_map(|c| c.peers.family(family).iter().copied())
            .collect(),
    );
    let mut rects: BTreeMap<Protocol, Vec<Rect>> = BTreeMap::new();
    for c in clauses {
        let Some(ports) = &c.ports else { continue };
        let peers = ranges::subtract(c.peers.family(family), &any);
        for &(protocol, lo, hi) in ports {
            let of_protocol = rects.entry(protocol).or_default();
            of_protocol.extend(peers.iter().map(|&peers| Rect {
                peers,
                ports: (lo, hi),
            }));
        }
    }
    out.extend(any.into_iter().map(|span| PolicyElement::Any {
        direction,
        target,
        peers: range(span),
    }));
    for (protocol, rects) in rects {
        out.extend(
            ranges::disjoint(&rects)
                .into_iter()
                .map(|r| PolicyElement::Ports {
                    direction,
                    target,
                    peers: range(r.peers),
                    protocol,
                    ports: r.ports,
                }),
        );
    }
}
