//! berth's nftables table `inet berth`: a fixed ruleset whose every decision is a lookup in a
//! set or map, so that networks and endpoints change only elements.
//!
//! - The whole table (rules and every element) is written by [`install`] through one `nft -f`
//!   run, which the kernel applies as one transaction: at daemon start, when a network comes or
//!   goes, and when someone removed berth's rules ([`intact`] notices).
//! - An endpoint's published ports are map elements added and removed in-process over
//!   nfnetlink ([`add_forwards`], [`delete_forwards`]), one atomic batch each: no process on
//!   the attach path.
//! - The chain `user` is the operator's: jumped to before any forwarding decision of berth's,
//!   created if missing and never flushed.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use berth_model::PortMapping;
use ipnet::IpNet;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::{DataplaneError, Result};

pub const TABLE: &str = "berth";

/// The sets, chains and rules. Chains are `add`ed (kept if present) and then flushed and
/// refilled, so a reinstall replaces berth's rules atomically and leaves `user` alone.
const SETS: &str = "\
add set inet berth bridges { type ifname; }
add set inet berth intra { type ifname . ifname; }
add set inet berth internal { type ifname; }
add set inet berth masq4 { type ipv4_addr; flags interval; }
add set inet berth masq6 { type ipv6_addr; flags interval; }
add set inet berth dns4 { type ipv4_addr . inet_service; }
add set inet berth dns6 { type ipv6_addr . inet_service; }
add map inet berth ports4_any { type inet_proto . inet_service : ipv4_addr . inet_service; }
add map inet berth ports4_ip { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }
add map inet berth ports6_any { type inet_proto . inet_service : ipv6_addr . inet_service; }
add map inet berth ports6_ip { type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; }
";

const CHAINS: &[(&str, &str)] = &[
    (
        "forward",
        "type filter hook forward priority filter; policy accept;",
    ),
    ("into_network", ""),
    (
        "guard",
        "type filter hook prerouting priority raw; policy accept;",
    ),
    (
        "guard_out",
        "type filter hook output priority raw; policy accept;",
    ),
    (
        "prerouting",
        "type nat hook prerouting priority dstnat; policy accept;",
    ),
    (
        "output",
        "type nat hook output priority -100; policy accept;",
    ),
    ("publish", ""),
    (
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
    ),
    ("into_network_nat", ""),
];

const RULES: &[(&str, &str)] = &[
    // The operator's restrictions come before anything berth allows.
    ("forward", "jump user"),
    ("forward", "oifname @bridges goto into_network"),
    // An internal network has no way out.
    ("forward", "iifname @internal drop"),
    // Within one network (bridged traffic passes here when br_netfilter is loaded).
    ("into_network", "iifname . oifname @intra accept"),
    ("into_network", "oifname @internal drop"),
    ("into_network", "ct state established,related accept"),
    // Published ports, from anywhere, including other berth networks.
    ("into_network", "ct status dnat accept"),
    // Everything else into a network: other networks (isolation) and other hosts reaching
    // container addresses directly.
    ("into_network", "drop"),
    // route_localnet is on for bridges (so 127.0.0.1 can be published); a container must not
    // use it to reach the host's loopback services.
    ("guard", "iifname @bridges ip daddr 127.0.0.0/8 drop"),
    // berth's DNS servers on the gateways: their UDP traffic is not tracked (as Kubernetes'
    // NodeLocal DNSCache does), which saves two conntrack lookups and an entry per query
    // and keeps a published host port 53 from capturing them.
    ("guard", "ip daddr . udp dport @dns4 notrack"),
    ("guard", "ip6 daddr . udp dport @dns6 notrack"),
    ("guard_out", "ip saddr . udp sport @dns4 notrack"),
    ("guard_out", "ip6 saddr . udp sport @dns6 notrack"),
    ("prerouting", "fib daddr type local goto publish"),
    ("output", "fib daddr type local goto publish"),
    (
        "publish",
        "meta nfproto ipv4 meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @ports4_ip",
    ),
    (
        "publish",
        "meta nfproto ipv4 meta l4proto { tcp, udp, sctp } dnat ip to meta l4proto . th dport map @ports4_any",
    ),
    (
        "publish",
        "meta nfproto ipv6 meta l4proto { tcp, udp, sctp } dnat ip6 to ip6 daddr . meta l4proto . th dport map @ports6_ip",
    ),
    (
        "publish",
        "meta nfproto ipv6 meta l4proto { tcp, udp, sctp } dnat ip6 to meta l4proto . th dport map @ports6_any",
    ),
    ("postrouting", "oifname @bridges goto into_network_nat"),
    ("postrouting", "ip saddr @masq4 masquerade"),
    ("postrouting", "ip6 saddr @masq6 masquerade"),
    // Hairpin: a container reaching a published port through a host address gets the answer
    // back through the host only if the server sees the host as the client.
    (
        "into_network_nat",
        "ct status dnat ip saddr @masq4 masquerade",
    ),
    (
        "into_network_nat",
        "ct status dnat ip6 saddr @masq6 masquerade",
    ),
    // A port published on 127.0.0.1 and reached from this host.
    ("into_network_nat", "ip saddr 127.0.0.0/8 masquerade"),
];

/// One network as the firewall sees it.
#[derive(Debug, Clone)]
pub struct NetworkRules {
    pub bridge: String,
    pub internal: bool,
    pub subnets: Vec<IpNet>,
    /// Where berth's DNS answers on this network (empty: no DNS).
    pub dns: Vec<std::net::SocketAddr>,
}

/// One published port of one endpoint: `mapping` forwarded to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub mapping: PortMapping,
    pub target: IpAddr,
}

impl Forward {
    fn map(&self) -> &'static str {
        match (self.target.is_ipv4(), self.mapping.host_ip.is_some()) {
            (true, false) => "ports4_any",
            (true, true) => "ports4_ip",
            (false, false) => "ports6_any",
            (false, true) => "ports6_ip",
        }
    }

    fn text(&self) -> String {
        let m = &self.mapping;
        let host = m.host_ip.map(|ip| format!("{ip} . ")).unwrap_or_default();
        format!(
            "{host}{} . {} : {} . {}",
            m.protocol, m.host_port, self.target, m.container_port
        )
    }

    /// The element's key and data in the kernel's layout: each part of a concatenation padded
    /// to 4 bytes, addresses and ports in network order.
    fn key_and_data(&self) -> (Vec<u8>, Vec<u8>) {
        let m = &self.mapping;
        let mut key = Vec::with_capacity(24);
        if let Some(ip) = m.host_ip {
            key.extend_from_slice(&ip_bytes(ip));
        }
        key.extend_from_slice(&[m.protocol.number(), 0, 0, 0]);
        key.extend_from_slice(&port_bytes(m.host_port));
        let mut data = ip_bytes(self.target);
        data.extend_from_slice(&port_bytes(m.container_port));
        (key, data)
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port_bytes(port: u16) -> [u8; 4] {
    let [a, b] = port.to_be_bytes();
    [a, b, 0, 0]
}

/// The complete table for these networks and forwards, as `nft -f` input.
pub fn ruleset(networks: &[NetworkRules], forwards: &[Forward]) -> String {
    let mut s = String::from("add table inet berth\nadd chain inet berth user\n");
    s.push_str(SETS);
    for (chain, spec) in CHAINS {
        if spec.is_empty() {
            let _ = writeln!(s, "add chain inet berth {chain}");
        } else {
            let _ = writeln!(s, "add chain inet berth {chain} {{ {spec} }}");
        }
        let _ = writeln!(s, "flush chain inet berth {chain}");
    }
    for words in SETS
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
    {
        // "add set|map inet berth NAME ..."
        let _ = writeln!(s, "flush {} inet berth {}", words[1], words[4]);
    }
    for (chain, rule) in RULES {
        let _ = writeln!(s, "add rule inet berth {chain} {rule}");
    }
    let mut elements: Vec<(&str, String)> = Vec::new();
    for n in networks {
        let br = format!("\"{}\"", n.bridge);
        elements.push(("bridges", br.clone()));
        elements.push(("intra", format!("{br} . {br}")));
        if n.internal {
            elements.push(("internal", br));
        } else {
            for subnet in &n.subnets {
                let set = if subnet.addr().is_ipv4() {
                    "masq4"
                } else {
                    "masq6"
                };
                elements.push((set, subnet.to_string()));
            }
        }
        for addr in &n.dns {
            let set = if addr.is_ipv4() { "dns4" } else { "dns6" };
            elements.push((set, format!("{} . {}", addr.ip(), addr.port())));
        }
    }
    elements.extend(forwards.iter().map(|f| (f.map(), f.text())));
    for (set, element) in elements {
        let _ = writeln!(s, "add element inet berth {set} {{ {element} }}");
    }
    s
}

/// Writes the table (see [`ruleset`]) in one `nft` transaction: all of it or, on error, none.
pub fn install(networks: &[NetworkRules], forwards: &[Forward]) -> Result<()> {
    nft(&ruleset(networks, forwards))
}

/// Runs `nft -f -` with `script` in the calling thread's network namespace.
fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DataplaneError::io("running nft (is the nftables package installed?)", e))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(|e| DataplaneError::io("writing to nft", e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| DataplaneError::io("waiting for nft", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DataplaneError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Whether berth's table is there with all of berth's rules: false after `nft flush ruleset`,
/// a deleted table or a flushed chain.
pub fn intact() -> Result<bool> {
    let mut nl = Nfnetlink::open()?;
    let counts = nl.rule_counts()?;
    let mut expected: Vec<(&str, usize)> = Vec::new();
    for (chain, _) in RULES {
        match expected.iter_mut().find(|(c, _)| c == chain) {
            Some((_, n)) => *n += 1,
            None => expected.push((chain, 1)),
        }
    }
    Ok(expected.iter().all(|(chain, n)| {
        counts
            .iter()
            .find(|(c, _)| c == chain)
            .is_some_and(|(_, got)| got == n)
    }))
}

/// Adds published ports' map elements, all or none.
pub fn add_forwards(forwards: &[Forward]) -> Result<()> {
    if forwards.is_empty() {
        return Ok(());
    }
    Nfnetlink::open()?.set_elements(NFT_MSG_NEWSETELEM, forwards)
}

/// Removes published ports' map elements; elements already gone are fine.
pub fn delete_forwards(forwards: &[Forward]) -> Result<()> {
    if forwards.is_empty() {
        return Ok(());
    }
    let mut nl = Nfnetlink::open()?;
    match nl.set_elements(NFT_MSG_DELSETELEM, forwards) {
        Err(e) if e.errno() == Some(libc_enoent()) => {
            // One was missing and the batch was refused as a whole: one at a time.
            for f in forwards {
                match nl.set_elements(NFT_MSG_DELSETELEM, std::slice::from_ref(f)) {
                    Err(e) if e.errno() == Some(libc_enoent()) => {}
                    other => other?,
                }
            }
            Ok(())
        }
        other => other,
    }
}

fn libc_enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

// nfnetlink constants (linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// A small nf_tables netlink client: element batches and a rule dump, nothing more.
struct Nfnetlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn put_nested(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    put_attr(buf, kind | NLA_F_NESTED, &inner);
}

fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut z = s.as_bytes().to_vec();
    z.push(0);
    put_attr(buf, kind, &z);
}

/// The errno of an `NLMSG_ERROR` message (0 for an acknowledgement); `None` for any other
/// message or a truncated one.
fn errno_of(kind: u16, payload: &[u8]) -> Option<i32> {
    let code = payload.get(..4).filter(|_| kind == NLMSG_ERROR)?;
    Some(-i32::from_ne_bytes([code[0], code[1], code[2], code[3]]))
}

/// Iterates over `(type, payload)` of the attributes in `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

impl Nfnetlink {
    fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| DataplaneError::io("nfnetlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| DataplaneError::io("nfnetlink bind", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| DataplaneError::io("nfnetlink connect", e))?;
        Ok(Nfnetlink {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Appends one message: netlink header, nfgenmsg, attributes.
    fn message(
        &mut self,
        out: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: &[u8],
    ) -> u32 {
        self.seq += 1;
        let len = 16 + 4 + attrs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.push(family);
        out.push(0);
        out.extend_from_slice(&res_id.to_be_bytes());
        out.extend_from_slice(attrs);
        self.seq
    }

    /// One transaction adding or deleting the forwards' elements, one message per map.
    fn set_elements(&mut self, op: u16, forwards: &[Forward]) -> Result<()> {
        let mut out = Vec::new();
        self.message(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let mut maps: Vec<&str> = forwards.iter().map(Forward::map).collect();
        maps.sort_unstable();
        maps.dedup();
        let flags = NLM_F_REQUEST
            | NLM_F_ACK
            | if op == NFT_MSG_NEWSETELEM {
                NLM_F_CREATE
            } else {
                0
            };
        let mut pending = Vec::new();
        for map in maps {
            let mut a = Vec::new();
            put_str(&mut a, NFTA_SET_ELEM_LIST_TABLE, TABLE);
            put_str(&mut a, NFTA_SET_ELEM_LIST_SET, map);
            put_nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for f in forwards.iter().filter(|f| f.map() == map) {
                    let (key, data) = f.key_and_data();
                    put_nested(list, NFTA_LIST_ELEM, |e| {
                        put_nested(e, NFTA_SET_ELEM_KEY, |k| put_attr(k, NFTA_DATA_VALUE, &key));
                        if op == NFT_MSG_NEWSETELEM {
                            put_nested(e, NFTA_SET_ELEM_DATA, |d| {
                                put_attr(d, NFTA_DATA_VALUE, &data)
                            });
                        }
                    });
                }
            });
            let seq = self.message(
                &mut out,
                (NFNL_SUBSYS_NFTABLES << 8) | op,
                flags,
                NFPROTO_INET,
                0,
                &a,
            );
            pending.push((seq, map));
        }
        self.message(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.socket
            .send(&out, 0)
            .map_err(|e| DataplaneError::io("nfnetlink send", e))?;
        // Every message is acknowledged when the batch commits; the first error aborts it.
        let what = if op == NFT_MSG_NEWSETELEM {
            "add"
        } else {
            "delete"
        };
        while !pending.is_empty() {
            let mut err = None;
            self.recv_each(|kind, seq, payload| {
                let Some(errno) = errno_of(kind, payload) else {
                    return;
                };
                if let Some(i) = pending.iter().position(|(s, _)| *s == seq) {
                    let (_, map) = pending.remove(i);
                    if errno != 0 && err.is_none() {
                        err = Some(DataplaneError::Kernel {
                            op: format!("{what} elements of nftables map {map}"),
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        Ok(())
    }

    /// How many rules each chain of berth's table has.
    fn rule_counts(&mut self) -> Result<Vec<(String, usize)>> {
        let mut a = Vec::new();
        put_str(&mut a, NFTA_RULE_TABLE, TABLE);
        let mut out = Vec::new();
        let seq = self.message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO_INET,
            0,
            &a,
        );
        self.socket
            .send(&out, 0)
            .map_err(|e| DataplaneError::io("nfnetlink send", e))?;
        let mut counts: Vec<(String, usize)> = Vec::new();
        let mut done = false;
        let mut err = None;
        while !done {
            self.recv_each(|kind, s, payload| {
                if s != seq {
                    return;
                }
                match kind {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        done = true;
                        let errno = errno_of(kind, payload).unwrap_or(0);
                        if errno != 0 && errno != libc_enoent() {
                            err = Some(DataplaneError::Kernel {
                                op: "list nftables rules".into(),
                                source: std::io::Error::from_raw_os_error(errno),
                            });
                        }
                    }
                    k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                        let chain = attrs(payload.get(4..).unwrap_or_default())
                            .find(|(t, _)| *t == NFTA_RULE_CHAIN)
                            .map(|(_, v)| {
                                String::from_utf8_lossy(v)
                                    .trim_end_matches('\0')
                                    .to_string()
                            });
                        if let Some(chain) = chain {
                            match counts.iter_mut().find(|(c, _)| *c == chain) {
                                Some((_, n)) => *n += 1,
                                None => counts.push((chain, 1)),
                            }
                        }
                    }
                    _ => {}
                }
            })?;
        }
        match err {
            Some(e) => Err(e),
            None => Ok(counts),
        }
    }

    /// Receives one datagram and calls `each(type, seq, payload)` for every message in it.
    fn recv_each(&mut self, mut each: impl FnMut(u16, u32, &[u8])) -> Result<()> {
        let n = self
            .socket
            .recv(&mut &mut self.buf[..], 0)
            .map_err(|e| DataplaneError::io("nfnetlink recv", e))?;
        let mut rest = &self.buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                return Err(DataplaneError::Protocol(
                    "truncated nfnetlink message".into(),
                ));
            }
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
            each(kind, seq, &rest[16..len]);
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::Protocol;

    fn fwd(host_ip: Option<&str>, target: &str) -> Forward {
        Forward {
            mapping: PortMapping {
                protocol: Protocol::Udp,
                host_ip: host_ip.map(|s| s.parse().unwrap()),
                host_port: 5353,
                container_port: 53,
            },
            target: target.parse().unwrap(),
        }
    }

    #[test]
    fn elements_in_the_kernel_layout() {
        // As `nft --debug=netlink` shows `127.0.0.1 . udp . 5353 : 10.91.0.5 . 53`.
        let (key, data) = fwd(Some("127.0.0.1"), "10.91.0.5").key_and_data();
        assert_eq!(key, [127, 0, 0, 1, 17, 0, 0, 0, 0x14, 0xe9, 0, 0]);
        assert_eq!(data, [10, 91, 0, 5, 0, 53, 0, 0]);
        let (key, data) = fwd(None, "fd00::5").key_and_data();
        assert_eq!(key, [17, 0, 0, 0, 0x14, 0xe9, 0, 0]);
        assert_eq!(data.len(), 20);
        assert_eq!(fwd(None, "fd00::5").map(), "ports6_any");
        assert_eq!(
            fwd(Some("127.0.0.1"), "10.91.0.5").text(),
            "127.0.0.1 . udp . 5353 : 10.91.0.5 . 53"
        );
    }

    #[test]
    fn the_ruleset_flushes_every_berth_chain_but_the_users() {
        let text = ruleset(&[], &[]);
        assert!(text.contains("add chain inet berth user\n"));
        assert!(!text.contains("flush chain inet berth user"));
        for (chain, _) in CHAINS {
            assert!(text.contains(&format!("flush chain inet berth {chain}\n")));
        }
        assert!(text.contains("flush map inet berth ports6_ip\n"));
        assert!(text.contains("flush set inet berth masq4\n"));
    }
}
