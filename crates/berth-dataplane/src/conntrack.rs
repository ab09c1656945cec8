//! Connection tracking entries, over ctnetlink in-process (no `conntrack` program).
//!
//! A connection to a frontend keeps its backend for as long as its conntrack entry lives, which
//! for UDP is as long as packets keep coming: when a backend leaves, the entries of its flows
//! are deleted, so that a UDP client's next datagram is balanced again and a TCP connection to
//! a gone backend ends instead of hanging. Likewise the flows a network policy no longer
//! allows, which would otherwise go on as established.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use berth_model::Protocol;

use crate::nftables::nfnl::{Nfnetlink, attr, attrs, put_attr};
use crate::{DataplaneError, Result};

// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Flows that went to one backend through one frontend: first addressed to `orig_dst` (any
/// address for `None`, as through a node port) port `orig_dport`, answered by `reply_src`
/// port `reply_sport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowMatch {
    pub protocol: Protocol,
    pub orig_dst: Option<IpAddr>,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// A tracked flow as forwarding saw it: from its first packet's source to where that packet
/// went after any destination NAT (a service's backend, say), which is what network policy
/// decides on. Without NAT, the original direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None` for a protocol without ports (ICMP, say).
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

impl FlowTuple {
    /// One direction's tuple (`CTA_TUPLE_ORIG`, `CTA_TUPLE_REPLY`) of a conntrack message's
    /// attributes.
    fn parse(ct: &[u8], direction: u16) -> Option<FlowTuple> {
        let tuple = attr(ct, direction)?;
        let (ip, proto) = (attr(tuple, CTA_TUPLE_IP)?, attr(tuple, CTA_TUPLE_PROTO)?);
        Some(FlowTuple {
            protocol: *attr(proto, CTA_PROTO_NUM)?.first()?,
            src: address(ip, CTA_IP_V4_SRC, CTA_IP_V6_SRC)?,
            dst: address(ip, CTA_IP_V4_DST, CTA_IP_V6_DST)?,
            sport: attr(proto, CTA_PROTO_SRC_PORT).and_then(port),
            dport: attr(proto, CTA_PROTO_DST_PORT).and_then(port),
        })
    }
}

fn address(ip: &[u8], v4: u16, v6: u16) -> Option<IpAddr> {
    if let Some(a) = attr(ip, v4) {
        return Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?)));
    }
    Some(IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(attr(ip, v6)?).ok()?,
    )))
}

fn port(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(p.try_into().ok()?))
}

impl FlowMatch {
    fn matches(&self, orig: &FlowTuple, reply: &FlowTuple) -> bool {
        orig.protocol == self.protocol.number()
            && self.orig_dst.is_none_or(|d| d == orig.dst)
            && orig.dport == Some(self.orig_dport)
            && reply.src == self.reply_src
            && reply.sport == Some(self.reply_sport)
    }
}

/// Deletes the conntrack entries of every flow that matches one of `matches`, from one dump
/// of the table per family, and says how many it deleted. Entries that went away meanwhile
/// are fine. Acts in the calling thread's network namespace.
pub fn delete_flows(matches: &[FlowMatch]) -> Result<usize> {
    let of_family = |ipv6: bool| matches.iter().any(|m| m.reply_src.is_ipv6() == ipv6);
    delete_entries(of_family(false), of_family(true), |ct| {
        match (
            FlowTuple::parse(ct, CTA_TUPLE_ORIG),
            FlowTuple::parse(ct, CTA_TUPLE_REPLY),
        ) {
            (Some(orig), Some(reply)) => matches.iter().any(|m| m.matches(&orig, &reply)),
            _ => false,
        }
    })
}

/// Deletes the conntrack entries of the flows that `condemned` picks (IPv4 ones if `ipv4`,
/// IPv6 ones if `ipv6`), from one dump of the table per family, and says how many it
/// deleted: the flows a network policy no longer allows, say, whose packets would otherwise go
/// on passing as established. Entries that went away meanwhile are fine. Acts in the calling
/// thread's network namespace.
pub fn delete_flows_where(
    ipv4: bool,
    ipv6: bool,
    mut condemned: impl FnMut(&FlowTuple) -> bool,
) -> Result<usize> {
    delete_entries(ipv4, ipv6, |ct| {
        match (
            FlowTuple::parse(ct, CTA_TUPLE_ORIG),
            FlowTuple::parse(ct, CTA_TUPLE_REPLY),
        ) {
            // The reply comes from where the flow was forwarded to.
            (Some(orig), Some(reply)) => condemned(&FlowTuple {
                dst: reply.src,
                dport: reply.sport,
                ..orig
            }),
            _ => false,
        }
    })
}

/// Deletes the entries, of the families asked for, whose attributes `doomed` picks.
fn delete_entries(ipv4: bool, ipv6: bool, mut doomed: impl FnMut(&[u8]) -> bool) -> Result<usize> {
    let mut nl = Nfnetlink::open()?;
    let mut deletions: Vec<(u16, u8, Vec<u8>)> = Vec::new();
    for (family, wanted) in [(AF_INET, ipv4), (AF_INET6, ipv6)] {
        if !wanted {
            continue;
        }
        nl.dump_of(ctnetlink(IPCTNL_MSG_CT_GET), family, &[], |ct| {
            if doomed(ct) {
                deletions.push((ctnetlink(IPCTNL_MSG_CT_DELETE), family, by_tuple(ct)));
            }
        })?
        .map_err(|errno| DataplaneError::Kernel {
            op: "dump conntrack entries".into(),
            source: std::io::Error::from_raw_os_error(errno),
        })?;
    }
    let mut deleted = 0;
    for errno in nl.requests(&deletions)? {
        match errno {
            0 => deleted += 1,
            e if e == nix::errno::Errno::ENOENT as i32 => {}
            e => {
                return Err(DataplaneError::Kernel {
                    op: "delete a conntrack entry".into(),
                    source: std::io::Error::from_raw_os_error(e),
                });
            }
        }
    }
    Ok(deleted)
}

fn ctnetlink(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

/// A deletion of exactly this entry: its original tuple and zone as dumped, and its id, so
/// that a new entry of the same tuple is not the one deleted.
fn by_tuple(ct: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    for (kind, payload) in attrs(ct) {
        if matches!(kind, CTA_TUPLE_ORIG | CTA_ID | CTA_ZONE) {
            put_attr(&mut a, kind, payload);
        }
    }
    a
}
