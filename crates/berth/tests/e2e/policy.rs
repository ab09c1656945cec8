//! Network policies on one host, checked against real traffic. A small model of Kubernetes
//! NetworkPolicy's meaning, written here independently of berth's compiler, says for every
//! pair of endpoints, port and address family whether a connection should pass; every one is
//! probed (TCP connects, UDP request and answer, ping), all at once, and `policy explain` must
//! agree with the model too. Then the edges: no window before an endpoint is isolated,
//! revocation of established flows, daemon restarts, and bad input.
//!
//! The model and the probes are shared with `multihost_policy.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{BERTH, Host, ServerThreads, endpoint_ip, in_ns};
use crate::services::{Identify, ask};

// ---------------------------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Proto {
    Tcp,
    Udp,
    /// Ping (ICMP or ICMPv6): a protocol without ports.
    Icmp,
}

/// One kind of connection a probe makes: a protocol and a destination port (none for ping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Probe {
    pub(crate) proto: Proto,
    pub(crate) port: u16,
}

impl Probe {
    /// The PORT argument of `policy explain`; none for ping.
    pub(crate) fn explain_arg(&self) -> Option<String> {
        match self.proto {
            Proto::Tcp => Some(format!("{}/tcp", self.port)),
            Proto::Udp => Some(format!("{}/udp", self.port)),
            Proto::Icmp => None,
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.proto {
            Proto::Tcp => write!(f, "tcp/{}", self.port),
            Proto::Udp => write!(f, "udp/{}", self.port),
            Proto::Icmp => f.write_str("ping"),
        }
    }
}

const fn tcp_probe(port: u16) -> Probe {
    Probe {
        proto: Proto::Tcp,
        port,
    }
}

const fn udp_probe(port: u16) -> Probe {
    Probe {
        proto: Proto::Udp,
        port,
    }
}

/// What every pair is probed with. UDP 8080 next to TCP 8080 shows that a port rule is of one
/// protocol; ping shows which rules let port-less protocols through.
pub(crate) const PROBES: [Probe; 6] = [
    tcp_probe(5432),
    tcp_probe(8080),
    tcp_probe(9090),
    udp_probe(5353),
    udp_probe(8080),
    Probe {
        proto: Proto::Icmp,
        port: 0,
    },
];

/// The ports every endpoint serves, over TCP and UDP each (`Identify`).
pub(crate) const SERVED: [u16; 4] = [5432, 8080, 9090, 5353];

pub(crate) type Labels = BTreeMap<String, String>;

/// An endpoint as the model sees it, and where to probe from.
#[derive(Debug, Clone)]
pub(crate) struct Ep {
    /// Its sandbox's name, which is also its endpoint name and what its servers answer.
    pub(crate) name: String,
    pub(crate) net: String,
    pub(crate) labels: Labels,
    /// Its named ports: (name, protocol, port).
    pub(crate) named: Vec<(String, Proto, u16)>,
    pub(crate) v4: IpAddr,
    pub(crate) v6: IpAddr,
    pub(crate) netns: PathBuf,
}

impl Ep {
    pub(crate) fn ip(&self, v6: bool) -> IpAddr {
        if v6 { self.v6 } else { self.v4 }
    }

    /// Its address as a one-address CIDR, for `cidr:`, `except=` and `ipBlock`.
    pub(crate) fn cidr(&self, v6: bool) -> String {
        format!("{}/{}", self.ip(v6), if v6 { 128 } else { 32 })
    }
}

/// Makes sandbox `name` on `h` and attaches it to the dual-stack network `net` with `labels`
/// (`k=v`) and named ports (`name=port[/tcp|udp]`); its model.
pub(crate) fn attach(h: &Host, name: &str, net: &str, labels: &[&str], ports: &[&str]) -> Ep {
    h.ok(&["sandbox", "create", name]);
    let mut args = vec!["attach", name, "--network", net];
    for l in labels {
        args.extend_from_slice(&["--label", l]);
    }
    for p in ports {
        args.extend_from_slice(&["--port-name", p]);
    }
    let ep = h.json(&args);
    let labels = labels
        .iter()
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let named = ports
        .iter()
        .map(|p| {
            let (n, rest) = p.split_once('=').unwrap();
            let (port, proto) = match rest.split_once('/') {
                Some((port, "udp")) => (port, Proto::Udp),
                Some((port, _)) => (port, Proto::Tcp),
                None => (rest, Proto::Tcp),
            };
            (n.to_string(), proto, port.parse().unwrap())
        })
        .collect();
    Ep {
        name: name.to_string(),
        net: net.to_string(),
        labels,
        named,
        v4: endpoint_ip(&ep, false).parse().unwrap(),
        v6: endpoint_ip(&ep, true).parse().unwrap(),
        netns: h.sandbox_path(name),
    }
}

/// Servers on every `SERVED` port of every endpoint, answering "NAME CLIENT".
pub(crate) fn serve(eps: &[Ep]) -> Vec<Identify> {
    eps.iter()
        .flat_map(|e| SERVED.map(|p| Identify::start(&e.netns, &e.name, p)))
        .collect()
}

/// A label selector, as the model evaluates it.
pub(crate) type Sel = Arc<dyn Fn(&Labels) -> bool + Send + Sync>;

pub(crate) fn sel(f: impl Fn(&Labels) -> bool + Send + Sync + 'static) -> Sel {
    Arc::new(f)
}

/// `k=v`.
pub(crate) fn is(k: &'static str, v: &'static str) -> Sel {
    sel(move |l| l.get(k).is_some_and(|x| x == v))
}

/// The empty selector: everything.
pub(crate) fn every() -> Sel {
    sel(|_| true)
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Cidr {
        let (a, l) = s.split_once('/').unwrap();
        Cidr {
            addr: a.parse().unwrap(),
            len: l.parse().unwrap(),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip {
                IpAddr::V4(v4) => (u32::from(v4).into(), 32),
                IpAddr::V6(v6) => (u128::from(v6), 128),
            }
        };
        let ((net, width), (addr, w2)) = (bits(self.addr), bits(ip));
        if width != w2 {
            return false;
        }
        let host_bits = width - u32::from(self.len);
        host_bits >= width || (net >> host_bits) == (addr >> host_bits)
    }
}

pub(crate) enum Peer {
    /// Endpoints of the policy's network whose labels match.
    Endpoints(Sel),
    /// Addresses in the block but in none of the exceptions (only of its own family).
    Block(Cidr, Vec<Cidr>),
    All,
}

pub(crate) enum Port {
    /// A protocol's ports `first` to `last`.
    Range(Proto, u16, u16),
    /// A port the destination endpoint names, of this protocol.
    Named(&'static str, Proto),
    /// Every port of a protocol.
    Every(Proto),
}

/// One rule: any of `peers` (none: anyone) on any of `ports` (none: everything, ping too).
pub(crate) struct Rule {
    peers: Vec<Peer>,
    ports: Vec<Port>,
}

pub(crate) fn rule(peers: Vec<Peer>, ports: Vec<Port>) -> Rule {
    Rule { peers, ports }
}

pub(crate) fn peer(s: Sel) -> Peer {
    Peer::Endpoints(s)
}

pub(crate) fn block(cidr: &str, except: &[String]) -> Peer {
    Peer::Block(
        Cidr::parse(cidr),
        except.iter().map(|e| Cidr::parse(e)).collect(),
    )
}

pub(crate) fn tcp(p: u16) -> Port {
    Port::Range(Proto::Tcp, p, p)
}

pub(crate) fn udp(p: u16) -> Port {
    Port::Range(Proto::Udp, p, p)
}

impl Rule {
    /// Whether the rule lets a connection with `peer` through, to `dst`'s port.
    fn allows(&self, peer: &Ep, dst: &Ep, probe: Probe, v6: bool) -> bool {
        let peer_ok = self.peers.is_empty()
            || self.peers.iter().any(|p| match p {
                Peer::Endpoints(s) => s(&peer.labels),
                Peer::Block(cidr, except) => {
                    let ip = peer.ip(v6);
                    cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
                }
                Peer::All => true,
            });
        let port_ok = self.ports.is_empty()
            || self.ports.iter().any(|p| match *p {
                // A rule with ports never lets a port-less protocol through.
                _ if probe.proto == Proto::Icmp => false,
                Port::Range(proto, first, last) => {
                    proto == probe.proto && (first..=last).contains(&probe.port)
                }
                // Resolved on the destination, by name and protocol.
                Port::Named(name, proto) => {
                    proto == probe.proto
                        && dst
                            .named
                            .iter()
                            .any(|(n, pr, port)| n == name && *pr == proto && *port == probe.port)
                }
                Port::Every(proto) => proto == probe.proto,
            });
        peer_ok && port_ok
    }
}

/// A policy: the endpoints of `net` that `select` matches are isolated in each direction that
/// has `Some` rules (`Some(vec![])`: deny all).
pub(crate) struct Pol {
    net: String,
    select: Sel,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

impl Pol {
    pub(crate) fn on(net: &str, select: Sel) -> Pol {
        Pol {
            net: net.to_string(),
            select,
            ingress: None,
            egress: None,
        }
    }

    pub(crate) fn ingress(mut self, rules: Vec<Rule>) -> Pol {
        self.ingress = Some(rules);
        self
    }

    pub(crate) fn egress(mut self, rules: Vec<Rule>) -> Pol {
        self.egress = Some(rules);
        self
    }
}

/// Whether a connection from `src` to `dst` passes: out of the source and into the
/// destination.
pub(crate) fn expected(pols: &[Pol], src: &Ep, dst: &Ep, probe: Probe, v6: bool) -> bool {
    // Networks are isolated from each other, whatever the policies say.
    src.net == dst.net
        && side_allows(pols, src, dst, dst, probe, v6, false)
        && side_allows(pols, dst, src, dst, probe, v6, true)
}

/// `target`'s verdict on a connection with `peer`: open unless a policy selecting it isolates
/// that direction; then only what one of those policies' rules allows (their union).
fn side_allows(
    pols: &[Pol],
    target: &Ep,
    peer: &Ep,
    dst: &Ep,
    probe: Probe,
    v6: bool,
    ingress: bool,
) -> bool {
    let mut isolated = false;
    for p in pols
        .iter()
        .filter(|p| p.net == target.net && (p.select)(&target.labels))
    {
        let rules = if ingress { &p.ingress } else { &p.egress };
        if let Some(rules) = rules {
            isolated = true;
            if rules.iter().any(|r| r.allows(peer, dst, probe, v6)) {
                return true;
            }
        }
    }
    !isolated
}

// ---------------------------------------------------------------------------------------------
// Probes.

#[derive(Clone, Copy)]
struct Case<'a> {
    src: &'a Ep,
    dst: &'a Ep,
    probe: Probe,
    v6: bool,
}

impl fmt::Display for Case<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {} over {}",
            self.src.name,
            self.dst.name,
            self.probe,
            if self.v6 { "IPv6" } else { "IPv4" }
        )
    }
}

/// What a probe saw: whether its packets got through to the destination, and what was wrong
/// (empty: the right server answered, seeing the source's own address).
struct Seen {
    passed: bool,
    note: String,
}

impl Seen {
    fn answered(got: &str, want: &str) -> Seen {
        Seen {
            passed: true,
            note: if got == want {
                String::new()
            } else {
                format!("answered {got:?}, not {want:?}")
            },
        }
    }

    fn nothing(why: impl Into<String>) -> Seen {
        Seen {
            passed: false,
            note: why.into(),
        }
    }

    fn ok(&self) -> bool {
        self.passed && self.note.is_empty()
    }
}

/// Moves the calling thread into the namespace at `path` (sockets made next belong to it).
fn enter(path: &Path) {
    let ns = std::fs::File::open(path).unwrap();
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// One probe. Quick deadlines by default (a denied connection is dropped, so it only ever
/// times out); `patient` for a second look at an allowed one that failed on a busy machine.
fn probe(c: &Case<'_>, patient: bool) -> Seen {
    let ip = c.dst.ip(c.v6);
    let want = format!("{} {}", c.dst.name, c.src.ip(c.v6));
    match c.probe.proto {
        Proto::Icmp => {
            let ok = Command::new("nsenter")
                .arg(format!("--net={}", c.src.netns.display()))
                .args(["ping", "-q", "-n", "-c1", "-W"])
                .arg(if patient { "3" } else { "0.7" })
                .arg(ip.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                Seen::answered("", "")
            } else {
                Seen::nothing("no echo reply")
            }
        }
        Proto::Tcp => {
            enter(&c.src.netns);
            let wait = Duration::from_millis(if patient { 3000 } else { 700 });
            match TcpStream::connect_timeout(&SocketAddr::new(ip, c.probe.port), wait) {
                Err(e) => Seen::nothing(format!("connect: {e}")),
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                    let mut got = String::new();
                    let _ = s.read_to_string(&mut got);
                    Seen::answered(&got, &want)
                }
            }
        }
        Proto::Udp => {
            enter(&c.src.netns);
            let any = if c.v6 { "[::]:0" } else { "0.0.0.0:0" };
            let sock = UdpSocket::bind(any).unwrap();
            let wait = Duration::from_millis(if patient { 1000 } else { 350 });
            sock.set_read_timeout(Some(wait)).unwrap();
            let mut buf = [0u8; 128];
            for _ in 0..if patient { 3 } else { 2 } {
                if let Err(e) = sock.send_to(b"?", SocketAddr::new(ip, c.probe.port)) {
                    return Seen::nothing(format!("send: {e}"));
                }
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    return Seen::answered(&String::from_utf8_lossy(&buf[..n]), &want);
                }
            }
            Seen::nothing("no answer")
        }
    }
}

/// Runs every probe at once: each waits mostly on a timeout, so a whole matrix takes about
/// the longest one.
fn run_probes(cases: &[Case<'_>], patient: bool) -> Vec<Seen> {
    const WORKERS: usize = 512;
    // A socket or two per worker: more than the usual soft limit of 1024 files once other
    // tests run beside; the hard limit is the machine's to set.
    static RAISE: std::sync::Once = std::sync::Once::new();
    RAISE.call_once(|| {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, soft.max(hard.min(8192)), hard);
        }
    });
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<Seen>>> = cases.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(cases.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = cases.get(i) else { break };
                    *out[i].lock().unwrap() = Some(probe(c, patient));
                }
            });
        }
    });
    out.into_iter()
        .map(|m| m.into_inner().unwrap().expect("every case probed"))
        .collect()
}

/// Every ordered pair of distinct endpoints, every probe, both families.
fn all_cases(eps: &[Ep]) -> Vec<Case<'_>> {
    let mut cases = Vec::new();
    for src in eps {
        for dst in eps.iter().filter(|d| d.name != src.name) {
            for probe in PROBES {
                for v6 in [false, true] {
                    cases.push(Case {
                        src,
                        dst,
                        probe,
                        v6,
                    });
                }
            }
        }
    }
    cases
}

/// Probes every pair × probe × family and compares with the model; every mismatch, one per
/// line.
pub(crate) fn matrix_mismatches(eps: &[Ep], pols: &[Pol]) -> Vec<String> {
    let cases = all_cases(eps);
    let want: Vec<bool> = cases
        .iter()
        .map(|c| expected(pols, c.src, c.dst, c.probe, c.v6))
        .collect();
    let mut seen = run_probes(&cases, false);
    // An allowed connection that failed gets a patient second try: a loaded machine can miss a
    // quick deadline, while a denied one fails again.
    let again: Vec<usize> = (0..cases.len())
        .filter(|&i| want[i] && !seen[i].ok())
        .collect();
    let retry: Vec<Case<'_>> = again.iter().map(|&i| cases[i]).collect();
    for (i, s) in again.into_iter().zip(run_probes(&retry, true)) {
        seen[i] = s;
    }
    let mut bad = Vec::new();
    for ((c, want), s) in cases.iter().zip(&want).zip(&seen) {
        if *want && !s.ok() {
            bad.push(format!("{c}: expected allowed, got {}", s.note));
        } else if !*want && s.passed {
            bad.push(format!("{c}: expected denied, but it passed {}", s.note));
        }
    }
    bad
}

/// Probes until the matrix matches the model, at most `within` (just attached endpoints:
/// IPv6 addresses in DAD, cold neighbours, or another host still converging); the last
/// mismatches if it never did.
pub(crate) fn settle(eps: &[Ep], pols: &[Pol], within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let bad = matrix_mismatches(eps, pols);
        if bad.is_empty() || Instant::now() > deadline {
            return bad;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asks `h`'s `policy explain` about every pair of endpoints of one network, every probe:
/// by address for each family, and by endpoint name (with `by_name`) where both families'
/// verdicts agree, so that which family a name stands for does not matter. Every
/// disagreement with the model.
pub(crate) fn explain_mismatches(h: &Host, eps: &[Ep], pols: &[Pol], by_name: bool) -> Vec<String> {
    let mut jobs: Vec<(String, String, Probe, bool)> = Vec::new();
    for src in eps {
        for dst in eps
            .iter()
            .filter(|d| d.name != src.name && d.net == src.net)
        {
            for probe in PROBES {
                let e4 = expected(pols, src, dst, probe, false);
                let e6 = expected(pols, src, dst, probe, true);
                jobs.push((src.v4.to_string(), dst.v4.to_string(), probe, e4));
                jobs.push((src.v6.to_string(), dst.v6.to_string(), probe, e6));
                if by_name && e4 == e6 && matches!(probe.port, 5432 | 0) {
                    jobs.push((src.name.clone(), dst.name.clone(), probe, e4));
                }
            }
        }
    }
    let next = AtomicUsize::new(0);
    let bad = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                while let Some((src, dst, probe, want)) =
                    jobs.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    let mut args = vec!["-o", "json", "policy", "explain", src.as_str(), dst];
                    let port = probe.explain_arg();
                    if let Some(p) = &port {
                        args.push(p.as_str());
                    }
                    let o = h.berth(&args);
                    let what = format!("explain {src} {dst} {probe}");
                    let v: Value = match serde_json::from_slice(&o.stdout) {
                        Ok(v) if o.status.success() => v,
                        _ => {
                            bad.lock().unwrap().push(format!(
                                "{what}: failed: {}",
                                String::from_utf8_lossy(&o.stderr).trim()
                            ));
                            continue;
                        }
                    };
                    if v["allowed"].as_bool() != Some(*want) {
                        bad.lock()
                            .unwrap()
                            .push(format!("{what}: expected allowed={want}, explain says {v}"));
                    }
                }
            });
        }
    });
    let mut bad = bad.into_inner().unwrap();
    bad.sort();
    bad
}

pub(crate) fn policy_names(h: &Host) -> Vec<String> {
    h.json(&["policy", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Removes every policy of `h`.
pub(crate) fn clear_policies(h: &Host) {
    let names = policy_names(h);
    if !names.is_empty() {
        let mut args = vec!["policy", "rm"];
        args.extend(names.iter().map(String::as_str));
        h.ok(&args);
    }
    assert_eq!(policy_names(h), Vec::<String>::new());
}

/// The names of the endpoints a policy selects, sorted, as `policy inspect` says.
pub(crate) fn selected(h: &Host, policy: &str) -> Vec<String> {
    let v = h.json(&["policy", "inspect", policy]);
    let mut names: Vec<String> = v["status"]["selectedEndpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("no status.selectedEndpoints: {v}"))
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

/// `policy apply -f` of `text`: from a file in the host's directory, or from standard input.
pub(crate) fn apply(h: &Host, text: &str, stdin: bool) -> Output {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut cmd = Command::new(BERTH);
    cmd.arg("--socket")
        .arg(h.socket())
        .args(["policy", "apply", "-f"]);
    if !stdin {
        let file = h
            .dir
            .join(format!("policy-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, text).unwrap();
        return cmd.arg(file).output().unwrap();
    }
    let mut child = cmd
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The truth table.

const BLUE4: &str = "10.97.0.0/24";
const BLUE6: &str = "fd00:97::/64";
const BLUE_GW4: &str = "10.97.0.1";
const BLUE_GW6: &str = "fd00:97::1";

fn blue(h: &Host) {
    h.ok(&[
        "network",
        "create",
        "blue",
        "--subnet",
        BLUE4,
        "--ipv6-subnet",
        BLUE6,
    ]);
}

/// One host: blue with web, canary, db, cache and admin; red with other (labelled as web is,
/// to show that selectors stay in their network). Every endpoint serves every `SERVED` port.
struct Lab {
    _servers: Vec<Identify>,
    eps: Vec<Ep>,
    h: Host,
}

impl Lab {
    fn new() -> Lab {
        let h = Host::new();
        blue(&h);
        h.ok(&[
            "network",
            "create",
            "red",
            "--subnet",
            "10.98.0.0/24",
            "--ipv6-subnet",
            "fd00:98::/64",
        ]);
        let eps = vec![
            attach(&h, "web", "blue", &["app=web"], &[]),
            attach(&h, "canary", "blue", &["app=web", "canary=yes"], &[]),
            attach(
                &h,
                "db",
                "blue",
                &["app=db", "tier=back"],
                &["pg=5432", "mdns=5353/udp"],
            ),
            // Its `pg` is another port than db's: a named port is resolved per endpoint.
            attach(
                &h,
                "cache",
                "blue",
                &["app=cache", "tier=back"],
                &["pg=9090/tcp"],
            ),
            attach(&h, "admin", "blue", &["role=admin"], &[]),
            attach(&h, "other", "red", &["app=web"], &[]),
        ];
        Lab {
            _servers: serve(&eps),
            eps,
            h,
        }
    }

    fn ep(&self, name: &str) -> &Ep {
        self.eps.iter().find(|e| e.name == name).unwrap()
    }
}

/// One policy set of the table: how it is made, and its model.
struct Set {
    name: &'static str,
    /// `policy create` arguments, one policy each.
    creates: Vec<Vec<String>>,
    /// Documents for `policy apply -f`, and whether they go through standard input.
    applies: Vec<(String, bool)>,
    model: Vec<Pol>,
    /// Sandboxes whose gateway DNS must (true) or must not (false) answer.
    dns: Vec<(&'static str, bool)>,
    /// Policies and the endpoints `policy inspect` must say they select.
    selects: Vec<(&'static str, Vec<&'static str>)>,
    explain: bool,
    /// The host itself still reaches the endpoints (it is never judged).
    host_reaches: bool,
}

impl Set {
    fn new(name: &'static str) -> Set {
        Set {
            name,
            creates: Vec::new(),
            applies: Vec::new(),
            model: Vec::new(),
            dns: Vec::new(),
            selects: Vec::new(),
            explain: false,
            host_reaches: false,
        }
    }

    fn create(mut self, args: &[&str]) -> Set {
        self.creates
            .push(args.iter().map(|a| a.to_string()).collect());
        self
    }

    fn apply(mut self, text: String, stdin: bool) -> Set {
        self.applies.push((text, stdin));
        self
    }

    fn model(mut self, p: Pol) -> Set {
        self.model.push(p);
        self
    }

    fn dns(mut self, sandbox: &'static str, answers: bool) -> Set {
        self.dns.push((sandbox, answers));
        self
    }

    fn selects(mut self, policy: &'static str, eps: &[&'static str]) -> Set {
        let mut eps = eps.to_vec();
        eps.sort();
        self.selects.push((policy, eps));
        self
    }

    fn explain(mut self) -> Set {
        self.explain = true;
        self
    }

    fn host_reaches(mut self) -> Set {
        self.host_reaches = true;
        self
    }
}

/// The sets, from the lab's actual addresses.
fn sets(l: &Lab) -> Vec<Set> {
    let (web, canary, db, cache, admin) = (
        l.ep("web"),
        l.ep("canary"),
        l.ep("db"),
        l.ep("cache"),
        l.ep("admin"),
    );
    let blue_pol = |s: Sel| Pol::on("blue", s);
    let app_web = || peer(is("app", "web"));
    vec![
        Set::new("ingress only, two peers in one rule")
            .create(&[
                "db-in",
                "--network",
                "blue",
                "--selector",
                "app=db",
                "--ingress",
                "from=app=web from=role=admin ports=5432",
            ])
            .model(blue_pol(is("app", "db")).ingress(vec![rule(
                vec![app_web(), peer(is("role", "admin"))],
                vec![tcp(5432)],
            )]))
            .selects("db-in", &["db"])
            .explain(),
        Set::new("egress only")
            .create(&[
                "web-out",
                "--network",
                "blue",
                "--selector",
                "app=web",
                "--egress",
                "to=tier=back ports=5432,9090/tcp",
            ])
            .model(blue_pol(is("app", "web")).egress(vec![rule(
                vec![peer(is("tier", "back"))],
                vec![tcp(5432), tcp(9090)],
            )]))
            .selects("web-out", &["web", "canary"]),
        Set::new("both directions in one policy")
            .create(&[
                "db-both",
                "--network",
                "blue",
                "--selector",
                "app=db",
                "--ingress",
                "from=role=admin",
                "--egress",
                "to=app=cache ports=9090,5353/udp",
            ])
            .model(
                blue_pol(is("app", "db"))
                    .ingress(vec![rule(vec![peer(is("role", "admin"))], vec![])])
                    .egress(vec![rule(
                        vec![peer(is("app", "cache"))],
                        vec![tcp(9090), udp(5353)],
                    )]),
            ),
        Set::new("CIDR blocks with exceptions, per family, ingress and egress")
            .create(&[
                "db-cidr",
                "--network",
                "blue",
                "--selector",
                "app=db",
                "--ingress",
                &format!(
                    "from=cidr:{BLUE4} except={} ports=5432,5353/udp",
                    web.cidr(false)
                ),
                "--ingress",
                &format!(
                    "from=cidr:{BLUE6} except={},{}",
                    web.cidr(true),
                    canary.cidr(true)
                ),
            ])
            .create(&[
                "admin-cidr",
                "--network",
                "blue",
                "--selector",
                "role=admin",
                "--egress",
                &format!("to=cidr:{}", cache.cidr(false)),
                "--egress",
                &format!("to=cidr:{} ports=5432", db.cidr(true)),
            ])
            .model(blue_pol(is("app", "db")).ingress(vec![
                rule(
                    vec![block(BLUE4, &[web.cidr(false)])],
                    vec![tcp(5432), udp(5353)],
                ),
                rule(
                    vec![block(BLUE6, &[web.cidr(true), canary.cidr(true)])],
                    vec![],
                ),
            ]))
            .model(blue_pol(is("role", "admin")).egress(vec![
                rule(vec![block(&cache.cidr(false), &[])], vec![]),
                rule(vec![block(&db.cidr(true), &[])], vec![tcp(5432)]),
            ]))
            .explain(),
        Set::new("named ports on ingress, resolved per endpoint; set-based selector")
            .create(&[
                "back-pg",
                "--network",
                "blue",
                "--selector",
                "tier in (back)",
                "--ingress",
                "from=app=web ports=pg",
            ])
            .model(blue_pol(is("tier", "back")).ingress(vec![rule(
                vec![app_web()],
                vec![Port::Named("pg", Proto::Tcp)],
            )]))
            .selects("back-pg", &["db", "cache"])
            .explain(),
        Set::new("named ports on egress, to anyone")
            .create(&[
                "admin-named",
                "--network",
                "blue",
                "--selector",
                "role=admin",
                "--egress",
                "to=all ports=pg,mdns/udp",
            ])
            .model(blue_pol(is("role", "admin")).egress(vec![rule(
                vec![Peer::All],
                vec![
                    Port::Named("pg", Proto::Tcp),
                    Port::Named("mdns", Proto::Udp),
                ],
            )]))
            .explain(),
        Set::new("port ranges and all/udp, from anyone")
            .create(&[
                "cache-range",
                "--network",
                "blue",
                "--selector",
                "app=cache",
                "--ingress",
                "ports=8000-8100,5000-5500/udp",
            ])
            .create(&[
                "admin-udp",
                "--network",
                "blue",
                "--selector",
                "role=admin",
                "--ingress",
                "ports=all/udp",
            ])
            .model(blue_pol(is("app", "cache")).ingress(vec![rule(
                vec![],
                vec![
                    Port::Range(Proto::Tcp, 8000, 8100),
                    Port::Range(Proto::Udp, 5000, 5500),
                ],
            )]))
            .model(
                blue_pol(is("role", "admin"))
                    .ingress(vec![rule(vec![], vec![Port::Every(Proto::Udp)])]),
            ),
        Set::new("matchExpressions from YAML: In, NotIn, Exists, DoesNotExist; endPort")
            .apply(yaml_match_expressions(), false)
            .model(
                blue_pol(sel(|l| {
                    l.get("app").is_some_and(|a| a == "db" || a == "cache")
                }))
                .ingress(vec![rule(
                    vec![peer(sel(|l| {
                        l.contains_key("app") && !l.contains_key("canary")
                    }))],
                    vec![],
                )]),
            )
            // NotIn also matches endpoints without the key (admin).
            .model(
                blue_pol(sel(|l| {
                    !l.get("app").is_some_and(|a| a == "db" || a == "cache")
                }))
                .egress(vec![rule(
                    vec![peer(is("tier", "back"))],
                    vec![Port::Range(Proto::Tcp, 5432, 5440), udp(5353)],
                )]),
            )
            .selects("back-from-stable", &["db", "cache"])
            .selects("front-out", &["web", "canary", "admin"])
            .explain(),
        // A set-based peer selector, with spaces, in a rule.
        Set::new("empty selector: every endpoint of the network")
            .create(&[
                "all-from-web",
                "--network",
                "blue",
                "--ingress",
                "from=app in (web, cache),!canary",
                "--ingress",
                "from=role=admin ports=9090",
            ])
            .model(blue_pol(every()).ingress(vec![
                rule(
                    vec![peer(sel(|l| {
                        l.get("app").is_some_and(|a| a == "web" || a == "cache")
                            && !l.contains_key("canary")
                    }))],
                    vec![],
                ),
                rule(vec![peer(is("role", "admin"))], vec![tcp(9090)]),
            ]))
            .selects("all-from-web", &["web", "canary", "db", "cache", "admin"]),
        Set::new("no rules: deny all ingress")
            .create(&["deny", "--network", "blue"])
            .model(blue_pol(every()).ingress(vec![]))
            .host_reaches()
            .explain(),
        Set::new("union of several policies selecting one endpoint")
            .create(&[
                "db-web",
                "--network",
                "blue",
                "--selector",
                "app=db",
                "--ingress",
                "from=app=web ports=5432",
            ])
            .create(&[
                "back-admin",
                "--network",
                "blue",
                "--selector",
                "tier=back",
                "--ingress",
                "from=role=admin ports=5353/udp",
            ])
            .create(&[
                "db-cache",
                "--network",
                "blue",
                "--selector",
                "app=db",
                "--ingress",
                "from=app=cache",
            ])
            .model(blue_pol(is("app", "db")).ingress(vec![rule(vec![app_web()], vec![tcp(5432)])]))
            .model(
                blue_pol(is("tier", "back"))
                    .ingress(vec![rule(vec![peer(is("role", "admin"))], vec![udp(5353)])]),
            )
            .model(
                blue_pol(is("app", "db"))
                    .ingress(vec![rule(vec![peer(is("app", "cache"))], vec![])]),
            )
            .explain(),
        Set::new("egress deny-all keeps gateway DNS")
            .create(&[
                "web-quiet",
                "--network",
                "blue",
                "--selector",
                "app=web",
                "--type",
                "egress",
            ])
            .model(blue_pol(is("app", "web")).egress(vec![]))
            .dns("web", true)
            .dns("canary", true)
            .dns("db", true),
        // One isolating policy saying no is enough, even if another that isolates web too
        // keeps the default.
        Set::new("egress deny-all with --no-gateway-dns")
            .create(&[
                "web-quiet",
                "--network",
                "blue",
                "--selector",
                "app=web",
                "--type",
                "egress",
                "--no-gateway-dns",
            ])
            .create(&[
                "web-to-db",
                "--network",
                "blue",
                "--selector",
                "app=web",
                "--egress",
                "to=app=db",
            ])
            .model(blue_pol(is("app", "web")).egress(vec![]))
            .model(
                blue_pol(is("app", "web")).egress(vec![rule(vec![peer(is("app", "db"))], vec![])]),
            )
            .dns("web", false)
            .dns("canary", false)
            .dns("db", true),
        Set::new("an empty rule allows everything")
            .create(&["deny", "--network", "blue"])
            .create(&[
                "cache-open",
                "--network",
                "blue",
                "--selector",
                "app=cache",
                "--ingress",
                "",
            ])
            .model(blue_pol(every()).ingress(vec![]))
            .model(blue_pol(is("app", "cache")).ingress(vec![rule(vec![], vec![])])),
        Set::new("JSON on stdin; several --selector, !key, notin, key-only peer")
            .apply(json_cache_policy(), true)
            .create(&[
                "notcanary",
                "--network",
                "blue",
                "--selector",
                "!canary",
                "--selector",
                "role notin (admin)",
                "--egress",
                "to=tier",
            ])
            .model(blue_pol(is("app", "cache")).ingress(vec![rule(
                vec![peer(is("role", "admin"))],
                vec![udp(5353), tcp(8080)],
            )]))
            .model(
                blue_pol(sel(|l| {
                    !l.contains_key("canary") && l.get("role").is_none_or(|r| r != "admin")
                }))
                .egress(vec![rule(
                    vec![peer(sel(|l| l.contains_key("tier")))],
                    vec![],
                )]),
            )
            .selects("cache-json", &["cache"])
            .selects("notcanary", &["web", "db", "cache"]),
        Set::new("YAML ipBlock with except and named ports of both protocols")
            .apply(yaml_ip_blocks(admin, web), false)
            .model(blue_pol(is("tier", "back")).ingress(vec![rule(
                vec![
                    block(BLUE4, &[admin.cidr(false)]),
                    block(BLUE6, &[web.cidr(true)]),
                ],
                vec![
                    Port::Named("pg", Proto::Tcp),
                    Port::Named("mdns", Proto::Udp),
                ],
            )]))
            .explain(),
    ]
}

fn yaml_match_expressions() -> String {
    [
        "apiVersion: networking.k8s.io/v1",
        "kind: NetworkPolicy",
        "metadata:",
        "  name: back-from-stable",
        "  network: blue",
        "spec:",
        "  podSelector:",
        "    matchExpressions:",
        "      - {key: app, operator: In, values: [db, cache]}",
        "  policyTypes: [Ingress]",
        "  ingress:",
        "    - from:",
        "        - podSelector:",
        "            matchExpressions:",
        "              - {key: app, operator: Exists}",
        "              - {key: canary, operator: DoesNotExist}",
        "---",
        "apiVersion: networking.k8s.io/v1",
        "kind: NetworkPolicy",
        "metadata:",
        "  name: front-out",
        "  namespace: blue",
        "spec:",
        "  podSelector:",
        "    matchExpressions:",
        "      - key: app",
        "        operator: NotIn",
        "        values: [db, cache]",
        "  policyTypes: [Egress]",
        "  egress:",
        "    - to:",
        "        - podSelector:",
        "            matchLabels: {tier: back}",
        "      ports:",
        "        - {protocol: TCP, port: 5432, endPort: 5440}",
        "        - {protocol: UDP, port: 5353}",
        "",
    ]
    .join("\n")
}

fn json_cache_policy() -> String {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "cache-json", "network": "blue"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "cache"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"role": "admin"}}}],
                // No protocol: TCP.
                "ports": [{"protocol": "UDP", "port": 5353}, {"port": 8080}],
            }],
        },
    })
    .to_string()
}

fn yaml_ip_blocks(admin: &Ep, web: &Ep) -> String {
    [
        "kind: NetworkPolicy".to_string(),
        "metadata: {name: yaml-block, network: blue}".into(),
        "spec:".into(),
        "  podSelector: {matchLabels: {tier: back}}".into(),
        "  ingress:".into(),
        "    - from:".into(),
        format!(
            "        - ipBlock: {{cidr: {BLUE4}, except: [{}]}}",
            admin.cidr(false)
        ),
        format!(
            "        - ipBlock: {{cidr: \"{BLUE6}\", except: [\"{}\"]}}",
            web.cidr(true)
        ),
        "      ports:".into(),
        "        - {port: pg}".into(),
        "        - {protocol: UDP, port: mdns}".into(),
        String::new(),
    ]
    .join("\n")
}

/// Whether `ep`'s gateway DNS answers at `gw`; `patient` for a second look at one that
/// should have.
fn gateway_dns_answers(h: &Host, ep: &Ep, gw: &str, tcp: bool, patient: bool) -> bool {
    let at = format!("@{gw}");
    let time = if patient { "+time=3" } else { "+time=1" };
    let mut cmd = vec!["dig", &at, time, "+tries=1", "+noall", "+comments"];
    if tcp {
        cmd.push("+tcp");
    }
    cmd.push("db.blue.berth.local");
    let out = h.in_netns(&ep.netns, &cmd);
    String::from_utf8_lossy(&out.stdout).contains("status: NOERROR")
}

/// Makes a set's policies (after removing the previous set's) and checks everything it
/// says; every failure.
fn run_set(l: &Lab, set: &Set) -> Vec<String> {
    let h = &l.h;
    clear_policies(h);
    let mut bad = Vec::new();
    for args in &set.creates {
        let mut a = vec!["policy", "create"];
        a.extend(args.iter().map(String::as_str));
        let o = h.berth(&a);
        if !o.status.success() {
            bad.push(format!(
                "policy create {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    for (text, stdin) in &set.applies {
        let o = apply(h, text, *stdin);
        if !o.status.success() {
            bad.push(format!(
                "policy apply: {}\n{text}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    if !bad.is_empty() {
        return bad;
    }
    // A set whose model denies nothing within a network tests nothing: a model mistake.
    let denied = all_cases(&l.eps)
        .into_iter()
        .filter(|c| c.src.net == c.dst.net)
        .filter(|c| !expected(&set.model, c.src, c.dst, c.probe, c.v6))
        .count();
    assert!(denied > 0, "set {:?}: the model denies nothing", set.name);
    for (policy, want) in &set.selects {
        let got = selected(h, policy);
        if got != *want {
            bad.push(format!("{policy} selects {got:?}, not {want:?}"));
        }
    }
    bad.extend(matrix_mismatches(&l.eps, &set.model));
    if set.explain {
        bad.extend(explain_mismatches(h, &l.eps, &set.model, true));
    }
    std::thread::scope(|s| {
        let checks: Vec<_> = set
            .dns
            .iter()
            .flat_map(|&(sb, want)| {
                [
                    (BLUE_GW4, false),
                    (BLUE_GW4, true),
                    (BLUE_GW6, false),
                    (BLUE_GW6, true),
                ]
                .map(move |(gw, tcp)| (sb, want, gw, tcp))
            })
            .map(|(sb, want, gw, tcp)| {
                s.spawn(move || {
                    let ask = |patient| gateway_dns_answers(h, l.ep(sb), gw, tcp, patient);
                    let got = ask(false) || (want && ask(true));
                    (got != want).then(|| {
                        format!(
                            "{sb}: gateway DNS at {gw} over {}: expected {}",
                            if tcp { "TCP" } else { "UDP" },
                            if want {
                                "an answer, got none"
                            } else {
                                "none, got an answer"
                            }
                        )
                    })
                })
            })
            .collect();
        bad.extend(checks.into_iter().filter_map(|c| c.join().unwrap()));
    });
    if set.host_reaches {
        let host_ns = PathBuf::from(h.netns_path());
        for v6 in [false, true] {
            let to = SocketAddr::new(l.ep("db").ip(v6), 5432).to_string();
            match ask(&host_ns, &to) {
                Ok(a) if a.starts_with("db ") => {}
                other => bad.push(format!("the host itself to {to}: {other:?}")),
            }
        }
    }
    bad
}

#[test]
fn a_truth_table_of_policy_sets_matches_the_model_and_explain() {
    let l = Lab::new();
    // No policy: everything within a network passes, nothing across networks.
    let warm = settle(&l.eps, &[], Duration::from_secs(10));
    assert!(warm.is_empty(), "without policies:\n{}", warm.join("\n"));

    let sets = sets(&l);
    assert!(sets.len() >= 12);
    let mut failures = Vec::new();
    for set in &sets {
        failures.extend(
            run_set(&l, set)
                .into_iter()
                .map(|f| format!("[{}] {f}", set.name)),
        );
    }
    // Explain also names the deciding policies.
    clear_policies(&l.h);
    let union = sets.iter().find(|s| s.name.starts_with("union")).unwrap();
    for args in &union.creates {
        let mut a = vec!["policy", "create"];
        a.extend(args.iter().map(String::as_str));
        l.h.ok(&a);
    }
    let v = l.h.json(&["policy", "explain", "web", "db", "5432/tcp"]);
    let list = |j: &Value, k: &str| -> Vec<String> {
        let mut v: Vec<String> = j[k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    };
    if v["allowed"] != true
        || list(&v["ingress"], "isolated_by") != ["back-admin", "db-cache", "db-web"]
        || !list(&v["ingress"], "allowed_by")
            .iter()
            .any(|a| a.contains("db-web"))
        || list(&v["ingress"], "allowed_by")
            .iter()
            .any(|a| a.contains("db-cache") || a.contains("back-admin"))
        || !list(&v["egress"], "isolated_by").is_empty()
        || v["egress"]["endpoint"].as_str().is_none()
    {
        failures.push(format!("explain web db 5432/tcp: {v:#}"));
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// No window.

#[test]
fn an_endpoint_is_isolated_before_its_interface_comes_up() {
    const X4: &str = "10.97.0.99";
    const X6: &str = "fd00:97::99";
    const MAC: &str = "02:00:0a:61:00:63";
    let h = Host::new();
    blue(&h);
    h.ok(&[
        "policy",
        "create",
        "guard",
        "--network",
        "blue",
        "--selector",
        "app=listener",
        "--ingress",
        "from=app=ok",
    ]);
    let bad = attach(&h, "bad", "blue", &["app=bad"], &[]);
    let good = attach(&h, "good", "blue", &["app=ok"], &[]);
    // The senders know the listener's MAC in advance: their packets are on the bridge from its
    // first moment, not only once a neighbour probe is answered.
    for ep in [&bad, &good] {
        for (fam, ip) in [("-4", X4), ("-6", X6)] {
            let o = h.in_netns(
                &ep.netns,
                &[
                    "ip",
                    fam,
                    "neigh",
                    "replace",
                    ip,
                    "lladdr",
                    MAC,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            );
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        h.eventually(&format!("{}'s IPv6 address is usable", ep.name), || {
            let o = h.in_netns(&ep.netns, &["ip", "-6", "addr", "show", "tentative"]);
            o.status.success() && o.stdout.is_empty()
        });
    }
    h.ok(&["sandbox", "create", "listener"]);
    let sock = in_ns(&h.sandbox_path("listener"), || {
        UdpSocket::bind(("::", 7000)).unwrap()
    });
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let counts: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = |ep: &Ep, tag: &'static str, pause: Duration, sent: Option<Arc<AtomicUsize>>| {
        let (s4, s6) = in_ns(&ep.netns, || {
            (
                UdpSocket::bind("0.0.0.0:0").unwrap(),
                UdpSocket::bind("[::]:0").unwrap(),
            )
        });
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for (s, to, fam) in [(&s4, X4, "4"), (&s6, X6, "6")] {
                    let ok = s
                        .send_to(format!("{tag}{fam}").as_bytes(), (to, 7000))
                        .is_ok();
                    if let (true, Some(n)) = (ok, &sent) {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(pause);
            }
        })
    };
    let counter = {
        let (counts, stop) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    let tag = String::from_utf8_lossy(&buf[..n]).into_owned();
                    *counts.lock().unwrap().entry(tag).or_default() += 1;
                }
            }
        })
    };
    // Joined on drop, also when an assertion fails.
    let _threads = ServerThreads {
        stop: stop.clone(),
        threads: vec![
            counter,
            sender(&bad, "bad", Duration::from_micros(100), Some(sent.clone())),
            sender(&good, "ok", Duration::from_millis(5), None),
        ],
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = sent.load(Ordering::Relaxed);
    h.ok(&[
        "attach",
        "listener",
        "--network",
        "blue",
        "--ip",
        X4,
        "--ip",
        X6,
        "--mac",
        MAC,
        "--label",
        "app=listener",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let flooded = sent.load(Ordering::Relaxed) - before;
    let got = counts.lock().unwrap().clone();
    let n = |tag: &str| got.get(tag).copied().unwrap_or(0);
    // About 10,000 a second normally; far fewer means the sender stalled.
    assert!(
        flooded > 1000,
        "the flood was too thin to show a window: {flooded} packets"
    );
    assert_eq!(
        n("bad4") + n("bad6"),
        0,
        "packets of a denied peer got in ({flooded} sent): {got:?}"
    );
    assert!(
        n("ok4") > 0 && n("ok6") > 0,
        "the allowed peer's packets did not arrive: {got:?}"
    );
    // The flood does reach the listener's address once nothing denies it.
    h.ok(&["policy", "rm", "guard"]);
    h.eventually("the flood arrives without the policy", || {
        let got = counts.lock().unwrap();
        got.get("bad4").is_some_and(|n| *n > 0) && got.get("bad6").is_some_and(|n| *n > 0)
    });
}

// ---------------------------------------------------------------------------------------------
// Revocation.

/// A TCP server that passes on every line its clients send and answers each with "ack".
struct Lines {
    rx: mpsc::Receiver<String>,
    _serving: ServerThreads,
}

impl Lines {
    fn start(netns: &Path, port: u16) -> Lines {
        let listener = in_ns(netns, || TcpListener::bind(("::", port)).unwrap());
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (s, tx) = (s.clone(), tx.clone());
                // Ends at the client's close or the server's stop.
                std::thread::spawn(move || {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 256];
                    while !s.load(Ordering::Relaxed) {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                            Err(_) => continue,
                        }
                        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            let _ = tx.send(String::from_utf8_lossy(&line).trim().to_string());
                            let _ = c.write_all(b"ack\n");
                        }
                    }
                });
            }
        });
        Lines {
            rx,
            _serving: ServerThreads {
                stop,
                threads: vec![accept],
            },
        }
    }

    /// The next line that starts with `tag`, within `wait`.
    fn next(&self, tag: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(line) if line.starts_with(tag) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// A client connection from the namespace at `from`.
fn connect(from: &Path, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = in_ns(from, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// Sends `line` and waits for the server's "ack".
fn exchange(s: &mut TcpStream, line: &str) -> bool {
    if s.write_all(format!("{line}\n").as_bytes()).is_err() {
        return false;
    }
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).is_ok() && &ack == b"ack\n"
}

#[test]
fn a_policy_change_cuts_the_established_connections_it_denies() {
    let h = Host::new();
    blue(&h);
    let web = attach(&h, "web", "blue", &["app=web"], &[]);
    let db = attach(&h, "db", "blue", &["app=db"], &[]);
    let admin = attach(&h, "admin", "blue", &["role=admin"], &[]);
    let server = Lines::start(&db.netns, 5432);
    h.ok(&[
        "policy",
        "create",
        "deny-db",
        "--network",
        "blue",
        "--selector",
        "app=db",
    ]);
    let allow_web = [
        "policy",
        "create",
        "db-allow",
        "--network",
        "blue",
        "--selector",
        "app=db",
        "--ingress",
        "from=app=web ports=5432",
    ];
    h.ok(&allow_web);
    let quick = Duration::from_millis(700);

    // Removing the allowing policy (IPv4).
    let to4 = SocketAddr::new(db.v4, 5432);
    let mut c1 = None;
    h.eventually("web connects to db", || {
        c1 = connect(&web.netns, to4).ok();
        c1.is_some()
    });
    let mut c1 = c1.unwrap();
    assert!(
        exchange(&mut c1, "c1 one"),
        "no ack on an allowed connection"
    );
    assert_eq!(
        server.next("c1", Duration::from_secs(2)).as_deref(),
        Some("c1 one")
    );
    h.ok(&["policy", "rm", "db-allow"]);
    let _ = c1.write_all(b"c1 two\n");
    let late = server.next("c1", Duration::from_secs(2));
    assert_eq!(late, None, "data on a revoked connection arrived");
    assert!(
        in_ns(&web.netns, || TcpStream::connect_timeout(&to4, quick)).is_err(),
        "a new connection passed after the revocation"
    );
    drop(c1);

    // Replacing it with one that allows someone else (IPv6).
    h.ok(&allow_web);
    let to6 = SocketAddr::new(db.v6, 5432);
    let mut c2 = connect(&web.netns, to6).expect("web connects to db over IPv6");
    assert!(exchange(&mut c2, "c2 one"));
    assert_eq!(
        server.next("c2", Duration::from_secs(2)).as_deref(),
        Some("c2 one")
    );
    let replacement = [
        "kind: NetworkPolicy",
        "metadata: {name: db-allow, network: blue}",
        "spec:",
        "  podSelector: {matchLabels: {app: db}}",
        "  ingress:",
        "    - from: [{podSelector: {matchLabels: {role: admin}}}]",
        "      ports: [{port: 5432}]",
        "",
    ]
    .join("\n");
    let o = apply(&h, &replacement, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = c2.write_all(b"c2 two\n");
    assert_eq!(
        server.next("c2", Duration::from_secs(2)),
        None,
        "data on a connection the replacement denies arrived"
    );
    assert!(in_ns(&web.netns, || TcpStream::connect_timeout(&to6, quick)).is_err());
    // What the replacement allows works: not a blanket cut.
    let mut c3 = connect(&admin.netns, to6).expect("admin connects to db");
    assert!(exchange(&mut c3, "c3 one"));
    assert_eq!(
        server.next("c3", Duration::from_secs(2)).as_deref(),
        Some("c3 one")
    );
}

// ---------------------------------------------------------------------------------------------
// Restarts.

#[test]
fn enforcement_survives_daemon_restarts_and_new_policies_apply_after() {
    let h = Host::new();
    blue(&h);
    let eps = vec![
        attach(&h, "web", "blue", &["app=web"], &[]),
        attach(&h, "db", "blue", &["app=db"], &[]),
        attach(&h, "admin", "blue", &["role=admin"], &[]),
    ];
    let _servers = serve(&eps);
    h.ok(&[
        "policy",
        "create",
        "db-in",
        "--network",
        "blue",
        "--selector",
        "app=db",
        "--ingress",
        "from=app=web ports=5432",
    ]);
    let mut model = vec![
        Pol::on("blue", is("app", "db"))
            .ingress(vec![rule(vec![peer(is("app", "web"))], vec![tcp(5432)])]),
    ];
    let check = |when: &str, model: &[Pol]| {
        let bad = matrix_mismatches(&eps, model);
        assert!(bad.is_empty(), "{when}:\n{}", bad.join("\n"));
    };
    let warm = settle(&eps, &model, Duration::from_secs(10));
    assert!(warm.is_empty(), "before any restart:\n{}", warm.join("\n"));

    // The kernel keeps enforcing while no daemon runs.
    h.stop();
    check("with the daemon stopped", &model);
    h.start();
    check("right after a restart", &model);
    assert_eq!(policy_names(&h), ["db-in"]);
    h.kill();
    check("after a crash", &model);
    h.start();
    check("right after the restart from a crash", &model);

    // A policy made after the restart is enforced, and so is a removal.
    h.ok(&[
        "policy",
        "create",
        "admin-quiet",
        "--network",
        "blue",
        "--selector",
        "role=admin",
        "--type",
        "egress",
    ]);
    model.push(Pol::on("blue", is("role", "admin")).egress(vec![]));
    check("with a policy made after the restart", &model);
    h.ok(&["policy", "rm", "db-in"]);
    model.remove(0);
    check("with a policy removed after the restart", &model);
}

// ---------------------------------------------------------------------------------------------
// Bad input.

/// Whether `err` says `line N` (and not `line N0`).
fn mentions_line(err: &str, n: usize) -> bool {
    let at = format!("line {n}");
    err.match_indices(&at).any(|(i, _)| {
        !err[i + at.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

#[test]
fn bad_policies_are_refused_with_their_line_and_change_nothing() {
    let h = Host::new();
    blue(&h);
    h.ok(&[
        "policy",
        "create",
        "keep",
        "--network",
        "blue",
        "--selector",
        "app=db",
        "--ingress",
        "from=app=web",
    ]);
    let listing = || h.json(&["policy", "ls"]);
    let before = listing();
    // A file whose first document is good (a new policy) and whose second replaces `keep` but
    // has one mistake: nothing of it may be applied.
    let file = |bad_line: &str| -> (String, usize) {
        let lines = [
            "apiVersion: networking.k8s.io/v1",
            "kind: NetworkPolicy",
            "metadata:",
            "  name: fresh",
            "  network: blue",
            "spec:",
            "  podSelector: {}",
            "---",
            "kind: NetworkPolicy",
            "metadata:",
            "  name: keep",
            "  network: blue",
            "spec:",
            "  podSelector:",
            "    matchLabels: {app: db}",
            "  ingress:",
            "    - from:",
            bad_line,
            "      ports:",
            "        - {protocol: TCP, port: 5432}",
            "",
        ];
        (lines.join("\n"), 18)
    };
    let mut cases = vec![
        (
            "unknown field",
            file("        - podSelektor: {matchLabels: {app: web}}"),
            &["podSelektor", "unknown field"][..],
        ),
        (
            "bad operator",
            file(
                "        - podSelector: {matchExpressions: [{key: app, operator: Equals, values: [web]}]}",
            ),
            &["Equals", "operator"][..],
        ),
        (
            "bad CIDR",
            file("        - ipBlock: {cidr: 10.0.0.300/8}"),
            &["10.0.0.300", "cidr", "CIDR"][..],
        ),
    ];
    let (text, _) = file("        - podSelector: {matchLabels: {app: web}}");
    let bad_port = text.replace("port: 5432}", "port: 70000}");
    cases.push(("port out of range", (bad_port, 20), &["70000", "port"][..]));
    let json = [
        "{",
        "  \"kind\": \"NetworkPolicy\",",
        "  \"metadata\": {\"name\": \"fresh\", \"network\": \"blue\"},",
        "  \"spec\": {",
        "    \"podSelector\": {},",
        "    \"egres\": []",
        "  }",
        "}",
    ]
    .join("\n");
    cases.push((
        "unknown field in JSON",
        (json, 6),
        &["egres", "unknown field"][..],
    ));
    for (what, (text, line), words) in &cases {
        for stdin in [false, true] {
            let o = apply(&h, text, stdin);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{what}: applied:\n{text}");
            assert!(
                mentions_line(&err, *line),
                "{what}: the error does not say line {line}: {err}"
            );
            assert!(
                words.iter().any(|w| err.contains(w)),
                "{what}: the error says none of {words:?}: {err}"
            );
            assert_eq!(listing(), before, "{what}: something was applied");
        }
    }

    // Flags.
    for (rule, flag, word) in [
        ("form=app=web", "--ingress", "form"),
        ("to=app=web", "--ingress", "to="),
        ("ports=70000", "--ingress", "70000"),
        ("from=cidr:10.0.0.300/8", "--ingress", "10.0.0.300"),
        ("from=app=web except=10.0.0.0/8", "--ingress", "except"),
        ("from=app in (web", "--ingress", "app in (web"),
        ("from=app=web", "--egress", "from"),
        ("to=app=web ports=5432/icmp", "--egress", "icmp"),
    ] {
        let err = h.fails(&["policy", "create", "x", "--network", "blue", flag, rule]);
        assert!(
            err.contains(flag) && err.contains(word),
            "{flag} {rule:?}: {err}"
        );
    }
    let err = h.fails(&[
        "policy",
        "create",
        "x",
        "--network",
        "blue",
        "--selector",
        "app in (web",
    ]);
    assert!(err.contains("--selector"), "{err}");
    let err = h.fails(&["policy", "create", "x", "--network", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = h.fails(&["policy", "rm", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    assert_eq!(listing(), before, "a refused command changed something");

    // A network with a policy stays; without it, it goes.
    let err = h.fails(&["network", "rm", "blue"]);
    assert!(err.contains("polic"), "{err}");
    h.ok(&["policy", "rm", "keep"]);
    h.ok(&["network", "rm", "blue"]);
}
