//! Network policy (Kubernetes' NetworkPolicy) in the kernel.
//!
//! The agent's compiler (`berth-policy`) gives each local endpoint address a policy isolates
//! (a target) a profile: the compiled policies that isolate it in a direction, shared by every
//! target those same policies select. A profile is a chain of its own, `pol_in_<P>` (ingress) or
//! `pol_eg_<P>` (egress, P its number in hex), with its sets:
//! - `pol_in_<P>_any4`, `..._any6`: peers allowed everything (`ip saddr @... return`);
//! - `pol_in_<P>_pairs4`, `..._pairs6`: single peers allowed single ports (`ip saddr . meta
//!   l4proto . th dport @... return`), the classes too small for a chain of their own;
//! - `pol_in_<P>_tcp`, `..._udp`, `..._sctp`: destination ports to the chain of the class that
//!   judges them (`tcp dport vmap @...`, each range to a `goto`);
//! - per class C, chain `pol_in_<P>_<C>` with `..._4` and `..._6`: the peers the class lets
//!   through (`ip saddr @... return`); the rest is counted and dropped.
//!
//! The fixed maps `pol_tgt_in4`, `pol_tgt_in6`, `pol_tgt_eg4`, `pol_tgt_eg6` send a packet to
//! (ingress) or from (egress) a target to its profile's chain (`jump`). Ports and peers are
//! looked up apart, tied by the class, so a rule's kernel form grows with its peers plus its
//! ports, never their product, and a new endpoint whose policies are in force already is one
//! element per address. Every set holds ranges of one field, which the kernel keeps in a
//! red-black tree: adding or removing an element costs a logarithm of its size. (An interval
//! set of a concatenation, nft's `type a . b; flags interval`, is a pipapo set, whose removals
//! cost time that grows with the set *per element*: ten thousand removals from a set of ten
//! thousand held the nftables lock, which every netfilter change on the host waits for, for
//! minutes.) Everything is nft's own language: `nft list table inet berth` shows it.
//!
//! Chain `policies` (`policy` is a keyword of nft's language) is jumped to from `forward`
//! first thing after the operator's chain, and from `input` for what comes from a network (so
//! that a container's connections to its gateway are subject to its egress policy). There,
//! packets of connections already let through pass, and so does neighbour discovery (which
//! conntrack does not track); then ingress, then egress (a packet between two isolated
//! targets needs both sides' leave). Passing is `return`, never `accept`: the rest of
//! `forward` (the networks' isolation) still decides. A class chain is entered by `goto`, so
//! its `return` goes straight back to `policies`.
//!
//! Taking a permission back stops new connections; those it let through go on until the
//! caller deletes their conntrack entries ([`crate::conntrack::delete_flows_where`]). The next
//! packet of such a flow is then new to conntrack, which would take a mid-stream TCP segment
//! for the start of a connection of its sender's, and let the other side's answers through
//! as replies: so a TCP packet that is new and no bare SYN, to or from a target, is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use berth_model::Protocol;
use berth_policy::{AddrRange, ClassId, Direction, PolicyElement, ProfileId};

use super::nfnl::{
    Batch, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYCHAIN, NFT_MSG_DESTROYSET, NFT_MSG_DESTROYSETELEM,
    NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM,
    NLM_F_CREATE, Nfnetlink, attr, attr_str, covers, put_attr, put_str, put_u32,
};
use super::{
    Data, Element, INET_PROTO, INET_SERVICE, IPV4_ADDR, IPV6_ADDR, NFT_SET_INTERVAL, NFT_SET_MAP,
    NFTA_CHAIN_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE,
    NFTA_SET_DATA_LEN, NFTA_SET_DATA_TYPE, NFTA_SET_FLAGS, NFTA_SET_ID, NFTA_SET_KEY_LEN,
    NFTA_SET_KEY_TYPE, NFTA_SET_NAME, NFTA_SET_TABLE, NFTA_SET_USERDATA, Rule, TABLE, UD_CONCAT,
    UD_NET_ORDER, VERDICT, chain_attrs, expr, family, ip_bytes, parse_ip, push_element_list,
    push_rule, read_elements, rule, set_attrs,
};
use crate::{DataplaneError, Result};

/// The chain every policy decision starts in.
pub(super) const CHAIN: &str = "policies";

/// The most set elements (as the kernel counts them: a range is two) one transaction writes,
/// a few milliseconds of the kernel's time (see `policy_transactions_stay_short_as_the_sets_grow`
/// in the kernel tests), so that no change holds the nftables lock long. Bigger changes go in
/// several transactions, ordered so that no packet ever meets a half-made profile (see
/// [`PolicySets::apply`]).
pub const MAX_ELEMENTS_PER_TRANSACTION: usize = 4096;

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "in",
        Direction::Egress => "eg",
    }
}

/// The map from targets to their profiles' chains.
fn targets_map(direction: Direction, ipv6: bool) -> &'static str {
    match (direction, ipv6) {
        (Direction::Ingress, false) => "pol_tgt_in4",
        (Direction::Ingress, true) => "pol_tgt_in6",
        (Direction::Egress, false) => "pol_tgt_eg4",
        (Direction::Egress, true) => "pol_tgt_eg6",
    }
}

/// The fixed maps, for [`super::SETS`]: name, direction, IPv6.
pub(super) const TARGET_MAPS: [(&str, Direction, bool); 4] = [
    ("pol_tgt_in4", Direction::Ingress, false),
    ("pol_tgt_in6", Direction::Ingress, true),
    ("pol_tgt_eg4", Direction::Egress, false),
    ("pol_tgt_eg6", Direction::Egress, true),
];

fn profile_chain(direction: Direction, profile: ProfileId) -> String {
    format!("pol_{}_{profile:08x}", direction_name(direction))
}

fn class_chain(direction: Direction, profile: ProfileId, class: ClassId) -> String {
    format!("{}_{class:08x}", profile_chain(direction, profile))
}

fn family_suffix(ipv6: bool) -> &'static str {
    if ipv6 { "6" } else { "4" }
}

fn any_set(direction: Direction, profile: ProfileId, ipv6: bool) -> String {
    format!(
        "{}_any{}",
        profile_chain(direction, profile),
        family_suffix(ipv6)
    )
}

fn pairs_set(direction: Direction, profile: ProfileId, ipv6: bool) -> String {
    format!(
        "{}_pairs{}",
        profile_chain(direction, profile),
        family_suffix(ipv6)
    )
}

fn ports_map(direction: Direction, profile: ProfileId, protocol: Protocol) -> String {
    format!("{}_{protocol}", profile_chain(direction, profile))
}

fn peers_set(direction: Direction, profile: ProfileId, class: ClassId, ipv6: bool) -> String {
    format!(
        "{}_{}",
        class_chain(direction, profile, class),
        family_suffix(ipv6)
    )
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The sets earlier versions kept policy in (elements per target, ranges of concatenations),
/// which [`super::install`] removes.
pub(super) const LEGACY_SETS: [&str; 20] = [
    "pol_iso_in4",
    "pol_iso_eg4",
    "pol_in4",
    "pol_eg4",
    "pol_in_ports4",
    "pol_eg_ports4",
    "pol_in_exact4",
    "pol_eg_exact4",
    "pol_in_ports_exact4",
    "pol_eg_ports_exact4",
    "pol_iso_in6",
    "pol_iso_eg6",
    "pol_in6",
    "pol_eg6",
    "pol_in_ports6",
    "pol_eg_ports6",
    "pol_in_exact6",
    "pol_eg_exact6",
    "pol_in_ports_exact6",
    "pol_eg_ports_exact6",
];

/// The chains earlier versions judged targets in, which [`super::install`] removes.
pub(super) const LEGACY_CHAINS: [&str; 4] =
    ["policy_in4", "policy_eg4", "policy_in6", "policy_eg6"];

/// fe80::/10, as nft matches it: the whole address masked.
const LINK_LOCAL_MASK: [u8; 16] = [0xff, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const LINK_LOCAL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Where the peer's and the target's addresses are in the IP header, and nft's names for them.
struct Ends {
    ip: &'static str,
    len: u32,
    peer: (&'static str, u32),
    target: (&'static str, u32),
}

fn ends(direction: Direction, ipv6: bool) -> Ends {
    let (ip, len, saddr, daddr) = if ipv6 {
        ("ip6", 16, ("saddr", 8), ("daddr", 24))
    } else {
        ("ip", 4, ("saddr", 12), ("daddr", 16))
    };
    let (peer, target) = match direction {
        Direction::Ingress => (saddr, daddr),
        Direction::Egress => (daddr, saddr),
    };
    Ends {
        ip,
        len,
        peer,
        target,
    }
}

/// The fixed rules of `input` and `policies` (the jump from `forward`, right after the
/// operator's, is in [`super::rules`]).
pub(super) fn rules() -> Vec<Rule> {
    use super::expr::{
        Base::{Network, Transport},
        CT_ESTABLISHED_RELATED, CT_NEW, CtKey, ICMPV6_ND, IPPROTO_ICMPV6,
        MetaKey::{IifName, L4Proto},
        REG_VERDICT, REG1, TCP_FIN_SYN_RST_ACK, TCP_FLAGS_OFFSET, TCP_SYN, and, and_bytes, and_u8,
        cmp_eq, cmp_neq, ct, drop, jump, lookup, lookup_anonymous, map, meta, nonzero, payload,
        ret,
    };
    let mut all = vec![
        rule(
            "input",
            &format!("iifname @bridges jump {CHAIN}"),
            &[vec![
                meta(IifName, REG1),
                lookup(REG1, "bridges"),
                jump(CHAIN),
            ]],
        ),
        rule(
            CHAIN,
            "ct state established,related return",
            &[vec![
                ct(CtKey::State, REG1),
                and(REG1, CT_ESTABLISHED_RELATED),
                nonzero(REG1),
                ret(),
            ]],
        ),
        // Untracked, and what IPv6 needs before any connection.
        rule(
            CHAIN,
            "meta l4proto ipv6-icmp icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } return",
            &[vec![
                meta(L4Proto, REG1),
                cmp_eq(REG1, &[IPPROTO_ICMPV6]),
                payload(Transport, 0, 1, REG1),
                lookup_anonymous(REG1, &ICMPV6_ND),
                ret(),
            ]],
        ),
        // Every endpoint of an IPv6 network also has a link-local address, which no set
        // holds: one endpoint reaching another by it would pass unjudged. Beyond neighbour
        // discovery, nothing of berth's goes there.
        rule(
            CHAIN,
            "ip6 daddr fe80::/10 drop",
            &[
                family(true),
                vec![
                    payload(Network, 24, 16, REG1),
                    and_bytes(REG1, &LINK_LOCAL_MASK),
                    cmp_eq(REG1, &LINK_LOCAL),
                    drop(),
                ],
            ],
        ),
    ];
    // A flow whose conntrack entry was deleted, picked up mid-stream (see the module's
    // documentation), either way: a target's maps are looked up as sets.
    for ipv6 in [false, true] {
        for direction in [Direction::Ingress, Direction::Egress] {
            for end in ["saddr", "daddr"] {
                let e = ends(Direction::Ingress, ipv6);
                let offset = if end == "saddr" { e.peer.1 } else { e.target.1 };
                let targets = targets_map(direction, ipv6);
                all.push(rule(
                    CHAIN,
                    &format!(
                        "tcp flags & (fin | syn | rst | ack) != syn ct state new {} {end} @{targets} drop",
                        e.ip
                    ),
                    &[
                        vec![
                            meta(L4Proto, REG1),
                            cmp_eq(REG1, &[expr::IPPROTO_TCP]),
                            payload(Transport, TCP_FLAGS_OFFSET, 1, REG1),
                            and_u8(REG1, TCP_FIN_SYN_RST_ACK),
                            cmp_neq(REG1, &[TCP_SYN]),
                            ct(CtKey::State, REG1),
                            and(REG1, CT_NEW),
                            nonzero(REG1),
                        ],
                        family(ipv6),
                        vec![
                            payload(Network, offset, e.len, REG1),
                            lookup(REG1, targets),
                            drop(),
                        ],
                    ],
                ));
            }
        }
    }
    // Ingress first: a packet between two isolated targets needs both sides' leave.
    for direction in [Direction::Ingress, Direction::Egress] {
        for ipv6 in [false, true] {
            let e = ends(direction, ipv6);
            let targets = targets_map(direction, ipv6);
            all.push(rule(
                CHAIN,
                &format!("{} {} vmap @{targets}", e.ip, e.target.0),
                &[
                    family(ipv6),
                    vec![
                        payload(Network, e.target.1, e.len, REG1),
                        map(REG1, targets, REG_VERDICT),
                    ],
                ],
            ));
        }
    }
    all
}

/// The rules of a profile's chain.
fn profile_rules(direction: Direction, profile: ProfileId) -> Vec<Rule> {
    use super::expr::{
        Base::{Network, Transport},
        MetaKey::L4Proto,
        REG_VERDICT, REG1, cmp_eq, counter, drop, lookup, map, meta, payload, reg, ret,
    };
    let chain = profile_chain(direction, profile);
    let mut all = Vec::new();
    for ipv6 in [false, true] {
        let e = ends(direction, ipv6);
        let set = any_set(direction, profile, ipv6);
        all.push(rule(
            &chain,
            &format!("{} {} @{set} return", e.ip, e.peer.0),
            &[
                family(ipv6),
                vec![
                    payload(Network, e.peer.1, e.len, REG1),
                    lookup(REG1, set),
                    ret(),
                ],
            ],
        ));
    }
    for ipv6 in [false, true] {
        let e = ends(direction, ipv6);
        let set = pairs_set(direction, profile, ipv6);
        all.push(rule(
            &chain,
            &format!(
                "{} {} . meta l4proto . th dport @{set} return",
                e.ip, e.peer.0
            ),
            &[
                family(ipv6),
                vec![
                    payload(Network, e.peer.1, e.len, REG1),
                    meta(L4Proto, reg(e.len)),
                    payload(Transport, 2, 2, reg(e.len + 4)),
                    lookup(REG1, set),
                    ret(),
                ],
            ],
        ));
    }
    for protocol in PROTOCOLS {
        let ports = ports_map(direction, profile, protocol);
        all.push(rule(
            &chain,
            &format!("{protocol} dport vmap @{ports}"),
            &[vec![
                meta(L4Proto, REG1),
                cmp_eq(REG1, &[protocol.number()]),
                payload(Transport, 2, 2, REG1),
                map(REG1, ports, REG_VERDICT),
            ]],
        ));
    }
    all.push(rule(&chain, "counter drop", &[vec![counter(), drop()]]));
    all
}

/// The rules of a class's chain.
fn class_rules(direction: Direction, profile: ProfileId, class: ClassId) -> Vec<Rule> {
    use super::expr::{Base::Network, REG1, counter, drop, lookup, payload, ret};
    let chain = class_chain(direction, profile, class);
    let mut all = Vec::new();
    for ipv6 in [false, true] {
        let e = ends(direction, ipv6);
        let set = peers_set(direction, profile, class, ipv6);
        all.push(rule(
            &chain,
            &format!("{} {} @{set} return", e.ip, e.peer.0),
            &[
                family(ipv6),
                vec![
                    payload(Network, e.peer.1, e.len, REG1),
                    lookup(REG1, set),
                    ret(),
                ],
            ],
        ));
    }
    all.push(rule(&chain, "counter drop", &[vec![counter(), drop()]]));
    all
}

/// A set of a profile's or a class's: of address ranges, or (`vmap`) a map of port ranges to
/// verdicts.
struct OwnSet {
    name: String,
    ipv6: bool,
    shape: Shape,
}

/// What an [`OwnSet`] holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Address ranges.
    Addresses,
    /// Port ranges, each to a verdict.
    PortVerdicts,
    /// `address . protocol . port`, exact.
    Pairs,
}

impl OwnSet {
    fn attrs(&self) -> Vec<u8> {
        let mut a = Vec::new();
        put_str(&mut a, NFTA_SET_TABLE, TABLE);
        put_str(&mut a, NFTA_SET_NAME, &self.name);
        let (addr, addr_len) = if self.ipv6 {
            (IPV6_ADDR, 16)
        } else {
            (IPV4_ADDR, 4)
        };
        match self.shape {
            Shape::PortVerdicts => {
                put_u32(&mut a, NFTA_SET_FLAGS, NFT_SET_INTERVAL | NFT_SET_MAP);
                put_u32(&mut a, NFTA_SET_KEY_TYPE, INET_SERVICE);
                put_u32(&mut a, NFTA_SET_KEY_LEN, 2);
                put_u32(&mut a, NFTA_SET_DATA_TYPE, VERDICT.0);
                put_u32(&mut a, NFTA_SET_DATA_LEN, VERDICT.1);
                put_attr(&mut a, NFTA_SET_USERDATA, UD_NET_ORDER);
            }
            Shape::Addresses => {
                put_u32(&mut a, NFTA_SET_FLAGS, NFT_SET_INTERVAL);
                put_u32(&mut a, NFTA_SET_KEY_TYPE, addr);
                put_u32(&mut a, NFTA_SET_KEY_LEN, addr_len);
                put_attr(&mut a, NFTA_SET_USERDATA, UD_NET_ORDER);
            }
            Shape::Pairs => {
                put_u32(&mut a, NFTA_SET_FLAGS, 0);
                put_u32(
                    &mut a,
                    NFTA_SET_KEY_TYPE,
                    super::concat(&[addr, INET_PROTO, INET_SERVICE]),
                );
                put_u32(&mut a, NFTA_SET_KEY_LEN, addr_len + 8);
                put_attr(&mut a, NFTA_SET_USERDATA, UD_CONCAT);
            }
        }
        // The kernel wants an id for a set it creates, by which rules of the same batch may
        // name it; berth's name it by its name.
        let id = self.name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        put_u32(&mut a, NFTA_SET_ID, id | 0x8000_0000);
        a
    }
}

fn profile_sets(direction: Direction, profile: ProfileId) -> Vec<OwnSet> {
    let mut out: Vec<OwnSet> = [false, true]
        .into_iter()
        .flat_map(|ipv6| {
            [
                OwnSet {
                    name: any_set(direction, profile, ipv6),
                    ipv6,
                    shape: Shape::Addresses,
                },
                OwnSet {
                    name: pairs_set(direction, profile, ipv6),
                    ipv6,
                    shape: Shape::Pairs,
                },
            ]
        })
        .collect();
    out.extend(PROTOCOLS.map(|p| OwnSet {
        name: ports_map(direction, profile, p),
        ipv6: false,
        shape: Shape::PortVerdicts,
    }));
    out
}

fn class_sets(direction: Direction, profile: ProfileId, class: ClassId) -> Vec<OwnSet> {
    [false, true]
        .into_iter()
        .map(|ipv6| OwnSet {
            name: peers_set(direction, profile, class, ipv6),
            ipv6,
            shape: Shape::Addresses,
        })
        .collect()
}

/// Makes a chain with its sets, or (if they are there) empties the chain and writes its rules
/// again: idempotent, so that it also repairs a damaged chain.
fn push_chain(b: &mut Batch, chain: &str, sets: &[OwnSet], rules: &[Rule]) {
    for s in sets {
        b.push(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            s.attrs(),
            format!("create set {}", s.name),
        );
    }
    b.push(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        chain_attrs(NFTA_CHAIN_NAME, chain),
        format!("create chain {chain}"),
    );
    b.push(
        super::nfnl::NFT_MSG_DELRULE,
        0,
        chain_attrs(NFTA_RULE_CHAIN, chain),
        format!("flush chain {chain}"),
    );
    let mut anonymous_id = 0;
    for r in rules {
        push_rule(b, r, &mut anonymous_id, |_| 0);
    }
}

/// Removes a chain (with its rules) and its sets (with their elements).
fn push_destroy(b: &mut Batch, chain: &str, sets: &[OwnSet]) {
    b.push(
        NFT_MSG_DESTROYCHAIN,
        0,
        chain_attrs(NFTA_CHAIN_NAME, chain),
        format!("delete chain {chain}"),
    );
    for s in sets {
        let mut a = Vec::new();
        put_str(&mut a, NFTA_SET_TABLE, TABLE);
        put_str(&mut a, NFTA_SET_NAME, &s.name);
        b.push(NFT_MSG_DESTROYSET, 0, a, format!("delete set {}", s.name));
    }
}

/// `address . protocol . port`, each part from a 4-byte boundary.
fn pair_key(peer: IpAddr, protocol: Protocol, port: u16) -> Vec<u8> {
    let mut k = ip_bytes(peer);
    k.extend([protocol.number(), 0, 0, 0]);
    k.extend(super::port_bytes(port));
    k
}

/// The other way round; `None` for a key [`pair_key`] does not make.
fn parse_pair(key: &[u8]) -> Option<(IpAddr, Protocol, u16)> {
    let (addr, rest) = key.split_at_checked(key.len().checked_sub(8)?)?;
    match *rest {
        [proto, 0, 0, 0, hi, lo, 0, 0] => Some((
            parse_ip(addr)?,
            Protocol::from_number(proto)?,
            u16::from_be_bytes([hi, lo]),
        )),
        _ => None,
    }
}

/// A caller's mistake, found before anything is sent.
fn invalid(e: &PolicyElement, why: &str) -> DataplaneError {
    DataplaneError::io(
        format!("policy element {e:?}: {why}"),
        std::io::Error::from(std::io::ErrorKind::InvalidInput),
    )
}

/// The key after `key` as one big-endian number (`None` past the last): where an interval set
/// ends a range that holds `key` last.
fn next_key(key: &[u8]) -> Option<Vec<u8>> {
    let mut k = key.to_vec();
    for b in k.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(k);
        }
    }
    None
}

/// The key before `key` (which is not all zeros): the last key of a range ending at `key`.
fn previous_key(key: &[u8]) -> Option<Vec<u8>> {
    let mut k = key.to_vec();
    for b in k.iter_mut().rev() {
        if *b == 0 {
            *b = 0xff;
        } else {
            *b -= 1;
            return Some(k);
        }
    }
    None
}

/// A range from `first` to `last` (keys, both included) as an interval set holds it: its
/// first key (with the value, in a map), and the first key after it flagged as the end (none
/// when the range reaches the last key).
fn range_elements(first: Vec<u8>, last: &[u8], data: Option<Data>) -> Vec<Element> {
    let mut out = vec![Element {
        data,
        ..Element::of(first)
    }];
    if let Some(end) = next_key(last) {
        out.push(Element {
            interval_end: true,
            ..Element::of(end)
        });
    }
    out
}

/// Where an element lives, as what sort of thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Target,
    Ports,
    Peers,
    Any,
    Pair,
    Class,
    Profile,
}

fn kind(e: &PolicyElement) -> Kind {
    match e {
        PolicyElement::Target { .. } => Kind::Target,
        PolicyElement::Ports { .. } => Kind::Ports,
        PolicyElement::Peers { .. } => Kind::Peers,
        PolicyElement::Any { .. } => Kind::Any,
        PolicyElement::Pair { .. } => Kind::Pair,
        PolicyElement::Class { .. } => Kind::Class,
        PolicyElement::Profile { .. } => Kind::Profile,
    }
}

/// A set element's set and the element in the kernel's layout (two for a range); `None` for
/// a chain (a profile or a class).
fn encode(e: &PolicyElement) -> Result<Option<(String, Vec<Element>)>> {
    let addrs = |peers: &AddrRange| {
        if peers.first.is_ipv6() != peers.last.is_ipv6() {
            return Err(invalid(e, "a range of peers of two address families"));
        }
        if peers.first > peers.last {
            return Err(invalid(e, "peers' first address after their last"));
        }
        Ok((
            peers.first.is_ipv6(),
            range_elements(ip_bytes(peers.first), &ip_bytes(peers.last), None),
        ))
    };
    Ok(Some(match *e {
        PolicyElement::Profile { .. } | PolicyElement::Class { .. } => return Ok(None),
        PolicyElement::Target {
            direction,
            target,
            profile,
        } => (
            targets_map(direction, target.is_ipv6()).to_string(),
            vec![Element {
                data: Some(Data::jump(profile_chain(direction, profile))),
                ..Element::of(ip_bytes(target))
            }],
        ),
        PolicyElement::Any {
            direction,
            profile,
            peers,
        } => {
            let (ipv6, elements) = addrs(&peers)?;
            (any_set(direction, profile, ipv6), elements)
        }
        PolicyElement::Peers {
            direction,
            profile,
            class,
            peers,
        } => {
            let (ipv6, elements) = addrs(&peers)?;
            (peers_set(direction, profile, class, ipv6), elements)
        }
        PolicyElement::Pair {
            direction,
            profile,
            peer,
            protocol,
            port,
        } => (
            pairs_set(direction, profile, peer.is_ipv6()),
            vec![Element::of(pair_key(peer, protocol, port))],
        ),
        PolicyElement::Ports {
            direction,
            profile,
            protocol,
            ports: (lo, hi),
            class,
        } => {
            if lo > hi {
                return Err(invalid(e, "first port after the last"));
            }
            let data = Some(Data::goto(class_chain(direction, profile, class)));
            (
                ports_map(direction, profile, protocol),
                range_elements(lo.to_be_bytes().to_vec(), &hi.to_be_bytes(), data),
            )
        }
    }))
}

/// A range of an interval set: first key, last key, the first key's value.
type KeyRange = (Vec<u8>, Vec<u8>, Option<Data>);

/// An interval set's elements as ranges: each start (with its value) with the last key before
/// its end (none: to the last key); and whether every element was part of such a range (as
/// [`range_elements`] makes them).
fn ranges(elements: &[Element]) -> (Vec<KeyRange>, bool) {
    let mut sorted: Vec<&Element> = elements.iter().collect();
    sorted.sort();
    let mut out = Vec::new();
    let mut clean = true;
    let mut open: Option<&Element> = None;
    for e in sorted {
        if e.key_end.is_some() {
            clean = false;
            continue;
        }
        match (e.interval_end, open.take()) {
            (false, None) => open = Some(e),
            (true, Some(start)) if e.data.is_none() => match previous_key(&e.key) {
                Some(last) => out.push((start.key.clone(), last, start.data.clone())),
                None => clean = false,
            },
            // Two starts, or an end with no start: not berth's.
            (false, Some(_)) => {
                clean = false;
                open = Some(e);
            }
            (true, _) => clean = false,
        }
    }
    if let Some(start) = open {
        out.push((
            start.key.clone(),
            vec![0xff; start.key.len()],
            start.data.clone(),
        ));
    }
    (out, clean)
}

/// What the kernel holds of berth's policy: every chain and set of a profile or a class.
#[derive(Debug, Default)]
struct State {
    elements: Vec<PolicyElement>,
    /// Chains whose rules are not as berth writes them (someone changed them): their profile
    /// or class is left out of `elements`, so that it is written again.
    damaged: Vec<String>,
    /// Sets holding elements that are not berth's (beside the elements of berth's, which are
    /// in `elements`).
    foreign: Vec<String>,
}

/// The numbers in a chain's name: `pol_in_<P>` or `pol_in_<P>_<C>`.
fn parse_chain(name: &str) -> Option<(Direction, ProfileId, Option<ClassId>)> {
    let rest = name.strip_prefix("pol_")?;
    let (direction, rest) = match rest.split_at_checked(3)? {
        ("in_", r) => (Direction::Ingress, r),
        ("eg_", r) => (Direction::Egress, r),
        _ => return None,
    };
    let hex = |s: &str| {
        (s.len() == 8)
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    match rest.split_once('_') {
        None => Some((direction, hex(rest)?, None)),
        Some((p, c)) => Some((direction, hex(p)?, Some(hex(c)?))),
    }
}

/// Address ranges from an interval set's ranges; `false` if any was not one.
fn addr_ranges(rs: Vec<KeyRange>, mut clean: bool) -> (Vec<AddrRange>, bool) {
    let mut out = Vec::new();
    for (first, last, data) in rs {
        let r = parse_ip(&first)
            .zip(parse_ip(&last))
            .map(|(first, last)| AddrRange { first, last })
            .filter(|r| data.is_none() && r.first.is_ipv6() == r.last.is_ipv6());
        match r {
            Some(r) => out.push(r),
            None => clean = false,
        }
    }
    (out, clean)
}

/// Reads berth's policy from the kernel.
fn read_state(nl: &mut Nfnetlink) -> Result<State> {
    let refused = |what: String, errno: i32| DataplaneError::Kernel {
        op: format!("read nftables {what}"),
        source: std::io::Error::from_raw_os_error(errno),
    };
    let mut table_only = Vec::new();
    put_str(&mut table_only, NFTA_CHAIN_TABLE, TABLE);
    let mut chains = Vec::new();
    nl.dump(NFT_MSG_GETCHAIN, &table_only, |c| {
        if let Some(name) = attr_str(c, NFTA_CHAIN_NAME)
            && let Some(parsed) = parse_chain(name)
        {
            chains.push((name.to_string(), parsed));
        }
    })?
    .map_err(|errno| refused("chains".into(), errno))?;
    let mut rules: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    nl.dump(NFT_MSG_GETRULE, &table_only, |r| {
        if let Some(chain) = attr_str(r, NFTA_RULE_CHAIN)
            && attr_str(r, NFTA_RULE_TABLE) == Some(TABLE)
            && parse_chain(chain).is_some()
        {
            let exprs = attr(r, NFTA_RULE_EXPRESSIONS).unwrap_or_default();
            rules
                .entry(chain.to_string())
                .or_default()
                .push(exprs.to_vec());
        }
    })?
    .map_err(|errno| refused("rules".into(), errno))?;
    let intact = |chain: &str, want: &[Rule]| {
        let got = rules.get(chain).map(Vec::as_slice).unwrap_or_default();
        got.len() == want.len()
            && want
                .iter()
                .zip(got)
                .all(|(w, g)| covers(g, &expr::encode(&w.exprs, expr::Refs::Dump)))
    };
    let mut state = State::default();
    let mut read = |set: &str| -> Result<Option<Vec<Element>>> {
        match read_elements(nl, set)? {
            Ok((elements, _)) => Ok(Some(elements)),
            Err(errno) if errno == super::nfnl::enoent() => Ok(None),
            Err(errno) => Err(refused(format!("set {set}"), errno)),
        }
    };
    for (name, (direction, profile, class)) in chains {
        let Some(class) = class else {
            if intact(&name, &profile_rules(direction, profile)) {
                state
                    .elements
                    .push(PolicyElement::Profile { direction, profile });
            } else {
                state.damaged.push(name.clone());
            }
            for ipv6 in [false, true] {
                let set = any_set(direction, profile, ipv6);
                let Some(elements) = read(&set)? else {
                    continue;
                };
                let (rs, clean) = ranges(&elements);
                let (peers, clean) = addr_ranges(rs, clean);
                state
                    .elements
                    .extend(peers.into_iter().map(|peers| PolicyElement::Any {
                        direction,
                        profile,
                        peers,
                    }));
                if !clean {
                    state.foreign.push(set);
                }
            }
            for ipv6 in [false, true] {
                let set = pairs_set(direction, profile, ipv6);
                let Some(elements) = read(&set)? else {
                    continue;
                };
                let mut clean = true;
                for e in &elements {
                    let pair = parse_pair(&e.key)
                        .filter(|(peer, ..)| peer.is_ipv6() == ipv6)
                        .filter(|_| e.data.is_none() && !e.interval_end && e.key_end.is_none());
                    match pair {
                        Some((peer, protocol, port)) => state.elements.push(PolicyElement::Pair {
                            direction,
                            profile,
                            peer,
                            protocol,
                            port,
                        }),
                        None => clean = false,
                    }
                }
                if !clean {
                    state.foreign.push(set);
                }
            }
            for protocol in PROTOCOLS {
                let set = ports_map(direction, profile, protocol);
                let Some(elements) = read(&set)? else {
                    continue;
                };
                let (rs, mut clean) = ranges(&elements);
                for (first, last, data) in rs {
                    let port = |k: &[u8]| Some(u16::from_be_bytes(k.try_into().ok()?));
                    let class = match data {
                        Some(Data::Verdict {
                            code: expr::NFT_GOTO,
                            chain: Some(chain),
                        }) => match parse_chain(&chain) {
                            Some((d, p, Some(c))) if d == direction && p == profile => Some(c),
                            _ => None,
                        },
                        _ => None,
                    };
                    match (class, port(&first), port(&last)) {
                        (Some(class), Some(lo), Some(hi)) => {
                            state.elements.push(PolicyElement::Ports {
                                direction,
                                profile,
                                protocol,
                                ports: (lo, hi),
                                class,
                            })
                        }
                        _ => clean = false,
                    }
                }
                if !clean {
                    state.foreign.push(set);
                }
            }
            continue;
        };
        if intact(&name, &class_rules(direction, profile, class)) {
            state.elements.push(PolicyElement::Class {
                direction,
                profile,
                class,
            });
        } else {
            state.damaged.push(name.clone());
        }
        for ipv6 in [false, true] {
            let set = peers_set(direction, profile, class, ipv6);
            let Some(elements) = read(&set)? else {
                continue;
            };
            let (rs, clean) = ranges(&elements);
            let (peers, clean) = addr_ranges(rs, clean);
            state
                .elements
                .extend(peers.into_iter().map(|peers| PolicyElement::Peers {
                    direction,
                    profile,
                    class,
                    peers,
                }));
            if !clean {
                state.foreign.push(set);
            }
        }
    }
    for (map, direction, ipv6) in TARGET_MAPS {
        let elements = match read_elements(nl, map)? {
            Ok((elements, _)) => elements,
            Err(errno) => return Err(refused(format!("map {map}"), errno)),
        };
        let mut clean = true;
        for e in &elements {
            let target = parse_ip(&e.key).filter(|t| t.is_ipv6() == ipv6 && !e.interval_end);
            let profile = match &e.data {
                Some(Data::Verdict {
                    code: expr::NFT_JUMP,
                    chain: Some(chain),
                }) => match parse_chain(chain) {
                    Some((d, p, None)) if d == direction => Some(p),
                    _ => None,
                },
                _ => None,
            };
            match (target, profile) {
                (Some(target), Some(profile)) => state.elements.push(PolicyElement::Target {
                    direction,
                    target,
                    profile,
                }),
                _ => clean = false,
            }
        }
        if !clean {
            state.foreign.push(map.to_string());
        }
    }
    state.elements.sort_unstable();
    Ok(state)
}

/// How many elements the kernel counts for these (a range is two, a chain with its rules and
/// sets about ten).
fn kernel_size(elements: &[PolicyElement]) -> Result<usize> {
    elements
        .iter()
        .map(|e| Ok(encode(e)?.map_or(10, |(_, v)| v.len())))
        .sum()
}

/// One transaction: `remove` (targets first, chains last), then `add` (chains first, targets
/// last), so that nothing refers to what is not there.
fn batch(
    generation: Option<u32>,
    remove: &[PolicyElement],
    add: &[PolicyElement],
) -> Result<Batch> {
    let mut b = generation.map_or_else(Batch::default, Batch::at_generation);
    let mut remove = remove.to_vec();
    remove.sort_by_key(kind);
    let mut add = add.to_vec();
    add.sort_by_key(|e| std::cmp::Reverse(kind(e)));
    let mut elements: BTreeMap<String, Vec<Element>> = BTreeMap::new();
    let flush = |b: &mut Batch, elements: &mut BTreeMap<String, Vec<Element>>, op| {
        for (set, mut list) in std::mem::take(elements) {
            list.sort();
            list.dedup();
            push_element_list(b, op, &set, &list);
        }
    };
    let mut last = None;
    for e in &remove {
        if last != Some(kind(e)) {
            flush(&mut b, &mut elements, NFT_MSG_DESTROYSETELEM);
            last = Some(kind(e));
        }
        match *e {
            PolicyElement::Profile { direction, profile } => push_destroy(
                &mut b,
                &profile_chain(direction, profile),
                &profile_sets(direction, profile),
            ),
            PolicyElement::Class {
                direction,
                profile,
                class,
            } => push_destroy(
                &mut b,
                &class_chain(direction, profile, class),
                &class_sets(direction, profile, class),
            ),
            _ => {
                let (set, encoded) = encode(e)?.expect("a set's element");
                elements.entry(set).or_default().extend(encoded);
            }
        }
    }
    flush(&mut b, &mut elements, NFT_MSG_DESTROYSETELEM);
    last = None;
    for e in &add {
        if last != Some(kind(e)) {
            flush(&mut b, &mut elements, NFT_MSG_NEWSETELEM);
            last = Some(kind(e));
        }
        match *e {
            PolicyElement::Profile { direction, profile } => push_chain(
                &mut b,
                &profile_chain(direction, profile),
                &profile_sets(direction, profile),
                &profile_rules(direction, profile),
            ),
            PolicyElement::Class {
                direction,
                profile,
                class,
            } => push_chain(
                &mut b,
                &class_chain(direction, profile, class),
                &class_sets(direction, profile, class),
                &class_rules(direction, profile, class),
            ),
            _ => {
                let (set, encoded) = encode(e)?.expect("a set's element");
                elements.entry(set).or_default().extend(encoded);
            }
        }
    }
    flush(&mut b, &mut elements, NFT_MSG_NEWSETELEM);
    Ok(b)
}

/// One kernel transaction of a change: its removals, then its additions.
#[derive(Debug, Default)]
struct Step {
    remove: Vec<PolicyElement>,
    add: Vec<PolicyElement>,
    size: usize,
}

/// A change in one transaction, or, if it is bigger than [`MAX_ELEMENTS_PER_TRANSACTION`]
/// elements, cut into transactions of at most that many, in an order that never lets a packet
/// meet a half-made profile: first the profiles that only gain elements (new profiles: no
/// target points at them yet), then the profiles that change in place (each whole in one
/// transaction) and the targets (each target's old and new profile in one), then the profiles
/// that only lose elements (no target points at them any more). A group that must stay whole
/// and is bigger than the limit goes alone.
fn steps(remove: &[PolicyElement], add: &[PolicyElement]) -> Result<Vec<Step>> {
    let size = kernel_size(remove)? + kernel_size(add)?;
    if size == 0 {
        return Ok(Vec::new());
    }
    if size <= MAX_ELEMENTS_PER_TRANSACTION {
        // All at once: no packet sees any of it half done.
        return Ok(vec![Step {
            remove: remove.to_vec(),
            add: add.to_vec(),
            size,
        }]);
    }
    #[derive(Default)]
    struct Group {
        remove: Vec<PolicyElement>,
        add: Vec<PolicyElement>,
    }
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum By {
        Profile(Direction, ProfileId),
        Target(Direction, IpAddr),
    }
    let by = |e: &PolicyElement| match *e {
        PolicyElement::Target {
            direction, target, ..
        } => By::Target(direction, target),
        _ => By::Profile(e.direction(), e.profile()),
    };
    let mut groups: BTreeMap<By, Group> = BTreeMap::new();
    for e in remove {
        groups.entry(by(e)).or_default().remove.push(*e);
    }
    for e in add {
        groups.entry(by(e)).or_default().add.push(*e);
    }
    // Phase 0 grows profiles, 1 changes profiles and targets, 2 shrinks profiles.
    let mut ordered: Vec<(u8, Group)> = groups
        .into_iter()
        .map(|(by, g)| {
            let phase = match (&by, g.remove.is_empty(), g.add.is_empty()) {
                (By::Profile(..), true, _) => 0,
                (By::Profile(..), _, true) => 2,
                _ => 1,
            };
            (phase, g)
        })
        .collect();
    ordered.sort_by_key(|(phase, _)| *phase);
    let mut out: Vec<Step> = Vec::new();
    let mut current = Step::default();
    let mut current_phase = 0;
    for (phase, mut g) in ordered {
        // Phases never share a transaction: a later one's removals must follow the earlier
        // one's additions, and a transaction removes before it adds.
        if phase != current_phase && current.size > 0 {
            out.push(std::mem::take(&mut current));
        }
        current_phase = phase;
        if phase == 1 {
            let size = kernel_size(&g.remove)? + kernel_size(&g.add)?;
            if current.size > 0 && current.size + size > MAX_ELEMENTS_PER_TRANSACTION {
                out.push(std::mem::take(&mut current));
            }
            current.remove.extend(g.remove);
            current.add.extend(g.add);
            current.size += size;
            continue;
        }
        // Chains before what goes in them, and after what went out of them.
        g.add.sort_by_key(|e| std::cmp::Reverse(kind(e)));
        g.remove.sort_by_key(kind);
        for (e, removing) in g
            .remove
            .iter()
            .map(|e| (e, true))
            .chain(g.add.iter().map(|e| (e, false)))
        {
            let size = kernel_size(std::slice::from_ref(e))?;
            if current.size > 0 && current.size + size > MAX_ELEMENTS_PER_TRANSACTION {
                out.push(std::mem::take(&mut current));
            }
            if removing {
                current.remove.push(*e);
            } else {
                current.add.push(*e);
            }
            current.size += size;
        }
    }
    if current.size > 0 {
        out.push(current);
    }
    Ok(out)
}

/// What a change of the policy sets took: how many kernel transactions, and the longest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub transactions: usize,
    pub longest: std::time::Duration,
}

impl Applied {
    fn commit(&mut self, nl: &mut Nfnetlink, b: &Batch) -> Result<()> {
        let start = std::time::Instant::now();
        nl.commit(b)?;
        self.transactions += 1;
        self.longest = self.longest.max(start.elapsed());
        Ok(())
    }
}

/// The kernel's policy chains and sets, programmed over a socket kept open: closing an
/// nf_tables socket after a transaction that removed elements waits for the kernel to free
/// them (an RCU grace period, some 15 ms), which would be most of every change. Acts in the
/// network namespace of the thread that first uses it.
#[derive(Default)]
pub struct PolicySets {
    nl: Option<Nfnetlink>,
}

impl PolicySets {
    pub fn new() -> PolicySets {
        PolicySets::default()
    }

    /// The socket, opened on first use; dropped after an error, so the next call starts
    /// clean.
    fn with_socket<T>(&mut self, f: impl FnOnce(&mut Nfnetlink) -> Result<T>) -> Result<T> {
        let nl = match &mut self.nl {
            Some(nl) => nl,
            None => self.nl.insert(Nfnetlink::open()?),
        };
        let out = f(nl);
        if out.is_err() {
            self.nl = None;
        }
        out
    }

    /// Applies a change: `remove` (elements the kernel holds) and `add`, in one nfnetlink
    /// batch (one kernel transaction) when it has at most [`MAX_ELEMENTS_PER_TRANSACTION`]
    /// elements, else in several ordered so that each is safe on its own (see [`steps`]).
    /// On error the transactions before the failed one stay applied:
    /// [`PolicySets::replace`] is the way back to a known state.
    pub fn apply(&mut self, remove: &[PolicyElement], add: &[PolicyElement]) -> Result<Applied> {
        let steps = steps(remove, add)?;
        self.with_socket(|nl| {
            let mut applied = Applied::default();
            for step in &steps {
                applied.commit(nl, &batch(None, &step.remove, &step.add)?)?;
            }
            Ok(applied)
        })
    }

    /// Makes the kernel hold exactly `all`: at daemon start, after the table was restored, in
    /// a periodic resync. It reads what is there and writes the difference only, as
    /// [`PolicySets::apply`] does (nothing when nothing differs); the first transaction is
    /// made for the generation read (the kernel refuses it if anything changed since, and it
    /// is made again), so that what it removes is what was there. A chain whose rules someone
    /// changed is written again; a set holding elements that are not berth's is emptied and
    /// filled again in one transaction.
    pub fn replace(&mut self, all: &[PolicyElement]) -> Result<Applied> {
        let want: BTreeSet<PolicyElement> = all.iter().copied().collect();
        for e in &want {
            encode(e)?;
        }
        self.with_socket(|nl| {
            for _ in 0..TRIES {
                let generation = nl.generation()?;
                let state = read_state(nl)?;
                let got: BTreeSet<PolicyElement> = state.elements.into_iter().collect();
                let remove: Vec<PolicyElement> = got.difference(&want).copied().collect();
                let add: Vec<PolicyElement> = want.difference(&got).copied().collect();
                let mut applied = Applied::default();
                let mut first = true;
                let mut restart = false;
                for step in steps(&remove, &add)? {
                    let b = batch(first.then_some(generation), &step.remove, &step.add)?;
                    match applied.commit(nl, &b) {
                        Err(e)
                            if first && e.errno() == Some(nix::errno::Errno::ERESTART as i32) =>
                        {
                            restart = true;
                            break;
                        }
                        other => other?,
                    }
                    first = false;
                }
                if restart {
                    continue;
                }
                // A set of a chain that goes went with it.
                let kept: BTreeSet<String> = want
                    .iter()
                    .flat_map(|e| match *e {
                        PolicyElement::Profile { direction, profile } => {
                            profile_sets(direction, profile)
                        }
                        PolicyElement::Class {
                            direction,
                            profile,
                            class,
                        } => class_sets(direction, profile, class),
                        _ => Vec::new(),
                    })
                    .map(|s| s.name)
                    .chain(TARGET_MAPS.iter().map(|(name, ..)| name.to_string()))
                    .collect();
                for set in state.foreign.into_iter().filter(|s| kept.contains(s)) {
                    let mut b = Batch::default();
                    b.push(
                        NFT_MSG_DELSETELEM,
                        0,
                        set_attrs(&set),
                        format!("flush set {set}"),
                    );
                    let mut mine = Vec::new();
                    for e in &want {
                        if let Some((s, encoded)) = encode(e)?
                            && s == set
                        {
                            mine.extend(encoded);
                        }
                    }
                    mine.sort();
                    push_element_list(&mut b, NFT_MSG_NEWSETELEM, &set, &mine);
                    applied.commit(nl, &b)?;
                }
                return Ok(applied);
            }
            Err(DataplaneError::Protocol(
                "the policy sets kept changing while they were replaced".into(),
            ))
        })
    }

    /// The policy elements the kernel holds, sorted: what [`PolicySets::apply`] and
    /// [`PolicySets::replace`] wrote. Something that is not berth's (an element of someone
    /// else's, a chain's rules changed) is an error, which [`PolicySets::replace`] repairs.
    pub fn elements(&mut self) -> Result<Vec<PolicyElement>> {
        self.with_socket(|nl| {
            let generation = nl.generation()?;
            for _ in 0..TRIES {
                let state = read_state(nl)?;
                if let Some(set) = state.foreign.first() {
                    return Err(DataplaneError::Protocol(format!(
                        "set {set} holds elements that are no policy elements"
                    )));
                }
                if let Some(chain) = state.damaged.first() {
                    return Err(DataplaneError::Protocol(format!(
                        "chain {chain} does not hold berth's rules"
                    )));
                }
                if nl.generation()? == generation {
                    return Ok(state.elements);
                }
            }
            Err(DataplaneError::Protocol(
                "the policy sets kept changing while they were read".into(),
            ))
        })
    }
}

/// How often [`PolicySets::replace`] and [`PolicySets::elements`] read the sets again when
/// something changed them meanwhile.
const TRIES: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn range(first: &str, last: &str) -> AddrRange {
        AddrRange {
            first: ip(first),
            last: ip(last),
        }
    }

    const IN: Direction = Direction::Ingress;
    const EG: Direction = Direction::Egress;

    /// Each kind of set element into its set and back.
    #[test]
    fn elements_in_the_kernel_layout() {
        let target = PolicyElement::Target {
            direction: IN,
            target: ip("10.0.0.2"),
            profile: 0x0102_0304,
        };
        let (set, els) = encode(&target).unwrap().unwrap();
        assert_eq!(set, "pol_tgt_in4");
        assert_eq!(
            els,
            [Element {
                data: Some(Data::jump("pol_in_01020304".into())),
                ..Element::of(vec![10, 0, 0, 2])
            }]
        );
        let any = PolicyElement::Any {
            direction: EG,
            profile: 7,
            peers: range("fd00::", "fd00::ffff"),
        };
        let (set, els) = encode(&any).unwrap().unwrap();
        assert_eq!(set, "pol_eg_00000007_any6");
        assert_eq!(els.len(), 2);
        assert!(els[1].interval_end);
        let ports = PolicyElement::Ports {
            direction: IN,
            profile: 7,
            protocol: Protocol::Udp,
            ports: (53, 54),
            class: 3,
        };
        let (set, els) = encode(&ports).unwrap().unwrap();
        assert_eq!(set, "pol_in_00000007_udp");
        assert_eq!(els[0].key, [0, 53]);
        assert_eq!(
            els[0].data,
            Some(Data::goto("pol_in_00000007_00000003".into()))
        );
        assert_eq!(
            (els[1].key.as_slice(), els[1].interval_end),
            (&[0, 55][..], true)
        );
        let peers = PolicyElement::Peers {
            direction: IN,
            profile: 7,
            class: 3,
            peers: range("10.0.0.9", "10.0.0.9"),
        };
        assert_eq!(
            encode(&peers).unwrap().unwrap().0,
            "pol_in_00000007_00000003_4"
        );
        assert!(
            encode(&PolicyElement::Class {
                direction: IN,
                profile: 7,
                class: 3
            })
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn chain_names_parse_back() {
        assert_eq!(
            parse_chain(&profile_chain(EG, 0xdead_beef)),
            Some((EG, 0xdead_beef, None))
        );
        assert_eq!(parse_chain(&class_chain(IN, 1, 2)), Some((IN, 1, Some(2))));
        for other in [
            "policies",
            "pol_tgt_in4",
            "pol_in_1",
            "pol_xx_00000001",
            "pol_in_0000000g",
        ] {
            assert_eq!(parse_chain(other), None, "{other}");
        }
    }

    #[test]
    fn ranges_read_back_also_adjacent_and_to_the_last_key() {
        let a = range_elements(vec![10, 0, 0, 0], &[10, 0, 0, 9], None);
        let b = range_elements(vec![10, 0, 0, 10], &[255, 255, 255, 255], None);
        let mut all = [a, b].concat();
        all.reverse();
        assert_eq!(all.len(), 3, "the last range has no end");
        assert_eq!(
            ranges(&all),
            (
                vec![
                    (vec![10, 0, 0, 0], vec![10, 0, 0, 9], None),
                    (vec![10, 0, 0, 10], vec![255, 255, 255, 255], None),
                ],
                true
            )
        );
        // An end without a start is not berth's.
        let end: Vec<Element> = all.iter().filter(|e| e.interval_end).cloned().collect();
        assert_eq!(ranges(&end), (vec![], false));
    }

    #[test]
    fn mistakes_are_found_before_anything_is_sent() {
        let mixed = PolicyElement::Any {
            direction: IN,
            profile: 1,
            peers: range("10.0.0.1", "fd00::2"),
        };
        let backwards = PolicyElement::Peers {
            direction: IN,
            profile: 1,
            class: 1,
            peers: range("10.0.0.9", "10.0.0.1"),
        };
        let ports = PolicyElement::Ports {
            direction: IN,
            profile: 1,
            protocol: Protocol::Udp,
            ports: (54, 53),
            class: 1,
        };
        for e in [mixed, backwards, ports] {
            let err = encode(&e).unwrap_err();
            assert_eq!(err.errno(), None, "{err}");
        }
    }

    /// A change bigger than a transaction is cut so that profiles are whole before targets
    /// point at them and emptied only after none does.
    #[test]
    fn big_changes_are_cut_into_safe_steps() {
        let profile = |profile: u32, n: u32| -> Vec<PolicyElement> {
            let mut out = vec![PolicyElement::Profile {
                direction: IN,
                profile,
            }];
            out.extend((0..n).map(|i| PolicyElement::Any {
                direction: IN,
                profile,
                peers: AddrRange {
                    first: IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
                    last: IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
                },
            }));
            out
        };
        let target = |profile| PolicyElement::Target {
            direction: IN,
            target: ip("10.0.0.2"),
            profile,
        };
        let n = MAX_ELEMENTS_PER_TRANSACTION as u32;
        let mut remove = profile(1, n);
        remove.push(target(1));
        let mut add = profile(2, n);
        add.push(target(2));
        let steps = steps(&remove, &add).unwrap();
        assert!(steps.len() > 2);
        assert!(steps.iter().all(|s| s.size <= MAX_ELEMENTS_PER_TRANSACTION));
        let at = |e: &PolicyElement, adding: bool| {
            steps
                .iter()
                .position(|s| {
                    if adding {
                        s.add.contains(e)
                    } else {
                        s.remove.contains(e)
                    }
                })
                .unwrap()
        };
        let retarget = at(&target(2), true);
        assert_eq!(at(&target(1), false), retarget, "a target moves at once");
        assert!(add[..=n as usize].iter().all(|e| at(e, true) < retarget));
        assert!(
            remove[..=n as usize]
                .iter()
                .all(|e| at(e, false) > retarget)
        );
        // The new profile's chain comes before its elements, the old one's after them.
        assert_eq!(at(&add[0], true), 0);
        assert_eq!(at(&remove[0], false), steps.len() - 1);
        // A profile changing in place stays whole.
        let class = |class| PolicyElement::Ports {
            direction: EG,
            profile: 5,
            protocol: Protocol::Tcp,
            ports: (80, 80),
            class,
        };
        assert_eq!(super::steps(&[class(1)], &[class(2)]).unwrap().len(), 1);
    }

    #[test]
    fn the_target_maps_are_declared() {
        for (name, direction, ipv6) in TARGET_MAPS {
            assert_eq!(targets_map(direction, ipv6), name);
            let set = super::super::spec(name);
            assert_eq!(set.data, Some(VERDICT));
        }
        for legacy in LEGACY_SETS {
            assert!(super::super::SETS.iter().all(|s| s.name != legacy));
        }
    }
}
