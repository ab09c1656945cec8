//! The short form of a rule on the command line (`berth policy create --ingress SPEC`).

use ipnet::IpNet;

use super::{Peer, PolicyPort, PolicyRule, PortRef, check_except, out_of_range, split_protocol};
use crate::{ModelError, PortName, Protocol, Selector};

/// The keys a term starts with.
const KEYS: [&str; 4] = ["from", "to", "except", "ports"];

impl PolicyRule {
    /// Parses a rule's short form: whitespace-separated terms, none of them required (an empty
    /// spec allows every peer on every port, Kubernetes' `- {}`):
    ///
    /// - `from=PEER` (ingress) or `to=PEER` (egress), repeatable: `all` (every peer, the same as
    ///   giving none), `cidr:CIDR`, or a selector of endpoints of the policy's network in
    ///   kubectl's syntax (`app=web`, `tier in (a, b),!canary`);
    /// - `except=CIDR[,CIDR...]` right after a `cidr:` peer, for addresses it leaves out;
    /// - `ports=PORT[,PORT...]`, repeatable: `N`, `N-M`, `NAME` (a port the destination
    ///   endpoint names) or `all`, each with an optional `/tcp`, `/udp` or `/sctp` (TCP if
    ///   none; `all` needs one).
    pub fn parse_cli(spec: &str, direction_is_ingress: bool) -> Result<PolicyRule, ModelError> {
        let (key, other, flag) = if direction_is_ingress {
            ("from", "to", "--egress")
        } else {
            ("to", "from", "--ingress")
        };
        let mut rule = PolicyRule {
            peers: Vec::new(),
            ports: Vec::new(),
        };
        let mut all_peers = false;
        // The `cidr:` peer that an `except=` may follow.
        let mut last_cidr = None;
        for term in terms(spec, key)? {
            let bad = |why: String| ModelError::InvalidPolicyRule {
                given: term.clone(),
                why,
            };
            let (k, value) = term.split_once('=').unwrap_or((&term, ""));
            let follows_cidr = last_cidr.take();
            if value.is_empty() {
                return Err(bad(format!("{k}= needs a value")));
            }
            match k {
                _ if k == key => match parse_peer(value).map_err(bad)? {
                    None => all_peers = true,
                    Some(peer) => {
                        if let Peer::Cidr { .. } = peer {
                            last_cidr = Some(rule.peers.len());
                        }
                        rule.peers.push(peer);
                    }
                },
                _ if k == other => {
                    return Err(bad(format!(
                        "{other}= is for {flag}; the peers of this rule are {key}=PEER"
                    )));
                }
                "except" => {
                    let Some(Peer::Cidr { cidr, except }) =
                        follows_cidr.and_then(|i| rule.peers.get_mut(i))
                    else {
                        return Err(bad(format!(
                            "except= must follow a cidr: peer, as in {key}=cidr:10.0.0.0/8 except=10.1.0.0/16"
                        )));
                    };
                    for e in value.split(',') {
                        let e = parse_cidr(e).map_err(bad)?;
                        check_except(cidr, &e).map_err(bad)?;
                        except.push(e);
                    }
                    last_cidr = follows_cidr;
                }
                "ports" => {
                    for p in value.split(',') {
                        rule.ports.push(parse_port(p).map_err(bad)?);
                    }
                }
                _ => return Err(bad(expected(key))),
            }
        }
        if all_peers {
            rule.peers.clear();
        }
        Ok(rule)
    }
}

fn expected(key: &str) -> String {
    format!("expected {key}=PEER, except=CIDR[,CIDR...] or ports=PORT[,PORT...]")
}

/// Splits at whitespace outside parentheses, and joins the words that start no term to the
/// peer before them, so that selectors like `tier in (a, b)` stay whole.
fn terms(spec: &str, key: &str) -> Result<Vec<String>, ModelError> {
    let mut words = Vec::new();
    let (mut depth, mut word) = (0usize, String::new());
    for c in spec.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if c.is_whitespace() && depth == 0 => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                continue;
            }
            _ => {}
        }
        word.push(c);
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut terms: Vec<String> = Vec::new();
    for word in words {
        let starts_term = word.split_once('=').is_some_and(|(k, _)| KEYS.contains(&k));
        match terms.last_mut() {
            Some(peer)
                if !starts_term && (peer.starts_with("from=") || peer.starts_with("to=")) =>
            {
                peer.push(' ');
                peer.push_str(&word);
            }
            _ if !starts_term => {
                return Err(ModelError::InvalidPolicyRule {
                    given: word,
                    why: expected(key),
                });
            }
            _ => terms.push(word),
        }
    }
    Ok(terms)
}

/// `all` (`None`: every peer), `cidr:CIDR` or a selector.
fn parse_peer(s: &str) -> Result<Option<Peer>, String> {
    if s == "all" {
        return Ok(None);
    }
    if let Some(cidr) = s.strip_prefix("cidr:") {
        return Ok(Some(Peer::Cidr {
            cidr: parse_cidr(cidr)?,
            except: Vec::new(),
        }));
    }
    s.parse::<Selector>()
        .map(|s| Some(Peer::Endpoints(s)))
        .map_err(|e| e.to_string())
}

/// A CIDR as Kubernetes takes it (host bits allowed), kept without host bits.
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| ModelError::InvalidCidr(s.to_string()).to_string())
}

/// `N`, `N-M`, `NAME` or `all`, each with an optional `/PROTOCOL`.
fn parse_port(s: &str) -> Result<PolicyPort, String> {
    let (port, protocol) = split_protocol(s).map_err(|why| format!("{s:?}: {why}"))?;
    let number = |n: &str| {
        n.parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| out_of_range("port", n))
    };
    let digits = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    let (port, end_port) = if port == "all" {
        if protocol.is_none() {
            return Err(
                "say which protocol: all/tcp, all/udp or all/sctp (leave ports= out for every port of every protocol)"
                    .into(),
            );
        }
        (None, None)
    } else if digits(port) {
        (Some(PortRef::Number(number(port)?)), None)
    } else if let Some((first, last)) = port.split_once('-')
        && digits(first)
        && digits(last)
    {
        let (first, last) = (number(first)?, number(last)?);
        if last < first {
            return Err(format!("the range {port} goes downwards"));
        }
        (Some(PortRef::Number(first)), Some(last))
    } else {
        let name =
            PortName::parse(port).map_err(|why| format!("invalid port name {port:?}: {why}"))?;
        (Some(PortRef::Named(name)), None)
    };
    Ok(PolicyPort {
        protocol: protocol.unwrap_or(Protocol::Tcp),
        port,
        end_port,
    })
}
