//! Connection tracking entries, over ctnetlink in-process (no `conntrack` program).
//!
//! A connection to a frontend keeps its backend for as long as its conntrack entry lives, which
//! for UDP is as long as packets keep coming: when a backend leaves, the entries of its flows
//! are deleted, so that a UDP client's next datagram is balanced again and a TCP connection to
//! a gone backend ends instead of hanging.

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

/// What a match looks at in one entry.
struct Flow {
    protocol: u8,
    orig_dst: IpAddr,
    orig_dport: u16,
    reply_src: IpAddr,
    reply_sport: u16,
}

impl Flow {
    /// From a conntrack message's attributes; `None` for one without ports (ICMP, say).
    fn parse(ct: &[u8]) -> Option<Flow> {
        let orig = attr(ct, CTA_TUPLE_ORIG)?;
        let reply = attr(ct, CTA_TUPLE_REPLY)?;
        let (ip, proto) = (attr(orig, CTA_TUPLE_IP)?, attr(orig, CTA_TUPLE_PROTO)?);
        let (rip, rproto) = (attr(reply, CTA_TUPLE_IP)?, attr(reply, CTA_TUPLE_PROTO)?);
        Some(Flow {
            protocol: *attr(proto, CTA_PROTO_NUM)?.first()?,
            orig_dst: address(ip, CTA_IP_V4_DST, CTA_IP_V6_DST)?,
            orig_dport: port(attr(proto, CTA_PROTO_DST_PORT)?)?,
            reply_src: address(rip, CTA_IP_V4_SRC, CTA_IP_V6_SRC)?,
            reply_sport: port(attr(rproto, CTA_PROTO_SRC_PORT)?)?,
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
    fn matches(&self, f: &Flow) -> bool {
        f.protocol == self.protocol.number()
            && self.orig_dst.is_none_or(|d| d == f.orig_dst)
            && f.orig_dport == self.orig_dport
            && f.reply_src == self.reply_src
            && f.reply_sport == self.reply_sport
    }
}

/// Deletes the conntrack entries of every flow that matches one of `matches`, from one dump
/// of the table per family, and says how many it deleted. Entries that went away meanwhile
/// are fine. Acts in the calling thread's network namespace.
pub fn delete_flows(matches: &[FlowMatch]) -> Result<usize> {
    let mut nl = Nfnetlink::open()?;
    let mut doomed: Vec<(u16, u8, Vec<u8>)> = Vec::new();
    for (family, ipv6) in [(AF_INET, false), (AF_INET6, true)] {
        if !matches.iter().any(|m| m.reply_src.is_ipv6() == ipv6) {
            continue;
        }
        nl.dump_of(ctnetlink(IPCTNL_MSG_CT_GET), family, &[], |ct| {
            if Flow::parse(ct).is_some_and(|f| matches.iter().any(|m| m.matches(&f))) {
                doomed.push((ctnetlink(IPCTNL_MSG_CT_DELETE), family, by_tuple(ct)));
            }
        })?
        .map_err(|errno| DataplaneError::Kernel {
            op: "dump conntrack entries".into(),
            source: std::io::Error::from_raw_os_error(errno),
        })?;
    }
    let mut deleted = 0;
    for errno in nl.requests(&doomed)? {
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
