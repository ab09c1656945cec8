//! Network policy against the real kernel, with real traffic. The test builds its own private
//! namespaces with `ip netns add` (deleted by a guard, also when an assertion fails): a "host"
//! with berth's table and a bridge `br0` whose traffic passes netfilter (as berth's bridges'
//! does), and containers a, b and c on it. The test's thread enters the host; clients and
//! servers are sockets made on threads that enter the containers' namespaces. The machine's own
//! network namespace is never touched.

mod common;

use common::{enter, in_ns, ip, output, routing_netns, run};

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_dataplane::Netlink;
use berth_dataplane::conntrack;
use berth_dataplane::nftables::{
    self, Backend, Frontend, LoadBalancer, NetworkRules, Pool, ServiceRules,
};
use berth_model::Protocol::{self, Tcp};
use berth_policy::{
    AddrRange, ClassId,
    Direction::{self, Egress, Ingress},
    PolicyElement, ProfileId,
};
use nix::sched::CloneFlags;

/// How long a connection that should not happen is waited for.
const BLOCKED: Duration = Duration::from_millis(400);
/// How long one that should happen may take, at most.
const ALLOWED: Duration = Duration::from_secs(3);

/// Private namespaces, deleted when dropped.
struct Lab {
    /// `(role, namespace)`
    names: Vec<(String, String)>,
}

impl Lab {
    /// A host with `br0` (10.60.0.1, fd60::1) and containers a, b, c on it (10.60.0.2 to .4,
    /// fd60::2 to ::4). The calling thread enters the host.
    fn new(tag: &str) -> Lab {
        let mut lab = Lab { names: Vec::new() };
        for role in ["h", "a", "b", "c"] {
            let name = format!("bpo{}{tag}{role}", std::process::id());
            // Recorded before it exists, so a half-made lab is still cleaned up.
            lab.names.push((role.to_string(), name.clone()));
            routing_netns(&name);
        }
        let h = lab.ns("h");
        ip(&h, &["link", "add", "br0", "type", "bridge"]);
        ip(&h, &["addr", "add", "10.60.0.1/24", "dev", "br0"]);
        ip(&h, &["addr", "add", "fd60::1/64", "dev", "br0", "nodad"]);
        ip(&h, &["link", "set", "br0", "up"]);
        for (i, role) in ["a", "b", "c"].into_iter().enumerate() {
            let ns = lab.ns(role);
            let host_if = format!("v{role}");
            ip(
                &h,
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            ip(&h, &["link", "set", &host_if, "master", "br0"]);
            ip(&h, &["link", "set", &host_if, "up"]);
            let v4 = format!("10.60.0.{}/24", i + 2);
            let v6 = format!("fd60::{}/64", i + 2);
            ip(&ns, &["addr", "add", &v4, "dev", "eth0"]);
            ip(&ns, &["addr", "add", &v6, "dev", "eth0", "nodad"]);
            ip(&ns, &["link", "set", "eth0", "up"]);
            ip(&ns, &["route", "add", "default", "via", "10.60.0.1"]);
            ip(&ns, &["-6", "route", "add", "default", "via", "fd60::1"]);
        }
        enter(&h);
        Netlink::open()
            .unwrap()
            .set_bridge_netfilter("br0")
            .unwrap();
        lab
    }

    fn ns(&self, role: &str) -> String {
        let (_, name) = self.names.iter().find(|(r, _)| r == role).expect("a role");
        name.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, n) in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn networks() -> Vec<NetworkRules> {
    vec![NetworkRules {
        bridge: "br0".into(),
        internal: false,
        subnets: vec![
            "10.60.0.0/24".parse().unwrap(),
            "fd60::/64".parse().unwrap(),
        ],
        dns: vec![],
    }]
}

fn services() -> ServiceRules {
    ServiceRules {
        ranges: vec!["10.96.0.0/16".parse().unwrap()],
        ..ServiceRules::default()
    }
}

fn install() {
    nftables::install(&networks(), &[], &services()).unwrap();
}

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

/// A TCP server on every address of namespace `ns`.
fn listen(ns: &str, port: u16) -> TcpListener {
    in_ns(ns, move || TcpListener::bind(("::", port)).unwrap())
}

fn tcp(ns: &str, to: SocketAddr, wait: Duration) -> std::io::Result<TcpStream> {
    in_ns(ns, move || TcpStream::connect_timeout(&to, wait))
}

/// A connection from `ns` that must happen.
fn connects(ns: &str, to: SocketAddr) -> TcpStream {
    tcp(ns, to, ALLOWED).unwrap_or_else(|e| panic!("{ns} to {to}: {e}"))
}

/// A connection from `ns` that must not happen: its SYN is dropped, not refused.
fn blocked(ns: &str, to: SocketAddr) {
    match tcp(ns, to, BLOCKED) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!("{ns} to {to}: {other:?}"),
    }
}

/// The connection of `client` that `listener` has queued (earlier ones are accepted and
/// dropped).
fn accept(listener: &TcpListener, client: &TcpStream) -> TcpStream {
    let want = client.local_addr().unwrap();
    loop {
        let (s, peer) = listener.accept().unwrap();
        if peer.ip().to_canonical() == want.ip() && peer.port() == want.port() {
            return s;
        }
    }
}

/// Whether one byte written to `from` arrives at `to` soon enough.
fn arrives(from: &mut TcpStream, to: &mut TcpStream, wait: Duration) -> bool {
    from.write_all(b"x").unwrap();
    to.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0; 1];
    match to.read(&mut buf) {
        Ok(n) => n == 1,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) => panic!("{e}"),
    }
}

/// Whether a datagram from namespace `ns` reaches `server` (at `to`).
fn udp_arrives(ns: &str, server: &UdpSocket, to: SocketAddr) -> bool {
    let client = in_ns(ns, move || {
        let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        UdpSocket::bind(any).unwrap()
    });
    client.send_to(b"x", to).unwrap();
    server.set_read_timeout(Some(BLOCKED)).unwrap();
    server.recv_from(&mut [0; 16]).is_ok()
}

/// Whether namespace `ns` gets an answer to one ping within `wait`.
fn pings(ns: &str, to: &str, wait: Duration) -> bool {
    let wait = format!("{:.1}", wait.as_secs_f32());
    output(
        "ip",
        &[
            "netns", "exec", ns, "ping", "-n", "-c", "1", "-W", &wait, to,
        ],
    )
    .status
    .success()
}

/// The link-local address of `eth0` in namespace `ns`.
fn link_local(ns: &str) -> std::net::Ipv6Addr {
    let out = ip(
        ns,
        &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"],
    );
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address in {ns}: {out}"))
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Profile numbers the tests use: `B_IN` judges B's ingress, and so on.
const B_IN: ProfileId = 1;
const A_EG: ProfileId = 2;
const SWAPPED: ProfileId = 3;
const CLASS: ClassId = 7;

/// A profile (its chain) and a target that it judges.
fn isolated(direction: Direction, target: &str, profile: ProfileId) -> [PolicyElement; 2] {
    [
        PolicyElement::Profile { direction, profile },
        PolicyElement::Target {
            direction,
            target: addr(target),
            profile,
        },
    ]
}

fn one(peer: &str) -> AddrRange {
    AddrRange {
        first: addr(peer),
        last: addr(peer),
    }
}

fn any(direction: Direction, profile: ProfileId, peer: &str) -> PolicyElement {
    PolicyElement::Any {
        direction,
        profile,
        peers: one(peer),
    }
}

/// The elements that let `peer` reach `port`: the port leads to a class, which admits the
/// peer.
fn port(
    direction: Direction,
    profile: ProfileId,
    peer: &str,
    protocol: Protocol,
    port: u16,
) -> [PolicyElement; 3] {
    [
        PolicyElement::Class {
            direction,
            profile,
            class: CLASS,
        },
        PolicyElement::Peers {
            direction,
            profile,
            class: CLASS,
            peers: one(peer),
        },
        PolicyElement::Ports {
            direction,
            profile,
            protocol,
            ports: (port, port),
            class: CLASS,
        },
    ]
}

/// The kernel holds exactly `want`, and the rest of the table is as installed.
fn holds(want: &[PolicyElement]) {
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(nftables::PolicySets::new().elements().unwrap(), want);
    assert_eq!(
        nftables::check(&networks(), &[], &services()).unwrap(),
        Vec::<String>::new()
    );
}

/// What `counter drop` in chain `chain` counted.
fn dropped(chain: &str) -> u64 {
    let text = run("nft", &["list", "chain", "inet", "berth", chain]);
    let at = text.find("counter packets ").expect("a counter") + "counter packets ".len();
    text[at..].split(' ').next().unwrap().parse().unwrap()
}

const A: &str = "10.60.0.2";
const B: &str = "10.60.0.3";
const C: &str = "10.60.0.4";
const GW: &str = "10.60.0.1";
const A6: &str = "fd60::2";
const B6: &str = "fd60::3";

#[test]
fn policy_isolates_allows_and_revokes() {
    let lab = Lab::new("p");
    let (a, b, c) = (lab.ns("a"), lab.ns("b"), lab.ns("c"));
    let web_b = listen(&b, 8080);
    let _admin_b = listen(&b, 8081);
    let _web_c = listen(&c, 8080);
    let web_a = listen(&a, 9000);
    let gateway = TcpListener::bind(("::", 8080)).unwrap();
    let udp_b = in_ns(&b, || UdpSocket::bind(("::", 8080)).unwrap());

    // No elements: everything passes.
    install();
    holds(&[]);
    connects(&a, sa(B, 8080));
    assert!(pings(&a, B, ALLOWED));

    // B isolated for ingress: nothing reaches it, but its own connections and their
    // replies pass.
    let iso_b = isolated(Ingress, B, B_IN);
    nftables::PolicySets::new().apply(&[], &iso_b).unwrap();
    holds(&iso_b);
    blocked(&a, sa(B, 8080));
    blocked(&c, sa(B, 8080));
    assert!(!pings(&a, B, BLOCKED));
    assert!(pings(&b, A, ALLOWED));
    let mut out = connects(&b, sa(A, 9000));
    let mut there = accept(&web_a, &out);
    assert!(arrives(&mut out, &mut there, ALLOWED) && arrives(&mut there, &mut out, ALLOWED));
    assert!(dropped("pol_in_00000001") > 0);

    // Port 8080 over TCP from A: that, and nothing else.
    let web_from_a = port(Ingress, B_IN, A, Tcp, 8080);
    nftables::PolicySets::new().apply(&[], &web_from_a).unwrap();
    holds(&[&iso_b[..], &web_from_a].concat());
    connects(&a, sa(B, 8080));
    blocked(&a, sa(B, 8081));
    blocked(&c, sa(B, 8080));
    assert!(!udp_arrives(&a, &udp_b, sa(B, 8080)));
    // Anything from A: ping and UDP too, until it is taken back.
    let all_from_a = any(Ingress, B_IN, A);
    nftables::PolicySets::new()
        .apply(&[], &[all_from_a])
        .unwrap();
    assert!(pings(&a, B, ALLOWED));
    assert!(udp_arrives(&a, &udp_b, sa(B, 8080)));
    nftables::PolicySets::new()
        .apply(&[all_from_a], &[])
        .unwrap();
    assert!(!udp_arrives(&a, &udp_b, sa(B, 8080)));
    holds(&[&iso_b[..], &web_from_a].concat());
    // One peer, one port, without a class: a pair.
    let admin_from_a = PolicyElement::Pair {
        direction: Ingress,
        profile: B_IN,
        peer: addr(A),
        protocol: Tcp,
        port: 8081,
    };
    nftables::PolicySets::new()
        .apply(&[], &[admin_from_a])
        .unwrap();
    connects(&a, sa(B, 8081));
    blocked(&c, sa(B, 8081));
    nftables::PolicySets::new()
        .apply(&[admin_from_a], &[])
        .unwrap();
    blocked(&a, sa(B, 8081));
    holds(&[&iso_b[..], &web_from_a].concat());

    // Revoked with two connections open, whose flows are then deleted: neither a client's
    // next segment nor (picked up by conntrack as a connection of B's) a server's arrives.
    let mut c1 = connects(&a, sa(B, 8080));
    let mut s1 = accept(&web_b, &c1);
    let mut c2 = connects(&a, sa(B, 8080));
    let mut s2 = accept(&web_b, &c2);
    assert!(arrives(&mut c1, &mut s1, ALLOWED) && arrives(&mut c2, &mut s2, ALLOWED));
    nftables::PolicySets::new().apply(&web_from_a, &[]).unwrap();
    assert!(
        arrives(&mut c1, &mut s1, ALLOWED),
        "established flows go on"
    );
    let sports = [
        c1.local_addr().unwrap().port(),
        c2.local_addr().unwrap().port(),
    ];
    let condemned = |t: &conntrack::FlowTuple| {
        t.protocol == 6
            && t.src == addr(A)
            && t.dst == addr(B)
            && t.dport == Some(8080)
            && t.sport.is_some_and(|p| sports.contains(&p))
    };
    assert_eq!(
        conntrack::delete_flows_where(true, false, condemned).unwrap(),
        2
    );
    assert!(!arrives(&mut c1, &mut s1, Duration::from_secs(1)));
    assert!(!arrives(&mut s2, &mut c2, Duration::from_secs(1)));
    blocked(&a, sa(B, 8080));
    holds(&iso_b);

    // The same through a service: the flow is found by where it was forwarded to (B, not the
    // virtual IP), and ends with the permission.
    let vip = Frontend::Vip {
        vip: addr("10.96.0.10"),
        protocol: Tcp,
        port: 80,
    };
    let to_b = Backend {
        addr: addr(B),
        port: 8080,
        local: false,
    };
    let pool = Pool {
        backends: [to_b].into(),
        affinity: None,
    };
    let mut lb = LoadBalancer::from_kernel().unwrap();
    lb.apply(&[(vip, Some(pool))]).unwrap();
    nftables::PolicySets::new().apply(&[], &web_from_a).unwrap();
    let mut c3 = connects(&a, sa("10.96.0.10", 80));
    let mut s3 = accept(&web_b, &c3);
    assert!(arrives(&mut c3, &mut s3, ALLOWED));
    nftables::PolicySets::new().apply(&web_from_a, &[]).unwrap();
    let sport = c3.local_addr().unwrap().port();
    let condemned = |t: &conntrack::FlowTuple| {
        t.src == addr(A) && t.sport == Some(sport) && t.dst == addr(B) && t.dport == Some(8080)
    };
    assert_eq!(
        conntrack::delete_flows_where(true, false, condemned).unwrap(),
        1
    );
    assert!(!arrives(&mut c3, &mut s3, Duration::from_secs(1)));
    lb.apply(&[(vip, None)]).unwrap();
    holds(&iso_b);

    // A isolated for egress, allowed to B's port 8080 only: not to C, nor to its gateway
    // (the host, through `input`); connections to A still pass, and its answers.
    let egress = [
        &iso_b[..],
        &isolated(Egress, A, A_EG),
        &web_from_a,
        &port(Egress, A_EG, B, Tcp, 8080),
    ]
    .concat();
    let generation = nftables::generation().unwrap();
    nftables::PolicySets::new().replace(&egress).unwrap();
    assert_eq!(nftables::generation().unwrap(), generation + 1, "one batch");
    holds(&egress);
    connects(&a, sa(B, 8080));
    blocked(&a, sa(C, 8080));
    blocked(&a, sa(GW, 8080));
    let mut into_a = connects(&c, sa(A, 9000));
    let mut at_a = accept(&web_a, &into_a);
    assert!(arrives(&mut into_a, &mut at_a, ALLOWED) && arrives(&mut at_a, &mut into_a, ALLOWED));
    connects(&c, sa(GW, 8080));
    drop(gateway);

    // A swap, all at once: now only C reaches B (another profile), and A is free again.
    // Someone else's element, which is no policy element, goes too; a second replace has
    // nothing to write.
    run(
        "nft",
        &[
            "add",
            "element",
            "inet",
            "berth",
            "pol_in_00000001_tcp",
            "{ 9999 : accept }",
        ],
    );
    assert!(nftables::PolicySets::new().elements().is_err());
    let swapped = [
        &isolated(Ingress, B, SWAPPED)[..],
        &[any(Ingress, SWAPPED, C)],
    ]
    .concat();
    let generation = nftables::generation().unwrap();
    nftables::PolicySets::new().replace(&swapped).unwrap();
    assert_eq!(
        nftables::generation().unwrap(),
        generation + 1,
        "one batch, the stranger gone with the class that held it"
    );
    holds(&swapped);
    nftables::PolicySets::new().replace(&swapped).unwrap();
    assert_eq!(
        nftables::generation().unwrap(),
        generation + 1,
        "nothing written"
    );
    connects(&c, sa(B, 8080));
    connects(&a, sa(C, 8080));
    blocked(&a, sa(B, 8080));

    // A daemon restart installs the table again: the elements stay, and so does enforcement.
    install();
    holds(&swapped);
    blocked(&a, sa(B, 8080));

    // IPv6, every end isolated both ways: neighbour discovery still works, and so does what
    // is allowed, and only that.
    for ns in [&a, &b, &c] {
        ip(ns, &["-6", "neigh", "flush", "all"]);
    }
    // Profiles of IPv6 targets of their own: 11 and 12 for A's and B's ingress, 13 and
    // 14 for their egress; each allows only B's port 8080 from A.
    let mut v6 = [
        &port(Ingress, 12, A6, Tcp, 8080)[..],
        &port(Egress, 13, B6, Tcp, 8080),
    ]
    .concat();
    for (direction, target, profile) in [
        (Ingress, A6, 11),
        (Ingress, B6, 12),
        (Egress, A6, 13),
        (Egress, B6, 14),
    ] {
        v6.extend(isolated(direction, target, profile));
    }
    nftables::PolicySets::new().apply(&[], &v6).unwrap();
    let mut everything = swapped.to_vec();
    everything.extend(&v6);
    holds(&everything);
    let start = Instant::now();
    connects(&a, sa(B6, 8080));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    blocked(&a, sa(B6, 8081));
    blocked(&c, sa(B6, 8080));
    // Not by b's link-local address either, which no set holds, even from a, which may
    // reach b's global address.
    let b_link_local = link_local(&b);
    for from in [&a, &c] {
        // The scope is the client's own eth0 (`N: eth0@...`).
        let scope: u32 = ip(from, &["-o", "link", "show", "eth0"])
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .expect("eth0's index");
        blocked(
            from,
            SocketAddr::V6(std::net::SocketAddrV6::new(b_link_local, 8080, 0, scope)),
        );
    }
    assert!(!pings(&a, B6, BLOCKED));
    assert!(dropped("pol_in_0000000c") > 0);
    drop(lab);
}

/// The kernel's time for the policy sets' transactions as they grow, each size in a process of
/// its own with a timeout (a kernel that takes super-linear time shows as a failed test, never
/// as a machine wedged behind the nftables lock): filling the sets, one element added and
/// removed next to the others, a swap to another profile of the same size, emptying them.
/// The table is printed; `BERTH_STRESS=1` goes up to 256,000 elements.
#[test]
fn policy_transactions_stay_short_as_the_sets_grow() {
    let sizes: &[usize] = if std::env::var_os("BERTH_STRESS").is_some() {
        &[1_000, 4_000, 16_000, 64_000, 256_000]
    } else {
        &[1_000, 4_000, 16_000]
    };
    println!(
        "| elements | fill ms (tx, longest) | add one ms | remove one ms | swap ms (tx, longest) | empty ms (tx, longest) |"
    );
    let mut per_element = Vec::new();
    for &n in sizes {
        let row = step_in_child(n, Duration::from_secs(120));
        println!(
            "| {n:>8} | {:>8.1} ({:>3}, {:>5.1}) | {:>10.2} | {:>13.2} | {:>8.1} ({:>3}, {:>5.1}) | {:>9.1} ({:>3}, {:>5.1}) |",
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10]
        );
        // No transaction holds the lock for long, whatever the size (the target is 50 ms;
        // four times that leaves room for a busy machine).
        for (what, longest) in [("fill", row[2]), ("swap", row[7]), ("empty", row[10])] {
            assert!(
                longest < 200.0,
                "{what} of {n}: a transaction took {longest} ms"
            );
        }
        for (what, one) in [("add", row[3]), ("remove", row[4])] {
            assert!(one < 50.0, "{what} one next to {n}: {one} ms");
        }
        per_element.push((n, (row[0] + row[5] + row[8]) / n as f64));
    }
    // Linear, not worse: the cost per element of the largest size is within a small factor of
    // the smallest's.
    let (small, large) = (per_element[0], per_element[per_element.len() - 1]);
    assert!(
        large.1 < small.1 * 4.0 + 0.01,
        "per element: {:.4} ms at {}, {:.4} ms at {}",
        small.1,
        small.0,
        large.1,
        large.0
    );
}

/// Runs [`policy_step`] for `n` elements in a child process; its figures (see there).
fn step_in_child(n: usize, timeout: Duration) -> Vec<f64> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "policy_step", "--ignored", "--nocapture"])
        .env("BERTH_POLICY_STEP", n.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{n} elements: not done within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{n} elements: {status}: {out}");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("STEP "))
        .unwrap_or_else(|| panic!("no figures: {out}"));
    line.split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect()
}

/// One size of [`policy_transactions_stay_short_as_the_sets_grow`], in a network namespace of
/// its own: `BERTH_POLICY_STEP` elements (ranges of peers in classes of one profile, with 256
/// targets pointing at it). Prints `STEP` and, in milliseconds: fill, its transactions and the
/// longest; add one; remove one; swap, transactions, longest; empty, transactions, longest.
#[test]
#[ignore]
fn policy_step() {
    let Some(n) = std::env::var("BERTH_POLICY_STEP")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return;
    };
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare: tests run as root");
    nftables::install(&[], &[], &ServiceRules::default()).unwrap();
    let profile_of = |profile: ProfileId, n: u32| -> Vec<PolicyElement> {
        let mut out = vec![PolicyElement::Profile {
            direction: Ingress,
            profile,
        }];
        for class in 0..16 {
            out.push(PolicyElement::Class {
                direction: Ingress,
                profile,
                class,
            });
            out.push(PolicyElement::Ports {
                direction: Ingress,
                profile,
                protocol: Tcp,
                ports: (1000 + class as u16 * 10, 1005 + class as u16 * 10),
                class,
            });
        }
        out.extend((0..n).map(|i| {
            let base = 0x0b00_0000 + i * 16;
            PolicyElement::Peers {
                direction: Ingress,
                profile,
                class: i % 16,
                peers: AddrRange {
                    first: IpAddr::V4(base.into()),
                    last: IpAddr::V4((base + 9).into()),
                },
            }
        }));
        out.extend((0..256u32).map(|i| PolicyElement::Target {
            direction: Ingress,
            target: IpAddr::V4((0x0a64_0000 + i).into()),
            profile,
        }));
        out
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let timed = |f: &mut dyn FnMut() -> nftables::Applied| {
        let start = Instant::now();
        let applied = f();
        (
            ms(start.elapsed()),
            applied.transactions,
            ms(applied.longest),
        )
    };
    let mut sets = nftables::PolicySets::new();
    let first = profile_of(1, n);
    let fill = timed(&mut || sets.replace(&first).unwrap());
    assert_eq!(sets.elements().unwrap().len(), first.len());
    let extra = PolicyElement::Peers {
        direction: Ingress,
        profile: 1,
        class: 1,
        peers: one("10.99.0.1"),
    };
    let add = timed(&mut || sets.apply(&[], &[extra]).unwrap()).0;
    let remove = timed(&mut || sets.apply(&[extra], &[]).unwrap()).0;
    let second = profile_of(2, n);
    let swap = timed(&mut || sets.replace(&second).unwrap());
    assert_eq!(sets.elements().unwrap().len(), second.len());
    let empty = timed(&mut || sets.replace(&[]).unwrap());
    assert!(sets.elements().unwrap().is_empty());
    println!(
        "STEP {} {} {} {add} {remove} {} {} {} {} {} {}",
        fill.0, fill.1, fill.2, swap.0, swap.1, swap.2, empty.0, empty.1, empty.2
    );
}
