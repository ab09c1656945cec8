//! Interval arithmetic on addresses and ports. The kernel refuses set elements with
//! concatenated ranges that partly overlap, so what the rules allow is cut here into disjoint
//! pieces that cover exactly the same connections.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// Connections to the ports `ports.0..=ports.1` of the peers in `peers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rect {
    pub(crate) peers: Span,
    pub(crate) ports: (u16, u16),
}

/// Disjoint rectangles covering exactly the union of `rects`, sorted by peers then ports.
///
/// A sweep over the peers: between two consecutive peer boundaries the same rectangles apply,
/// so the union of their port ranges is exact there; consecutive peer intervals with the same
/// port ranges are merged, so a rule over a CIDR stays one element per port range.
pub(crate) fn disjoint(rects: &[Rect]) -> Vec<Rect> {
    let mut starts: Vec<(u128, (u16, u16))> = Vec::with_capacity(rects.len());
    let mut ends: Vec<(u128, (u16, u16))> = Vec::with_capacity(rects.len());
    let mut bounds: Vec<u128> = Vec::with_capacity(rects.len() * 2);
    for r in rects
        .iter()
        .filter(|r| r.peers.0 <= r.peers.1 && r.ports.0 <= r.ports.1)
    {
        starts.push((r.peers.0, r.ports));
        ends.push((r.peers.1, r.ports));
        bounds.push(r.peers.0);
        // A rectangle reaching the very last address ends with the sweep.
        bounds.extend(r.peers.1.checked_add(1));
    }
    starts.sort_unstable();
    ends.sort_unstable();
    bounds.sort_unstable();
    bounds.dedup();

    // Port ranges of the rectangles over the current peer interval, with multiplicity.
    let mut active: BTreeMap<(u16, u16), usize> = BTreeMap::new();
    let (mut s, mut e) = (0, 0);
    // Peer intervals with their (merged) port ranges, consecutive equal ones merged.
    let mut groups: Vec<(Span, Vec<(u16, u16)>)> = Vec::new();
    for (i, &at) in bounds.iter().enumerate() {
        while e < ends.len() && ends[e].0 < at {
            if let Some(n) = active.get_mut(&ends[e].1) {
                *n -= 1;
                if *n == 0 {
                    active.remove(&ends[e].1);
                }
            }
            e += 1;
        }
        while s < starts.len() && starts[s].0 <= at {
            *active.entry(starts[s].1).or_default() += 1;
            s += 1;
        }
        if active.is_empty() {
            continue;
        }
        let hi = bounds.get(i + 1).map_or(u128::MAX, |next| next - 1);
        let ports = merge_ports(active.keys().copied());
        match groups.last_mut() {
            Some((span, p)) if span.1.checked_add(1) == Some(at) && *p == ports => span.1 = hi,
            _ => groups.push(((at, hi), ports)),
        }
    }
    groups
        .into_iter()
        .flat_map(|(peers, ports)| ports.into_iter().map(move |ports| Rect { peers, ports }))
        .collect()
}

/// Sorted port ranges merged into disjoint, non-adjacent ones.
fn merge_ports(sorted: impl Iterator<Item = (u16, u16)>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in sorted {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Small rectangles placed either at the bottom of the address space or at its very top,
    /// where a boundary past the last address does not exist.
    fn rects() -> impl Strategy<Value = (u128, Vec<Rect>)> {
        let base = prop_oneof![Just(0u128), Just(u128::MAX - 15)];
        let rect = (0u128..16, 0u128..16, 0u16..12, 0u16..12)
            .prop_map(|(a, b, c, d)| (a.min(b), a.max(b), c.min(d), c.max(d)));
        (base, proptest::collection::vec(rect, 0..8)).prop_map(|(base, rs)| {
            let rects = rs
                .into_iter()
                .map(|(a, b, c, d)| Rect {
                    peers: (base + a, base + b),
                    ports: (c, d),
                })
                .collect();
            (base, rects)
        })
    }

    fn covers(r: &Rect, peer: u128, port: u16) -> bool {
        r.peers.0 <= peer && peer <= r.peers.1 && r.ports.0 <= port && port <= r.ports.1
    }

    fn overlap(a: &Rect, b: &Rect) -> bool {
        a.peers.0 <= b.peers.1
            && b.peers.0 <= a.peers.1
            && a.ports.0 <= b.ports.1
            && b.ports.0 <= a.ports.1
    }

    proptest! {
        /// The output covers exactly the points of the input, with no two pieces overlapping,
        /// in a canonical order (so the same input always makes the same elements).
        #[test]
        fn disjoint_rectangles_cover_exactly_the_union((base, input) in rects()) {
            let out = disjoint(&input);
            for peer in base..=base.saturating_add(15) {
                for port in 0..14 {
                    prop_assert_eq!(
                        out.iter().any(|r| covers(r, peer, port)),
                        input.iter().any(|r| covers(r, peer, port)),
                        "peer {} port {}", peer - base, port
                    );
                }
            }
            for (i, a) in out.iter().enumerate() {
                for b in &out[i + 1..] {
                    prop_assert!(!overlap(a, b), "{:?} overlaps {:?}", a, b);
                }
            }
            let mut sorted = out.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&sorted, &out);
            let mut shuffled = input.clone();
            shuffled.reverse();
            prop_assert_eq!(disjoint(&shuffled), out);
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
