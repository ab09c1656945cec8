//! Services (issue 13): what one change to the load balancer costs with 10 to 10,000 services
//! in place, beside loading the rules the way kube-proxy and iptables-based proxies do; and
//! short TCP connections through a VIP against straight to a backend, in one run.
//!
//! Programming is timed in private network namespaces (one per number of services, made by a
//! thread of its own that `unshare`s, so that whatever is left there goes with the thread):
//! berth's [`LoadBalancer::apply`] called directly (the kernel's share of a change on a host,
//! without the store), then `nft -f` of kube-proxy's nftables layout (the whole table
//! re-rendered and replaced, and only what changed, as kube-proxy's partial syncs do), then
//! `iptables-restore` of kube-proxy's iptables layout (the whole nat table). Every service has
//! one port (TCP 80 to 8080) and 10 backends; the baselines' text is rendered before the clock
//! starts. The data path is measured through a berth daemon, from a client sandbox.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_api::{
    Attach, Client, CreateNetwork, CreateService, Detach, Endpoint, Network, Protocol, Service,
};
use berth_dataplane::netns;
use berth_dataplane::nftables::{self, Backend, Frontend, LoadBalancer, Pool, ServiceRules};

use crate::{quantile_index, with_stdin};

/// Backends per service.
const BACKENDS: usize = 10;
const PORT: u16 = 80;
const TARGET: u16 = 8080;
/// Where the VIPs are (berth's default service range).
const SERVICE_RANGE: &str = "10.211.0.0/16";
/// Where the backends are: kube-proxy's cluster CIDR (connections from elsewhere are
/// masqueraded).
const POD_CIDR: &str = "10.64.0.0/10";
/// Timed loads of everything (berth's `sync_all`, `from_kernel`).
const SYNC_RUNS: usize = 3;
/// Above this many services the full-reload baselines get `baseline_changes` repetitions.
const FEW: usize = 100;

pub struct Options {
    /// Numbers of services in place.
    pub sizes: Vec<usize>,
    /// Changes of each kind timed per size (0 skips programming).
    pub changes: usize,
    /// Changes of each kind for the full-reload baselines above [`FEW`] services.
    pub baseline_changes: usize,
    /// Skip the baselines.
    pub no_baselines: bool,
}

// ---------------------------------------------------------------------------------------------
// The services, as every tool is told them.

#[derive(Clone)]
struct Svc {
    id: u32,
    vip: Ipv4Addr,
    backends: Vec<Ipv4Addr>,
}

/// The services in place; the same for every tool at one size (built the same way).
#[derive(Clone)]
struct Model {
    svcs: Vec<Svc>,
    next_id: u32,
    next_backend: u32,
}

impl Model {
    fn new(n: usize) -> Model {
        let mut m = Model {
            svcs: Vec::with_capacity(n + 1),
            next_id: 0,
            next_backend: 0,
        };
        for _ in 0..n {
            m.push_service();
        }
        m
    }

    fn backend(&mut self) -> Ipv4Addr {
        // 10.64.0.0/10 onwards.
        let a = Ipv4Addr::from(0x0a40_0000 + self.next_backend);
        self.next_backend += 1;
        a
    }

    /// A new service with [`BACKENDS`] new backends; its index.
    fn push_service(&mut self) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        // 10.211.0.1 onwards.
        let vip = Ipv4Addr::from(0x0ad3_0000 + id + 1);
        let backends = (0..BACKENDS).map(|_| self.backend()).collect();
        self.svcs.push(Svc { id, vip, backends });
        self.svcs.len() - 1
    }
}

/// One change; the model has already changed when a tool is told it.
enum Change {
    AddService(usize),
    AddBackend(usize, Ipv4Addr),
    RemoveBackend(usize, Ipv4Addr),
    RemoveService(Svc),
}

const OPS: [&str; 4] = [
    "add service",
    "add backend",
    "remove backend",
    "remove service",
];

/// A way to program the kernel with the model.
trait Programmer {
    /// Programs the whole model where nothing is; how long that took.
    fn load_all(&mut self, m: &Model) -> Result<Duration>;
    /// Programs one change; how long that took (`None`: nothing to do, the tool replaces
    /// everything at its next change).
    fn change(&mut self, m: &Model, c: &Change) -> Result<Option<Duration>>;
}

/// `reps` rounds of: add a service, add a backend to one of the first `n0` services, remove
/// one of its backends (not the one just added), remove the service added. Samples per op.
fn run_changes(
    p: &mut dyn Programmer,
    m: &mut Model,
    n0: usize,
    reps: usize,
) -> Result<[Vec<Duration>; 4]> {
    let mut out: [Vec<Duration>; 4] = Default::default();
    for i in 0..reps {
        let idx = m.push_service();
        let add = p.change(m, &Change::AddService(idx))?;
        let j = (i * 7919 + 13) % n0.max(1);
        let ip = m.backend();
        m.svcs[j].backends.push(ip);
        let more = p.change(m, &Change::AddBackend(j, ip))?;
        let ip = m.svcs[j].backends.remove(0);
        let less = p.change(m, &Change::RemoveBackend(j, ip))?;
        let s = m.svcs.pop().expect("the service added");
        let gone = p.change(m, &Change::RemoveService(s))?;
        for (k, d) in [add, more, less, gone].into_iter().enumerate() {
            out[k].extend(d);
        }
    }
    Ok(out)
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// berth

fn frontend(s: &Svc) -> Frontend {
    Frontend::Vip {
        vip: IpAddr::V4(s.vip),
        protocol: Protocol::Tcp,
        port: PORT,
    }
}

fn pool(s: &Svc) -> Pool {
    Pool {
        backends: s
            .backends
            .iter()
            .map(|a| Backend {
                addr: IpAddr::V4(*a),
                port: TARGET,
                local: false,
            })
            .collect(),
        affinity: None,
    }
}

fn want(m: &Model) -> BTreeMap<Frontend, Pool> {
    m.svcs.iter().map(|s| (frontend(s), pool(s))).collect()
}

struct Berth {
    lb: LoadBalancer,
}

impl Programmer for Berth {
    fn load_all(&mut self, m: &Model) -> Result<Duration> {
        let want = want(m);
        Ok(timed(|| Ok(self.lb.sync_all(&want)?))?.1)
    }

    fn change(&mut self, m: &Model, c: &Change) -> Result<Option<Duration>> {
        let change = match c {
            Change::AddService(i) | Change::AddBackend(i, _) | Change::RemoveBackend(i, _) => {
                (frontend(&m.svcs[*i]), Some(pool(&m.svcs[*i])))
            }
            Change::RemoveService(s) => (frontend(s), None),
        };
        let lb = &mut self.lb;
        Ok(Some(timed(|| Ok(lb.apply(&[change])?))?.1))
    }
}

// ---------------------------------------------------------------------------------------------
// kube-proxy, nftables mode (pkg/proxy/nftables/proxier.go): table `ip kube-proxy`; map
// `service-ips` (VIP . proto . port : goto service chain); a service chain masquerades clients
// from outside the cluster CIDR and picks `numgen random mod N vmap { i : goto endpoint }`; an
// endpoint chain masquerades hairpin traffic and DNATs.

const KP: &str = "ip kube-proxy";

/// A stable pseudo-hash, for chain names of kube-proxy's shape.
fn tag(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn svc_chain(s: &Svc) -> String {
    format!(
        "service-{:08X}-bench/svc{}/tcp/p{PORT}",
        tag(u64::from(s.id)) as u32,
        s.id
    )
}

fn ep_chain(s: &Svc, ip: Ipv4Addr) -> String {
    format!(
        "endpoint-{:08X}-bench/svc{}/tcp/p{PORT}__{ip}/{TARGET}",
        tag(u64::from(s.id) << 32 | u64::from(u32::from(ip))) as u32,
        s.id
    )
}

fn nft_head(s: &mut String) {
    let _ = write!(
        s,
        "add table {KP}
delete table {KP}
add table {KP}
add chain {KP} mark-for-masquerade
add rule {KP} mark-for-masquerade mark set mark or 0x4000
add chain {KP} masquerading
add rule {KP} masquerading mark and 0x4000 == 0 return
add rule {KP} masquerading mark set mark xor 0x4000
add rule {KP} masquerading masquerade fully-random
add chain {KP} services
add chain {KP} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}
add rule {KP} nat-prerouting jump services
add chain {KP} nat-output {{ type nat hook output priority -100 ; }}
add rule {KP} nat-output jump services
add chain {KP} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}
add rule {KP} nat-postrouting jump masquerading
add map {KP} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}
add rule {KP} services ip daddr . meta l4proto . th dport vmap @service-ips
"
    );
}

fn nft_endpoint(out: &mut String, s: &Svc, ip: Ipv4Addr) {
    let ep = ep_chain(s, ip);
    let _ = write!(
        out,
        "add chain {KP} {ep}
add rule {KP} {ep} ip saddr {ip} jump mark-for-masquerade
add rule {KP} {ep} meta l4proto tcp dnat to {ip}:{TARGET}
"
    );
}

fn nft_service_rules(out: &mut String, s: &Svc) {
    let sc = svc_chain(s);
    let _ = writeln!(
        out,
        "add rule {KP} {sc} ip daddr {} tcp dport {PORT} ip saddr != {POD_CIDR} jump mark-for-masquerade",
        s.vip
    );
    let _ = write!(
        out,
        "add rule {KP} {sc} numgen random mod {} vmap {{ ",
        s.backends.len()
    );
    for (i, ip) in s.backends.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{sep}{i} : goto {}", ep_chain(s, *ip));
    }
    out.push_str(" }\n");
}

fn nft_service(out: &mut String, s: &Svc) {
    for ip in &s.backends {
        nft_endpoint(out, s, *ip);
    }
    let sc = svc_chain(s);
    let _ = writeln!(out, "add chain {KP} {sc}");
    nft_service_rules(out, s);
    let _ = writeln!(
        out,
        "add element {KP} service-ips {{ {} . tcp . {PORT} : goto {sc} }}",
        s.vip
    );
}

/// The whole table, replacing what is there, in one transaction.
fn nft_full(m: &Model) -> String {
    let mut s = String::with_capacity(200 + m.svcs.len() * 3000);
    nft_head(&mut s);
    for svc in &m.svcs {
        nft_service(&mut s, svc);
    }
    s
}

/// What kube-proxy's partial sync writes for one change: the chains of the service that
/// changed, rewritten, and its map element; chains of endpoints that left are deleted.
fn nft_partial(m: &Model, c: &Change) -> String {
    let mut s = String::new();
    match c {
        Change::AddService(i) => nft_service(&mut s, &m.svcs[*i]),
        Change::AddBackend(i, ip) => {
            let svc = &m.svcs[*i];
            nft_endpoint(&mut s, svc, *ip);
            let _ = writeln!(s, "flush chain {KP} {}", svc_chain(svc));
            nft_service_rules(&mut s, svc);
        }
        Change::RemoveBackend(i, ip) => {
            let svc = &m.svcs[*i];
            let _ = writeln!(s, "flush chain {KP} {}", svc_chain(svc));
            nft_service_rules(&mut s, svc);
            let ep = ep_chain(svc, *ip);
            let _ = writeln!(s, "flush chain {KP} {ep}\ndelete chain {KP} {ep}");
        }
        Change::RemoveService(svc) => {
            let sc = svc_chain(svc);
            let _ = writeln!(
                s,
                "delete element {KP} service-ips {{ {} . tcp . {PORT} }}\nflush chain {KP} {sc}\ndelete chain {KP} {sc}",
                svc.vip
            );
            for ip in &svc.backends {
                let ep = ep_chain(svc, *ip);
                let _ = writeln!(s, "flush chain {KP} {ep}\ndelete chain {KP} {ep}");
            }
        }
    }
    s
}

fn nft_load(text: &str) -> Result<Duration> {
    Ok(timed(|| with_stdin(Command::new("nft").args(["-f", "-"]), text))?.1)
}

/// `nft -f` of the whole table at every change.
struct NftFull;

impl Programmer for NftFull {
    fn load_all(&mut self, m: &Model) -> Result<Duration> {
        nft_load(&nft_full(m))
    }

    fn change(&mut self, m: &Model, c: &Change) -> Result<Option<Duration>> {
        match c {
            Change::RemoveService(_) => Ok(None),
            _ => nft_load(&nft_full(m)).map(Some),
        }
    }
}

/// `nft -f` of what changed.
struct NftPartial;

impl Programmer for NftPartial {
    fn load_all(&mut self, m: &Model) -> Result<Duration> {
        nft_load(&nft_full(m))
    }

    fn change(&mut self, m: &Model, c: &Change) -> Result<Option<Duration>> {
        nft_load(&nft_partial(m, c)).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// kube-proxy, iptables mode (pkg/proxy/iptables/proxier.go): the nat table with KUBE-SERVICES
// (one rule per service port), KUBE-SVC-* (masquerade from outside, then one `statistic`
// rule per endpoint) and KUBE-SEP-* (hairpin masquerade, DNAT), restored whole.

fn kube_svc(s: &Svc) -> String {
    format!("KUBE-SVC-{:016X}", tag(u64::from(s.id)))
}

fn kube_sep(s: &Svc, ip: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{:016X}",
        tag(u64::from(s.id) << 32 | u64::from(u32::from(ip)))
    )
}

fn iptables_full(m: &Model) -> String {
    let mut s = String::with_capacity(500 + m.svcs.len() * 4000);
    s.push_str(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
",
    );
    for svc in &m.svcs {
        let _ = writeln!(s, ":{} - [0:0]", kube_svc(svc));
        for ip in &svc.backends {
            let _ = writeln!(s, ":{} - [0:0]", kube_sep(svc, *ip));
        }
    }
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
",
    );
    for svc in &m.svcs {
        let name = format!("bench/svc{}:http", svc.id);
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {PORT} -j {}",
            svc.vip,
            kube_svc(svc)
        );
    }
    for svc in &m.svcs {
        let name = format!("bench/svc{}:http", svc.id);
        let chain = kube_svc(svc);
        let _ = writeln!(
            s,
            "-A {chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport {PORT} ! -s {POD_CIDR} -j KUBE-MARK-MASQ",
            svc.vip
        );
        let n = svc.backends.len();
        for (i, ip) in svc.backends.iter().enumerate() {
            let sep = kube_sep(svc, *ip);
            if i + 1 < n {
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"{name} -> {ip}:{TARGET}\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (n - i) as f64
                );
            } else {
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"{name} -> {ip}:{TARGET}\" -j {sep}"
                );
            }
        }
        for ip in &svc.backends {
            let sep = kube_sep(svc, *ip);
            let _ = write!(
                s,
                "-A {sep} -m comment --comment {name} -s {ip}/32 -j KUBE-MARK-MASQ
-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ip}:{TARGET}
"
            );
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// `iptables-restore` of the whole nat table at every change.
struct IptablesFull;

impl Programmer for IptablesFull {
    fn load_all(&mut self, m: &Model) -> Result<Duration> {
        let text = iptables_full(m);
        Ok(timed(|| with_stdin(&mut Command::new("iptables-restore"), &text))?.1)
    }

    fn change(&mut self, m: &Model, c: &Change) -> Result<Option<Duration>> {
        match c {
            Change::RemoveService(_) => Ok(None),
            _ => self.load_all(m).map(Some),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running it.

/// Runs `f` on a thread of its own in a new network namespace, which ends with the thread
/// (and with it whatever tables are left there). Processes it spawns are in it too.
fn in_private_netns<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .context("unshare a network namespace")?;
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).trim()
        );
    }
    Ok(())
}

/// Deletes what a phase left in the (private) namespace, also when it fails.
struct Cleanup(fn());

impl Drop for Cleanup {
    fn drop(&mut self) {
        (self.0)();
    }
}

fn delete_berth_table() {
    let _ = run(Command::new("nft").args(["delete", "table", "inet", nftables::TABLE]));
}

fn delete_kube_proxy_table() {
    let _ = run(Command::new("nft").args(["delete", "table", "ip", "kube-proxy"]));
}

fn flush_nat_table() {
    let _ = run(Command::new("iptables").args(["-t", "nat", "-F"]));
    let _ = run(Command::new("iptables").args(["-t", "nat", "-X"]));
}

/// One line of the programming table.
struct Line {
    tool: String,
    services: usize,
    op: &'static str,
    samples: Vec<Duration>,
}

fn print_header() {
    println!(
        "\n| tool                                     | services | op                    | runs |   p50 ms |   p99 ms |   max ms |"
    );
    println!(
        "|------------------------------------------|---------:|-----------------------|-----:|---------:|---------:|---------:|"
    );
}

fn print_lines(lines: &[Line]) {
    for l in lines {
        let mut s = l.samples.clone();
        s.sort();
        let ms = |d: Option<&Duration>| {
            d.map_or("-".into(), |d| format!("{:.3}", d.as_secs_f64() * 1e3))
        };
        println!(
            "| {:<40} | {:>8} | {:<21} | {:>4} | {:>8} | {:>8} | {:>8} |",
            l.tool,
            l.services,
            l.op,
            s.len(),
            ms(s.get(quantile_index(s.len(), 0.5))),
            ms(s.get(quantile_index(s.len(), 0.99))),
            ms(s.last()),
        );
    }
}

fn version(cmd: &str) -> String {
    Command::new(cmd)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Times programming at each size: berth, then the baselines, each phase on its own in the
/// size's private namespace.
pub fn programming(o: &Options) -> Result<()> {
    let have_nft = !version("nft").is_empty();
    let ipt = version("iptables");
    let baselines = !o.no_baselines && have_nft && !ipt.is_empty();
    if !o.no_baselines && !baselines {
        eprintln!("service baselines skipped: apt-get install nftables iptables");
    }
    // "iptables v1.8.9 (nf_tables)" -> "1.8.9 (nf_tables)"
    let ipt = ipt.trim_start_matches("iptables v").to_string();
    let nft_v = version("nft");
    let nft_v = nft_v
        .strip_prefix("nftables v")
        .and_then(|v| v.split(' ').next())
        .unwrap_or("?")
        .to_string();
    println!(
        "\nProgramming services (each {BACKENDS} backends), one change at a time, in a private namespace.\n\
         berth: LoadBalancer::apply / sync_all / from_kernel called directly (no store, no API).\n\
         kube-proxy layouts: text rendered beforehand (not timed); nft -f and iptables-restore timed,\n\
         process start included. `whole table` re-renders and replaces everything at each change\n\
         (kube-proxy's full sync; iptables-based proxies without partial sync); `changed chains` writes\n\
         only the chains and element of the service that changed (kube-proxy nftables' partial sync).\n\
         Full-reload baselines above {FEW} services run fewer times (see runs); p99 of few runs is their max."
    );
    print_header();
    for &n in &o.sizes {
        let lines = in_private_netns(|| one_size(n, o, baselines, &nft_v, &ipt))?;
        print_lines(&lines);
    }
    Ok(())
}

fn progress(n: usize, what: &str, since: Instant) {
    eprintln!(
        "services: {n} services, {what}: {:.1} s",
        since.elapsed().as_secs_f64()
    );
}

fn one_size(n: usize, o: &Options, baselines: bool, nft_v: &str, ipt: &str) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    let mut push = |tool: &str, op: &'static str, samples: Vec<Duration>| {
        lines.push(Line {
            tool: tool.to_string(),
            services: n,
            op,
            samples,
        })
    };
    let reps = o.changes;
    let full_reps = if n > FEW { o.baseline_changes } else { reps };
    let mut per_op: Vec<(String, [Vec<Duration>; 4])> = Vec::new();

    // berth
    let t = Instant::now();
    {
        let _clean = Cleanup(delete_berth_table);
        nftables::install(
            &[],
            &[],
            &ServiceRules {
                ranges: vec![SERVICE_RANGE.parse()?],
                ..Default::default()
            },
        )?;
        let m = Model::new(n);
        let want = want(&m);
        let mut b = Berth {
            lb: LoadBalancer::from_kernel()?,
        };
        let mut cold = Vec::new();
        for r in 0..SYNC_RUNS {
            if r > 0 {
                b.lb.sync_all(&BTreeMap::new())?;
            }
            cold.push(b.load_all(&m)?);
        }
        let (mut read, mut warm) = (Vec::new(), Vec::new());
        for _ in 0..SYNC_RUNS {
            let (mut lb, d) = timed(|| Ok(LoadBalancer::from_kernel()?))?;
            read.push(d);
            if lb.len() != n {
                bail!("from_kernel read {} frontends, not {n}", lb.len());
            }
            warm.push(timed(|| Ok(lb.sync_all(&want)?))?.1);
        }
        push("berth sync_all", "all, kernel empty", cold);
        push("berth from_kernel (restart)", "read all", read);
        push("berth sync_all (restart)", "all, kernel right", warm);
        let mut m = m;
        let s = run_changes(&mut b, &mut m, n, reps)?;
        if LoadBalancer::from_kernel()?.len() != n {
            bail!("berth: the kernel does not hold {n} frontends after the changes");
        }
        per_op.push(("berth apply".into(), s));
    }
    progress(n, "berth", t);

    if baselines {
        let t = Instant::now();
        {
            let _clean = Cleanup(delete_kube_proxy_table);
            let mut m = Model::new(n);
            let first = NftPartial.load_all(&m)?;
            push(
                &format!("nft -f {nft_v}, kube-proxy"),
                "all, kernel empty",
                vec![first],
            );
            let s = run_changes(&mut NftPartial, &mut m, n, reps)?;
            per_op.push((format!("nft -f {nft_v}, changed chains"), s));
        }
        progress(n, "nft -f, changed chains", t);
        let t = Instant::now();
        {
            let _clean = Cleanup(delete_kube_proxy_table);
            let mut m = Model::new(n);
            NftFull.load_all(&m)?;
            let s = run_changes(&mut NftFull, &mut m, n, full_reps)?;
            per_op.push((format!("nft -f {nft_v}, whole table"), s));
        }
        progress(n, "nft -f, whole table", t);
        let t = Instant::now();
        {
            let _clean = Cleanup(flush_nat_table);
            let mut m = Model::new(n);
            let first = IptablesFull.load_all(&m)?;
            push(
                &format!("iptables-restore {ipt}"),
                "all, kernel empty",
                vec![first],
            );
            let s = run_changes(&mut IptablesFull, &mut m, n, full_reps)?;
            per_op.push((format!("iptables-restore {ipt}"), s));
        }
        progress(n, "iptables-restore", t);
    }
    for (k, op) in OPS.iter().enumerate() {
        for (tool, samples) in &per_op {
            if !samples[k].is_empty() {
                push(tool, op, samples[k].clone());
            }
        }
    }
    Ok(lines)
}

// ---------------------------------------------------------------------------------------------
// The data path: short TCP connections through the VIP and straight to the backends.

const NET: &str = "svcbench";
const NET_SUBNET: &str = "10.82.0.0/24";
const SERVICE: &str = "benchweb";
const BACKEND_SANDBOXES: usize = 3;

/// What the data-path benchmark made through the daemon, undone on drop.
struct DataPath<'a> {
    client: &'a Client,
    network: bool,
    service: bool,
    sandboxes: Vec<PathBuf>,
}

impl Drop for DataPath<'_> {
    fn drop(&mut self) {
        if self.service {
            let _ = self
                .client
                .delete::<serde_json::Value>(&format!("/v1/services/{SERVICE}"));
        }
        for p in &self.sandboxes {
            let _ = self.client.post::<_, serde_json::Value>(
                "/v1/detach",
                &Detach {
                    network: NET.into(),
                    sandbox: Some(p.display().to_string()),
                    ..Default::default()
                },
            );
            let _ = netns::remove(p);
        }
        if self.network {
            let _ = self
                .client
                .delete::<serde_json::Value>(&format!("/v1/networks/{NET}"));
        }
    }
}

/// Runs `f` on a thread that has entered the namespace at `path`; sockets it makes stay there.
pub(crate) fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(path)?;
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn enter(path: &Path) -> Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter {}", path.display()))
}

/// Answers every connection with `tag` and closes it, until `stop`.
fn serve(l: &TcpListener, tag: &[u8], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // The listener's receive timeout ends accept() now and then to look at `stop`.
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.write_all(tag);
        }
    }
}

/// Sets the flag when dropped (the servers stop, also when measuring failed).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One request: connect, read the answer to its end, close. The answer.
fn request(to: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut answer = Vec::with_capacity(8);
    c.read_to_end(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(answer)
}

/// One run: `clients` threads in the client sandbox, each making requests to `targets` in
/// turn for `secs`. Connections per second, latencies, failures.
fn measure(
    from: &Path,
    targets: &[SocketAddr],
    clients: usize,
    secs: u32,
) -> Result<(f64, Vec<Duration>, usize)> {
    closed_loop(from, clients, secs, "services", |k| {
        let to = targets[k % targets.len()];
        let t = Instant::now();
        request(to).map_err(|e| std::io::Error::new(e.kind(), format!("request to {to}: {e}")))?;
        Ok(t.elapsed())
    })
}

/// `clients` threads in the namespace at `from`, each calling `one` back to back for `secs`:
/// its `k`-th call on thread `c` gets `c + k` (to rotate over targets), and says how long what
/// it measures took. Calls per second, latencies, failures (the first of each thread's is
/// printed, tagged `what`).
pub(crate) fn closed_loop(
    from: &Path,
    clients: usize,
    secs: u32,
    what: &str,
    one: impl Fn(usize) -> std::io::Result<Duration> + Sync,
) -> Result<(f64, Vec<Duration>, usize)> {
    let start = Instant::now();
    let until = start + Duration::from_secs(u64::from(secs));
    let one = &one;
    let results: Vec<Result<(Vec<Duration>, usize)>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || -> Result<(Vec<Duration>, usize)> {
                    enter(from)?;
                    let mut lat = Vec::with_capacity(100_000);
                    let mut failed = 0;
                    let mut k = c;
                    while Instant::now() < until {
                        match one(k) {
                            Ok(d) => lat.push(d),
                            Err(e) => {
                                if failed == 0 {
                                    eprintln!("{what}: first failure in this run: {e}");
                                }
                                failed += 1;
                            }
                        }
                        k += 1;
                    }
                    Ok((lat, failed))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let (mut lat, mut failed) = (Vec::new(), 0);
    for r in results {
        let (l, f) = r?;
        lat.extend(l);
        failed += f;
    }
    Ok((lat.len() as f64 / elapsed, lat, failed))
}

/// Connections per second and p50/p99 latency through the VIP and straight to the backends,
/// `runs` alternating runs of `secs` each, medians.
pub fn data_path(
    client: &Client,
    dir: &Path,
    secs: u32,
    runs: usize,
    clients: usize,
) -> Result<()> {
    let mut g = DataPath {
        client,
        network: false,
        service: false,
        sandboxes: Vec::new(),
    };
    let _: Network = client.post(
        "/v1/networks",
        &CreateNetwork {
            name: NET.into(),
            subnet: Some(NET_SUBNET.into()),
            ..Default::default()
        },
    )?;
    g.network = true;
    let mut backends = Vec::new();
    // Two clients, one per path: connections of one never meet the other's in conntrack or in
    // a backend's TIME_WAIT (a port reused across paths would: same tuple at the backend).
    for i in 0..BACKEND_SANDBOXES + 2 {
        let path = dir.join("sb").join(format!("svc{i}"));
        netns::create(&path)?;
        g.sandboxes.push(path.clone());
        let labels = if i < BACKEND_SANDBOXES {
            [("app".to_string(), "web".to_string())].into()
        } else {
            Default::default()
        };
        let ep: Endpoint = client.post(
            "/v1/endpoints",
            &Attach {
                network: NET.into(),
                sandbox: path.display().to_string(),
                labels,
                ..Default::default()
            },
        )?;
        if i < BACKEND_SANDBOXES {
            backends.push(SocketAddr::new(ep.ips[0].addr(), TARGET));
        }
    }
    let direct_sb = g.sandboxes[BACKEND_SANDBOXES].clone();
    let vip_sb = g.sandboxes[BACKEND_SANDBOXES + 1].clone();
    let svc: Service = client.post(
        "/v1/services",
        &CreateService {
            name: SERVICE.into(),
            network: NET.into(),
            selector: "app=web".into(),
            ports: vec![format!("{PORT}:{TARGET}")],
            ..Default::default()
        },
    )?;
    g.service = true;
    let vip = SocketAddr::new(*svc.vips.first().context("the service has no VIP")?, PORT);

    let listeners = g.sandboxes[..BACKEND_SANDBOXES]
        .iter()
        .map(|p| {
            in_netns(p, || {
                let l = TcpListener::bind(("0.0.0.0", TARGET))?;
                nix::sys::socket::setsockopt(
                    &l,
                    nix::sys::socket::sockopt::ReceiveTimeout,
                    &nix::sys::time::TimeVal::new(0, 100_000),
                )?;
                Ok(l)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tags: Vec<Vec<u8>> = (0..BACKEND_SANDBOXES)
        .map(|k| format!("b{k}\n").into_bytes())
        .collect();
    let stop = AtomicBool::new(false);
    let (direct, through) = std::thread::scope(|s| -> Result<_> {
        for (l, tag) in listeners.iter().zip(&tags) {
            let stop = &stop;
            s.spawn(move || serve(l, tag, stop));
        }
        let _stop = StopOnDrop(&stop);
        // Warm up both ways, and see that the VIP reaches every backend.
        in_netns(&direct_sb, || {
            for k in 0..200 {
                request(backends[k % backends.len()])?;
            }
            Ok(())
        })?;
        let reached = in_netns(&vip_sb, || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..200 {
                seen.insert(request(vip).with_context(|| format!("request to VIP {vip}"))?);
            }
            Ok(seen.len())
        })?;
        if reached != BACKEND_SANDBOXES {
            bail!("the VIP reached {reached} of {BACKEND_SANDBOXES} backends");
        }
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        for r in 0..runs {
            let vip_first = r % 2 == 1;
            for which in [vip_first, !vip_first] {
                if which {
                    through.push(measure(&vip_sb, &[vip], clients, secs)?);
                } else {
                    direct.push(measure(&direct_sb, &backends, clients, secs)?);
                }
            }
        }
        Ok((direct, through))
    })?;
    drop(g);

    let summary = |v: &[(f64, Vec<Duration>, usize)]| {
        let median = |mut x: Vec<f64>| {
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let q = |p: f64| {
            median(
                v.iter()
                    .map(|(_, l, _)| {
                        let mut l = l.clone();
                        l.sort();
                        l.get(quantile_index(l.len(), p))
                            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
                    })
                    .collect(),
            )
        };
        (
            median(v.iter().map(|r| r.0).collect()),
            q(0.5),
            q(0.99),
            v.iter().map(|r| r.2).sum::<usize>(),
        )
    };
    let (d, t) = (summary(&direct), summary(&through));
    println!(
        "\nShort TCP connections (connect, read a 3-byte answer, close) from a client sandbox (one per path),\n\
         {clients} client thread(s), {BACKEND_SANDBOXES} backends, {secs} s x {runs} runs per path, alternating, medians:"
    );
    println!("| path                                  | conns/s | p50 ms | p99 ms | failed |");
    println!("|---------------------------------------|--------:|-------:|-------:|-------:|");
    for (label, (rate, p50, p99, failed)) in [
        ("straight to the backends (in turn)", d),
        ("through the VIP (berth load balancer)", t),
    ] {
        println!("| {label:<37} | {rate:>7.0} | {p50:>6.3} | {p99:>6.3} | {failed:>6} |");
    }
    println!(
        "| VIP / direct                          | {:>6.1}% | {:>5.1}% | {:>5.1}% |        |",
        100.0 * t.0 / d.0,
        100.0 * t.1 / d.1,
        100.0 * t.2 / d.2,
    );
    Ok(())
}
