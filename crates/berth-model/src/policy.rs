//! Network policies: which endpoints of a network may talk to which, in Kubernetes
//! NetworkPolicy's meaning, so that its users need to learn nothing new.
//!
//! The serde form of [`Policy`] is the document people keep in files (`berth policy apply
//! -f`), the body of the API and the stored record: one shape everywhere.

mod cli;
mod file;
mod k8s;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    Labels, MAX_NAMED_PORTS, ModelError, Operator, PortName, Protocol, Selector, check_count,
    validate_name,
};

pub use file::{PolicyFileError, parse_policy_documents};

/// One policy: the endpoints of `network` that `selector` matches are isolated in each of its
/// directions, except for what some policy's rules allow (the union of all policies that
/// select an endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub network: String,
    /// Which endpoints of the network it applies to; empty: all of them.
    pub selector: Selector,
    /// Kubernetes' `policyTypes`: the directions in which selected endpoints are isolated.
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Connections selected endpoints may accept (empty with `ingress_isolated`: none).
    pub ingress: Vec<PolicyRule>,
    /// Connections selected endpoints may open.
    pub egress: Vec<PolicyRule>,
    /// Egress-isolated endpoints may still query berth's DNS on their network's gateway
    /// (UDP and TCP port 53) unless a policy that isolates them says `false`.
    pub gateway_dns: bool,
}

/// One rule: traffic with any of `peers` on any of `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// Empty: every peer.
    pub peers: Vec<Peer>,
    /// Empty: every port of every protocol.
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// The endpoints of the policy's network whose labels match (empty: all of them).
    Endpoints(Selector),
    /// Addresses in `cidr` but in none of `except` (each inside `cidr`).
    Cidr { cidr: IpNet, except: Vec<IpNet> },
}

/// A protocol and, optionally, a port or a range (`port` to `end_port`) or a named port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPort {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// Last port of a range; only with a numbered `port`, and not below it.
    pub end_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    /// A port an endpoint names (`--port-name http=8080/tcp`): resolved on the endpoint the
    /// connection goes to, as Kubernetes resolves container port names.
    Named(PortName),
}

/// An endpoint's named port, for policies' named ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: PortName,
    pub protocol: Protocol,
    pub port: u16,
}

impl Policy {
    /// Whether the policy applies to an endpoint of its network with these labels.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector.matches(labels)
    }

    /// Checks a policy built in code (from CLI flags, say) as reading its serde form checks a
    /// document. Host bits in CIDRs pass, as in Kubernetes; [`Policy::normalized`] clears them.
    /// Everything the API and the kernel take; and at most [`MAX_POLICY_PARTS`] rules per
    /// direction, peers and ports per rule and exceptions per CIDR, so that no one policy
    /// makes a kernel change too big for every host that programs it.
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_name("policy", &self.name)?;
        validate_name("network", &self.network)?;
        let bad = |why: String| ModelError::InvalidPolicy {
            name: self.name.clone(),
            why,
        };
        if !self.ingress_isolated && !self.egress_isolated {
            // Kubernetes' form cannot say it: empty policyTypes means Ingress.
            return Err(bad(
                "it isolates no direction: its policy types need Ingress, Egress or both".into(),
            ));
        }
        check_selector(&self.selector).map_err(|why| bad(format!("selector: {why}")))?;
        for (direction, rules) in [("ingress", &self.ingress), ("egress", &self.egress)] {
            check_count(
                format!("{direction} rules"),
                rules.len(),
                MAX_POLICY_PARTS,
                "per policy",
            )
            .map_err(|e| bad(e.to_string()))?;
            for (i, rule) in rules.iter().enumerate() {
                rule.check()
                    .map_err(|why| bad(format!("{direction} rule {}: {why}", i + 1)))?;
            }
        }
        Ok(())
    }

    /// The policy as its serde form reads back: selectors in Kubernetes' order (`matchLabels`,
    /// then `matchExpressions`, `!=` as `notin`) and CIDRs without host bits. Stored in this
    /// form, a policy equals what the store reads back, so comparing tells real changes.
    pub fn normalized(self) -> Policy {
        let rules =
            |rules: Vec<PolicyRule>| rules.into_iter().map(PolicyRule::normalized).collect();
        Policy {
            selector: k8s::canonical(&self.selector),
            ingress: rules(self.ingress),
            egress: rules(self.egress),
            ..self
        }
    }
}

/// The most rules a policy has per direction, and peers, ports and exceptions per rule.
pub const MAX_POLICY_PARTS: usize = 256;

impl PolicyRule {
    fn check(&self) -> Result<(), String> {
        let cap = |what: &str, given, per| {
            check_count(what, given, MAX_POLICY_PARTS, per).map_err(|e| e.to_string())
        };
        cap("peers", self.peers.len(), "per rule")?;
        cap("ports", self.ports.len(), "per rule")?;
        for peer in &self.peers {
            match peer {
                Peer::Endpoints(selector) => check_selector(selector)?,
                Peer::Cidr { cidr, except } => {
                    cap("exceptions", except.len(), "per CIDR")?;
                    for e in except {
                        check_except(cidr, e)?;
                    }
                }
            }
        }
        for port in &self.ports {
            check_ports(port.port.as_ref(), port.end_port)?;
        }
        Ok(())
    }

    fn normalized(self) -> PolicyRule {
        let peers = self
            .peers
            .into_iter()
            .map(|peer| match peer {
                Peer::Endpoints(selector) => Peer::Endpoints(k8s::canonical(&selector)),
                Peer::Cidr { cidr, except } => Peer::Cidr {
                    cidr: cidr.trunc(),
                    except: except.iter().map(IpNet::trunc).collect(),
                },
            })
            .collect();
        PolicyRule { peers, ..self }
    }
}

/// [`Selector::validate`], and `in` and `notin` have values.
fn check_selector(selector: &Selector) -> Result<(), String> {
    selector.validate().map_err(|e| e.to_string())?;
    for r in &selector.requirements {
        if let Operator::In(values) | Operator::NotIn(values) = &r.op
            && values.is_empty()
        {
            return Err(format!("{:?} needs at least one value", r.to_string()));
        }
    }
    Ok(())
}

/// Kubernetes' rule: an exception is a smaller block inside `cidr`.
fn check_except(cidr: &IpNet, except: &IpNet) -> Result<(), String> {
    let family = |n: &IpNet| if n.addr().is_ipv4() { "IPv4" } else { "IPv6" };
    if family(cidr) != family(except) {
        return Err(format!(
            "except {except} is {} but cidr {cidr} is {}",
            family(except),
            family(cidr)
        ));
    }
    if !cidr.contains(except) {
        return Err(format!("except {except} is not inside cidr {cidr}"));
    }
    if except.prefix_len() <= cidr.prefix_len() {
        return Err(format!(
            "except {except} is all of cidr {cidr}: an exception must be smaller"
        ));
    }
    Ok(())
}

/// Kubernetes' rules for `port` and `endPort`.
fn check_ports(port: Option<&PortRef>, end_port: Option<u16>) -> Result<(), String> {
    if let Some(PortRef::Number(0)) = port {
        return Err(out_of_range("port", 0));
    }
    match (port, end_port) {
        (_, Some(0)) => Err(out_of_range("endPort", 0)),
        (None, Some(end)) => Err(format!("endPort {end} needs a port to start from")),
        (Some(PortRef::Named(name)), Some(end)) => Err(format!(
            "endPort {end} needs a numbered port, not the named port {name:?}"
        )),
        (Some(PortRef::Number(port)), Some(end)) if end < *port => {
            Err(format!("endPort {end} is below port {port}"))
        }
        _ => Ok(()),
    }
}

fn out_of_range(what: &str, n: impl fmt::Display) -> String {
    format!("{what} {n} is out of range: ports are 1 to 65535")
}

/// `PORT[/PROTOCOL]`, the protocol case-insensitive and TCP when not given.
fn split_protocol(s: &str) -> Result<(&str, Option<Protocol>), &'static str> {
    match s.rsplit_once('/') {
        Some((rest, protocol)) => protocol
            .parse()
            .map(|p| (rest, Some(p)))
            .map_err(|_| "the protocol must be tcp, udp or sctp"),
        None => Ok((s, None)),
    }
}

/// `NAME=PORT[/PROTOCOL]` (`http=8080/tcp`), as `berth attach --port-name` takes it.
impl FromStr for NamedPort {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<NamedPort, ModelError> {
        let bad = |why| ModelError::InvalidNamedPort {
            given: s.to_string(),
            why,
        };
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=PORT[/PROTOCOL], e.g. http=8080/tcp"))?;
        let name = PortName::parse(name).map_err(bad)?;
        let (port, protocol) = split_protocol(rest).map_err(bad)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("the port is a number between 1 and 65535"))?;
        Ok(NamedPort {
            name,
            protocol: protocol.unwrap_or(Protocol::Tcp),
            port,
        })
    }
}

/// An endpoint's named ports: at most [`MAX_NAMED_PORTS`], ports 1 to 65535, each name once
/// (Kubernetes refuses a container whose ports share a name).
pub fn validate_named_ports(ports: &[NamedPort]) -> Result<(), ModelError> {
    check_count(
        "named ports (named_ports)",
        ports.len(),
        MAX_NAMED_PORTS,
        "per endpoint",
    )?;
    for (i, p) in ports.iter().enumerate() {
        let bad = |why| ModelError::InvalidNamedPort {
            given: p.to_string(),
            why,
        };
        if p.port == 0 {
            return Err(bad("the port is a number between 1 and 65535"));
        }
        if ports[..i].iter().any(|q| q.name == p.name) {
            return Err(bad("the endpoint names another port so already"));
        }
    }
    Ok(())
}

impl fmt::Display for NamedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}/{}", self.name, self.port, self.protocol)
    }
}
