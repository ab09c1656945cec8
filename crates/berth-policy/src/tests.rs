//! Kubernetes NetworkPolicy's cases on hand-made worlds, and properties on random ones: the
//! compiled profiles agree with a direct reading of the policies, `explain` agrees with the
//! profiles, and the program kept up to date change by change holds what one built from
//! scratch holds, its changes taking the kernel from the one to the next.

use std::collections::BTreeMap;
use std::net::IpAddr;

use berth_model::{
    Endpoint, Labels, MacAddr, NamedPort, NetnsRef, Peer, Policy, PolicyPort, PolicyRule, PortRef,
    Protocol, Selector,
};
use ipnet::IpNet;
use proptest::prelude::*;

use crate::*;

const ME: &str = "me";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(s: &str) -> Labels {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// An endpoint of `network` on `host` (`None`: the store's own host) with these addresses and
/// labels (`app=web,tier=front`).
fn endpoint(id: &str, network: &str, host: Option<&str>, ips: &[&str], labels_: &str) -> Endpoint {
    Endpoint {
        id: id.into(),
        network: network.into(),
        netns: NetnsRef {
            path: format!("/run/berth/netns/{id}"),
            id: "4:4026532000".into(),
            sandbox: None,
        },
        ifname: "eth0".into(),
        host_ifname: format!("bv-{id}"),
        name: Some(format!("{id}-name")),
        aliases: vec![],
        container_id: None,
        runtime_configured: false,
        mac: MacAddr([2, 0, 0, 0, 0, 1]),
        ips: ips
            .iter()
            .map(|s| {
                let a = ip(s);
                IpNet::new(a, if a.is_ipv4() { 24 } else { 64 }).unwrap()
            })
            .collect(),
        ports: vec![],
        default_gateways: vec![],
        host: host.map(Into::into),
        labels: labels(labels_),
        named_ports: vec![],
    }
}

fn named(ep: Endpoint, ports: &[(&str, Protocol, u16)]) -> Endpoint {
    Endpoint {
        named_ports: ports
            .iter()
            .map(|&(name, protocol, port)| NamedPort {
                name: name.parse().unwrap(),
                protocol,
                port,
            })
            .collect(),
        ..ep
    }
}

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

/// A policy on network "blue"; `Some` rules isolate their direction.
fn policy(
    name: &str,
    selector: &str,
    ingress: Option<Vec<PolicyRule>>,
    egress: Option<Vec<PolicyRule>>,
) -> Policy {
    Policy {
        name: name.into(),
        network: "blue".into(),
        selector: sel(selector),
        ingress_isolated: ingress.is_some(),
        egress_isolated: egress.is_some(),
        ingress: ingress.unwrap_or_default(),
        egress: egress.unwrap_or_default(),
        gateway_dns: true,
    }
}

fn rule(peers: Vec<Peer>, ports: Vec<PolicyPort>) -> PolicyRule {
    PolicyRule { peers, ports }
}

fn peers(s: &str) -> Peer {
    Peer::Endpoints(sel(s))
}

fn cidr(net: &str, except: &[&str]) -> Peer {
    Peer::Cidr {
        cidr: net.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    }
}

fn port(protocol: Protocol, first: u16, last: Option<u16>) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(PortRef::Number(first)),
        end_port: last,
    }
}

fn tcp(n: u16) -> PolicyPort {
    port(Protocol::Tcp, n, None)
}

fn named_port(protocol: Protocol, name: &str) -> PolicyPort {
    PolicyPort {
        protocol,
        port: Some(PortRef::Named(name.parse().unwrap())),
        end_port: None,
    }
}

/// Network "blue" (gateways 10.0.0.1 and fd00::1) with local web1, db and cache, remote web2.
fn world() -> PolicyIndex {
    let mut ix = PolicyIndex::new(ME);
    ix.put_network("blue", vec![ip("10.0.0.1"), ip("fd00::1")]);
    ix.put_endpoint(endpoint(
        "web1",
        "blue",
        Some(ME),
        &["10.0.0.10", "fd00::10"],
        "app=web,tier=front",
    ));
    ix.put_endpoint(endpoint(
        "web2",
        "blue",
        Some("h2"),
        &["10.0.0.11"],
        "app=web",
    ));
    ix.put_endpoint(named(
        endpoint(
            "db",
            "blue",
            None,
            &["10.0.0.20", "fd00::20"],
            "app=db,tier=back",
        ),
        &[
            ("postgres", Protocol::Tcp, 5432),
            ("metrics", Protocol::Tcp, 9187),
        ],
    ));
    ix.put_endpoint(named(
        endpoint(
            "cache",
            "blue",
            Some(ME),
            &["10.0.0.30"],
            "app=cache,tier=back",
        ),
        &[
            ("metrics", Protocol::Tcp, 9121),
            ("postgres", Protocol::Udp, 5432),
        ],
    ));
    ix
}

fn party(s: &str) -> Party {
    match s.parse() {
        Ok(a) => Party::Address(a),
        Err(_) => Party::Endpoint(s.into()),
    }
}

/// Whether `src` may open a connection to `dst` on `port` (`None`: ICMP).
fn ok(ix: &PolicyIndex, src: &str, dst: &str, port: Option<(Protocol, u16)>) -> bool {
    ix.explain(&party(src), &party(dst), port).allowed
}

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

/// The profile that judges endpoint `id` in `direction`.
fn profile(ix: &PolicyIndex, id: &str, direction: Direction) -> Profile {
    ix.profile_of(id, direction).expect("isolated")
}

/// A profile's port ranges with the peers each lets through.
fn port_peers(p: &Profile) -> Vec<((Protocol, u16, u16), Vec<AddrRange>)> {
    p.ports
        .iter()
        .map(|&(protocol, lo, hi, class)| {
            let peers = p
                .classes
                .iter()
                .find(|(c, _)| *c == class)
                .map(|(_, peers)| peers.clone())
                .unwrap_or_default();
            ((protocol, lo, hi), peers)
        })
        .collect()
}

fn range(first: &str, last: &str) -> AddrRange {
    AddrRange {
        first: ip(first),
        last: ip(last),
    }
}

#[test]
fn without_policies_everything_is_allowed() {
    let ix = world();
    assert!(ix.profile_of("db", Direction::Ingress).is_none());
    assert!(ix.profile_of("db", Direction::Egress).is_none());
    assert!(ok(&ix, "web1", "db", Some((TCP, 1))));
    assert!(ok(&ix, "192.0.2.1", "cache", None));
    let e = ix.explain(&party("web1"), &party("db"), None);
    assert_eq!(e.egress.endpoint.as_deref(), Some("web1"));
    assert!(e.egress.isolated_by.is_empty() && e.egress.allowed_by.is_empty());
}

#[test]
fn ingress_only() {
    let mut ix = world();
    let changed = ix.put_policy(policy(
        "db-allow-web",
        "app=db",
        Some(vec![rule(vec![peers("app=web")], vec![tcp(5432)])]),
        None,
    ));
    assert_eq!(changed.endpoints, ["db".to_string()].into());
    assert_eq!(changed.policies, ["db-allow-web".to_string()].into());
    assert!(ok(&ix, "web1", "db", Some((TCP, 5432))));
    assert!(
        ok(&ix, "10.0.0.11", "db", Some((TCP, 5432))),
        "web2, remote"
    );
    assert!(!ok(&ix, "web1", "db", Some((TCP, 80))));
    assert!(!ok(&ix, "web1", "db", Some((UDP, 5432))));
    assert!(!ok(&ix, "web1", "db", None));
    assert!(!ok(&ix, "cache", "db", Some((TCP, 5432))));
    assert!(!ok(&ix, "192.0.2.1", "db", Some((TCP, 5432))));
    // db's egress and everyone else's ingress stay open.
    assert!(ok(&ix, "db", "cache", Some((TCP, 80))));
    assert!(ok(&ix, "db", "192.0.2.1", None));

    let e = ix.explain(&party("web1"), &party("db"), Some((TCP, 5432)));
    assert_eq!(e.ingress.isolated_by, ["db-allow-web"]);
    assert_eq!(e.ingress.allowed_by, ["db-allow-web (ingress rule 1)"]);
    assert!(e.egress.isolated_by.is_empty());
    assert_eq!(e.source, Some(ip("10.0.0.10")));

    // web1 and web2 are adjacent addresses: one range. Over IPv6 only web1 has an address.
    // One class (TCP 5432) for both families.
    let p = profile(&ix, "db", Direction::Ingress);
    assert!(p.any.is_empty());
    assert_eq!(
        port_peers(&p),
        [(
            (TCP, 5432, 5432),
            vec![
                range("10.0.0.10", "10.0.0.11"),
                range("fd00::10", "fd00::10")
            ]
        )]
    );
    assert!(ix.profile_of("db", Direction::Egress).is_none());
}

#[test]
fn egress_only() {
    let mut ix = world();
    ix.put_policy(policy(
        "web-to-db",
        "app=web",
        None,
        Some(vec![rule(vec![peers("app=db")], vec![tcp(5432)])]),
    ));
    assert!(ok(&ix, "web1", "db", Some((TCP, 5432))));
    assert!(!ok(&ix, "web1", "db", Some((TCP, 80))));
    assert!(!ok(&ix, "web1", "cache", Some((TCP, 5432))));
    assert!(!ok(&ix, "web1", "192.0.2.1", Some((TCP, 443))));
    // Ingress stays open, and the gateway still answers DNS.
    assert!(ok(&ix, "cache", "web1", Some((TCP, 80))));
    assert!(ok(&ix, "web1", "10.0.0.1", Some((UDP, 53))));
    assert!(ok(&ix, "web1", "fd00::1", Some((TCP, 53))));
    assert!(!ok(&ix, "web1", "10.0.0.1", Some((TCP, 80))));
    let e = ix.explain(&party("web1"), &party("10.0.0.1"), Some((UDP, 53)));
    assert_eq!(e.egress.allowed_by, ["gateway DNS (default)"]);
    assert_eq!(e.ingress.endpoint, None);
}

#[test]
fn both_directions() {
    let mut ix = world();
    ix.put_policy(policy(
        "db",
        "app=db",
        Some(vec![rule(vec![peers("app=web")], vec![tcp(5432)])]),
        Some(vec![rule(vec![peers("app=cache")], vec![])]),
    ));
    assert!(ok(&ix, "web1", "db", Some((TCP, 5432))));
    assert!(!ok(&ix, "cache", "db", Some((TCP, 5432))));
    assert!(ok(&ix, "db", "cache", None));
    assert!(!ok(&ix, "db", "web1", Some((TCP, 80))));
    let e = ix.explain(&party("db"), &party("cache"), Some((TCP, 6379)));
    assert_eq!(e.egress.allowed_by, ["db (egress rule 1)"]);
}

#[test]
fn cidr_with_except() {
    let mut ix = world();
    ix.put_policy(policy(
        "from-outside",
        "app=cache",
        Some(vec![rule(
            vec![cidr("192.0.2.0/24", &["192.0.2.128/25", "192.0.2.0/30"])],
            vec![],
        )]),
        None,
    ));
    assert!(ok(&ix, "192.0.2.4", "cache", Some((TCP, 1))));
    assert!(ok(&ix, "192.0.2.127", "cache", None));
    assert!(!ok(&ix, "192.0.2.3", "cache", None));
    assert!(!ok(&ix, "192.0.2.128", "cache", None));
    assert!(!ok(&ix, "web1", "cache", None));
    let p = profile(&ix, "cache", Direction::Ingress);
    assert_eq!(p.any, [range("192.0.2.4", "192.0.2.127")]);
    assert!(p.classes.is_empty() && p.ports.is_empty());
}

#[test]
fn named_ports_resolve_on_the_target_for_ingress() {
    let mut ix = world();
    ix.put_policy(policy(
        "metrics",
        "tier=back",
        Some(vec![rule(
            vec![],
            vec![named_port(TCP, "metrics"), named_port(TCP, "postgres")],
        )]),
        None,
    ));
    assert!(ok(&ix, "web1", "db", Some((TCP, 9187))));
    assert!(ok(&ix, "web1", "db", Some((TCP, 5432))));
    assert!(!ok(&ix, "web1", "db", Some((TCP, 9121))));
    assert!(ok(&ix, "web1", "cache", Some((TCP, 9121))));
    assert!(!ok(&ix, "web1", "cache", Some((TCP, 9187))));
    // cache's "postgres" is UDP: the TCP name does not resolve there.
    assert!(!ok(&ix, "web1", "cache", Some((TCP, 5432))));
    assert!(!ok(&ix, "web1", "cache", Some((UDP, 5432))));
}

#[test]
fn named_ports_resolve_on_the_peer_for_egress() {
    for peer_list in [
        vec![],
        vec![cidr("10.0.0.0/8", &[])],
        vec![peers("tier=back")],
    ] {
        let mut ix = world();
        ix.put_policy(policy(
            "web-out",
            "app=web",
            None,
            Some(vec![rule(
                peer_list.clone(),
                vec![named_port(TCP, "metrics")],
            )]),
        ));
        assert!(ok(&ix, "web1", "db", Some((TCP, 9187))), "{peer_list:?}");
        assert!(!ok(&ix, "web1", "db", Some((TCP, 9121))), "{peer_list:?}");
        assert!(ok(&ix, "web1", "cache", Some((TCP, 9121))), "{peer_list:?}");
        assert!(
            !ok(&ix, "web1", "cache", Some((TCP, 9187))),
            "{peer_list:?}"
        );
        // Only endpoints name ports: an outside address matches no named port.
        assert!(
            !ok(&ix, "web1", "10.0.0.99", Some((TCP, 9187))),
            "{peer_list:?}"
        );
        // A new peer naming the port is reported as changing the policy.
        let changed = ix.put_endpoint(named(
            endpoint("new", "blue", Some("h2"), &["10.0.0.40"], "tier=back"),
            &[("metrics", TCP, 9100)],
        ));
        assert!(changed.policies.contains("web-out"), "{peer_list:?}");
        assert!(
            ok(&ix, "web1", "10.0.0.40", Some((TCP, 9100))),
            "{peer_list:?}"
        );
    }
}

#[test]
fn port_ranges_merge_across_policies() {
    let mut ix = world();
    ix.put_policy(policy(
        "a",
        "app=db",
        Some(vec![rule(
            vec![peers("app=web")],
            vec![port(TCP, 8000, Some(8080))],
        )]),
        None,
    ));
    ix.put_policy(policy(
        "b",
        "app=db",
        Some(vec![rule(
            vec![cidr("10.0.0.0/24", &[])],
            vec![port(TCP, 8050, Some(9000))],
        )]),
        None,
    ));
    assert!(ok(&ix, "web1", "db", Some((TCP, 8000))));
    assert!(ok(&ix, "web1", "db", Some((TCP, 9000))));
    assert!(!ok(&ix, "web1", "db", Some((TCP, 9001))));
    assert!(!ok(&ix, "cache", "db", Some((TCP, 8049))));
    assert!(ok(&ix, "cache", "db", Some((TCP, 8050))));
    let web = vec![
        range("10.0.0.10", "10.0.0.11"),
        range("fd00::10", "fd00::10"),
    ];
    assert_eq!(
        port_peers(&profile(&ix, "db", Direction::Ingress)),
        [
            ((TCP, 8000, 8049), web),
            (
                (TCP, 8050, 8080),
                vec![
                    range("10.0.0.0", "10.0.0.255"),
                    range("fd00::10", "fd00::10")
                ]
            ),
            ((TCP, 8081, 9000), vec![range("10.0.0.0", "10.0.0.255")]),
        ]
    );
    // A range ending before it starts allows nothing.
    ix.put_policy(policy(
        "c",
        "app=cache",
        Some(vec![rule(vec![], vec![port(TCP, 90, Some(80))])]),
        None,
    ));
    assert!(!ok(&ix, "web1", "cache", Some((TCP, 85))));
    assert!(!ok(&ix, "web1", "cache", Some((TCP, 90))));
}

#[test]
fn rules_without_ports_swallow_port_rules_of_the_same_peers() {
    let mut ix = world();
    ix.put_policy(policy(
        "db",
        "app=db",
        Some(vec![
            rule(vec![cidr("10.0.0.0/24", &[])], vec![tcp(80)]),
            rule(vec![peers("app=web")], vec![]),
        ]),
        None,
    ));
    let p = profile(&ix, "db", Direction::Ingress);
    assert_eq!(
        p.any,
        [
            range("10.0.0.10", "10.0.0.11"),
            range("fd00::10", "fd00::10")
        ]
    );
    assert_eq!(
        port_peers(&p),
        [(
            (TCP, 80, 80),
            vec![
                range("10.0.0.0", "10.0.0.9"),
                range("10.0.0.12", "10.0.0.255")
            ]
        )]
    );
    let e = ix.explain(&party("web1"), &party("db"), Some((TCP, 80)));
    assert_eq!(
        e.ingress.allowed_by,
        ["db (ingress rule 1)", "db (ingress rule 2)"]
    );
}

#[test]
fn match_expressions() {
    let mut ix = world();
    ix.put_policy(policy(
        "expr",
        "tier in (back,front),app notin (cache)",
        Some(vec![rule(vec![peers("tier,app!=db")], vec![])]),
        None,
    ));
    let selected: Vec<_> = ix
        .selected_by("expr")
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(selected, ["db", "web1"]);
    assert!(
        ok(&ix, "cache", "db", None),
        "cache has a tier and is not db"
    );
    assert!(ok(&ix, "web1", "db", None));
    assert!(!ok(&ix, "web2", "db", None), "web2 has no tier");
    assert!(!ok(&ix, "db", "web1", None), "db is excluded by app!=db");
    assert!(ok(&ix, "db", "cache", None), "cache is not selected");
}

#[test]
fn an_empty_selector_and_no_rules_deny_everything() {
    let mut ix = world();
    let changed = ix.put_policy(policy("deny-all", "", Some(vec![]), Some(vec![])));
    // web2 is remote: its elements are not this host's.
    assert_eq!(
        changed.endpoints,
        ["cache", "db", "web1"].map(String::from).into()
    );
    for (src, dst) in [
        ("web1", "db"),
        ("db", "cache"),
        ("web2", "web1"),
        ("192.0.2.1", "db"),
    ] {
        assert!(!ok(&ix, src, dst, None), "{src} -> {dst}");
        assert!(!ok(&ix, src, dst, Some((TCP, 80))), "{src} -> {dst}");
    }
    // DNS on the gateway stays open.
    assert!(ok(&ix, "db", "10.0.0.1", Some((UDP, 53))));
    // The same policy on another network selects nothing here.
    let mut other = policy("deny-other", "", Some(vec![]), None);
    other.network = "red".into();
    assert!(ix.put_policy(other).endpoints.is_empty());
}

#[test]
fn several_policies_add_up() {
    let mut ix = world();
    ix.put_policy(policy(
        "a",
        "app=db",
        Some(vec![rule(vec![peers("app=web")], vec![tcp(5432)])]),
        None,
    ));
    ix.put_policy(policy(
        "b",
        "tier=back",
        Some(vec![rule(vec![peers("app=cache")], vec![tcp(5432)])]),
        None,
    ));
    ix.put_policy(policy(
        "c",
        "tier=back",
        Some(vec![rule(vec![peers("app=web")], vec![tcp(9187)])]),
        None,
    ));
    assert!(ok(&ix, "web1", "db", Some((TCP, 5432))));
    assert!(ok(&ix, "cache", "db", Some((TCP, 5432))));
    assert!(ok(&ix, "web2", "db", Some((TCP, 9187))));
    assert!(!ok(&ix, "cache", "db", Some((TCP, 9187))));
    let e = ix.explain(&party("web1"), &party("db"), Some((TCP, 5432)));
    assert_eq!(e.ingress.isolated_by, ["a", "b", "c"]);
    assert_eq!(e.ingress.allowed_by, ["a (ingress rule 1)"]);
    // Removing one takes its part away, and reports the endpoints it selected.
    assert_eq!(ix.remove_policy("a").endpoints, ["db".to_string()].into());
    assert!(!ok(&ix, "web1", "db", Some((TCP, 5432))));
    assert!(ix.remove_policy("a").is_empty());
}

#[test]
fn rules_of_a_direction_a_policy_does_not_isolate_are_ignored() {
    let mut ix = world();
    let mut p = policy("in-only", "app=web", Some(vec![]), None);
    p.egress = vec![rule(vec![peers("app=db")], vec![tcp(5432)])];
    ix.put_policy(p);
    // Egress is not isolated: the egress rule restricts nothing.
    assert!(ok(&ix, "web1", "cache", Some((TCP, 80))));
    // Nor does it add to another policy's egress isolation.
    ix.put_policy(policy("out", "app=web", None, Some(vec![])));
    assert!(!ok(&ix, "web1", "db", Some((TCP, 5432))));
    let e = ix.explain(&party("web1"), &party("db"), Some((TCP, 5432)));
    assert_eq!(e.egress.isolated_by, ["out"]);
}

#[test]
fn ipv6() {
    let mut ix = world();
    ix.put_policy(policy(
        "v6",
        "app=db",
        Some(vec![rule(
            vec![
                cidr("fd00::/64", &["fd00::10/128"]),
                cidr("10.0.0.0/24", &[]),
            ],
            vec![tcp(5432)],
        )]),
        None,
    ));
    assert!(!ok(&ix, "fd00::10", "db", Some((TCP, 5432))), "excepted");
    assert!(ok(&ix, "fd00::11", "db", Some((TCP, 5432))));
    assert!(!ok(&ix, "fd01::11", "db", Some((TCP, 5432))));
    // web1 has both families: IPv4 is judged first, and IPv4 peers never reach IPv6 targets.
    let e = ix.explain(&party("web1"), &party("db"), Some((TCP, 5432)));
    assert!(e.allowed);
    assert_eq!(
        (e.source, e.destination),
        (Some(ip("10.0.0.10")), Some(ip("10.0.0.20")))
    );
    let p = profile(&ix, "db", Direction::Ingress);
    assert!(allows(Some(&p), ip("10.0.0.10"), 6, Some(5432)));
    assert!(!allows(Some(&p), ip("fd00::10"), 6, Some(5432)));
    assert!(allows(Some(&p), ip("fd00::11"), 6, Some(5432)));
    for peers in p.classes.iter().flat_map(|(_, peers)| peers) {
        assert_eq!(peers.first.is_ipv4(), peers.last.is_ipv4(), "{peers:?}");
    }
    // No common family: nothing to connect.
    let e = ix.explain(&party("cache"), &party("fd00::20"), None);
    assert!(!e.allowed && e.source.is_none());
}

#[test]
fn gateway_dns_unless_a_policy_says_no() {
    let mut ix = world();
    ix.put_policy(policy("out", "app=web", None, Some(vec![])));
    assert!(ok(&ix, "web1", "10.0.0.1", Some((UDP, 53))));
    assert!(ok(&ix, "web1", "fd00::1", Some((TCP, 53))));
    assert!(!ok(&ix, "web1", "10.0.0.1", Some((UDP, 54))));
    assert!(!ok(&ix, "web1", "10.0.0.1", None));
    assert!(!ok(&ix, "web1", "192.0.2.53", Some((UDP, 53))));
    // The gateways move: the network's egress profiles are reported.
    assert_eq!(
        ix.put_network("blue", vec![ip("10.0.0.254")]).networks,
        ["blue".to_string()].into()
    );
    assert!(
        ix.put_network("blue", vec![ip("10.0.0.254")]).is_empty(),
        "no change"
    );
    assert!(ok(&ix, "web1", "10.0.0.254", Some((UDP, 53))));
    assert!(!ok(&ix, "web1", "10.0.0.1", Some((UDP, 53))));

    let mut strict = policy("strict", "tier=front", None, Some(vec![]));
    strict.gateway_dns = false;
    ix.put_policy(strict);
    assert!(!ok(&ix, "web1", "10.0.0.254", Some((UDP, 53))));
    // web2 is selected by "out" only.
    assert!(ok(&ix, "web2", "10.0.0.254", Some((UDP, 53))));
    assert_eq!(
        ix.remove_network("blue").networks,
        ["blue".to_string()].into()
    );
    assert!(!ok(&ix, "web2", "10.0.0.254", Some((UDP, 53))));
}

#[test]
fn endpoints_are_found_by_id_name_or_address() {
    let ix = world();
    assert_eq!(ix.find("db").map(|e| e.id.as_str()), Some("db"));
    assert_eq!(ix.find("cache-name").map(|e| e.id.as_str()), Some("cache"));
    assert_eq!(ix.find("fd00::10").map(|e| e.id.as_str()), Some("web1"));
    assert!(ix.find("10.0.0.99").is_none());
    assert!(ix.find("nope").is_none());
    let local: Vec<_> = ix.local_endpoints().map(|e| e.id.as_str()).collect();
    assert_eq!(local, ["cache", "db", "web1"]);
    assert!(ix.profile_of("nope", Direction::Ingress).is_none());
    assert!(ix.selected_by("nope").is_empty());
    // An unknown endpoint has no address to connect.
    let e = ix.explain(&party("nope"), &party("db"), None);
    assert!(!e.allowed && e.source.is_none());
}

#[test]
fn endpoint_changes_report_the_targets_they_touch() {
    let mut ix = world();
    ix.put_policy(policy(
        "db",
        "app=db",
        Some(vec![rule(vec![peers("app=web")], vec![])]),
        None,
    ));
    ix.put_policy(policy("cache", "app=cache", Some(vec![]), None));
    // A remote web endpoint appears: the policy whose peers match it changes.
    let changed = ix.put_endpoint(endpoint(
        "web3",
        "blue",
        Some("h2"),
        &["10.0.0.12"],
        "app=web",
    ));
    assert_eq!(changed.policies, ["db".to_string()].into());
    assert!(
        changed.endpoints.is_empty(),
        "remote: no target of this host"
    );
    // Relabelled away from web: still db (the old labels matched).
    let changed = ix.put_endpoint(endpoint(
        "web3",
        "blue",
        Some("h2"),
        &["10.0.0.12"],
        "app=x",
    ));
    assert_eq!(changed.policies, ["db".to_string()].into());
    // A local endpoint no peer selects: only itself.
    let changed = ix.put_endpoint(endpoint("lone", "blue", Some(ME), &["10.0.0.50"], "app=x"));
    assert_eq!(changed.endpoints, ["lone".to_string()].into());
    assert!(changed.policies.is_empty());
    assert_eq!(
        ix.remove_endpoint("lone").endpoints,
        ["lone".to_string()].into()
    );
    assert!(ix.remove_endpoint("lone").is_empty());
    assert_eq!(ix.policies().count(), 2);
    assert_eq!(ix.policy("db").map(|p| p.ingress.len()), Some(1));
    assert_eq!(
        ix.endpoint("web3").map(|e| e.labels["app"].as_str()),
        Some("x")
    );
}

/// The policy: 16 CIDR peers with 256 exceptions each, 16 port ranges. Its kernel
/// form grows with the peers plus the ports, not their product.
#[test]
fn peers_and_ports_add_up_rather_than_multiply() {
    let mut ix = world();
    let peers: Vec<Peer> = (0..16)
        .map(|i| {
            let excepts: Vec<String> = (0..256)
                .map(|j| format!("10.{}.{}.7/32", 100 + i, j))
                .collect();
            let excepts: Vec<&str> = excepts.iter().map(String::as_str).collect();
            cidr(&format!("10.{}.0.0/16", 100 + i), &excepts)
        })
        .collect();
    let ports: Vec<PolicyPort> = (0..16)
        .map(|i| port(TCP, 1000 + i * 100, Some(1000 + i * 100 + 50)))
        .collect();
    ix.put_policy(policy("big", "", Some(vec![rule(peers, ports)]), None));
    let p = profile(&ix, "db", Direction::Ingress);
    // One class, whose peers are each /16 cut by its 256 exceptions into 257 pieces (adjacent
    // /16s join at their ends), and the 16 port ranges that lead to it.
    assert_eq!(p.classes.len(), 1);
    assert_eq!(p.classes[0].1.len(), 16 * 256 + 1);
    assert_eq!(p.ports.len(), 16);
    assert_eq!(p.size(), 1 + 1 + (16 * 256 + 1) + 16);
    // Every local endpoint the policy selects shares the profile: one element per address
    // each, beside it.
    let mut program = Program::new();
    program.update(
        &ix,
        &Touched {
            endpoints: ix.local_endpoints().map(|e| e.id.clone()).collect(),
            ..Touched::default()
        },
    );
    let targets = 5; // web1 (2 addresses), db (2), cache (1)
    assert_eq!(program.len(), p.size() + targets);
    assert_eq!(program.profiles().count(), 1);
}

/// Endpoints whose policies are in force already add one element per address, whatever the
/// number of policies; a peer coming adds one element to the profiles that allow it.
#[test]
fn an_endpoint_like_others_costs_its_addresses_only() {
    let mut ix = world();
    for i in 0..200 {
        ix.put_policy(policy(
            &format!("p{i:03}"),
            "app=db",
            Some(vec![rule(
                vec![
                    peers(&format!("app=client-{i}")),
                    cidr(&format!("198.18.{}.{}/32", i / 256, i % 256), &[]),
                ],
                vec![tcp(10000 + i)],
            )]),
            None,
        ));
    }
    let mut program = Program::new();
    program.update(
        &ix,
        &Touched {
            endpoints: ix.local_endpoints().map(|e| e.id.clone()).collect(),
            ..Touched::default()
        },
    );
    let before = program.len();
    let touched = ix.put_endpoint(endpoint(
        "db2",
        "blue",
        Some(ME),
        &["10.0.0.21"],
        "app=db,tier=back",
    ));
    let change = program.update(&ix, &touched);
    assert!(change.remove.is_empty());
    assert_eq!(
        change.add,
        [PolicyElement::Target {
            direction: Direction::Ingress,
            target: ip("10.0.0.21"),
            profile: match program.elements().iter().find(
                |e| matches!(e, PolicyElement::Target { target, .. } if *target == ip("10.0.0.21"))
            ) {
                Some(PolicyElement::Target { profile, .. }) => *profile,
                _ => unreachable!(),
            },
        }]
    );
    assert_eq!(program.len(), before + 1);
    // A client of one policy appears: one element more, in the one profile.
    let touched = ix.put_endpoint(endpoint(
        "c7",
        "blue",
        Some("h2"),
        &["10.0.0.77"],
        "app=client-7",
    ));
    let change = program.update(&ix, &touched);
    assert!(change.remove.is_empty(), "{:?}", change.remove);
    assert!(
        matches!(change.add[..], [PolicyElement::Pair { peer, port: 10007, .. }] if peer == ip("10.0.0.77")),
        "{:?}",
        change.add
    );
    assert!(change.revoke.is_empty(), "nothing was lost");
}

/// A profile whose content changes much is made anew under another number and its targets
/// move to it, rather than changed in place in one big transaction.
#[test]
fn a_profile_that_changes_much_moves_to_a_new_number() {
    let mut ix = world();
    let big = |base: u32| {
        let peers: Vec<Peer> = (0..1500u32)
            .map(|i| {
                let a = std::net::Ipv4Addr::from(base + i * 2);
                cidr(&format!("{a}/32"), &[])
            })
            .collect();
        policy(
            "big",
            "app=db",
            Some(vec![rule(peers, vec![tcp(80)])]),
            None,
        )
    };
    let mut program = Program::new();
    let touched = ix.put_policy(big(0xc612_0000));
    let mut kernel: std::collections::BTreeSet<PolicyElement> = Default::default();
    kernel.extend(program.update(&ix, &touched).add);
    let target = |els: &[PolicyElement]| {
        els.iter()
            .find_map(|e| match e {
                PolicyElement::Target {
                    target, profile, ..
                } if *target == ip("10.0.0.20") => Some(*profile),
                _ => None,
            })
            .unwrap()
    };
    let first = target(&program.elements());
    let touched = ix.put_policy(big(0xc613_0000));
    let change = program.update(&ix, &touched);
    assert_eq!(target(&change.remove), first);
    let second = target(&change.add);
    assert_ne!(first, second, "a new number");
    for e in &change.remove {
        assert!(kernel.remove(e), "{e:?}");
    }
    for e in &change.add {
        assert!(kernel.insert(*e), "{e:?}");
    }
    assert_eq!(
        kernel.iter().copied().collect::<Vec<_>>(),
        program.elements()
    );
    assert!(
        kernel.iter().all(|e| e.profile() != first),
        "nothing of the old number is left"
    );
    assert!(ok(&ix, "198.19.0.0", "db", Some((TCP, 80))));
    assert!(!ok(&ix, "198.18.0.0", "db", Some((TCP, 80))));
    assert!(
        !change.revoke.is_empty(),
        "what the old one allowed is judged again"
    );
}

// Random worlds: two networks, a handful of endpoints with colliding addresses, labels,
// named ports and hosts, and policies over them.

const NETWORKS: [&str; 2] = ["n0", "n1"];
const ADDRS: [&str; 9] = [
    "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "fd00::1", "fd00::2",
    "fd00::3",
];
const SELECTORS: [&str; 7] = [
    "",
    "app=a",
    "app!=b",
    "app in (a,c)",
    "tier",
    "!tier",
    "tier notin (x)",
];
const CIDRS: [&str; 5] = [
    "10.0.0.0/29",
    "10.0.0.4/30",
    "fd00::/126",
    "0.0.0.0/0",
    "::/0",
];
const EXCEPTS: [&str; 3] = ["10.0.0.2/31", "10.0.0.5/32", "fd00::2/127"];
const NAMES: [&str; 2] = ["http", "dns"];

fn arb_labels() -> impl Strategy<Value = Labels> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(prop::sample::select(vec!["x", "y"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Labels::new();
            if let Some(a) = app {
                l.insert("app".into(), a.into());
            }
            if let Some(t) = tier {
                l.insert("tier".into(), t.into());
            }
            l
        })
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    (
        0..5usize,
        prop::sample::select(NETWORKS.to_vec()),
        prop::sample::select(vec![None, Some(ME), Some("other")]),
        prop::sample::subsequence(ADDRS.to_vec(), 0..3),
        arb_labels(),
        prop::sample::subsequence(
            vec![
                ("http", TCP, 80),
                ("http", TCP, 81),
                ("dns", UDP, 53),
                ("http", UDP, 80),
            ],
            0..3,
        ),
    )
        .prop_map(|(id, net, host, ips, l, ports)| {
            let mut ep = named(endpoint(&format!("e{id}"), net, host, &ips, ""), &ports);
            // Two ports of one name and protocol: the first wins, as for any endpoint.
            ep.labels = l;
            ep
        })
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        prop::sample::select(SELECTORS.to_vec()).prop_map(peers),
        (
            prop::sample::select(CIDRS.to_vec()),
            prop::sample::subsequence(EXCEPTS.to_vec(), 0..2)
        )
            .prop_map(|(c, e)| cidr(c, &e)),
    ]
}

fn arb_port() -> impl Strategy<Value = PolicyPort> {
    let protocol = prop::sample::select(vec![TCP, UDP]);
    let port_ref = prop_oneof![
        Just((None, None)),
        (78u16..84, prop::option::of(78u16..84))
            .prop_map(|(n, end)| (Some(PortRef::Number(n)), end)),
        prop::sample::select(NAMES.to_vec())
            .prop_map(|n| (Some(PortRef::Named(n.parse().unwrap())), None)),
        Just((Some(PortRef::Number(53)), None)),
    ];
    (protocol, port_ref).prop_map(|(protocol, (port, end_port))| PolicyPort {
        protocol,
        port,
        end_port,
    })
}

fn arb_rule() -> impl Strategy<Value = PolicyRule> {
    (
        prop::collection::vec(arb_peer(), 0..3),
        prop::collection::vec(arb_port(), 0..3),
    )
        .prop_map(|(peers, ports)| PolicyRule { peers, ports })
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        0..4usize,
        prop::sample::select(NETWORKS.to_vec()),
        prop::sample::select(SELECTORS.to_vec()),
        any::<(bool, bool, bool)>(),
        prop::collection::vec(arb_rule(), 0..3),
        prop::collection::vec(arb_rule(), 0..3),
    )
        .prop_map(|(n, net, s, (ii, ei, dns), ingress, egress)| Policy {
            name: format!("p{n}"),
            network: net.into(),
            selector: sel(s),
            ingress_isolated: ii,
            egress_isolated: ei,
            ingress,
            egress,
            gateway_dns: dns,
        })
}

fn arb_gateways() -> impl Strategy<Value = Vec<IpAddr>> {
    prop::sample::subsequence(vec!["10.0.0.1", "10.0.0.6", "fd00::1"], 0..3)
        .prop_map(|v| v.into_iter().map(ip).collect())
}

#[derive(Debug, Clone)]
enum Op {
    PutNetwork(&'static str, Vec<IpAddr>),
    RemoveNetwork(&'static str),
    PutPolicy(Policy),
    RemovePolicy(String),
    PutEndpoint(Box<Endpoint>),
    RemoveEndpoint(String),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (prop::sample::select(NETWORKS.to_vec()), arb_gateways())
            .prop_map(|(n, g)| Op::PutNetwork(n, g)),
        1 => prop::sample::select(NETWORKS.to_vec()).prop_map(Op::RemoveNetwork),
        4 => arb_policy().prop_map(Op::PutPolicy),
        1 => (0..4usize).prop_map(|n| Op::RemovePolicy(format!("p{n}"))),
        4 => arb_endpoint().prop_map(|e| Op::PutEndpoint(Box::new(e))),
        1 => (0..5usize).prop_map(|n| Op::RemoveEndpoint(format!("e{n}"))),
    ]
}

/// The index and, kept beside it, what the reference reading of the policies needs.
struct World {
    ix: PolicyIndex,
    gateways: BTreeMap<String, Vec<IpAddr>>,
    endpoints: BTreeMap<String, Endpoint>,
}

impl World {
    fn new() -> World {
        World {
            ix: PolicyIndex::new(ME),
            gateways: BTreeMap::new(),
            endpoints: BTreeMap::new(),
        }
    }

    fn apply(&mut self, op: Op) -> Touched {
        match op {
            Op::PutNetwork(n, g) => {
                self.gateways.insert(n.into(), g.clone());
                self.ix.put_network(n, g)
            }
            Op::RemoveNetwork(n) => {
                self.gateways.remove(n);
                self.ix.remove_network(n)
            }
            Op::PutPolicy(p) => self.ix.put_policy(p),
            Op::RemovePolicy(n) => self.ix.remove_policy(&n),
            Op::PutEndpoint(e) => {
                self.endpoints.insert(e.id.clone(), (*e).clone());
                self.ix.put_endpoint(*e)
            }
            Op::RemoveEndpoint(id) => {
                self.endpoints.remove(&id);
                self.ix.remove_endpoint(&id)
            }
        }
    }

    fn has(ep: &Endpoint, a: IpAddr) -> bool {
        ep.ips.iter().any(|n| n.addr() == a)
    }

    /// Kubernetes' meaning, read straight from the policies: whether `ep` (at `me`) lets a
    /// connection with `peer` through in `direction`.
    fn reference(
        &self,
        ep: &Endpoint,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: Option<u16>,
    ) -> bool {
        let isolating: Vec<&Policy> = self
            .ix
            .policies()
            .filter(|p| p.network == ep.network && p.selector.matches(&ep.labels))
            .filter(|p| match direction {
                Direction::Ingress => p.ingress_isolated,
                Direction::Egress => p.egress_isolated,
            })
            .collect();
        if isolating.is_empty() {
            return true;
        }
        if direction == Direction::Egress
            && isolating.iter().all(|p| p.gateway_dns)
            && self
                .gateways
                .get(&ep.network)
                .is_some_and(|g| g.contains(&peer))
            && (protocol == 6 || protocol == 17)
            && port == Some(53)
        {
            return true;
        }
        isolating.iter().any(|p| {
            let rules = match direction {
                Direction::Ingress => &p.ingress,
                Direction::Egress => &p.egress,
            };
            rules
                .iter()
                .any(|r| self.rule_allows(p, r, ep, direction, peer, protocol, port))
        })
    }

    /// Whether the endpoint `e` at `peer` is one the peer list stands for.
    fn peer_is(&self, p: &Policy, peers: &[Peer], e: &Endpoint, peer: IpAddr) -> bool {
        Self::has(e, peer)
            && (peers.is_empty()
                || peers.iter().any(|pe| match pe {
                    Peer::Endpoints(s) => e.network == p.network && s.matches(&e.labels),
                    Peer::Cidr { .. } => self.addr_is(p, std::slice::from_ref(pe), peer),
                }))
    }

    /// Whether the address `peer` is one the peer list stands for.
    fn addr_is(&self, p: &Policy, peers: &[Peer], peer: IpAddr) -> bool {
        peers.is_empty()
            || peers.iter().any(|pe| match pe {
                Peer::Endpoints(_) => self
                    .endpoints
                    .values()
                    .any(|e| self.peer_is(p, std::slice::from_ref(pe), e, peer)),
                Peer::Cidr { cidr, except } => {
                    cidr.contains(&peer) && !except.iter().any(|x| x.contains(&peer))
                }
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn rule_allows(
        &self,
        p: &Policy,
        r: &PolicyRule,
        ep: &Endpoint,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: Option<u16>,
    ) -> bool {
        let peer_ok = self.addr_is(p, &r.peers, peer);
        if r.ports.is_empty() {
            return peer_ok;
        }
        let Some(n) = port else { return false };
        r.ports
            .iter()
            .filter(|pp| pp.protocol.number() == protocol)
            .any(|pp| match pp.port {
                None => peer_ok,
                Some(PortRef::Number(first)) => {
                    peer_ok && first <= n && n <= pp.end_port.unwrap_or(first)
                }
                Some(PortRef::Named(name)) => {
                    let resolves = |e: &Endpoint| {
                        e.named_ports
                            .iter()
                            .find(|np| np.name == name && np.protocol == pp.protocol)
                            .is_some_and(|np| np.port == n)
                    };
                    match direction {
                        Direction::Ingress => peer_ok && resolves(ep),
                        Direction::Egress => self
                            .endpoints
                            .values()
                            .any(|e| resolves(e) && self.peer_is(p, &r.peers, e, peer)),
                    }
                }
            })
    }
}

fn arb_world_ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(arb_op(), 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// After any change, the program kept up to date from what the change touched holds what
    /// a program built from scratch holds, and its change takes the kernel's elements from
    /// what they were to what they are now: the daemon may rely on the reports to re-apply
    /// only what changed.
    #[test]
    fn the_program_follows_changes_exactly(ops in arb_world_ops()) {
        let mut w = World::new();
        let mut program = Program::new();
        let mut kernel: std::collections::BTreeSet<PolicyElement> = Default::default();
        for op in ops {
            let touched = w.apply(op.clone());
            let change = program.update(&w.ix, &touched);
            for e in &change.remove {
                prop_assert!(kernel.remove(e), "{:?} removed but not there, by {:?}", e, op);
            }
            for e in &change.add {
                prop_assert!(kernel.insert(*e), "{:?} added twice, by {:?}", e, op);
            }
            // A program built from scratch (a daemon that starts) holds the same, numbered
            // as the kernel is once it adopts the kernel's numbers.
            let mut scratch = Program::new();
            let all = Touched {
                endpoints: w.ix.local_endpoints().map(|e| e.id.clone()).collect(),
                ..Touched::default()
            };
            scratch.update(&w.ix, &all);
            let held: Vec<PolicyElement> = kernel.iter().copied().collect();
            scratch.adopt_numbers(&held);
            let want = scratch.elements();
            prop_assert_eq!(program.elements(), want.clone(), "after {:?}", op);
            prop_assert_eq!(held, want, "after {:?}", op);
            prop_assert_eq!(program.len(), kernel.len());
        }
    }

    /// In any world: the elements agree with Kubernetes' meaning read straight from the
    /// policies; `explain` agrees with the elements; it names a rule exactly when an isolated
    /// endpoint allows; and no two elements of one target overlap.
    #[test]
    fn elements_explain_and_the_reference_agree(ops in arb_world_ops()) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
        }
        let mut program = Program::new();
        program.update(&w.ix, &Touched {
            endpoints: w.ix.local_endpoints().map(|e| e.id.clone()).collect(),
            ..Touched::default()
        });
        let elements = program.elements();
        for (i, a) in elements.iter().enumerate() {
            for b in &elements[i + 1..] {
                prop_assert!(!overlap(a, b), "{:?} overlaps {:?}", a, b);
            }
        }
        let parties: Vec<Party> = w
            .endpoints
            .keys()
            .map(|id| Party::Endpoint(id.clone()))
            .chain(ADDRS.iter().chain(&["10.0.0.7", "fd00::4"]).map(|a| Party::Address(ip(a))))
            .collect();
        let ports = [None, Some((TCP, 53)), Some((UDP, 53)), Some((TCP, 80)), Some((TCP, 81)), Some((UDP, 80))];
        for src in &parties {
            for dst in &parties {
                for port in ports {
                    let e = w.ix.explain(src, dst, port);
                    let (Some(s), Some(d)) = (e.source, e.destination) else {
                        prop_assert!(!e.allowed);
                        continue;
                    };
                    let protocol = match port {
                        Some((p, _)) => p.number(),
                        None if s.is_ipv4() => 1,
                        None => 58,
                    };
                    let number = port.map(|(_, n)| n);
                    let judge = |j: &Judgement, direction, me: IpAddr, peer: IpAddr| -> Result<bool, TestCaseError> {
                        let Some(id) = &j.endpoint else {
                            prop_assert!(j.allowed && j.allowed_by.is_empty() && j.isolated_by.is_empty());
                            return Ok(true);
                        };
                        let profile = w.ix.profile_of(id, direction);
                        let kernel = allows(profile.as_ref(), peer, protocol, number);
                        if w.ix.endpoint(id).is_some_and(|e| e.is_on(ME)) && !me_shared(&w, me) {
                            // What this host's kernel holds for the target says the same.
                            let held = program.profile_for(direction, me);
                            prop_assert_eq!(allows(held.as_deref(), peer, protocol, number), kernel);
                        }
                        prop_assert_eq!(j.allowed, kernel);
                        let ep = &w.endpoints[id];
                        prop_assert_eq!(
                            kernel,
                            w.reference(ep, direction, peer, protocol, number),
                            "{} {} {} -> {} {:?}", id, direction, s, d, port
                        );
                        prop_assert_eq!(
                            !j.allowed_by.is_empty(),
                            kernel && !j.isolated_by.is_empty(),
                            "{:?}", j
                        );
                        Ok(kernel)
                    };
                    let out = judge(&e.egress, Direction::Egress, s, d)?;
                    let into = judge(&e.ingress, Direction::Ingress, d, s)?;
                    // Endpoints of two networks never reach each other.
                    let networks = |j: &Judgement| j.endpoint.as_ref().map(|id| &w.endpoints[id].network);
                    let across = matches!(
                        (networks(&e.egress), networks(&e.ingress)),
                        (Some(a), Some(b)) if a != b
                    );
                    prop_assert_eq!(e.across_networks, across);
                    prop_assert_eq!(e.allowed, out && into && !across);
                }
            }
        }
    }
}

/// Whether two local endpoints share the address `me` (the kernel then judges it by one of
/// them only).
fn me_shared(w: &World, me: IpAddr) -> bool {
    w.endpoints
        .values()
        .filter(|e| e.is_on(ME) && World::has(e, me))
        .count()
        > 1
}

/// Whether two elements would clash in one kernel set: the same target twice, or overlapping
/// ranges of one profile's peers allowed everything, of one class's peers, or of one
/// protocol's ports.
fn overlap(a: &PolicyElement, b: &PolicyElement) -> bool {
    use PolicyElement::*;
    let meet = |x: &AddrRange, y: &AddrRange| {
        x.first.is_ipv4() == y.first.is_ipv4() && x.first <= y.last && y.first <= x.last
    };
    match (*a, *b) {
        (
            Target {
                direction: d1,
                target: t1,
                ..
            },
            Target {
                direction: d2,
                target: t2,
                ..
            },
        ) => d1 == d2 && t1 == t2,
        (
            Any {
                direction: d1,
                profile: p1,
                peers: r1,
            },
            Any {
                direction: d2,
                profile: p2,
                peers: r2,
            },
        ) => d1 == d2 && p1 == p2 && meet(&r1, &r2),
        (
            Peers {
                direction: d1,
                profile: p1,
                class: c1,
                peers: r1,
            },
            Peers {
                direction: d2,
                profile: p2,
                class: c2,
                peers: r2,
            },
        ) => d1 == d2 && p1 == p2 && c1 == c2 && meet(&r1, &r2),
        (
            Ports {
                direction: d1,
                profile: p1,
                protocol: x1,
                ports: q1,
                ..
            },
            Ports {
                direction: d2,
                profile: p2,
                protocol: x2,
                ports: q2,
                ..
            },
        ) => d1 == d2 && p1 == p2 && x1 == x2 && q1.0 <= q2.1 && q2.0 <= q1.1,
        _ => false,
    }
}

/// How long changes take with many policies in place (not a test: figures printed).
/// `cargo test --release -p berth-policy -- --ignored --nocapture timing`
#[test]
#[ignore]
fn timing_with_many_policies() {
    use std::time::Instant;
    let mut ix = world();
    let mut program = Program::new();
    let filler = |i: usize| {
        policy(
            &format!("f{i:05}"),
            "app=db",
            Some(vec![rule(
                vec![
                    peers(&format!("app=client-{i}")),
                    cidr(&format!("198.18.{}.{}/32", i / 256, i % 256), &[]),
                ],
                vec![tcp(10000 + i as u16)],
            )]),
            None,
        )
    };
    let t = Instant::now();
    for i in 0..1000 {
        let touched = ix.put_policy(filler(i));
        program.update(&ix, &touched);
    }
    println!("1000 creates: {:?}", t.elapsed());
    let t = Instant::now();
    let touched = ix.put_policy(filler(1000));
    let change = program.update(&ix, &touched);
    println!(
        "one more: {:?} ({} added, {} removed)",
        t.elapsed(),
        change.add.len(),
        change.remove.len()
    );
    if std::env::var_os("BERTH_TIMING_LOOP").is_some() {
        let t = std::time::Instant::now();
        for i in 0..2000u32 {
            let addr = std::net::Ipv4Addr::from(0x0a01_0000 + i).to_string();
            let touched = ix.put_endpoint(endpoint(
                &format!("x{i}"),
                "blue",
                Some(ME),
                &[&addr],
                "app=db,tier=back",
            ));
            program.update(&ix, &touched);
        }
        println!("2000 attaches selected: {:?} each", t.elapsed() / 2000);
    }
    let t = Instant::now();
    let touched = ix.put_endpoint(endpoint(
        "db2",
        "blue",
        Some(ME),
        &["10.0.0.21"],
        "app=db,tier=back",
    ));
    let change = program.update(&ix, &touched);
    println!(
        "attach selected: {:?} ({} added)",
        t.elapsed(),
        change.add.len()
    );
    let t = Instant::now();
    let touched = ix.remove_endpoint("db2");
    let change = program.update(&ix, &touched);
    println!(
        "detach selected: {:?} ({} removed)",
        t.elapsed(),
        change.remove.len()
    );
    let t = Instant::now();
    let touched = ix.put_endpoint(endpoint("by", "blue", Some(ME), &["10.0.0.22"], "app=by"));
    program.update(&ix, &touched);
    let touched = ix.remove_endpoint("by");
    program.update(&ix, &touched);
    println!("attach+detach bystander: {:?}", t.elapsed());
    let t = Instant::now();
    let cost = ix.cost(&filler(2000));
    println!("cost: {:?} ({cost})", t.elapsed());
}

/// A service `svc` on blue over `backends`, port 80 to their 8080.
fn service(backends: &[&str], ix: &PolicyIndex) -> (berth_model::Service, Vec<Endpoint>) {
    let svc = berth_model::Service {
        name: "svc".into(),
        network: "blue".into(),
        selector: sel("app=web"),
        ports: vec!["80:8080".parse().unwrap()],
        vips: vec![ip("10.9.0.1")],
        host: None,
        affinity_timeout: None,
        backends: vec![],
    };
    let eps = backends
        .iter()
        .map(|id| ix.endpoint(id).unwrap().clone())
        .collect();
    (svc, eps)
}

#[test]
fn a_service_vip_is_judged_at_every_backend_on_the_target_port() {
    let mut ix = world();
    let (svc, backends) = service(&["web1", "web2"], &ix);
    let vip = ip("10.9.0.1");
    let explain =
        |ix: &PolicyIndex, port| ix.explain_service(&party("cache"), &svc, vip, &backends, port);
    let verdicts = |e: &Explanation| -> Vec<(String, bool)> {
        let s = e.service.as_ref().unwrap();
        s.backends
            .iter()
            .map(|b| (b.endpoint.clone(), b.explanation.allowed))
            .collect()
    };
    // Open: allowed, judged on 8080 at each backend's address.
    let e = explain(&ix, Some((TCP, 80)));
    assert!(e.allowed);
    let s = e.service.as_ref().unwrap();
    assert_eq!(
        (s.name.as_str(), s.port, s.target_port),
        ("svc", Some(80), Some(8080))
    );
    assert_eq!(e.destination, Some(vip));
    assert_eq!(s.backends[1].explanation.destination, Some(ip("10.0.0.11")));

    // web1 (tier=front) lets cache in on 8080 only: a rule for the service port would not do.
    ix.put_policy(policy(
        "front",
        "tier=front",
        Some(vec![rule(vec![peers("app=cache")], vec![tcp(8080)])]),
        None,
    ));
    assert!(explain(&ix, Some((TCP, 80))).allowed);
    ix.put_policy(policy(
        "front",
        "tier=front",
        Some(vec![rule(vec![peers("app=cache")], vec![tcp(80)])]),
        None,
    ));
    // One backend refuses: the connection fails on some choices, so denied; the refusing
    // backend's judgement is the one shown.
    let e = explain(&ix, Some((TCP, 80)));
    assert!(!e.allowed);
    assert_eq!(
        verdicts(&e),
        [("web1".to_string(), false), ("web2".to_string(), true)]
    );
    assert_eq!(e.ingress.endpoint.as_deref(), Some("web1"));
    assert_eq!(e.ingress.isolated_by, ["front"]);

    // A port the service lacks, or none: nothing answers.
    for port in [Some((TCP, 81)), Some((UDP, 80)), None] {
        let e = explain(&ix, port);
        assert!(!e.allowed, "{port:?}");
        let s = e.service.unwrap();
        assert_eq!((s.port, s.target_port), (None, None));
        assert!(s.backends.is_empty());
    }
    // No backends: nothing answers either.
    let e = ix.explain_service(&party("cache"), &svc, vip, &[], Some((TCP, 80)));
    assert!(!e.allowed);
}

#[test]
fn a_service_backend_on_another_network_is_judged_by_policy_alone() {
    let mut ix = world();
    ix.put_network("red", vec![ip("10.1.0.1")]);
    ix.put_endpoint(endpoint(
        "client",
        "red",
        Some(ME),
        &["10.1.0.5"],
        "app=client",
    ));
    let (svc, backends) = service(&["web1"], &ix);
    // Directly, the networks are isolated; through the VIP the forwarded connection passes.
    assert!(!ok(&ix, "client", "web1", Some((TCP, 8080))));
    let e = ix.explain_service(
        &party("client"),
        &svc,
        ip("10.9.0.1"),
        &backends,
        Some((TCP, 80)),
    );
    assert!(e.allowed && !e.across_networks, "{e:?}");
}

#[test]
fn putting_an_endpoint_again_changes_nothing() {
    let mut ix = world();
    ix.put_policy(policy(
        "p",
        "app=db",
        Some(vec![rule(vec![cidr("198.18.0.1/32", &[])], vec![tcp(80)])]),
        None,
    ));
    let mut program = Program::new();
    let all = Touched {
        endpoints: ix.local_endpoints().map(|e| e.id.clone()).collect(),
        ..Touched::default()
    };
    program.update(&ix, &all);
    let ep = endpoint("db2", "blue", Some(ME), &["10.0.0.21"], "app=db,tier=back");
    let touched = ix.put_endpoint(ep.clone());
    let first = program.update(&ix, &touched);
    assert_eq!(first.add.len(), 1);
    let touched = ix.put_endpoint(ep);
    let again = program.update(&ix, &touched);
    assert_eq!(again, Change::default(), "{touched:?}");
}
