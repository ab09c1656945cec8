//! The store's key layout. One place, so that every writer and the reconciler agree.
//!
//! ```text
//! networks/<network>                 Network
//! ipam/<network>/<ip>                owner: "gateway" or an endpoint id
//! endpoints/<id>                     Endpoint
//! attachments/<netns-id>/<ifname>    endpoint id   (one interface name per namespace)
//! members/<network>/<netns-id>       endpoint id   (one endpoint per namespace and network)
//! containers/<network>/<cid>/<ifname>  endpoint id  (CNI: one per container interface)
//! sandboxes/<name>                   Sandbox
//! docker/pools/<pool id>            DockerPool      (Docker IPAM driver)
//! docker/networks/<docker id>        DockerNetwork   (Docker network driver)
//! docker/endpoints/<docker id>       DockerEndpoint
//! ports/<proto>/<port>/<host ip|*>  endpoint id   (a published host port; * = every address)
//! releasing/<id>                     Endpoint, detached, whose veth is not deleted yet: its
//!                                    addresses stay held until it is
//! default-routes/<netns-id>/<ipv4|ipv6>  endpoint id  (whose gateway the namespace's default
//!                                    route of that family goes through: one per namespace)
//! hosts/<host>                       HostRecord, under the host's lease (gone with it)
//! host-addresses/<host>              HostRecord, not leased: the host's last registered
//!                                    address, kept while its lease lapsed (other hosts keep
//!                                    sending its endpoints' traffic there) and removed when
//!                                    the host is freed
//! hosts-gone/<host>                  when a host's lease was first seen lapsed (seconds since
//!                                    the epoch); its records are freed a grace period later
//! blocks/<network>/<addr>-<prefix>   host id (an overlay network's address block it owns)
//! vnis/<vni>                         network name (one overlay network per VNI)
//! subnets/<addr>-<prefix>            network name (two hosts creating networks at once
//!                                    cannot both take one subnet)
//! services/<name>                    Service
//! vips/<ip>                          service name (one service per VIP)
//! node-ports/<proto>/<port>          service name (one service per published port)
//! config/service-cidrs               the cluster's service ranges (every host uses the same)
//! policies/<name>                    Policy
//! ```
//!
//! On a shared store (etcd) the host-scoped keys ([`HOST_SCOPED`]: namespaces, sandboxes,
//! Docker's state, published ports, ...) live under `local/<host>/`, added and stripped by
//! [`crate::scope::HostScoped`], so the code above reads as if it were the only host.

use std::net::IpAddr;

use ipnet::IpNet;

use berth_model::{PortMapping, Protocol};

pub const NETWORKS: &str = "networks/";
pub const IPAM: &str = "ipam/";
pub const ENDPOINTS: &str = "endpoints/";
pub const ATTACHMENTS: &str = "attachments/";
pub const MEMBERS: &str = "members/";
pub const SANDBOXES: &str = "sandboxes/";
pub const RELEASING: &str = "releasing/";
pub const CONTAINERS: &str = "containers/";
pub const PORTS: &str = "ports/";
pub const DEFAULT_ROUTES: &str = "default-routes/";
pub const HOSTS: &str = "hosts/";
pub const HOSTS_GONE: &str = "hosts-gone/";
pub const HOST_ADDRESSES: &str = "host-addresses/";
pub const BLOCKS: &str = "blocks/";
pub const VNIS: &str = "vnis/";
pub const SUBNETS: &str = "subnets/";
pub const SERVICES: &str = "services/";
pub const VIPS: &str = "vips/";
pub const NODE_PORTS: &str = "node-ports/";
pub const SERVICE_CIDRS: &str = "config/service-cidrs";
pub const POLICIES: &str = "policies/";
/// Where a shared store keeps each host's own records: `local/<host>/`.
pub const LOCAL: &str = "local/";
/// The keys only one host acts on: they name its namespaces, its sandboxes, its Docker
/// engine's objects, its host ports.
pub const HOST_SCOPED: &[&str] = &[
    ATTACHMENTS,
    MEMBERS,
    CONTAINERS,
    SANDBOXES,
    RELEASING,
    PORTS,
    DEFAULT_ROUTES,
    "docker/",
];
/// The host-address part of a port published on every address.
pub const ALL_ADDRESSES: &str = "*";

pub const GATEWAY_OWNER: &str = "gateway";
/// Owner of addresses Docker's IPAM calls reserved before an endpoint exists:
/// `docker:<pool id>`.
pub const DOCKER_OWNER_PREFIX: &str = "docker:";
pub const DOCKER_POOLS: &str = "docker/pools/";
pub const DOCKER_NETWORKS: &str = "docker/networks/";
pub const DOCKER_ENDPOINTS: &str = "docker/endpoints/";

pub fn network(name: &str) -> String {
    format!("{NETWORKS}{name}")
}
pub fn ipam_prefix(network: &str) -> String {
    format!("{IPAM}{network}/")
}
pub fn ipam(network: &str, ip: IpAddr) -> String {
    format!("{IPAM}{network}/{ip}")
}
/// The address of an [`ipam`] key.
pub fn ipam_address(key: &str) -> Option<IpAddr> {
    key.rsplit('/').next()?.parse().ok()
}
pub fn endpoint(id: &str) -> String {
    format!("{ENDPOINTS}{id}")
}
pub fn attachments_prefix(netns_id: &str) -> String {
    format!("{ATTACHMENTS}{netns_id}/")
}
pub fn attachment(netns_id: &str, ifname: &str) -> String {
    format!("{ATTACHMENTS}{netns_id}/{ifname}")
}
pub fn members_prefix(network: &str) -> String {
    format!("{MEMBERS}{network}/")
}
pub fn member(network: &str, netns_id: &str) -> String {
    format!("{MEMBERS}{network}/{netns_id}")
}
pub fn sandbox(name: &str) -> String {
    format!("{SANDBOXES}{name}")
}
pub fn releasing(id: &str) -> String {
    format!("{RELEASING}{id}")
}
pub fn containers_prefix(network: &str) -> String {
    format!("{CONTAINERS}{network}/")
}
pub fn container(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{CONTAINERS}{network}/{container_id}/{ifname}")
}
pub fn default_route(netns_id: &str, ipv4: bool) -> String {
    let family = if ipv4 { "ipv4" } else { "ipv6" };
    format!("{DEFAULT_ROUTES}{netns_id}/{family}")
}
pub fn default_routes_prefix(netns_id: &str) -> String {
    format!("{DEFAULT_ROUTES}{netns_id}/")
}
/// Whether a [`default_route`] key is for IPv4.
pub fn default_route_is_ipv4(key: &str) -> bool {
    key.ends_with("/ipv4")
}
pub fn docker_pool(id: &str) -> String {
    format!("{DOCKER_POOLS}{id}")
}
pub fn docker_network(id: &str) -> String {
    format!("{DOCKER_NETWORKS}{id}")
}
pub fn docker_endpoint(id: &str) -> String {
    format!("{DOCKER_ENDPOINTS}{id}")
}
pub fn port_prefix(protocol: Protocol, port: u16) -> String {
    format!("{PORTS}{protocol}/{port}/")
}
pub fn port(m: &PortMapping) -> String {
    let on = m
        .host_ip
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| ALL_ADDRESSES.to_string());
    format!("{}{on}", port_prefix(m.protocol, m.host_port))
}
pub fn host(id: &str) -> String {
    format!("{HOSTS}{id}")
}
pub fn host_gone(id: &str) -> String {
    format!("{HOSTS_GONE}{id}")
}
pub fn host_address(id: &str) -> String {
    format!("{HOST_ADDRESSES}{id}")
}
pub fn local_prefix(host: &str) -> String {
    format!("{LOCAL}{host}/")
}
pub fn blocks_prefix(network: &str) -> String {
    format!("{BLOCKS}{network}/")
}
pub fn block(network: &str, cidr: IpNet) -> String {
    format!("{BLOCKS}{network}/{}-{}", cidr.addr(), cidr.prefix_len())
}
/// The block of a [`block`] key.
pub fn block_cidr(key: &str) -> Option<IpNet> {
    let (addr, len) = key.rsplit('/').next()?.rsplit_once('-')?;
    IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()
}
pub fn vni(vni: u32) -> String {
    format!("{VNIS}{vni}")
}
pub fn subnet(cidr: IpNet) -> String {
    format!("{SUBNETS}{}-{}", cidr.addr(), cidr.prefix_len())
}
pub fn service(name: &str) -> String {
    format!("{SERVICES}{name}")
}
pub fn policy(name: &str) -> String {
    format!("{POLICIES}{name}")
}
pub fn vip(ip: IpAddr) -> String {
    format!("{VIPS}{ip}")
}
pub fn node_port(protocol: Protocol, port: u16) -> String {
    format!("{NODE_PORTS}{protocol}/{port}")
}
