//! The kernel side of overlay networks: on every host with endpoints on a network, the
//! network's bridge (with the anycast gateway, the same on every host) plus one VXLAN device as
//! a port of it. Nothing floods and nothing is learned: the device has no multicast group and
//! no default remote, so it sends a frame only where a static FDB entry says, and it answers
//! ARP and NDP itself (`proxy`) from static neighbour entries. The agent installs, per remote
//! endpoint, the entries of [`RemoteEntry`].
//!
//! Kernel behaviour this relies on, found by experiment on Linux 6.18 (`tests/vxlan.rs` checks
//! the counters and the local flooding):
//! - `proxy` is required: without it an ARP request or neighbour solicitation reaching the
//!   device is dropped (there is nowhere to flood it), so nothing resolves.
//! - Proxied ARP/NDP never leaves the host, and is not counted in the device's tx counters.
//! - The bridge port's `neigh_suppress` is not set: with the entries on the VXLAN device it
//!   changes nothing observable (the bridge answers only from its own neighbour table, where
//!   remote endpoints are not), and it would let a stale entry of the bridge's answer instead.
//! - With learning off on the bridge port, the bridge never learns where a remote MAC is, so
//!   without a static bridge entry it floods every frame for a remote endpoint to all local
//!   ports; hence the third entry of each remote.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourState};

use crate::netlink::{FdbTable, LinkRef};
use crate::{DataplaneError, Netlink, Result};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// Outer headers a VXLAN device adds over IPv4: IP 20, UDP 8, VXLAN 8, inner Ethernet 14. Its
/// MTU is the underlay's minus this (IPv6 underlays need 20 more).
pub const VXLAN_OVERHEAD: u32 = 50;

/// What [`ensure_vxlan`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// This host's underlay address: the source of the tunnel, what other hosts' FDB entries
    /// point at.
    pub local: IpAddr,
    /// UDP destination port, normally [`VXLAN_PORT`].
    pub port: u16,
    pub mtu: u32,
    /// The device's own MAC, fixed (like the bridge's) so that it does not change when the
    /// device is made again.
    pub mac: [u8; 6],
    /// The network's bridge, which the device is a port of.
    pub bridge_index: u32,
    /// The underlay interface to send from, if pinned.
    pub underlay_index: Option<u32>,
}

/// Makes the VXLAN device exist as `spec` says: up, port of the bridge with learning off.
/// Returns its index. A device whose VNI, local address, port, underlay, MAC or flags differ is
/// deleted and made again (those cannot all be changed in place, and a host re-added with a new
/// address must not keep sending from the old one); a new device has no remote entries, so
/// follow with [`sync_remotes`].
pub fn ensure_vxlan(nl: &mut Netlink, spec: &VxlanSpec) -> Result<u32> {
    if let Some(msg) = nl.link_message(&spec.name)? {
        let have = VxlanState::from(&msg);
        if have.same_device(spec) {
            if !have.up || have.mtu != spec.mtu || have.controller != Some(spec.bridge_index) {
                nl.set_link(have.index, spec.mtu, Some(spec.bridge_index))?;
            }
            if have.port_learning != Some(false) {
                nl.batch(vec![Netlink::port_learning_msg(have.index, false)])?;
            }
            return Ok(have.index);
        }
        gone_is_fine(nl.delete_link(have.index))?;
    }
    nl.create_vxlan(spec)?;
    let index = nl
        .link_by_name(&spec.name)?
        .ok_or_else(|| {
            DataplaneError::Protocol(format!("vxlan {} vanished after creation", spec.name))
        })?
        .index;
    // A bridge port needs no IPv6 address (it would only send DAD and MLD into the bridge),
    // and turning that off must come before the device goes up.
    let mut msgs = Vec::new();
    if ipv6_link_local_possible(spec.mtu) {
        msgs.push(Netlink::no_link_local_msg(LinkRef::Index(index)));
    }
    msgs.push(Netlink::port_learning_msg(index, false));
    msgs.push(Netlink::set_link_msg(
        index,
        spec.mtu,
        Some(spec.bridge_index),
    ));
    if let Err(e) = nl.batch(msgs) {
        let _ = nl.delete_link(index);
        return Err(e);
    }
    Ok(index)
}

/// Deletes the VXLAN device `name` (and with it all its entries); returns whether there was
/// one.
pub fn delete_vxlan(nl: &mut Netlink, name: &str) -> Result<bool> {
    crate::delete_link(nl, name)
}

/// One remote endpoint of an overlay network, as one host needs it: frames for `mac` go
/// through the tunnel to `vtep`, and `ip` resolves to `mac` without asking anyone. A
/// dual-stack endpoint is two entries with the same MAC and VTEP. MACs and IPs are unique
/// within a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteEntry {
    pub mac: [u8; 6],
    /// The endpoint's (container's) address.
    pub ip: IpAddr,
    /// The underlay address of the host the endpoint is on.
    pub vtep: IpAddr,
}

/// The remote entries a VXLAN device has, as the kernel holds them: three tables, not joined,
/// so that a half-installed or stale remote shows where it is. Only entries berth makes are
/// listed (permanent ones of the device, static ones of the bridge); any others age out.
/// Each list is sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remotes {
    /// The device's FDB (`bridge fdb ... dst VTEP self permanent`): (MAC, VTEP).
    pub fdb: Vec<([u8; 6], IpAddr)>,
    /// The bridge's static entries sending a MAC to the device's port (`... master static`).
    pub bridge_fdb: Vec<[u8; 6]>,
    /// The device's neighbour entries, which its proxy answers ARP and NDP from: (IP, MAC).
    pub neighbours: Vec<(IpAddr, [u8; 6])>,
}

impl Remotes {
    /// The remotes whose three entries are all there and agree.
    pub fn complete(&self) -> Vec<RemoteEntry> {
        let mut out: Vec<RemoteEntry> = self
            .neighbours
            .iter()
            .filter(|(_, mac)| self.bridge_fdb.contains(mac))
            .flat_map(|&(ip, mac)| {
                self.fdb
                    .iter()
                    .filter(move |(m, _)| *m == mac)
                    .map(move |&(_, vtep)| RemoteEntry { mac, ip, vtep })
            })
            .collect();
        out.sort();
        out
    }

    /// Whether the device holds exactly `desired`, nothing missing and nothing more.
    pub fn is_exactly(&self, desired: &[RemoteEntry]) -> bool {
        self == &Remotes::of(desired)
    }

    /// What a device holding exactly `entries` reports.
    pub fn of(entries: &[RemoteEntry]) -> Remotes {
        let mut r = Remotes {
            fdb: entries.iter().map(|e| (e.mac, e.vtep)).collect(),
            bridge_fdb: entries.iter().map(|e| e.mac).collect(),
            neighbours: entries.iter().map(|e| (e.ip, e.mac)).collect(),
        };
        r.normalise();
        r
    }

    fn normalise(&mut self) {
        self.fdb.sort();
        self.fdb.dedup();
        self.bridge_fdb.sort();
        self.bridge_fdb.dedup();
        self.neighbours.sort();
        self.neighbours.dedup();
    }
}

/// Installs (or moves) one remote: the device's FDB entry to the VTEP, the bridge's static
/// entry for the MAC, and the neighbour entry, in one batch. Every entry is created or
/// replaced, so this is idempotent and an entry pointing at another VTEP moves to this one.
pub fn add_remote(nl: &mut Netlink, vxlan_index: u32, entry: &RemoteEntry) -> Result<()> {
    nl.batch(vec![
        Netlink::fdb_msg(
            true,
            vxlan_index,
            entry.mac,
            Some(entry.vtep),
            FdbTable::Device,
        ),
        Netlink::fdb_msg(true, vxlan_index, entry.mac, None, FdbTable::Bridge),
        Netlink::neighbour_msg(vxlan_index, entry.ip, Some(entry.mac)),
    ])
}

/// Removes what [`add_remote`] installed for `entry`, and nothing that another entry still
/// needs: nothing at all if the MAC's FDB entry now points at another VTEP (the endpoint moved
/// and this is the stale entry of its old host); the neighbour entry only if it still maps the
/// IP to this MAC; the MAC's FDB entries only with its last address (a dual-stack endpoint
/// keeps them until both go). Entries already gone are fine.
pub fn remove_remote(nl: &mut Netlink, vxlan_index: u32, entry: &RemoteEntry) -> Result<()> {
    let have = remotes(nl, vxlan_index)?;
    let vteps: Vec<IpAddr> = have
        .fdb
        .iter()
        .filter(|(mac, _)| *mac == entry.mac)
        .map(|(_, vtep)| *vtep)
        .collect();
    if !vteps.is_empty() && !vteps.contains(&entry.vtep) {
        return Ok(());
    }
    let mut msgs = Vec::new();
    if have.neighbours.contains(&(entry.ip, entry.mac)) {
        msgs.push(Netlink::neighbour_msg(vxlan_index, entry.ip, None));
    }
    let mac_has_other_address = have
        .neighbours
        .iter()
        .any(|&(ip, mac)| mac == entry.mac && ip != entry.ip);
    if !mac_has_other_address {
        if have.fdb.contains(&(entry.mac, entry.vtep)) {
            msgs.push(Netlink::fdb_msg(
                false,
                vxlan_index,
                entry.mac,
                Some(entry.vtep),
                FdbTable::Device,
            ));
        }
        let other_vtep = vteps.iter().any(|v| *v != entry.vtep);
        if !other_vtep && have.bridge_fdb.contains(&entry.mac) {
            msgs.push(Netlink::fdb_msg(
                false,
                vxlan_index,
                entry.mac,
                None,
                FdbTable::Bridge,
            ));
        }
    }
    if msgs.is_empty() {
        return Ok(());
    }
    ignore_gone(nl.batch(msgs))
}

/// The remote entries of the VXLAN device `vxlan_index`. This reads the host's whole FDB (the
/// kernel cannot be asked for one port's without strict checking), so it is for reconciling,
/// not for every attach.
pub fn remotes(nl: &mut Netlink, vxlan_index: u32) -> Result<Remotes> {
    let mut out = Remotes::default();
    for n in nl.neighbours(AddressFamily::Bridge, Some(vxlan_index))? {
        let Some(mac) = n.mac else { continue };
        if n.flags.contains(NeighbourFlags::Own) {
            // The driver's own entries; those without a destination (none are made here) are
            // not remotes.
            if let (Some(vtep), true) = (n.ip, has(n.state, NeighbourState::Permanent)) {
                out.fdb.push((mac, vtep));
            }
        } else if has(n.state, NeighbourState::Noarp) && !has(n.state, NeighbourState::Permanent) {
            // Static bridge entries; the permanent one is the device's own MAC.
            out.bridge_fdb.push(mac);
        }
    }
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for n in nl.neighbours(family, Some(vxlan_index))? {
            if let (Some(ip), Some(mac), true) =
                (n.ip, n.mac, has(n.state, NeighbourState::Permanent))
            {
                out.neighbours.push((ip, mac));
            }
        }
    }
    out.normalise();
    Ok(out)
}

/// Makes the device's remote entries exactly `desired`, in one batch: entries not desired are
/// deleted first, then the missing or different ones are set. Returns how many entries were
/// changed (0: it was in sync). This is all a reconciler needs: `remotes` and `add_remote` /
/// `remove_remote` are for looking and for single changes.
///
/// With the device's `bridge`, the remotes' IPv6 addresses get permanent neighbour entries
/// there too: a connection the host DNATs toward one (a service's backend on another host)
/// goes back out of the bridge through br_netfilter, which loses what waits for a neighbour
/// solicitation (IPv4 is not affected). Only entries that are a departing remote's own are
/// deleted there; the bridge also holds this host's endpoints' entries.
pub fn sync_remotes(
    nl: &mut Netlink,
    vxlan_index: u32,
    bridge: Option<u32>,
    desired: &[RemoteEntry],
) -> Result<usize> {
    let have = remotes(nl, vxlan_index)?;
    let want = Remotes::of(desired);
    let mut msgs = Vec::new();
    if let Some(bridge) = bridge {
        let on_bridge: Vec<(IpAddr, [u8; 6])> = nl
            .neighbours(AddressFamily::Inet6, Some(bridge))?
            .into_iter()
            .filter(|n| has(n.state, NeighbourState::Permanent))
            .filter_map(|n| Some((n.ip?, n.mac?)))
            .collect();
        for e in have
            .neighbours
            .iter()
            .filter(|e| e.0.is_ipv6() && !want.neighbours.contains(e) && on_bridge.contains(e))
        {
            msgs.push(Netlink::neighbour_msg(bridge, e.0, None));
        }
        for &(ip, mac) in want
            .neighbours
            .iter()
            .filter(|e| e.0.is_ipv6() && !on_bridge.contains(e))
        {
            msgs.push(Netlink::neighbour_msg(bridge, ip, Some(mac)));
        }
    }
    // Deletions go first: a device entry is deleted by (MAC, VTEP), so deleting a stale VTEP of
    // a MAC that is also being set to a new one cannot remove the new one.
    for &(mac, vtep) in have.fdb.iter().filter(|e| !want.fdb.contains(e)) {
        msgs.push(Netlink::fdb_msg(
            false,
            vxlan_index,
            mac,
            Some(vtep),
            FdbTable::Device,
        ));
    }
    for &mac in have
        .bridge_fdb
        .iter()
        .filter(|m| !want.bridge_fdb.contains(m))
    {
        msgs.push(Netlink::fdb_msg(
            false,
            vxlan_index,
            mac,
            None,
            FdbTable::Bridge,
        ));
    }
    let wanted_ips: HashSet<IpAddr> = want.neighbours.iter().map(|(ip, _)| *ip).collect();
    for &(ip, _) in have
        .neighbours
        .iter()
        .filter(|(ip, _)| !wanted_ips.contains(ip))
    {
        msgs.push(Netlink::neighbour_msg(vxlan_index, ip, None));
    }
    for &(mac, vtep) in want.fdb.iter().filter(|e| !have.fdb.contains(e)) {
        msgs.push(Netlink::fdb_msg(
            true,
            vxlan_index,
            mac,
            Some(vtep),
            FdbTable::Device,
        ));
    }
    for &mac in want
        .bridge_fdb
        .iter()
        .filter(|m| !have.bridge_fdb.contains(m))
    {
        msgs.push(Netlink::fdb_msg(
            true,
            vxlan_index,
            mac,
            None,
            FdbTable::Bridge,
        ));
    }
    for &(ip, mac) in want
        .neighbours
        .iter()
        .filter(|e| !have.neighbours.contains(e))
    {
        msgs.push(Netlink::neighbour_msg(vxlan_index, ip, Some(mac)));
    }
    let changed = msgs.len();
    if changed > 0 {
        nl.batch(msgs)?;
    }
    Ok(changed)
}

/// A VXLAN device's settings as the kernel reports them.
#[derive(Debug, Default)]
struct VxlanState {
    index: u32,
    kind_vxlan: bool,
    up: bool,
    mtu: u32,
    controller: Option<u32>,
    mac: Option<[u8; 6]>,
    vni: Option<u32>,
    local: Option<IpAddr>,
    port: Option<u16>,
    underlay: Option<u32>,
    /// A multicast group or default remote: the device would flood.
    remote: bool,
    learning: Option<bool>,
    proxy: Option<bool>,
    port_learning: Option<bool>,
}

impl VxlanState {
    fn from(msg: &LinkMessage) -> Self {
        let mut s = VxlanState {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            ..Default::default()
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::Mtu(m) => s.mtu = *m,
                LinkAttribute::Controller(c) => s.controller = Some(*c),
                LinkAttribute::Address(a) => s.mac = a.as_slice().try_into().ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => s.kind_vxlan = *k == InfoKind::Vxlan,
                            LinkInfo::Data(InfoData::Vxlan(data)) => {
                                for d in data {
                                    match d {
                                        InfoVxlan::Id(v) => s.vni = Some(*v),
                                        InfoVxlan::Local(a) => s.local = Some(IpAddr::V4(*a)),
                                        InfoVxlan::Local6(a) => s.local = Some(IpAddr::V6(*a)),
                                        InfoVxlan::Port(p) => s.port = Some(*p),
                                        InfoVxlan::Link(l) => s.underlay = Some(*l),
                                        InfoVxlan::Group(_) | InfoVxlan::Group6(_) => {
                                            s.remote = true
                                        }
                                        InfoVxlan::Learning(l) => s.learning = Some(*l),
                                        InfoVxlan::Proxy(p) => s.proxy = Some(*p),
                                        _ => {}
                                    }
                                }
                            }
                            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                                for p in port {
                                    if let InfoBridgePort::Learning(l) = p {
                                        s.port_learning = Some(*l);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        s
    }

    /// Whether this is the device `spec` describes, in everything that needs a new device to
    /// change.
    fn same_device(&self, spec: &VxlanSpec) -> bool {
        self.kind_vxlan
            && self.vni == Some(spec.vni)
            && self.local == Some(spec.local)
            && self.mac == Some(spec.mac)
            && self.port == Some(spec.port)
            && self.underlay == spec.underlay_index
            && !self.remote
            && self.learning == Some(false)
            && self.proxy == Some(true)
    }
}

fn has(state: NeighbourState, bit: NeighbourState) -> bool {
    u16::from(state) & u16::from(bit) != 0
}

/// A link that vanished while we were removing it is removed.
fn gone_is_fine(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.errno() == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
        other => other,
    }
}

/// An entry that is already gone is removed.
fn ignore_gone(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT as i32) => Ok(()),
        other => other,
    }
}

/// As in the bridge driver: asking for no link-local address where IPv6 cannot be is refused.
fn ipv6_link_local_possible(mtu: u32) -> bool {
    mtu >= 1280 && Path::new("/proc/net/if_inet6").exists()
}
