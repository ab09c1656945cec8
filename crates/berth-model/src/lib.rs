//! berth's desired state: networks, sandboxes and endpoints, as stored and as served by the API.
//!
//! Everything here is plain data and pure validation so that front-ends (CLI, Docker, CNI) and
//! the agent agree on one meaning of every field, and so it can be tested without root.

mod caps;
mod names;
mod policy;
mod ports;
mod selector;
mod service;
mod validate;

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use caps::{
    MAX_ALIASES, MAX_BODY, MAX_CONTAINER_ID, MAX_GC_ATTACHMENTS, MAX_LABEL_NAME, MAX_LABEL_PREFIX,
    MAX_LABEL_VALUE, MAX_LABELS, MAX_NAME, MAX_NAMED_PORTS, MAX_NETNS_PATH, MAX_NODE_PORTS,
    MAX_PUBLISHED_PORTS, MAX_REQUESTED_IPS, MAX_SELECTOR_TERMS, MAX_SELECTOR_VALUES,
    MAX_SERVICE_PORTS, MAX_VIPS, Shown, check_count, check_length,
};
pub use names::{
    BRIDGE_PREFIX, IFNAME_MAX, TOMBSTONE_PREFIX, VETH_PREFIX, VXLAN_PREFIX, bridge_name,
    is_berth_link_name, tombstone_name, veth_name, vxlan_name,
};
pub use policy::{
    NamedPort, Peer, Policy, PolicyFileError, PolicyPort, PolicyRule, PortRef,
    parse_policy_documents, validate_named_ports,
};
pub use ports::{MAX_RANGE, PortMapping, Protocol, parse_publish, validate_published_ports};
pub use selector::{Operator, Requirement, Selector};
pub use service::{
    DEFAULT_AFFINITY_TIMEOUT, DEFAULT_SERVICE_CIDR, DEFAULT_SERVICE_CIDR6, MAX_AFFINITY_TIMEOUT,
    NODE_PORTS, PortName, Service, ServiceBackend, ServicePort, apply_publish,
    parse_affinity_timeout,
};
pub use validate::{
    IPV6_MIN_MTU, MacAddr, ModelError, parse_cidr, parse_requested_ips, parse_subnet,
    validate_aliases, validate_container_id, validate_ifname, validate_label, validate_labels,
    validate_mtu, validate_name, validate_netns_ref, validate_network_mtu, validate_sandbox_name,
    validate_subnet,
};

/// Labels on an endpoint (`app=web`): what services and policies select endpoints by.
pub type Labels = std::collections::BTreeMap<String, String>;

/// The pool that networks created without `--subnet` are carved from, one /24 each.
pub const DEFAULT_POOL: &str = "10.210.0.0/16";
/// Prefix length of the subnets carved from [`DEFAULT_POOL`].
pub const DEFAULT_POOL_PREFIX: u8 = 24;
/// MTU used when neither the user nor the host's default route gives one.
pub const FALLBACK_MTU: u32 = 1500;

/// One L2 network: a bridge on each host, with one subnet per address family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Random hex identifier; the bridge name is derived from it.
    pub id: String,
    pub name: String,
    /// At most one IPv4 and one IPv6 subnet.
    pub subnets: Vec<Subnet>,
    pub mtu: u32,
    /// An internal network has no way out of the host.
    pub internal: bool,
    /// The Linux bridge that carries the network on this host.
    pub bridge: String,
    /// How containers on the network reach berth's DNS; filled in by the daemon when it
    /// answers, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<NetworkDns>,
    /// The Docker networks of berth's driver on this network, by id (the engine never tells
    /// a driver a network's name; `docker network ls` lists these ids); filled in by the
    /// daemon when it answers, never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub docker_networks: Vec<String>,
    /// How the network reaches across hosts.
    #[serde(default)]
    pub driver: Driver,
    /// The VXLAN network identifier of an overlay network, unique in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// The host a bridge network belongs to (bridge networks stay on the host that made
    /// them); `None` for overlay networks, and for records made before berth knew hosts,
    /// which belong to the one host that has the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The address blocks hosts have claimed on an overlay network; filled in by the daemon
    /// when it answers, never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block>,
    /// Being removed: attaches are refused while the removal checks every host for
    /// endpoints.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
}

/// How a network carries traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// One bridge on the host that made the network.
    #[default]
    Bridge,
    /// A bridge on every host with endpoints, joined by VXLAN over the hosts' underlay.
    Overlay,
}

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Driver::Bridge => "bridge",
            Driver::Overlay => "overlay",
        })
    }
}

impl std::str::FromStr for Driver {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "bridge" => Ok(Driver::Bridge),
            "overlay" => Ok(Driver::Overlay),
            other => Err(ModelError::UnknownDriver(other.to_string())),
        }
    }
}

/// A part of an overlay network's subnet from which one host allocates without asking others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub cidr: IpNet,
    pub host: String,
}

/// A daemon in the cluster, as it registers itself (under a lease: the record goes when the
/// daemon stops renewing it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: String,
    /// Where other hosts send this host's overlay traffic; `None` for a host without an
    /// underlay address, which cannot carry overlay networks.
    pub address: Option<IpAddr>,
    /// The MAC of this host's VXLAN devices: derived from the id, so stable across restarts.
    pub vtep_mac: MacAddr,
    /// The underlay interface's MTU.
    pub mtu: u32,
    pub version: String,
}

/// The DNS service of a network as containers use it (resolv.conf, CNI `dns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDns {
    /// The addresses berth answers on (the gateways).
    pub nameservers: Vec<IpAddr>,
    /// The search domain: `NETWORK.SUFFIX`.
    pub domain: String,
}

impl Network {
    pub fn subnet_v4(&self) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.cidr.addr().is_ipv4())
    }
    pub fn subnet_v6(&self) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.cidr.addr().is_ipv6())
    }
    /// The subnet an address belongs to, if any.
    pub fn subnet_for(&self, ip: IpAddr) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.cidr.contains(&ip))
    }

    /// Refuses an address asked for an endpoint that can never be one: a gateway (the bridge
    /// holds it), the network address, or the IPv4 broadcast address. Addresses outside the
    /// network are left to the caller, which names the subnets.
    pub fn check_endpoint_ip(&self, ip: IpAddr) -> Result<(), ModelError> {
        let Some(s) = self.subnet_for(ip) else {
            return Ok(());
        };
        let what = if s.gateway == ip {
            "gateway"
        } else if ip == s.cidr.network() {
            "network address"
        } else if s.cidr.addr().is_ipv4() && ip == s.cidr.broadcast() {
            "broadcast address"
        } else {
            return Ok(());
        };
        Err(ModelError::ReservedAddress {
            ip,
            network: self.name.clone(),
            subnet: s.cidr,
            what,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// The subnet in canonical form (host bits zero).
    pub cidr: IpNet,
    /// The gateway address, held by the bridge.
    pub gateway: IpAddr,
}

/// A network namespace berth created and named (`berth sandbox create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub name: String,
    /// Where the namespace is bind-mounted (`<netns-dir>/<name>`).
    pub path: String,
    /// Being removed: attaching to it is refused, so none can slip in behind the removal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
}

/// One interface of one sandbox on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Random hex identifier; the host-side veth name is derived from it.
    pub id: String,
    pub network: String,
    /// The sandbox's network namespace.
    pub netns: NetnsRef,
    /// Interface name inside the sandbox.
    pub ifname: String,
    /// Host-side veth name.
    pub host_ifname: String,
    /// The endpoint's name (for service discovery); defaults to the sandbox name.
    pub name: Option<String>,
    /// More names for service discovery (CNI `aliases`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// The container runtime's id, for endpoints made through CNI: with the interface name it
    /// identifies the endpoint even after the namespace is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The container runtime (Docker) configures the sandbox side (it moves the interface in,
    /// names it and sets its addresses); berth owns the host side only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub runtime_configured: bool,
    pub mac: MacAddr,
    /// Addresses with the subnet's prefix length, IPv4 first.
    pub ips: Vec<IpNet>,
    /// Host ports forwarded to this endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// The gateways of this endpoint that the sandbox's default routes go through: one
    /// endpoint per namespace and address family holds the default route (the first attached,
    /// or one attached with `default_route`). Filled in by the daemon when it answers, never
    /// stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_gateways: Vec<IpAddr>,
    /// The host the endpoint lives on; `None` on records made before berth knew hosts, which
    /// belong to the one host that has the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Labels, for services and policies to select endpoints by.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Ports the endpoint names, which policies may refer to by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
}

impl Endpoint {
    /// Whether the endpoint lives on `host` (records without a host are the local store's).
    pub fn is_on(&self, host: &str) -> bool {
        self.host.as_deref().is_none_or(|h| h == host)
    }
}

impl Network {
    /// Whether this host carries the network: overlay networks are everywhere, bridge
    /// networks on their own host (records without a host are the local store's).
    pub fn is_usable_on(&self, host: &str) -> bool {
        self.driver == Driver::Overlay || self.host.as_deref().is_none_or(|h| h == host)
    }
}

/// A network namespace as berth refers to it: where it is and which namespace it was.
///
/// The identity (`dev:inode` of the nsfs file) tells a namespace that went away and was replaced
/// by another at the same path (a reused `/proc/PID/ns/net`) from the one berth attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRef {
    pub path: String,
    pub id: String,
    /// Set when the namespace is a berth sandbox.
    pub sandbox: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addresses_that_belong_to_the_network_are_refused() {
        let net = Network {
            id: "1".into(),
            name: "blue".into(),
            subnets: vec![
                Subnet {
                    cidr: "10.91.0.0/24".parse().unwrap(),
                    gateway: "10.91.0.1".parse().unwrap(),
                },
                Subnet {
                    cidr: "fd00:91::/64".parse().unwrap(),
                    gateway: "fd00:91::1".parse().unwrap(),
                },
            ],
            mtu: 1500,
            internal: false,
            bridge: "berth-1".into(),
            dns: None,
            docker_networks: vec![],
            driver: Driver::Bridge,
            vni: None,
            host: None,
            blocks: vec![],
            removing: false,
        };
        for (ip, what) in [
            ("10.91.0.1", "gateway"),
            ("fd00:91::1", "gateway"),
            ("10.91.0.0", "network address"),
            ("fd00:91::", "network address"),
            ("10.91.0.255", "broadcast address"),
        ] {
            let err = net.check_endpoint_ip(ip.parse().unwrap()).unwrap_err();
            assert!(
                err.to_string().contains(&format!("it is the {what} of")),
                "{ip}: {err}"
            );
        }
        for ok in ["10.91.0.2", "10.91.0.254", "fd00:91::2", "10.92.0.1"] {
            assert!(net.check_endpoint_ip(ok.parse().unwrap()).is_ok(), "{ok}");
        }
    }
}
