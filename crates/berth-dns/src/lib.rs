//! Service discovery: one DNS server per network, listening on the network's gateway
//! addresses, answering for the endpoints attached to that network and forwarding everything
//! else to the host's resolvers. A network's services answer to their names too, with their
//! virtual IPs, and their named ports with SRV records.
//!
//! A query is answered for the network whose address it arrived at and for the other networks
//! of the sender's namespace, so a name is visible exactly to the clients that share a network
//! with its endpoint. The agent keeps the zones up to date as it attaches and detaches; answers
//! carry TTL 0, so the next query sees the change.

mod batch;
mod limits;
mod server;
mod upstream;
pub mod wire;
mod zone;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;

pub use zone::{Resolution, SrvPort, Zone};

/// The suffix of qualified names when none is configured: `NAME.NETWORK.berth.local`.
pub const DEFAULT_SUFFIX: &str = "berth.local";
/// Queries a second one client gets answered when none is configured (as many at once, and
/// as many again refused): far above what a container's resolver sends, far below what the
/// server answers, so that one client's flood leaves the others their answers.
pub const DEFAULT_CLIENT_QPS: u32 = 5_000;
/// The most `client_qps` may be.
pub const MAX_CLIENT_QPS: u32 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS suffix {0:?}: dot-separated labels of letters, digits and '-'")]
    InvalidSuffix(String),
    #[error("invalid DNS client rate {0}: 1 to {MAX_CLIENT_QPS} queries a second")]
    InvalidClientRate(u32),
    #[error("cannot serve DNS on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Qualified names are `NAME.NETWORK.SUFFIX`.
    pub suffix: String,
    pub port: u16,
    /// Where the upstream nameservers are read from (the daemon's `/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
    /// Queries a second each client gets answered, UDP and TCP together.
    pub client_qps: u32,
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), DnsError> {
        let s = self.suffix.trim_end_matches('.');
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if s.is_empty() || s.len() > 200 || !s.split('.').all(label_ok) {
            return Err(DnsError::InvalidSuffix(self.suffix.clone()));
        }
        if !(1..=MAX_CLIENT_QPS).contains(&self.client_qps) {
            return Err(DnsError::InvalidClientRate(self.client_qps));
        }
        Ok(())
    }
}

/// The DNS service of one daemon: a zone and listeners per network.
#[derive(Clone)]
pub struct Dns {
    shared: Arc<server::Shared>,
}

/// One network as DNS serves it.
#[derive(Debug, Clone)]
pub struct NetworkDns {
    pub name: String,
    pub subnets: Vec<IpNet>,
    /// The addresses to listen on (the gateways).
    pub listen: Vec<IpAddr>,
    pub internal: bool,
}

impl Dns {
    pub fn new(cfg: DnsConfig) -> Result<Dns, DnsError> {
        cfg.validate()?;
        Ok(Dns {
            shared: Arc::new(server::Shared::new(cfg)),
        })
    }

    pub fn suffix(&self) -> &str {
        self.shared.cfg.suffix.trim_end_matches('.')
    }

    pub fn port(&self) -> u16 {
        self.shared.cfg.port
    }

    /// The search domain of a network: `NETWORK.SUFFIX`.
    pub fn domain(&self, network: &str) -> String {
        format!("{network}.{}", self.suffix()).to_ascii_lowercase()
    }

    /// Starts serving a network (idempotent). Listeners are bound with `IP_FREEBIND`, so
    /// they work before the bridge has its address and across its re-creation.
    pub fn serve_network(&self, net: &NetworkDns) -> Result<(), DnsError> {
        server::serve_network(&self.shared, net)
    }

    /// Stops serving a network and forgets its names.
    pub fn stop_network(&self, name: &str) {
        server::stop_network(&self.shared, name);
    }

    /// Records an endpoint's names (primary first) and addresses on its network, and which
    /// namespace it is in (a client's namespace decides which networks' names it sees);
    /// replaces an earlier record of the same endpoint.
    pub fn set_endpoint(
        &self,
        network: &str,
        id: &str,
        names: &[String],
        ips: &[IpAddr],
        netns: &str,
    ) {
        if let Some(z) = self.zone(network) {
            z.set_endpoint(id, names, ips);
        }
        let mut clients = self.shared.clients.write().expect("clients lock");
        clients.remove(id);
        clients.add(id, network, netns, ips);
    }

    pub fn remove_endpoint(&self, network: &str, id: &str) {
        if let Some(z) = self.zone(network) {
            z.remove_endpoint(id);
        }
        self.shared
            .clients
            .write()
            .expect("clients lock")
            .remove(id);
    }

    /// Records a service on its network: its name answers with the VIPs (ahead of endpoints of
    /// that name), its named ports with SRV records; replaces an earlier record of it.
    pub fn set_service(&self, network: &str, name: &str, vips: &[IpAddr], ports: &[SrvPort]) {
        if let Some(z) = self.zone(network) {
            z.set_service(name, vips, ports);
        }
    }

    pub fn remove_service(&self, network: &str, name: &str) {
        if let Some(z) = self.zone(network) {
            z.remove_service(name);
        }
    }

    fn zone(&self, network: &str) -> Option<Arc<Zone>> {
        let nets = self.shared.networks.lock().expect("networks lock");
        nets.get(network).map(|s| s.zone.clone())
    }
}

/// Which namespace each endpoint address belongs to, and the networks of each namespace: a
/// query is answered for the networks its sender is on.
#[derive(Default)]
pub(crate) struct Clients {
    netns_of: HashMap<IpAddr, String>,
    /// Namespace → (endpoint id, network) of each of its endpoints.
    endpoints_of: HashMap<String, Vec<(String, String)>>,
    /// Endpoint id → its namespace and addresses.
    endpoint: HashMap<String, (String, Vec<IpAddr>)>,
}

impl Clients {
    fn add(&mut self, id: &str, network: &str, netns: &str, ips: &[IpAddr]) {
        for ip in ips {
            self.netns_of.insert(*ip, netns.to_string());
        }
        self.endpoints_of
            .entry(netns.to_string())
            .or_default()
            .push((id.to_string(), network.to_string()));
        self.endpoint
            .insert(id.to_string(), (netns.to_string(), ips.to_vec()));
    }

    fn remove(&mut self, id: &str) {
        let Some((netns, ips)) = self.endpoint.remove(id) else {
            return;
        };
        for ip in ips {
            if self.netns_of.get(&ip) == Some(&netns) {
                self.netns_of.remove(&ip);
            }
        }
        if let Some(eps) = self.endpoints_of.get_mut(&netns) {
            eps.retain(|(e, _)| e != id);
            if eps.is_empty() {
                self.endpoints_of.remove(&netns);
            }
        }
    }

    /// Who a query from `ip` counts against.
    pub(crate) fn client(&self, ip: IpAddr) -> limits::Client {
        if self.netns_of.contains_key(&ip) {
            limits::Client::Endpoint(ip)
        } else {
            limits::Client::Stranger
        }
    }

    /// The networks of the namespace that holds `ip`.
    pub(crate) fn networks_of(&self, ip: IpAddr) -> Vec<String> {
        let Some(netns) = self.netns_of.get(&ip) else {
            return Vec::new();
        };
        self.endpoints_of
            .get(netns)
            .map(|eps| eps.iter().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default()
    }
}

/// What the server does with one message: the whole packet path short of the sockets, so it
/// can be fuzzed.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Reply(Vec<u8>),
    Forward,
    Ignore,
}

/// Reads a query and answers it from `zone` (and the zones `others` gives, see
/// [`Zone::resolve`]), or says to forward it.
pub fn respond(zone: &Zone, msg: &[u8], tcp: bool, others: &dyn Fn() -> Vec<Arc<Zone>>) -> Step {
    match wire::parse_query(msg) {
        Err(wire::Rejected::Drop) => Step::Ignore,
        Err(wire::Rejected::Code { header, rcode }) => {
            Step::Reply(wire::bare_answer(header, rcode))
        }
        Ok(q) => {
            let limit = if tcp {
                usize::from(u16::MAX)
            } else {
                q.udp_limit()
            };
            match zone.resolve(&q, limit, others) {
                Resolution::Answer(a) => Step::Reply(a),
                Resolution::Forward => Step::Forward,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zone() -> Zone {
        let z = Zone::new(
            "blue",
            DEFAULT_SUFFIX,
            vec!["10.91.0.0/24".parse().unwrap()],
            false,
        );
        z.set_endpoint("e1", &["web".into()], &["10.91.0.2".parse().unwrap()]);
        let http = SrvPort {
            name: "http".into(),
            protocol: "tcp".into(),
            port: 80,
        };
        z.set_service("api", &["10.211.0.7".parse().unwrap()], &[http]);
        z
    }

    #[test]
    fn suffixes() {
        let cfg = |s: &str| DnsConfig {
            suffix: s.into(),
            port: 53,
            resolv_conf: "/etc/resolv.conf".into(),
            client_qps: DEFAULT_CLIENT_QPS,
        };
        assert!(cfg("berth.local").validate().is_ok());
        assert!(cfg("cluster.local.").validate().is_ok());
        for bad in ["", ".", "a..b", "-a.b", "a_b", "a b"] {
            assert!(cfg(bad).validate().is_err(), "{bad:?}");
        }
        for (qps, ok) in [
            (0, false),
            (1, true),
            (MAX_CLIENT_QPS, true),
            (MAX_CLIENT_QPS + 1, false),
        ] {
            let c = DnsConfig {
                client_qps: qps,
                ..cfg("berth.local")
            };
            assert_eq!(c.validate().is_ok(), ok, "{qps}");
        }
    }

    proptest! {
        /// Any bytes: no panic, and an answer (if any) is a well-formed response header with
        /// the query's ID.
        #[test]
        fn random_messages_never_panic(msg in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Step::Reply(r) = respond(&zone(), &msg, false, &Vec::new) {
                prop_assert!(r.len() >= 12 && r.len() <= 512);
                prop_assert_eq!(&r[..2], &msg[..2]);
                prop_assert_ne!(r[2] & 0x80, 0);
            }
        }

        /// Valid queries with one byte changed: the same, and the answer fits the limit.
        #[test]
        fn mutated_queries_never_panic(
            name in prop_oneof![
                Just("_http._tcp.api".to_string()),
                "(_[a-z]{1,5}\\.){0,2}[a-z]{1,10}(\\.[a-z]{1,10}){0,3}",
            ],
            qtype in prop_oneof![Just(1u16), Just(12), Just(28), Just(33), Just(255), any::<u16>()],
            edns in any::<bool>(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut msg = wire::tests::query(1, &name, qtype, edns);
            let i = at.index(msg.len());
            msg[i] = byte;
            for tcp in [false, true] {
                if let Step::Reply(r) = respond(&zone(), &msg, tcp, &Vec::new) {
                    prop_assert!(r.len() >= 12);
                    prop_assert!(tcp || r.len() <= 1232);
                }
            }
        }
    }
}
