//! Services on one host: a VIP in front of the endpoints whose labels match, with real TCP and
//! UDP through the kernel's load balancer (berth's nftables maps).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Host, ServerThreads, in_ns, run_ok};

const BLUE: &str = "10.91.0.0/24";
const BLUE_GW: &str = "10.91.0.1";

/// A TCP and a UDP server on `port` in a namespace that answer every client with
/// "NAME CLIENT_ADDRESS": which backend a connection reached, and whom it saw.
pub struct Identify {
    _serving: ServerThreads,
}

impl Identify {
    pub fn start(netns: &Path, name: &str, port: u16) -> Identify {
        // Dual-stack: IPv4 clients arrive as mapped addresses, shown unmapped.
        let (tcp, udp) = in_ns(netns, || {
            (
                TcpListener::bind(("::", port)).unwrap(),
                UdpSocket::bind(("::", port)).unwrap(),
            )
        });
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, s2) = (stop.clone(), stop.clone());
        let (n1, n2) = (name.to_string(), name.to_string());
        let t1 = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.write_all(format!("{n1} {}", unmapped(peer)).as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{n2} {}", unmapped(peer)).as_bytes(), peer);
                }
            }
        });
        Identify {
            _serving: ServerThreads {
                stop,
                threads: vec![t1, t2],
            },
        }
    }
}

fn unmapped(peer: SocketAddr) -> std::net::IpAddr {
    match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        ip => ip,
    }
}

/// Connects over TCP from a namespace; "NAME CLIENT" from the backend reached, or the error.
pub fn ask(from: &Path, to: &str) -> Result<String, std::io::Error> {
    let addr: SocketAddr = to.parse().unwrap();
    let mut s = in_ns(from, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `n` connections from a namespace: how many each backend got, and the clients they saw.
pub fn spread(from: &Path, to: &str, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let mut counts = BTreeMap::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let answer = ask(from, to).unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        let (name, client) = answer.split_once(' ').expect("NAME CLIENT");
        *counts.entry(name.to_string()).or_insert(0) += 1;
        clients.push(client.to_string());
    }
    (counts, clients)
}

/// A host with network blue, a client sandbox `c` and backends `b1..=bn` labelled app=web,
/// each with an identifying server on 8080.
struct Setup {
    h: Host,
    servers: Vec<Identify>,
}

impl Setup {
    fn new(backends: usize) -> Setup {
        let h = Host::new();
        h.ok(&["network", "create", "blue", "--subnet", BLUE]);
        h.ok(&["sandbox", "create", "c"]);
        h.ok(&["attach", "c", "--network", "blue"]);
        let mut s = Setup {
            h,
            servers: Vec::new(),
        };
        for i in 1..=backends {
            s.backend(&format!("b{i}"));
        }
        s
    }

    fn backend(&mut self, name: &str) -> String {
        self.h.ok(&["sandbox", "create", name]);
        let ep: Value = self
            .h
            .json(&["attach", name, "--network", "blue", "--label", "app=web"]);
        self.servers
            .push(Identify::start(&self.h.sandbox_path(name), name, 8080));
        crate::harness::endpoint_ip(&ep, false)
    }

    fn path(&self, sandbox: &str) -> std::path::PathBuf {
        self.h.sandbox_path(sandbox)
    }

    /// Service `web` over the app=web backends, port 80 to their 8080.
    fn web(&self) -> Value {
        self.service(&[
            "web",
            "--network",
            "blue",
            "--selector",
            "app=web",
            "--port",
            "80:8080",
        ])
    }

    fn service(&self, args: &[&str]) -> Value {
        let mut a = vec!["service", "create"];
        a.extend_from_slice(args);
        self.h.json(&a)
    }
}

fn vip(svc: &Value) -> String {
    svc["vips"][0].as_str().unwrap().to_string()
}

#[test]
fn connections_spread_over_the_matching_endpoints_and_follow_scaling() {
    let mut s = Setup::new(3);
    // An endpoint of the network without the label is no backend.
    s.h.ok(&["sandbox", "create", "other"]);
    s.h.ok(&["attach", "other", "--network", "blue", "--label", "app=db"]);
    s.servers
        .push(Identify::start(&s.path("other"), "other", 8080));
    let svc = s.service(&[
        "web",
        "--network",
        "blue",
        "--selector",
        "app=web",
        "--port",
        "80:8080/tcp",
    ]);
    let to = format!("{}:80", vip(&svc));
    assert!(vip(&svc).starts_with("10.211."), "{svc}");
    assert_eq!(svc["backends"].as_array().unwrap().len(), 3, "{svc}");

    let (counts, clients) = spread(&s.path("c"), &to, 300);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{counts:?}"
    );
    for (b, n) in &counts {
        // 100 expected each; far below that means the spread is not even.
        assert!(*n >= 60, "backend {b} got {n} of 300: {counts:?}");
    }
    // The backends see the client's own address.
    let c_ip =
        s.h.json(&["endpoint", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["netns"]["sandbox"] == "c")
            .map(|e| crate::harness::endpoint_ip(e, false))
            .unwrap();
    assert!(clients.iter().all(|c| *c == c_ip), "{:?}", &clients[..3]);

    // Scale down to one while a client loops: once a detach has returned, no connection
    // reaches that backend.
    let stop = Arc::new(AtomicBool::new(false));
    let (c_path, to2, stop2) = (s.path("c"), to.clone(), stop.clone());
    let looping = std::thread::spawn(move || {
        let mut seen: Vec<(Instant, Result<String, String>)> = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            let started = Instant::now();
            seen.push((started, ask(&c_path, &to2).map_err(|e| e.to_string())));
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(200));
    s.h.ok(&["detach", "b2", "--network", "blue"]);
    let b2_gone = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    s.h.ok(&["detach", "b3", "--network", "blue"]);
    let b3_gone = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen = looping.join().unwrap();
    assert!(seen.len() > 20, "the client loop ran {} times", seen.len());
    for (started, got) in &seen {
        let got = got
            .as_ref()
            .unwrap_or_else(|e| panic!("a connection failed: {e}"));
        if *started > b2_gone {
            assert!(
                !got.starts_with("b2 "),
                "reached b2 after its detach: {got}"
            );
        }
        if *started > b3_gone {
            assert!(got.starts_with("b1 "), "reached {got} after scaling to b1");
        }
    }
    let (counts, _) = spread(&s.path("c"), &to, 20);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b1"]);

    // Up to five: every one of them gets connections.
    for b in ["b2", "b3"] {
        // Their servers listen on every address and outlive the detach.
        s.h.ok(&["attach", b, "--network", "blue", "--label", "app=web"]);
    }
    s.backend("b4");
    s.backend("b5");
    let svc = s.h.json(&["service", "inspect", "web"]);
    assert_eq!(svc["backends"].as_array().unwrap().len(), 5, "{svc}");
    let (counts, _) = spread(&s.path("c"), &to, 250);
    assert_eq!(counts.len(), 5, "{counts:?}");
    for (b, n) in &counts {
        assert!(*n >= 20, "backend {b} got {n} of 250: {counts:?}");
    }
}

#[test]
fn a_service_without_backends_and_an_unknown_port_refuse_at_once() {
    let s = Setup::new(1);
    let svc = s.service(&[
        "nobody",
        "--network",
        "blue",
        "--selector",
        "app=none",
        "--port",
        "80",
    ]);
    assert_eq!(svc["backends"].as_array().map_or(0, Vec::len), 0);
    for to in [format!("{}:80", vip(&svc)), format!("{}:81", vip(&svc))] {
        let started = Instant::now();
        let err = ask(&s.path("c"), &to).unwrap_err();
        assert!(refused(&err), "{to}: {err}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{to}: refused only after {:?}",
            started.elapsed()
        );
    }
    // With a default route (as most hosts have), berth's rules answer: a TCP reset.
    for cmd in [
        "ip link add d0 type veth peer name d1",
        "ip link set d0 up",
        "ip link set d1 up",
        "ip addr add 192.0.2.1/24 dev d0",
        "ip route add default via 192.0.2.254 dev d0",
    ] {
        s.h.sh(&cmd.split(' ').collect::<Vec<_>>());
    }
    let err = ask(&s.path("c"), &format!("{}:80", vip(&svc))).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // UDP: an ICMP port unreachable, seen by a connected socket as a refusal.
    let to: SocketAddr = format!("{}:80", vip(&svc)).parse().unwrap();
    let sock = in_ns(&s.path("c"), || UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.connect(to).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let err = match sock.send(b"?") {
        Err(e) => e,
        Ok(_) => sock.recv(&mut [0u8; 16]).unwrap_err(),
    };
    assert!(refused(&err), "{err}");
}

/// A refusal: a reset or port unreachable from berth's rules where the host routes the
/// service range (a default route), an unreachable route where it does not (these test
/// hosts have none). Never a timeout.
fn refused(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | NetworkUnreachable | HostUnreachable
    )
}

#[test]
fn affinity_keeps_a_client_on_one_backend_and_hairpin_works() {
    let s = Setup::new(3);
    let svc = s.service(&[
        "sticky",
        "--network",
        "blue",
        "--selector",
        "app=web",
        "--port",
        "80:8080",
        "--session-affinity",
        "client-ip",
        "--affinity-timeout",
        "10m",
    ]);
    assert_eq!(svc["affinity_timeout"], 600, "{svc}");
    let to = format!("{}:80", vip(&svc));
    let (counts, _) = spread(&s.path("c"), &to, 40);
    assert_eq!(counts.len(), 1, "one client, one backend: {counts:?}");
    // Its backend leaves: the client moves to another one and stays there.
    let first = counts.keys().next().unwrap().clone();
    s.h.ok(&["detach", &first, "--network", "blue"]);
    let (counts, _) = spread(&s.path("c"), &to, 20);
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert!(!counts.contains_key(&first), "{counts:?}");

    // Hairpin: a backend reaching its own service, whichever backend answers.
    let plain = s.service(&[
        "plain",
        "--network",
        "blue",
        "--selector",
        "app=web",
        "--port",
        "80:8080",
    ]);
    let to = format!("{}:80", vip(&plain));
    let me = if first == "b1" { "b2" } else { "b1" };
    let (counts, _) = spread(&s.path(me), &to, 40);
    assert!(
        counts.contains_key(me),
        "{me} never reached itself: {counts:?}"
    );
}

#[test]
fn a_udp_flow_moves_when_its_backend_goes() {
    let s = Setup::new(2);
    let svc = s.service(&[
        "dns",
        "--network",
        "blue",
        "--selector",
        "app=web",
        "--port",
        "53:8080/udp",
    ]);
    let to: SocketAddr = format!("{}:53", vip(&svc)).parse().unwrap();
    // One socket, one source port: one conntrack flow.
    let sock = in_ns(&s.path("c"), || UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let ask_udp = || {
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            sock.send_to(b"?", to).unwrap();
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    };
    let first = ask_udp().expect("an answer through the VIP");
    let backend = first.split(' ').next().unwrap().to_string();
    for _ in 0..5 {
        assert_eq!(ask_udp().unwrap(), first, "one flow, one backend");
    }
    s.h.ok(&["detach", &backend, "--network", "blue"]);
    let moved = ask_udp().expect("the flow answered by another backend");
    assert!(!moved.starts_with(&backend), "{moved}");
}

#[test]
fn names_answer_the_vip_and_named_ports_have_srv_records() {
    let s = Setup::new(1);
    let svc = s.service(&[
        "web",
        "--network",
        "blue",
        "--selector",
        "app=web",
        "--port",
        "http=80:8080",
        "--port",
        "53/udp",
    ]);
    let v = vip(&svc);
    let dig = |args: &[&str]| {
        let mut cmd = vec!["dig", "@10.91.0.1", "+short", "+time=2", "+tries=1"];
        cmd.extend_from_slice(args);
        let out = s.h.in_netns(&s.path("c"), &cmd);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(dig(&["-q", "web"]), v);
    assert_eq!(dig(&["-q", "web.blue.berth.local"]), v);
    let srv = dig(&["-t", "SRV", "-q", "_http._tcp.web.blue.berth.local"]);
    let fields: Vec<&str> = srv.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{srv}");
    assert_eq!(fields[2], "80", "{srv}");
    assert_eq!(fields[3], "web.blue.berth.local.", "{srv}");
    let _ = BLUE_GW;
    // Gone with the service.
    s.h.ok(&["service", "rm", "web"]);
    assert_eq!(dig(&["-q", "web.blue.berth.local"]), "");
}

#[test]
fn a_daemon_restart_keeps_services_working_and_rewrites_nothing() {
    let s = Setup::new(3);
    let svc = s.web();
    let to = format!("{}:80", vip(&svc));
    let backends = || {
        run_ok(
            "nsenter",
            &[
                &format!("--net={}", s.h.netns_path()),
                "nft",
                "list",
                "map",
                "inet",
                "berth",
                "backends4",
            ],
        )
    };
    let before = backends();
    assert!(before.contains(":"), "{before}");
    let stop = Arc::new(AtomicBool::new(false));
    let (c_path, to2, stop2) = (s.path("c"), to.clone(), stop.clone());
    let looping = std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut n = 0;
        while !stop2.load(Ordering::Relaxed) {
            n += 1;
            if let Err(e) = ask(&c_path, &to2) {
                failures.push(e.to_string());
            }
        }
        (n, failures)
    });
    std::thread::sleep(Duration::from_millis(200));
    s.h.stop();
    std::thread::sleep(Duration::from_millis(300));
    s.h.start();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (n, failures) = looping.join().unwrap();
    assert!(n > 20, "{n} connections");
    assert!(
        failures.is_empty(),
        "connections failed across the restart: {failures:?}"
    );
    // The same backends in the same slots: nothing was rebuilt.
    assert_eq!(backends(), before);
    let (counts, _) = spread(&s.path("c"), &to, 60);
    assert_eq!(counts.len(), 3, "{counts:?}");
}

#[test]
fn bad_service_requests_get_a_clear_error_and_change_nothing() {
    let s = Setup::new(1);
    s.service(&[
        "taken",
        "--network",
        "blue",
        "--port",
        "80",
        "--vip",
        "10.211.0.50",
    ]);
    for (args, why) in [
        (
            vec![
                "web",
                "--network",
                "blue",
                "--selector",
                "app in (web",
                "--port",
                "80",
            ],
            "invalid selector",
        ),
        (
            vec!["web", "--network", "blue", "--port", "80-90"],
            "no ranges",
        ),
        (
            vec!["web", "--network", "blue", "--port", "0"],
            "between 1 and 65535",
        ),
        (
            vec![
                "web",
                "--network",
                "blue",
                "--port",
                "80",
                "--vip",
                "10.99.0.1",
            ],
            "outside the service range",
        ),
        (
            vec![
                "web",
                "--network",
                "blue",
                "--port",
                "80",
                "--vip",
                "10.211.0.50",
            ],
            "taken by service \"taken\"",
        ),
        (
            vec!["web", "--network", "nosuch", "--port", "80"],
            "no network named",
        ),
        (
            vec!["Web", "--network", "blue", "--port", "80"],
            "DNS label",
        ),
        (
            vec!["taken", "--network", "blue", "--port", "80"],
            "already exists",
        ),
        (
            vec![
                "web",
                "--network",
                "blue",
                "--port",
                "80",
                "--publish",
                "4789",
            ],
            "outside the node-port range",
        ),
        (
            vec![
                "web",
                "--network",
                "blue",
                "--port",
                "80",
                "--affinity-timeout",
                "2d",
                "--session-affinity",
                "client-ip",
            ],
            "affinity timeout",
        ),
    ] {
        let mut a = vec!["service", "create"];
        a.extend_from_slice(&args);
        let err = s.h.fails(&a);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let all = s.h.json(&["service", "ls"]);
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    // A published service port and a container's published port cannot share a host port.
    s.service(&[
        "pub",
        "--network",
        "blue",
        "--port",
        "80",
        "--publish",
        "30080",
    ]);
    s.h.ok(&["sandbox", "create", "p"]);
    let err =
        s.h.fails(&["attach", "p", "--network", "blue", "--publish", "30080:80"]);
    assert!(err.contains("published by service \"pub\""), "{err}");
    let err = s.h.fails(&[
        "service",
        "create",
        "pub2",
        "--network",
        "blue",
        "--port",
        "80",
        "--publish",
        "30080",
    ]);
    assert!(
        err.contains("already published by service \"pub\""),
        "{err}"
    );
    // A network with a service cannot go; a network inside the service range cannot come.
    let err = s.h.fails(&["network", "rm", "blue"]);
    assert!(err.contains("has services"), "{err}");
    let err =
        s.h.fails(&["network", "create", "svcnet", "--subnet", "10.211.5.0/24"]);
    assert!(err.contains("service range"), "{err}");
    let err = s.h.fails(&["service", "rm", "nosuch"]);
    assert!(err.contains("no service named"), "{err}");
}

#[test]
fn flushed_service_maps_are_refilled() {
    let s = Setup::new(2);
    let svc = s.web();
    let to = format!("{}:80", vip(&svc));
    assert!(ask(&s.path("c"), &to).is_ok());
    // Someone empties the load balancer's maps: the VIP stops answering...
    for map in ["svc4", "backends4"] {
        s.h.sh(&["nft", "flush", "map", "inet", "berth", map]);
    }
    assert!(ask(&s.path("c"), &to).is_err());
    // ...until the daemon's periodic comparison (every 30 s) puts them back.
    let deadline = Instant::now() + Duration::from_secs(45);
    while ask(&s.path("c"), &to).is_err() {
        assert!(
            Instant::now() < deadline,
            "the service maps were not refilled:\n{}",
            s.h.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (counts, _) = spread(&s.path("c"), &to, 40);
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[test]
fn a_restart_puts_hairpin_and_bridge_netfilter_back_on_links_made_before() {
    let mut s = Setup::new(1);
    let b2 = s.backend("b2");
    let svc = s.web();
    let eps = s.h.json(&["endpoint", "ls"]);
    let veth = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| crate::harness::endpoint_ip(e, false) == b2)
        .map(|e| e["host_ifname"].as_str().unwrap().to_string())
        .unwrap();
    let bridge = s.h.json(&["network", "inspect", "blue"])["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    // As an older berth left them.
    s.h.stop();
    s.h.sh(&[
        "ip",
        "link",
        "set",
        &veth,
        "type",
        "bridge_slave",
        "hairpin",
        "off",
    ]);
    s.h.sh(&[
        "ip",
        "link",
        "set",
        &bridge,
        "type",
        "bridge",
        "nf_call_iptables",
        "0",
    ]);
    s.h.start();
    let port = s.h.sh(&["ip", "-d", "link", "show", &veth]);
    assert!(port.contains("hairpin on"), "{port}");
    let br = s.h.sh(&["ip", "-d", "link", "show", &bridge]);
    assert!(br.contains("nf_call_iptables 1"), "{br}");
    // And b2 reaches itself through its service.
    let (counts, _) = spread(&s.path("b2"), &format!("{}:80", vip(&svc)), 40);
    assert!(counts.contains_key("b2"), "{counts:?}");
}

#[test]
fn an_ipv6_network_gets_a_vip_of_each_family() {
    let h = Host::new();
    h.ok(&[
        "network",
        "create",
        "dual",
        "--subnet",
        "10.93.0.0/24",
        "--ipv6-subnet",
        "fd00:93::/64",
    ]);
    let mut servers = Vec::new();
    for b in ["b1", "b2"] {
        h.ok(&["sandbox", "create", b]);
        h.ok(&["attach", b, "--network", "dual", "--label", "app=web"]);
        servers.push(Identify::start(&h.sandbox_path(b), b, 8080));
    }
    h.ok(&["sandbox", "create", "c"]);
    let c = h.json(&["attach", "c", "--network", "dual"]);
    let svc = h.json(&[
        "service",
        "create",
        "web",
        "--network",
        "dual",
        "-l",
        "app=web",
        "--port",
        "80:8080",
    ]);
    let vips: Vec<&str> = svc["vips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(vips.len(), 2, "{svc}");
    assert!(vips[0].starts_with("10.211."), "{svc}");
    assert!(vips[1].starts_with("fd00:b5:5e7::"), "{svc}");
    let (counts, clients) = spread(&h.sandbox_path("c"), &format!("[{}]:80", vips[1]), 60);
    assert_eq!(counts.len(), 2, "{counts:?}");
    let c6 = crate::harness::endpoint_ip(&c, true);
    assert!(clients.iter().all(|ip| *ip == c6), "{:?}", &clients[..2]);
    let (counts, _) = spread(&h.sandbox_path("c"), &format!("{}:80", vips[0]), 60);
    assert_eq!(counts.len(), 2, "{counts:?}");
    // The host knows its endpoints' IPv6 neighbours from their attach (connections to a
    // backend on the same bridge are lost while it solicits), and forgets them at detach.
    let b1 = h
        .json(&["endpoint", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["netns"]["sandbox"] == "b1")
        .map(|e| crate::harness::endpoint_ip(e, true))
        .unwrap();
    let permanent = || {
        h.sh(&["ip", "-6", "neigh", "show", "nud", "permanent"])
            .lines()
            .any(|l| l.starts_with(&format!("{b1} ")))
    };
    assert!(permanent());
    h.ok(&["detach", "b1", "--network", "dual"]);
    assert!(!permanent());
}

/// `policy explain` of a connection to a VIP follows it to the service's backends, on their
/// target port, and its verdict is the traffic's.
#[test]
fn explain_through_a_vip_judges_the_backends_as_the_traffic_is_judged() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", BLUE]);
    let mut servers = Vec::new();
    for (sb, labels) in [
        ("c", &["role=client"][..]),
        ("b1", &["app=web", "tier=a"][..]),
        ("b2", &["app=web", "tier=b"][..]),
    ] {
        h.ok(&["sandbox", "create", sb]);
        let mut a = vec!["attach", sb, "--network", "blue"];
        for l in labels {
            a.extend(["--label", l]);
        }
        h.ok(&a);
        servers.push(Identify::start(&h.sandbox_path(sb), sb, 8080));
    }
    let svc = h.json(&[
        "service",
        "create",
        "web",
        "--network",
        "blue",
        "-l",
        "app=web",
        "--port",
        "80:8080",
    ]);
    let vip = vip(&svc);
    let to = format!("{vip}:80");
    let client = h.sandbox_path("c");
    let explain = |port: &str| -> Value {
        let mut a = vec!["policy", "explain", "c", vip.as_str()];
        if !port.is_empty() {
            a.push(port);
        }
        h.json(&a)
    };
    let backend_verdicts = |v: &Value| -> Vec<(String, bool)> {
        v["service"]["backends"]
            .as_array()
            .unwrap_or_else(|| panic!("backends in {v}"))
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["explanation"]["allowed"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let sorted = |mut v: Vec<(String, bool)>| {
        v.sort();
        v
    };

    // Open: allowed, also from another network (a connection the load balancer forwarded
    // passes between networks, as a published port's does).
    h.ok(&["network", "create", "red", "--subnet", "10.92.0.0/24"]);
    h.ok(&["sandbox", "create", "r"]);
    h.ok(&["attach", "r", "--network", "red"]);
    for from in ["c", "r"] {
        let v = h.json(&["policy", "explain", from, vip.as_str(), "80/tcp"]);
        assert_eq!(v["allowed"], true, "{from}: {v}");
        assert!(
            ask(&h.sandbox_path(from), &to).is_ok(),
            "{from} reaches the VIP"
        );
    }

    // Every backend refuses the client: denied, each backend judged on 8080.
    h.ok(&[
        "policy",
        "create",
        "closed",
        "--network",
        "blue",
        "-l",
        "app=web",
        "--type",
        "ingress",
    ]);
    let v = explain("80/tcp");
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(v["service"]["name"], "web", "{v}");
    assert_eq!(v["service"]["target_port"], 8080, "{v}");
    assert_eq!(
        sorted(backend_verdicts(&v)),
        [("b1".to_string(), false), ("b2".to_string(), false)]
    );
    assert_eq!(v["ingress"]["isolated_by"], json!(["closed"]), "{v}");
    let text = String::from_utf8_lossy(
        &h.berth(&["policy", "explain", "c", vip.as_str(), "80/tcp"])
            .stdout,
    )
    .into_owned();
    assert!(
        text.starts_with(&format!("denied: c -> {vip} 80/tcp\n"))
            && text.contains("service  web: to its backends' port 8080; 2 of 2 backends refuse")
            && text.contains("denied at ingress: isolated by closed"),
        "{text}"
    );
    assert!(ask(&client, &to).is_err(), "the traffic is refused too");

    // One backend refuses: some connections would fail, so denied, and which one says so.
    h.ok(&["policy", "rm", "closed"]);
    h.ok(&[
        "policy",
        "create",
        "b-closed",
        "--network",
        "blue",
        "-l",
        "tier=b",
        "--type",
        "ingress",
    ]);
    let v = explain("80/tcp");
    assert_eq!(v["allowed"], false, "{v}");
    assert_eq!(
        sorted(backend_verdicts(&v)),
        [("b1".to_string(), true), ("b2".to_string(), false)]
    );
    for _ in 0..4 {
        if let Ok(answer) = ask(&client, &to) {
            assert!(answer.starts_with("b1 "), "only b1 lets c in: {answer}");
        }
    }

    // Both let the client in on their target port: allowed, and connections pass.
    h.ok(&[
        "policy",
        "create",
        "b-from-client",
        "--network",
        "blue",
        "-l",
        "tier=b",
        "--ingress",
        "from=role=client ports=8080",
    ]);
    let v = explain("80/tcp");
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(
        sorted(backend_verdicts(&v)),
        [("b1".to_string(), true), ("b2".to_string(), true)]
    );
    let (counts, _) = spread(&client, &to, 20);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    // The rule is of the target port: a policy allowing only the service port would not do.
    h.ok(&["policy", "rm", "b-from-client"]);
    h.ok(&[
        "policy",
        "create",
        "b-port-80",
        "--network",
        "blue",
        "-l",
        "tier=b",
        "--ingress",
        "from=role=client ports=80",
    ]);
    assert_eq!(
        sorted(backend_verdicts(&explain("80/tcp"))),
        [("b1".to_string(), true), ("b2".to_string(), false)]
    );
    // A port the service does not have, or none, reaches nothing.
    for port in ["81/tcp", "80/udp", ""] {
        let v = explain(port);
        assert_eq!(v["allowed"], false, "{port}: {v}");
        assert_eq!(v["service"]["target_port"], Value::Null, "{port}: {v}");
    }
    assert!(ask(&client, &format!("{vip}:81")).is_err());
}
