//! Interval arithmetic on addresses and ports. The kernel refuses set elements with
//! concatenated ranges that partly overlap, so what the rules allow is cut here into disjoint
//! pieces that cover exactly the same connections.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use berth_model::Protocol;
use ipnet::IpNet;

/// The addresses `.0` to `.1` (both included) of one family, as numbers.
pub(crate) type Span = (u128, u128);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

/// An address as its family and its number, so both families share the arithmetic.
pub(crate) fn split(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

/// The inverse of [`split`]. IPv4 numbers come from IPv4 addresses and spans within them, so
/// they never exceed `u32::MAX` and the cast loses nothing.
pub(crate) fn join(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Sorted, disjoint and non-adjacent spans covering exactly the union of `spans`.
pub(crate) fn merge(mut spans: Vec<Span>) -> Vec<Span> {
    spans.retain(|s| s.0 <= s.1);
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (lo, hi) in spans {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The part of `from` outside `minus`; both sorted and disjoint (as [`merge`] makes them).
pub(crate) fn subtract(from: &[Span], minus: &[Span]) -> Vec<Span> {
    let mut out = Vec::with_capacity(from.len());
    let mut first = 0;
    for &(lo, hi) in from {
        while first < minus.len() && minus[first].1 < lo {
            first += 1;
        }
        let mut lo = Some(lo);
        for &(mlo, mhi) in minus[first..].iter().take_while(|m| m.0 <= hi) {
            let Some(l) = lo else { break };
            if mlo > l {
                out.push((l, mlo - 1));
            }
            // `None`: the rest of this span is covered.
            lo = (mhi < hi).then(|| mhi + 1);
        }
        if let Some(l) = lo {
            out.push((l, hi));
        }
    }
    out
}

/// Addresses of both families as merged spans: a set of peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Spans {
    v4: Vec<Span>,
    v6: Vec<Span>,
}

impl Spans {
    /// Every address of both families.
    pub(crate) fn all() -> Spans {
        Spans {
            v4: vec![(0, u128::from(u32::MAX))],
            v6: vec![(0, u128::MAX)],
        }
    }

    pub(crate) fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> Spans {
        let mut s = Spans::default();
        for ip in addrs {
            let (f, n) = split(ip);
            s.family_mut(f).push((n, n));
        }
        s.merged()
    }

    /// The addresses of `net` but of none of `except`.
    pub(crate) fn from_cidr(net: &IpNet, except: &[IpNet]) -> Spans {
        let span = |n: &IpNet| {
            let (f, lo) = split(n.network());
            let (_, hi) = split(n.broadcast());
            (f, (lo, hi))
        };
        let (f, whole) = span(net);
        let mut s = Spans::default();
        s.family_mut(f).push(whole);
        let mut minus = Spans::default();
        for e in except {
            let (f, sp) = span(e);
            minus.family_mut(f).push(sp);
        }
        s.minus(&minus.merged())
    }

    /// The union of the two.
    pub(crate) fn union(mut self, other: &Spans) -> Spans {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
        self.merged()
    }

    pub(crate) fn minus(&self, other: &Spans) -> Spans {
        Spans {
            v4: subtract(&self.v4, &other.v4),
            v6: subtract(&self.v6, &other.v6),
        }
    }

    pub(crate) fn family(&self, f: Family) -> &[Span] {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    fn family_mut(&mut self, f: Family) -> &mut Vec<Span> {
        match f {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    fn merged(self) -> Spans {
        Spans {
            v4: merge(self.v4),
            v6: merge(self.v6),
        }
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let (f, n) = split(ip);
        let spans = self.family(f);
        // The last span starting at or before `n` is the only one that can hold it.
        let i = spans.partition_point(|s| s.0 <= n);
        i > 0 && spans[i - 1].1 >= n
    }
}

/// A protocol's ports, first to last.
pub(crate) type PortRange = (Protocol, u16, u16);

/// The ports of `ranges` (each tagged with the clause it comes from) cut into disjoint
/// ranges, each with the clauses that allow all of it (sorted, without repeats): a sweep over
/// each protocol's ports, consecutive ranges with the same clauses merged. The output grows
/// with the number of ranges, whatever the peers.
pub(crate) fn port_groups(ranges: &[(usize, PortRange)]) -> Vec<(PortRange, Vec<usize>)> {
    // (protocol, port, starts) events: a range adds its clause at its first port and takes
    // it away after its last (at 65536, past every port).
    let mut events: Vec<(Protocol, u32, bool, usize)> = Vec::with_capacity(ranges.len() * 2);
    for &(clause, (protocol, lo, hi)) in ranges.iter().filter(|(_, r)| r.1 <= r.2) {
        events.push((protocol, u32::from(lo), true, clause));
        events.push((protocol, u32::from(hi) + 1, false, clause));
    }
    events.sort_unstable();
    let mut out: Vec<(PortRange, Vec<usize>)> = Vec::new();
    let mut active: BTreeMap<usize, usize> = BTreeMap::new();
    let mut i = 0;
    while i < events.len() {
        let (protocol, at, ..) = events[i];
        while i < events.len() && events[i].0 == protocol && events[i].1 == at {
            let (_, _, starts, clause) = events[i];
            if starts {
                *active.entry(clause).or_default() += 1;
            } else if let Some(n) = active.get_mut(&clause) {
                *n -= 1;
                if *n == 0 {
                    active.remove(&clause);
                }
            }
            i += 1;
        }
        let next = match events.get(i) {
            Some(&(p, n, ..)) if p == protocol => n,
            // Every range of the protocol has ended by then.
            _ => continue,
        };
        if active.is_empty() {
            continue;
        }
        let clauses: Vec<usize> = active.keys().copied().collect();
        // Ports are at most 65535, so `at` and `next - 1` fit.
        let (lo, hi) = (at as u16, (next - 1) as u16);
        match out.last_mut() {
            Some(((p, _, last), c))
                if *p == protocol && u32::from(*last) + 1 == at && *c == clauses =>
            {
                *last = hi
            }
            _ => out.push(((protocol, lo, hi), clauses)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn port_ranges() -> impl Strategy<Value = Vec<(usize, PortRange)>> {
        let range = (0usize..4, any::<bool>(), 0u16..12, 0u16..12, any::<bool>()).prop_map(
            |(clause, udp, a, b, top)| {
                let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
                // Some at the very top of the ports, where nothing comes after.
                let base = if top { u16::MAX - 11 } else { 0 };
                (clause, (protocol, base + a.min(b), base + a.max(b)))
            },
        );
        proptest::collection::vec(range, 0..8)
    }

    proptest! {
        /// Every port is in the group of exactly the clauses whose ranges hold it, groups
        /// never overlap, and the same input in any order makes the same groups.
        #[test]
        fn port_groups_cover_exactly_the_clauses(input in port_ranges()) {
            let out = port_groups(&input);
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                for port in (0..14u16).chain(u16::MAX - 13..=u16::MAX) {
                    let want: Vec<usize> = {
                        let mut w: Vec<usize> = input
                            .iter()
                            .filter(|(_, (p, lo, hi))| *p == protocol && *lo <= port && port <= *hi)
                            .map(|(c, _)| *c)
                            .collect();
                        w.sort_unstable();
                        w.dedup();
                        w
                    };
                    let got: Vec<&Vec<usize>> = out
                        .iter()
                        .filter(|((p, lo, hi), _)| *p == protocol && *lo <= port && port <= *hi)
                        .map(|(_, c)| c)
                        .collect();
                    if want.is_empty() {
                        prop_assert!(got.is_empty(), "{:?} {}: {:?}", protocol, port, got);
                    } else {
                        prop_assert_eq!(got, vec![&want], "{:?} {}", protocol, port);
                    }
                }
            }
            let mut shuffled = input.clone();
            shuffled.reverse();
            prop_assert_eq!(port_groups(&shuffled), out);
        }

        /// Merging and subtracting spans agree with sets of points, also at the top end.
        #[test]
        fn spans_merge_and_subtract_like_sets(
            high in any::<bool>(),
            a in proptest::collection::vec((0u128..24, 0u128..24), 0..6),
            b in proptest::collection::vec((0u128..24, 0u128..24), 0..6),
        ) {
            let base = if high { u128::MAX - 23 } else { 0 };
            let spans = |v: &[(u128, u128)]| {
                merge(v.iter().map(|&(x, y)| (base + x.min(y), base + x.max(y))).collect())
            };
            let inside = |s: &[Span], n: u128| s.iter().any(|&(lo, hi)| lo <= n && n <= hi);
            let (ma, mb) = (spans(&a), spans(&b));
            let diff = subtract(&ma, &mb);
            for w in ma.windows(2).chain(diff.windows(2)) {
                prop_assert!(w[0].1 < w[1].0 && w[0].1 + 1 < w[1].0, "{:?} {:?}", ma, diff);
            }
            for n in base..=base + 23 {
                let in_a = a.iter().any(|&(x, y)| base + x.min(y) <= n && n <= base + x.max(y));
                let in_b = b.iter().any(|&(x, y)| base + x.min(y) <= n && n <= base + x.max(y));
                prop_assert_eq!(inside(&ma, n), in_a);
                prop_assert_eq!(inside(&diff, n), in_a && !in_b);
            }
        }
    }

    #[test]
    fn a_cidr_minus_its_excepts() {
        let s = Spans::from_cidr(
            &"10.0.0.0/24".parse().unwrap(),
            &[
                "10.0.0.0/26".parse().unwrap(),
                "10.0.0.128/25".parse().unwrap(),
            ],
        );
        assert_eq!(s.family(Family::V4), &[(0x0a00_0040, 0x0a00_007f)]);
        assert!(s.family(Family::V6).is_empty());
        assert!(s.contains("10.0.0.64".parse().unwrap()));
        assert!(!s.contains("10.0.0.63".parse().unwrap()));
        assert!(!s.contains("10.0.0.128".parse().unwrap()));
        let all = Spans::from_cidr(&"::/0".parse().unwrap(), &[]);
        assert!(all.contains("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap()));
        assert!(!all.contains("10.0.0.1".parse().unwrap()));
    }
}
