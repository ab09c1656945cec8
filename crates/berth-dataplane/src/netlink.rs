//! A minimal synchronous rtnetlink client: requests with ACKs, batches of requests in one
//! `send`, and dumps.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsFd;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoBridge, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoPortKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};

use crate::{DataplaneError, Result};

/// The route protocol number berth marks its routes with, so they are recognisably berth's.
pub const ROUTE_PROTOCOL: u8 = 201;

/// The alias (`ip link show`: `alias berth`) berth gives every link it creates, in the same
/// datagram as the creation, so that a link berth made is told from one that only has a
/// berth-like name (an operator's `berth-test`) even when the store has lost track of it.
pub const LINK_MARK: &str = "berth";

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `veth`, ...; `None` for plain devices like `lo`.
    pub kind: Option<String>,
    pub mtu: u32,
    pub controller: Option<u32>,
    pub up: bool,
    pub mac: Option<[u8; 6]>,
    /// The link's alias (`IFLA_IFALIAS`); [`LINK_MARK`] on links berth made.
    pub alias: Option<String>,
}

impl Link {
    /// Whether berth made this link (it carries [`LINK_MARK`]).
    pub fn marked(&self) -> bool {
        self.alias.as_deref() == Some(LINK_MARK)
    }
}

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let socket = route_socket()?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| DataplaneError::io("netlink connect", e))?;
        // Errors carry the kernel's own explanation where it has one; best effort.
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// A socket in the network namespace `ns`, created on a short-lived thread so that no
    /// long-lived thread ever changes namespace.
    pub fn open_in(ns: &File) -> Result<Self> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    DataplaneError::Kernel {
                        op: "enter network namespace".into(),
                        source: e.into(),
                    }
                })?;
                Netlink::open()
            })
            .join()
            .unwrap_or_else(|_| Err(DataplaneError::Protocol("netns thread panicked".into())))
        })
    }

    /// Appends `msg` to `out` as the next request with `flags`; returns its sequence number.
    fn encode(&mut self, msg: RouteNetlinkMessage, flags: u16, out: &mut Vec<u8>) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let start = out.len();
        out.resize(start + nl.buffer_len(), 0);
        nl.serialize(&mut out[start..]);
        self.seq
    }

    fn send(&mut self, out: &[u8]) -> Result<()> {
        self.socket
            .send(out, 0)
            .map(drop)
            .map_err(|e| DataplaneError::io("netlink send", e))
    }

    /// Sends one request; returns its sequence number.
    fn send_one(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32> {
        let mut out = Vec::new();
        let seq = self.encode(msg, flags, &mut out);
        self.send(&out)?;
        Ok(seq)
    }

    /// Sends every request in one datagram and waits for all their ACKs. The kernel processes
    /// each message even if an earlier one failed; the first failure is returned.
    pub fn batch(&mut self, requests: Vec<(RouteNetlinkMessage, u16, String)>) -> Result<()> {
        self.batch_each(requests)?
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(()), Err)
    }

    /// [`Netlink::batch`], with each request's own outcome, in order. The kernel handles a
    /// datagram's messages in one system call, so a crash of the daemon cannot fall between
    /// them.
    fn batch_each(
        &mut self,
        requests: Vec<(RouteNetlinkMessage, u16, String)>,
    ) -> Result<Vec<Result<()>>> {
        let first_seq = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        let mut ops = Vec::with_capacity(requests.len());
        for (msg, flags, op) in requests {
            self.encode(msg, NLM_F_ACK | flags, &mut out);
            ops.push(op);
        }
        self.send(&out)?;
        let mut outcomes: Vec<Option<Result<()>>> = ops.iter().map(|_| None).collect();
        let mut pending = ops.len();
        while pending > 0 {
            self.recv_each(|msg| {
                if let NetlinkPayload::Error(e) = msg.payload {
                    let i = msg.header.sequence_number.wrapping_sub(first_seq) as usize;
                    if let Some(slot) = outcomes.get_mut(i).filter(|o| o.is_none()) {
                        pending -= 1;
                        *slot = Some(match e.code {
                            Some(code) => Err(DataplaneError::Kernel {
                                op: ops[i].clone(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                            None => Ok(()),
                        });
                    }
                }
                Ok(())
            })?;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every request answered"))
            .collect())
    }

    /// Sends a request that creates link `name` with the message that marks it as berth's
    /// ([`LINK_MARK`]) in one datagram, so that no crash of the daemon leaves the link
    /// unmarked (the mark cannot go in the creating message: the kernel ignores an alias
    /// there). When the creation succeeded but the mark did not, the new link is deleted
    /// again. When the creation failed because the name was taken, the mark went to the link
    /// that has it: berth's names carry a random id and are looked up before a bridge or
    /// VXLAN device is made, so that is a link of berth's own of the same id.
    fn create_marked(
        &mut self,
        create: RouteNetlinkMessage,
        flags: u16,
        name: &str,
        op: String,
    ) -> Result<()> {
        let mut outcomes = self
            .batch_each(vec![
                (create, flags, op),
                Self::mark_msg(LinkRef::Name(name)),
            ])?
            .into_iter();
        let (created, marked) = (
            outcomes.next().expect("two answers"),
            outcomes.next().expect("two answers"),
        );
        created?;
        if let Err(e) = marked {
            if let Some(l) = self.link_by_name(name)? {
                let _ = self.delete_link(l.index);
            }
            return Err(e);
        }
        Ok(())
    }

    /// The message that marks a link as berth's (see [`LINK_MARK`]).
    pub fn mark_msg(link: LinkRef<'_>) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = LinkMessage::default();
        match link {
            LinkRef::Index(i) => msg.header.index = i,
            LinkRef::Name(n) => msg.attributes.push(LinkAttribute::IfName(n.to_string())),
        }
        msg.attributes
            .push(LinkAttribute::IfAlias(LINK_MARK.to_string()));
        (
            RouteNetlinkMessage::SetLink(msg),
            0,
            format!("mark link {link:?} as berth's"),
        )
    }

    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16, op: &str) -> Result<()> {
        self.batch(vec![(msg, flags, op.to_string())])
    }

    fn dump(&mut self, msg: RouteNetlinkMessage, op: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send_one(msg, NLM_F_DUMP)?;
        let mut items = Vec::new();
        let mut done = false;
        while !done {
            self.recv_each(|m| {
                if m.header.sequence_number != seq {
                    return Ok(());
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => items.push(inner),
                    NetlinkPayload::Done(_) => done = true,
                    NetlinkPayload::Error(e) => {
                        done = true;
                        if let Some(code) = e.code {
                            return Err(DataplaneError::Kernel {
                                op: op.to_string(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    }
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok(items)
    }

    /// Receives one datagram and hands each netlink message in it to `f`.
    fn recv_each(
        &mut self,
        f: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<()>,
    ) -> Result<()> {
        let n = self
            .socket
            .recv(&mut &mut self.buf[..], 0)
            .map_err(|e| DataplaneError::io("netlink recv", e))?;
        each_message(&self.buf[..n], f)
    }

    // ---- links ----

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let items = self.dump(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "list links",
        )?;
        Ok(items
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(&l)),
                _ => None,
            })
            .collect())
    }

    /// One link by name, asked for directly (not a dump), so its cost does not grow with the
    /// number of links on the host.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let seq = self.send_one(RouteNetlinkMessage::GetLink(msg), 0)?;
        let mut answer: Option<Result<Option<Link>>> = None;
        while answer.is_none() {
            self.recv_each(|m| {
                if m.header.sequence_number != seq {
                    return Ok(());
                }
                answer = Some(match m.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                        Ok(Some(link_from(&l)))
                    }
                    NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                        Some(libc_enodev) if libc_enodev == nix::errno::Errno::ENODEV as i32 => {
                            Ok(None)
                        }
                        Some(code) => Err(DataplaneError::Kernel {
                            op: format!("get link {name}"),
                            source: std::io::Error::from_raw_os_error(code),
                        }),
                        None => Ok(None),
                    },
                    other => Err(DataplaneError::Protocol(format!(
                        "get link {name}: {other:?}"
                    ))),
                });
                Ok(())
            })?;
        }
        answer.expect("loop ends with an answer")
    }

    /// Creates a bridge, up, with a fixed MAC so that the bridge's address does not change as
    /// ports come and go. Its bridged traffic passes netfilter (where br_netfilter is loaded)
    /// whatever the host's `bridge-nf-call-*` sysctls say: a service's connection between two
    /// containers of one bridge is DNATed there, and its answers are un-DNATed there.
    pub fn create_bridge(&mut self, name: &str, mtu: u32, mac: [u8; 6]) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes = vec![
            LinkAttribute::IfName(name.to_string()),
            LinkAttribute::Mtu(mtu),
            LinkAttribute::Address(mac.to_vec()),
            LinkAttribute::LinkInfo(bridge_through_netfilter()),
        ];
        self.create_marked(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            name,
            format!("create bridge {name}"),
        )
    }

    /// Makes a bridge's traffic pass netfilter (as [`Netlink::create_bridge`] does), for
    /// bridges made before it did.
    pub fn set_bridge_netfilter(&mut self, bridge: &str) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(bridge.to_string()),
            LinkAttribute::LinkInfo(bridge_through_netfilter()),
        ];
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            0,
            &format!("make {bridge}'s traffic pass netfilter"),
        )
    }

    /// Puts a bridge port in hairpin mode: frames may leave through the port they came in by,
    /// which a container reaching its own published port or service through the host needs.
    pub fn set_hairpin(&mut self, port: &str) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(port.to_string()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::PortKind(InfoPortKind::Bridge),
                LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                    true,
                )])),
            ]),
        ];
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            0,
            &format!("set hairpin mode on {port}"),
        )
    }

    /// Creates a veth pair: the host end enslaved to `controller` and up (without an IPv6
    /// link-local address if the spec says so), the peer created directly inside the
    /// namespace `peer_ns` (if given) under its final name. Nothing is left if it fails.
    pub fn create_veth(&mut self, v: &VethSpec<'_>) -> Result<()> {
        // The peer cannot be set up here: the kernel refuses to open a veth before its pair is
        // joined (ENOTCONN). It is brought up with the sandbox-side batch instead.
        let mut peer = LinkMessage::default();
        peer.attributes = vec![
            LinkAttribute::IfName(v.peer_name.to_string()),
            LinkAttribute::Mtu(v.mtu),
            LinkAttribute::Address(v.peer_mac.to_vec()),
        ];
        if let Some(ns) = v.peer_ns {
            peer.attributes
                .push(LinkAttribute::NetNsFd(std::os::fd::AsRawFd::as_raw_fd(ns)));
        }
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(v.host_name.to_string()),
            LinkAttribute::Mtu(v.mtu),
            LinkAttribute::Controller(v.controller),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        self.create_marked(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            v.host_name,
            format!("create veth {} with peer {}", v.host_name, v.peer_name),
        )?;
        // Then, in one batch, by name (the index is not known): no IPv6 address for a bridge
        // port, which needs none, set before it goes up.
        let mut requests = Vec::new();
        if v.no_link_local {
            requests.push(Self::no_link_local_msg(LinkRef::Name(v.host_name)));
        }
        let mut up = LinkMessage::default();
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        up.attributes = vec![LinkAttribute::IfName(v.host_name.to_string())];
        requests.push((
            RouteNetlinkMessage::SetLink(up),
            0,
            format!("set {} up", v.host_name),
        ));
        let configured = self.batch(requests);
        if configured.is_err()
            && let Ok(Some(host)) = self.link_by_name(v.host_name)
        {
            let _ = self.delete_link(host.index);
        }
        configured
    }

    /// Sets a link up, its MTU and (when given) its controller.
    pub fn set_link(&mut self, index: u32, mtu: u32, controller: Option<u32>) -> Result<()> {
        self.batch(vec![Self::set_link_msg(index, mtu, controller)])
    }

    pub fn set_link_msg(
        index: u32,
        mtu: u32,
        controller: Option<u32>,
    ) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        if let Some(c) = controller {
            msg.attributes.push(LinkAttribute::Controller(c));
        }
        (
            RouteNetlinkMessage::SetLink(msg),
            0,
            format!("set link {index} up"),
        )
    }

    /// Gives a link no IPv6 link-local address when it comes up (addrgenmode none); sent
    /// before the link is set up. Without it every interface coming up on a bridge sends
    /// duplicate-address probes and MLD reports, which the bridge floods to every port.
    pub fn no_link_local_msg(link: LinkRef<'_>) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = LinkMessage::default();
        match link {
            LinkRef::Index(i) => msg.header.index = i,
            LinkRef::Name(n) => msg.attributes.push(LinkAttribute::IfName(n.to_string())),
        }
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
        (
            RouteNetlinkMessage::SetLink(msg),
            0,
            format!("turn off IPv6 link-local addressing on link {link:?}"),
        )
    }

    /// Sets a link down, optionally renames it and puts it in a link group, in one message.
    pub fn retire_link(
        &mut self,
        index: u32,
        rename: Option<&str>,
        group: Option<u32>,
    ) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(name) = rename {
            msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        }
        if let Some(g) = group {
            msg.attributes.push(LinkAttribute::Group(g));
        }
        self.request(
            RouteNetlinkMessage::SetLink(msg),
            0,
            &format!("retire link {index}"),
        )
    }

    /// Deletes every link of a link group in one kernel operation: the costly part of removing
    /// a device (waiting for RCU grace periods, ~15-25 ms here) is then paid once per group, not
    /// once per device.
    pub fn delete_group(&mut self, group: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Group(group));
        match self.request(
            RouteNetlinkMessage::DelLink(msg),
            0,
            &format!("delete link group {group}"),
        ) {
            // An empty group is nothing to delete.
            Err(e) if e.errno() == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
            other => other,
        }
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(
            RouteNetlinkMessage::DelLink(msg),
            0,
            &format!("delete link {index}"),
        )
    }

    // ---- addresses and routes ----

    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>> {
        let items = self.dump(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            "list addresses",
        )?;
        Ok(items
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => IpNet::new(*ip, a.header.prefix_len).ok(),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The message that adds (or keeps) `addr` on link `index`; IPv6 addresses skip DAD, since
    /// berth's IPAM already guarantees uniqueness and DAD would delay the first packet by ~1 s.
    pub fn address_msg(index: u32, addr: IpNet) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = addr.prefix_len();
        msg.header.family = if addr.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        if addr.addr().is_ipv6() {
            msg.header.flags = AddressHeaderFlags::Nodad;
        }
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        if let IpNet::V4(v4) = addr
            && v4.prefix_len() < 31
        {
            msg.attributes
                .push(AddressAttribute::Broadcast(v4.broadcast()));
        }
        (
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!("add address {addr} to link {index}"),
        )
    }

    /// The message that sets the default route via `gateway` out of link `index`.
    pub fn default_route_msg(index: u32, gateway: IpAddr) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if gateway.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        (
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!("set default route via {gateway}"),
        )
    }

    /// Default routes of the main table: (gateway, out interface).
    pub fn default_routes(&mut self) -> Result<Vec<(Option<IpAddr>, Option<u32>)>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            for m in self.dump(RouteNetlinkMessage::GetRoute(req), "list routes")? {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                if r.header.destination_prefix_length != 0
                    || r.header.table != RouteHeader::RT_TABLE_MAIN
                    || r.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let mut gw = None;
                let mut oif = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                            gw = Some(IpAddr::V6(*g))
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                out.push((gw, oif));
            }
        }
        Ok(out)
    }

    /// Every route of every table (`ip route show table all`, both families), as the kernel
    /// has them: the host's own addresses are among them (the `local` table).
    pub fn routes(&mut self) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            for m in self.dump(RouteNetlinkMessage::GetRoute(req), "list routes")? {
                if let RouteNetlinkMessage::NewRoute(r) = m
                    && let Some(route) = route_from(&r)
                {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    /// The MTU of the interface the IPv4 (else IPv6) default route leaves through.
    pub fn default_route_mtu(&mut self) -> Result<Option<u32>> {
        let Some(oif) = self.default_routes()?.into_iter().find_map(|(_, oif)| oif) else {
            return Ok(None);
        };
        Ok(self
            .links()?
            .into_iter()
            .find(|l| l.index == oif)
            .map(|l| l.mtu))
    }
}

/// What [`Netlink::create_veth`] creates.
/// A link by index, or by name where the index is not known yet.
#[derive(Debug, Clone, Copy)]
pub enum LinkRef<'a> {
    Index(u32),
    Name(&'a str),
}

pub struct VethSpec<'a> {
    pub host_name: &'a str,
    /// Bring the host end up without an IPv6 link-local address (see
    /// [`Netlink::no_link_local_msg`]).
    pub no_link_local: bool,
    pub controller: u32,
    pub mtu: u32,
    pub peer_name: &'a str,
    pub peer_mac: [u8; 6],
    /// Where the peer is made; `None` leaves it beside the host end (for a runtime to move).
    pub peer_ns: Option<&'a File>,
}

fn link_from(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        kind: None,
        mtu: 0,
        controller: None,
        up: l.header.flags.contains(LinkFlags::Up),
        mac: None,
        alias: None,
    };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Address(a) => link.mac = a.as_slice().try_into().ok(),
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// A route as the kernel reports it, enough of it to name it as `ip route` would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    kind: RouteType,
    pub gateway: Option<IpAddr>,
    /// The interface it leaves by (the first next hop's, for a multipath route).
    pub oif: Option<u32>,
    pub table: u32,
    pub protocol: u8,
}

impl Route {
    /// A route to one of the namespace's own addresses (the `local` table's entries).
    pub fn is_local(&self) -> bool {
        self.kind == RouteType::Local
    }

    /// A plain route of the main table: what `ip route` shows.
    pub fn is_main_unicast(&self) -> bool {
        self.table == u32::from(RouteHeader::RT_TABLE_MAIN) && self.kind == RouteType::Unicast
    }

    /// `main`, `local` or the table's number, as `ip route` names it.
    fn table_name(&self) -> String {
        match self.table {
            254 => "main".into(),
            255 => "local".into(),
            253 => "default".into(),
            n => n.to_string(),
        }
    }

    /// The route as `ip route` shows it, with the name of its interface.
    pub fn describe(&self, dev: Option<&str>) -> String {
        let mut s = match self.kind {
            RouteType::Unicast => String::new(),
            kind => format!("{} ", route_type_name(kind)),
        };
        s += &match self.destination.prefix_len() == self.destination.max_prefix_len() {
            true => self.destination.addr().to_string(),
            false => self.destination.to_string(),
        };
        if let Some(gw) = self.gateway {
            s += &format!(" via {gw}");
        }
        match (dev, self.oif) {
            (Some(d), _) => s += &format!(" dev {d}"),
            (None, Some(i)) => s += &format!(" dev #{i}"),
            (None, None) => {}
        }
        if self.table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            s += &format!(" table {}", self.table_name());
        }
        s
    }
}

fn route_type_name(kind: RouteType) -> &'static str {
    match kind {
        RouteType::Unicast => "unicast",
        RouteType::Local => "local",
        RouteType::Broadcast => "broadcast",
        RouteType::Anycast => "anycast",
        RouteType::Multicast => "multicast",
        RouteType::BlackHole => "blackhole",
        RouteType::Unreachable => "unreachable",
        RouteType::Prohibit => "prohibit",
        RouteType::Throw => "throw",
        RouteType::Nat => "nat",
        _ => "route",
    }
}

fn route_from(r: &RouteMessage) -> Option<Route> {
    let family_len = match r.header.address_family {
        AddressFamily::Inet => 32,
        AddressFamily::Inet6 => 128,
        _ => return None,
    };
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    let mut table = u32::from(r.header.table);
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => destination = route_address(d),
            RouteAttribute::Gateway(g) => gateway = route_address(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::MultiPath(hops) => {
                if let Some(hop) = hops.first() {
                    oif = oif.or(Some(hop.interface_index));
                    gateway = gateway.or_else(|| {
                        hop.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => route_address(g),
                            _ => None,
                        })
                    });
                }
            }
            _ => {}
        }
    }
    let destination = match destination {
        Some(d) => IpNet::new(d, r.header.destination_prefix_length).ok()?,
        None if family_len == 32 => IpNet::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0).ok()?,
        None => IpNet::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0).ok()?,
    };
    Some(Route {
        destination,
        kind: r.header.kind,
        gateway,
        oif,
        table,
        protocol: r.header.protocol.into(),
    })
}

fn route_address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Hands each netlink message of one received datagram to `f`.
fn each_message(
    datagram: &[u8],
    mut f: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<()>,
) -> Result<()> {
    let mut off = 0;
    while off < datagram.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[off..])
            .map_err(|e| DataplaneError::Protocol(e.to_string()))?;
        let len = msg.header.length as usize;
        if len == 0 {
            break;
        }
        f(msg)?;
        off += len.next_multiple_of(4);
    }
    Ok(())
}

/// An rtnetlink socket of the calling thread's namespace, bound to a kernel-chosen port.
fn route_socket() -> Result<Socket> {
    let mut socket =
        Socket::new(NETLINK_ROUTE).map_err(|e| DataplaneError::io("netlink socket", e))?;
    socket
        .bind_auto()
        .map_err(|e| DataplaneError::io("netlink bind", e))?;
    Ok(socket)
}

/// What [`LinkWatch::wait`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link of the namespace was deleted (or moved to another namespace).
    Gone(String),
    /// The kernel dropped events (the socket's buffer overflowed): anything may have changed.
    Overrun,
}

/// The link deletions of one network namespace as they happen (rtnetlink's link group), so a
/// running daemon notices at once when its links vanish: deleted by hand, or with the
/// namespace that held a veth's other end.
pub struct LinkWatch {
    socket: Socket,
    buf: Vec<u8>,
}

/// rtnetlink multicast group of link changes (RTNLGRP_LINK).
const RTNLGRP_LINK: u32 = 1;

impl LinkWatch {
    /// Watches the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let socket = route_socket()?;
        socket
            .add_membership(RTNLGRP_LINK)
            .map_err(|e| DataplaneError::io("join rtnetlink link group", e))?;
        Ok(LinkWatch {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Blocks until the kernel reports link changes; returns the deletions among them.
    pub fn wait(&mut self) -> Result<Vec<LinkEvent>> {
        let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                return Ok(vec![LinkEvent::Overrun]);
            }
            Err(e) => return Err(DataplaneError::io("netlink recv", e)),
        };
        let mut events = Vec::new();
        each_message(&self.buf[..n], |msg| {
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) = msg.payload {
                events.push(LinkEvent::Gone(link_from(&l).name));
            }
            Ok(())
        })?;
        Ok(events)
    }
}

// ---- neighbours, forwarding entries and VXLAN devices ----

/// An ARP/NDP neighbour entry, or a forwarding-database entry (family `AF_BRIDGE`), as the
/// kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Neighbour {
    pub index: u32,
    /// A forwarding-database entry rather than an ARP/NDP one.
    pub fdb: bool,
    /// ARP/NDP: the neighbour's address. FDB: where the frames are tunnelled to, if anywhere.
    pub ip: Option<IpAddr>,
    pub mac: Option<[u8; 6]>,
    pub state: NeighbourState,
    /// `Own` (NTF_SELF) marks an entry of the device's own table (the VXLAN driver's); FDB
    /// entries without it are the bridge's.
    pub flags: NeighbourFlags,
}

/// Which table of a device an FDB entry goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdbTable {
    /// The device's own (`self`): for a VXLAN device, which VTEP a MAC is tunnelled to.
    Device,
    /// The bridge the device is a port of (`master`): which port a MAC leaves by.
    Bridge,
}

impl Netlink {
    /// Sends one non-dump request and returns its answer; `None` if the kernel says there is no
    /// such object (ENODEV, ENOENT).
    fn get(&mut self, msg: RouteNetlinkMessage, op: &str) -> Result<Option<RouteNetlinkMessage>> {
        let seq = self.send_one(msg, 0)?;
        let mut answer: Option<Result<Option<RouteNetlinkMessage>>> = None;
        while answer.is_none() {
            self.recv_each(|m| {
                if m.header.sequence_number != seq {
                    return Ok(());
                }
                answer = Some(match m.payload {
                    NetlinkPayload::InnerMessage(inner) => Ok(Some(inner)),
                    NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                        None => Ok(None),
                        Some(code)
                            if code == nix::errno::Errno::ENODEV as i32
                                || code == nix::errno::Errno::ENOENT as i32 =>
                        {
                            Ok(None)
                        }
                        Some(code) => Err(DataplaneError::Kernel {
                            op: op.to_string(),
                            source: std::io::Error::from_raw_os_error(code),
                        }),
                    },
                    other => Err(DataplaneError::Protocol(format!("{op}: {other:?}"))),
                });
                Ok(())
            })?;
        }
        answer.expect("loop ends with an answer")
    }

    /// One link's full description, for what [`Link`] leaves out (a VXLAN device's settings, a
    /// bridge port's flags).
    pub(crate) fn link_message(&mut self, name: &str) -> Result<Option<LinkMessage>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.get(
            RouteNetlinkMessage::GetLink(msg),
            &format!("get link {name}"),
        )? {
            Some(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l)),
            None => Ok(None),
            Some(other) => Err(DataplaneError::Protocol(format!(
                "get link {name}: {other:?}"
            ))),
        }
    }

    /// Creates a VXLAN device, down, as a port of `spec.bridge_index`: no multicast group and
    /// no default remote, so the driver sends only to MACs it has an FDB entry for and floods
    /// nothing; no learning; `proxy`, so it answers ARP and NDP from its own neighbour table.
    pub(crate) fn create_vxlan(&mut self, spec: &crate::VxlanSpec) -> Result<()> {
        let mut data = vec![
            InfoVxlan::Id(spec.vni),
            match spec.local {
                IpAddr::V4(a) => InfoVxlan::Local(a),
                IpAddr::V6(a) => InfoVxlan::Local6(a),
            },
            InfoVxlan::Port(spec.port),
            InfoVxlan::Learning(false),
            InfoVxlan::Proxy(true),
        ];
        if let Some(underlay) = spec.underlay_index {
            data.push(InfoVxlan::Link(underlay));
        }
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(spec.name.clone()),
            LinkAttribute::Mtu(spec.mtu),
            LinkAttribute::Address(spec.mac.to_vec()),
            LinkAttribute::Controller(spec.bridge_index),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(data)),
            ]),
        ];
        self.create_marked(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &spec.name,
            format!("create vxlan {} (vni {})", spec.name, spec.vni),
        )
    }

    /// The message that turns MAC learning off or on for bridge port `index`.
    pub(crate) fn port_learning_msg(index: u32, on: bool) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes = vec![LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Learning(on)])),
        ])];
        (
            RouteNetlinkMessage::NewLink(msg),
            0,
            format!("set learning {on} on bridge port {index}"),
        )
    }

    /// Neighbour entries of `family` (`Bridge` for the forwarding database), of link `index`
    /// only if given. ARP/NDP dumps are filtered by the kernel; FDB dumps are filtered here,
    /// because without strict checking the kernel ignores the filter of a neighbour-shaped
    /// FDB dump request.
    pub(crate) fn neighbours(
        &mut self,
        family: AddressFamily,
        index: Option<u32>,
    ) -> Result<Vec<Neighbour>> {
        let mut req = NeighbourMessage::default();
        req.header.family = family;
        if let (Some(i), false) = (index, family == AddressFamily::Bridge) {
            req.attributes.push(NeighbourAttribute::IfIndex(i));
        }
        let items = self.dump(
            RouteNetlinkMessage::GetNeighbour(req),
            &format!("list {family:?} neighbours"),
        )?;
        Ok(items
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n)
                    if index.is_none_or(|i| n.header.ifindex == i) =>
                {
                    Some(neighbour_from(&n))
                }
                _ => None,
            })
            .collect())
    }

    /// The message that sets (create or replace) or deletes the FDB entry for `mac` on link
    /// `index`: `bridge fdb replace|del MAC dev DEV [dst DST] self|master`. A device entry is
    /// made `permanent` (never aged out), a bridge entry `static` (the bridge's `permanent`
    /// would mean "this host's own address"). Deleting a device entry with `dst` removes only
    /// that destination; deleting a bridge entry removes it only if it points at `index`.
    pub(crate) fn fdb_msg(
        add: bool,
        index: u32,
        mac: [u8; 6],
        dst: Option<IpAddr>,
        table: FdbTable,
    ) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        (msg.header.flags, msg.header.state) = match table {
            FdbTable::Device => (NeighbourFlags::Own, NeighbourState::Permanent),
            FdbTable::Bridge => (NeighbourFlags::Controller, NeighbourState::Noarp),
        };
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        if let Some(ip) = dst {
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        }
        let what = format!(
            "fdb entry {} on link {index} ({table:?}{})",
            fmt_mac(mac),
            dst.map(|d| format!(", dst {d}")).unwrap_or_default()
        );
        if add {
            (
                RouteNetlinkMessage::NewNeighbour(msg),
                NLM_F_CREATE | NLM_F_REPLACE,
                format!("set {what}"),
            )
        } else {
            (
                RouteNetlinkMessage::DelNeighbour(msg),
                0,
                format!("delete {what}"),
            )
        }
    }

    /// The message that sets (create or replace, `nud permanent`) the ARP/NDP entry `ip` ->
    /// `mac` on link `index`, or (`mac` `None`) deletes the entry for `ip`.
    pub(crate) fn neighbour_msg(
        index: u32,
        ip: IpAddr,
        mac: Option<[u8; 6]>,
    ) -> (RouteNetlinkMessage, u16, String) {
        let mut msg = NeighbourMessage::default();
        msg.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        match mac {
            Some(mac) => {
                msg.header.state = NeighbourState::Permanent;
                msg.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
                (
                    RouteNetlinkMessage::NewNeighbour(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                    format!("set neighbour {ip} -> {} on link {index}", fmt_mac(mac)),
                )
            }
            None => (
                RouteNetlinkMessage::DelNeighbour(msg),
                0,
                format!("delete neighbour {ip} on link {index}"),
            ),
        }
    }
}

/// A bridge whose traffic passes netfilter (see [`Netlink::create_bridge`]).
fn bridge_through_netfilter() -> Vec<LinkInfo> {
    vec![
        LinkInfo::Kind(InfoKind::Bridge),
        LinkInfo::Data(InfoData::Bridge(vec![
            InfoBridge::NfCallIpTables(true),
            InfoBridge::NfCallIp6Tables(true),
        ])),
    ]
}

fn neighbour_from(n: &NeighbourMessage) -> Neighbour {
    let fdb = n.header.family == AddressFamily::Bridge;
    let mut out = Neighbour {
        index: n.header.ifindex,
        fdb,
        ip: None,
        mac: None,
        state: n.header.state,
        flags: n.header.flags,
    };
    for a in &n.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) => out.mac = l.as_slice().try_into().ok(),
            NeighbourAttribute::Destination(d) => {
                out.ip = match d {
                    NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                    NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    // FDB entries carry their destination as raw bytes of either family.
                    NeighbourAddress::Other(raw) => match raw.len() {
                        4 => <[u8; 4]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => {}
        }
    }
    out
}

fn fmt_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}
