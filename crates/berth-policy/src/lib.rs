//! berth's policy compiler: from policies and endpoints to the elements of the kernel's
//! policy sets, with no I/O, so that the kernel, `policy explain` and the tests share one
//! meaning.

mod explain;
mod index;
mod ranges;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;

use berth_model::Protocol;
use serde::{Deserialize, Serialize};

pub use explain::{Explanation, Judgement, Party};
pub use index::PolicyIndex;

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

/// One element of the kernel's policy sets. `target` is an address of a local endpoint a
/// policy selects (the destination for ingress, the source for egress); `peers` the other
/// end's addresses, of the same family. Elements of one target never overlap: the kernel
/// refuses concatenated ranges that partly overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyElement {
    /// The target is isolated in this direction: only what other elements allow passes.
    Isolated {
        direction: Direction,
        target: IpAddr,
    },
    /// Everything between the target and these peers, whatever the protocol.
    Any {
        direction: Direction,
        target: IpAddr,
        peers: AddrRange,
    },
    /// TCP, UDP or SCTP between the target and these peers, to ports `ports.0` to `ports.1`
    /// of the destination (the target's for ingress, the peer's for egress).
    Ports {
        direction: Direction,
        target: IpAddr,
        peers: AddrRange,
        protocol: Protocol,
        ports: (u16, u16),
    },
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
            PolicyElement::Isolated { direction, .. }
            | PolicyElement::Any { direction, .. }
            | PolicyElement::Ports { direction, .. } => direction,
        }
    }

    pub fn target(&self) -> IpAddr {
        match *self {
            PolicyElement::Isolated { target, .. }
            | PolicyElement::Any { target, .. }
            | PolicyElement::Ports { target, .. } => target,
        }
    }
}

/// Whether these elements (one target's) let a connection through in `direction`, as the
/// kernel decides: a target that is not isolated lets everything through. `protocol` is the IP
/// protocol number and `port` the destination port; `None` for protocols without ports (ICMP),
/// which only [`PolicyElement::Any`] lets through.
pub fn allows(
    elements: &[PolicyElement],
    direction: Direction,
    target: IpAddr,
    peer: IpAddr,
    protocol: u8,
    port: Option<u16>,
) -> bool {
    let mut isolated = false;
    for e in elements
        .iter()
        .filter(|e| e.direction() == direction && e.target() == target)
    {
        match *e {
            PolicyElement::Isolated { .. } => isolated = true,
            PolicyElement::Any { peers, .. } if peers.contains(peer) => return true,
            PolicyElement::Ports {
                peers,
                protocol: p,
                ports: (lo, hi),
                ..
            } if p.number() == protocol
                && peers.contains(peer)
                && port.is_some_and(|n| lo <= n && n <= hi) =>
            {
                return true;
            }
            PolicyElement::Any { .. } | PolicyElement::Ports { .. } => {}
        }
    }
    !isolated
}
