//! The agent's side of service discovery: which networks berth's DNS serves, which names it
//! knows, and the resolv.conf of berth sandboxes. The server itself is `berth-dns`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use berth_dns::{Dns, NetworkDns as Served, SrvPort};
use berth_model::{Endpoint, Network, NetworkDns, Service};

use crate::{Agent, Result};

/// Service discovery as configured for the daemon.
pub struct Discovery {
    pub dns: Dns,
    /// Where berth sandboxes' resolv.conf files go: `DIR/SANDBOX/resolv.conf`, which
    /// `ip netns exec SANDBOX` mounts over `/etc/resolv.conf` when DIR is `/etc/netns`.
    pub sandbox_etc_dir: PathBuf,
    /// Held while a sandbox's resolv.conf is read from the store and written.
    pub resolv_conf_writes: tokio::sync::Mutex<()>,
    /// The services named on each network, by network and name: a network served anew
    /// (its first endpoint here) gets them too.
    services: std::sync::Mutex<HashMap<String, HashMap<String, Service>>>,
}

impl Discovery {
    pub fn new(dns: Dns, sandbox_etc_dir: PathBuf) -> Discovery {
        Discovery {
            dns,
            sandbox_etc_dir,
            resolv_conf_writes: tokio::sync::Mutex::new(()),
            services: Default::default(),
        }
    }
}

/// The names an endpoint answers to: its name first (the one PTR answers give), then aliases.
fn names_of(ep: &Endpoint) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in ep.name.iter().chain(&ep.aliases) {
        if !names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
            names.push(n.clone());
        }
    }
    names
}

fn set_service(dns: &Dns, svc: &Service) {
    let ports: Vec<SrvPort> = svc
        .ports
        .iter()
        .filter_map(|p| {
            Some(SrvPort {
                name: p.name?.to_string(),
                protocol: p.protocol.to_string(),
                port: p.port,
            })
        })
        .collect();
    dns.set_service(&svc.network, &svc.name, &svc.vips, &ports);
}

fn addresses_of(ep: &Endpoint) -> Vec<IpAddr> {
    ep.ips.iter().map(|ip| ip.addr()).collect()
}

impl Agent {
    /// How containers reach DNS on a network, for API answers; `None` when DNS is off.
    pub fn network_dns(&self, net: &Network) -> Option<NetworkDns> {
        let d = self.discovery.as_ref()?;
        Some(NetworkDns {
            nameservers: net.subnets.iter().map(|s| s.gateway).collect(),
            domain: d.dns.domain(&net.name),
        })
    }

    /// Where DNS listens on a network (for the firewall's untracked set).
    pub(crate) fn dns_addresses(&self, net: &Network) -> Vec<std::net::SocketAddr> {
        let Some(d) = &self.discovery else {
            return Vec::new();
        };
        net.subnets
            .iter()
            .map(|s| std::net::SocketAddr::new(s.gateway, d.dns.port()))
            .collect()
    }

    /// A network as the API shows it: with its DNS.
    pub fn present(&self, mut net: Network) -> Network {
        net.dns = self.network_dns(&net);
        net
    }

    /// Starts answering on a network's gateways. A failure to listen is logged, not fatal:
    /// the network works without names.
    pub(crate) fn serve_dns(&self, net: &Network) {
        let Some(d) = &self.discovery else { return };
        let served = Served {
            name: net.name.clone(),
            subnets: net.subnets.iter().map(|s| s.cidr).collect(),
            listen: net.subnets.iter().map(|s| s.gateway).collect(),
            internal: net.internal,
        };
        if let Err(e) = d.dns.serve_network(&served) {
            tracing::warn!(network = %net.name, error = %e, "no DNS on this network");
        }
        let services = d.services.lock().expect("dns services lock");
        for svc in services.get(&net.name).into_iter().flat_map(|s| s.values()) {
            set_service(&d.dns, svc);
        }
    }

    /// Names a service's VIPs (and its named ports' SRV records) on its network.
    pub(crate) fn name_service(&self, svc: &Service) {
        let Some(d) = &self.discovery else { return };
        let mut services = d.services.lock().expect("dns services lock");
        set_service(&d.dns, svc);
        services
            .entry(svc.network.clone())
            .or_default()
            .insert(svc.name.clone(), svc.clone());
    }

    pub(crate) fn unname_service(&self, network: &str, name: &str) {
        let Some(d) = &self.discovery else { return };
        let mut services = d.services.lock().expect("dns services lock");
        d.dns.remove_service(network, name);
        if let Some(s) = services.get_mut(network) {
            s.remove(name);
        }
    }

    pub(crate) fn stop_dns(&self, network: &str) {
        if let Some(d) = &self.discovery {
            d.dns.stop_network(network);
        }
    }

    /// Serves every network and knows every endpoint (at start).
    pub(crate) async fn load_dns(&self) -> Result<()> {
        if self.discovery.is_none() {
            return Ok(());
        }
        // Remote endpoints are named by the cluster reconciler, as their hosts come and go.
        let local = self.local_endpoints().await?;
        for net in self.networks_here(self.networks().await?, &local) {
            self.serve_dns(&net);
        }
        for ep in &local {
            self.name_endpoint(ep);
        }
        Ok(())
    }

    pub(crate) fn name_endpoint(&self, ep: &Endpoint) {
        if let Some(d) = &self.discovery {
            d.dns.set_endpoint(
                &ep.network,
                &ep.id,
                &names_of(ep),
                &addresses_of(ep),
                &ep.netns.id,
            );
        }
    }

    /// Names a freshly attached endpoint (the caller then checks that it still exists).
    pub(crate) fn name_endpoint_of(&self, net: &Network, ep: &Endpoint) {
        // Listening failed at network creation (e.g. the address was still held): retry.
        self.serve_dns(net);
        self.name_endpoint(ep);
    }

    pub(crate) fn unname_endpoint(&self, ep: &Endpoint) {
        if let Some(d) = &self.discovery {
            d.dns.remove_endpoint(&ep.network, &ep.id);
        }
    }

    /// Rewrites a berth sandbox's resolv.conf from the networks it is attached to now:
    /// their gateways as nameservers (IPv4 first, at most three, as resolvers read no more),
    /// their domains as the search list. No networks: the file goes.
    pub(crate) async fn write_sandbox_resolv_conf(&self, sandbox: &str, netns_id: &str) {
        self.write_resolv_conf_knowing(sandbox, netns_id, None)
            .await
    }

    /// [`Agent::write_sandbox_resolv_conf`], with an endpoint and its network the caller has
    /// just read (an attach): not read again, which on etcd saves two round trips.
    pub(crate) async fn write_resolv_conf_knowing(
        &self,
        sandbox: &str,
        netns_id: &str,
        known: Option<(&Endpoint, &Network)>,
    ) {
        let Some(d) = &self.discovery else { return };
        // One writer at a time: each writes what the store says after the previous one.
        let _writing = d.resolv_conf_writes.lock().await;
        let dir = d.sandbox_etc_dir.join(sandbox);
        let eps = match self
            .endpoints_in_knowing(netns_id, known.map(|(ep, _)| ep))
            .await
        {
            Ok(eps) => eps,
            Err(e) => {
                tracing::warn!(sandbox, error = %e, "cannot list the sandbox's endpoints");
                return;
            }
        };
        let mut nameservers: Vec<IpAddr> = Vec::new();
        let mut search: Vec<String> = Vec::new();
        for ep in &eps {
            let net = match known {
                Some((_, net)) if net.name == ep.network => net.clone(),
                _ => match self.network(&ep.network).await {
                    Ok(net) => net,
                    Err(_) => continue,
                },
            };
            for s in &net.subnets {
                if ep.ips.iter().any(|ip| s.cidr.contains(&ip.addr()))
                    && !nameservers.contains(&s.gateway)
                {
                    nameservers.push(s.gateway);
                }
            }
            let domain = d.dns.domain(&net.name);
            if !search.contains(&domain) {
                search.push(domain);
            }
        }
        nameservers.sort_by_key(|ip| ip.is_ipv6());
        let written = if nameservers.is_empty() {
            remove_resolv_conf(&dir)
        } else {
            write_resolv_conf(&dir, sandbox, &nameservers, &search)
        };
        if let Err(e) = written {
            tracing::warn!(sandbox, dir = %dir.display(), error = %e, "cannot write the sandbox's resolv.conf");
        }
    }

    /// Removes a sandbox's resolv.conf (the sandbox is going).
    pub(crate) fn remove_sandbox_resolv_conf(&self, sandbox: &str) {
        if let Some(d) = &self.discovery {
            let _ = remove_resolv_conf(&d.sandbox_etc_dir.join(sandbox));
        }
    }
}

fn write_resolv_conf(
    dir: &Path,
    sandbox: &str,
    nameservers: &[IpAddr],
    search: &[String],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = format!("# written by berth for sandbox {sandbox}\n");
    for ns in nameservers.iter().take(3) {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    text.push_str(&format!("search {}\n", search.join(" ")));
    // Write and rename: a resolver reading the file never sees half of it.
    let tmp = dir.join(".resolv.conf.berth");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("resolv.conf"))
}

/// Removes berth's resolv.conf and the directory if nothing else is in it.
fn remove_resolv_conf(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join("resolv.conf")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_written_whole_and_removed_with_its_dir() {
        let tmp = std::env::temp_dir().join(format!("berth-resolv-{}", std::process::id()));
        let dir = tmp.join("web");
        let ns: Vec<IpAddr> = vec!["10.1.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        write_resolv_conf(&dir, "web", &ns, &["blue.berth.local".into()]).unwrap();
        let text = std::fs::read_to_string(dir.join("resolv.conf")).unwrap();
        assert_eq!(
            text,
            "# written by berth for sandbox web\nnameserver 10.1.0.1\nnameserver fd00::1\nsearch blue.berth.local\n"
        );
        assert!(!dir.join(".resolv.conf.berth").exists());
        remove_resolv_conf(&dir).unwrap();
        assert!(!dir.exists());
        remove_resolv_conf(&dir).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
