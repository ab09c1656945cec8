//! Services: a stable virtual IP (and name) in front of every endpoint of a network whose
//! labels match a selector, load-balanced by the kernel on every host.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{
    MAX_NODE_PORTS, MAX_SERVICE_PORTS, MAX_VIPS, ModelError, Protocol, Selector, check_count,
    validate_name,
};

/// Where service VIPs come from unless the daemon is told otherwise: next to berth's default
/// network pool (10.210.0.0/16), overlapping none of its networks.
pub const DEFAULT_SERVICE_CIDR: &str = "10.211.0.0/16";
/// The IPv6 service range (a ULA /112), for networks with an IPv6 subnet.
pub const DEFAULT_SERVICE_CIDR6: &str = "fd00:b5:5e7::/112";
/// Where published service ports (node ports) may be, as Kubernetes' default range: away
/// from the well-known ports a host's own services use (SSH, DNS, etcd, VXLAN's 4789).
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Kubernetes' default and upper bound for client-IP affinity, in seconds.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub network: String,
    pub selector: Selector,
    pub ports: Vec<ServicePort>,
    /// One virtual IP per address family of the network, IPv4 first.
    pub vips: Vec<IpAddr>,
    /// The host of the service's bridge network (only there are its backends reachable);
    /// `None` for an overlay network's, which every host carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Client-IP session affinity: a client's new connections go to the backend its last
    /// one went to, until none came for this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    /// The endpoints the service balances over; filled in by the daemon when it answers,
    /// never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<ServiceBackend>,
}

/// One backend as `service inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackend {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub ips: Vec<IpAddr>,
}

/// `[NAME=]PORT[:TARGET][/PROTO]`: clients connect to PORT on the VIP, backends get TARGET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<PortName>,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    /// Published on this port of every host's addresses (a Kubernetes NodePort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// A port's name (for SRV records): an IANA service name, as Kubernetes requires: 1 to 15
/// lower-case letters, digits and '-', with at least one letter, no '-' at either end and no
/// "--". Kept inline so ports stay `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortName {
    len: u8,
    bytes: [u8; 15],
}

impl PortName {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("checked ASCII")
    }

    /// The name, or why it is none; each user of port names has its own error.
    pub(crate) fn parse(s: &str) -> Result<PortName, &'static str> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > 15 {
            return Err("a port name is 1 to 15 characters");
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            || !b.iter().any(u8::is_ascii_lowercase)
            || b[0] == b'-'
            || b[b.len() - 1] == b'-'
            || s.contains("--")
        {
            return Err(
                "a port name is lower-case letters, digits and '-', with a letter, no '-' at either end and no \"--\"",
            );
        }
        let mut bytes = [0; 15];
        bytes[..b.len()].copy_from_slice(b);
        Ok(PortName {
            len: b.len() as u8,
            bytes,
        })
    }
}

impl FromStr for PortName {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<PortName, ModelError> {
        PortName::parse(s).map_err(|why| ModelError::InvalidServicePort {
            given: s.to_string(),
            why,
        })
    }
}

impl fmt::Display for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl Serialize for PortName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PortName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl FromStr for ServicePort {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<ServicePort, ModelError> {
        let bad = |why| ModelError::InvalidServicePort {
            given: s.to_string(),
            why,
        };
        let (name, rest) = match s.split_once('=') {
            Some((name, rest)) => (Some(name.parse::<PortName>()?), rest),
            None => (None, s),
        };
        let (ports, protocol) = match rest.rsplit_once('/') {
            Some((ports, proto)) => (
                ports,
                proto
                    .parse::<Protocol>()
                    .map_err(|_| bad("the protocol must be tcp, udp or sctp"))?,
            ),
            None => (rest, Protocol::Tcp),
        };
        let number = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("ports are numbers between 1 and 65535 (no ranges)"))
        };
        let (port, target_port) = match ports.split_once(':') {
            Some((port, target)) => (number(port)?, number(target)?),
            None => {
                let p = number(ports)?;
                (p, p)
            }
        };
        Ok(ServicePort {
            name,
            protocol,
            port,
            target_port,
            node_port: None,
        })
    }
}

impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "{name}=")?;
        }
        write!(f, "{}:{}/{}", self.port, self.target_port, self.protocol)?;
        if let Some(np) = self.node_port {
            write!(f, " (published on {np})")?;
        }
        Ok(())
    }
}

/// Applies `--publish` values to parsed ports: `NODEPORT` when the service has one port
/// (per protocol it is the same port), or `PORT_OR_NAME=NODEPORT`.
pub fn apply_publish(ports: &mut [ServicePort], publish: &[String]) -> Result<(), ModelError> {
    check_count(
        "published ports (publish)",
        publish.len(),
        MAX_NODE_PORTS,
        "per service",
    )?;
    for given in publish {
        let bad = |why| ModelError::InvalidServicePort {
            given: given.clone(),
            why,
        };
        let (which, node_port) = match given.split_once('=') {
            Some((which, np)) => (Some(which), np),
            None => (None, given.as_str()),
        };
        let node_port = node_port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("a published port is a number between 1 and 65535"))?;
        let targets: Vec<usize> = match which {
            None if ports.len() == 1 => vec![0],
            None => {
                return Err(bad(
                    "the service has several ports: say which, as --publish PORT=NODEPORT or NAME=NODEPORT",
                ));
            }
            Some(which) => (0..ports.len())
                .filter(|&i| {
                    ports[i].name.is_some_and(|n| n.as_str() == which)
                        || ports[i].port.to_string() == which
                })
                .collect(),
        };
        if targets.is_empty() {
            return Err(bad("no port of the service has that number or name"));
        }
        for i in targets {
            if ports[i].node_port.is_some() {
                return Err(bad("that port is already published"));
            }
            ports[i].node_port = Some(node_port);
        }
    }
    Ok(())
}

/// Parses an affinity timeout: seconds, or a number with `s`, `m` or `h` (`3h`).
pub fn parse_affinity_timeout(s: &str) -> Result<u32, ModelError> {
    let bad = || ModelError::InvalidAffinityTimeout(s.to_string());
    let (digits, unit) = match s.trim().char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.trim().split_at(i),
        None => (s.trim(), "s"),
    };
    let n: u32 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(bad)?;
    if secs == 0 || secs > MAX_AFFINITY_TIMEOUT {
        return Err(bad());
    }
    Ok(secs)
}

impl Service {
    /// What a service must be before anything is stored: a DNS label for a name (it is one in
    /// DNS), a network name, a valid selector, one to [`MAX_SERVICE_PORTS`] ports, no port twice,
    /// names and published ports unique, at most [`MAX_NODE_PORTS`] of them, and at most one
    /// VIP per address family.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why: String| ModelError::InvalidService {
            name: self.name.clone(),
            why,
        };
        let n = self.name.as_bytes();
        if n.is_empty()
            || n.len() > 63
            || !n[0].is_ascii_lowercase()
            || !n[n.len() - 1].is_ascii_alphanumeric()
            || !n
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return Err(bad(
                "a service name is a DNS label: 1 to 63 lower-case letters, digits and '-', starting with a letter and ending with a letter or digit".into(),
            ));
        }
        validate_name("network", &self.network)?;
        self.selector.validate()?;
        if self.ports.is_empty() {
            return Err(bad("a service needs at least one --port".into()));
        }
        check_count("ports", self.ports.len(), MAX_SERVICE_PORTS, "per service")?;
        check_count(
            "published ports",
            self.ports.iter().filter(|p| p.node_port.is_some()).count(),
            MAX_NODE_PORTS,
            "per service",
        )?;
        check_count(
            "vips",
            self.vips.len(),
            MAX_VIPS,
            "per service (one per address family)",
        )?;
        if self.vips.len() == MAX_VIPS && self.vips[0].is_ipv4() == self.vips[1].is_ipv4() {
            return Err(bad(format!(
                "vips {} and {}: at most one per address family",
                self.vips[0], self.vips[1]
            )));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(np) = p.node_port
                && !NODE_PORTS.contains(&np)
            {
                return Err(bad(format!(
                    "published port {np} is outside the node-port range {}-{}",
                    NODE_PORTS.start(),
                    NODE_PORTS.end()
                )));
            }
            for q in &self.ports[..i] {
                if p.port == q.port && p.protocol == q.protocol {
                    return Err(bad(format!(
                        "port {}/{} is given twice",
                        p.port, p.protocol
                    )));
                }
                if let Some(name) = p.name
                    && p.name == q.name
                {
                    return Err(bad(format!("port name {name} is given twice")));
                }
                if let Some(np) = p.node_port
                    && p.node_port == q.node_port
                    && p.protocol == q.protocol
                {
                    return Err(bad(format!(
                        "published port {np}/{} is given twice",
                        p.protocol
                    )));
                }
            }
        }
        if let Some(t) = self.affinity_timeout
            && (t == 0 || t > MAX_AFFINITY_TIMEOUT)
        {
            return Err(ModelError::InvalidAffinityTimeout(t.to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Operator, Requirement};

    #[test]
    fn ports_parse_in_every_form() {
        let p: ServicePort = "http=80:8080".parse().unwrap();
        assert_eq!(p.name.unwrap().as_str(), "http");
        assert_eq!(
            (p.port, p.target_port, p.protocol),
            (80, 8080, Protocol::Tcp)
        );
        let p: ServicePort = "53/udp".parse().unwrap();
        assert_eq!((p.port, p.target_port, p.protocol), (53, 53, Protocol::Udp));
        assert_eq!(p.name, None);
        let p: ServicePort = "dns=53:5353/udp".parse().unwrap();
        assert_eq!(p.to_string(), "dns=53:5353/udp");
        for (bad, why) in [
            ("80-90:80", "no ranges"),
            ("0", "between 1 and 65535"),
            ("80/icmp", "tcp, udp or sctp"),
            ("HTTP=80", "lower-case"),
            ("-x=80", "lower-case"),
            ("123=80", "with a letter"),
            ("averyveryverylongname=80", "1 to 15"),
        ] {
            let err = bad.parse::<ServicePort>().unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn publish_applies_to_the_named_or_only_port() {
        let mut one = vec!["80:8080".parse::<ServicePort>().unwrap()];
        apply_publish(&mut one, &["30080".into()]).unwrap();
        assert_eq!(one[0].node_port, Some(30080));
        let mut two = vec![
            "http=80:8080".parse::<ServicePort>().unwrap(),
            "53/udp".parse().unwrap(),
        ];
        let err = apply_publish(&mut two.clone(), &["30080".into()]).unwrap_err();
        assert!(err.to_string().contains("say which"), "{err}");
        apply_publish(&mut two, &["http=30080".into(), "53=30053".into()]).unwrap();
        assert_eq!(two[0].node_port, Some(30080));
        assert_eq!(two[1].node_port, Some(30053));
        let err = apply_publish(&mut two, &["nope=1".into()]).unwrap_err();
        assert!(err.to_string().contains("no port"), "{err}");
    }

    #[test]
    fn publish_is_capped() {
        let mut ports = vec!["80".parse::<ServicePort>().unwrap()];
        let publish: Vec<String> = (30000..30065).map(|p| format!("80={p}")).collect();
        assert_eq!(
            apply_publish(&mut ports, &publish).unwrap_err().to_string(),
            "too many published ports (publish): 65 given, at most 64 per service"
        );
        assert_eq!(ports[0].node_port, None);
    }

    #[test]
    fn affinity_timeouts() {
        assert_eq!(parse_affinity_timeout("3h").unwrap(), 10_800);
        assert_eq!(parse_affinity_timeout("90").unwrap(), 90);
        assert_eq!(parse_affinity_timeout("30m").unwrap(), 1800);
        for bad in ["0", "25h", "3d", "h", "-1", "99999999999"] {
            assert!(parse_affinity_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn services_are_validated_before_anything_is_stored() {
        let svc = |name: &str, ports: &[&str]| Service {
            name: name.into(),
            network: "blue".into(),
            selector: "app=web".parse().unwrap(),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
            vips: vec![],
            host: None,
            affinity_timeout: None,
            backends: vec![],
        };
        assert!(svc("web", &["80"]).validate().is_ok());
        assert!(svc("web", &["80", "80/udp"]).validate().is_ok());
        let mut published = svc("web", &["80"]);
        published.ports[0].node_port = Some(4789);
        let err = published.validate().unwrap_err().to_string();
        assert!(err.contains("node-port range 30000-32767"), "{err}");
        published.ports[0].node_port = Some(30080);
        assert!(published.validate().is_ok());
        let many: Vec<String> = (1..=257).map(|p| p.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(svc("web", &many[..MAX_SERVICE_PORTS]).validate().is_ok());
        let mut vips = svc("web", &["80"]);
        vips.vips = vec!["10.211.0.9".parse().unwrap(), "fd00::9".parse().unwrap()];
        assert!(vips.validate().is_ok());
        let mut two_v4 = vips.clone();
        two_v4.vips[1] = "10.211.0.10".parse().unwrap();
        let mut three = vips.clone();
        three.vips.push("10.211.0.11".parse().unwrap());
        let mut published = svc("web", &many[..65]);
        for (p, np) in published.ports.iter_mut().zip(30000..) {
            p.node_port = Some(np);
        }
        let mut bad_selector = svc("web", &["80"]);
        bad_selector.selector.requirements = vec![
            Requirement {
                key: "k".into(),
                op: Operator::Exists
            };
            257
        ];
        let mut bad_network = svc("web", &["80"]);
        bad_network.network = "n".repeat(65);
        for (s, why) in [
            (
                svc("web", &many),
                "too many ports: 257 given, at most 256 per service",
            ),
            (
                three,
                "too many vips: 3 given, at most 2 per service (one per address family)",
            ),
            (two_v4, "at most one per address family"),
            (
                published,
                "too many published ports: 65 given, at most 64 per service",
            ),
            (bad_selector, "too many selector terms: 257 given"),
            (bad_network, ": 65 bytes long, at most 64"),
            (svc("Web", &["80"]), "DNS label"),
            (svc("we.b", &["80"]), "DNS label"),
            (svc("web", &[]), "at least one"),
            (svc("web", &["80", "80:81"]), "given twice"),
            (svc("web", &["a=80", "a=81"]), "name a is given twice"),
        ] {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(why), "{}: {err}", s.name);
        }
    }
}
