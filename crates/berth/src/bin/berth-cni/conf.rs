//! The request: `CNI_*` environment and the network configuration on stdin.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use berth_api::{
    Attachment, DEFAULT_SOCKET, MacAddr, NamedPort, Network, PortMapping, Protocol, parse_subnet,
    validate_network_mtu,
};
use berth_model::{
    IFNAME_MAX, MAX_CONTAINER_ID, MAX_NETNS_PATH, ModelError, parse_requested_ips,
    validate_aliases, validate_container_id, validate_ifname,
};
use serde::Deserialize;
use serde_json::Value;

use crate::{CniError, SUPPORTED, code};

/// The longest `CNI_ARGS` and `CNI_PATH`: far above what runtimes pass (Kubernetes' `CNI_ARGS`
/// is about 300 bytes), far below what would cost the plugin.
pub const MAX_CNI_ARGS: usize = 16 << 10;
pub const MAX_CNI_PATH: usize = 16 << 10;

/// The longest value of each `CNI_*` variable berth-cni reads.
const ENV_CAPS: [(&str, usize); 5] = [
    ("CNI_CONTAINERID", MAX_CONTAINER_ID),
    ("CNI_NETNS", MAX_NETNS_PATH),
    ("CNI_IFNAME", IFNAME_MAX),
    ("CNI_ARGS", MAX_CNI_ARGS),
    ("CNI_PATH", MAX_CNI_PATH),
];

/// The `CNI_*` environment.
pub struct Env {
    vars: HashMap<String, String>,
    /// `CNI_*` variables whose values are not UTF-8.
    not_utf8: Vec<String>,
}

impl Env {
    pub fn from_process() -> Self {
        let mut env = Env {
            vars: HashMap::new(),
            not_utf8: Vec::new(),
        };
        // `vars_os`: `vars` panics on any variable that is not UTF-8, even one not ours.
        for (k, v) in std::env::vars_os() {
            let Some(k) = k.to_str().filter(|k| k.starts_with("CNI_")) else {
                continue;
            };
            match v.into_string() {
                Ok(v) => {
                    env.vars.insert(k.to_string(), v);
                }
                Err(_) => env.not_utf8.push(k.to_string()),
            }
        }
        env
    }

    #[cfg(test)]
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Env {
            vars: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            not_utf8: Vec::new(),
        }
    }

    /// Every `CNI_*` variable berth-cni reads is UTF-8 and within its length (`ENV_CAPS`),
    /// checked before any is used: the spec's code 4 naming the variable otherwise.
    pub fn check(&self) -> Result<(), CniError> {
        if let Some(key) = self.not_utf8.first() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{key} is not valid UTF-8"),
            ));
        }
        for (key, cap) in ENV_CAPS {
            if let Some(v) = self.vars.get(key)
                && v.len() > cap
            {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("invalid {key}: {} bytes long, at most {cap}", v.len()),
                ));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn require(&self, key: &str) -> Result<&str, CniError> {
        self.get(key)
            .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{key} is not set")))
    }

    pub fn command(&self) -> Result<String, CniError> {
        self.require("CNI_COMMAND").map(str::to_string)
    }

    /// `(container id, netns, ifname)`, validated; the namespace only where it is required.
    pub fn attachment(&self, need_netns: bool) -> Result<(&str, &str, &str), CniError> {
        let invalid = |key: &str, e: ModelError| {
            CniError::new(code::INVALID_ENV, format!("invalid {key}: {e}"))
        };
        let cid = self.require("CNI_CONTAINERID")?;
        validate_container_id(cid).map_err(|e| invalid("CNI_CONTAINERID", e))?;
        let netns = if need_netns {
            let netns = self.require("CNI_NETNS")?;
            check_netns(netns).map_err(|why| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("invalid CNI_NETNS {netns:?}: {why}"),
                )
            })?;
            netns
        } else {
            self.get("CNI_NETNS").unwrap_or("")
        };
        let ifname = self.require("CNI_IFNAME")?;
        validate_ifname(ifname).map_err(|e| invalid("CNI_IFNAME", e))?;
        Ok((cid, netns, ifname))
    }

    /// A `CNI_ARGS` value (`K=V;K2=V2`).
    pub fn arg(&self, key: &str) -> Option<String> {
        self.get("CNI_ARGS")?
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }

    /// `CNI_ARGS` `IP=` (comma-separated) and `MAC=`, checked: they come from the environment,
    /// so a bad one is code 4, like any other invalid `CNI_*` variable.
    pub fn ips_and_mac(&self) -> Result<(Vec<String>, Option<String>), CniError> {
        let bad = |what: &str, e: String| {
            CniError::new(code::INVALID_ENV, format!("invalid CNI_ARGS {what}: {e}"))
        };
        let ips: Vec<String> = self
            .arg("IP")
            .into_iter()
            .flat_map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
            .collect();
        parse_requested_ips(&ips).map_err(|e| bad("IP", e.to_string()))?;
        let mac = self.arg("MAC");
        if let Some(m) = &mac {
            m.parse::<MacAddr>()
                .map_err(|e| bad("MAC", e.to_string()))?;
        }
        Ok((ips, mac))
    }
}

/// Why `path` is not a container's network namespace, if it is not one. Checked here, before the daemon is
/// asked anything (it checks again), so that a wrong `CNI_NETNS` is the spec's code 4 and no
/// network is created for an ADD that cannot succeed.
fn check_netns(path: &str) -> Result<(), String> {
    let f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    let fs = nix::sys::statfs::fstatfs(&f).map_err(|e| e.to_string())?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(match f.metadata() {
            Ok(m) if m.is_dir() => "it is a directory, not a network namespace".into(),
            _ => "it is not a namespace file".into(),
        });
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the namespace the descriptor
    // refers to; `f` stays open for the duration of the call.
    let t = unsafe { nix::libc::ioctl(f.as_raw_fd(), nix::libc::NS_GET_NSTYPE) };
    match nix::errno::Errno::result(t) {
        Ok(t) if t == nix::libc::CLONE_NEWNET => {}
        Ok(_) => return Err("it is a namespace of another kind, not a network namespace".into()),
        Err(e) => return Err(format!("cannot tell its namespace type: {e}")),
    }
    // A host's namespace (the runtime's own, PID 1's, a berth daemon's) is refused before the
    // daemon is asked (it refuses it too), so that such an ADD creates no network either.
    match berth_dataplane::hostns::host_namespace(&f) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(format!(
            "it is a host's network namespace, not a container's ({why})"
        )),
        Err(e) => Err(format!("cannot tell whether it is a host's namespace: {e}")),
    }
}

/// The plugin configuration, as the runtime hands it over (unknown keys are allowed: plugin
/// configs carry other plugins' and runtimes' keys).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    cni_version: String,
    name: String,
    socket: Option<String>,
    network: Option<String>,
    subnet: Option<String>,
    gateway: Option<String>,
    ipv6_subnet: Option<String>,
    ipv6_gateway: Option<String>,
    mtu: Option<u32>,
    internal: Option<bool>,
    driver: Option<String>,
    /// Not supported (berth is its own IPAM); kept to refuse it by name.
    ipam: Option<Value>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    #[serde(default)]
    args: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<GcAttachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<GcAttachment>>,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeConfig {
    #[serde(default)]
    ips: Vec<String>,
    mac: Option<String>,
    #[serde(default)]
    aliases: HashMap<String, Vec<String>>,
    #[serde(default, rename = "portMappings")]
    port_mappings: Vec<CniPortMapping>,
}

/// One entry of the `portMappings` capability.
#[derive(Debug, Deserialize)]
struct CniPortMapping {
    #[serde(rename = "hostPort")]
    host_port: u16,
    #[serde(rename = "containerPort")]
    container_port: u16,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(rename = "hostIP", default)]
    host_ip: Option<String>,
}

impl CniPortMapping {
    fn to_mapping(&self) -> Result<PortMapping, CniError> {
        let bad = |why: String| CniError::new(code::INVALID_CONFIG, why);
        let protocol = match self.protocol.as_deref() {
            None | Some("") => Protocol::Tcp,
            Some(p) => p
                .parse()
                .map_err(|e: berth_api::ModelError| bad(e.to_string()))?,
        };
        let host_ip = match self.host_ip.as_deref() {
            None | Some("") => None,
            Some(ip) => Some(
                ip.parse()
                    .map_err(|_| bad(format!("invalid portMappings hostIP {ip:?}")))?,
            ),
        };
        let m = PortMapping {
            protocol,
            host_ip,
            host_port: self.host_port,
            container_port: self.container_port,
        }
        .normalized();
        m.validate().map_err(|e| bad(e.to_string()))?;
        Ok(m)
    }
}

#[derive(Debug, Clone, Deserialize)]
struct GcAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The configuration, checked and reduced to what berth uses.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub socket: String,
    /// The berth network: `network`, else the configuration's `name`.
    pub network: String,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub ipv6_subnet: Option<String>,
    pub ipv6_gateway: Option<String>,
    pub mtu: Option<u32>,
    pub internal: Option<bool>,
    /// `bridge` or `overlay` (a network on every host of the cluster).
    pub driver: Option<String>,
    /// `args.cni.labels` (the CNI conventions' `[{"key": ..., "value": ...}]`).
    pub labels: Vec<(String, String)>,
    /// `args.cni.namedPorts` (`[{"name": "http", "port": 8080, "protocol": "tcp"}]`, the
    /// protocol TCP when left out): ports policies may refer to by name.
    pub named_ports: Vec<NamedPort>,
    /// `runtimeConfig.ips`, else `args.cni.ips`; without prefix lengths.
    pub requested_ips: Vec<String>,
    pub mac: Option<String>,
    /// `runtimeConfig.aliases` for this network.
    pub aliases: Vec<String>,
    /// `runtimeConfig.portMappings`.
    pub ports: Vec<PortMapping>,
    pub valid_attachments: Vec<Attachment>,
    /// An `ipam` section: berth assigns addresses itself, so ADD refuses it (code 2).
    pub ipam: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &str) -> Result<Self, CniError> {
        let value: Value = serde_json::from_str(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("cannot decode the network configuration: {e}"),
            )
        })?;
        let raw: Raw = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("invalid network configuration: {e}"),
            )
        })?;
        if !SUPPORTED.contains(&raw.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "incompatible CNI version {:?}: berth-cni supports {}",
                    raw.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        let network = raw.network.clone().unwrap_or_else(|| raw.name.clone());
        let mut requested_ips: Vec<String> = raw.runtime_config.ips.clone();
        if requested_ips.is_empty()
            && let Some(ips) = raw
                .args
                .as_ref()
                .and_then(|a| a.pointer("/cni/ips"))
                .and_then(Value::as_array)
        {
            requested_ips = ips
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
        }
        let mut labels = Vec::new();
        if let Some(list) = raw.args.as_ref().and_then(|a| a.pointer("/cni/labels")) {
            let bad = || {
                CniError::new(
                    code::INVALID_CONFIG,
                    "args.cni.labels must be a list of {\"key\": ..., \"value\": ...}",
                )
            };
            for item in list.as_array().ok_or_else(bad)? {
                let field = |f: &str| item.get(f).and_then(Value::as_str).map(str::to_string);
                labels.push((
                    field("key").ok_or_else(bad)?,
                    field("value").ok_or_else(bad)?,
                ));
            }
        }
        let mut named_ports = Vec::new();
        if let Some(list) = raw.args.as_ref().and_then(|a| a.pointer("/cni/namedPorts")) {
            let bad = |why: String| {
                CniError::new(code::INVALID_CONFIG, format!("args.cni.namedPorts: {why}"))
            };
            let shape = || {
                bad("must be a list of {\"name\": ..., \"port\": ..., \"protocol\": ...}".into())
            };
            for item in list.as_array().ok_or_else(shape)? {
                let name = item.get("name").and_then(Value::as_str).ok_or_else(shape)?;
                let port = item.get("port").and_then(Value::as_u64).ok_or_else(shape)?;
                let protocol = match item.get("protocol") {
                    None => "tcp",
                    Some(p) => p.as_str().ok_or_else(shape)?,
                };
                named_ports.push(
                    format!("{name}={port}/{protocol}")
                        .parse::<NamedPort>()
                        .map_err(|e| bad(e.to_string()))?,
                );
            }
        }
        let requested_ips = requested_ips
            .into_iter()
            .map(|ip| ip.split('/').next().unwrap_or_default().to_string())
            .collect();
        let aliases = raw
            .runtime_config
            .aliases
            .get(&raw.name)
            .cloned()
            .unwrap_or_default();
        let ports = raw
            .runtime_config
            .port_mappings
            .iter()
            .map(CniPortMapping::to_mapping)
            .collect::<Result<_, _>>()?;
        let valid_attachments = raw
            .valid_attachments
            .or(raw.attachments)
            .unwrap_or_default()
            .into_iter()
            .map(|a| Attachment {
                container_id: a.container_id,
                ifname: a.ifname,
            })
            .collect();
        Ok(NetConf {
            cni_version: raw.cni_version,
            socket: raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_string()),
            network,
            subnet: raw.subnet,
            gateway: raw.gateway,
            ipv6_subnet: raw.ipv6_subnet,
            ipv6_gateway: raw.ipv6_gateway,
            mtu: raw.mtu,
            internal: raw.internal,
            driver: raw.driver,
            labels,
            named_ports,
            requested_ips,
            mac: raw.runtime_config.mac,
            aliases,
            ports,
            valid_attachments,
            ipam: raw.ipam.filter(|v| !v.is_null()),
        })
    }

    /// Checks what ADD uses of the configuration (network keys, `runtimeConfig.ips`, `mac` and
    /// `aliases`)
    /// before anything is asked of the daemon, so that a value that cannot work is the spec's
    /// code 7 (2 for `ipam`) and creates nothing. DEL and GC do not check: cleanup must work
    /// with any configuration a runtime still holds.
    pub fn validate_for_add(&self) -> Result<(), CniError> {
        if let Some(ipam) = &self.ipam {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!(
                    "unsupported field ipam = {ipam}: berth-cni assigns addresses itself; give subnet and gateway instead"
                ),
            ));
        }
        let bad = |key: &str, e: String| {
            CniError::new(code::INVALID_CONFIG, format!("invalid {key}: {e}"))
        };
        for (key, value, v6) in [
            ("subnet", &self.subnet, false),
            ("ipv6Subnet", &self.ipv6_subnet, true),
        ] {
            if let Some(v) = value {
                let net = parse_subnet(v).map_err(|e| bad(key, e.to_string()))?;
                if net.addr().is_ipv6() != v6 {
                    return Err(bad(
                        key,
                        format!("{v} is not IPv{}", if v6 { 6 } else { 4 }),
                    ));
                }
            }
        }
        for (key, value) in [
            ("gateway", &self.gateway),
            ("ipv6Gateway", &self.ipv6_gateway),
        ] {
            if let Some(v) = value {
                v.parse::<IpAddr>()
                    .map_err(|_| bad(key, format!("{v:?} is not an IP address")))?;
            }
        }
        if let Some(mtu) = self.mtu {
            validate_network_mtu(mtu, self.ipv6_subnet.is_some())
                .map_err(|e| bad("mtu", e.to_string()))?;
        }
        for ip in &self.requested_ips {
            ip.parse::<IpAddr>()
                .map_err(|_| bad("runtimeConfig.ips", format!("{ip:?} is not an IP address")))?;
        }
        if let Some(m) = &self.mac {
            m.parse::<MacAddr>()
                .map_err(|e| bad("runtimeConfig.mac", e.to_string()))?;
        }
        validate_aliases(&self.aliases).map_err(|e| bad("runtimeConfig.aliases", e.to_string()))?;
        Ok(())
    }

    /// STATUS and GC came with spec 1.1.0.
    pub fn require_version(&self, min: &str, what: &str) -> Result<(), CniError> {
        let rank = |v: &str| SUPPORTED.iter().position(|s| *s == v);
        if rank(&self.cni_version) < rank(min) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "{what} needs cniVersion {min} or later, the configuration has {}",
                    self.cni_version
                ),
            ));
        }
        Ok(())
    }

    /// Where the configuration disagrees with an existing network; empty when it does not.
    pub fn differences(&self, net: &Network) -> Vec<String> {
        let mut diffs = Vec::new();
        let mut compare = |what: &str, want: Option<String>, have: Option<String>| {
            if let Some(w) = want
                && Some(&w) != have.as_ref()
            {
                diffs.push(format!(
                    "{what} is {} in berth, {w} in the configuration",
                    have.as_deref().unwrap_or("unset")
                ));
            }
        };
        let v4 = net.subnet_v4();
        let v6 = net.subnet_v6();
        compare(
            "subnet",
            self.subnet.clone(),
            v4.map(|s| s.cidr.to_string()),
        );
        compare(
            "gateway",
            self.gateway.clone(),
            v4.map(|s| s.gateway.to_string()),
        );
        compare(
            "ipv6Subnet",
            self.ipv6_subnet.clone(),
            v6.map(|s| s.cidr.to_string()),
        );
        compare(
            "ipv6Gateway",
            self.ipv6_gateway.clone(),
            v6.map(|s| s.gateway.to_string()),
        );
        compare(
            "mtu",
            self.mtu.map(|m| m.to_string()),
            Some(net.mtu.to_string()),
        );
        compare(
            "internal",
            self.internal.map(|i| i.to_string()),
            Some(net.internal.to_string()),
        );
        compare("driver", self.driver.clone(), Some(net.driver.to_string()));
        diffs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        NetConf::parse(&format!(
            r#"{{"cniVersion":"1.1.0","name":"blue","type":"berth-cni"{extra}}}"#
        ))
    }

    #[test]
    fn labels_come_from_args_cni_labels() {
        let c = conf(
            r#","args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"tier","value":""}]}}"#,
        )
        .unwrap();
        assert_eq!(
            c.labels,
            [("app".into(), "web".into()), ("tier".into(), "".into())]
        );
        for bad in [
            r#","args":{"cni":{"labels":{"app":"web"}}}"#,
            r#","args":{"cni":{"labels":[{"key":"app"}]}}"#,
            r#","args":{"cni":{"labels":[{"key":1,"value":"x"}]}}"#,
        ] {
            let e = conf(bad).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn parses_keys_and_runtime_config() {
        let c = conf(r#","subnet":"10.91.0.0/24","mtu":1400,"runtimeConfig":{"ips":["10.91.0.9/24"],"mac":"02:00:00:00:00:09","aliases":{"blue":["web","w1"],"other":["x"]}}"#).unwrap();
        assert_eq!(c.network, "blue");
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert_eq!(c.requested_ips, ["10.91.0.9"]);
        assert_eq!(c.mac.as_deref(), Some("02:00:00:00:00:09"));
        assert_eq!(c.aliases, ["web", "w1"]);
        let c = conf(r#","network":"shared","args":{"cni":{"ips":["10.91.0.7"]}}"#).unwrap();
        assert_eq!(
            (c.network.as_str(), c.requested_ips.as_slice()),
            ("shared", &["10.91.0.7".to_string()][..])
        );
    }

    #[test]
    fn errors_have_the_spec_codes() {
        assert_eq!(NetConf::parse("{nope").unwrap_err().code, code::DECODE);
        assert_eq!(
            NetConf::parse(r#"{"cniVersion":"1.1.0"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        assert_eq!(
            conf(r#","mtu":"big""#).unwrap_err().code,
            code::INVALID_CONFIG
        );
        let old = NetConf::parse(r#"{"cniVersion":"0.3.1","name":"blue"}"#).unwrap_err();
        assert_eq!(old.code, code::INCOMPATIBLE_VERSION);
        assert!(old.msg.contains("0.4.0, 1.0.0, 1.1.0"), "{}", old.msg);
        let c = NetConf::parse(r#"{"cniVersion":"1.0.0","name":"blue"}"#).unwrap();
        assert_eq!(
            c.require_version("1.1.0", "GC").unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
    }

    #[test]
    fn values_that_cannot_work_are_refused_before_add() {
        assert!(
            conf(r#","subnet":"10.91.0.0/24","ipv6Subnet":"fd00:91::/64","mtu":1400"#)
                .unwrap()
                .validate_for_add()
                .is_ok()
        );
        let cases: &[(&str, u32, &str)] = &[
            (r#","subnet":"127.0.0.0/24""#, 7, "loopback"),
            (r#","subnet":"10.0.0.0/32""#, 7, "/30"),
            (r#","subnet":"10.0.0.5/24""#, 7, "host bits"),
            (r#","subnet":"fd00::/64""#, 7, "not IPv4"),
            (r#","ipv6Subnet":"ff02::/64""#, 7, "multicast"),
            (r#","ipv6Subnet":"fd00::/127""#, 7, "/126"),
            (r#","gateway":"nope""#, 7, "invalid gateway"),
            (r#","ipv6Subnet":"fd00::/64","mtu":1000"#, 7, "1280"),
            (r#","mtu":20"#, 7, "invalid MTU"),
            (
                r#","runtimeConfig":{"mac":"00:00:00:00:00:00"}"#,
                7,
                "all-zero",
            ),
            (
                r#","runtimeConfig":{"mac":"ff:ff:ff:ff:ff:ff"}"#,
                7,
                "unicast",
            ),
            (r#","runtimeConfig":{"ips":["x"]}"#, 7, "runtimeConfig.ips"),
            (r#","ipam":{"type":"host-local"}"#, 2, "ipam"),
        ];
        for (extra, want, text) in cases {
            let e = conf(extra).unwrap().validate_for_add().unwrap_err();
            assert_eq!(e.code, *want, "{extra}: {}", e.msg);
            assert!(e.msg.contains(text), "{extra}: {}", e.msg);
        }
    }

    #[test]
    fn netns_must_be_a_network_namespace() {
        let env = |netns: &str| {
            Env::from_pairs(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns),
            ])
        };
        // A container's: a namespace of its own, on a thread kept there meanwhile (needs root).
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let container = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tid_tx.send(nix::unistd::gettid()).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let container_ns = format!("/proc/self/task/{tid}/ns/net");
        assert!(env(&container_ns).attachment(true).is_ok());
        drop(done_tx);
        container.join().unwrap();
        for (bad, why) in [
            ("/proc/self/ns/mnt", "another kind"),
            ("/", "directory"),
            ("/proc/self/status", "not a namespace file"),
            ("/no/such/netns", "no such file"),
            // The runtime's own (berth-cni runs in it).
            ("/proc/self/ns/net", "host's network namespace"),
        ] {
            let e = env(bad).attachment(true).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{bad}: {}", e.msg);
            assert!(
                e.msg.contains("CNI_NETNS") && e.msg.contains(why),
                "{}",
                e.msg
            );
        }
        // DEL does not need the namespace, so it is not checked.
        assert!(env("/no/such/netns").attachment(false).is_ok());
        let e = Env::from_pairs(&[("CNI_ARGS", "MAC=00:00:00:00:00:00")]);
        assert_eq!(e.ips_and_mac().unwrap_err().code, code::INVALID_ENV);
        let e = Env::from_pairs(&[("CNI_ARGS", "IP=10.0.0.5,bad")]);
        assert_eq!(e.ips_and_mac().unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn env_variables_are_capped_with_code_4() {
        let ok = [
            ("CNI_CONTAINERID", "c".repeat(MAX_CONTAINER_ID)),
            ("CNI_NETNS", format!("/{}", "n".repeat(MAX_NETNS_PATH - 1))),
            ("CNI_IFNAME", "i".repeat(IFNAME_MAX)),
            ("CNI_ARGS", "a".repeat(MAX_CNI_ARGS)),
            ("CNI_PATH", "p".repeat(MAX_CNI_PATH)),
        ];
        let pairs: Vec<(&str, &str)> = ok.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert!(Env::from_pairs(&pairs).check().is_ok());
        for (key, value) in ok {
            let over = format!("{value}x");
            let e = Env::from_pairs(&[(key, &over)]).check().unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV, "{key}: {}", e.msg);
            assert_eq!(
                e.msg,
                format!(
                    "invalid {key}: {} bytes long, at most {}",
                    over.len(),
                    over.len() - 1
                )
            );
        }
        let e = Env::from_pairs(&[("CNI_ARGS", "IP=10.0.0.5,10.0.0.6,10.0.0.7")]);
        let e = e.ips_and_mac().unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(
            e.msg.ends_with(
                "too many ips: 3 given, at most 2 per endpoint (one per address family)"
            ),
            "{}",
            e.msg
        );
    }

    #[test]
    fn env_is_validated() {
        let e = Env::from_pairs(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ]);
        assert_eq!(e.attachment(true).unwrap_err().code, code::INVALID_ENV);
        let e = Env::from_pairs(&[("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(
            e.attachment(true).unwrap_err().code,
            code::INVALID_ENV,
            "ADD needs a netns"
        );
        assert_eq!(
            e.attachment(false).unwrap(),
            ("c1", "", "eth0"),
            "DEL does not"
        );
        let e = Env::from_pairs(&[(
            "CNI_ARGS",
            "IgnoreUnknown=1;IP=10.0.0.5;MAC=02:00:00:00:00:01",
        )]);
        assert_eq!(e.arg("IP").as_deref(), Some("10.0.0.5"));
        assert_eq!(e.arg("MAC").as_deref(), Some("02:00:00:00:00:01"));
        assert!(Env::from_pairs(&[]).command().is_err());
    }
}
