//! Services against the real kernel, with real traffic. Each test builds its own private
//! namespaces with `ip netns add` (removed by a guard, also when an assertion fails): a "host"
//! with berth's table, a bridge `br0` of backends and a bridge `br1` with a client, and an
//! "outside" namespace on a link to the host (its underlay). The test's thread enters the host;
//! servers and clients run on threads that enter their own namespaces. The machine's own
//! network namespace is never touched.

mod common;

use common::{enter, in_ns, ip, routing_netns, run};

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use berth_dataplane::conntrack::{self, FlowMatch};
use berth_dataplane::nftables::{
    self, Backend, Frontend, LoadBalancer, MAX_BACKENDS, NetworkRules, Pool, ServiceRules,
};
use berth_model::Protocol::{self, Tcp, Udp};
use nix::sched::CloneFlags;

const HTTP: u16 = 8080;
const DNS: u16 = 5353;
/// The host's address on the underlay (towards "outside").
const UNDERLAY4: &str = "192.168.77.1";

/// Private namespaces, deleted when dropped; servers stop first.
struct Lab {
    /// `(role, namespace)`
    names: Vec<(String, String)>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl Lab {
    /// A host with `backends` (b1, b2, ...: 10.50.0.11, ... and fd50::11, ... on br0), a client
    /// (10.51.0.100, fd51::100 on br1) and an outside (192.168.77.2, fd77::2), each backend
    /// serving TCP on port 8080 and UDP on 5353 (answering its name and the peer's address).
    /// The calling thread enters the host.
    fn new(tag: &str, backends: usize) -> Lab {
        let mut lab = Lab {
            names: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        let roles: Vec<String> = ["h", "c", "o"]
            .into_iter()
            .map(String::from)
            .chain((1..=backends).map(|i| format!("b{i}")))
            .collect();
        for role in &roles {
            let name = format!("bsv{}{tag}{role}", std::process::id());
            // Recorded before it exists, so a half-made lab is still cleaned up.
            lab.names.push((role.clone(), name.clone()));
            routing_netns(&name);
        }
        let h = lab.ns("h");
        for (bridge, v4, v6) in [
            ("br0", "10.50.0.1/24", "fd50::1/64"),
            ("br1", "10.51.0.1/24", "fd51::1/64"),
        ] {
            ip(&h, &["link", "add", bridge, "type", "bridge"]);
            ip(&h, &["addr", "add", v4, "dev", bridge]);
            ip(&h, &["addr", "add", v6, "dev", bridge, "nodad"]);
            ip(&h, &["link", "set", bridge, "up"]);
        }
        let attach = |role: &str, bridge: Option<&str>, v4: &str, v6: &str, gw: [&str; 2]| {
            let ns = lab.ns(role);
            let host_if = format!("v{role}");
            ip(
                &h,
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            match bridge {
                Some(b) => ip(&h, &["link", "set", &host_if, "master", b]),
                None => {
                    ip(
                        &h,
                        &["addr", "add", &format!("{UNDERLAY4}/24"), "dev", &host_if],
                    );
                    ip(&h, &["addr", "add", "fd77::1/64", "dev", &host_if, "nodad"])
                }
            };
            ip(&h, &["link", "set", &host_if, "up"]);
            ip(&ns, &["addr", "add", v4, "dev", "eth0"]);
            ip(&ns, &["addr", "add", v6, "dev", "eth0", "nodad"]);
            ip(&ns, &["link", "set", "eth0", "up"]);
            ip(&ns, &["route", "add", "default", "via", gw[0]]);
            ip(&ns, &["-6", "route", "add", "default", "via", gw[1]]);
        };
        for i in 1..=backends {
            let (v4, v6) = (
                format!("10.50.0.{}/24", 10 + i),
                format!("fd50::{}/64", 10 + i),
            );
            attach(
                &format!("b{i}"),
                Some("br0"),
                &v4,
                &v6,
                ["10.50.0.1", "fd50::1"],
            );
        }
        attach(
            "c",
            Some("br1"),
            "10.51.0.100/24",
            "fd51::100/64",
            ["10.51.0.1", "fd51::1"],
        );
        attach(
            "o",
            None,
            "192.168.77.2/24",
            "fd77::2/64",
            [UNDERLAY4, "fd77::1"],
        );
        // What is addressed to the service ranges and not DNATed goes where berth refuses it.
        ip(&h, &["route", "add", "10.96.0.0/16", "dev", "br0"]);
        ip(&h, &["-6", "route", "add", "fd96::/112", "dev", "br0"]);
        for i in 1..=backends {
            let name = format!("b{i}");
            lab.serve(&name);
        }
        enter(&lab.ns("h"));
        lab
    }

    fn ns(&self, role: &str) -> String {
        let (_, name) = self.names.iter().find(|(r, _)| r == role).expect("a role");
        name.clone()
    }

    /// TCP and UDP servers in backend `role` that answer `<role> <peer address>`.
    fn serve(&mut self, role: &str) {
        let (ns, name) = (self.ns(role), role.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = self.stop.clone();
        self.servers.push(std::thread::spawn(move || {
            enter(&ns);
            let tcp = TcpListener::bind(("::", HTTP)).unwrap();
            let udp = UdpSocket::bind(("::", DNS)).unwrap();
            tcp.set_nonblocking(true).unwrap();
            udp.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0; 512];
            while !stop.load(Ordering::Relaxed) {
                let mut idle = true;
                if let Ok((mut s, peer)) = tcp.accept() {
                    let _ = writeln!(s, "{name} {}", peer.ip().to_canonical());
                    idle = false;
                }
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let answer = format!("{name} {}", peer.ip().to_canonical());
                    let _ = udp.send_to(answer.as_bytes(), peer);
                    idle = false;
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }));
        rx.recv().unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        for (_, n) in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// One TCP connection: what the server said, or why there was none.
fn ask(to: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// `n` connections from namespace `ns`: each answer, by how often.
fn ask_many(ns: &str, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    in_ns(ns, move || {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(ask(to).unwrap()).or_default() += 1;
        }
        seen
    })
}

/// Which backends answered (the first word of each answer).
fn who(answers: &BTreeMap<String, usize>) -> BTreeSet<String> {
    answers
        .keys()
        .map(|a| a.split(' ').next().unwrap().to_string())
        .collect()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn backend(i: u8, v6: bool, port: u16) -> Backend {
    let addr: IpAddr = if v6 {
        format!("fd50::{}", 10 + i).parse().unwrap()
    } else {
        format!("10.50.0.{}", 10 + i).parse().unwrap()
    };
    Backend {
        addr,
        port,
        local: false,
    }
}

fn pool(backends: &[u8], v6: bool, port: u16) -> Pool {
    Pool {
        backends: backends.iter().map(|i| backend(*i, v6, port)).collect(),
        affinity: None,
    }
}

fn vip(addr: &str, protocol: Protocol, port: u16) -> Frontend {
    Frontend::Vip {
        vip: addr.parse().unwrap(),
        protocol,
        port,
    }
}

fn networks() -> Vec<NetworkRules> {
    [
        ("br0", "10.50.0.0/24", "fd50::/64"),
        ("br1", "10.51.0.0/24", "fd51::/64"),
    ]
    .into_iter()
    .map(|(bridge, v4, v6)| NetworkRules {
        bridge: bridge.into(),
        internal: false,
        subnets: vec![v4.parse().unwrap(), v6.parse().unwrap()],
        dns: vec![],
    })
    .collect()
}

fn services() -> ServiceRules {
    ServiceRules {
        ranges: vec![
            "10.96.0.0/16".parse().unwrap(),
            "fd96::/112".parse().unwrap(),
        ],
        nodeport_source4: Some(UNDERLAY4.parse().unwrap()),
        nodeport_source6: None,
    }
}

/// Installs berth's table with two networks and the service ranges, and reads the (empty)
/// load balancer back.
fn install() -> LoadBalancer {
    nftables::install(&networks(), &[], &services()).unwrap();
    LoadBalancer::from_kernel().unwrap()
}

fn nft(args: &str) -> String {
    run("nft", &args.split(' ').collect::<Vec<_>>())
}

/// A map's (or, `set NAME`, a set's) elements as nft lists them, one string each.
fn elements(map: &str) -> BTreeSet<String> {
    let (kind, name) = map.split_once(' ').unwrap_or(("map", map));
    let text = nft(&format!("list {kind} inet berth {name}"));
    let Some(start) = text.find("elements = {") else {
        return BTreeSet::new();
    };
    let end = text[start..].find('}').unwrap() + start;
    text[start + 12..end]
        .split(',')
        .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|e| !e.is_empty())
        .collect()
}

fn set_of<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.into_iter().map(String::from).collect()
}

/// The error kind of a refused connection, and how long the refusal took.
fn refused(ns: &str, to: SocketAddr) -> (std::io::ErrorKind, Duration) {
    in_ns(ns, move || {
        let start = Instant::now();
        let err = ask(to).unwrap_err();
        (err.kind(), start.elapsed())
    })
}

#[test]
fn services_balance_scale_and_refuse() {
    let lab = Lab::new("bal", 3);
    let mut lb = install();
    let web = vip("10.96.0.10", Tcp, 80);
    let web6 = vip("fd96::10", Tcp, 80);
    let generation = nftables::generation().unwrap();
    let left = lb
        .apply(&[
            (web, Some(pool(&[1, 2, 3], false, HTTP))),
            (web6, Some(pool(&[1, 2, 3], true, HTTP))),
        ])
        .unwrap();
    assert!(left.is_empty());
    assert_eq!(nftables::generation().unwrap(), generation + 1, "one batch");

    // Spread over every backend, and each sees the client's own address.
    let answers = ask_many(&lab.ns("c"), sa("10.96.0.10:80"), 60);
    assert_eq!(who(&answers), set_of(["b1", "b2", "b3"]), "{answers:?}");
    assert!(
        answers.keys().all(|a| a.ends_with(" 10.51.0.100")),
        "{answers:?}"
    );
    let answers6 = ask_many(&lab.ns("c"), sa("[fd96::10]:80"), 30);
    assert!(who(&answers6).len() >= 2, "{answers6:?}");
    assert!(
        answers6.keys().all(|a| a.ends_with(" fd51::100")),
        "{answers6:?}"
    );

    let slots = [
        "10.96.0.10 . tcp . 80 . 0 : 10.50.0.11 . 8080",
        "10.96.0.10 . tcp . 80 . 1 : 10.50.0.12 . 8080",
        "10.96.0.10 . tcp . 80 . 2 : 10.50.0.13 . 8080",
    ];
    assert_eq!(elements("backends4"), set_of(slots));
    assert_eq!(
        elements("svc4"),
        set_of(["10.96.0.10 . tcp . 80 : goto lb_3"])
    );

    // Scale down: b2 leaves; the last slot's backend moves into its slot, the last slot
    // goes, the frontend goes to lb_2. Nothing else changes.
    let v6_before = elements("backends6");
    let left = lb
        .apply(&[(web, Some(pool(&[1, 3], false, HTTP)))])
        .unwrap();
    assert_eq!(left, vec![(web, backend(2, false, HTTP))]);
    assert_eq!(
        elements("backends4"),
        set_of([slots[0], "10.96.0.10 . tcp . 80 . 1 : 10.50.0.13 . 8080"])
    );
    assert_eq!(
        elements("svc4"),
        set_of(["10.96.0.10 . tcp . 80 : goto lb_2"])
    );
    assert_eq!(elements("backends6"), v6_before);
    let answers = ask_many(&lab.ns("c"), sa("10.96.0.10:80"), 30);
    assert_eq!(who(&answers), set_of(["b1", "b3"]), "{answers:?}");

    // Scale up: b2 takes the next slot.
    lb.apply(&[(web, Some(pool(&[1, 2, 3], false, HTTP)))])
        .unwrap();
    assert_eq!(
        elements("backends4"),
        set_of([
            slots[0],
            "10.96.0.10 . tcp . 80 . 1 : 10.50.0.13 . 8080",
            "10.96.0.10 . tcp . 80 . 2 : 10.50.0.12 . 8080",
        ])
    );
    assert_eq!(
        lb.pool(&web).unwrap().backends,
        pool(&[1, 2, 3], false, HTTP).backends
    );

    // No backends: no elements, and connections are refused at once, from a container and
    // from the host, as is a port of the VIP that no frontend has.
    let left = lb
        .apply(&[(web, Some(Pool::default())), (web6, None)])
        .unwrap();
    assert_eq!(left.len(), 6);
    assert!(elements("backends4").is_empty() && elements("svc4").is_empty());
    assert!(elements("backends6").is_empty() && lb.pool(&web).is_none());
    for to in ["10.96.0.10:80", "10.96.0.10:81", "[fd96::10]:80"] {
        for ns in [lab.ns("c"), lab.ns("h")] {
            let (kind, took) = refused(&ns, sa(to));
            assert_eq!(
                kind,
                std::io::ErrorKind::ConnectionRefused,
                "{to} from {ns}"
            );
            assert!(
                took < Duration::from_millis(100),
                "{to} from {ns}: {took:?}"
            );
        }
    }
    // UDP: ICMP port unreachable, which a connected socket reports.
    let udp = in_ns(&lab.ns("c"), || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.96.0.53:53").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.send(b"q").unwrap();
        s.recv(&mut [0; 64]).unwrap_err().kind()
    });
    assert_eq!(udp, std::io::ErrorKind::ConnectionRefused);
    assert!(
        nftables::check(&networks(), &[], &services())
            .unwrap()
            .is_empty()
    );
    drop(lab);
}

#[test]
fn services_affinity_keeps_a_client_and_lets_go_of_a_gone_backend() {
    let lab = Lab::new("aff", 3);
    let mut lb = install();
    let web = vip("10.96.0.10", Tcp, 80);
    let affine = Pool {
        affinity: Some(600),
        ..pool(&[1, 2, 3], false, HTTP)
    };
    lb.apply(&[(web, Some(affine.clone()))]).unwrap();
    assert!(nft("list table inet berth").contains("chain remember_600"));
    let answers = ask_many(&lab.ns("c"), sa("10.96.0.10:80"), 15);
    assert_eq!(
        who(&answers).len(),
        1,
        "one backend for one client: {answers:?}"
    );
    let first = who(&answers).pop_first().unwrap();
    let remembered = elements("affinity4");
    assert_eq!(remembered.len(), 1, "{remembered:?}");
    let entry = remembered.first().unwrap();
    assert!(
        entry.starts_with("10.51.0.100 . 10.96.0.10 . tcp . 80 ") && entry.contains(" : 10.50.0.1"),
        "{entry}"
    );

    // Its backend leaves: what pointed there goes, and the client sticks to another.
    let i: u8 = first[1..].parse().unwrap();
    let rest: Vec<u8> = [1, 2, 3].into_iter().filter(|b| *b != i).collect();
    let left = lb
        .apply(&[(
            web,
            Some(Pool {
                affinity: Some(600),
                ..pool(&rest, false, HTTP)
            }),
        )])
        .unwrap();
    assert_eq!(left, vec![(web, backend(i, false, HTTP))]);
    assert!(elements("affinity4").is_empty());
    let answers = ask_many(&lab.ns("c"), sa("10.96.0.10:80"), 15);
    assert_eq!(who(&answers).len(), 1, "{answers:?}");
    assert!(!who(&answers).contains(&first));

    // Affinity off: the records go, the chain too once no frontend uses its timeout.
    lb.apply(&[(web, Some(pool(&rest, false, HTTP)))]).unwrap();
    assert!(elements("affinity4").is_empty() && elements("affine4").is_empty());
    assert!(!nft("list table inet berth").contains("remember_600"));
    drop(lab);
}

#[test]
fn services_conntrack_deletion_moves_a_udp_flow() {
    let lab = Lab::new("ct", 2);
    let mut lb = install();
    let dns = vip("10.96.0.53", Udp, 53);
    lb.apply(&[(dns, Some(pool(&[1], false, DNS)))]).unwrap();
    let c = lab.ns("c");
    // One socket: one flow, whose conntrack entry keeps its backend.
    let sock = in_ns(&c, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect("10.96.0.53:53").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let query = |s: &UdpSocket| {
        s.send(b"q").unwrap();
        let mut buf = [0; 64];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n])
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(query(&sock), "b1");
    let left = lb.apply(&[(dns, Some(pool(&[2], false, DNS)))]).unwrap();
    assert_eq!(query(&sock), "b1", "the flow's entry still goes to b1");
    let matches: Vec<FlowMatch> = left
        .iter()
        .map(|(_, b)| FlowMatch {
            protocol: Udp,
            orig_dst: Some("10.96.0.53".parse().unwrap()),
            orig_dport: 53,
            reply_src: b.addr,
            reply_sport: b.port,
        })
        .collect();
    assert_eq!(conntrack::delete_flows(&matches).unwrap(), 1);
    assert_eq!(
        conntrack::delete_flows(&matches).unwrap(),
        0,
        "already gone"
    );
    assert_eq!(query(&sock), "b2");
    drop(lab);
}

#[test]
fn services_hairpin_and_node_ports() {
    let lab = Lab::new("np", 3);
    let mut lb = install();
    // A backend reaching its own VIP comes back to itself, seen as from the gateway.
    let own = vip("10.96.0.20", Tcp, 80);
    let local = |i, v6| Backend {
        local: true,
        ..backend(i, v6, HTTP)
    };
    lb.apply(&[(
        own,
        Some(Pool {
            backends: [local(1, false)].into(),
            affinity: None,
        }),
    )])
    .unwrap();
    assert_eq!(
        elements("set hairpin4"),
        set_of(["10.50.0.11 . 10.50.0.11"])
    );
    // br_netfilter bridges a DNATed frame whose new destination is on the bridge it came from,
    // back out of its own port: only a port in hairpin mode lets it.
    ip(
        &lab.ns("h"),
        &[
            "link",
            "set",
            "vb1",
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ],
    );
    let answer = in_ns(&lab.ns("b1"), || ask(sa("10.96.0.20:80"))).unwrap();
    assert_eq!(answer, "b1 10.50.0.1");

    // A node port, from outside and from a container (to the host's bridge address): to the
    // backends, which see this host's underlay address.
    let np = Frontend::NodePort {
        ipv6: false,
        protocol: Tcp,
        port: 30080,
    };
    let np6 = Frontend::NodePort {
        ipv6: true,
        protocol: Tcp,
        port: 30080,
    };
    lb.apply(&[
        (np, Some(pool(&[2, 3], false, HTTP))),
        (np6, Some(pool(&[2, 3], true, HTTP))),
    ])
    .unwrap();
    let outside = ask_many(&lab.ns("o"), sa("192.168.77.1:30080"), 20);
    assert_eq!(who(&outside), set_of(["b2", "b3"]), "{outside:?}");
    assert!(
        outside.keys().all(|a| a.ends_with(" 192.168.77.1")),
        "{outside:?}"
    );
    let inside = ask_many(&lab.ns("c"), sa("10.51.0.1:30080"), 10);
    assert!(
        inside.keys().all(|a| a.ends_with(" 192.168.77.1")),
        "{inside:?}"
    );
    // IPv6 without an address of its own: masqueraded to the way out.
    let outside6 = ask_many(&lab.ns("o"), sa("[fd77::1]:30080"), 10);
    assert!(
        outside6.keys().all(|a| a.ends_with(" fd50::1")),
        "{outside6:?}"
    );
    // The node port of a VIP's port number is no VIP's: the VIP is unknown there.
    let (kind, _) = refused(&lab.ns("c"), sa("10.96.0.20:30080"));
    assert_eq!(kind, std::io::ErrorKind::ConnectionRefused);

    // Hairpin elements are counted across frontends: b1 local in two, one element.
    let other = vip("10.96.0.21", Tcp, 80);
    let pool_b1 = Pool {
        backends: [local(1, false)].into(),
        affinity: None,
    };
    lb.apply(&[(other, Some(pool_b1.clone()))]).unwrap();
    lb.apply(&[(own, None)]).unwrap();
    assert_eq!(
        elements("set hairpin4"),
        set_of(["10.50.0.11 . 10.50.0.11"])
    );
    lb.apply(&[(other, None), (np, None), (np6, None)]).unwrap();
    assert!(elements("set hairpin4").is_empty() && elements("set nodeport_keys4").is_empty());
    let (kind, _) = refused(&lab.ns("o"), sa("192.168.77.1:30080"));
    assert_eq!(
        kind,
        std::io::ErrorKind::ConnectionRefused,
        "no backends, no DNAT"
    );
    drop(lab);
}

/// Frontends of every kind, for the state tests.
fn a_bit_of_everything() -> BTreeMap<Frontend, Pool> {
    let mut want = BTreeMap::new();
    // b1 is on this host.
    let b1_here = |p: Pool| Pool {
        backends: p
            .backends
            .into_iter()
            .map(|b| Backend {
                local: b.addr == backend(1, false, 0).addr,
                ..b
            })
            .collect(),
        ..p
    };
    want.insert(
        vip("10.96.0.10", Tcp, 80),
        b1_here(pool(&[1, 2, 3], false, HTTP)),
    );
    want.insert(
        vip("10.96.0.11", Tcp, 443),
        Pool {
            affinity: Some(10800),
            ..b1_here(pool(&[1, 2], false, HTTP))
        },
    );
    want.insert(vip("10.96.0.53", Udp, 53), pool(&[3], false, DNS));
    want.insert(
        vip("fd96::10", Tcp, 80),
        Pool {
            affinity: Some(60),
            ..pool(&[1, 2], true, HTTP)
        },
    );
    want.insert(
        Frontend::NodePort {
            ipv6: false,
            protocol: Tcp,
            port: 30080,
        },
        Pool {
            affinity: Some(60),
            ..pool(&[2, 3], false, HTTP)
        },
    );
    want
}

#[test]
fn services_state_reads_back_and_is_repaired() {
    let _lab = Lab::new("st", 0);
    let mut lb = install();
    let want = a_bit_of_everything();
    let changes: Vec<_> = want.iter().map(|(f, p)| (*f, Some(p.clone()))).collect();
    lb.apply(&changes).unwrap();

    // A fresh load balancer reads back exactly this, and its full sync writes nothing.
    let mut fresh = LoadBalancer::from_kernel().unwrap();
    assert_eq!(fresh.len(), want.len());
    for (f, p) in &want {
        assert_eq!(fresh.pool(f).as_ref(), Some(p), "{f}");
    }
    let generation = nftables::generation().unwrap();
    assert!(fresh.sync_all(&want).unwrap().is_empty());
    assert_eq!(
        nftables::generation().unwrap(),
        generation,
        "nothing written"
    );

    // Damage of every kind, and what a full sync makes of it. Of the affinities, only one of an
    // affine frontend to one of its backends stays.
    nft(
        "add element inet berth affinity4 { 10.51.0.101 . 10.96.0.11 . tcp . 443 : 10.50.0.12 . 8080 }",
    );
    let table = nft("list table inet berth");
    for change in [
        "delete element inet berth backends4 { 10.96.0.10 . tcp . 80 . 1 }",
        "delete element inet berth svc6 { fd96::10 . tcp . 80 }",
        "add element inet berth svc4 { 10.96.9.9 . tcp . 9 : goto lb_1 }",
        "add element inet berth backends4 { 10.96.9.9 . tcp . 9 . 0 : 10.50.0.99 . 9 }",
        "delete element inet berth hairpin4 { 10.50.0.11 . 10.50.0.11 }",
        "add element inet berth hairpin6 { fd50::99 . fd50::99 }",
        "flush chain inet berth remember_60",
        "add element inet berth affinity4 { 10.51.0.100 . 10.96.0.53 . udp . 53 : 10.50.0.13 . 5353 }",
        "add element inet berth affinity4 { 10.51.0.100 . 10.96.0.11 . tcp . 443 : 10.50.0.99 . 8080 }",
    ] {
        nft(change);
    }
    assert!(
        !nft("list chain inet berth remember_60").contains("update"),
        "flushed"
    );
    let left = fresh.sync_all(&want).unwrap();
    assert_eq!(
        left,
        vec![(
            vip("10.96.9.9", Tcp, 9),
            Backend {
                addr: "10.50.0.99".parse().unwrap(),
                port: 9,
                local: false
            }
        )]
    );
    assert_eq!(nft("list table inet berth"), table, "repaired");
    let generation = nftables::generation().unwrap();
    assert!(
        LoadBalancer::from_kernel()
            .unwrap()
            .sync_all(&want)
            .unwrap()
            .is_empty()
    );
    assert_eq!(nftables::generation().unwrap(), generation);

    // What is no longer wanted goes, and its backends are what left.
    let mut fewer = want.clone();
    let gone = vip("10.96.0.10", Tcp, 80);
    fewer.remove(&gone);
    let left = fresh.sync_all(&fewer).unwrap();
    assert_eq!(left.len(), 3);
    assert_eq!(
        elements("set hairpin4"),
        set_of(["10.50.0.11 . 10.50.0.11"]),
        "still used"
    );
    assert!(left.iter().all(|(f, _)| *f == gone));
    assert!(fresh.pool(&gone).is_none());
    // An install (a network changed, say) keeps every frontend.
    nftables::install(&networks(), &[], &services()).unwrap();
    assert_eq!(LoadBalancer::from_kernel().unwrap().len(), fewer.len());
}

#[test]
fn services_a_refused_batch_changes_nothing_and_large_batches_pass() {
    let _lab = Lab::new("big", 0);
    let mut lb = install();
    let web = vip("10.96.0.10", Tcp, 80);
    lb.apply(&[(web, Some(pool(&[1], false, HTTP)))]).unwrap();
    // Someone else's element where a slot goes: the kernel refuses the whole batch.
    nft("add element inet berth backends4 { 10.96.0.30 . tcp . 80 . 0 : 192.0.2.1 . 1 }");
    let table = nft("list table inet berth");
    let clash = vip("10.96.0.30", Tcp, 80);
    let err = lb
        .apply(&[
            (web, Some(pool(&[1, 2], false, HTTP))),
            (clash, Some(pool(&[1], false, HTTP))),
        ])
        .unwrap_err();
    assert!(err.to_string().contains("backends4"), "{err}");
    assert_eq!(nft("list table inet berth"), table);
    assert_eq!(lb.pool(&web), Some(pool(&[1], false, HTTP)));
    assert!(lb.pool(&clash).is_none());
    // A backend of the other family is the caller's mistake, found before anything is sent.
    let err = lb
        .apply(&[(web, Some(pool(&[1], true, HTTP)))])
        .unwrap_err();
    assert_eq!(err.errno(), None, "{err}");

    // Thousands of frontends at once: many netlink messages, one batch. More backends than a
    // frontend takes: the most, those it had first.
    let many: Vec<(Frontend, Option<Pool>)> = (0..3000u32)
        .map(|i| {
            let f = vip(&format!("10.96.{}.{}", 100 + i / 250, i % 250), Tcp, 80);
            (f, Some(pool(&[1, 2, 3], false, HTTP)))
        })
        .collect();
    lb.apply(&many).unwrap();
    let wide = vip("10.96.0.40", Tcp, 80);
    let had = backend(1, false, 60000);
    lb.apply(&[(wide, Some(pool(&[1], false, 60000)))]).unwrap();
    let huge = Pool {
        backends: (0..300u16)
            .map(|p| backend(1, false, 10000 + p))
            .chain([had])
            .collect(),
        affinity: None,
    };
    lb.apply(&[(wide, Some(huge))]).unwrap();
    let kept = lb.pool(&wide).unwrap().backends;
    assert_eq!(kept.len(), MAX_BACKENDS);
    assert!(kept.contains(&had), "the one it had stays");
    assert!(kept.contains(&backend(1, false, 10254)) && !kept.contains(&backend(1, false, 10255)));
    // Read back: these, and the stray slot (what a full sync would delete).
    let fresh = LoadBalancer::from_kernel().unwrap();
    assert_eq!(fresh.len(), 3003);
    assert_eq!(fresh.pool(&clash).unwrap().backends.len(), 1);
    assert_eq!(fresh.pool(&wide).unwrap().backends, kept);
}

/// The chain `remember_<secs>` is what nft writes for its IPv4 rule; the IPv6 rule, which nft
/// 1.0.6 cannot write (it aborts allocating registers), has the expressions nft lists here.
#[test]
fn services_remember_chain_is_what_nft_writes() {
    let _lab = Lab::new("rem", 0);
    let mut lb = install();
    lb.apply(&[(
        vip("10.96.0.10", Tcp, 80),
        Some(Pool {
            affinity: Some(60),
            ..pool(&[1], false, HTTP)
        }),
    )])
    .unwrap();
    let ours = debug_rules("remember_60");
    assert_eq!(ours.len(), 2, "{ours:?}");
    let v4 = "add rule inet berth remember_60 meta nfproto ipv4 meta l4proto { tcp, udp, sctp } update @affinity4 { ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst timeout 60s : ip daddr . th dport }";
    let theirs = std::thread::spawn(move || {
        unshare_net();
        nftables::install(&networks(), &[], &services()).unwrap();
        nft("add chain inet berth remember_60");
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(v4.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        debug_rules("remember_60")
    })
    .join()
    .unwrap();
    assert_eq!(ours[0], theirs[0]);
    assert_eq!(
        ours[1],
        [
            "[ meta load nfproto => reg 1 ]",
            "[ cmp eq reg 1 0x0000000a ]",
            "[ meta load l4proto => reg 1 ]",
            "[ lookup reg 1 set __set%d 0x0 ]",
            "[ payload load 16b @ network header + 8 => reg 1 ]",
            "[ ct load dst_ip6 => reg 2 , dir original ]",
            "[ meta load l4proto => reg 3 ]",
            "[ ct load proto_dst => reg 17 , dir original ]",
            "[ payload load 16b @ network header + 24 => reg 18 ]",
            "[ payload load 2b @ transport header + 2 => reg 22 ]",
            "[ dynset update reg_key 1 set affinity6 sreg_data 18 timeout 60000ms ]",
        ]
        .join("\n")
    );
}

fn unshare_net() {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
}

/// A chain's rules as `nft --debug=netlink` prints their expressions, anonymous sets unnumbered.
fn debug_rules(chain: &str) -> Vec<String> {
    let out = nft(&format!("--debug=netlink list chain inet berth {chain}"));
    let mut rules: Vec<String> = Vec::new();
    for l in out.lines().take_while(|l| !l.starts_with("table ")) {
        if l.starts_with("inet berth ") && !l.contains('@') {
            rules.push(String::new());
        } else if let Some(r) = rules.last_mut()
            && l.starts_with("  [")
        {
            let l = l.trim();
            let l = match l.find("set __set") {
                Some(i) => {
                    let rest = l[i + 9..].trim_start_matches(|c: char| c.is_ascii_digit());
                    format!("{}set __set%d{rest}", &l[..i])
                }
                None => l.to_string(),
            };
            if !r.is_empty() {
                r.push('\n');
            }
            r.push_str(&l);
        }
    }
    rules
}

/// What one backend added, removed or replaced costs with 10, 1,000 and 10,000 frontends of 10
/// backends each (up to 100,000 backends), VIP frontends without affinity, in place. Adding
/// and removing change the frontend's `goto lb_N`, after which the kernel validates every
/// frontend's; replacing does not. A benchmark, not a test (medians printed): `cargo test
/// --release -p berth-dataplane --test services -- --ignored --nocapture services_cost`.
#[test]
#[ignore]
fn services_cost() {
    let _lab = Lab::new("cost", 0);
    let mut lb = install();
    let frontend = |i: u32| vip(&format!("10.96.{}.{}", i / 250, i % 250), Tcp, 80);
    let of = |backends: &[u8]| Pool {
        backends: backends.iter().map(|i| backend(*i, false, HTTP)).collect(),
        affinity: None,
    };
    let ten = of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let eleven = of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    let other_ten = of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 11]);
    let mut made = 0;
    for n in [10u32, 1000, 10_000] {
        let batch: Vec<_> = (made..n)
            .map(|i| (frontend(i), Some(ten.clone())))
            .collect();
        let start = Instant::now();
        for chunk in batch.chunks(2000) {
            lb.apply(chunk).unwrap();
        }
        let fill = start.elapsed();
        made = n;
        let mut times = [const { Vec::new() }; 3];
        for round in 0..41 {
            let f = frontend(round * 7919 % n);
            for (i, pool) in [&eleven, &ten, &other_ten].into_iter().enumerate() {
                let start = Instant::now();
                lb.apply(&[(f, Some(pool.clone()))]).unwrap();
                times[i].push(start.elapsed());
            }
            lb.apply(&[(f, Some(ten.clone()))]).unwrap();
        }
        let [add, remove, replace] = times.map(|mut t| {
            t.sort();
            t[20]
        });
        println!(
            "{n} frontends ({} backends; {fill:?} to write the new ones): add a backend {add:?}, remove one {remove:?}, replace one {replace:?} (medians of 41)",
            n * 10,
        );
    }
}
