//! `berth-cni`: the CNI plugin (`"type": "berth-cni"`). It parses the runtime's request, asks
//! the berth daemon over its API socket, and prints the result in the requested CNI version.
//! It does no kernel work itself, so it starts and finishes in about a millisecond.

mod conf;
mod result;

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use berth_api::{
    Attach, Client, ClientError, CreateNetwork, Detach, Endpoint, Gc, MAX_BODY, ModelError,
    Network, read_at_most,
};
use berth_model::{
    MAX_GC_ATTACHMENTS, Shown, check_count, parse_requested_ips, validate_labels,
    validate_named_ports, validate_published_ports,
};
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
    pub const IO: u32 = 5;
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
    let env = Env::from_process();
    let stdin = read_config();
    // Errors are reported in the version the runtime asked for, when it can be read.
    let version = stdin
        .as_deref()
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string());
    match stdin.and_then(|stdin| run(&env, &stdin)) {
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

/// The network configuration on stdin: at most [`MAX_BODY`] bytes, the daemon's request limit
/// (no larger configuration could reach it, and reading one whole costs the plugin memory for
/// nothing), of UTF-8.
fn read_config() -> Result<String, CniError> {
    let stdin = std::io::stdin();
    let read = read_at_most(stdin.lock(), MAX_BODY).map_err(|e| {
        CniError::new(
            code::IO,
            format!("cannot read the network configuration: {e}"),
        )
    })?;
    let Some(bytes) = read else {
        // A file's length is known; a pipe's only that it is longer.
        let size = stdin
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .and_then(|fd| File::from(fd).metadata().ok())
            .filter(|m| m.is_file())
            .map_or_else(
                || format!("over {MAX_BODY} bytes"),
                |m| format!("{} bytes", m.len()),
            );
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "the network configuration is {size}, more than the {MAX_BODY} bytes berth-cni reads (the daemon's request limit)"
            ),
        ));
    };
    String::from_utf8(bytes).map_err(|_| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration: it is not UTF-8",
        )
    })
}

fn run(env: &Env, stdin: &str) -> Result<Option<Value>, CniError> {
    env.check()?;
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
            check_count(
                "valid attachments",
                conf.valid_attachments.len(),
                MAX_GC_ATTACHMENTS,
                "per request",
            )
            .map_err(|e| invalid_config("cni.dev/valid-attachments", e))?;
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
                "unknown CNI_COMMAND {}: expected ADD, DEL, CHECK, STATUS, GC or VERSION",
                Shown(other)
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
        // namespace that went away meanwhile), or a host's (one a daemon in another namespace
        // runs in): the variable is what is wrong.
        ClientError::Api {
            status: 400,
            message,
        } if message.contains("is not a network namespace")
            || message.contains("is a host's network namespace") =>
        {
            code::INVALID_ENV
        }
        ClientError::Api {
            status: 400 | 404, ..
        } => code::INVALID_CONFIG,
        ClientError::Api { status: 409, .. } => code::CONFLICT,
        // A request over the daemon's body limit: it never will succeed as it is.
        ClientError::Api { status: 413, .. } | ClientError::TooLarge { .. } => {
            code::INVALID_CONFIG
        }
        _ => code::INTERNAL,
    };
    CniError::new(code, e.to_string())
}

fn add(env: &Env, conf: &NetConf, client: &Client) -> Result<Value, CniError> {
    let (container_id, netns, ifname) = env.attachment(true)?;
    // Everything checkable is checked before the daemon creates anything.
    conf.validate_for_add()?;
    let (env_ips, env_mac) = env.ips_and_mac()?;
    let mut ips = conf.requested_ips.clone();
    ips.extend(env_ips);
    // The runtime's name for the container (podman passes the container name, Kubernetes the
    // pod name), else the first alias; DNS answers to it and to every alias.
    let name = env
        .arg("K8S_POD_NAME")
        .filter(|n| !n.is_empty())
        .or_else(|| conf.aliases.first().cloned());
    let req = Attach {
        network: conf.network.clone(),
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
        // CNI has no way to ask for a port a host process serves: refused, as a port in
        // use fails `docker run -p` (and `podman run -p` on its own networks).
        force: false,
        default_route: false,
        labels: labels(env, conf),
        named_ports: conf.named_ports.clone(),
    };
    check_caps(&req)?;
    let net = ensure_network(conf, client)?;
    let ep: Endpoint = client.post("/v1/endpoints", &req).map_err(api_error)?;
    Ok(result::add_result(&conf.cni_version, &ep, &net, netns))
}

/// The caps the daemon holds an attach's lists to (docs/api.md), checked before anything is
/// asked of it: an ADD refused after its network was made would leave the network behind.
/// Each error names the configuration's key (or the variable) the list came from. (The
/// aliases are checked as the configuration gives them, by `validate_for_add`.)
fn check_caps(req: &Attach) -> Result<(), CniError> {
    validate_labels(&req.labels).map_err(|e| {
        invalid_config("args.cni.labels (with CNI_ARGS' pod name and namespace)", e)
    })?;
    validate_named_ports(&req.named_ports).map_err(|e| invalid_config("args.cni.namedPorts", e))?;
    validate_published_ports(&req.ports)
        .map_err(|e| invalid_config("runtimeConfig.portMappings", e))?;
    parse_requested_ips(&req.ips)
        .map_err(|e| invalid_config("runtimeConfig.ips (with CNI_ARGS IP)", e))?;
    Ok(())
}

fn invalid_config(key: &str, e: ModelError) -> CniError {
    CniError::new(code::INVALID_CONFIG, format!("invalid {key}: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request the daemon refuses for its size never succeeds: the runtime must not retry it.
    #[test]
    fn a_request_too_large_is_invalid_config_not_try_again() {
        for e in [
            ClientError::Api {
                status: 413,
                message: "request body too large: at most 2097152 bytes".into(),
            },
            ClientError::TooLarge {
                size: MAX_BODY + 1,
                limit: MAX_BODY,
            },
        ] {
            let text = e.to_string();
            let e = api_error(e);
            assert_eq!(e.code, code::INVALID_CONFIG, "{text}");
            assert!(e.msg.contains("too large"), "{}", e.msg);
        }
    }
}
