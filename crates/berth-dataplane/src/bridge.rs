//! The bridge driver: one Linux bridge per network holding the gateway addresses, one veth pair
//! per endpoint. Every function is idempotent ("ensure"), so the same code serves attach and
//! the repair pass after a restart.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::netlink::{LinkRef, VethSpec};
use crate::{DataplaneError, Link, Netlink, Result};

pub struct BridgeSpec {
    pub name: String,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// Gateway addresses with the subnet prefix length.
    pub addresses: Vec<IpNet>,
}

/// Makes the bridge exist, up, with its MTU and gateway addresses. Returns its index.
pub fn ensure_bridge(nl: &mut Netlink, spec: &BridgeSpec) -> Result<u32> {
    let link = match nl.link_by_name(&spec.name)? {
        Some(l) => {
            if !l.up || l.mtu != spec.mtu {
                nl.set_link(l.index, spec.mtu, None)?;
            }
            l
        }
        None => {
            nl.create_bridge(&spec.name, spec.mtu, spec.mac)?;
            nl.link_by_name(&spec.name)?.ok_or_else(|| {
                DataplaneError::Protocol(format!("bridge {} vanished after creation", spec.name))
            })?
        }
    };
    let have = nl.addresses(link.index)?;
    let missing: Vec<_> = spec
        .addresses
        .iter()
        .filter(|a| !have.contains(a))
        .map(|a| Netlink::address_msg(link.index, *a))
        .collect();
    if !missing.is_empty() {
        nl.batch(missing)?;
    }
    Ok(link.index)
}

/// Deletes a link by name; returns whether there was one.
pub fn delete_link(nl: &mut Netlink, name: &str) -> Result<bool> {
    match nl.link_by_name(name)? {
        // Deleted meanwhile (e.g. its peer's namespace went away) is what we wanted.
        Some(l) => gone_is_fine(nl.delete_link(l.index)).map(|()| true),
        None => Ok(false),
    }
}

#[derive(Debug, Clone)]
pub struct EndpointSpec {
    pub host_ifname: String,
    pub bridge_index: u32,
    pub mtu: u32,
    pub ifname: String,
    pub mac: [u8; 6],
    /// Addresses with prefix length.
    pub ips: Vec<IpNet>,
    /// One default gateway per address family.
    pub gateways: Vec<IpAddr>,
    /// Hairpin mode on the host end: set for endpoints that publish ports, so they reach
    /// themselves through the host's address.
    pub hairpin: bool,
}

/// Creates the endpoint: the veth pair (peer made directly in the sandbox under its final name),
/// then the sandbox side's addresses and default routes in one netlink round trip. On failure
/// the pair is removed again, so a failed attach leaves nothing behind.
pub fn attach_endpoint(host: &mut Netlink, ns: &File, spec: &EndpointSpec) -> Result<()> {
    create_pair(host, spec, &spec.ifname, Some(ns))?;
    let configured = Netlink::open_in(ns).and_then(|mut sb| configure_sandbox(&mut sb, spec));
    if configured.is_err() {
        let _ = delete_link(host, &spec.host_ifname);
    }
    configured
}

fn configure_sandbox(sb: &mut Netlink, spec: &EndpointSpec) -> Result<()> {
    let link = sb.link_by_name(&spec.ifname)?.ok_or_else(|| {
        DataplaneError::Protocol(format!(
            "{} missing in the sandbox after creation",
            spec.ifname
        ))
    })?;
    let mut msgs = Vec::new();
    if !spec.ips.iter().any(|ip| ip.addr().is_ipv6()) && ipv6_link_local_possible(spec.mtu) {
        msgs.push(Netlink::no_link_local_msg(LinkRef::Index(link.index)));
    }
    msgs.push(Netlink::set_link_msg(link.index, spec.mtu, None));
    msgs.extend(
        spec.ips
            .iter()
            .map(|ip| Netlink::address_msg(link.index, *ip)),
    );
    msgs.extend(
        spec.gateways
            .iter()
            .map(|gw| Netlink::default_route_msg(link.index, *gw)),
    );
    sb.batch(msgs)
}

/// Whether a link of this MTU would get an IPv6 link-local address: the kernel has IPv6
/// (`/proc/net/if_inet6` exists) and the MTU is at least IPv6's minimum, 1280. (Asking for
/// none where IPv6 cannot be is refused with EAFNOSUPPORT.)
fn ipv6_link_local_possible(mtu: u32) -> bool {
    static KERNEL_HAS_IPV6: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    mtu >= 1280 && *KERNEL_HAS_IPV6.get_or_init(|| Path::new("/proc/net/if_inet6").exists())
}

/// The sandbox side of an endpoint as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxLinkState {
    pub link: Option<Link>,
    pub addresses: Vec<IpNet>,
    pub gateways: Vec<IpAddr>,
}

pub fn sandbox_state(sb: &mut Netlink, ifname: &str) -> Result<SandboxLinkState> {
    let Some(link) = sb.link_by_name(ifname)? else {
        return Ok(SandboxLinkState {
            link: None,
            addresses: vec![],
            gateways: vec![],
        });
    };
    let addresses = sb.addresses(link.index)?;
    let gateways = sb
        .default_routes()?
        .into_iter()
        .filter(|(_, oif)| *oif == Some(link.index))
        .filter_map(|(gw, _)| gw)
        .collect();
    Ok(SandboxLinkState {
        link: Some(link),
        addresses,
        gateways,
    })
}

/// What [`ensure_endpoint`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    Nothing,
    /// The veth pair was missing and was created.
    Recreated,
    /// The pair existed but something (controller, up, address, route) was put back.
    Reconfigured,
}

/// Brings an endpoint back to its spec. `host_link` is the host end as found by the caller (one
/// dump for all endpoints, rather than one lookup each).
pub fn ensure_endpoint(
    host: &mut Netlink,
    host_link: Option<&Link>,
    ns: &File,
    spec: &EndpointSpec,
) -> Result<Repair> {
    let Some(host_link) = host_link else {
        attach_endpoint(host, ns, spec)?;
        return Ok(Repair::Recreated);
    };
    let mut repair = Repair::Nothing;
    if host_link.controller != Some(spec.bridge_index) || !host_link.up {
        host.set_link(host_link.index, spec.mtu, Some(spec.bridge_index))?;
        repair = Repair::Reconfigured;
    }
    let mut sb = Netlink::open_in(ns)?;
    let state = sandbox_state(&mut sb, &spec.ifname)?;
    let Some(link) = state.link else {
        // The host end exists but its peer is not where it should be: start over.
        delete_link(host, &spec.host_ifname)?;
        attach_endpoint(host, ns, spec)?;
        return Ok(Repair::Recreated);
    };
    let mut msgs: Vec<_> = spec
        .ips
        .iter()
        .filter(|ip| !state.addresses.contains(ip))
        .map(|ip| Netlink::address_msg(link.index, *ip))
        .collect();
    msgs.extend(
        spec.gateways
            .iter()
            .filter(|gw| !state.gateways.contains(gw))
            .map(|gw| Netlink::default_route_msg(link.index, *gw)),
    );
    if !link.up {
        sb.set_link(link.index, spec.mtu, None)?;
        repair = Repair::Reconfigured;
    }
    if !msgs.is_empty() {
        sb.batch(msgs)?;
        repair = Repair::Reconfigured;
    }
    Ok(repair)
}

/// Link group for host ends of detached endpoints waiting to be deleted.
pub const REAP_GROUP: u32 = 0x6265_7274; // "bert"

/// The fast half of removing an endpoint: the host end goes down and into [`REAP_GROUP`], and
/// the sandbox end (if it still has `mac`) goes down and is renamed to `tombstone`, so the sandbox loses the network at
/// once and its interface name is free again. [`reap`] deletes the pairs later, in one batch.
/// Missing links (the namespace died, say) are fine: there is less to retire.
pub fn retire_endpoint(
    host: &mut Netlink,
    host_ifname: &str,
    sandbox: Option<(&File, &str, [u8; 6])>,
    tombstone: &str,
    ips: &[IpNet],
) -> Result<()> {
    // The sandbox end first: once the host end is in the reap group, a reap pass already under
    // way may delete the pair at any moment.
    if let Some((ns, ifname, mac)) = sandbox {
        let mut sb = Netlink::open_in(ns)?;
        // Only our interface: by now the name may belong to another endpoint.
        if let Some(l) = sb.link_by_name(ifname)?.filter(|l| l.mac == Some(mac)) {
            gone_is_fine(sb.retire_link(l.index, Some(tombstone), None))?;
        }
    }
    if let Some(l) = host.link_by_name(host_ifname)? {
        gone_is_fine(host.retire_link(l.index, None, Some(REAP_GROUP)))?;
        // Its neighbour entries on the bridge (see `create_pair`) go with it: its addresses
        // may be another endpoint's next, here or on another host.
        if let Some(bridge) = l.controller {
            for ip in ips.iter().filter(|ip| ip.addr().is_ipv6()) {
                let _ = host.batch(vec![Netlink::neighbour_msg(bridge, ip.addr(), None)]);
            }
        }
    }
    Ok(())
}

/// A link that vanished while we were removing it is removed.
fn gone_is_fine(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.errno() == Some(nix::errno::Errno::ENODEV as i32) => Ok(()),
        other => other,
    }
}

/// Deletes every retired endpoint's veth pair at once.
pub fn reap(host: &mut Netlink) -> Result<()> {
    host.delete_group(REAP_GROUP)
}

/// Creates an endpoint's veth pair with both ends in the host namespace: the host end on the
/// bridge and up, the peer named `peer_name` with the endpoint's MAC, for a container runtime
/// (Docker) to move into the sandbox and configure.
pub fn create_runtime_endpoint(
    host: &mut Netlink,
    spec: &EndpointSpec,
    peer_name: &str,
) -> Result<()> {
    create_pair(host, spec, peer_name, None)
}

/// The endpoint's veth pair, host end on the bridge (in hairpin mode if the spec asks), peer
/// in `peer_ns` or beside the host end. Nothing is left if any step fails.
fn create_pair(
    host: &mut Netlink,
    spec: &EndpointSpec,
    peer_name: &str,
    peer_ns: Option<&File>,
) -> Result<()> {
    host.create_veth(&VethSpec {
        host_name: &spec.host_ifname,
        no_link_local: ipv6_link_local_possible(spec.mtu),
        controller: spec.bridge_index,
        mtu: spec.mtu,
        peer_name,
        peer_mac: spec.mac,
        peer_ns,
    })?;
    if spec.hairpin {
        let set = host.set_hairpin(&spec.host_ifname);
        if set.is_err() {
            let _ = delete_link(host, &spec.host_ifname);
        }
        set?;
    }
    // The host knows the endpoint's IPv6 neighbour entries from the start: a connection
    // DNATed by br_netfilter to an endpoint of the same bridge (a service's backend) is lost
    // while the host still solicits its address (IPv4 is not).
    let neighbours: Vec<_> = spec
        .ips
        .iter()
        .filter(|ip| ip.addr().is_ipv6())
        .map(|ip| Netlink::neighbour_msg(spec.bridge_index, ip.addr(), Some(spec.mac)))
        .collect();
    if !neighbours.is_empty() {
        let set = host.batch(neighbours);
        if set.is_err() {
            let _ = delete_link(host, &spec.host_ifname);
        }
        set?;
    }
    Ok(())
}
