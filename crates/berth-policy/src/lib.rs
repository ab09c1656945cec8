//! berth's policy compiler: from policies and endpoints to the elements of the kernel's
//! policy sets, with no I/O, so that the kernel, `policy explain` and the tests share one
//! meaning.

mod explain;
mod index;
mod program;
mod ranges;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;

use berth_model::Protocol;
use serde::{Deserialize, Serialize};

pub use explain::{BackendExplanation, Explanation, Judgement, Party, ServiceExplanation};
pub use index::{PolicyIndex, Touched};
pub use program::{Change, Program};

/// Which way a connection goes, seen from the endpoint a policy selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Connections the endpoint accepts.
    Ingress,
    /// Connections the endpoint opens.
    Egress,
}

/// The addresses `first` to `last`, both included, of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddrRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

/// The most kernel elements one policy may compile to (see [`PolicyIndex::cost`]): some
/// 40 ms of the kernel's time to write, in ten transactions. The policy of a 78 KB request
/// that took a host down (16 CIDRs with 256 exceptions each, 16 port ranges) is 4,115.
pub const MAX_POLICY_ELEMENTS: usize = 20_000;

/// The most kernel elements a host's policies may hold in all (see [`Program::len`]): some
/// 0.5 s of the kernel's time to write again after the table was flushed, in transactions of
/// a few milliseconds each.
pub const MAX_HOST_ELEMENTS: usize = 200_000;

/// A profile's number in the kernel: the key every allow element of the profile starts with.
pub type ProfileId = u32;

/// A class's number within its profile: the ports of one class admit the same peers.
pub type ClassId = u32;

/// One element of the kernel's policy state (see `berth_dataplane::nftables::policy`).
///
/// Targets (addresses of local endpoints a policy isolates) point at a profile: the compiled
/// form of the policies that isolate them in a direction, shared by every target those same
/// policies select. A profile lets some peers through whatever the protocol (`Any`); the rest
/// goes by its destination port, which leads to one class (`Ports`), and the class admits some
/// peers (`Peers`). Ports and peers are looked up apart, tied by the class, so a rule's kernel
/// form grows with its peers plus its ports, never their product; and an endpoint whose
/// policies are in force already adds one element per address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyElement {
    /// The profile exists: its chain, its peers and its ports.
    Profile {
        direction: Direction,
        profile: ProfileId,
    },
    /// One of the profile's classes exists.
    Class {
        direction: Direction,
        profile: ProfileId,
        class: ClassId,
    },
    /// Everything between the profile's targets and these peers, whatever the protocol.
    Any {
        direction: Direction,
        profile: ProfileId,
        peers: AddrRange,
    },
    /// TCP, UDP or SCTP to ports `ports.0` to `ports.1` of the destination (the target's for
    /// ingress, the peer's for egress) is judged by `class`.
    Ports {
        direction: Direction,
        profile: ProfileId,
        protocol: Protocol,
        ports: (u16, u16),
        class: ClassId,
    },
    /// The class lets these peers through.
    Peers {
        direction: Direction,
        profile: ProfileId,
        class: ClassId,
        peers: AddrRange,
    },
    /// One peer may use one port (of TCP, UDP or SCTP) of the destination: a class too small
    /// for a chain of its own (see [`Profile::pairs`]).
    Pair {
        direction: Direction,
        profile: ProfileId,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    },
    /// The target is isolated in this direction: only what its profile allows passes.
    Target {
        direction: Direction,
        target: IpAddr,
        profile: ProfileId,
    },
}

/// What the policies isolating a target in one direction let through: the shape of the
/// kernel's elements, and what [`Profile::allows`] judges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Peers allowed everything: sorted, disjoint.
    pub any: Vec<AddrRange>,
    /// Each class and the peers it admits (sorted, disjoint; none of `any`).
    pub classes: Vec<(ClassId, Vec<AddrRange>)>,
    /// Port ranges `(protocol, first, last, class)` and the class that judges them: sorted,
    /// disjoint per protocol.
    pub ports: Vec<(Protocol, u16, u16, ClassId)>,
    /// Single peers allowed single ports, `(peer, protocol, port)`, sorted: the classes of a
    /// few single addresses and ports ([`MAX_PAIRS_PER_CLASS`] pairs at most), which would
    /// otherwise each need a chain and two sets in the kernel (a profile of a thousand
    /// policies that each allow one address one port would be a thousand chains). None of
    /// their ports are in `ports`.
    pub pairs: Vec<(IpAddr, Protocol, u16)>,
}

/// The most peer-and-port pairs a class may be written as (see [`Profile::pairs`]): beyond
/// that it keeps its chain, so that a rule's elements still grow with its peers plus its
/// ports.
pub const MAX_PAIRS_PER_CLASS: usize = 4;

impl Profile {
    /// How many kernel elements the profile takes (its targets' not counted).
    pub fn size(&self) -> usize {
        1 + self.any.len()
            + self.ports.len()
            + self.pairs.len()
            + self
                .classes
                .iter()
                .map(|(_, peers)| 1 + peers.len())
                .sum::<usize>()
    }

    /// The profile's elements under the number `profile`.
    pub fn elements(&self, direction: Direction, profile: ProfileId) -> Vec<PolicyElement> {
        let mut out = vec![PolicyElement::Profile { direction, profile }];
        out.extend(self.any.iter().map(|&peers| PolicyElement::Any {
            direction,
            profile,
            peers,
        }));
        for (class, peers) in &self.classes {
            out.push(PolicyElement::Class {
                direction,
                profile,
                class: *class,
            });
            out.extend(peers.iter().map(|&peers| PolicyElement::Peers {
                direction,
                profile,
                class: *class,
                peers,
            }));
        }
        out.extend(
            self.ports
                .iter()
                .map(|&(protocol, lo, hi, class)| PolicyElement::Ports {
                    direction,
                    profile,
                    protocol,
                    ports: (lo, hi),
                    class,
                }),
        );
        out.extend(
            self.pairs
                .iter()
                .map(|&(peer, protocol, port)| PolicyElement::Pair {
                    direction,
                    profile,
                    peer,
                    protocol,
                    port,
                }),
        );
        out
    }

    /// Whether the profile lets a connection with `peer` through, as the kernel decides:
    /// `protocol` is the IP protocol number and `port` the destination port; `None` for
    /// protocols without ports (ICMP), which only `any` lets through.
    pub fn allows(&self, peer: IpAddr, protocol: u8, port: Option<u16>) -> bool {
        if self.any.iter().any(|r| r.contains(peer)) {
            return true;
        }
        let Some(port) = port else { return false };
        if self
            .pairs
            .iter()
            .any(|&(a, p, n)| a == peer && p.number() == protocol && n == port)
        {
            return true;
        }
        let Some(&(_, _, _, class)) = self
            .ports
            .iter()
            .find(|&&(p, lo, hi, _)| p.number() == protocol && lo <= port && port <= hi)
        else {
            return false;
        };
        self.classes
            .iter()
            .find(|(c, _)| *c == class)
            .is_some_and(|(_, peers)| peers.iter().any(|r| r.contains(peer)))
    }
}

/// What a target's profile is compiled from: the same key, the same profile. A target's
/// profile changes only when its key does (the policies selecting it, its named ports) or the
/// key's content does (a policy's rules, the endpoints its peers stand for, the gateways).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProfileKey {
    /// A digest of the rest, so that a key of a thousand policies hashes and compares as fast
    /// as one of a single policy (it is looked up on every attach).
    digest: u64,
    pub network: String,
    pub direction: Direction,
    /// The policies that isolate the target in this direction, by name, sorted.
    pub policies: Vec<String>,
    /// The target's named ports `(name, protocol, port)`, sorted, where an ingress rule of
    /// these policies names a port (they resolve on the target); empty otherwise.
    pub named_ports: Vec<(String, Protocol, u16)>,
}

impl ProfileKey {
    pub fn new(
        network: String,
        direction: Direction,
        policies: Vec<String>,
        named_ports: Vec<(String, Protocol, u16)>,
    ) -> ProfileKey {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            // A separator, so that ("ab", "c") and ("a", "bc") differ.
            h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
        };
        eat(network.as_bytes());
        eat(&[direction as u8]);
        for p in &policies {
            eat(p.as_bytes());
        }
        for (name, protocol, port) in &named_ports {
            eat(name.as_bytes());
            eat(&[protocol.number()]);
            eat(&port.to_be_bytes());
        }
        ProfileKey {
            digest: h,
            network,
            direction,
            policies,
            named_ports,
        }
    }

    /// The key's digest (see [`ProfileKey::new`]).
    pub fn digest(&self) -> u64 {
        self.digest
    }
}

impl std::hash::Hash for ProfileKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

impl AddrRange {
    /// Whether `ip` is in the range (never when it is of the other family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.first <= ip && ip <= self.last
    }
}

impl PolicyElement {
    pub fn direction(&self) -> Direction {
        match *self {
            PolicyElement::Profile { direction, .. }
            | PolicyElement::Class { direction, .. }
            | PolicyElement::Any { direction, .. }
            | PolicyElement::Ports { direction, .. }
            | PolicyElement::Peers { direction, .. }
            | PolicyElement::Pair { direction, .. }
            | PolicyElement::Target { direction, .. } => direction,
        }
    }

    /// The profile the element belongs to or points at.
    pub fn profile(&self) -> ProfileId {
        match *self {
            PolicyElement::Profile { profile, .. }
            | PolicyElement::Class { profile, .. }
            | PolicyElement::Any { profile, .. }
            | PolicyElement::Ports { profile, .. }
            | PolicyElement::Peers { profile, .. }
            | PolicyElement::Pair { profile, .. }
            | PolicyElement::Target { profile, .. } => profile,
        }
    }
}

/// Whether a target whose profile in `direction` is `profile` (`None`: not isolated) lets a
/// connection with `peer` through; see [`Profile::allows`].
pub fn allows(profile: Option<&Profile>, peer: IpAddr, protocol: u8, port: Option<u16>) -> bool {
    profile.is_none_or(|p| p.allows(peer, protocol, port))
}
