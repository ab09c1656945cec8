//! The ADD result, in the shape of the requested CNI version.

use berth_api::{Endpoint, Network};
use serde_json::{Value, json};

pub fn add_result(version: &str, ep: &Endpoint, net: &Network, netns: &str) -> Value {
    let legacy = version == "0.4.0";
    let ips: Vec<Value> = ep
        .ips
        .iter()
        .map(|ip| {
            let gateway = net.subnet_for(ip.addr()).map(|s| s.gateway.to_string());
            let mut v = json!({ "address": ip.to_string(), "interface": 1 });
            if let Some(gw) = gateway {
                v["gateway"] = json!(gw);
            }
            if legacy {
                v["version"] = json!(if ip.addr().is_ipv4() { "4" } else { "6" });
            }
            v
        })
        .collect();
    let routes: Vec<Value> = net
        .subnets
        .iter()
        // Only the default routes berth installed: a container on several networks has its
        // default route through one of them.
        .filter(|s| ep.default_gateways.contains(&s.gateway))
        .map(|s| {
            let dst = if s.gateway.is_ipv4() {
                "0.0.0.0/0"
            } else {
                "::/0"
            };
            json!({ "dst": dst, "gw": s.gateway.to_string() })
        })
        .collect();
    let mut sandbox_if = json!({ "name": ep.ifname, "mac": ep.mac.to_string(), "sandbox": netns });
    if version == "1.1.0" {
        sandbox_if["mtu"] = json!(net.mtu);
    }
    json!({
        "cniVersion": version,
        "interfaces": [ { "name": ep.host_ifname }, sandbox_if ],
        "ips": ips,
        "routes": routes,
        "dns": dns(ep, net),
    })
}

/// berth's DNS on the gateways of the subnets the endpoint has addresses in, and the
/// network's domain to search; empty when the daemon serves no DNS.
fn dns(ep: &Endpoint, net: &Network) -> Value {
    let Some(d) = &net.dns else {
        return json!({});
    };
    let nameservers: Vec<String> = d
        .nameservers
        .iter()
        .filter(|ns| {
            net.subnet_for(**ns)
                .is_some_and(|s| ep.ips.iter().any(|ip| s.cidr.contains(&ip.addr())))
        })
        .map(|ns| ns.to_string())
        .collect();
    json!({ "nameservers": nameservers, "search": [d.domain] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::{MacAddr, NetnsRef, NetworkDns, Subnet};

    fn fixture() -> (Endpoint, Network) {
        let net = Network {
            id: "0123456789abcdef".into(),
            name: "blue".into(),
            subnets: vec![
                Subnet {
                    cidr: "10.91.0.0/24".parse().unwrap(),
                    gateway: "10.91.0.1".parse().unwrap(),
                },
                Subnet {
                    cidr: "fd00:91::/64".parse().unwrap(),
                    gateway: "fd00:91::1".parse().unwrap(),
                },
            ],
            mtu: 1400,
            internal: false,
            bridge: "berth-012345678".into(),
            dns: Some(NetworkDns {
                nameservers: vec!["10.91.0.1".parse().unwrap(), "fd00:91::1".parse().unwrap()],
                domain: "blue.berth.local".into(),
            }),
            docker_networks: vec![],
            driver: Default::default(),
            vni: None,
            host: None,
            blocks: vec![],
            removing: false,
        };
        let ep = Endpoint {
            id: "aa".into(),
            network: "blue".into(),
            netns: NetnsRef {
                path: "/run/netns/x".into(),
                id: "1:2".into(),
                sandbox: None,
            },
            ifname: "eth0".into(),
            host_ifname: "berthaa".into(),
            name: None,
            aliases: vec![],
            container_id: Some("c1".into()),
            runtime_configured: false,
            mac: MacAddr([2, 0x42, 10, 91, 0, 2]),
            ips: vec![
                "10.91.0.2/24".parse().unwrap(),
                "fd00:91::2/64".parse().unwrap(),
            ],
            ports: vec![],
            default_gateways: vec!["10.91.0.1".parse().unwrap(), "fd00:91::1".parse().unwrap()],
            host: None,
            labels: Default::default(),
            named_ports: vec![],
        };
        (ep, net)
    }

    #[test]
    fn shapes_per_version() {
        let (ep, net) = fixture();
        let r = add_result("1.1.0", &ep, &net, "/run/netns/x");
        assert_eq!(
            r["interfaces"][1],
            json!({"name":"eth0","mac":"02:42:0a:5b:00:02","sandbox":"/run/netns/x","mtu":1400})
        );
        assert_eq!(
            r["ips"][0],
            json!({"address":"10.91.0.2/24","gateway":"10.91.0.1","interface":1})
        );
        assert_eq!(
            r["routes"],
            json!([{"dst":"0.0.0.0/0","gw":"10.91.0.1"},{"dst":"::/0","gw":"fd00:91::1"}])
        );
        assert_eq!(
            r["dns"],
            json!({"nameservers":["10.91.0.1","fd00:91::1"],"search":["blue.berth.local"]})
        );
        let old = add_result("0.4.0", &ep, &net, "/run/netns/x");
        assert_eq!(old["ips"][1]["version"], "6");
        assert!(old["interfaces"][1].get("mtu").is_none());
        assert!(
            add_result("1.0.0", &ep, &net, "/x")["ips"][0]
                .get("version")
                .is_none()
        );
    }

    #[test]
    fn dns_only_on_the_endpoints_families_and_empty_without_dns() {
        let (mut ep, mut net) = fixture();
        ep.ips.truncate(1);
        let r = add_result("1.1.0", &ep, &net, "/x");
        assert_eq!(r["dns"]["nameservers"], json!(["10.91.0.1"]));
        net.dns = None;
        assert_eq!(add_result("1.1.0", &ep, &net, "/x")["dns"], json!({}));
    }

    #[test]
    fn routes_only_where_the_endpoint_holds_the_default_route() {
        let (mut ep, net) = fixture();
        ep.default_gateways = vec!["fd00:91::1".parse().unwrap()];
        let r = add_result("1.1.0", &ep, &net, "/x");
        assert_eq!(r["routes"], json!([{"dst":"::/0","gw":"fd00:91::1"}]));
        ep.default_gateways.clear();
        assert_eq!(add_result("1.1.0", &ep, &net, "/x")["routes"], json!([]));
    }
}
