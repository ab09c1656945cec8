//! The berth API (`/v1/...`, HTTP/JSON on a unix socket): request and response types shared by
//! the daemon and its clients, and a synchronous client.
//!
//! The client is deliberately plain `std` I/O: the CLI and the CNI plugin are short-lived
//! processes whose start-up time is part of every attach, so they carry no async runtime.

mod client;

use std::io::Read;

use serde::{Deserialize, Serialize};

pub use berth_model::{
    Endpoint, Labels, MAX_BODY, MacAddr, ModelError, NamedPort, NetnsRef, Network, NetworkDns,
    Policy, PortMapping, Protocol, Sandbox, Selector, Service, ServiceBackend, ServicePort, Subnet,
    parse_publish, parse_subnet, validate_network_mtu,
};
pub use client::{Client, ClientError};

/// Reads all of `r` when it is at most `cap` bytes; `None` when it is longer, having read only
/// `cap + 1` bytes of it, so that a client holds no more of an input than it could send.
pub fn read_at_most(r: impl Read, cap: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(cap as u64 + 1).read_to_end(&mut buf)?;
    Ok((buf.len() <= cap).then_some(buf))
}

/// Default API socket (`<run-dir>/berth.sock`).
pub const DEFAULT_SOCKET: &str = "/run/berth/berth.sock";

/// `POST /v1/networks`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    pub name: String,
    /// IPv4 subnet; when absent a free /24 is carved from the default pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub internal: bool,
    /// `bridge` (the default: on this host only) or `overlay` (on every host, over VXLAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The VXLAN network identifier of an overlay network; a free one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
}

/// `POST /v1/services`: a virtual IP in front of the network's endpoints whose labels match
/// `selector`. Ports, published ports and the timeout use the CLI's syntax, so a request
/// reads as the command it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    pub name: String,
    pub network: String,
    /// Kubernetes' label selector syntax (`app=web,tier in (a,b)`); empty selects every
    /// endpoint of the network.
    #[serde(default)]
    pub selector: String,
    /// `[NAME=]PORT[:TARGET][/PROTO]`, e.g. `http=80:8080/tcp`.
    pub ports: Vec<String>,
    /// `NODEPORT` (a service with one port) or `PORT_OR_NAME=NODEPORT`: published on every
    /// host's addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// `none` (the default) or `client-ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// Seconds, or `30m`, `3h`; only with `client-ip` affinity (default 3h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<String>,
    /// Chosen virtual IPs (one per address family); free ones from the service range when
    /// absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<std::net::IpAddr>,
}

/// `GET /v1/hosts`: one host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub id: String,
    pub address: Option<std::net::IpAddr>,
    pub vtep_mac: Option<MacAddr>,
    /// `up` (its lease is alive) or `gone` (lapsed; its records wait for the grace period).
    /// A gone host shows its last registered address and VTEP MAC.
    pub state: String,
    pub endpoints: usize,
    /// Seconds since the epoch: an up host's last lease renewal (whole seconds, from the
    /// lease's remaining TTL), a gone host's lapse as first noticed; 0 when unknown.
    pub last_seen: u64,
}

/// `POST /v1/sandboxes`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    pub name: String,
}

/// `POST /v1/endpoints`: attach a sandbox (a berth sandbox name, or any netns path) to a
/// network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub network: String,
    pub sandbox: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Requested IPv4 and/or IPv6 addresses (without prefix length).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Set by CNI: the runtime's container id; `(network, container_id, ifname)` is unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Host ports to forward to the endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Publish `ports` even where a process of the host already serves them (it then gets
    /// none of their traffic); without it such a port is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Take the sandbox's default routes (of the families this network has) from the network
    /// that holds them. Without it, a sandbox's default route stays with the network attached
    /// first, and passes to the next-oldest one when that network is detached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_route: bool,
    /// Labels (`{"app": "web"}`), for services and policies to select the endpoint by.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Ports the endpoint names (`http=8080/tcp`), which policies may refer to by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
}

/// `POST /v1/detach`: detach from a network either a sandbox (name or netns path), or the
/// interface `ifname` of a CNI container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detach {
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
}

/// `GET /v1/endpoints/{id}/check`: the endpoint as the kernel has it, against the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// One line per thing that is not as it should be; empty when all is well.
    pub problems: Vec<String>,
}

/// `POST /v1/gc`: remove the CNI endpoints of `network` that are not in `valid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gc {
    pub network: String,
    pub valid: Vec<Attachment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

/// The answer to [`Gc`]: ids of the endpoints removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub removed: Vec<String>,
}

/// `GET /v1/networks/{name}/allocations`: one address held in the network's IPAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ip: String,
    /// `gateway`, or the id of the endpoint holding it.
    pub owner: String,
}

/// `GET /v1/status`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub store: String,
    pub netns_dir: String,
    pub networks: usize,
    /// This host's endpoints.
    pub endpoints: usize,
    pub sandboxes: usize,
    /// This host's id in the cluster.
    #[serde(default)]
    pub host: String,
    /// Its underlay address, if it has one.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// Address-block claims lost to another host since the daemon started.
    #[serde(default)]
    pub block_claim_retries: u64,
}

/// Every error response: `{"error": "one line a person can act on"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
