//! Network policy (Kubernetes' NetworkPolicy) in the kernel: fixed rules that look up fixed
//! sets, so that policies and endpoints change only elements, whatever their number.
//!
//! The agent's compiler (`berth-policy`) makes [`PolicyElement`]s for each local endpoint
//! address a policy selects, the target. Each is one element (IPv4 sets named here; `...6` for
//! IPv6):
//! - `Isolated`: the target, in `pol_iso_in4` (ingress) or `pol_iso_eg4` (egress). Only what
//!   other elements allow passes in that direction.
//! - `Any`: `target . peers` in `pol_in4` or `pol_eg4`, the peers a range.
//! - `Ports`: `target . peers . protocol . ports` in `pol_in_ports4` or `pol_eg_ports4`, the
//!   ports a range of the destination's (the target's for ingress, the peer's for egress).
//!
//! Chain `policies` (`policy` is a keyword of nft's language) is jumped to from `forward`
//! first thing after the operator's chain, and from `input` for what comes from a network (so
//! that a container's connections to its gateway are subject to its egress policy). There,
//! packets of connections already let through pass, and so does neighbour discovery (which
//! conntrack does not track); a packet to an isolated target goes through `policy_in4`, one
//! from an isolated target through `policy_eg4`, where what no element allows is counted and
//! dropped. Passing is `return`, never `accept`: the rest of `forward` (the networks'
//! isolation) still decides.
//!
//! Taking a permission back stops new connections; those it let through go on until the
//! caller deletes their conntrack entries ([`crate::conntrack::delete_flows_where`]). The next
//! packet of such a flow is then new to conntrack, which would take a mid-stream TCP segment
//! for the start of a connection of its sender's, and let the other side's answers through
//! as replies: so a TCP packet that is new and no bare SYN, to or from an isolated target, is
//! dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use berth_model::Protocol;
use berth_policy::{AddrRange, Direction, PolicyElement};

use super::nfnl::{
    Batch, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYSETELEM, NFT_MSG_NEWSETELEM, Nfnetlink,
};
use super::{
    Element, Rule, family, ip_bytes, parse_ip, port_bytes, push_elements, read_elements, rule, spec,
};
use crate::{DataplaneError, Result};

/// The chain every policy decision starts in.
pub(super) const CHAIN: &str = "policies";

/// What a policy set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Isolated,
    /// `Any` elements with a range of peers.
    Any,
    /// `Ports` elements with a range of peers or ports.
    Ports,
    /// `Any` elements of one peer.
    AnyExact,
    /// `Ports` elements of one peer and one port.
    PortsExact,
}

/// The set of elements of this kind, direction and family.
fn set_name(kind: Kind, direction: Direction, ipv6: bool) -> &'static str {
    let (before, after) = match kind {
        Kind::Isolated => ("iso_", ""),
        Kind::Any => ("", ""),
        Kind::Ports => ("", "_ports"),
        Kind::AnyExact => ("", "_exact"),
        Kind::PortsExact => ("", "_ports_exact"),
    };
    let name = format!(
        "pol_{before}{}{after}{}",
        direction_suffix(direction),
        if ipv6 { 6 } else { 4 }
    );
    spec(&name).name
}

fn direction_suffix(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "in",
        Direction::Egress => "eg",
    }
}

/// The chain where a packet to (ingress) or from (egress) an isolated target of this family
/// must find an element that allows it.
fn chain(direction: Direction, ipv6: bool) -> String {
    format!(
        "policy_{}{}",
        direction_suffix(direction),
        if ipv6 { 6 } else { 4 }
    )
}

/// Every policy set: by kind, direction and family.
fn all_sets() -> impl Iterator<Item = (Kind, Direction, bool)> {
    [
        Kind::Isolated,
        Kind::Any,
        Kind::Ports,
        Kind::AnyExact,
        Kind::PortsExact,
    ]
    .into_iter()
    .flat_map(|k| [Direction::Ingress, Direction::Egress].map(|d| (k, d)))
    .flat_map(|(k, d)| [false, true].map(|ipv6| (k, d, ipv6)))
}

/// The rules of `input`, `policies` and the `policy_*` chains (the jump from `forward`, right
/// after the operator's, is in [`super::rules`]).
/// fe80::/10, as nft matches it: the whole address masked.
const LINK_LOCAL_MASK: [u8; 16] = [0xff, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const LINK_LOCAL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

pub(super) fn rules() -> Vec<Rule> {
    use super::expr::{
        Base::{Network, Transport},
        CT_ESTABLISHED_RELATED, CT_NEW, CtKey, ICMPV6_ND, IPPROTO_ICMPV6, IPPROTO_TCP,
        MetaKey::{IifName, L4Proto},
        REG1, TCP_FIN_SYN_RST_ACK, TCP_FLAGS_OFFSET, TCP_SYN, and, and_bytes, and_u8, cmp_eq,
        cmp_neq, counter, ct, drop, hton, jump, lookup, lookup_anonymous, meta, nonzero, payload,
        reg, ret,
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
    let addrs = |ipv6: bool| {
        if ipv6 {
            ("ip6", 16, [("saddr", 8), ("daddr", 24)])
        } else {
            ("ip", 4, [("saddr", 12), ("daddr", 16)])
        }
    };
    // A flow whose conntrack entry was deleted, picked up mid-stream (see the module's
    // documentation).
    for ipv6 in [false, true] {
        let (ip, len, ends) = addrs(ipv6);
        for (end, offset) in ends {
            for direction in [Direction::Ingress, Direction::Egress] {
                let isolated = set_name(Kind::Isolated, direction, ipv6);
                all.push(rule(
                    CHAIN,
                    &format!(
                        "tcp flags & (fin | syn | rst | ack) != syn ct state new {ip} {end} @{isolated} drop"
                    ),
                    &[
                        vec![
                            meta(L4Proto, REG1),
                            cmp_eq(REG1, &[IPPROTO_TCP]),
                            payload(Transport, TCP_FLAGS_OFFSET, 1, REG1),
                            and_u8(REG1, TCP_FIN_SYN_RST_ACK),
                            cmp_neq(REG1, &[TCP_SYN]),
                            ct(CtKey::State, REG1),
                            and(REG1, CT_NEW),
                            nonzero(REG1),
                        ],
                        family(ipv6),
                        vec![payload(Network, offset, len, REG1), lookup(REG1, isolated), drop()],
                    ],
                ));
            }
        }
    }
    // Ingress first: a packet between two isolated targets needs both sides' leave.
    for direction in [Direction::Ingress, Direction::Egress] {
        for ipv6 in [false, true] {
            let (ip, len, [saddr, daddr]) = addrs(ipv6);
            let (end, offset) = match direction {
                Direction::Ingress => daddr,
                Direction::Egress => saddr,
            };
            let isolated = set_name(Kind::Isolated, direction, ipv6);
            let to = chain(direction, ipv6);
            all.push(rule(
                CHAIN,
                &format!("{ip} {end} @{isolated} jump {to}"),
                &[
                    family(ipv6),
                    vec![
                        payload(Network, offset, len, REG1),
                        lookup(REG1, isolated),
                        jump(&to),
                    ],
                ],
            ));
        }
    }
    // Keys are target . peer (. protocol . destination port), each from a 4-byte boundary.
    for direction in [Direction::Ingress, Direction::Egress] {
        for ipv6 in [false, true] {
            let (ip, len, [saddr, daddr]) = addrs(ipv6);
            let ((target, t), (peer, p)) = match direction {
                Direction::Ingress => (daddr, saddr),
                Direction::Egress => (saddr, daddr),
            };
            let here = chain(direction, ipv6);
            let any_exact = set_name(Kind::AnyExact, direction, ipv6);
            let ports_exact = set_name(Kind::PortsExact, direction, ipv6);
            let any = set_name(Kind::Any, direction, ipv6);
            let ports = set_name(Kind::Ports, direction, ipv6);
            let key = || {
                let mut k = family(ipv6);
                k.extend([
                    payload(Network, t, len, REG1),
                    payload(Network, p, len, reg(len)),
                ]);
                k
            };
            // The hashed sets first: most elements are there.
            all.push(rule(
                &here,
                &format!("{ip} {target} . {ip} {peer} @{any_exact} return"),
                &[key(), vec![lookup(REG1, any_exact), ret()]],
            ));
            all.push(rule(
                &here,
                &format!(
                    "{ip} {target} . {ip} {peer} . meta l4proto . th dport @{ports_exact} return"
                ),
                &[
                    key(),
                    vec![
                        meta(L4Proto, reg(2 * len)),
                        payload(Transport, 2, 2, reg(2 * len + 4)),
                        lookup(REG1, ports_exact),
                        ret(),
                    ],
                ],
            ));
            all.push(rule(
                &here,
                &format!("{ip} {target} . {ip} {peer} @{any} return"),
                &[key(), vec![lookup(REG1, any), ret()]],
            ));
            // No protocol check: the protocol is part of the key, and only elements of TCP,
            // UDP and SCTP have one. nft puts the protocol in network order, as an interval
            // set's ranges need (which, of one byte, changes nothing).
            all.push(rule(
                &here,
                &format!("{ip} {target} . {ip} {peer} . meta l4proto . th dport @{ports} return"),
                &[
                    key(),
                    vec![
                        meta(L4Proto, reg(2 * len)),
                        hton(reg(2 * len), 2, 1),
                        payload(Transport, 2, 2, reg(2 * len + 4)),
                        lookup(REG1, ports),
                        ret(),
                    ],
                ],
            ));
            all.push(rule(&here, "counter drop", &[vec![counter(), drop()]]));
        }
    }
    all
}

/// A caller's mistake, found before anything is sent.
fn invalid(e: &PolicyElement, why: &str) -> DataplaneError {
    DataplaneError::io(
        format!("policy element {e:?}: {why}"),
        std::io::Error::from(std::io::ErrorKind::InvalidInput),
    )
}

/// An element's set and the element in the kernel's layout: `Isolated` the target's address;
/// the others from `target . first peer (. protocol . first port)` to
/// `target . last peer (. protocol . last port)`, each field from a 4-byte boundary, addresses
/// and ports in network order.
fn encode(e: &PolicyElement) -> Result<(&'static str, Element)> {
    let (kind, direction, target, peers, ports) = match *e {
        PolicyElement::Isolated { direction, target } => {
            let set = set_name(Kind::Isolated, direction, target.is_ipv6());
            return Ok((set, Element::of(ip_bytes(target))));
        }
        PolicyElement::Any {
            direction,
            target,
            peers,
        } => (Kind::Any, direction, target, peers, None),
        PolicyElement::Ports {
            direction,
            target,
            peers,
            protocol,
            ports,
        } => (
            Kind::Ports,
            direction,
            target,
            peers,
            Some((protocol, ports)),
        ),
    };
    if peers.first.is_ipv6() != target.is_ipv6() || peers.last.is_ipv6() != target.is_ipv6() {
        return Err(invalid(
            e,
            "peers of another address family than the target",
        ));
    }
    if peers.first > peers.last {
        return Err(invalid(e, "peers' first address after their last"));
    }
    let end = |peer: IpAddr, port: Option<u16>| {
        let mut k = ip_bytes(target);
        k.extend(ip_bytes(peer));
        if let (Some((protocol, _)), Some(port)) = (ports, port) {
            k.extend([protocol.number(), 0, 0, 0]);
            k.extend(port_bytes(port));
        }
        k
    };
    let (lo, hi) = match ports {
        Some((_, (lo, hi))) if lo > hi => return Err(invalid(e, "first port after the last")),
        Some((_, (lo, hi))) => (Some(lo), Some(hi)),
        None => (None, None),
    };
    // One peer and one port: the hashed set's, whose elements have no end.
    if peers.first == peers.last && lo == hi {
        let kind = match kind {
            Kind::Any => Kind::AnyExact,
            _ => Kind::PortsExact,
        };
        let element = Element::of(end(peers.first, lo));
        return Ok((set_name(kind, direction, target.is_ipv6()), element));
    }
    let element = Element {
        key_end: Some(end(peers.last, hi)),
        ..Element::of(end(peers.first, lo))
    };
    Ok((set_name(kind, direction, target.is_ipv6()), element))
}

/// The policy element that `e` of this kind, direction and family of set is; `None` for one
/// that [`encode`] makes of none.
fn decode(kind: Kind, direction: Direction, ipv6: bool, e: &Element) -> Option<PolicyElement> {
    let a = if ipv6 { 16 } else { 4 };
    if kind == Kind::Isolated {
        let target = parse_ip(&e.key).filter(|_| e.key_end.is_none())?;
        return Some(PolicyElement::Isolated { direction, target });
    }
    let end = e.key_end.as_deref().unwrap_or(&e.key);
    let (target, first) = e.key.split_at_checked(a)?;
    let (target_end, last) = end.split_at_checked(a)?;
    let (first, first_rest) = first.split_at_checked(a)?;
    let (last, last_rest) = last.split_at_checked(a)?;
    if target != target_end {
        return None;
    }
    let target = parse_ip(target)?;
    let peers = AddrRange {
        first: parse_ip(first)?,
        last: parse_ip(last)?,
    };
    if matches!(kind, Kind::Any | Kind::AnyExact) {
        return (first_rest.is_empty() && last_rest.is_empty()).then_some(PolicyElement::Any {
            direction,
            target,
            peers,
        });
    }
    // protocol (1 byte and 3 of padding) . port (2 bytes and 2 of padding)
    let proto_port = |rest: &[u8]| match *rest {
        [proto, 0, 0, 0, hi, lo, 0, 0] => Some((proto, u16::from_be_bytes([hi, lo]))),
        _ => None,
    };
    let (proto, lo) = proto_port(first_rest)?;
    let (proto_end, hi) = proto_port(last_rest)?;
    let protocol = Protocol::from_number(proto).filter(|_| proto == proto_end)?;
    Some(PolicyElement::Ports {
        direction,
        target,
        peers,
        protocol,
        ports: (lo, hi),
    })
}

/// `elements` in the kernel's layout, by set; each set's sorted, without duplicates.
fn by_set(elements: &[PolicyElement]) -> Result<BTreeMap<&'static str, Vec<Element>>> {
    let mut out: BTreeMap<&'static str, Vec<Element>> = BTreeMap::new();
    for e in elements {
        let (set, element) = encode(e)?;
        out.entry(set).or_default().push(element);
    }
    for elements in out.values_mut() {
        elements.sort();
        elements.dedup();
    }
    Ok(out)
}

/// The kernel's policy sets, programmed over a socket kept open: closing an nf_tables socket
/// after a transaction that removed elements waits for the kernel to free them (an RCU grace
/// period, some 15 ms), which would be most of every change. Acts in the network namespace
/// of the thread that first uses it.
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

    /// Applies a change in one nfnetlink batch (one kernel transaction): `remove` first, then
    /// `add`, so that an element may be replaced by an overlapping one. On error nothing
    /// changed.
    ///
    /// Pass only elements the kernel holds in `remove`: one it does not hold is ignored, but
    /// for `Any` and `Ports` the kernel deletes whichever element of the set holds the removed
    /// one's first key (target, first peer, protocol and first port), not only an equal one.
    /// An added element that partly overlaps one of its target's is refused, and the whole
    /// batch with it. [`PolicySets::replace`] is the way back to a known state.
    pub fn apply(&mut self, remove: &[PolicyElement], add: &[PolicyElement]) -> Result<()> {
        let mut b = Batch::default();
        for (set, elements) in by_set(remove)? {
            push_elements(&mut b, NFT_MSG_DESTROYSETELEM, spec(set), &elements);
        }
        for (set, elements) in by_set(add)? {
            push_elements(&mut b, NFT_MSG_NEWSETELEM, spec(set), &elements);
        }
        self.with_socket(|nl| nl.commit(&b))
    }

    /// Makes the policy sets hold exactly `all`, in one batch (one kernel transaction), so
    /// that no packet ever sees them empty or half-written: at daemon start, after the table
    /// was restored, in a periodic resync. On error nothing changed.
    ///
    /// It reads the sets and writes the difference only: the kernel's cost of deleting an
    /// element of an interval set of a concatenation grows with the set, so flushing 10,000
    /// elements and adding them again would hold every change to nftables up for seconds. The
    /// batch is made for the generation read (the kernel refuses it if anything changed since;
    /// it is then made again), so that what it deletes is exactly what was there, elements
    /// someone else added included. Nothing is written when nothing differs.
    pub fn replace(&mut self, all: &[PolicyElement]) -> Result<()> {
        let want = by_set(all)?;
        self.with_socket(|nl| {
            for _ in 0..TRIES {
                let mut b = Batch::at_generation(nl.generation()?);
                let mut missing = Vec::new();
                for (kind, direction, ipv6) in all_sets() {
                    let set = spec(set_name(kind, direction, ipv6));
                    let (got, _) = read(nl, set.name)?;
                    let got: BTreeSet<&Element> = got.iter().collect();
                    let wanted: BTreeSet<&Element> =
                        want.get(set.name).into_iter().flatten().collect();
                    let stale: Vec<Element> =
                        got.difference(&wanted).map(|e| (*e).clone()).collect();
                    push_elements(&mut b, NFT_MSG_DELSETELEM, set, &stale);
                    let new: Vec<Element> = wanted.difference(&got).map(|e| (*e).clone()).collect();
                    missing.push((set, new));
                }
                for (set, elements) in &missing {
                    push_elements(&mut b, NFT_MSG_NEWSETELEM, set, elements);
                }
                match nl.commit(&b) {
                    Err(e) if e.errno() == Some(nix::errno::Errno::ERESTART as i32) => continue,
                    done => return done,
                }
            }
            Err(DataplaneError::Protocol(
                "the policy sets kept changing while they were replaced".into(),
            ))
        })
    }

    /// The policy elements the kernel holds, sorted: what [`PolicySets::apply`] and
    /// [`PolicySets::replace`] wrote. An element that is no [`PolicyElement`] (someone
    /// else's) is an error, which [`PolicySets::replace`] repairs.
    pub fn elements(&mut self) -> Result<Vec<PolicyElement>> {
        self.with_socket(|nl| {
            for _ in 0..TRIES {
                let mut out = Vec::new();
                let mut consistent = true;
                for (kind, direction, ipv6) in all_sets() {
                    let set = set_name(kind, direction, ipv6);
                    let (elements, c) = read(nl, set)?;
                    consistent &= c;
                    for e in &elements {
                        out.push(decode(kind, direction, ipv6, e).ok_or_else(|| {
                            DataplaneError::Protocol(format!(
                                "set {set} holds an element that is no policy element: {e:?}"
                            ))
                        })?);
                    }
                }
                if consistent {
                    out.sort();
                    return Ok(out);
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

/// A policy set's elements, and whether they stayed put while they were read.
fn read(nl: &mut Nfnetlink, set: &str) -> Result<(Vec<Element>, bool)> {
    read_elements(nl, set)?.map_err(|errno| DataplaneError::Kernel {
        op: format!("read nftables set {set}"),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

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

    #[test]
    fn elements_in_the_kernel_layout_and_back() {
        // As `nft --debug=netlink` shows
        // `10.0.0.2 . 10.0.1.0-10.0.1.255 . tcp . 80-90` in `pol_in_ports4`.
        let e = PolicyElement::Ports {
            direction: Direction::Ingress,
            target: ip("10.0.0.2"),
            peers: range("10.0.1.0", "10.0.1.255"),
            protocol: Protocol::Tcp,
            ports: (80, 90),
        };
        let (set, el) = encode(&e).unwrap();
        assert_eq!(set, "pol_in_ports4");
        assert_eq!(el.key, [10, 0, 0, 2, 10, 0, 1, 0, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(
            el.key_end.as_deref(),
            Some(&[10, 0, 0, 2, 10, 0, 1, 255, 6, 0, 0, 0, 0, 90, 0, 0][..])
        );
        assert_eq!(decode(Kind::Ports, Direction::Ingress, false, &el), Some(e));

        let any = PolicyElement::Any {
            direction: Direction::Egress,
            target: ip("fd00::2"),
            peers: range("fd00::", "fd00::ffff"),
        };
        let (set, el) = encode(&any).unwrap();
        assert_eq!((set, el.key.len()), ("pol_eg6", 32));
        assert_eq!(decode(Kind::Any, Direction::Egress, true, &el), Some(any));
        // Not of its set's layout: of no element.
        assert_eq!(decode(Kind::Ports, Direction::Egress, true, &el), None);

        let iso = PolicyElement::Isolated {
            direction: Direction::Egress,
            target: ip("10.0.0.2"),
        };
        let (set, el) = encode(&iso).unwrap();
        assert_eq!((set, el.key_end.is_none()), ("pol_iso_eg4", true));
        assert_eq!(
            decode(Kind::Isolated, Direction::Egress, false, &el),
            Some(iso)
        );
    }

    #[test]
    fn mistakes_are_found_before_anything_is_sent() {
        let mixed = PolicyElement::Any {
            direction: Direction::Ingress,
            target: ip("10.0.0.2"),
            peers: range("fd00::1", "fd00::2"),
        };
        let backwards = PolicyElement::Any {
            direction: Direction::Ingress,
            target: ip("10.0.0.2"),
            peers: range("10.0.0.9", "10.0.0.1"),
        };
        let ports = PolicyElement::Ports {
            direction: Direction::Ingress,
            target: ip("10.0.0.2"),
            peers: range("10.0.0.1", "10.0.0.1"),
            protocol: Protocol::Udp,
            ports: (54, 53),
        };
        for e in [mixed, backwards, ports] {
            let err = encode(&e).unwrap_err();
            assert_eq!(err.errno(), None, "{err}");
        }
    }

    #[test]
    fn one_peer_and_one_port_go_to_the_hashed_sets() {
        let one = PolicyElement::Ports {
            direction: Direction::Egress,
            target: ip("fd00::2"),
            peers: range("fd00::3", "fd00::3"),
            protocol: Protocol::Udp,
            ports: (53, 53),
        };
        let (set, el) = encode(&one).unwrap();
        assert_eq!(set, "pol_eg_ports_exact6");
        assert!(el.key_end.is_none());
        assert_eq!(
            decode(Kind::PortsExact, Direction::Egress, true, &el),
            Some(one)
        );
        let any = PolicyElement::Any {
            direction: Direction::Ingress,
            target: ip("10.0.0.2"),
            peers: range("10.0.0.3", "10.0.0.3"),
        };
        let (set, el) = encode(&any).unwrap();
        assert_eq!(set, "pol_in_exact4");
        assert_eq!(
            decode(Kind::AnyExact, Direction::Ingress, false, &el),
            Some(any)
        );
        // A range of ports (or of peers) stays in the interval set.
        let range_of_ports = PolicyElement::Ports {
            direction: Direction::Egress,
            target: ip("fd00::2"),
            peers: range("fd00::3", "fd00::3"),
            protocol: Protocol::Udp,
            ports: (53, 54),
        };
        assert_eq!(encode(&range_of_ports).unwrap().0, "pol_eg_ports6");
    }

    #[test]
    fn every_policy_set_is_declared() {
        use super::super::{Owner, SETS};
        assert_eq!(all_sets().count(), 20);
        let owned = SETS.iter().filter(|s| s.owner == Owner::Policy).count();
        assert_eq!(owned, 20);
        for (kind, direction, ipv6) in all_sets() {
            assert_eq!(spec(set_name(kind, direction, ipv6)).owner, Owner::Policy);
        }
    }
}
