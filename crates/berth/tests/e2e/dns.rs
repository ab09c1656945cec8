//! Service discovery: `dig` from sandboxes against the DNS server berth runs on each network's
//! gateway, and an upstream resolver on another host (namespace) for forwarded names.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_dns::wire;

use crate::harness::{Host, OUTSIDE_IP, Outside, ServerThreads, endpoint_ip, in_ns};

/// What `dig` saw: the status word and the answers' data, in order.
#[derive(Debug)]
struct Dug {
    status: String,
    flags: String,
    answers: Vec<String>,
}

fn dig(h: &Host, sandbox: &str, server: &str, args: &[&str]) -> Dug {
    let at = format!("@{server}");
    let mut cmd = vec![
        "dig",
        &at,
        "+time=3",
        "+tries=1",
        "+noall",
        "+answer",
        "+comments",
    ];
    cmd.extend_from_slice(args);
    let out = h.in_netns(&h.sandbox_path(sandbox), &cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.split_once(key).map(|(_, rest)| rest.to_string()))
            .unwrap_or_default()
    };
    let status = field("status: ");
    let status = status.split(',').next().unwrap_or("").to_string();
    let flags = field(";; flags: ");
    let flags = flags.split(';').next().unwrap_or("").to_string();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    Dug {
        status: if status.is_empty() {
            format!("no answer: {text}")
        } else {
            status
        },
        flags,
        answers,
    }
}

fn ip_of(h: &Host, sandbox: &str, network: &str, v6: bool) -> String {
    let eps = h.json(&["endpoint", "ls", "--network", network]);
    let ep = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["netns"]["sandbox"] == sandbox)
        .unwrap_or_else(|| panic!("{sandbox} is not on {network}"));
    endpoint_ip(ep, v6)
}

/// Two networks (blue dual-stack), sandboxes `web` (blue), `cli` (blue and red), `r1` (red).
fn two_networks(h: &Host) {
    h.ok(&[
        "network",
        "create",
        "blue",
        "--subnet",
        "10.93.0.0/24",
        "--ipv6-subnet",
        "fd00:93::/64",
    ]);
    h.ok(&["network", "create", "red", "--subnet", "10.94.0.0/24"]);
    for s in ["web", "cli", "r1"] {
        h.ok(&["sandbox", "create", s]);
    }
    h.ok(&["attach", "web", "--network", "blue", "--alias", "www"]);
    h.ok(&["attach", "cli", "--network", "blue"]);
    h.ok(&["attach", "cli", "--network", "red", "--ifname", "eth1"]);
    h.ok(&["attach", "r1", "--network", "red"]);
}

const BLUE_GW: &str = "10.93.0.1";
const RED_GW: &str = "10.94.0.1";

#[test]
fn names_are_scoped_by_network_with_aliases_ptr_and_aaaa() {
    let h = Host::new();
    two_networks(&h);
    let web = ip_of(&h, "web", "blue", false);
    let web6 = ip_of(&h, "web", "blue", true);
    let shown = h.ok(&["network", "inspect", "blue"]);
    assert!(
        shown.contains("dns       10.93.0.1 fd00:93::1 (search blue.berth.local)"),
        "{shown}"
    );

    for name in [
        "web",
        "WEB",
        "web.blue.berth.local",
        "www",
        "www.blue.berth.local.",
    ] {
        let d = dig(&h, "cli", BLUE_GW, &[name]);
        assert_eq!(
            (d.status.as_str(), d.answers.clone()),
            ("NOERROR", vec![web.clone()]),
            "{name}"
        );
        assert!(d.flags.contains("aa"), "authoritative: {d:?}");
    }
    assert_eq!(
        dig(&h, "cli", BLUE_GW, &["web", "AAAA"]).answers,
        [web6.as_str()]
    );
    assert_eq!(
        dig(&h, "cli", "fd00:93::1", &["web", "AAAA"]).answers,
        [web6.as_str()],
        "served on IPv6 too"
    );
    assert_eq!(
        dig(&h, "cli", "fd00:93::1", &["+tcp", "web"]).answers,
        [web.as_str()],
        "and over TCP"
    );
    let nodata = dig(&h, "cli", RED_GW, &["r1.red.berth.local", "AAAA"]);
    assert_eq!(
        (nodata.status.as_str(), nodata.answers.len()),
        ("NOERROR", 0),
        "a name without IPv6 is NODATA"
    );
    assert_eq!(
        dig(&h, "cli", BLUE_GW, &["nope.blue.berth.local"]).status,
        "NXDOMAIN"
    );

    // Scoping: a client sees the names of the networks it is on. web is on blue only, r1 on
    // red only, cli on both.
    let r1 = ip_of(&h, "r1", "red", false);
    assert_eq!(
        dig(&h, "r1", RED_GW, &["web.blue.berth.local"]).status,
        "NXDOMAIN"
    );
    assert_eq!(
        dig(&h, "r1", RED_GW, &["web.red.berth.local"]).status,
        "NXDOMAIN"
    );
    let short = dig(&h, "r1", RED_GW, &["web"]);
    assert!(
        short.answers.is_empty(),
        "web is not visible on red: {short:?}"
    );
    assert_eq!(
        dig(&h, "r1", RED_GW, &["cli"]).answers,
        [ip_of(&h, "cli", "red", false)]
    );
    assert_eq!(
        dig(&h, "web", BLUE_GW, &["r1.red.berth.local"]).status,
        "NXDOMAIN"
    );
    assert!(dig(&h, "web", BLUE_GW, &["-x", &r1]).answers.is_empty());
    // cli, on both, finds either network's names at either gateway (what its resolv.conf,
    // which lists blue's gateway first, relies on).
    for (server, name, want) in [
        (BLUE_GW, "r1.red.berth.local", &r1),
        (BLUE_GW, "r1", &r1),
        (RED_GW, "web.blue.berth.local", &web),
        (RED_GW, "web", &web),
    ] {
        assert_eq!(
            dig(&h, "cli", server, &[name]).answers,
            [want.as_str()],
            "{name} at {server}"
        );
    }
    assert_eq!(
        dig(&h, "cli", BLUE_GW, &["-x", &r1]).answers,
        ["r1.red.berth.local."]
    );

    // Reverse: the address's endpoint on the asking network, fully qualified.
    assert_eq!(
        dig(&h, "cli", BLUE_GW, &["-x", &web]).answers,
        ["web.blue.berth.local."]
    );
    assert_eq!(
        dig(&h, "cli", BLUE_GW, &["-x", &web6]).answers,
        ["web.blue.berth.local."]
    );
    assert_eq!(
        dig(&h, "cli", BLUE_GW, &["-x", "10.93.0.200"]).status,
        "NXDOMAIN"
    );

    // One alias on several endpoints: all addresses, in turn.
    h.ok(&["sandbox", "create", "api2"]);
    h.ok(&["attach", "api2", "--network", "blue", "--alias", "www"]);
    let api2 = ip_of(&h, "api2", "blue", false);
    let first = dig(&h, "cli", BLUE_GW, &["www"]).answers;
    let second = dig(&h, "cli", BLUE_GW, &["www"]).answers;
    let mut sorted = first.clone();
    sorted.sort();
    let mut want = vec![web.clone(), api2];
    want.sort();
    assert_eq!(sorted, want);
    assert_ne!(first, second, "round robin");
}

#[test]
fn attach_and_detach_are_visible_to_the_next_query() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.95.0.0/24"]);
    h.ok(&["sandbox", "create", "cli"]);
    h.ok(&["attach", "cli", "--network", "blue"]);
    h.ok(&["sandbox", "create", "db"]);
    for round in 0..3 {
        h.ok(&["attach", "db", "--network", "blue", "--name", "database"]);
        let ip = ip_of(&h, "db", "blue", false);
        let d = dig(&h, "cli", "10.95.0.1", &["database.blue.berth.local"]);
        assert_eq!(
            d.answers,
            [ip.as_str()],
            "round {round}: right after attach"
        );
        assert_eq!(
            dig(&h, "cli", "10.95.0.1", &["-x", &ip]).answers,
            ["database.blue.berth.local."]
        );
        h.ok(&["detach", "db", "--network", "blue"]);
        let d = dig(&h, "cli", "10.95.0.1", &["database.blue.berth.local"]);
        assert_eq!(d.status, "NXDOMAIN", "round {round}: right after detach");
        assert_eq!(dig(&h, "cli", "10.95.0.1", &["-x", &ip]).status, "NXDOMAIN");
    }
    // A daemon restart knows the names from the store, and the removed network is silent.
    h.ok(&["attach", "db", "--network", "blue", "--name", "database"]);
    h.stop();
    h.start();
    assert_eq!(
        dig(&h, "cli", "10.95.0.1", &["database"]).answers,
        [ip_of(&h, "db", "blue", false)]
    );
    h.ok(&["sandbox", "rm", "db"]);
    h.ok(&["sandbox", "rm", "cli"]);
    h.ok(&["network", "rm", "blue"]);
    let listening = h.sh(&["ss", "-lnu"]);
    assert!(
        !listening.contains("10.95.0.1:53"),
        "still listening:\n{listening}"
    );
    // The same network again, at once: its gateway is free to listen on and names resolve.
    h.ok(&["network", "create", "blue", "--subnet", "10.95.0.0/24"]);
    h.ok(&["sandbox", "create", "cli"]);
    h.ok(&["attach", "cli", "--network", "blue", "--name", "again"]);
    assert_eq!(
        dig(&h, "cli", "10.95.0.1", &["again"]).answers,
        [ip_of(&h, "cli", "blue", false)]
    );
}

/// An upstream resolver on another host: A 198.51.100.7 for every name, except `big.example`
/// (40 addresses: truncated over UDP, whole over TCP) and `silent.example` (never answers).
struct Upstream {
    /// Held for its drop, which stops the threads.
    _serving: ServerThreads,
}

const UPSTREAM_ANSWER: &str = "198.51.100.7";

fn upstream_answer(msg: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let q = wire::parse_query(msg).ok()?;
    let records: Vec<wire::Record> = match q.name.as_str() {
        "silent.example" => return None,
        "big.example" => (1..=40u8)
            .map(|i| wire::Record::Addr([198, 51, 100, i].into()))
            .collect(),
        _ => vec![wire::Record::Addr(UPSTREAM_ANSWER.parse().unwrap())],
    };
    let limit = if tcp { 65535 } else { q.udp_limit() };
    Some(wire::answer(
        &q,
        wire::RCODE_NOERROR,
        false,
        &records,
        60,
        limit,
    ))
}

impl Upstream {
    fn start(netns: &Path) -> Upstream {
        use std::io::{Read, Write};
        let addr: SocketAddr = format!("{OUTSIDE_IP}:53").parse().unwrap();
        let (udp, tcp) = in_ns(netns, || {
            (
                UdpSocket::bind(addr).unwrap(),
                TcpListener::bind(addr).unwrap(),
            )
        });
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s1 = stop.clone();
        let t1 = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s1.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf)
                    && let Some(a) = upstream_answer(&buf[..n], false)
                {
                    let _ = udp.send_to(&a, peer);
                }
            }
        });
        let s2 = stop.clone();
        let t2 = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if c.read_exact(&mut msg).is_ok()
                    && let Some(a) = upstream_answer(&msg, true)
                {
                    let mut framed = (a.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&a);
                    let _ = c.write_all(&framed);
                }
            }
        });
        Upstream {
            _serving: ServerThreads {
                stop,
                threads: vec![t1, t2],
            },
        }
    }
}

#[test]
fn other_names_are_forwarded_upstream_with_tcp_fallback() {
    let h = Host::new();
    let out = Outside::new(&h);
    let _upstream = Upstream::start(&out.path());
    std::fs::write(
        h.resolv_conf(),
        format!("# the host's resolvers\nnameserver {OUTSIDE_IP}\n"),
    )
    .unwrap();
    h.ok(&["network", "create", "blue", "--subnet", "10.96.0.0/24"]);
    h.ok(&[
        "network",
        "create",
        "sealed",
        "--subnet",
        "10.97.0.0/24",
        "--internal",
    ]);
    h.ok(&["sandbox", "create", "cli"]);
    h.ok(&["attach", "cli", "--network", "blue"]);
    h.ok(&["attach", "cli", "--network", "sealed", "--ifname", "eth1"]);

    let d = dig(&h, "cli", "10.96.0.1", &["example.org"]);
    assert_eq!(
        (d.status.as_str(), d.answers.clone()),
        ("NOERROR", vec![UPSTREAM_ANSWER.to_string()]),
        "{d:?}"
    );
    assert!(
        !d.flags.contains("aa"),
        "forwarded answers are not ours: {d:?}"
    );
    let over_tcp = dig(&h, "cli", "10.96.0.1", &["+tcp", "example.org"]);
    assert_eq!(over_tcp.answers, [UPSTREAM_ANSWER]);

    // Truncated over UDP: the client sees TC and retries over TCP, which berth forwards
    // over TCP too.
    let cut = dig(
        &h,
        "cli",
        "10.96.0.1",
        &["+ignore", "+noedns", "big.example"],
    );
    assert!(cut.flags.split_whitespace().any(|f| f == "tc"), "{cut:?}");
    let whole = dig(&h, "cli", "10.96.0.1", &["+noedns", "big.example"]);
    assert_eq!(whole.answers.len(), 40, "{whole:?}");

    // An upstream that never answers: SERVFAIL, well before the client gives up.
    let t = Instant::now();
    let d = dig(&h, "cli", "10.96.0.1", &["+time=5", "silent.example"]);
    assert_eq!(d.status, "SERVFAIL");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );

    // The resolvers are re-read when the file changes.
    std::fs::write(h.resolv_conf(), "nameserver 192.0.2.99\n").unwrap();
    assert_eq!(
        dig(&h, "cli", "10.96.0.1", &["example.org"]).status,
        "SERVFAIL"
    );
    std::fs::write(h.resolv_conf(), format!("nameserver {OUTSIDE_IP}\n")).unwrap();
    assert_eq!(
        dig(&h, "cli", "10.96.0.1", &["example.org"]).answers,
        [UPSTREAM_ANSWER]
    );

    // An internal network answers for itself and forwards nothing.
    assert_eq!(
        dig(&h, "cli", "10.97.0.1", &["cli"]).answers,
        [ip_of(&h, "cli", "sealed", false)]
    );
    assert_eq!(
        dig(&h, "cli", "10.97.0.1", &["example.org"]).status,
        "REFUSED"
    );
}

#[test]
fn sandboxes_resolve_names_through_their_resolv_conf() {
    let h = Host::new();
    two_networks(&h);
    let conf = h.sandbox_etc_dir().join("cli/resolv.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert_eq!(
        text,
        "# written by berth for sandbox cli\nnameserver 10.93.0.1\nnameserver 10.94.0.1\nnameserver fd00:93::1\nsearch blue.berth.local red.berth.local\n"
    );
    // What `ip netns exec cli` does: the file mounted over /etc/resolv.conf, in a private
    // mount namespace. glibc's resolver then finds short names through the search list.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && getent ahostsv4 web && getent ahostsv4 r1",
        conf.display()
    );
    let out = h.in_netns(
        &h.sandbox_path("cli"),
        &["unshare", "-m", "sh", "-c", &script],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&ip_of(&h, "web", "blue", false)), "{text}");
    assert!(text.contains(&ip_of(&h, "r1", "red", false)), "{text}");

    h.ok(&["detach", "cli", "--network", "red"]);
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        !text.contains("10.94.0.1") && !text.contains("red.berth.local"),
        "{text}"
    );
    h.ok(&["sandbox", "rm", "cli"]);
    assert!(
        !conf.parent().unwrap().exists(),
        "resolv.conf removed with the sandbox"
    );
}

#[test]
fn stalled_tcp_clients_and_garbage_do_not_stop_answers() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.98.0.0/24"]);
    for sb in ["cli", "other"] {
        h.ok(&["sandbox", "create", sb]);
        h.ok(&["attach", sb, "--network", "blue"]);
    }
    let ip = ip_of(&h, "cli", "blue", false);
    let server: SocketAddr = "10.98.0.1:53".parse().unwrap();
    let path = h.sandbox_path("cli");
    let held = in_ns(&path, || {
        use std::io::Write;
        // More half-sent TCP queries than the server takes at once, held open.
        let mut held = Vec::new();
        for _ in 0..100 {
            if let Ok(mut c) = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(1))
            {
                let _ = c.write_all(&[0]);
                held.push(c);
            }
        }
        // Garbage and oversized datagrams.
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..2000usize {
            let len = if i % 100 == 0 { 9000 } else { i % 300 };
            let junk: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
            let _ = udp.send_to(&junk, server);
        }
        held
    });
    let t = Instant::now();
    for _ in 0..20 {
        let d = dig(&h, "cli", "10.98.0.1", &["cli"]);
        assert_eq!(d.answers, [ip.as_str()], "{d:?}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "20 queries took {:?}",
        t.elapsed()
    );
    // One client's stalled connections do not take every TCP slot: another client's TCP
    // query (what a truncated UDP answer sends it to) is answered meanwhile.
    assert_eq!(
        dig(&h, "other", "10.98.0.1", &["+tcp", "cli"]).answers,
        [ip.as_str()]
    );
    drop(held);
    // Once the stalled clients are gone, TCP answers again.
    h.eventually("TCP answers again", || {
        dig(&h, "cli", "10.98.0.1", &["+tcp", "cli"]).answers == [ip.as_str()]
    });
    assert!(!h.log().contains("panicked"));
}

/// A query for `name` (type A, recursion desired) as it goes on the wire.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, wire::TYPE_A as u8, 0, wire::CLASS_IN as u8]);
    q
}

fn rcode(answer: &[u8]) -> u8 {
    answer[3] & 0xf
}

/// A TCP connection to `server` from `source` (else any address) of the namespace the calling
/// thread is in.
fn tcp_from(source: Option<Ipv4Addr>, server: SocketAddrV4) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(ip) = source {
        sock.bind(&SocketAddrV4::new(ip, 0).into())?;
    }
    sock.connect(&server.into())?;
    Ok(sock.into())
}

/// A connection that stalls: half a query's length prefix (odd `n`) or nothing at all.
fn stalled(source: Option<Ipv4Addr>, server: SocketAddrV4, n: usize) -> TcpStream {
    use std::io::Write;
    let mut c = tcp_from(source, server).unwrap();
    if n % 2 == 1 {
        c.write_all(&[0]).unwrap();
    }
    c
}

/// One query over a TCP connection: the answer.
fn tcp_query(c: &mut TcpStream, query: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    c.write_all(&framed)?;
    let mut len = [0u8; 2];
    c.read_exact(&mut len)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    c.read_exact(&mut answer)?;
    Ok(answer)
}

/// Whether the server still holds `c` open (nothing to read, no end of stream, no reset).
fn still_open(c: &TcpStream) -> bool {
    c.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let open = matches!(c.peek(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    c.set_nonblocking(false).unwrap();
    open
}

#[test]
fn stalled_tcp_connections_from_many_addresses_do_not_keep_a_newcomer_out() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.99.0.0/24"]);
    let stallers: Vec<String> = (0..9).map(|i| format!("s{i}")).collect();
    for sb in ["cli", "hog"]
        .into_iter()
        .chain(stallers.iter().map(String::as_str))
    {
        h.ok(&["sandbox", "create", sb]);
        h.ok(&["attach", sb, "--network", "blue"]);
    }
    let cli = ip_of(&h, "cli", "blue", false);
    let server = SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 1), 53);
    // What every phase checks, within the stalled connections' idle timeout (5 s): the
    // newcomer's TCP and UDP queries are answered at once.
    let answered_promptly = |what: &str| {
        let t = Instant::now();
        let tcp = dig(&h, "cli", "10.99.0.1", &["+tcp", "cli"]);
        assert_eq!(tcp.answers, [cli.as_str()], "{what}: over TCP {tcp:?}");
        let udp = dig(&h, "cli", "10.99.0.1", &["cli"]);
        assert_eq!(udp.answers, [cli.as_str()], "{what}: over UDP {udp:?}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{what}: took {:?}",
            t.elapsed()
        );
    };

    // Twenty-four addresses on one sandbox's interface, eight stalled connections from each:
    // three times the listener's 64 slots.
    let hog = h.sandbox_path("hog");
    let extra: Vec<Ipv4Addr> = (0..24).map(|i| Ipv4Addr::new(10, 99, 0, 200 + i)).collect();
    for ip in &extra {
        let added = h.in_netns(
            &hog,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        assert!(added.status.success(), "{added:?}");
    }
    let held = in_ns(&hog, || {
        (0..8 * extra.len())
            .map(|n| stalled(Some(extra[n % extra.len()]), server, n))
            .collect::<Vec<_>>()
    });
    answered_promptly("24 addresses of one sandbox, 8 stalled connections each");
    drop(held);

    // Nine sandboxes, each with as many stalled connections as one client may hold: more
    // than all slots. Newcomers displace the longest-idle.
    let held: Vec<TcpStream> = stallers
        .iter()
        .flat_map(|s| {
            in_ns(&h.sandbox_path(s), || {
                (0..8).map(|n| stalled(None, server, n)).collect::<Vec<_>>()
            })
        })
        .collect();
    answered_promptly("9 sandboxes, 8 stalled connections each");
    let open = held.iter().filter(|c| still_open(c)).count();
    assert!(open <= 63, "{open} of 72 stalled connections still open");
    drop(held);

    // A client over its own cap: its newest connection displaces its own longest-idle one.
    let (held, answer) = in_ns(&hog, || {
        let held: Vec<TcpStream> = (0..12).map(|n| stalled(None, server, n)).collect();
        let mut fresh = tcp_from(None, server).unwrap();
        (held, tcp_query(&mut fresh, &a_query(7, "cli")))
    });
    let answer = answer.expect("a client at its cap is answered on a new connection");
    assert_eq!(rcode(&answer), wire::RCODE_NOERROR);
    h.eventually("the client holds no more than its cap", || {
        held.iter().filter(|c| still_open(c)).count() <= 7
    });
    assert!(!h.log().contains("panicked"));
}

/// Sends `count` queries for `name` from `sock` to `server`, `per_tick` every 10 ms, while a
/// thread counts the answers by RCODE; the counts and how long the sending took.
fn flood(
    sock: UdpSocket,
    server: SocketAddr,
    name: &str,
    count: usize,
    per_tick: usize,
) -> ([usize; 16], Duration) {
    let reader = sock.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let counting = std::thread::spawn(move || {
        let mut seen = [0usize; 16];
        let mut buf = [0u8; 1500];
        while let Ok(n) = reader.recv(&mut buf) {
            if n >= 12 {
                seen[usize::from(rcode(&buf[..n]))] += 1;
            }
        }
        seen
    });
    let t = Instant::now();
    for i in 0..count {
        // ENOBUFS when the socket's queue is full: that query is lost, as on a real flood.
        let _ = sock.send_to(&a_query(i as u16, name), server);
        if i % per_tick == per_tick - 1 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let took = t.elapsed();
    (counting.join().unwrap(), took)
}

/// Latencies of `count` queries, one every `every`, each waited for at most a second (a lost
/// one counts as a second), sorted.
fn latencies(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
    count: usize,
    every: Duration,
) -> Vec<Duration> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 1500];
    let mut seen = Vec::new();
    for i in 0..count {
        let t = Instant::now();
        let id = i as u16;
        sock.send_to(&a_query(id, name), server).unwrap();
        // Late answers to earlier (lost) queries are skipped.
        let answered = loop {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() => break Some(n),
                Ok(_) => continue,
                Err(_) if t.elapsed() < Duration::from_secs(1) => continue,
                Err(_) => break None,
            }
        };
        seen.push(t.elapsed());
        if let Some(n) = answered {
            assert_eq!(rcode(&buf[..n]), wire::RCODE_NOERROR);
        }
        std::thread::sleep(every.saturating_sub(t.elapsed()));
    }
    seen.sort();
    seen
}

#[test]
fn a_udp_flood_is_held_to_its_clients_rate_and_others_keep_their_latency() {
    // By default a small rate keeps the run short; BERTH_STRESS=1 floods at the reported
    // 42,000 queries a second for 10 s against the default rate.
    let stress = std::env::var("BERTH_STRESS").is_ok_and(|v| v == "1");
    let qps = if stress {
        berth_dns::DEFAULT_CLIENT_QPS as usize
    } else {
        200
    };
    let (count, per_tick) = if stress { (420_000, 420) } else { (2_000, 20) };
    let (probes, every) = if stress {
        (2_000, Duration::from_millis(5))
    } else {
        (40, Duration::from_millis(25))
    };
    let h = Host::bare();
    h.start_with(|c| {
        c.args(["--dns-client-qps", &qps.to_string()]);
    });
    two_networks(&h);
    let bind = |sandbox: &str| {
        in_ns(&h.sandbox_path(sandbox), || {
            UdpSocket::bind("0.0.0.0:0").unwrap()
        })
    };
    let (flooder, neighbour, elsewhere) = (bind("web"), bind("cli"), bind("r1"));
    let blue: SocketAddr = format!("{BLUE_GW}:53").parse().unwrap();
    let red: SocketAddr = format!("{RED_GW}:53").parse().unwrap();
    // Neighbours resolved first: a first packet may wait a second for an ARP retry.
    for (sandbox, server, name) in [
        ("web", BLUE_GW, "web"),
        ("cli", BLUE_GW, "cli"),
        ("r1", RED_GW, "r1"),
    ] {
        assert_eq!(dig(&h, sandbox, server, &[name]).status, "NOERROR");
    }
    // web floods blue's server; meanwhile cli asks it too, and r1 asks red's.
    let ((seen, took), same, other) = std::thread::scope(|s| {
        let flooding = s.spawn(|| flood(flooder, blue, "web", count, per_tick));
        let same = s.spawn(|| latencies(&neighbour, blue, "cli", probes, every));
        let other = latencies(&elsewhere, red, "r1", probes, every);
        (flooding.join().unwrap(), same.join().unwrap(), other)
    });
    let (answered, refused) = (seen[0], seen[usize::from(wire::RCODE_REFUSED)]);
    let allowed = qps as f64 * (1.0 + took.as_secs_f64());
    eprintln!(
        "{count} queries in {took:?}: {answered} answered, {refused} refused; latency of another client on the network p50 {:?} p99 {:?} max {:?}, on another network p50 {:?} p99 {:?} max {:?}",
        same[same.len() / 2],
        same[same.len() * 99 / 100],
        same[same.len() - 1],
        other[other.len() / 2],
        other[other.len() * 99 / 100],
        other[other.len() - 1],
    );
    // At most the rate answered, as many refused, the rest dropped.
    for (what, n) in [("answered", answered), ("refused", refused)] {
        assert!(
            n as f64 <= allowed * 1.1 + 10.0,
            "{n} {what} in {took:?}, the rate allows {allowed}: {seen:?}"
        );
    }
    assert!(refused >= qps / 2, "{refused} refused: {seen:?}");
    assert!(
        !stress || answered + refused < count / 2,
        "most of a flood is dropped: {seen:?}"
    );
    // The reported fault was a p99 of 56 ms on another network. By default, with 40 probes
    // beside other tests, the median, and no probe lost.
    let (at, bound) = if stress { (99, 50) } else { (50, 20) };
    for (probes, what) in [
        (&same, "on the flooded network"),
        (&other, "on another network"),
    ] {
        let latency = probes[probes.len() * at / 100];
        assert!(
            latency < Duration::from_millis(bound),
            "{what}: p{at} {latency:?} {probes:?}"
        );
        assert!(
            stress || probes[probes.len() - 1] < Duration::from_secs(1),
            "{what}: a probe was lost {probes:?}"
        );
    }
    assert!(!h.log().contains("panicked"));
}

#[test]
fn one_client_cannot_take_every_upstream_slot() {
    let h = Host::new();
    let out = Outside::new(&h);
    let _upstream = Upstream::start(&out.path());
    std::fs::write(h.resolv_conf(), format!("nameserver {OUTSIDE_IP}\n")).unwrap();
    h.ok(&["network", "create", "blue", "--subnet", "10.96.0.0/24"]);
    for sb in ["hog", "cli"] {
        h.ok(&["sandbox", "create", sb]);
        h.ok(&["attach", sb, "--network", "blue"]);
    }
    let server: SocketAddr = "10.96.0.1:53".parse().unwrap();
    // hog asks 300 names the upstream never answers (each held 1.5 s): more than the network's
    // 256 forwards in flight.
    // Neighbours resolved first: a first packet may wait a second for an ARP retry.
    assert_eq!(dig(&h, "hog", "10.96.0.1", &["hog"]).status, "NOERROR");
    let hog = in_ns(&h.sandbox_path("hog"), || {
        UdpSocket::bind("0.0.0.0:0").unwrap()
    });
    hog.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    for i in 0..300u16 {
        hog.send_to(&a_query(i, "silent.example"), server).unwrap();
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Beyond its own share, hog is refused at once; the others' forwards still go out.
    let mut seen = [0usize; 16];
    let mut buf = [0u8; 1500];
    while seen[usize::from(wire::RCODE_REFUSED)] < 250 {
        let Ok(n) = hog.recv(&mut buf) else { break };
        seen[usize::from(rcode(&buf[..n]))] += 1;
    }
    assert_eq!(
        seen[usize::from(wire::RCODE_REFUSED)],
        250,
        "50 in flight (the default rate's), the rest refused: {seen:?}"
    );
    let d = dig(&h, "cli", "10.96.0.1", &["example.org"]);
    assert_eq!(
        (d.status.as_str(), d.answers.clone()),
        ("NOERROR", vec![UPSTREAM_ANSWER.to_string()]),
        "{d:?}"
    );
    // hog's own forwards end as usual: SERVFAIL when the upstream does not answer.
    hog.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let n = hog.recv(&mut buf).unwrap();
    assert_eq!(rcode(&buf[..n]), wire::RCODE_SERVFAIL);
}
