//! `berth-cni`: the CNI plugin (`"type": "berth-cni"`). It parses the runtime's request, asks
//! the berth daemon over its API socket, and prints the result in the requested CNI version.
//! It does no kernel work itself, so it starts and finishes in about a millisecond.

mod conf;
mod result;

use std::io::Read;
use std::time::Duration;

use berth_api::{Attach, Client, ClientError, CreateNetwork, Detach, Endpoint, Gc, Network};
use serde_json::{Value, json};

use conf::{Env, NetConf};

/// CNI spec versions this plugin speaks.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// How long a call may wait for the daemon: a stopped daemon must give an error, not a hang.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(15);

/// A CNI error: printed as `{cniVersion, code, msg, details}` on stdout, exit status 1.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

/// Error codes: the spec's, and berth's own from 100 on.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The request conflicts with existing state (interface exists, address in use).
    pub const CONFLICT: u32 = 100;
    /// CHECK found the attachment different from what was set up.
    pub const CHECK_FAILED: u32 = 101;
    /// A daemon-side failure; never a caller's mistake, which has one of the codes above.
    pub const INTERNAL: u32 = 999;
}

fn main() {
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let env = Env::from_process();
    // Errors are reported in the version the runtime asked for, when it can be read.
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string());
    match run(&env, &stdin) {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!(
                "{}",
                json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details })
            );
            std::process::exit(1);
        }
    }
}

fn run(env: &Env, stdin: &str) -> Result<Option<Value>, CniError> {
    let command = env.command()?;
    if command == "VERSION" {
        let asked = serde_json::from_str::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(Some(
            json!({ "cniVersion": asked, "supportedVersions": SUPPORTED }),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    let client = Client::new(&conf.socket).with_timeout(DAEMON_TIMEOUT);
    match command.as_str() {
        "ADD" => add(env, &conf, &client).map(Some),
        "DEL" => del(env, &conf, &client).map(|()| None),
        "CHECK" => check(env, &conf, &client).map(|()| None),
        "STATUS" => {
            conf.require_version("1.1.0", "STATUS")?;
            client.get::<Value>("/v1/status").map_err(|e| {
                CniError::new(
                    code::NOT_AVAILABLE,
                    format!("berth daemon not available: {e}"),
                )
            })?;
            Ok(None)
        }
        "GC" => {
            conf.require_version("1.1.0", "GC")?;
            let req = Gc {
                network: conf.network.clone(),
                valid: conf.valid_attachments.clone(),
            };
            match client.post::<_, Value>("/v1/gc", &req) {
                Ok(_) => Ok(None),
                // Nothing of ours to collect on a network berth does not have.
                Err(ClientError::Api { status: 404, .. }) => Ok(None),
                Err(e) => Err(api_error(e)),
            }
        }
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "unknown CNI_COMMAND {other:?}: expected ADD, DEL, CHECK, STATUS, GC or VERSION"
            ),
        )),
    }
}

/// Maps a daemon answer to a CNI error code.
fn api_error(e: ClientError) -> CniError {
    let code = match &e {
        ClientError::Unreachable { .. }
        | ClientError::Closed { .. }
        | ClientError::TimedOut { .. }
        // The daemon cannot reach its store (etcd).
        | ClientError::Api { status: 503, .. } => code::TRY_AGAIN_LATER,
        // The daemon found CNI_NETNS no network namespace although it was one here (a
        // namespace that went away meanwhile).
        ClientError::Api {
            status: 400,
            message,
        } if message.contains("is not a network namespace") => code::INVALID_ENV,
        ClientError::Api {
            status: 400 | 404, ..
        } => code::INVALID_CONFIG,
        ClientError::Api { status: 409, .. } => code::CONFLICT,
        _ => code::INTERNAL,
    };
    CniError::new(code, e.to_string())
}

fn add(env: &Env, conf: &NetConf, client: &Client) -> Result<Value, CniError> {
    let (container_id, netns, ifname) = env.attachment(true)?;
    // Everything checkable is checked before the daemon creates anything.
    conf.validate_for_add()?;
    let (env_ips, env_mac) = env.ips_and_mac()?;
    let net = ensure_network(conf, client)?;
    let mut ips = conf.requested_ips.clone();
    ips.extend(env_ips);
    // The runtime's name for the container (podman passes the container name, Kubernetes the
    // pod name), else the first alias; DNS answers to it and to every alias.
    let name = env
        .arg("K8S_POD_NAME")
        .filter(|n| !n.is_empty())
        .or_else(|| conf.aliases.first().cloned());
    let req = Attach {
        network: net.name.clone(),
        sandbox: netns.to_string(),
        ifname: Some(ifname.to_string()),
        ips,
        mac: conf.mac.clone().or(env_mac),
        aliases: conf
            .aliases
            .iter()
            .filter(|a| Some(*a) != name.as_ref())
            .cloned()
            .collect(),
        name,
        container_id: Some(container_id.to_string()),
        ports: conf.ports.clone(),
        default_route: false,
        labels: labels(env, conf),
        named_ports: conf.named_ports.clone(),
    };
    let ep: Endpoint = client.post("/v1/endpoints", &req).map_err(api_error)?;
    Ok(result::add_result(&conf.cni_version, &ep, &net, netns))
}

/// The endpoint's labels: the configuration's `args.cni.labels`, and a Kubernetes pod's
/// namespace and name from `CNI_ARGS` under the keys the kubelet's own labels use.
fn labels(env: &Env, conf: &NetConf) -> berth_api::Labels {
    let mut labels: berth_api::Labels = conf.labels.iter().cloned().collect();
    for (arg, key) in [
        ("K8S_POD_NAMESPACE", "io.kubernetes.pod.namespace"),
        ("K8S_POD_NAME", "io.kubernetes.pod.name"),
    ] {
        if let Some(v) = env.arg(arg).filter(|v| !v.is_empty()) {
            labels.insert(key.to_string(), v);
        }
    }
    labels
}

/// The network named by the config; created from the config's keys if it does not exist yet,
/// refused if it exists with different settings.
fn ensure_network(conf: &NetConf, client: &Client) -> Result<Network, CniError> {
    let path = format!("/v1/networks/{}", conf.network);
    let net = match client.get::<Network>(&path) {
        Ok(n) => n,
        Err(ClientError::Api { status: 404, .. }) => {
            let req = CreateNetwork {
                name: conf.network.clone(),
                subnet: conf.subnet.clone(),
                gateway: conf.gateway.clone(),
                ipv6_subnet: conf.ipv6_subnet.clone(),
                ipv6_gateway: conf.ipv6_gateway.clone(),
                mtu: conf.mtu,
                internal: conf.internal.unwrap_or(false),
                driver: conf.driver.clone(),
                vni: None,
            };
            match client.post::<_, Network>("/v1/networks", &req) {
                Ok(n) => return Ok(n),
                // Another ADD created it meanwhile: compare with that one.
                Err(ClientError::Api {
                    status: 409,
                    message,
                }) if message.contains("already exists") => {
                    client.get::<Network>(&path).map_err(api_error)?
                }
                Err(e) => return Err(api_error(e)),
            }
        }
        Err(e) => return Err(api_error(e)),
    };
    if let Some(diff) = conf.differences(&net).first() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "berth network {:?} exists with different settings: {diff}",
                net.name
            ),
        ));
    }
    Ok(net)
}

fn del(env: &Env, conf: &NetConf, client: &Client) -> Result<(), CniError> {
    let (container_id, _, ifname) = env.attachment(false)?;
    let req = Detach {
        network: conf.network.clone(),
        container_id: Some(container_id.to_string()),
        ifname: Some(ifname.to_string()),
        ..Default::default()
    };
    match client.post::<_, Value>("/v1/detach", &req) {
        // DEL is idempotent: an attachment (or network) berth does not know is already gone.
        Ok(_) | Err(ClientError::Api { status: 404, .. }) => Ok(()),
        Err(e) => Err(api_error(e)),
    }
}

fn check(env: &Env, conf: &NetConf, client: &Client) -> Result<(), CniError> {
    let (container_id, _, ifname) = env.attachment(true)?;
    let path = format!(
        "/v1/networks/{}/containers/{container_id}/{ifname}",
        conf.network
    );
    let ep: Endpoint = client.get(&path).map_err(|e| match e {
        ClientError::Api {
            status: 404,
            message,
        } => CniError::new(code::UNKNOWN_CONTAINER, message),
        other => api_error(other),
    })?;
    let report: berth_api::CheckReport = client
        .get(&format!("/v1/endpoints/{}/check", ep.id))
        .map_err(api_error)?;
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(CniError {
            code: code::CHECK_FAILED,
            msg: format!(
                "{} of container {container_id}: {}",
                ifname,
                report.problems.join("; ")
            ),
            details: String::new(),
        })
    }
}
