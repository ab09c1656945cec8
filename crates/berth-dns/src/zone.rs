//! What one network's DNS server knows: the names of the endpoints attached to it, and how a
//! query arriving on that network is answered from them.

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
    /// Lower-case name → (endpoint id, address) for every endpoint with that name or alias.
    by_name: HashMap<String, Vec<(String, IpAddr)>>,
    /// Address → (endpoint id, its primary name).
    by_addr: HashMap<IpAddr, (String, String)>,
    /// Endpoint id → its names and addresses, for removal.
    of_endpoint: HashMap<String, (Vec<String>, Vec<IpAddr>)>,
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
            let entry = n.by_name.entry(name.clone()).or_default();
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
        let local = |rcode, records: &[Record]| {
            Resolution::Answer(wire::answer(q, rcode, true, records, TTL, limit))
        };
        if !matches!(q.qclass, wire::CLASS_IN | wire::CLASS_ANY) {
            return self.not_ours(q, limit);
        }
        if let Some(ip) = wire::reverse_name_addr(&q.name) {
            let found = if self.holds(ip) {
                Some(self.ptr(ip))
            } else {
                others().iter().find(|z| z.holds(ip)).map(|z| z.ptr(ip))
            };
            return match found {
                None => self.not_ours(q, limit),
                Some(None) => local(wire::RCODE_NXDOMAIN, &[]),
                Some(Some(fqdn)) if matches!(q.qtype, wire::TYPE_PTR | wire::TYPE_ANY) => {
                    local(wire::RCODE_NOERROR, &[Record::Ptr(fqdn)])
                }
                Some(Some(_)) => local(wire::RCODE_NOERROR, &[]),
            };
        }
        if q.name == self.suffix || q.name.ends_with(&self.dot_suffix) {
            // NAME.NETWORK.SUFFIX, for the networks the client is on.
            let answer = match self.qualified(&q.name, q.qtype) {
                Some(found) => Some(found),
                None => others().iter().find_map(|z| z.qualified(&q.name, q.qtype)),
            };
            return match answer {
                Some(Some(records)) => local(wire::RCODE_NOERROR, &records),
                // A network's own domain holds names: NODATA, not NXDOMAIN.
                _ if q.name == self.suffix || q.name == self.domain => {
                    local(wire::RCODE_NOERROR, &[])
                }
                _ => local(wire::RCODE_NXDOMAIN, &[]),
            };
        }
        let records = match self.addresses(&q.name, q.qtype) {
            Some(r) => Some(r),
            None => others().iter().find_map(|z| z.addresses(&q.name, q.qtype)),
        };
        match records {
            // A known name without records of the asked type is NODATA (NOERROR, no answers).
            Some(records) => local(wire::RCODE_NOERROR, &records),
            None => self.not_ours(q, limit),
        }
    }

    /// For a name under this zone's domain: `Some` of what [`Zone::addresses`] says of the
    /// short name; `None` when the name is not under this zone's domain.
    fn qualified(&self, name: &str, qtype: u16) -> Option<Option<Vec<Record>>> {
        let short = name.strip_suffix(&self.domain)?.strip_suffix('.')?;
        Some(self.addresses(short, qtype))
    }

    /// The addresses of the asked type of a short name, rotated; `None` if unknown here.
    fn addresses(&self, short: &str, qtype: u16) -> Option<Vec<Record>> {
        let names = self.names.read().expect("zone lock");
        let entries = names.by_name.get(short)?;
        let want = |ip: &IpAddr| match qtype {
            wire::TYPE_A => ip.is_ipv4(),
            wire::TYPE_AAAA => ip.is_ipv6(),
            wire::TYPE_ANY => true,
            _ => false,
        };
        let mut records: Vec<Record> = entries
            .iter()
            .filter(|(_, ip)| want(ip))
            .map(|(_, ip)| Record::Addr(*ip))
            .collect();
        drop(names);
        if records.len() > 1 {
            let turn = self.rotation.fetch_add(1, Ordering::Relaxed) % records.len();
            records.rotate_left(turn);
        }
        Some(records)
    }

    fn holds(&self, ip: IpAddr) -> bool {
        self.subnets.iter().any(|s| s.contains(&ip))
    }

    /// The fully qualified name of the endpoint holding `ip`, if any.
    fn ptr(&self, ip: IpAddr) -> Option<String> {
        let names = self.names.read().expect("zone lock");
        let (_, name) = names.by_addr.get(&ip)?;
        Some(format!("{name}.{}", self.domain))
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
            if let Some(entries) = self.by_name.get_mut(&name) {
                entries.retain(|(ep, _)| ep != id);
                if entries.is_empty() {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::query;
    use crate::wire::{TYPE_A, TYPE_AAAA, TYPE_PTR, parse_query};

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
        let m = query(1, name, qtype, false);
        let q = parse_query(&m).unwrap();
        let Resolution::Answer(a) = z.resolve(&q, 512, &|| others.to_vec()) else {
            return None;
        };
        let mut at = 12 + q.question.len();
        let mut out = Vec::new();
        for _ in 0..u16::from_be_bytes([a[6], a[7]]) {
            let rtype = u16::from_be_bytes([a[at + 2], a[at + 3]]);
            let len = usize::from(u16::from_be_bytes([a[at + 10], a[at + 11]]));
            let data = &a[at + 12..at + 12 + len];
            out.push(match rtype {
                TYPE_A => IpAddr::from(<[u8; 4]>::try_from(data).unwrap()).to_string(),
                TYPE_AAAA => IpAddr::from(<[u8; 16]>::try_from(data).unwrap()).to_string(),
                _ => String::from_utf8_lossy(data).into_owned(),
            });
            at += 12 + len;
        }
        Some((a[3] & 0xf, out))
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
        assert_eq!(names, ["\u{2}db\u{4}blue\u{5}berth\u{5}local\u{0}"]);
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
        let red = Arc::new(Zone::new(
            "red",
            "berth.local",
            vec!["10.92.0.0/24".parse().unwrap()],
            false,
        ));
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
        assert_eq!(names, ["\u{3}new\u{4}blue\u{5}berth\u{5}local\u{0}"]);
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
}
