//! Everything the policy decisions depend on, and the compiler from it to profiles: per target
//! endpoint and direction, the clauses that allow traffic (each with the rule it comes from,
//! for `explain`), then those clauses cut into disjoint peers and port classes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use berth_model::{Endpoint, Peer, Policy, PolicyRule, PortName, PortRef, Protocol, Selector};

use crate::ranges::{self, Spans};
use crate::{AddrRange, ClassId, Direction, MAX_PAIRS_PER_CLASS, Profile, ProfileKey};

/// The policies, endpoints and networks of the cluster, as far as policies care.
///
/// Every `put_`/`remove_` returns what it [`Touched`]: the local endpoints whose profile keys
/// may have changed and the policies and networks whose profiles' content may have, so the
/// caller recompiles those and no others.
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

/// What a change may have changed (see [`PolicyIndex`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Local endpoints whose [`PolicyIndex::profile_key`]s may differ: they came or went, or
    /// the policies selecting them, their labels or their named ports changed.
    pub endpoints: BTreeSet<String>,
    /// Policies whose compiled content may differ: their rules, or the endpoints their peers
    /// stand for, changed.
    pub policies: BTreeSet<String>,
    /// Networks whose gateways changed (egress profiles allow DNS to them).
    pub networks: BTreeSet<String>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.policies.is_empty() && self.networks.is_empty()
    }

    /// Both changes.
    pub fn extend(&mut self, other: Touched) {
        self.endpoints.extend(other.endpoints);
        self.policies.extend(other.policies);
        self.networks.extend(other.networks);
    }

    /// Whether a profile of this key may have changed content.
    pub fn dirties(&self, key: &ProfileKey) -> bool {
        (key.direction == Direction::Egress && self.networks.contains(&key.network))
            || key.policies.iter().any(|p| self.policies.contains(p))
    }
}

#[derive(Debug, Clone, Default)]
struct Members {
    policies: BTreeMap<String, Policy>,
    /// (Which endpoints a policy selects is worked out when asked, from these: a policy
    /// change then costs what its network holds, and an attach nothing per policy.)
    endpoints: BTreeMap<String, Endpoint>,
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
    pub fn put_network(&mut self, name: &str, gateways: Vec<IpAddr>) -> Touched {
        let old = self.gateways.insert(name.to_string(), gateways);
        if old.as_ref() == self.gateways.get(name) {
            return Touched::default();
        }
        Touched {
            networks: [name.to_string()].into(),
            ..Touched::default()
        }
    }

    /// Forgets a network's gateways; its policies and endpoints stay until removed.
    pub fn remove_network(&mut self, name: &str) -> Touched {
        match self.gateways.remove(name) {
            Some(_) => Touched {
                networks: [name.to_string()].into(),
                ..Touched::default()
            },
            None => Touched::default(),
        }
    }

    /// Adds a policy, or replaces the one of the same name.
    pub fn put_policy(&mut self, policy: Policy) -> Touched {
        let mut changed = self.remove_policy(&policy.name);
        changed.policies.insert(policy.name.clone());
        let name = policy.name.clone();
        let network = policy.network.clone();
        if is_wide(&policy) {
            self.wide.insert(name.clone());
        }
        let m = self.networks.entry(network.clone()).or_default();
        m.policies.insert(name.clone(), policy);
        self.policy_networks.insert(name.clone(), network.clone());
        self.local_targets(&network, &name, &mut changed.endpoints);
        changed
    }

    pub fn remove_policy(&mut self, name: &str) -> Touched {
        let mut changed = Touched::default();
        let Some(network) = self.policy_networks.remove(name) else {
            return changed;
        };
        changed.policies.insert(name.to_string());
        self.local_targets(&network, name, &mut changed.endpoints);
        self.wide.remove(name);
        if let Some(m) = self.networks.get_mut(&network) {
            m.policies.remove(name);
            if m.is_empty() {
                self.networks.remove(&network);
            }
        }
        changed
    }

    /// Adds an endpoint, or replaces the one of the same id.
    pub fn put_endpoint(&mut self, ep: Endpoint) -> Touched {
        let mut changed = self.remove_endpoint(&ep.id);
        let id = ep.id.clone();
        let network = ep.network.clone();
        let m = self.networks.entry(network.clone()).or_default();
        m.endpoints.insert(id.clone(), ep);
        self.endpoint_networks.insert(id.clone(), network);
        if let Some(new) = self.endpoint(&id) {
            self.touched_by(new, &mut changed);
        }
        changed
    }

    pub fn remove_endpoint(&mut self, id: &str) -> Touched {
        let mut changed = Touched::default();
        let Some(network) = self.endpoint_networks.remove(id) else {
            return changed;
        };
        let Some(m) = self.networks.get_mut(&network) else {
            return changed;
        };
        let old = m.endpoints.remove(id);
        if m.is_empty() {
            self.networks.remove(&network);
        }
        // Its peers' policies are found without it.
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

    /// The key of the profile that judges `ep` in `direction`; `None` when no policy isolates
    /// it there (everything passes).
    pub fn profile_key(&self, ep: &Endpoint, direction: Direction) -> Option<ProfileKey> {
        let isolating: Vec<&Policy> = self
            .selecting(ep)
            .filter(|p| isolates(p, direction))
            .collect();
        if isolating.is_empty() {
            return None;
        }
        let names_ports = direction == Direction::Ingress
            && isolating
                .iter()
                .any(|p| rules(p, direction).iter().any(has_named_port));
        let mut named_ports: Vec<(String, Protocol, u16)> = if names_ports {
            ep.named_ports
                .iter()
                .map(|n| (n.name.as_str().to_string(), n.protocol, n.port))
                .collect()
        } else {
            Vec::new()
        };
        named_ports.sort();
        Some(ProfileKey::new(
            ep.network.clone(),
            direction,
            isolating.iter().map(|p| p.name.clone()).collect(),
            named_ports,
        ))
    }

    /// The profile of a key, from the policies and endpoints as they are now. Policies of the
    /// key that are gone count for nothing (their removal touches the key's targets).
    pub fn compile_profile(&self, key: &ProfileKey) -> Profile {
        let policies: Vec<&Policy> = key
            .policies
            .iter()
            .filter_map(|name| self.policy(name))
            .filter(|p| p.network == key.network)
            .collect();
        let resolve = |name: PortName, protocol: Protocol| {
            key.named_ports
                .iter()
                .find(|(n, p, _)| *p == protocol && n == name.as_str())
                .map(|&(_, _, port)| port)
        };
        let compiled = self.compile_for(&key.network, &resolve, &policies, key.direction);
        profile_of(&compiled.clauses)
    }

    /// How many kernel elements `policy` compiles to on its own (both directions, with the
    /// endpoints there are now): what [`crate::MAX_POLICY_ELEMENTS`] limits. A profile of
    /// several policies is never bigger than theirs added up.
    pub fn cost(&self, policy: &Policy) -> usize {
        let no_names = |_: PortName, _: Protocol| None;
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .filter(|&d| isolates(policy, d))
            .map(|d| {
                let compiled = self.compile_for(&policy.network, &no_names, &[policy], d);
                profile_of(&compiled.clauses).size()
            })
            .sum()
    }

    /// The profile judging endpoint `id` in `direction` (`None`: not isolated, or unknown).
    pub fn profile_of(&self, id: &str, direction: Direction) -> Option<Profile> {
        let ep = self.endpoint(id)?;
        let key = self.profile_key(ep, direction)?;
        Some(self.compile_profile(&key))
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
        let Some(p) = m.policies.get(policy) else {
            return Vec::new();
        };
        m.endpoints
            .values()
            .filter(|ep| p.selector.matches(&ep.labels))
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
        let resolve = |name, protocol| resolve(ep, name, protocol);
        self.compile_for(&ep.network, &resolve, &isolating, direction)
    }

    /// The clauses of these policies (which isolate a target of `network` in `direction`),
    /// with ingress named ports resolved by `named` (on the target).
    fn compile_for<'a>(
        &'a self,
        network: &str,
        named: &dyn Fn(PortName, Protocol) -> Option<u16>,
        isolating: &[&'a Policy],
        direction: Direction,
    ) -> Compiled<'a> {
        let mut clauses = Vec::new();
        // Policies often share peer selectors: each is resolved once.
        let mut resolved = HashMap::new();
        for p in isolating {
            for (i, rule) in rules(p, direction).iter().enumerate() {
                let source = Source::Rule {
                    policy: &p.name,
                    direction,
                    index: i + 1,
                };
                let peers = self.peer_spans(&p.network, &rule.peers, &mut resolved);
                self.rule_clauses(p, direction, source, rule, peers, named, &mut clauses);
            }
        }
        if direction == Direction::Egress
            && !isolating.is_empty()
            && isolating.iter().all(|p| p.gateway_dns)
        {
            let gateways = self.gateways.get(network).into_iter().flatten();
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
        named_on_target: &dyn Fn(PortName, Protocol) -> Option<u16>,
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
                        if let Some(n) = named_on_target(name, protocol) {
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

    pub(crate) fn is_local(&self, ep: &Endpoint) -> bool {
        ep.is_on(&self.me)
    }

    /// Adds the local endpoints the policy `name` of `network` selects to `out`.
    fn local_targets(&self, network: &str, name: &str, out: &mut BTreeSet<String>) {
        let Some(m) = self.networks.get(network) else {
            return;
        };
        let Some(p) = m.policies.get(name) else {
            return;
        };
        out.extend(
            m.endpoints
                .values()
                .filter(|ep| self.is_local(ep) && p.selector.matches(&ep.labels))
                .map(|ep| ep.id.clone()),
        );
    }

    /// Adds to `out` what depends on `ep` as it is (or was): the endpoint itself if it is
    /// local, and the policies whose peers may include it.
    fn touched_by(&self, ep: &Endpoint, out: &mut Touched) {
        if self.is_local(ep) {
            out.endpoints.insert(ep.id.clone());
        }
        let peer_of = |p: &Policy| {
            [Direction::Ingress, Direction::Egress]
                .into_iter()
                .flat_map(|d| rules(p, d))
                .flat_map(|r| &r.peers)
                .any(|peer| matches!(peer, Peer::Endpoints(sel) if sel.matches(&ep.labels)))
        };
        for p in self.members_policies(&ep.network).filter(|p| peer_of(p)) {
            out.policies.insert(p.name.clone());
        }
        for p in self.wide.iter().filter_map(|name| self.policy(name)) {
            if wide_peer(p, ep) {
                out.policies.insert(p.name.clone());
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

/// The profile of a target's clauses: the peers that clauses without ports let through
/// entirely, and the ports cut into ranges that each lead to the class of the peers allowed
/// there (peers allowed entirely are left out of the classes).
fn profile_of(clauses: &[Clause<'_>]) -> Profile {
    let any = clauses
        .iter()
        .filter(|c| c.ports.is_none())
        .fold(Spans::default(), |s, c| s.union(&c.peers));
    let tagged: Vec<(usize, ranges::PortRange)> = clauses
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c.ports.as_ref()?)))
        .flat_map(|(i, ports)| ports.iter().map(move |&r| (i, r)))
        .collect();
    let groups = ranges::port_groups(&tagged);
    // The peers of each set of clauses that allow some port range, once per set.
    let mut peers_of: BTreeMap<&[usize], Vec<AddrRange>> = BTreeMap::new();
    for (_, set) in &groups {
        peers_of.entry(set).or_insert_with(|| {
            let peers = set
                .iter()
                .fold(Spans::default(), |s, &i| s.union(&clauses[i].peers));
            addr_ranges(&peers.minus(&any))
        });
    }
    // A class per distinct list of peers, with the ports that lead to it.
    let mut ports_of: BTreeMap<&Vec<AddrRange>, Vec<ranges::PortRange>> = BTreeMap::new();
    for ((protocol, lo, hi), set) in &groups {
        let peers = &peers_of[set.as_slice()];
        if peers.is_empty() {
            continue;
        }
        let ports = ports_of.entry(peers).or_default();
        match ports.last_mut() {
            Some((p, _, last)) if *p == *protocol && u32::from(*last) + 1 == u32::from(*lo) => {
                *last = *hi
            }
            _ => ports.push((*protocol, *lo, *hi)),
        }
    }
    // Numbered by its ports, so that a class keeps its number while peers come and go (a
    // list of ports that hashes alike takes the next free number, in the lists' order).
    let mut by_ports: Vec<(&Vec<ranges::PortRange>, &Vec<AddrRange>)> = ports_of
        .iter()
        .map(|(peers, ports)| (ports, *peers))
        .collect();
    by_ports.sort();
    let mut taken: BTreeSet<ClassId> = BTreeSet::new();
    let mut profile = Profile {
        any: addr_ranges(&any),
        ..Profile::default()
    };
    for (ports, peers) in by_ports {
        // A few single peers and ports: pairs, not a class.
        let single_peers: Option<Vec<IpAddr>> = peers
            .iter()
            .map(|r| (r.first == r.last).then_some(r.first))
            .collect();
        let single_ports = ports.iter().all(|&(_, lo, hi)| lo == hi);
        if let Some(single) = single_peers
            && single_ports
            && single.len() * ports.len() <= MAX_PAIRS_PER_CLASS
        {
            for peer in single {
                profile
                    .pairs
                    .extend(ports.iter().map(|&(p, port, _)| (peer, p, port)));
            }
            continue;
        }
        let mut class = class_hash(ports);
        while !taken.insert(class) {
            class = class.wrapping_add(1);
        }
        profile.classes.push((class, peers.clone()));
        profile
            .ports
            .extend(ports.iter().map(|&(p, lo, hi)| (p, lo, hi, class)));
    }
    profile.classes.sort_unstable();
    profile.ports.sort_unstable();
    profile.pairs.sort_unstable();
    profile
}

/// Spans of both families as address ranges, IPv4 first.
fn addr_ranges(spans: &Spans) -> Vec<AddrRange> {
    [ranges::Family::V4, ranges::Family::V6]
        .into_iter()
        .flat_map(|family| {
            spans
                .family(family)
                .iter()
                .map(move |&(first, last)| AddrRange {
                    first: ranges::join(family, first),
                    last: ranges::join(family, last),
                })
        })
        .collect()
}

/// FNV-1a over a list of port ranges.
fn class_hash(list: &[ranges::PortRange]) -> ClassId {
    let mut h: u32 = 0x811c_9dc5;
    for &(p, lo, hi) in list {
        for b in [p.number()]
            .into_iter()
            .chain(lo.to_be_bytes())
            .chain(hi.to_be_bytes())
        {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h
}
