//! Published ports: a host port forwarded to an endpoint's port, as `docker run -p` and the CNI
//! `portMappings` capability express them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The most ports one `--publish` range may cover: a typo like `1-65535` should not silently
/// install tens of thousands of forwards.
pub const MAX_RANGE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

impl FromStr for Protocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(ModelError::InvalidPublish {
                given: s.to_string(),
                why: "the protocol must be tcp, udp or sctp",
            }),
        }
    }
}

/// One host port forwarded to one endpoint port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: Protocol,
    /// The host address it is published on; `None` means every address of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

impl PortMapping {
    /// The same mapping with an unspecified host address (`0.0.0.0`, `::`) written as `None`:
    /// both mean every address of the host.
    pub fn normalized(self) -> Self {
        PortMapping {
            host_ip: self.host_ip.filter(|ip| !ip.is_unspecified()),
            ..self
        }
    }

    /// Refuses what can never be forwarded: port 0, and host addresses that are not one
    /// host's unicast address.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |why| ModelError::InvalidPublish {
            given: self.to_string(),
            why,
        };
        if self.host_port == 0 || self.container_port == 0 {
            return Err(bad("ports must be between 1 and 65535"));
        }
        if let Some(ip) = self.host_ip
            && (ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]))
        {
            return Err(bad(
                "the host address must be a unicast address (omit it for all addresses)",
            ));
        }
        Ok(())
    }
}

/// An endpoint's published ports: at most [`crate::MAX_PUBLISHED_PORTS`], each
/// [`PortMapping::validate`]d.
pub fn validate_published_ports(ports: &[PortMapping]) -> Result<(), ModelError> {
    crate::check_count(
        "published ports (ports)",
        ports.len(),
        crate::MAX_PUBLISHED_PORTS,
        "per endpoint",
    )?;
    ports.iter().try_for_each(PortMapping::validate)
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.protocol
        )
    }
}

/// Parses a `--publish` value, Docker's syntax: `[HOST_IP:]HOST_PORT[-END]:PORT[-END][/PROTO]`,
/// the IPv6 host address in brackets. A range maps port by port and both sides must be as long.
pub fn parse_publish(s: &str) -> Result<Vec<PortMapping>, ModelError> {
    let bad = |why| ModelError::InvalidPublish {
        given: s.to_string(),
        why,
    };
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((spec, proto)) => (spec, proto.parse::<Protocol>()?),
        None => (s, Protocol::Tcp),
    };
    let (host_ip, ports) = if let Some(rest) = spec.strip_prefix('[') {
        let (ip, ports) = rest
            .split_once("]:")
            .ok_or_else(|| bad("an IPv6 host address is written [ADDRESS]:HOST_PORT:PORT"))?;
        (Some(ip), ports)
    } else {
        match spec.matches(':').count() {
            1 => (None, spec),
            2 => {
                let (ip, ports) = spec.split_once(':').expect("two colons");
                (Some(ip), ports)
            }
            _ => return Err(bad("expected [HOST_IP:]HOST_PORT:PORT[/PROTOCOL]")),
        }
    };
    let host_ip = match host_ip {
        Some("") | None => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| bad("the host address is not an IP address"))?,
        ),
    };
    let (host, container) = ports
        .split_once(':')
        .ok_or_else(|| bad("expected HOST_PORT:PORT"))?;
    let range = |r: &str| -> Result<(u16, u16), ModelError> {
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("ports must be numbers between 1 and 65535"))
        };
        match r.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if b < a {
                    return Err(bad("a port range must go upwards"));
                }
                Ok((a, b))
            }
            None => port(r).map(|p| (p, p)),
        }
    };
    let (h0, h1) = range(host)?;
    let (c0, c1) = range(container)?;
    if h1 - h0 != c1 - c0 {
        return Err(bad("the host and container ranges must be equally long"));
    }
    if usize::from(h1 - h0) >= MAX_RANGE {
        return Err(bad("a range may cover at most 1024 ports"));
    }
    let mappings: Vec<PortMapping> = (0..=h1 - h0)
        .map(|i| {
            PortMapping {
                protocol,
                host_ip,
                host_port: h0 + i,
                container_port: c0 + i,
            }
            .normalized()
        })
        .collect();
    for m in &mappings {
        m.validate()?;
    }
    Ok(mappings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> PortMapping {
        let v = parse_publish(s).unwrap();
        assert_eq!(v.len(), 1, "{s}");
        v[0]
    }

    #[test]
    fn docker_syntax() {
        assert_eq!(
            one("8080:80"),
            PortMapping {
                protocol: Protocol::Tcp,
                host_ip: None,
                host_port: 8080,
                container_port: 80
            }
        );
        let udp = one("127.0.0.1:5353:53/udp");
        assert_eq!(udp.host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            (udp.protocol, udp.host_port, udp.container_port),
            (Protocol::Udp, 5353, 53)
        );
        assert_eq!(one("[::1]:8443:443").host_ip, Some("::1".parse().unwrap()));
        assert_eq!(one(":8080:80").host_ip, None);
        assert_eq!(one("0.0.0.0:8080:80").host_ip, None, "all addresses");
        let range = parse_publish("9000-9010:9100-9110/tcp").unwrap();
        assert_eq!(range.len(), 11);
        assert_eq!(
            (range[10].host_port, range[10].container_port),
            (9010, 9110)
        );
        assert_eq!(one("8080:80").to_string(), "8080:80/tcp");
        assert_eq!(
            one("[fd00::1]:53:53/udp").to_string(),
            "[fd00::1]:53:53/udp"
        );
    }

    #[test]
    fn published_ports_are_capped() {
        let ports = |n: u16| {
            (1..=n)
                .map(|p| PortMapping {
                    protocol: Protocol::Tcp,
                    host_ip: None,
                    host_port: p,
                    container_port: p,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(validate_published_ports(&ports(4096)), Ok(()));
        assert_eq!(
            validate_published_ports(&ports(4097))
                .unwrap_err()
                .to_string(),
            "too many published ports (ports): 4097 given, at most 4096 per endpoint"
        );
        let mut zero = ports(1);
        zero[0].host_port = 0;
        assert!(validate_published_ports(&zero).is_err());
    }

    #[test]
    fn mistakes_are_refused_with_a_reason() {
        for s in [
            "80",
            "0:80",
            "8080:0",
            "70000:80",
            "8080:80/icmp",
            "1.2.3:8080:80",
            "224.0.0.1:8080:80",
            "9000-9010:9000-9009",
            "9010-9000:9010-9000",
            "1-2000:1-2000",
            "[::1:8080:80",
            "a:b:c:d",
            "",
        ] {
            let e = parse_publish(s).unwrap_err();
            assert!(e.to_string().contains("--publish"), "{s}: {e}");
        }
    }
}
