//! `policy explain`: whether a connection would pass and which policies decide it. The verdicts
//! come from the same profiles the kernel gets, so the explanation cannot disagree with it.

use std::net::IpAddr;

use berth_model::{Endpoint, Protocol, Service};
use serde::{Deserialize, Serialize};

use crate::index::Source;
use crate::{Direction, PolicyIndex, allows};

/// One end of a connection to explain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Party {
    /// A known endpoint, by id (an unknown one has no address, so nothing reaches it).
    Endpoint(String),
    /// An address: the endpoint that has it, or else a party outside berth, which no policy
    /// judges.
    Address(IpAddr),
}

/// Whether a connection passes: it must be allowed out of its source and into its
/// destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub allowed: bool,
    /// The source's decision on opening the connection.
    pub egress: Judgement,
    /// The destination's decision on accepting it.
    pub ingress: Judgement,
    /// The addresses judged, of one family (IPv4 when both ends have one); `None` when the
    /// ends share no family or an endpoint is unknown, and then nothing is allowed.
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
    /// The two ends are endpoints of different networks, which stay isolated from each
    /// other whatever the policies say: denied.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub across_networks: bool,
    /// The destination is a service's virtual IP: the connection goes to one of its backends,
    /// each judged here. `egress` and `ingress` above are then those of the first backend
    /// that refuses it (else of the first backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceExplanation>,
}

/// A connection to a service's virtual IP, judged at every backend the load balancer may
/// send it to, on the backends' port for it. It is allowed only when each of them allows
/// it: the balancer picks a backend per connection (by chance, or the client's last one
/// under affinity), so with one backend refusing, some of the client's connections fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceExplanation {
    pub name: String,
    /// The service port asked about and the backends' port it is forwarded to; `None` when
    /// the service has no such port (nor does it answer a protocol without ports): nothing
    /// answers the connection.
    pub port: Option<u16>,
    pub target_port: Option<u16>,
    pub backends: Vec<BackendExplanation>,
}

/// One backend's verdict on the connection forwarded to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendExplanation {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub explanation: Explanation,
}

/// One end's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Judgement {
    /// The id of the endpoint judged (the source for egress, the destination for ingress);
    /// `None`: not a berth endpoint, so not judged (allowed).
    pub endpoint: Option<String>,
    /// The policies that isolate it in this direction; empty: everything is allowed.
    pub isolated_by: Vec<String>,
    /// The rules that allow the connection (`"db-allow-web (ingress rule 1)"`, `"gateway DNS
    /// (default)"`); empty when it is not isolated or the connection is denied.
    pub allowed_by: Vec<String>,
    pub allowed: bool,
}

impl PolicyIndex {
    /// Whether a connection from `src` to `dst` passes, to the destination port `port` (`None`:
    /// a protocol without ports, such as ICMP).
    pub fn explain(&self, src: &Party, dst: &Party, port: Option<(Protocol, u16)>) -> Explanation {
        let (src_ep, src_addrs) = self.resolve_party(src);
        let (dst_ep, dst_addrs) = self.resolve_party(dst);
        let pair = src_addrs
            .iter()
            .flat_map(|&s| dst_addrs.iter().map(move |&d| (s, d)))
            .filter(|(s, d)| s.is_ipv4() == d.is_ipv4())
            .min_by_key(|(s, _)| s.is_ipv6());
        let (protocol, port) = match port {
            Some((p, n)) => (p.number(), Some(n)),
            // ICMP or ICMPv6: only rules without ports let it through, whichever it is.
            None => match pair {
                Some((IpAddr::V6(_), _)) => (58, None),
                _ => (1, None),
            },
        };
        let egress = self.judge(src_ep, Direction::Egress, pair, protocol, port);
        let to_dst = pair.map(|(s, d)| (d, s));
        let ingress = self.judge(dst_ep, Direction::Ingress, to_dst, protocol, port);
        let across_networks =
            matches!((src_ep, dst_ep), (Some(s), Some(d)) if s.network != d.network);
        Explanation {
            allowed: pair.is_some() && !across_networks && egress.allowed && ingress.allowed,
            egress,
            ingress,
            source: pair.map(|(s, _)| s),
            destination: pair.map(|(_, d)| d),
            across_networks,
            service: None,
        }
    }

    /// Whether a connection from `src` to the virtual IP `vip` of `service` passes: the
    /// service port `port` leads to each of `backends` (the endpoints the load balancer has,
    /// each at its address of the VIP's family) on its target port, and every one of them
    /// must allow it (see [`ServiceExplanation`]).
    pub fn explain_service(
        &self,
        src: &Party,
        service: &Service,
        vip: IpAddr,
        backends: &[Endpoint],
        port: Option<(Protocol, u16)>,
    ) -> Explanation {
        let forwarded = port.and_then(|(protocol, number)| {
            service
                .ports
                .iter()
                .find(|p| p.protocol == protocol && p.port == number)
                .map(|p| (protocol, p.port, p.target_port))
        });
        let judged: Vec<BackendExplanation> = match forwarded {
            None => Vec::new(),
            Some((protocol, _, target)) => backends
                .iter()
                .filter_map(|ep| {
                    let addr = ep
                        .ips
                        .iter()
                        .map(|n| n.addr())
                        .find(|a| a.is_ipv4() == vip.is_ipv4())?;
                    let mut e = self.explain(src, &Party::Address(addr), Some((protocol, target)));
                    // A connection the load balancer forwarded passes between networks, as
                    // a published port's does: only the policies decide.
                    e.across_networks = false;
                    e.allowed = e.source.is_some() && e.egress.allowed && e.ingress.allowed;
                    Some(BackendExplanation {
                        endpoint: ep.id.clone(),
                        name: ep.name.clone(),
                        explanation: e,
                    })
                })
                .collect(),
        };
        let deciding = judged
            .iter()
            .find(|b| !b.explanation.allowed)
            .or(judged.first())
            .map(|b| &b.explanation);
        // With no backend to judge, only the source's side of the connection to the VIP.
        let (egress, ingress, source) = match deciding {
            Some(e) => (e.egress.clone(), e.ingress.clone(), e.source),
            None => {
                let to_vip = self.explain(src, &Party::Address(vip), port);
                (to_vip.egress, to_vip.ingress, to_vip.source)
            }
        };
        Explanation {
            allowed: !judged.is_empty() && judged.iter().all(|b| b.explanation.allowed),
            egress,
            ingress,
            source,
            destination: Some(vip),
            across_networks: false,
            service: Some(ServiceExplanation {
                name: service.name.clone(),
                port: forwarded.map(|(_, p, _)| p),
                target_port: forwarded.map(|(_, _, t)| t),
                backends: judged,
            }),
        }
    }

    /// The endpoint a party is, if any, and the addresses it may use.
    fn resolve_party(&self, party: &Party) -> (Option<&Endpoint>, Vec<IpAddr>) {
        match party {
            Party::Endpoint(id) => match self.endpoint(id) {
                Some(ep) => (Some(ep), ep.ips.iter().map(|n| n.addr()).collect()),
                None => (None, Vec::new()),
            },
            Party::Address(ip) => (self.owner(*ip), vec![*ip]),
        }
    }

    /// `ep`'s decision on a connection between `addrs` (its own address, the peer's).
    fn judge(
        &self,
        ep: Option<&Endpoint>,
        direction: Direction,
        addrs: Option<(IpAddr, IpAddr)>,
        protocol: u8,
        port: Option<u16>,
    ) -> Judgement {
        let Some(ep) = ep else {
            return Judgement {
                endpoint: None,
                isolated_by: Vec::new(),
                allowed_by: Vec::new(),
                allowed: true,
            };
        };
        let compiled = self.compile(ep, direction);
        let isolated = !compiled.isolated_by.is_empty();
        let (allowed, allowed_by) = match addrs {
            Some((_, peer)) => {
                // The profile the kernel gets: the verdict is the kernel's.
                let profile = self
                    .profile_key(ep, direction)
                    .map(|key| self.compile_profile(&key));
                let allowed = allows(profile.as_ref(), peer, protocol, port);
                // From the clauses the elements were made of: the verdict is the kernel's,
                // the reasons are the rules'.
                let mut by: Vec<Source<'_>> = Vec::new();
                for clause in &compiled.clauses {
                    if clause.matches(peer, protocol, port) && !by.contains(&clause.source) {
                        by.push(clause.source);
                    }
                }
                (allowed, by.iter().map(ToString::to_string).collect())
            }
            // Nothing to connect: only an endpoint that isolates nothing would have let it.
            None => (!isolated, Vec::new()),
        };
        Judgement {
            endpoint: Some(ep.id.clone()),
            isolated_by: compiled.isolated_by.iter().map(|s| s.to_string()).collect(),
            allowed_by,
            allowed,
        }
    }
}
