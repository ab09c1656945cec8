//! The Docker front-end: libnetwork's remote `NetworkDriver` and `IpamDriver` on one unix
//! socket, translated onto berth's networks, IPAM and endpoints, so Docker containers, CNI
//! containers and berth sandboxes can share a network.
//!
//! The engine's order of calls shapes the state kept here: IPAM pools are requested before
//! the network exists (`docker/pools/`), addresses before the endpoint exists (reserved in the
//! network's IPAM under a `docker:<pool>` owner), and the sandbox is known only at Join, when
//! the berth endpoint is made and takes the addresses over. libnetwork moves the veth peer into
//! the sandbox and configures it, so those endpoints are `runtime_configured`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use berth_api::CreateNetwork;
use berth_dataplane::{Netlink, netns};
use berth_model::{
    DEFAULT_POOL, DEFAULT_POOL_PREFIX, Driver, Endpoint, Labels, MAX_BODY, MAX_LABELS,
    MAX_NAMED_PORTS, MAX_PUBLISHED_PORTS, MacAddr, ModelError, NamedPort, NetnsRef, Network,
    PortMapping, Protocol, check_count, validate_labels, validate_named_ports, veth_name,
};
use berth_store::{Compare, Txn, TxnOutcome};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use tokio::sync::watch;

use crate::endpoints::{Held, endpoint_on_bridge, endpoint_spec};
use crate::{Agent, AgentError, Result, encode, kernel, keys, random_id, remove_link};

/// `-o berth.network=NAME` (driver) or `--ipam-opt berth.network=NAME`: use the existing berth
/// network NAME instead of creating one.
pub const BIND_OPTION: &str = "berth.network";
/// `-o berth.driver=overlay`: the berth network made for the Docker one spans hosts.
pub const DRIVER_OPTION: &str = "berth.driver";
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
/// The address spaces berth's IPAM answers for.
const LOCAL_SPACE: &str = "berth-local";
const GLOBAL_SPACE: &str = "berth-global";

/// Whether a network's IPAM data came from berth's IPAM (not e.g. the engine's own).
fn from_berth_ipam(d: &IpamData) -> bool {
    [LOCAL_SPACE, GLOBAL_SPACE].contains(&d.address_space.as_str())
}
/// IPv6 pools carved for `docker network create --ipv6` without a subnet: /64s of this.
const DEFAULT_POOL_V6: &str = "fd62:6572:7468::/48";

/// An IPAM pool handed to the engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DockerPool {
    id: String,
    pub(crate) cidr: IpNet,
    /// Identical RequestPool calls share the pool; it goes when the last one is released.
    refs: u32,
    gateway: Option<IpAddr>,
    /// The berth network whose IPAM serves this pool, once there is one.
    pub(crate) network: Option<String>,
    /// Addresses handed out while no berth network serves the pool (another driver, e.g.
    /// macvlan, uses berth's IPAM).
    #[serde(default)]
    allocated: BTreeSet<IpAddr>,
    /// Docker networks of berth's own driver the pool serves (counted when CreateNetwork
    /// binds it, recounted at start).
    #[serde(default)]
    berth_networks: u32,
}

impl DockerPool {
    /// Whether every user of the pool is a Docker network of berth's own driver: then each
    /// address it hands out is an endpoint's, which Join commits, and is held in memory until
    /// then. Otherwise (another driver, e.g. macvlan, shares it or uses it alone) addresses
    /// are reserved in the store at once, as nothing of berth's will commit them.
    fn joins_commit(&self) -> bool {
        self.berth_networks > 0 && self.refs <= self.berth_networks
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DockerNetwork {
    id: String,
    network: String,
    /// Bound with `berth.network`: the berth network outlives the Docker one.
    bound: bool,
    /// The pools of berth's IPAM it uses (none with the engine's own IPAM); `None` in records
    /// of earlier versions, which used every pool of the network's subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pools: Option<Vec<String>>,
}

impl DockerNetwork {
    fn uses(&self, pool: &DockerPool) -> bool {
        match &self.pools {
            Some(ids) => ids.contains(&pool.id),
            None => pool.network.as_deref() == Some(self.network.as_str()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DockerEndpoint {
    id: String,
    network_id: String,
    network: String,
    ips: Vec<IpNet>,
    mac: MacAddr,
    /// Host ports the engine asked to publish (`docker run -p`), installed at Join.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ports: Vec<PortMapping>,
    /// The berth endpoint, between Join and Leave.
    endpoint: Option<String>,
    /// Addresses berth's IPAM handed the engine for it, by pool: at Leave they go back to
    /// the pool's reservation, and are free only once the engine releases them
    /// (ReleaseAddress), as the engine's IPAM contract has it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pools: BTreeMap<IpAddr, String>,
    /// The berth endpoint's labels, from driver options `berth.label.KEY=VALUE`.
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    labels: Labels,
    /// Its named ports, from driver options `berth.port.NAME=PORT[/PROTO]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    named_ports: Vec<NamedPort>,
}

/// Driver options (`docker network connect --driver-opt`, `docker run --network
/// name=N,driver-opt=...`) that become the endpoint's labels: `berth.label.KEY=VALUE`.
pub const LABEL_OPTION_PREFIX: &str = "berth.label.";

/// The labels among an endpoint's driver options, checked.
fn docker_labels(opts: &HashMap<String, Value>) -> Result<Labels> {
    let labels: Labels = opts
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix(LABEL_OPTION_PREFIX)?;
            Some((key.to_string(), v.as_str().unwrap_or_default().to_string()))
        })
        .collect();
    // Counted as the engine's user wrote them (`--driver-opt`), then checked as any labels.
    check_count(
        format!("labels (driver options {LABEL_OPTION_PREFIX}*)"),
        labels.len(),
        MAX_LABELS,
        "per endpoint",
    )?;
    validate_labels(&labels)?;
    Ok(labels)
}

/// Driver options that name the endpoint's ports, for policies: `berth.port.NAME=PORT[/PROTO]`.
pub const PORT_NAME_OPTION_PREFIX: &str = "berth.port.";

/// The named ports among an endpoint's driver options, checked.
fn docker_named_ports(opts: &HashMap<String, Value>) -> Result<Vec<NamedPort>> {
    let mut named: Vec<NamedPort> = opts
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(PORT_NAME_OPTION_PREFIX)?;
            Some(format!("{name}={}", v.as_str().unwrap_or_default()).parse())
        })
        .collect::<Result<_, ModelError>>()?;
    check_count(
        format!("named ports (driver options {PORT_NAME_OPTION_PREFIX}*)"),
        named.len(),
        MAX_NAMED_PORTS,
        "per endpoint",
    )?;
    validate_named_ports(&named)?;
    named.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    Ok(named)
}

/// A Docker endpoint between CreateEndpoint and Join, held in memory: Join commits it with
/// the berth endpoint in one transaction. The engine joins right after creating (a daemon
/// restart in between makes that Join fail cleanly, and the engine rolls back).
#[derive(Debug, Clone)]
pub(crate) struct PendingEndpoint {
    de: DockerEndpoint,
    /// Where each address comes from.
    sources: Vec<(IpAddr, Source)>,
    /// The berth endpoint's id, chosen at CreateEndpoint: it names the veth.
    berth_id: String,
    veth: Veth,
}

impl PendingEndpoint {
    pub(crate) fn is_on(&self, network: &str) -> bool {
        self.de.network == network
    }

    /// Deletes the veth made for this endpoint, once it is made, in the background: for a
    /// caller that holds the topology lock or must not wait.
    pub(crate) fn discard_veth(self) {
        tokio::spawn(async move {
            self.veth.made().await;
            let _ = remove_link(veth_name(&self.berth_id)).await;
        });
    }
}

/// A pending endpoint's veth. CreateEndpoint starts making it: the engine sends Join only
/// after writing its own store (about 1.5 ms later), so Join finds it made and only commits.
/// A daemon stop in between leaves a berth-named veth the store does not know, which the
/// next start's reconcile deletes.
#[derive(Debug, Clone)]
enum Veth {
    /// Being made; `Some(made)` once the attempt is over.
    Making(watch::Receiver<Option<bool>>),
    /// None made: not started, failed, or deleted. Join makes it.
    Absent,
}

impl Veth {
    /// Waits for the attempt to end: whether the veth exists.
    async fn made(&self) -> bool {
        match self {
            Veth::Making(rx) => matches!(
                rx.clone().wait_for(Option::is_some).await.as_deref(),
                Ok(Some(true))
            ),
            Veth::Absent => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// Handed to the engine by berth's IPAM (RequestAddress of this pool), held in memory.
    Reserved(String),
    /// Given by the engine's own IPAM; taken in memory at CreateEndpoint.
    Taken,
    /// Reserved in the store: under this pool, or (`None`) returned by an endpoint.
    Stored(Option<String>),
}

impl Source {
    /// The pool of berth's IPAM the address came from, if it did.
    fn pool(&self) -> Option<&String> {
        match self {
            Source::Reserved(pool) | Source::Stored(Some(pool)) => Some(pool),
            Source::Taken | Source::Stored(None) => None,
        }
    }
}

/// The pool an address reserved under `owner` (`docker:<pool>`) belongs to.
fn pool_of_owner(owner: &[u8]) -> Option<String> {
    let id = owner.strip_prefix(keys::DOCKER_OWNER_PREFIX.as_bytes())?;
    (id != b"external").then(|| String::from_utf8_lossy(id).to_string())
}

/// One entry of `com.docker.network.portmap` (libnetwork's `types.PortBinding`).
#[derive(Debug, Deserialize)]
struct PortBinding {
    #[serde(rename = "Proto")]
    proto: u8,
    #[serde(rename = "Port")]
    port: u16,
    #[serde(rename = "HostIP", default)]
    host_ip: String,
    #[serde(rename = "HostPort")]
    host_port: u16,
    #[serde(rename = "HostPortEnd", default)]
    host_port_end: u16,
}

/// The engine's port bindings as berth port mappings. berth publishes exactly the host port
/// asked for; ranges and engine-chosen ports (`-p 80`) need an explicit host port.
fn docker_ports(opts: &HashMap<String, Value>) -> Result<Vec<PortMapping>> {
    let Some(v) = opts
        .get("com.docker.network.portmap")
        .filter(|v| !v.is_null())
    else {
        return Ok(Vec::new());
    };
    let bindings: Vec<PortBinding> = serde_json::from_value(v.clone())
        .map_err(|e| invalid(format!("invalid com.docker.network.portmap: {e}")))?;
    check_count(
        "port bindings (-p)",
        bindings.len(),
        MAX_PUBLISHED_PORTS,
        "per endpoint",
    )?;
    bindings
        .iter()
        .map(|b| {
            let protocol = Protocol::from_number(b.proto)
                .ok_or_else(|| invalid(format!("cannot publish protocol number {}", b.proto)))?;
            if b.host_port == 0 || (b.host_port_end != 0 && b.host_port_end != b.host_port) {
                return Err(invalid(format!(
                    "berth publishes exactly the host port given: use -p HOST_PORT:{}",
                    b.port
                )));
            }
            let host_ip = match b.host_ip.as_str() {
                "" => None,
                ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                    invalid(format!("invalid host address {ip:?} in a port binding"))
                })?),
            };
            let m = PortMapping {
                protocol,
                host_ip,
                host_port: b.host_port,
                container_port: b.port,
            }
            .normalized();
            m.validate()?;
            Ok(m)
        })
        .collect()
}

/// A failure answered as `{"Err": msg}`, which the engine shows to the user.
struct PluginError(StatusCode, String);

impl From<AgentError> for PluginError {
    fn from(e: AgentError) -> Self {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("docker plugin request failed: {e}");
        } else {
            tracing::info!("docker plugin request refused ({}): {e}", status.as_u16());
        }
        PluginError(status, e.to_string())
    }
}

impl IntoResponse for PluginError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "Err": self.1 }))).into_response()
    }
}

fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::Invalid(msg.into())
}

/// The engine sends no Content-Type and may send an empty body or JSON `null` for options.
fn parse<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| invalid(format!("invalid request body: {e}")))
}

/// A `map[string]string` that may arrive as `null`.
fn options(v: &Option<HashMap<String, Value>>) -> HashMap<String, Value> {
    v.clone().unwrap_or_default()
}

fn option_str(opts: &HashMap<String, Value>, key: &str) -> Option<String> {
    match opts.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/{method}", post(dispatch))
        .fallback(|| async { PluginError(StatusCode::NOT_FOUND, "no such plugin method".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

async fn dispatch(
    State(a): State<Arc<Agent>>,
    UrlPath(method): UrlPath<String>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    // A body over the limit (or one that could not be read) is answered in the engine's form
    // too, not axum's plain text.
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return PluginError(
                e.status(),
                format!("request body too large: at most {MAX_BODY} bytes"),
            )
            .into_response();
        }
        Err(e) => return PluginError(e.status(), e.body_text()).into_response(),
    };
    tracing::debug!(%method, body = %String::from_utf8_lossy(&body), "docker plugin call");
    let started = std::time::Instant::now();
    let _one_at_a_time = a.docker_calls.lock().await;
    let answer: std::result::Result<Value, PluginError> = async {
        Ok(match method.as_str() {
            "Plugin.Activate" => json!({ "Implements": ["NetworkDriver", "IpamDriver"] }),
            "NetworkDriver.GetCapabilities" => {
                json!({ "Scope": "local", "ConnectivityScope": "local" })
            }
            "NetworkDriver.CreateNetwork" => a.docker_create_network(parse(&body)?).await?,
            "NetworkDriver.DeleteNetwork" => a.docker_delete_network(parse(&body)?).await?,
            "NetworkDriver.CreateEndpoint" => a.docker_create_endpoint(parse(&body)?).await?,
            "NetworkDriver.DeleteEndpoint" => a.docker_delete_endpoint(parse(&body)?).await?,
            "NetworkDriver.EndpointOperInfo" => a.docker_endpoint_info(parse(&body)?).await?,
            "NetworkDriver.Join" => a.docker_join(parse(&body)?).await?,
            "NetworkDriver.Leave" => a.docker_leave(parse(&body)?).await?,
            // Published ports and NAT come with the outside-world work; nothing to do yet.
            "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity"
            | "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete" => json!({}),
            "IpamDriver.GetCapabilities" => {
                json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })
            }
            "IpamDriver.GetDefaultAddressSpaces" => json!({
                "LocalDefaultAddressSpace": LOCAL_SPACE, "GlobalDefaultAddressSpace": GLOBAL_SPACE
            }),
            "IpamDriver.RequestPool" => a.docker_request_pool(parse(&body)?).await?,
            "IpamDriver.ReleasePool" => a.docker_release_pool(parse(&body)?).await?,
            "IpamDriver.RequestAddress" => a.docker_request_address(parse(&body)?).await?,
            "IpamDriver.ReleaseAddress" => a.docker_release_address(parse(&body)?).await?,
            other => {
                return Err(PluginError(
                    StatusCode::NOT_FOUND,
                    format!("unknown plugin method {other}"),
                ));
            }
        })
    }
    .await;
    tracing::debug!(%method, micros = started.elapsed().as_micros() as u64, ok = answer.is_ok(), "docker plugin call done");
    match answer {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

// ---- request bodies (Go field names on the wire) ----

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestPool {
    #[serde(rename = "Pool")]
    pool: String,
    #[serde(rename = "SubPool")]
    sub_pool: String,
    #[serde(rename = "Options")]
    options: Option<HashMap<String, Value>>,
    #[serde(rename = "V6")]
    v6: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PoolRef {
    #[serde(rename = "PoolID")]
    pool_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RequestAddress {
    #[serde(rename = "PoolID")]
    pool_id: String,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Options")]
    options: Option<HashMap<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IpamData {
    /// Which IPAM gave the pool: berth's address spaces, or e.g. Docker's `LocalDefault`.
    #[serde(rename = "AddressSpace")]
    address_space: String,
    #[serde(rename = "Pool")]
    pool: String,
    #[serde(rename = "Gateway")]
    gateway: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CreateNetworkReq {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "Options")]
    options: Option<HashMap<String, Value>>,
    #[serde(rename = "IPv4Data")]
    ipv4: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data")]
    ipv6: Option<Vec<IpamData>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NetworkRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Interface {
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "AddressIPv6")]
    address_v6: String,
    #[serde(rename = "MacAddress")]
    mac: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CreateEndpointReq {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(rename = "Interface")]
    interface: Option<Interface>,
    #[serde(rename = "Options")]
    options: Option<HashMap<String, Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EndpointRef {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(rename = "SandboxKey")]
    sandbox_key: String,
}

/// A transaction whose compares must hold: a concurrent change is an error the engine retries
/// or shows, never a silently skipped write.
async fn commit_or_conflict(a: &Agent, txn: Txn) -> Result<()> {
    match a.commit(txn).await? {
        TxnOutcome::Committed { .. } => Ok(()),
        TxnOutcome::CompareFailed(c) => Err(AgentError::Conflict(format!(
            "state changed meanwhile ({c:?}); try again"
        ))),
    }
}

/// The berth network made for a Docker network.
/// The berth endpoint a Docker endpoint becomes at Join. libnetwork joins before the
/// sandbox's namespace exists (it moves the interface in later), so the namespace is named,
/// not opened; its identity is the Docker endpoint.
fn berth_endpoint(
    de: &DockerEndpoint,
    id: &str,
    sandbox: String,
    host: Option<String>,
) -> Endpoint {
    Endpoint {
        host_ifname: veth_name(id),
        id: id.to_string(),
        network: de.network.clone(),
        netns: NetnsRef {
            path: sandbox,
            id: format!("docker-{}", de.id),
            sandbox: None,
        },
        ifname: format!("berthp{}", &id[..9]),
        name: None,
        aliases: vec![],
        container_id: None,
        runtime_configured: true,
        mac: de.mac,
        ips: de.ips.clone(),
        ports: de.ports.clone(),
        default_gateways: vec![],
        host,
        labels: de.labels.clone(),
        named_ports: de.named_ports.clone(),
    }
}

/// The IPAM owner of an address reserved in a berth network for a Docker pool.
fn pool_owner(pool_id: &str) -> String {
    format!("{}{pool_id}", keys::DOCKER_OWNER_PREFIX)
}

fn docker_network_name(docker_id: &str) -> String {
    format!("docker-{}", docker_id.chars().take(12).collect::<String>())
}

/// Writes `value` at `key` if the record is still at revision `rev`.
async fn put_if_unchanged<T: Serialize>(a: &Agent, key: String, rev: u64, value: &T) -> Result<()> {
    commit_or_conflict(
        a,
        Txn::new()
            .when(Compare::ModRevision(key.clone(), rev))
            .put(key, encode(value)),
    )
    .await
}

/// Removal that finds nothing to remove has done its job.
fn gone_is_done(r: Result<()>) -> Result<()> {
    match r {
        Err(AgentError::NotFound(_)) => Ok(()),
        other => other,
    }
}

fn required<'a>(what: &str, v: &'a str) -> Result<&'a str> {
    if v.is_empty() {
        Err(invalid(format!("{what} is missing")))
    } else {
        Ok(v)
    }
}

fn parse_cidr_addr(what: &str, s: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .map_err(|_| invalid(format!("invalid {what} {s:?}")))
}

impl Agent {
    async fn docker_load<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<(T, u64)> {
        self.load::<T>(key)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("unknown {what}")))
    }

    // ------------------------------------------------------------------ IPAM

    async fn docker_request_pool(&self, req: RequestPool) -> Result<Value> {
        if !req.sub_pool.is_empty() {
            return Err(invalid(
                "berth does not support --ip-range (SubPool); give the whole --subnet",
            ));
        }
        let _topology = self.topology.write().await;
        let networks = self.networks().await?;
        let pools: Vec<DockerPool> = self.load_all(keys::DOCKER_POOLS).await?;
        let opts = options(&req.options);
        // Binding to an existing berth network by option: its subnet is the pool.
        let wanted = match (req.pool.as_str(), option_str(&opts, BIND_OPTION)) {
            ("", Some(name)) => {
                let net = networks.iter().find(|n| n.name == name).ok_or_else(|| {
                    AgentError::NotFound(format!("no berth network named {name:?}"))
                })?;
                let s = if req.v6 {
                    net.subnet_v6()
                } else {
                    net.subnet_v4()
                };
                Some(
                    s.ok_or_else(|| {
                        invalid(format!(
                            "berth network {name:?} has no IPv{} subnet",
                            if req.v6 { 6 } else { 4 }
                        ))
                    })?
                    .cidr,
                )
            }
            ("", None) => None,
            (p, _) => Some(berth_model::parse_subnet(p)?),
        };
        let held: Vec<IpNet> = pools.iter().map(|p| p.cidr).collect();
        let host_routes = self.host_routes(&networks).await?;
        let taken = |c: &IpNet| crate::networks::overlapping(&networks, &held, &host_routes, c);
        let (cidr, network) = match wanted {
            Some(c) => {
                if let Some(p) = pools.iter().find(|p| p.cidr == c) {
                    // Identical request: same pool, one more reference.
                    let mut p = p.clone();
                    p.refs += 1;
                    let (_, rev) = self
                        .docker_load::<DockerPool>(&keys::docker_pool(&p.id), "pool")
                        .await?;
                    let key = keys::docker_pool(&p.id);
                    put_if_unchanged(self, key, rev, &p).await?;
                    return Ok(json!({ "PoolID": p.id, "Pool": p.cidr.to_string(), "Data": {} }));
                }
                match networks
                    .iter()
                    .find(|n| n.subnets.iter().any(|s| s.cidr == c))
                {
                    Some(n) => (c, Some(n.name.clone())),
                    None => {
                        if let Some(theirs) = taken(&c) {
                            return Err(AgentError::Conflict(format!(
                                "pool {c} overlaps {theirs}"
                            )));
                        }
                        (c, None)
                    }
                }
            }
            None => {
                let (base, len) = if req.v6 {
                    (DEFAULT_POOL_V6, 64)
                } else {
                    (DEFAULT_POOL, DEFAULT_POOL_PREFIX)
                };
                let base: IpNet = base.parse().expect("valid default pool");
                let c = crate::networks::carve(base, len, &taken, &host_routes)?;
                (c, None)
            }
        };
        let pool = DockerPool {
            id: random_id(),
            cidr,
            refs: 1,
            gateway: None,
            network,
            allocated: BTreeSet::new(),
            berth_networks: 0,
        };
        commit_or_conflict(
            self,
            Txn::new()
                .when(Compare::Absent(keys::docker_pool(&pool.id)))
                .put(keys::docker_pool(&pool.id), encode(&pool)),
        )
        .await?;
        tracing::info!(pool = %pool.id, cidr = %pool.cidr, network = pool.network.as_deref().unwrap_or("-"), "docker pool requested");
        Ok(json!({ "PoolID": pool.id, "Pool": cidr.to_string(), "Data": {} }))
    }

    async fn docker_release_pool(&self, req: PoolRef) -> Result<Value> {
        let key = keys::docker_pool(required("PoolID", &req.pool_id)?);
        let (mut pool, rev) = self.docker_load::<DockerPool>(&key, "pool").await?;
        pool.refs = pool.refs.saturating_sub(1);
        let mut txn = Txn::new().when(Compare::ModRevision(key.clone(), rev));
        let mut freed = Vec::new();
        if pool.refs > 0 {
            txn = txn.put(key, encode(&pool));
        } else {
            txn = txn.delete(key);
            // Reservations the engine did not release go with the pool.
            if let Some(name) = &pool.network {
                for (ip, k, rev) in self.pool_reservations(name, &pool.id).await? {
                    freed.push(ip);
                    txn = txn.when(Compare::ModRevision(k.clone(), rev)).delete(k);
                }
            }
        }
        commit_or_conflict(self, txn).await?;
        if pool.refs == 0 {
            // And what the engine never released of it in memory.
            self.docker_reserved
                .lock()
                .expect("reservations lock")
                .retain(|(_, ip), id| {
                    let mine = *id == pool.id;
                    if mine {
                        freed.push(*ip);
                    }
                    !mine
                });
        }
        if let Some(name) = &pool.network {
            freed.into_iter().for_each(|ip| self.release_ip(name, ip));
        }
        Ok(json!({}))
    }

    async fn docker_request_address(&self, req: RequestAddress) -> Result<Value> {
        let key = keys::docker_pool(required("PoolID", &req.pool_id)?);
        let (mut pool, rev) = self.docker_load::<DockerPool>(&key, "pool").await?;
        let opts = options(&req.options);
        let requested: Option<IpAddr> = match req.address.as_str() {
            "" => None,
            a => Some(
                a.parse()
                    .map_err(|_| invalid(format!("invalid address {a:?}")))?,
            ),
        };
        if let Some(ip) = requested.filter(|ip| !pool.cidr.contains(ip)) {
            return Err(invalid(format!(
                "address {ip} is outside pool {}",
                pool.cidr
            )));
        }
        let with_prefix = |ip: IpAddr| {
            IpNet::new(ip, pool.cidr.prefix_len())
                .expect("valid prefix")
                .to_string()
        };
        let is_gateway =
            option_str(&opts, "RequestAddressType").as_deref() == Some(GATEWAY_REQUEST);

        if is_gateway {
            let gw = match &pool.network {
                // A bound network already has its gateway; the engine may only confirm it.
                Some(name) => {
                    let net = self.network(name).await?;
                    let gw = net
                        .subnet_for(pool.cidr.addr())
                        .map(|s| s.gateway)
                        .ok_or_else(|| {
                            AgentError::Conflict(format!(
                                "pool {} is not a subnet of berth network {name:?}",
                                pool.cidr
                            ))
                        })?;
                    if let Some(ip) = requested.filter(|ip| *ip != gw) {
                        return Err(AgentError::Conflict(format!(
                            "berth network {name:?} has gateway {gw}, not {ip}"
                        )));
                    }
                    gw
                }
                None => {
                    let mut p = berth_ipam::Pool::new(pool.cidr);
                    for a in &pool.allocated {
                        let _ = p.take(*a);
                    }
                    match requested {
                        Some(ip) => p.take(ip).map(|()| ip)?,
                        None => p.allocate()?,
                    }
                }
            };
            pool.gateway = Some(gw);
            put_if_unchanged(self, key, rev, &pool).await?;
            return Ok(json!({ "Address": with_prefix(gw), "Data": {} }));
        }

        let ip = match &pool.network {
            Some(name) => {
                self.network(name).await?;
                let ip = self.take_in_subnet(name, pool.cidr, requested).await?;
                if pool.joins_commit() {
                    // In memory until the endpoint commits it (see `docker_reserved`).
                    self.docker_reserved
                        .lock()
                        .expect("reservations lock")
                        .insert((name.clone(), ip), pool.id.clone());
                } else {
                    // No berth endpoint will ever take it over: reserved in the store, under
                    // the pool, until the engine releases it.
                    let k = keys::ipam(name, ip);
                    let txn = Txn::new()
                        .when(Compare::Absent(k.clone()))
                        .put(k, pool_owner(&pool.id));
                    match self.commit(txn).await {
                        Ok(TxnOutcome::Committed { .. }) => {}
                        // The store holds it: it stays taken in memory too.
                        Ok(TxnOutcome::CompareFailed(_)) => {
                            return Err(AgentError::Conflict(format!(
                                "address {ip} is already in use on {name:?}"
                            )));
                        }
                        Err(e) => {
                            self.release_ip(name, ip);
                            return Err(e);
                        }
                    }
                }
                ip
            }
            None => {
                // No berth network serves the pool: the pool record is its IPAM.
                let mut p = berth_ipam::Pool::new(pool.cidr);
                for a in pool.allocated.iter().chain(&pool.gateway) {
                    let _ = p.take(*a);
                }
                let ip = match requested {
                    Some(ip) => p.take(ip).map(|()| ip)?,
                    None => p.allocate()?,
                };
                pool.allocated.insert(ip);
                if let TxnOutcome::CompareFailed(_) = self
                    .commit(
                        Txn::new()
                            .when(Compare::ModRevision(key.clone(), rev))
                            .put(key, encode(&pool)),
                    )
                    .await?
                {
                    return Err(AgentError::Conflict(
                        "pool changed meanwhile; try again".into(),
                    ));
                }
                ip
            }
        };
        Ok(json!({ "Address": with_prefix(ip), "Data": {} }))
    }

    async fn docker_release_address(&self, req: RequestAddress) -> Result<Value> {
        let key = keys::docker_pool(required("PoolID", &req.pool_id)?);
        let Some((mut pool, rev)) = self.load::<DockerPool>(&key).await? else {
            return Ok(json!({}));
        };
        let ip: IpAddr = req
            .address
            .split('/')
            .next()
            .unwrap_or("")
            .parse()
            .map_err(|_| invalid(format!("invalid address {:?}", req.address)))?;
        match &pool.network {
            Some(name) => {
                if pool.allocated.remove(&ip) {
                    // Copied there by a network deletion that did not get through.
                    put_if_unchanged(self, key.clone(), rev, &pool).await?;
                }
                let held = self
                    .docker_reserved
                    .lock()
                    .expect("reservations lock")
                    .remove(&(name.clone(), ip));
                if held.is_some() {
                    self.release_ip(name, ip);
                    return Ok(json!({}));
                }
                // Only a reservation still ours: once an endpoint took the address over, its
                // detach releases it (and the gateway belongs to the network).
                let k = keys::ipam(name, ip);
                if let Some(kv) = self.store.get(&k).await?
                    && kv.value == pool_owner(&pool.id).as_bytes()
                {
                    commit_or_conflict(
                        self,
                        Txn::new()
                            .when(Compare::ModRevision(k.clone(), kv.mod_revision))
                            .delete(k),
                    )
                    .await?;
                    self.release_ip(name, ip);
                }
            }
            None => {
                if pool.gateway == Some(ip) {
                    pool.gateway = None;
                }
                pool.allocated.remove(&ip);
                put_if_unchanged(self, key, rev, &pool).await?;
            }
        }
        Ok(json!({}))
    }

    // ------------------------------------------------------------------ network driver

    async fn docker_create_network(&self, req: CreateNetworkReq) -> Result<Value> {
        let id = required("NetworkID", &req.network_id)?.to_string();
        if self.store.get(&keys::docker_network(&id)).await?.is_some() {
            return Err(AgentError::Conflict(format!("network {id} already exists")));
        }
        let opts = options(&req.options);
        let generic: HashMap<String, Value> = opts
            .get("com.docker.network.generic")
            .and_then(|g| serde_json::from_value(g.clone()).ok())
            .unwrap_or_default();
        let v4: Vec<IpamData> = req.ipv4.unwrap_or_default();
        let v6: Vec<IpamData> = req
            .ipv6
            .unwrap_or_default()
            .into_iter()
            .filter(|d| !d.pool.is_empty())
            .collect();
        for (what, pools) in [
            ("IPv4 pools (--subnet)", &v4),
            ("IPv6 pools (--subnet)", &v6),
        ] {
            check_count(
                what,
                pools.len(),
                1,
                "per network (a berth network has one subnet of each family)",
            )?;
        }
        let pool_of = |d: &IpamData| parse_cidr_addr("pool", &d.pool).map(|p| p.trunc());
        let gateway_of = |d: &IpamData| -> Result<Option<String>> {
            Ok(match d.gateway.as_str() {
                "" => None,
                g => Some(parse_cidr_addr("gateway", g)?.addr().to_string()),
            })
        };

        let (name, bound) = match option_str(&generic, BIND_OPTION) {
            Some(name) => {
                let net = self.network(&name).await?;
                for d in v4.iter().chain(&v6) {
                    let pool = pool_of(d)?;
                    if !net.subnets.iter().any(|s| s.cidr == pool) {
                        let theirs: Vec<_> =
                            net.subnets.iter().map(|s| s.cidr.to_string()).collect();
                        return Err(invalid(format!(
                            "berth network {name:?} has subnet {}, not {pool}: create the Docker network with --ipam-driver berth and --subnet matching it",
                            theirs.join(", ")
                        )));
                    }
                }
                (name, true)
            }
            None => {
                let first = v4.first().ok_or_else(|| invalid("no IPv4 pool given"))?;
                let mtu = option_str(&generic, "com.docker.network.driver.mtu")
                    .map(|m| {
                        m.parse::<u32>()
                            .map_err(|_| invalid(format!("invalid MTU {m:?}")))
                    })
                    .transpose()?;
                let internal = opts
                    .get("com.docker.network.internal")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let adopting = v4
                    .iter()
                    .chain(&v6)
                    .filter(|d| from_berth_ipam(d))
                    .map(pool_of)
                    .collect::<Result<Vec<_>>>()?;
                let req = CreateNetwork {
                    name: docker_network_name(&id),
                    subnet: Some(pool_of(first)?.to_string()),
                    gateway: gateway_of(first)?,
                    ipv6_subnet: v6.first().map(pool_of).transpose()?.map(|p| p.to_string()),
                    ipv6_gateway: v6.first().map(gateway_of).transpose()?.flatten(),
                    mtu,
                    internal,
                    // `-o berth.driver=overlay`: a network on every host of the cluster.
                    driver: option_str(&generic, DRIVER_OPTION),
                    vni: None,
                };
                let net = self.create_network_adopting(req, &adopting).await?;
                (net.name, false)
            }
        };
        // The pools of this network are now served by the berth network's IPAM, which takes
        // over what another driver's network was handed from them meanwhile.
        let mut bound_pools = Vec::new();
        // Only pools berth's IPAM gave this network; with the engine's own IPAM there are
        // none of ours (another driver's pool on the same subnet stays that driver's).
        for d in v4.iter().chain(&v6).filter(|d| from_berth_ipam(d)) {
            let cidr = pool_of(d)?;
            for (p, rev) in self.docker_pools_with(cidr).await? {
                let id = p.id.clone();
                if let Err(e) = self.bind_pool(p, rev, &name).await {
                    // Undone: the pools bound so far, and the network if made for this one.
                    self.undo_network_creation(&bound_pools, &name, bound).await;
                    return Err(e);
                }
                bound_pools.push(id);
            }
        }
        let dn = DockerNetwork {
            id: id.clone(),
            network: name.clone(),
            bound,
            pools: Some(bound_pools),
        };
        let recorded = self
            .commit(
                Txn::new()
                    .when(Compare::Absent(keys::docker_network(&id)))
                    .put(keys::docker_network(&id), encode(&dn)),
            )
            .await;
        if !matches!(recorded, Ok(TxnOutcome::Committed { .. })) {
            self.undo_network_creation(&dn.pools.unwrap_or_default(), &name, bound)
                .await;
            recorded?;
            return Err(AgentError::Conflict(format!("network {id} already exists")));
        }
        tracing::info!(docker_network = %id, network = %name, bound, "docker network created");
        Ok(json!({}))
    }

    /// Undoes a CreateNetwork that failed after binding `pools` to berth network `name`:
    /// unbinds them, and deletes the network unless it was bound by option. Best effort.
    async fn undo_network_creation(&self, pools: &[String], name: &str, bound: bool) {
        if let Err(e) = self.unbind_pools(pools, name, bound, None).await {
            tracing::warn!(network = %name, error = %e, "could not undo a failed Docker network creation");
        }
    }

    /// Serves a pool from berth network `name` from now on. Addresses the pool handed out
    /// while no berth network served it become reservations in the network, under the pool.
    async fn bind_pool(&self, mut p: DockerPool, rev: u64, name: &str) -> Result<()> {
        let key = keys::docker_pool(&p.id);
        let mut txn = Txn::new().when(Compare::ModRevision(key.clone(), rev));
        let mut taken = Vec::new();
        for ip in std::mem::take(&mut p.allocated) {
            if let Err(e) = self.take_in_subnet(name, p.cidr, Some(ip)).await {
                taken.iter().for_each(|ip| self.release_ip(name, *ip));
                return Err(AgentError::Conflict(format!(
                    "address {ip}, which berth's IPAM gave another Docker network, is in use on berth network {name:?}: {e}"
                )));
            }
            taken.push(ip);
            let k = keys::ipam(name, ip);
            txn = txn
                .when(Compare::Absent(k.clone()))
                .put(k, pool_owner(&p.id));
        }
        p.network = Some(name.to_string());
        p.berth_networks += 1;
        let committed = self.commit(txn.put(key, encode(&p))).await;
        if !matches!(committed, Ok(TxnOutcome::Committed { .. })) {
            taken.iter().for_each(|ip| self.release_ip(name, *ip));
            committed?;
            return Err(AgentError::Conflict(
                "pool changed meanwhile; try again".into(),
            ));
        }
        Ok(())
    }

    /// The addresses berth network `network` holds for pool `pool_id` (reserved under it):
    /// address, record key and its revision.
    async fn pool_reservations(
        &self,
        network: &str,
        pool_id: &str,
    ) -> Result<Vec<(IpAddr, String, u64)>> {
        let owner = pool_owner(pool_id);
        Ok(self
            .store
            .list(&keys::ipam_prefix(network))
            .await?
            .items
            .into_iter()
            .filter(|kv| kv.value == owner.as_bytes())
            .filter_map(|kv| Some((keys::ipam_address(&kv.key)?, kv.key, kv.mod_revision)))
            .collect())
    }

    /// The ids of the Docker pools `keep` keeps.
    async fn docker_pool_ids(&self, keep: impl Fn(&DockerPool) -> bool) -> Result<Vec<String>> {
        Ok(self
            .load_all::<DockerPool>(keys::DOCKER_POOLS)
            .await?
            .into_iter()
            .filter(|p| keep(p))
            .map(|p| p.id)
            .collect())
    }

    async fn docker_pools_with(&self, cidr: IpNet) -> Result<Vec<(DockerPool, u64)>> {
        let listing = self.store.list(keys::DOCKER_POOLS).await?;
        let mut out = Vec::new();
        for kv in listing.items {
            let p: DockerPool = crate::decode(&kv)?;
            if p.cidr == cidr {
                out.push((p, kv.mod_revision));
            }
        }
        Ok(out)
    }

    async fn docker_delete_network(&self, req: NetworkRef) -> Result<Value> {
        let id = required("NetworkID", &req.network_id)?;
        let key = keys::docker_network(id);
        let Some((dn, dn_rev)) = self.load::<DockerNetwork>(&key).await? else {
            // A CreateNetwork cut short (crash, timeout) may have made the berth network
            // without recording it: remove it, and unbind its pools, by the name it would
            // have.
            let name = docker_network_name(id);
            let served = self
                .docker_pool_ids(|p| p.network.as_deref() == Some(name.as_str()))
                .await?;
            self.unbind_pools(&served, &name, false, None).await?;
            return Ok(json!({}));
        };
        // The engine deletes only a network without endpoints on its side, and forgets it
        // whatever the driver answers: Docker endpoints berth still has on it are ones the
        // engine gave up on (e.g. removed while berth was down).
        self.release_docker_endpoints_of(&dn).await?;
        // Bound, the berth network stays and serves what else uses it; otherwise every pool
        // on it loses it.
        let served = self
            .docker_pool_ids(|p| match dn.bound {
                true => dn.uses(p),
                false => p.network.as_deref() == Some(dn.network.as_str()),
            })
            .await?;
        // Sandboxes or CNI containers attached to it by hand keep a network made for Docker:
        // it stays as a plain berth network rather than take them down.
        let members = match dn.bound {
            true => 0,
            false => {
                let prefix = keys::members_prefix(&dn.network);
                self.store.list(&prefix).await?.items.len()
            }
        };
        if members > 0 {
            tracing::warn!(
                docker_network = %dn.id,
                network = %dn.network,
                "Docker network deleted; berth network {} stays, used by {members} endpoint(s) not Docker's: `berth network rm` it once they are gone",
                dn.network
            );
        }
        self.unbind_pools(
            &served,
            &dn.network,
            dn.bound || members > 0,
            Some((key, dn_rev)),
        )
        .await?;
        Ok(json!({}))
    }

    /// A Docker network of berth's driver no longer uses the pools `ids` of berth network
    /// `network`; `record`, its record, goes in the same last step. If the network stays
    /// (`bound`), the pools stay served by it, with one berth network fewer, in one
    /// transaction with the record (a retried call finds the record gone). If it goes, what
    /// it holds for the pools (another driver's addresses) is first copied back into them,
    /// so that a stop in between loses nothing; then the network is deleted; then the pools
    /// lose it.
    async fn unbind_pools(
        &self,
        ids: &[String],
        network: &str,
        bound: bool,
        record: Option<(String, u64)>,
    ) -> Result<()> {
        let mut last = Txn::new();
        if let Some((key, rev)) = record {
            last = last
                .when(Compare::ModRevision(key.clone(), rev))
                .delete(key);
        }
        if bound {
            for id in ids {
                let key = keys::docker_pool(id);
                if let Some((mut p, rev)) = self.load::<DockerPool>(&key).await? {
                    p.berth_networks = p.berth_networks.saturating_sub(1);
                    last = last
                        .when(Compare::ModRevision(key.clone(), rev))
                        .put(key, encode(&p));
                }
            }
            return commit_or_conflict(self, last).await;
        }
        for id in ids {
            let key = keys::docker_pool(id);
            let Some((mut p, rev)) = self.load::<DockerPool>(&key).await? else {
                continue;
            };
            let reserved = self.pool_reservations(network, id).await?;
            if !reserved.is_empty() {
                p.allocated
                    .extend(reserved.into_iter().map(|(ip, _, _)| ip));
                put_if_unchanged(self, key, rev, &p).await?;
            }
        }
        gone_is_done(self.delete_network(network).await)?;
        for id in ids {
            let key = keys::docker_pool(id);
            if let Some((mut p, rev)) = self.load::<DockerPool>(&key).await? {
                p.network = None;
                p.berth_networks = 0;
                last = last
                    .when(Compare::ModRevision(key.clone(), rev))
                    .put(key, encode(&p));
            }
        }
        commit_or_conflict(self, last).await
    }

    /// Counts again, for every pool, the Docker networks of berth's driver it serves: at
    /// start, so pools recorded by an earlier version (or counts a stop cut short) are right.
    /// Records of earlier versions (which do not list their pools) are not counted: their
    /// pools keep every address in the store, the safe side. A pool whose network is gone
    /// loses it (a CreateNetwork cut short).
    pub(crate) async fn recount_docker_pools(&self) -> Result<()> {
        let networks: Vec<DockerNetwork> = self.load_all(keys::DOCKER_NETWORKS).await?;
        for kv in self.store.list(keys::DOCKER_POOLS).await?.items {
            let mut p: DockerPool = crate::decode(&kv)?;
            let mut changed = p.clone();
            changed.berth_networks = networks
                .iter()
                .filter(|n| n.pools.as_ref().is_some_and(|ids| ids.contains(&p.id)))
                .count() as u32;
            if let Some(name) = &p.network
                && self.store.get(&keys::network(name)).await?.is_none()
            {
                changed.network = None;
                changed.berth_networks = 0;
            }
            if (changed.berth_networks, &changed.network) != (p.berth_networks, &p.network) {
                p = changed;
                put_if_unchanged(self, kv.key, kv.mod_revision, &p).await?;
            }
        }
        Ok(())
    }

    async fn docker_create_endpoint(&self, req: CreateEndpointReq) -> Result<Value> {
        let eid = required("EndpointID", &req.endpoint_id)?.to_string();
        let exists = || AgentError::Conflict(format!("endpoint {eid} already exists"));
        if self.pending_endpoints().contains_key(&eid)
            || self
                .store
                .get(&keys::docker_endpoint(&eid))
                .await?
                .is_some()
        {
            return Err(exists());
        }
        let (dn, _) = self
            .docker_load::<DockerNetwork>(&keys::docker_network(&req.network_id), "network")
            .await?;
        let net = self.network(&dn.network).await?;
        let opts = options(&req.options);
        let ports = self.check_ports(&net, &docker_ports(&opts)?)?;
        let labels = docker_labels(&opts)?;
        let named_ports = docker_named_ports(&opts)?;
        let iface = req.interface.unwrap_or_default();
        let mac = match iface.mac.as_str() {
            "" => option_str(&opts, "com.docker.network.endpoint.macaddress")
                .map(|m| m.parse())
                .transpose()?,
            m => Some(m.parse()?),
        };
        let mut ips = Vec::new();
        let mut sources: Vec<(IpAddr, Source)> = Vec::new();
        for a in [&iface.address, &iface.address_v6]
            .into_iter()
            .filter(|a| !a.is_empty())
        {
            match self.endpoint_address(&dn, &net, a).await {
                Ok((ip, source)) => {
                    ips.push(ip);
                    sources.push((ip.addr(), source));
                }
                Err(e) => {
                    self.give_back(&net.name, &sources);
                    return Err(e);
                }
            }
        }
        if ips.is_empty() {
            return Err(invalid(
                "the endpoint has no address (is the IPAM driver berth or Docker's default?)",
            ));
        }
        let mac = mac.unwrap_or_else(|| {
            match ips.iter().find_map(|n| match n {
                IpNet::V4(v) => Some(v.addr()),
                _ => None,
            }) {
                Some(v4) => MacAddr::from_ipv4(v4),
                None => MacAddr::random_local(|| fastrand::u8(..)),
            }
        });
        let de = DockerEndpoint {
            id: eid.clone(),
            network_id: req.network_id.clone(),
            network: net.name.clone(),
            ips,
            mac,
            ports,
            endpoint: None,
            pools: sources
                .iter()
                .filter_map(|(ip, source)| Some((*ip, source.pool()?.clone())))
                .collect(),
            labels,
            named_ports,
        };
        let berth_id = random_id();
        let veth = self.start_veth(
            berth_endpoint(&de, &berth_id, String::new(), self.host_tag()),
            net,
        );
        // Held in memory until Join commits it (see `PendingEndpoint`).
        self.pending_endpoints().insert(
            eid,
            PendingEndpoint {
                de,
                sources,
                berth_id,
                veth,
            },
        );
        // The engine gave the addresses; an answer with an Interface would be an error.
        Ok(json!({}))
    }

    /// Starts making a pending endpoint's veth on its network's bridge (see [`Veth`]). The
    /// attempt gives up rather than wait for the topology lock or re-create a missing bridge:
    /// Join then makes the veth itself, under the lock.
    fn start_veth(&self, ep: Endpoint, net: Network) -> Veth {
        let Ok(topology) = self.topology.clone().try_read_owned() else {
            return Veth::Absent;
        };
        let (done, rx) = watch::channel(None);
        tokio::task::spawn_blocking(move || {
            let _topology = topology;
            let made = (|| -> berth_dataplane::Result<bool> {
                let mut host = Netlink::open()?;
                let Some(bridge) = host.link_by_name(&net.bridge)? else {
                    return Ok(false);
                };
                let spec = endpoint_spec(&ep, &net, bridge.index);
                berth_dataplane::create_runtime_endpoint(&mut host, &spec, &ep.ifname)?;
                Ok(true)
            })();
            if let Err(e) = &made {
                tracing::debug!(endpoint = %ep.id, error = %e, "veth not made ahead of Join");
            }
            let _ = done.send(Some(matches!(made, Ok(true))));
        });
        Veth::Making(rx)
    }

    fn pending_endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingEndpoint>> {
        self.docker_pending.lock().expect("pending endpoints lock")
    }

    /// One address the engine gives an endpoint, checked and held (in memory) for it.
    async fn endpoint_address(
        &self,
        dn: &DockerNetwork,
        net: &Network,
        a: &str,
    ) -> Result<(IpNet, Source)> {
        let ip = parse_cidr_addr("address", a)?;
        let cidr = net.subnet_for(ip.addr()).map(|s| s.cidr).ok_or_else(|| {
            invalid(format!(
                "address {ip} is outside berth network {:?}",
                net.name
            ))
        })?;
        let reserved = self
            .docker_reserved
            .lock()
            .expect("reservations lock")
            .remove(&(net.name.clone(), ip.addr()));
        if let Some(pool) = reserved {
            return Ok((ip, Source::Reserved(pool)));
        }
        match self.store.get(&keys::ipam(&net.name, ip.addr())).await? {
            Some(kv) if self.reserved_for_endpoints(dn, &kv.value).await? => {
                Ok((ip, Source::Stored(pool_of_owner(&kv.value))))
            }
            Some(_) => Err(AgentError::Conflict(format!(
                "address {} is already in use on {:?}",
                ip.addr(),
                net.name
            ))),
            // The engine's own IPAM gave it, or berth restarted since handing it out: take it
            // now, if it is still free.
            None => {
                self.take_in_subnet(&net.name, cidr, Some(ip.addr()))
                    .await?;
                Ok((ip, Source::Taken))
            }
        }
    }

    /// Whether an address reserved in the store under `owner` is one the engine may hand an
    /// endpoint of Docker network `dn`: returned by one of berth's driver
    /// (`docker:external`), or reserved under a pool `dn` uses — never under another
    /// network's pool, e.g. another driver's.
    async fn reserved_for_endpoints(&self, dn: &DockerNetwork, owner: &[u8]) -> Result<bool> {
        if !owner.starts_with(keys::DOCKER_OWNER_PREFIX.as_bytes()) {
            return Ok(false);
        }
        let Some(pool) = pool_of_owner(owner) else {
            return Ok(true);
        };
        Ok(self
            .load::<DockerPool>(&keys::docker_pool(&pool))
            .await?
            .is_some_and(|(p, _)| dn.uses(&p)))
    }

    /// Gives back what a pending endpoint held in memory: reservations to the engine's
    /// IPAM calls (which release them), addresses taken for it to the pool.
    fn give_back(&self, network: &str, sources: &[(IpAddr, Source)]) {
        for (ip, source) in sources {
            match source {
                Source::Reserved(pool) => {
                    self.docker_reserved
                        .lock()
                        .expect("reservations lock")
                        .insert((network.to_string(), *ip), pool.clone());
                }
                Source::Taken => self.release_ip(network, *ip),
                Source::Stored(_) => {}
            }
        }
    }

    async fn docker_endpoint_info(&self, req: EndpointRef) -> Result<Value> {
        let pending = self
            .pending_endpoints()
            .get(&req.endpoint_id)
            .map(|p| p.de.clone());
        let de = match pending {
            Some(de) => de,
            None => {
                self.docker_load::<DockerEndpoint>(
                    &keys::docker_endpoint(&req.endpoint_id),
                    "endpoint",
                )
                .await?
                .0
            }
        };
        Ok(
            json!({ "Value": { "network": de.network, "endpoint": de.endpoint, "ips": de.ips, "mac": de.mac } }),
        )
    }

    async fn docker_join(&self, req: EndpointRef) -> Result<Value> {
        let eid = required("EndpointID", &req.endpoint_id)?.to_string();
        let pending = self.pending_endpoints().remove(&eid);
        let Some(mut p) = pending else {
            return self.join_endpoint(&req, None).await;
        };
        let joined = self.join_endpoint(&req, Some(&mut p)).await;
        if joined.is_err() {
            let committed = self.store.get(&keys::docker_endpoint(&eid)).await;
            if !matches!(committed, Ok(Some(_))) {
                // Not committed: still pending, for a retried Join or DeleteEndpoint.
                self.pending_endpoints().insert(eid, p);
            }
            committed?;
        }
        joined
    }

    /// Joins a pending endpoint (committing it with the berth endpoint) or one in the store.
    async fn join_endpoint(
        &self,
        req: &EndpointRef,
        pending: Option<&mut PendingEndpoint>,
    ) -> Result<Value> {
        let key = keys::docker_endpoint(&req.endpoint_id);
        let sandbox = required("SandboxKey", &req.sandbox_key)?.to_string();
        // The engine moves the interface in itself, often into a namespace not made yet; one
        // that exists must not be a host's.
        if let Ok(ns) = netns::open(std::path::Path::new(&sandbox)) {
            crate::endpoints::refuse_host_namespace(&ns, &sandbox)?;
        }
        let (mut de, de_rev, sources, id, veth_made) = match pending {
            Some(p) => {
                // Waited for before the topology lock: a writer queued for it would hold up
                // the veth's maker, which only ever tries the lock. From here the veth is
                // Join's: committed, or deleted when the Join fails.
                let made = p.veth.made().await;
                p.veth = Veth::Absent;
                (
                    p.de.clone(),
                    None,
                    p.sources.clone(),
                    p.berth_id.clone(),
                    made,
                )
            }
            None => {
                let (de, rev) = self.docker_load::<DockerEndpoint>(&key, "endpoint").await?;
                let sources = de
                    .ips
                    .iter()
                    .map(|ip| (ip.addr(), Source::Stored(de.pools.get(&ip.addr()).cloned())))
                    .collect();
                (de, Some(rev), sources, random_id(), false)
            }
        };
        let ep = berth_endpoint(&de, &id, sandbox, self.host_tag());
        let _topology = self.topology.read().await;
        let prepared = self.join_transaction(&mut de, de_rev, &sources, &ep).await;
        let (net, txn, publishing_guard) = match prepared {
            Ok(p) => p,
            Err(e) => {
                if veth_made {
                    let _ = remove_link(ep.host_ifname.clone()).await;
                }
                return Err(e);
            }
        };
        let make_veth = async {
            if veth_made {
                return Ok(());
            }
            let (spec_ep, spec_net) = (ep.clone(), net.clone());
            kernel(move || {
                let mut host = Netlink::open()?;
                // One left by an earlier attempt whose deletion failed goes first.
                berth_dataplane::delete_link(&mut host, &spec_ep.host_ifname)?;
                let spec = endpoint_on_bridge(&mut host, &spec_ep, &spec_net)?;
                berth_dataplane::create_runtime_endpoint(&mut host, &spec, &spec_ep.ifname)
            })
            .await
        };
        // Without a veth made ahead, the commit (an fsync) and the veth (netlink) at once:
        // both take a few tenths of a millisecond. A crash between them leaves a berth-named
        // veth the store does not know, which the next start's reconcile deletes; a refused
        // commit deletes it here.
        let (committed, made) = tokio::join!(self.commit(txn), make_veth);
        drop(publishing_guard);
        let committed = match committed {
            Ok(TxnOutcome::CompareFailed(c)) => Err(AgentError::Conflict(format!(
                "join raced with another change ({c:?}); try again"
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            if made.is_ok() {
                let _ = remove_link(ep.host_ifname.clone()).await;
            }
            return Err(e);
        }
        let made = match made {
            Ok(_) => match self.publish(&ep).await {
                // Judged by policy before the engine moves the interface in and up.
                Ok(()) => self.policy_endpoint_up(&ep).await.map_err(|e| (e, true)),
                Err(e) => Err((e, true)),
            },
            Err(e) => Err((e, false)),
        };
        if let Err((e, veth_made)) = made {
            if veth_made {
                let _ = remove_link(ep.host_ifname.clone()).await;
            }
            self.unpublish(crate::firewall::forwards_of(&ep)).await;
            self.policy_endpoint_gone(&ep).await;
            // Undo: records and ports go, addresses return to the Docker reservation.
            let mut undo = self.endpoint_records(&ep, Txn::new(), false, Held::Ports);
            for ip in &ep.ips {
                undo = undo.put(
                    keys::ipam(&net.name, ip.addr()),
                    format!("{}external", keys::DOCKER_OWNER_PREFIX),
                );
            }
            de.endpoint = None;
            undo = undo.put(key, encode(&de));
            self.commit(undo).await?;
            return Err(e);
        }
        // Docker moves the interface in and configures it right after this answer.
        self.services_endpoint_up(&ep).await;
        let gw = |v4: bool| {
            net.subnets
                .iter()
                .find(|s| {
                    s.gateway.is_ipv4() == v4 && ep.ips.iter().any(|ip| s.cidr.contains(&ip.addr()))
                })
                .map(|s| s.gateway.to_string())
                .unwrap_or_default()
        };
        Ok(json!({
            "InterfaceName": { "SrcName": ep.ifname, "DstPrefix": "eth" },
            "Gateway": gw(true),
            "GatewayIPv6": gw(false),
            "DisableGatewayService": true,
        }))
    }

    /// What Join commits: the berth endpoint's records, its addresses taken over (from
    /// memory, or from reservations in the store) and the Docker endpoint pointing at it;
    /// with the endpoint's network and its host ports held until the commit.
    async fn join_transaction(
        &self,
        de: &mut DockerEndpoint,
        de_rev: Option<u64>,
        sources: &[(IpAddr, Source)],
        ep: &Endpoint,
    ) -> Result<(Network, Txn, Option<tokio::sync::MutexGuard<'_, ()>>)> {
        if de.endpoint.is_some() {
            return Err(AgentError::Conflict(format!(
                "endpoint {} has already joined a sandbox",
                de.id
            )));
        }
        let (net, net_rev) = self
            .load::<Network>(&keys::network(&de.network))
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("no network named {:?}", de.network)))?;
        self.check_usable(&net)?;
        if net.driver == Driver::Overlay {
            // The bridge and VXLAN device before the veth that goes on the bridge.
            self.ensure_overlay(&net).await?;
        }
        let publishing_guard = self.reserve_ports(&ep.ports).await?;
        // `docker run -p` has no way to force a port, and fails where the port is in use.
        self.refuse_host_listeners(&ep.ports, None).await?;
        // Against the network as read: a removal (on any host) marks it first.
        let mut txn = Txn::new().when(Compare::ModRevision(keys::network(&net.name), net_rev));
        for c in self.block_compares(&net, &ep.ips) {
            txn = txn.when(c);
        }
        let mut txn = self.endpoint_records(ep, txn, true, Held::Ports);
        for (ip, source) in sources {
            let k = keys::ipam(&net.name, *ip);
            if !matches!(source, Source::Stored(_)) {
                txn = txn.when(Compare::Absent(k.clone())).put(k, ep.id.clone());
                continue;
            }
            let kv = self
                .store
                .get(&k)
                .await?
                .filter(|kv| kv.value.starts_with(keys::DOCKER_OWNER_PREFIX.as_bytes()));
            let kv = kv.ok_or_else(|| {
                AgentError::Conflict(format!("address {ip} is not reserved for this endpoint"))
            })?;
            txn = txn
                .when(Compare::ModRevision(k.clone(), kv.mod_revision))
                .put(k, ep.id.clone());
        }
        de.endpoint = Some(ep.id.clone());
        let key = keys::docker_endpoint(&de.id);
        txn = match de_rev {
            Some(rev) => txn.when(Compare::ModRevision(key.clone(), rev)),
            None => txn.when(Compare::Absent(key.clone())),
        }
        .put(key, encode(de));
        Ok((net, txn, publishing_guard))
    }

    async fn docker_leave(&self, req: EndpointRef) -> Result<Value> {
        let key = keys::docker_endpoint(required("EndpointID", &req.endpoint_id)?);
        let (mut de, rev) = self.docker_load::<DockerEndpoint>(&key, "endpoint").await?;
        let Some(id) = de.endpoint.take() else {
            return Err(AgentError::NotFound(format!(
                "endpoint {} has not joined a sandbox",
                de.id
            )));
        };
        self.hand_back(&de, &id).await?;
        gone_is_done(self.delete_endpoint(&id).await)?;
        put_if_unchanged(self, key, rev, &de).await?;
        Ok(json!({}))
    }

    /// Puts the addresses berth's IPAM gave a Docker endpoint, now held by its berth endpoint
    /// `id`, back under their pools' reservation before that endpoint goes: its removal then
    /// leaves them to the engine's ReleaseAddress instead of freeing them first.
    async fn hand_back(&self, de: &DockerEndpoint, id: &str) -> Result<()> {
        let mut txn = Txn::new();
        for (ip, pool) in &de.pools {
            let k = keys::ipam(&de.network, *ip);
            if let Some(kv) = self.store.get(&k).await?
                && kv.value == id.as_bytes()
            {
                txn = txn
                    .when(Compare::ModRevision(k.clone(), kv.mod_revision))
                    .put(k, pool_owner(pool));
            }
        }
        if txn.ops.is_empty() {
            return Ok(());
        }
        commit_or_conflict(self, txn).await
    }

    async fn docker_delete_endpoint(&self, req: EndpointRef) -> Result<Value> {
        let eid = required("EndpointID", &req.endpoint_id)?;
        let pending = self.pending_endpoints().get(eid).cloned();
        if let Some(p) = pending {
            // Once the attempt to make it is over, by name: whatever the attempt reported.
            // Should that fail, the endpoint stays pending for the engine's retry.
            p.veth.made().await;
            remove_link(veth_name(&p.berth_id)).await?;
            self.pending_endpoints().remove(eid);
            self.give_back(&p.de.network, &p.sources);
            return Ok(json!({}));
        }
        let key = keys::docker_endpoint(eid);
        let Some((de, _)) = self.load::<DockerEndpoint>(&key).await? else {
            return Ok(json!({}));
        };
        if let Some(id) = &de.endpoint {
            self.hand_back(&de, id).await?;
            gone_is_done(self.delete_endpoint(id).await)?;
        }
        // Addresses the engine's own IPAM gave (reserved here as "external") go with it.
        let mut txn = Txn::new().delete(key);
        let external = format!("{}external", keys::DOCKER_OWNER_PREFIX);
        let mut freed = Vec::new();
        for ip in &de.ips {
            let k = keys::ipam(&de.network, ip.addr());
            if let Some(kv) = self.store.get(&k).await?
                && kv.value == external.as_bytes()
            {
                txn = txn
                    .when(Compare::ModRevision(k.clone(), kv.mod_revision))
                    .delete(k);
                freed.push(ip.addr());
            }
        }
        commit_or_conflict(self, txn).await?;
        for ip in freed {
            self.release_ip(&de.network, ip);
        }
        Ok(json!({}))
    }
}

// ------------------------------------------------------------------ endpoints the engine forgot

/// How long a Docker endpoint must look dead before berth releases it, unless configured:
/// well past the engine's own retries of a failed call (about 15 s per call), and past the
/// moment between Join and the container's namespace being made, when a live endpoint looks
/// the same.
pub const DOCKER_ENDPOINT_GRACE: Duration = Duration::from_secs(60);

/// Why the container of a joined Docker endpoint is gone, judged from the kernel, or `None`
/// while it may live. When libnetwork removes a sandbox it moves the veth peer back to
/// berth's namespace and unmounts the SandboxKey; its Leave then tells berth, unless berth
/// is down, and the engine gives up and forgets the endpoint. Right after Join the endpoint
/// looks the same (the namespace is made later), so only a look that lasts means death (see
/// [`DeadDockerEndpoints`]). A peer in no namespace berth can see, the host end still there,
/// counts as alive: berth may not see the engine's mounts.
fn docker_sandbox_gone(
    ep: &Endpoint,
    mut has_link: impl FnMut(&str) -> berth_dataplane::Result<bool>,
) -> berth_dataplane::Result<Option<String>> {
    let sandbox = &ep.netns.path;
    if netns::id_at(std::path::Path::new(sandbox)).is_some() {
        return Ok(None);
    }
    Ok(if has_link(&ep.ifname)? {
        Some(format!(
            "its sandbox {sandbox} is gone and {} is back in berth's namespace",
            ep.ifname
        ))
    } else if !has_link(&ep.host_ifname)? {
        Some(format!("its sandbox {sandbox} and its veth are gone"))
    } else {
        None
    })
}

/// For `check` on a `runtime_configured` endpoint: the problem of a Docker endpoint whose
/// container is gone (see [`docker_sandbox_gone`]), which berth releases after
/// [`DOCKER_ENDPOINT_GRACE`].
pub(crate) fn docker_endpoint_problem(
    host: &mut Netlink,
    ep: &Endpoint,
) -> berth_dataplane::Result<Option<String>> {
    if !ep.netns.id.starts_with("docker-") {
        return Ok(None);
    }
    let reason = docker_sandbox_gone(ep, |name| Ok(host.link_by_name(name)?.is_some()))?;
    Ok(reason.map(|why| format!("the container is gone: {why}; the engine did not remove the endpoint, so berth releases it")))
}

/// The Docker endpoints that looked dead at every sweep since they first did, and since when:
/// one look could be a container between Join and its namespace, or an engine call under way.
#[derive(Debug, Default)]
pub(crate) struct DeadDockerEndpoints {
    since: HashMap<String, Instant>,
}

impl DeadDockerEndpoints {
    /// Records which endpoints look dead `now`; returns those that have looked so for `grace`.
    fn overdue(&mut self, dead: &[String], now: Instant, grace: Duration) -> Vec<String> {
        self.since.retain(|id, _| dead.contains(id));
        dead.iter()
            .filter(|id| {
                let since = *self.since.entry(id.to_string()).or_insert(now);
                now.duration_since(since) >= grace
            })
            .cloned()
            .collect()
    }
}

impl Agent {
    /// Releases Docker endpoints the engine forgot, until the daemon stops: a container
    /// removed while berth was down, whose Leave, DeleteEndpoint and ReleaseAddress the engine
    /// gave up on. One that looks dead (see [`docker_sandbox_gone`]) for `grace` is released as
    /// those calls would have: its berth endpoint and veth, its addresses, its record.
    pub async fn run_docker_endpoint_sweep(self: Arc<Self>, grace: Duration) {
        let every = (grace / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
        let mut dead = DeadDockerEndpoints::default();
        loop {
            if let Err(e) = self.sweep_docker_endpoints(&mut dead, grace).await {
                tracing::warn!(error = %e, "looking for Docker endpoints the engine forgot failed");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// One pass of [`Agent::run_docker_endpoint_sweep`]: how many endpoints it released.
    pub(crate) async fn sweep_docker_endpoints(
        &self,
        dead: &mut DeadDockerEndpoints,
        grace: Duration,
    ) -> Result<usize> {
        let looks_dead = self.dead_docker_endpoints().await?;
        let ids: Vec<String> = looks_dead.iter().map(|(id, _)| id.clone()).collect();
        let overdue = dead.overdue(&ids, Instant::now(), grace);
        if overdue.is_empty() {
            return Ok(0);
        }
        // Judged again between the engine's calls, which may have changed them meanwhile.
        let _one_at_a_time = self.docker_calls.lock().await;
        let mut released = 0;
        for (id, why) in self.dead_docker_endpoints().await? {
            if !overdue.contains(&id) {
                continue;
            }
            match self.release_docker_endpoint(&id, &why).await {
                Ok(()) => released += 1,
                Err(e) => {
                    tracing::warn!(docker_endpoint = %id, error = %e, "cannot release a Docker endpoint the engine forgot; trying again later")
                }
            }
        }
        Ok(released)
    }

    /// The Docker endpoints in the store whose container looks gone, with the reason.
    async fn dead_docker_endpoints(&self) -> Result<Vec<(String, String)>> {
        let mut dead = Vec::new();
        let mut joined = Vec::new();
        for de in self
            .load_all::<DockerEndpoint>(keys::DOCKER_ENDPOINTS)
            .await?
        {
            match &de.endpoint {
                // The engine sends DeleteEndpoint right after Leave.
                None => dead.push((de.id, "it left its sandbox but was never deleted".into())),
                Some(id) => match self.load::<Endpoint>(&keys::endpoint(id)).await? {
                    Some((ep, _)) => joined.push((de.id, ep)),
                    None => dead.push((de.id, format!("its berth endpoint {id} is gone"))),
                },
            }
        }
        if joined.is_empty() {
            return Ok(dead);
        }
        let judged = kernel(move || {
            let mut host = Netlink::open()?;
            let mut dead = Vec::new();
            for (id, ep) in joined {
                let has_link = |name: &str| Ok(host.link_by_name(name)?.is_some());
                if let Some(why) = docker_sandbox_gone(&ep, has_link)? {
                    dead.push((id, why));
                }
            }
            Ok(dead)
        })
        .await?;
        dead.extend(judged);
        Ok(dead)
    }

    /// Does what the engine's Leave, DeleteEndpoint and ReleaseAddress calls for Docker
    /// endpoint `id` would have done, for one the engine no longer knows. The caller holds
    /// `docker_calls`.
    async fn release_docker_endpoint(&self, id: &str, why: &str) -> Result<()> {
        let Some((de, _)) = self
            .load::<DockerEndpoint>(&keys::docker_endpoint(id))
            .await?
        else {
            return Ok(());
        };
        let req = || EndpointRef {
            network_id: de.network_id.clone(),
            endpoint_id: id.to_string(),
            sandbox_key: String::new(),
        };
        if de.endpoint.is_some() {
            self.docker_leave(req()).await?;
        }
        self.docker_delete_endpoint(req()).await?;
        // Its veth (with the peer, back in berth's namespace) goes before its addresses.
        self.reap().await?;
        for (ip, pool) in &de.pools {
            self.docker_release_address(RequestAddress {
                pool_id: pool.clone(),
                address: ip.to_string(),
                options: None,
            })
            .await?;
            // The pool itself may be gone (the engine released it): then nobody else will.
            let k = keys::ipam(&de.network, *ip);
            if let Some(kv) = self.store.get(&k).await?
                && kv.value == pool_owner(pool).as_bytes()
            {
                let txn = Txn::new()
                    .when(Compare::ModRevision(k.clone(), kv.mod_revision))
                    .delete(k);
                commit_or_conflict(self, txn).await?;
                self.release_ip(&de.network, *ip);
            }
        }
        let ips: Vec<String> = de.ips.iter().map(|ip| ip.addr().to_string()).collect();
        tracing::warn!(
            docker_endpoint = %id,
            network = %de.network,
            addresses = %ips.join(","),
            "Docker endpoint released: {why}, and the engine no longer asks for it"
        );
        Ok(())
    }

    /// Releases the Docker endpoints berth still has on Docker network `dn`, which the engine
    /// is deleting (it deletes only networks without endpoints on its side). The caller holds
    /// `docker_calls`.
    async fn release_docker_endpoints_of(&self, dn: &DockerNetwork) -> Result<()> {
        let pending: Vec<PendingEndpoint> = self
            .pending_endpoints()
            .extract_if(|_, p| p.de.network_id == dn.id)
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            self.give_back(&p.de.network, &p.sources);
            p.discard_veth();
        }
        let why = "its Docker network is being deleted";
        for de in self
            .load_all::<DockerEndpoint>(keys::DOCKER_ENDPOINTS)
            .await?
        {
            // The engine forgets the network whatever berth answers: one endpoint that cannot
            // be released must not keep the others and the network behind.
            if de.network_id == dn.id
                && let Err(e) = self.release_docker_endpoint(&de.id, why).await
            {
                tracing::error!(docker_endpoint = %de.id, error = %e, "cannot release the endpoint of a deleted Docker network");
            }
        }
        Ok(())
    }

    /// The Docker networks of berth's driver on each berth network (full Docker ids), by
    /// berth network name: the engine never tells a driver a network's name (CreateNetwork
    /// carries its id, options and pools only), so the id is what leads to it (`docker
    /// network ls` lists the same ids).
    pub async fn docker_networks_by_network(&self) -> Result<HashMap<String, Vec<String>>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for dn in self
            .load_all::<DockerNetwork>(keys::DOCKER_NETWORKS)
            .await?
        {
            out.entry(dn.network).or_default().push(dn.id);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_overdue_only_after_looking_dead_for_the_whole_grace() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut dead = DeadDockerEndpoints::default();
        let mut pass = |ids: &[&str], at: Duration| {
            let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
            dead.overdue(&ids, t0 + at, grace)
        };
        assert!(pass(&["a"], Duration::ZERO).is_empty());
        assert!(pass(&["a", "b"], grace / 2).is_empty());
        // Seen alive once: its time starts again.
        assert!(pass(&["b"], grace).is_empty());
        assert_eq!(pass(&["a", "b"], grace * 3 / 2), ["b"]);
        assert_eq!(pass(&["a"], grace * 5 / 2), ["a"]);
    }

    fn docker_ep(sandbox: &str) -> Endpoint {
        let de = DockerEndpoint {
            id: "d0cce4".into(),
            network_id: "n".into(),
            network: "docker-n".into(),
            ips: vec!["10.1.0.2/24".parse().unwrap()],
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            ports: vec![],
            endpoint: None,
            pools: BTreeMap::new(),
            labels: Labels::new(),
            named_ports: vec![],
        };
        berth_endpoint(&de, "0123456789abcdef", sandbox.to_string(), None)
    }

    #[test]
    fn a_docker_endpoint_is_dead_only_with_its_sandbox_gone_and_its_peer_not_elsewhere() {
        let ep = docker_ep("/nonexistent/docker/netns/abc");
        let links = |names: Vec<String>| move |n: &str| Ok(names.iter().any(|l| l == n));
        let (host, peer) = (ep.host_ifname.clone(), ep.ifname.clone());
        // Peer back in berth's namespace (or not moved yet: the grace tells them apart).
        assert!(
            docker_sandbox_gone(&ep, links(vec![host.clone(), peer]))
                .unwrap()
                .is_some()
        );
        // Both ends gone.
        assert!(docker_sandbox_gone(&ep, links(vec![])).unwrap().is_some());
        // The peer is in a namespace berth cannot see: alive.
        assert!(
            docker_sandbox_gone(&ep, links(vec![host]))
                .unwrap()
                .is_none()
        );
        // The sandbox is a namespace: alive, whatever the links.
        let ep = docker_ep("/proc/self/ns/net");
        assert!(docker_sandbox_gone(&ep, links(vec![])).unwrap().is_none());
    }
}
