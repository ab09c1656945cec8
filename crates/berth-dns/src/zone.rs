//! What one network's DNS server knows: the names of the endpoints attached to it and of its
//! services, and how a query arriving on that network is answered from them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

use crate::wire::{self, Query, Record};

/// Local answers carry TTL 0: an attach or detach is visible to the very next query, with no
/// cache anywhere holding the old answer.
const TTL: u32 = 0;

/// The network's view, shared by its listeners and updated by the agent.
pub struct Zone {
    pub network: String,
    /// `NETWORK.SUFFIX`, lower case: the domain the network's names live in.
    pub domain: String,
    /// The suffix shared by all networks: names under it are never forwarded.
    pub suffix: String,
    /// `.SUFFIX`, for matching names under it without an allocation per query.
    dot_suffix: String,
    pub subnets: Vec<IpNet>,
    /// Internal networks have no way out of the host, DNS included: nothing is forwarded.
    pub internal: bool,
    names: RwLock<Names>,
    /// Starts each multi-address answer at a different address (round robin).
    rotation: AtomicUsize,
}

#[derive(Default)]
struct Names {
    /// Lower-case name → what answers to it.
    by_name: HashMap<String, Named>,
    /// Address → (endpoint id, its primary name).
    by_addr: HashMap<IpAddr, (String, String)>,
    /// Endpoint id → its names and addresses, for removal.
    of_endpoint: HashMap<String, (Vec<String>, Vec<IpAddr>)>,
    /// VIP → the qualified name of the service holding it.
    by_vip: HashMap<IpAddr, Arc<str>>,
}

/// The endpoints and the service with one name. Services and endpoints share the map so that
/// a name costs one lookup however many services the network has.
#[derive(Default)]
struct Named {
    /// (endpoint id, address) for every endpoint with the name or alias.
    endpoints: Vec<(String, IpAddr)>,
    /// Answers instead of the endpoints when present.
    service: Option<Service>,
}

/// A service as DNS answers it.
struct Service {
    vips: Vec<IpAddr>,
    /// Its named ports, names and protocols in lower case.
    ports: Vec<SrvPort>,
    /// `NAME.NETWORK.SUFFIX`: the target of its SRV records and the name of its VIPs, made once
    /// rather than per answer.
    fqdn: Arc<str>,
}

/// A port of a service. A named one answers SRV queries for `_NAME._PROTOCOL.SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvPort {
    /// Empty for an unnamed port, which has no SRV record.
    pub name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
}

/// What a zone has for a name: the answers, then the additional records.
#[derive(Default)]
struct Found {
    records: Vec<Record>,
    answers: usize,
}

impl Found {
    fn answers(records: Vec<Record>) -> Found {
        let answers = records.len();
        Found { records, answers }
    }

    /// The answer and additional sections.
    fn sections(&self) -> (&[Record], &[Record]) {
        self.records.split_at(self.answers)
    }
}

/// What a query calls for.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Send this answer.
    Answer(Vec<u8>),
    /// Not a local name: ask the upstream resolvers.
    Forward,
}

impl Zone {
    pub fn new(network: &str, suffix: &str, subnets: Vec<IpNet>, internal: bool) -> Zone {
        let suffix = suffix.trim_matches('.').to_ascii_lowercase();
        Zone {
            network: network.to_string(),
            domain: format!("{}.{suffix}", network.to_ascii_lowercase()),
            dot_suffix: format!(".{suffix}"),
            suffix,
            subnets,
            internal,
            names: RwLock::default(),
            rotation: AtomicUsize::new(0),
        }
    }

    /// Adds (or replaces) an endpoint: its names (the first is the primary one, used for PTR)
    /// and addresses.
    pub fn set_endpoint(&self, id: &str, names: &[String], ips: &[IpAddr]) {
        let mut n = self.names.write().expect("zone lock");
        n.remove(id);
        let names: Vec<String> = names.iter().map(|s| s.to_ascii_lowercase()).collect();
        if names.is_empty() {
            return;
        }
        for name in &names {
            let entry = &mut n.by_name.entry(name.clone()).or_default().endpoints;
            entry.extend(ips.iter().map(|ip| (id.to_string(), *ip)));
        }
        for ip in ips {
            n.by_addr.insert(*ip, (id.to_string(), names[0].clone()));
        }
        n.of_endpoint.insert(id.to_string(), (names, ips.to_vec()));
    }

    pub fn remove_endpoint(&self, id: &str) {
        self.names.write().expect("zone lock").remove(id);
    }

    /// Adds (or replaces) a service: its VIPs (one per address family) and ports. Its name
    /// answers with the VIPs, ahead of any endpoint of that name or alias: the VIP, which
    /// balances over the endpoints, is what the service's clients want.
    pub fn set_service(&self, name: &str, vips: &[IpAddr], ports: &[SrvPort]) {
        let name = name.to_ascii_lowercase();
        let fqdn: Arc<str> = format!("{name}.{}", self.domain).into();
        let ports = ports
            .iter()
            .filter(|p| !p.name.is_empty())
            .map(|p| SrvPort {
                name: p.name.to_ascii_lowercase(),
                protocol: p.protocol.to_ascii_lowercase(),
                port: p.port,
            })
            .collect();
        let mut n = self.names.write().expect("zone lock");
        n.remove_service(&name);
        for ip in vips {
            n.by_vip.insert(*ip, fqdn.clone());
        }
        let vips = vips.to_vec();
        n.by_name.entry(name).or_default().service = Some(Service { vips, ports, fqdn });
    }

    pub fn remove_service(&self, name: &str) {
        self.names
            .write()
            .expect("zone lock")
            .remove_service(&name.to_ascii_lowercase());
    }

    /// Answers a parsed query from the zone, or says it is someone else's. `limit` is the
    /// largest answer the transport takes. `others` gives the zones of the client's other
    /// networks (a sandbox on two networks finds names on both, asking either gateway); it is
    /// called only when this zone does not have the answer.
    pub fn resolve(
        &self,
        q: &Query<'_>,
        limit: usize,
        others: &dyn Fn() -> Vec<Arc<Zone>>,
    ) -> Resolution {
        let local = |rcode, records: &[Record], extra: &[Record]| {
            let a = wire::answer_with_extra(q, rcode, true, records, extra, TTL, limit);
            Resolution::Answer(a)
        };
        if !matches!(q.qclass, wire::CLASS_IN | wire::CLASS_ANY) {
            return self.not_ours(q, limit);
        }
        if let Some(ip) = wire::reverse_name_addr(&q.name) {
            let found = match self.reverse(ip) {
                Some(found) => Some(found),
                None => others().iter().find_map(|z| z.reverse(ip)),
            };
            return match found {
                None => self.not_ours(q, limit),
                Some(None) => local(wire::RCODE_NXDOMAIN, &[], &[]),
                Some(Some(fqdn)) if matches!(q.qtype, wire::TYPE_PTR | wire::TYPE_ANY) => {
                    local(wire::RCODE_NOERROR, &[Record::Ptr(fqdn)], &[])
                }
                Some(Some(_)) => local(wire::RCODE_NOERROR, &[], &[]),
            };
        }
        if q.name == self.suffix || q.name.ends_with(&self.dot_suffix) {
            // NAME.NETWORK.SUFFIX, for the networks the client is on.
            let answer = match self.qualified(&q.name, q.qtype) {
                Some(found) => Some(found),
                None => others().iter().find_map(|z| z.qualified(&q.name, q.qtype)),
            };
            return match answer {
                Some(Some(found)) => {
                    let (records, extra) = found.sections();
                    local(wire::RCODE_NOERROR, records, extra)
                }
                // A network's own domain holds names: NODATA, not NXDOMAIN.
                _ if q.name == self.suffix || q.name == self.domain => {
                    local(wire::RCODE_NOERROR, &[], &[])
                }
                _ => local(wire::RCODE_NXDOMAIN, &[], &[]),
            };
        }
        let found = match self.lookup(&q.name, q.qtype) {
            Some(found) => Some(found),
            None => others().iter().find_map(|z| z.lookup(&q.name, q.qtype)),
        };
        match found {
            // A known name without records of the asked type is NODATA (NOERROR, no answers).
            Some(found) => {
                let (records, extra) = found.sections();
                local(wire::RCODE_NOERROR, records, extra)
            }
            None => self.not_ours(q, limit),
        }
    }

    /// For a name under this zone's domain: `Some` of what [`Zone::lookup`] says of the short
    /// name; `None` when the name is not under this zone's domain.
    fn qualified(&self, name: &str, qtype: u16) -> Option<Option<Found>> {
        let short = name.strip_suffix(&self.domain)?.strip_suffix('.')?;
        Some(self.lookup(short, qtype))
    }

    /// The records of the asked type of a short name, endpoint addresses rotated; `None` if
    /// unknown here.
    fn lookup(&self, short: &str, qtype: u16) -> Option<Found> {
        let names = self.names.read().expect("zone lock");
        let want = |ip: &IpAddr| match qtype {
            wire::TYPE_A => ip.is_ipv4(),
            wire::TYPE_AAAA => ip.is_ipv6(),
            wire::TYPE_ANY => true,
            _ => false,
        };
        // Endpoint and service names start with a letter or digit: `_` starts a service port.
        if short.starts_with('_') {
            return names.srv(short, qtype);
        }
        let named = names.by_name.get(short)?;
        if let Some(s) = &named.service {
            let vips = s.vips.iter().filter(|ip| want(ip));
            return Some(Found::answers(vips.map(|ip| Record::Addr(*ip)).collect()));
        }
        let mut records: Vec<Record> = named
            .endpoints
            .iter()
            .filter(|(_, ip)| want(ip))
            .map(|(_, ip)| Record::Addr(*ip))
            .collect();
        drop(names);
        if records.len() > 1 {
            let turn = self.rotation.fetch_add(1, Ordering::Relaxed) % records.len();
            records.rotate_left(turn);
        }
        Some(Found::answers(records))
    }

    /// The fully qualified name of the service or endpoint holding `ip`: `Some(None)` for an
    /// address of this network's subnets no one holds, `None` for an address that is not this
    /// zone's (VIPs come from a range of their own, outside the subnets).
    fn reverse(&self, ip: IpAddr) -> Option<Option<String>> {
        let names = self.names.read().expect("zone lock");
        if let Some(fqdn) = names.by_vip.get(&ip) {
            return Some(Some(fqdn.to_string()));
        }
        if !self.subnets.iter().any(|s| s.contains(&ip)) {
            return None;
        }
        let endpoint = names.by_addr.get(&ip);
        Some(endpoint.map(|(_, name)| format!("{name}.{}", self.domain)))
    }

    /// A name berth does not know: forwarded, except from internal networks.
    fn not_ours(&self, q: &Query<'_>, limit: usize) -> Resolution {
        if self.internal {
            Resolution::Answer(wire::answer(q, wire::RCODE_REFUSED, false, &[], 0, limit))
        } else {
            Resolution::Forward
        }
    }
}

impl Names {
    fn remove(&mut self, id: &str) {
        let Some((names, ips)) = self.of_endpoint.remove(id) else {
            return;
        };
        for name in names {
            if let Some(named) = self.by_name.get_mut(&name) {
                named.endpoints.retain(|(ep, _)| ep != id);
                if named.endpoints.is_empty() && named.service.is_none() {
                    self.by_name.remove(&name);
                }
            }
        }
        // Only this endpoint's: a later endpoint may hold the address by now.
        for ip in ips {
            if self.by_addr.get(&ip).is_some_and(|(owner, _)| owner == id) {
                self.by_addr.remove(&ip);
            }
        }
    }

    fn remove_service(&mut self, name: &str) {
        let Some(named) = self.by_name.get_mut(name) else {
            return;
        };
        let Some(s) = named.service.take() else {
            return;
        };
        if named.endpoints.is_empty() {
            self.by_name.remove(name);
        }
        // Only this service's: a later service may hold the VIP by now.
        for ip in s.vips {
            if self.by_vip.get(&ip).is_some_and(|fqdn| *fqdn == s.fqdn) {
                self.by_vip.remove(&ip);
            }
        }
    }

    /// `_PORT._PROTO.SERVICE`: an SRV record for each of the service's ports of that name and
    /// protocol, with the VIPs as additional records. `_PROTO.SERVICE` is the empty name
    /// between the service and those: NODATA, since NXDOMAIN would deny every name under it
    /// (RFC 8020). `None` when the service has no such port.
    fn srv(&self, short: &str, qtype: u16) -> Option<Found> {
        let (first, rest) = short.strip_prefix('_')?.split_once('.')?;
        let (port, proto, service) = match rest.strip_prefix('_').and_then(|r| r.split_once('.')) {
            Some((proto, service)) => (Some(first), proto, service),
            None => (None, first, rest),
        };
        let s = self.by_name.get(service)?.service.as_ref()?;
        let mut ports = s
            .ports
            .iter()
            .filter(|p| p.protocol == proto && port.is_none_or(|name| p.name == name))
            .peekable();
        ports.peek()?;
        if port.is_none() || !matches!(qtype, wire::TYPE_SRV | wire::TYPE_ANY) {
            return Some(Found::default());
        }
        let mut records = Vec::with_capacity(s.ports.len() + s.vips.len());
        records.extend(ports.map(|p| Record::Srv {
            port: p.port,
            target: s.fqdn.clone(),
        }));
        let answers = records.len();
        records.extend(s.vips.iter().map(|ip| Record::Addr(*ip)));
        Some(Found { records, answers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::query;
    use crate::wire::{TYPE_A, TYPE_AAAA, TYPE_ANY, TYPE_PTR, TYPE_SRV, parse_query};

    /// A second network a client of blue is also on.
    fn red_zone() -> Arc<Zone> {
        Arc::new(Zone::new(
            "red",
            "berth.local",
            vec!["10.92.0.0/24".parse().unwrap()],
            false,
        ))
    }

    fn zone(internal: bool) -> Zone {
        let z = Zone::new(
            "blue",
            "berth.local.",
            vec![
                "10.91.0.0/24".parse().unwrap(),
                "fd00:91::/64".parse().unwrap(),
            ],
            internal,
        );
        z.set_endpoint(
            "e1",
            &["web".into(), "www".into()],
            &["10.91.0.2".parse().unwrap(), "fd00:91::2".parse().unwrap()],
        );
        z.set_endpoint(
            "e2",
            &["db".into(), "www".into()],
            &["10.91.0.3".parse().unwrap()],
        );
        z
    }

    /// (rcode, answer addresses or names as text)
    fn ask(z: &Zone, name: &str, qtype: u16) -> Option<(u8, Vec<String>)> {
        ask_with(z, name, qtype, &[])
    }

    fn ask_with(
        z: &Zone,
        name: &str,
        qtype: u16,
        others: &[Arc<Zone>],
    ) -> Option<(u8, Vec<String>)> {
        ask_all(z, name, qtype, others).map(|(rcode, answers, _)| (rcode, answers))
    }

    /// (rcode, answers, additional records as `OWNER DATA`)
    fn ask_all(
        z: &Zone,
        name: &str,
        qtype: u16,
        others: &[Arc<Zone>],
    ) -> Option<(u8, Vec<String>, Vec<String>)> {
        let m = query(1, name, qtype, false);
        let q = parse_query(&m).unwrap();
        let Resolution::Answer(a) = z.resolve(&q, 512, &|| others.to_vec()) else {
            return None;
        };
        let mut at = 12 + q.question.len();
        let mut section = |count: usize, owned: bool| {
            let mut out = Vec::new();
            for _ in 0..count {
                let rtype = u16::from_be_bytes([a[at + 2], a[at + 3]]);
                let len = usize::from(u16::from_be_bytes([a[at + 10], a[at + 11]]));
                let data = &a[at + 12..at + 12 + len];
                let text = match rtype {
                    TYPE_A => IpAddr::from(<[u8; 4]>::try_from(data).unwrap()).to_string(),
                    TYPE_AAAA => IpAddr::from(<[u8; 16]>::try_from(data).unwrap()).to_string(),
                    TYPE_PTR => name_at(&a, at + 12),
                    TYPE_SRV => {
                        let n = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
                        let target = name_at(&a, at + 18);
                        format!("{} {} {} {target}", n(0), n(2), n(4))
                    }
                    t => panic!("unexpected type {t}"),
                };
                out.push(match owned {
                    true => format!("{} {text}", name_at(&a, at)),
                    false => text,
                });
                at += 12 + len;
            }
            out
        };
        let count = |i: usize| usize::from(u16::from_be_bytes([a[i], a[i + 1]]));
        let answers = section(count(6), false);
        assert_eq!(count(8), 0);
        let additional = section(count(10), true);
        Some((a[3] & 0xf, answers, additional))
    }

    /// The name at `at` in `msg`, following compression pointers, dotted with the root dot.
    fn name_at(msg: &[u8], mut at: usize) -> String {
        let mut name = String::new();
        loop {
            let len = usize::from(msg[at]);
            match len {
                0 => return if name.is_empty() { ".".into() } else { name },
                0xc0.. => at = usize::from(u16::from_be_bytes([msg[at], msg[at + 1]]) & 0x3fff),
                _ => {
                    name.push_str(std::str::from_utf8(&msg[at + 1..at + 1 + len]).unwrap());
                    name.push('.');
                    at += 1 + len;
                }
            }
        }
    }

    #[test]
    fn short_and_qualified_names_case_insensitive() {
        let z = zone(false);
        assert_eq!(ask(&z, "web", TYPE_A), Some((0, vec!["10.91.0.2".into()])));
        assert_eq!(
            ask(&z, "WEB.blue.Berth.Local", TYPE_AAAA),
            Some((0, vec!["fd00:91::2".into()]))
        );
        assert_eq!(ask(&z, "db", TYPE_AAAA), Some((0, vec![])), "NODATA");
        assert_eq!(ask(&z, "nope.blue.berth.local", TYPE_A), Some((3, vec![])));
        assert_eq!(
            ask(&z, "web.red.berth.local", TYPE_A),
            Some((3, vec![])),
            "other network"
        );
        assert_eq!(ask(&z, "nope", TYPE_A), None, "forwarded");
        assert_eq!(ask(&z, "example.org", TYPE_A), None);
    }

    #[test]
    fn shared_alias_rotates_over_every_address() {
        let z = zone(false);
        let first = ask(&z, "www", TYPE_A).unwrap().1;
        let second = ask(&z, "www", TYPE_A).unwrap().1;
        assert_eq!(first.len(), 2);
        assert_ne!(first, second);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, ["10.91.0.2", "10.91.0.3"]);
    }

    #[test]
    fn reverse_lookups_within_the_network_only() {
        let z = zone(false);
        let (rcode, names) = ask(&z, "3.0.91.10.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!(rcode, 0);
        assert_eq!(names, ["db.blue.berth.local."]);
        assert_eq!(
            ask(&z, "9.0.91.10.in-addr.arpa", TYPE_PTR),
            Some((3, vec![]))
        );
        assert_eq!(
            ask(&z, "1.1.168.192.in-addr.arpa", TYPE_PTR),
            None,
            "forwarded"
        );
    }

    #[test]
    fn a_client_on_two_networks_finds_names_on_both() {
        let blue = zone(false);
        let red = red_zone();
        red.set_endpoint("r1", &["cache".into()], &["10.92.0.5".parse().unwrap()]);
        let others = [red.clone()];
        assert_eq!(
            ask_with(&blue, "cache", TYPE_A, &others),
            Some((0, vec!["10.92.0.5".into()]))
        );
        assert_eq!(
            ask_with(&blue, "cache.red.berth.local", TYPE_A, &others),
            Some((0, vec!["10.92.0.5".into()]))
        );
        assert_eq!(
            ask_with(&blue, "web.red.berth.local", TYPE_A, &others),
            Some((3, vec![]))
        );
        let (rcode, names) = ask_with(&blue, "5.0.92.10.in-addr.arpa", TYPE_PTR, &others).unwrap();
        assert_eq!((rcode, names.len()), (0, 1));
        // This network's names come first; without the client on red, red stays invisible.
        assert_eq!(
            ask_with(&blue, "web", TYPE_A, &others),
            Some((0, vec!["10.91.0.2".into()]))
        );
        assert_eq!(
            ask(&blue, "cache.red.berth.local", TYPE_A),
            Some((3, vec![]))
        );
        assert_eq!(ask(&blue, "cache", TYPE_A), None);
        // The domains themselves have names under them: NODATA.
        assert_eq!(ask(&blue, "blue.berth.local", TYPE_A), Some((0, vec![])));
        assert_eq!(ask(&blue, "berth.local", TYPE_A), Some((0, vec![])));
    }

    #[test]
    fn an_address_reused_by_a_later_endpoint_keeps_its_reverse_name() {
        let z = zone(false);
        z.set_endpoint("e9", &["new".into()], &["10.91.0.3".parse().unwrap()]);
        z.remove_endpoint("e2");
        let (_, names) = ask(&z, "3.0.91.10.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!(names, ["new.blue.berth.local."]);
    }

    #[test]
    fn removal_and_internal_networks() {
        let z = zone(true);
        z.remove_endpoint("e1");
        assert_eq!(
            ask(&z, "web", TYPE_A).unwrap().1.len(),
            0,
            "refused, no answer"
        );
        assert_eq!(ask(&z, "web", TYPE_A).unwrap().0, wire::RCODE_REFUSED);
        assert_eq!(ask(&z, "www", TYPE_A), Some((0, vec!["10.91.0.3".into()])));
        assert_eq!(
            ask(&z, "2.0.91.10.in-addr.arpa", TYPE_PTR),
            Some((3, vec![]))
        );
        assert_eq!(
            ask(&z, "example.org", TYPE_A).unwrap().0,
            wire::RCODE_REFUSED
        );
    }

    /// `zone` plus the service `api` (VIPs outside the subnets, as from berth's service range)
    /// with a named TCP port, a named UDP port and an unnamed one.
    fn with_service() -> Zone {
        let z = zone(false);
        z.set_service(
            "Api",
            &[
                "10.211.0.7".parse().unwrap(),
                "fd00:b5:5e7::7".parse().unwrap(),
            ],
            &[
                SrvPort {
                    name: "HTTP".into(),
                    protocol: "TCP".into(),
                    port: 80,
                },
                SrvPort {
                    name: "dns".into(),
                    protocol: "udp".into(),
                    port: 53,
                },
                SrvPort {
                    name: String::new(),
                    protocol: "tcp".into(),
                    port: 9090,
                },
            ],
        );
        z
    }

    #[test]
    fn services_answer_with_their_vips_case_insensitively() {
        let z = with_service();
        for name in ["api", "API", "api.blue.berth.local", "Api.Blue.BERTH.local"] {
            assert_eq!(ask(&z, name, TYPE_A), Some((0, vec!["10.211.0.7".into()])));
            assert_eq!(
                ask(&z, name, TYPE_AAAA),
                Some((0, vec!["fd00:b5:5e7::7".into()]))
            );
        }
        assert_eq!(ask(&z, "api", TYPE_ANY).unwrap().1.len(), 2);
        assert_eq!(ask(&z, "api", TYPE_SRV), Some((0, vec![])), "NODATA");
    }

    #[test]
    fn srv_records_point_at_the_service_with_its_vips_as_additional_records() {
        let z = with_service();
        let expected = (
            0,
            vec!["0 0 80 api.blue.berth.local.".to_string()],
            vec![
                "api.blue.berth.local. 10.211.0.7".to_string(),
                "api.blue.berth.local. fd00:b5:5e7::7".to_string(),
            ],
        );
        for name in [
            "_http._tcp.api.blue.berth.local",
            "_HTTP._Tcp.API.blue.berth.LOCAL",
            "_http._tcp.api",
        ] {
            assert_eq!(ask_all(&z, name, TYPE_SRV, &[]), Some(expected.clone()));
        }
        assert_eq!(
            ask(&z, "_dns._udp.api", TYPE_SRV),
            Some((0, vec!["0 0 53 api.blue.berth.local.".into()]))
        );
        assert_eq!(
            ask_all(&z, "_http._tcp.api", TYPE_A, &[]),
            Some((0, vec![], vec![])),
            "NODATA: the name has an SRV record only"
        );
    }

    #[test]
    fn srv_of_a_port_the_service_does_not_have() {
        let z = with_service();
        let nxdomain = Some((wire::RCODE_NXDOMAIN, vec![]));
        for name in [
            "_https._tcp.api.blue.berth.local",
            "_http._udp.api.blue.berth.local",
            "_dns._tcp.api.blue.berth.local",
            "_http._tcp.db.blue.berth.local",
            "_sctp.api.blue.berth.local",
        ] {
            assert_eq!(ask(&z, name, TYPE_SRV), nxdomain, "{name}");
        }
        // Like any unknown short name: forwarded.
        assert_eq!(ask(&z, "_https._tcp.api", TYPE_SRV), None);
        // The name above the ports exists (it has names under it): NODATA.
        assert_eq!(
            ask(&z, "_tcp.api.blue.berth.local", TYPE_SRV),
            Some((0, vec![]))
        );
    }

    #[test]
    fn reverse_lookups_of_vips_name_the_service() {
        let z = with_service();
        let (rcode, names) = ask(&z, "7.0.211.10.in-addr.arpa", TYPE_PTR).unwrap();
        assert_eq!((rcode, names), (0, vec!["api.blue.berth.local.".into()]));
        let v6 = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.7.e.5.0.5.b.0.0.0.0.d.f.ip6.arpa";
        assert_eq!(
            ask(&z, v6, TYPE_PTR),
            Some((0, vec!["api.blue.berth.local.".into()]))
        );
        // Another address of the service range is no one's here: forwarded.
        assert_eq!(ask(&z, "8.0.211.10.in-addr.arpa", TYPE_PTR), None);
    }

    #[test]
    fn a_service_shadows_endpoints_of_its_name_until_removed() {
        let z = zone(false);
        let vip = ["10.211.0.9".parse().unwrap()];
        z.set_service("WWW", &vip, &[]);
        let only_vip = Some((0, vec!["10.211.0.9".to_string()]));
        assert_eq!(ask(&z, "www", TYPE_A), only_vip);
        assert_eq!(ask(&z, "www.blue.berth.local", TYPE_A), only_vip);
        assert_eq!(ask(&z, "www", TYPE_AAAA), Some((0, vec![])), "NODATA");
        assert_eq!(
            ask(&z, "web", TYPE_A),
            Some((0, vec!["10.91.0.2".into()])),
            "the endpoint's other names stay"
        );
        z.remove_endpoint("e2");
        assert_eq!(
            ask(&z, "www", TYPE_A),
            only_vip,
            "an endpoint going changes nothing"
        );
        z.remove_service("www");
        assert_eq!(ask(&z, "www", TYPE_A), Some((0, vec!["10.91.0.2".into()])));
        z.remove_endpoint("e1");
        assert_eq!(ask(&z, "www.blue.berth.local", TYPE_A).unwrap().0, 3);
    }

    #[test]
    fn removed_and_replaced_services_leave_nothing_behind() {
        let z = with_service();
        z.set_service("api", &["10.211.0.8".parse().unwrap()], &[]);
        assert_eq!(ask(&z, "api", TYPE_A), Some((0, vec!["10.211.0.8".into()])));
        assert_eq!(ask(&z, "api", TYPE_AAAA), Some((0, vec![])));
        assert_eq!(ask(&z, "7.0.211.10.in-addr.arpa", TYPE_PTR), None);
        assert_eq!(
            ask(&z, "_http._tcp.api.blue.berth.local", TYPE_SRV),
            Some((wire::RCODE_NXDOMAIN, vec![]))
        );
        z.remove_service("API");
        assert_eq!(ask(&z, "api", TYPE_A), None, "forwarded");
        assert_eq!(
            ask(&z, "api.blue.berth.local", TYPE_A),
            Some((wire::RCODE_NXDOMAIN, vec![]))
        );
        assert_eq!(ask(&z, "8.0.211.10.in-addr.arpa", TYPE_PTR), None);
    }

    #[test]
    fn a_client_on_two_networks_finds_services_on_both() {
        let blue = zone(false);
        let red = red_zone();
        let http = SrvPort {
            name: "http".into(),
            protocol: "tcp".into(),
            port: 8080,
        };
        red.set_service("cache", &["10.211.1.1".parse().unwrap()], &[http]);
        let others = [red.clone()];
        assert_eq!(
            ask_with(&blue, "_http._tcp.cache", TYPE_SRV, &others),
            Some((0, vec!["0 0 8080 cache.red.berth.local.".into()]))
        );
        assert_eq!(
            ask_with(&blue, "1.1.211.10.in-addr.arpa", TYPE_PTR, &others),
            Some((0, vec!["cache.red.berth.local.".into()]))
        );
        assert_eq!(ask(&blue, "_http._tcp.cache", TYPE_SRV), None);
    }
}
