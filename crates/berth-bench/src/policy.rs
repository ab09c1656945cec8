//! Network policy: how soon a policy created or deleted through the API acts on packets, what
//! policies in place cost new connections, and what they add to an attach, in one run.
//!
//! Everything is on one network of the benchmark's daemon (inside its private "host"
//! namespace), between a server sandbox (`app=server`) and a client sandbox (`app=client`):
//! - Enforcement: the client sends a UDP probe carrying a sequence number every
//!   [`PROBE_EVERY`] on a flow to an echo responder in the server and records which are
//!   answered, while a policy isolating the server's ingress (no rule: nothing allowed) is
//!   created and deleted in turn. The clock starts just before the API call.
//! - Cost: short TCP connections from the client to the server with 0 to N policies in place,
//!   each of which selects the server, so that the server is isolated and its allow elements
//!   grow with N (the packet path consults them on every new connection).
//! - Attach: attaches of endpoints labelled `app=server` (every policy selects them, so each
//!   attach writes all of their elements) with no policy and with N in place.

use std::collections::BTreeSet;
use std::io::Read;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_api::{
    Attach, Client, CreateNetwork, Detach, Endpoint, Labels, Network, Policy, Protocol,
};
use berth_dataplane::netns;
use berth_model::{Peer, PolicyPort, PolicyRule, PortRef};

use crate::quantile_index;
use crate::services::{closed_loop, in_netns};

const NET: &str = "polbench";
const SUBNET: &str = "10.85.0.0/20";
/// The server's UDP echo responder.
const ECHO_PORT: u16 = 7777;
/// The server's TCP port the client is allowed to connect to.
const TCP_PORT: u16 = 8080;
/// A port of the server no policy allows: whether the client reaches it tells whether the
/// server is isolated.
const CLOSED_PORT: u16 = 8081;
/// Filler policy `i` allows one address on port `FILLER_PORT + i`.
const FILLER_PORT: u16 = 10000;
/// The most policies in place (the filler's ports must stay below 65536).
const MAX_POLICIES: usize = 50_000;
const DENY: &str = "bench-deny";
const ALLOW: &str = "bench-allow";

/// The client's probe interval (the resolution of the enforcement figures).
const PROBE_EVERY: Duration = Duration::from_micros(200);
/// Probes remembered (about 50 s of them): a change is worked out well within that.
const RING: usize = 1 << 18;
/// A change whose effect is not seen on the probes by then failed.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);
/// While waiting for a denial: a probe unanswered this long is taken as dropped (only to
/// decide when to go on; the figures are worked out later, from every answer that came).
const GRACE: Duration = Duration::from_millis(30);
/// ... and the probes must have gone unanswered over this span.
const QUIET: Duration = Duration::from_millis(30);
/// A new flow is left to run this long after its first answer before the next denial.
const SETTLE: Duration = Duration::from_millis(10);

pub struct Options {
    /// Changes of each kind (create the deny policy, delete it) timed; 0 skips it.
    pub changes: usize,
    /// Numbers of policies in place while connections are timed.
    pub sizes: Vec<usize>,
    /// Seconds per run of connections; 0 skips them.
    pub secs: u32,
    /// Runs per number of policies (alternating order); medians are reported.
    pub runs: usize,
    /// Client threads making connections.
    pub clients: usize,
    /// Attaches timed with no policy, and as many with `attach_policies` in place; 0 skips it.
    pub attach_n: usize,
    pub attach_policies: usize,
    /// Policy creations, replacements and deletions timed with `attach_policies` in place,
    /// each kind; 0 skips them.
    pub api_changes: usize,
    /// Busy threads that load the machine for the loaded runs of the attaches and of the
    /// policy changes; 0: quiet runs only.
    pub load_threads: usize,
}

/// Threads that keep the CPUs busy until dropped: a loaded host.
struct Load {
    stop: std::sync::Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(n: usize) -> Load {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..10_000u64 {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                        }
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The load average over the last minute.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Policy API calls with the policies in place: `n` creations of a policy that selects the
/// server too (its profile changes, with all the others'), `n` replacements of it (another
/// port each time) and `n` deletions; each timed. (create, replace, delete).
fn api_changes(b: &mut Bench<'_>, n: usize) -> Result<[Vec<Duration>; 3]> {
    let mut out: [Vec<Duration>; 3] = Default::default();
    for i in 0..n {
        let port = 20_000 + (i % 1000) as u16;
        let p = policy(
            "bench-extra",
            vec![PolicyRule {
                peers: vec![Peer::Endpoints("app=extra".parse()?)],
                ports: vec![tcp(port)],
            }],
        )?;
        let t = Instant::now();
        b.create(&p)?;
        out[0].push(t.elapsed());
        let p = policy(
            "bench-extra",
            vec![PolicyRule {
                peers: vec![Peer::Endpoints("app=extra".parse()?)],
                ports: vec![tcp(port + 1000)],
            }],
        )?;
        let t = Instant::now();
        let _: serde_json::Value = b.client.put("/v1/policies/bench-extra", &p)?;
        out[1].push(t.elapsed());
        let t = Instant::now();
        b.delete("bench-extra")?;
        out[2].push(t.elapsed());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// What the benchmark makes through the daemon, undone on drop.

struct Bench<'a> {
    client: &'a Client,
    dir: &'a Path,
    network: bool,
    /// Policies in place (deleted on drop).
    policies: BTreeSet<String>,
    /// Sandboxes with an endpoint on the network (detached on drop).
    attached: BTreeSet<PathBuf>,
    /// Namespaces made (removed on drop).
    made: Vec<PathBuf>,
    /// Timed policy calls: creations and deletions made to change the number in place.
    creates: Vec<Duration>,
    deletes: Vec<Duration>,
    /// The most policies that were in place.
    peak: usize,
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.policies) {
            let _ = self
                .client
                .delete::<serde_json::Value>(&format!("/v1/policies/{name}"));
        }
        for p in std::mem::take(&mut self.attached) {
            let _ = self.client.post::<_, serde_json::Value>(
                "/v1/detach",
                &Detach {
                    network: NET.into(),
                    sandbox: Some(p.display().to_string()),
                    ..Default::default()
                },
            );
        }
        for p in &self.made {
            let _ = netns::remove(p);
        }
        if self.network {
            let _ = self
                .client
                .delete::<serde_json::Value>(&format!("/v1/networks/{NET}"));
        }
    }
}

fn labels(app: &str) -> Labels {
    [("app".to_string(), app.to_string())].into()
}

impl Bench<'_> {
    fn sandbox(&mut self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join("sb").join(format!("pol-{name}"));
        netns::create(&p).with_context(|| format!("create {}", p.display()))?;
        self.made.push(p.clone());
        Ok(p)
    }

    fn attach(&mut self, sandbox: &Path, app: &str) -> Result<Endpoint> {
        let ep = self.client.post(
            "/v1/endpoints",
            &Attach {
                network: NET.into(),
                sandbox: sandbox.display().to_string(),
                labels: labels(app),
                ..Default::default()
            },
        )?;
        self.attached.insert(sandbox.to_path_buf());
        Ok(ep)
    }

    fn detach(&mut self, sandbox: &Path) -> Result<()> {
        self.client.post::<_, serde_json::Value>(
            "/v1/detach",
            &Detach {
                network: NET.into(),
                sandbox: Some(sandbox.display().to_string()),
                ..Default::default()
            },
        )?;
        self.attached.remove(sandbox);
        Ok(())
    }

    fn create(&mut self, p: &Policy) -> Result<()> {
        self.client
            .post::<_, serde_json::Value>("/v1/policies", p)
            .with_context(|| format!("create policy {}", p.name))?;
        self.policies.insert(p.name.clone());
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<()> {
        self.client
            .delete::<serde_json::Value>(&format!("/v1/policies/{name}"))
            .with_context(|| format!("delete policy {name}"))?;
        self.policies.remove(name);
        Ok(())
    }

    /// Makes `n` policies be in place: none, or the one allowing the client and `n - 1`
    /// fillers. The calls are timed (not part of any figure but the aside on them).
    fn set_policies(&mut self, n: usize) -> Result<()> {
        let t = Instant::now();
        let want: BTreeSet<String> = match n {
            0 => BTreeSet::new(),
            _ => std::iter::once(ALLOW.to_string())
                .chain((0..n - 1).map(filler_name))
                .collect(),
        };
        let gone: Vec<String> = self.policies.difference(&want).cloned().collect();
        if !gone.is_empty() || want.len() > self.policies.len() {
            // Deletions scan the table: leftovers of the last run would make them slow.
            flush_conntrack()?;
        }
        let (mut made, mut removed) = (0, 0);
        for name in gone {
            let t = Instant::now();
            self.delete(&name)?;
            self.deletes.push(t.elapsed());
            removed += 1;
        }
        if n > 0 && !self.policies.contains(ALLOW) {
            let p = allow_client()?;
            let t = Instant::now();
            self.create(&p)?;
            self.creates.push(t.elapsed());
            made += 1;
        }
        for i in 0..n.saturating_sub(1) {
            if !self.policies.contains(&filler_name(i)) {
                let p = filler(i)?;
                let t = Instant::now();
                self.create(&p)?;
                self.creates.push(t.elapsed());
                made += 1;
            }
        }
        self.peak = self.peak.max(n);
        if made + removed > 0 {
            eprintln!(
                "policy: {n} policies in place ({made} created, {removed} deleted in {:.1} s)",
                t.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The policies.

fn policy(name: &str, ingress: Vec<PolicyRule>) -> Result<Policy> {
    Ok(Policy {
        name: name.into(),
        network: NET.into(),
        selector: "app=server".parse()?,
        ingress_isolated: true,
        egress_isolated: false,
        ingress,
        egress: Vec::new(),
        gateway_dns: true,
    })
}

fn tcp(port: u16) -> PolicyPort {
    PolicyPort {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(port)),
        end_port: None,
    }
}

/// Isolates the server's ingress, allowing nothing.
fn deny_all() -> Result<Policy> {
    policy(DENY, Vec::new())
}

/// Lets the client connect to the server's measured port.
fn allow_client() -> Result<Policy> {
    policy(
        ALLOW,
        vec![PolicyRule {
            peers: vec![Peer::Endpoints("app=client".parse()?)],
            ports: vec![tcp(TCP_PORT)],
        }],
    )
}

fn filler_name(i: usize) -> String {
    format!("bench-{i:05}")
}

/// Filler `i`: selects the server too and allows, on port `FILLER_PORT + i`, endpoints
/// labelled `app=client-i` (there are none) and one address of 198.18.0.0/15 of its own, so
/// that each filler puts one element of its own in the server's allow set.
fn filler(i: usize) -> Result<Policy> {
    let port = u16::try_from(usize::from(FILLER_PORT) + i).context("too many policies")?;
    let cidr = format!("198.{}.{}.{}/32", 18 + i / 65536, (i / 256) % 256, i % 256);
    policy(
        &filler_name(i),
        vec![PolicyRule {
            peers: vec![
                Peer::Endpoints(format!("app=client-{i}").parse()?),
                Peer::Cidr {
                    cidr: cidr.parse()?,
                    except: Vec::new(),
                },
            ],
            ports: vec![tcp(port)],
        }],
    )
}

/// How many IPv4 peers berth's ingress profiles allow, read with `nft` (None: no `nft`, or no
/// policy there): the elements of the profiles' `..._any4` and `..._pairs4` sets and of their
/// classes' `..._4` sets.
fn allow_elements() -> Option<usize> {
    let out = Command::new("nft")
        .args([
            "-j",
            "list",
            "sets",
            "table",
            "inet",
            berth_dataplane::nftables::TABLE,
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let names: Vec<String> = v
        .get("nftables")?
        .as_array()?
        .iter()
        .filter_map(|o| o.pointer("/set/name").and_then(serde_json::Value::as_str))
        .filter(|n| {
            n.starts_with("pol_in_")
                && (n.ends_with("_any4") || n.ends_with("_pairs4") || n.ends_with("_4"))
        })
        .map(str::to_string)
        .collect();
    let mut total = 0;
    for set in names {
        let out = Command::new("nft")
            .args([
                "-j",
                "list",
                "set",
                "inet",
                berth_dataplane::nftables::TABLE,
                &set,
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        total += v
            .get("nftables")?
            .as_array()?
            .iter()
            .filter_map(|o| o.pointer("/set/elem").and_then(serde_json::Value::as_array))
            .map(Vec::len)
            .sum::<usize>();
    }
    Some(total)
}

/// Waits until berth's allow sets hold the elements of `n` policies on the server alone (one
/// each): detached endpoints' elements may go in the background. Gives up after a minute
/// (and at once without `nft`).
fn settle(n: usize) {
    let t = Instant::now();
    loop {
        match allow_elements() {
            None => return,
            Some(e) if e == n => return,
            Some(e) if t.elapsed() > Duration::from_secs(60) => {
                eprintln!("policy: {e} allow elements in the kernel, not {n}, after a minute");
                return;
            }
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces and small helpers.

/// Entries in the conntrack table of the benchmark's host namespace (where this thread is).
fn conntrack_count() -> String {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string())
}

/// The host namespace's conntrack entries of the probes' flows (`/proc/net/nf_conntrack`).
fn flow_entries() -> String {
    let all = std::fs::read_to_string("/proc/net/nf_conntrack").unwrap_or_default();
    let port = format!("port={ECHO_PORT} ");
    let flows: Vec<String> = all
        .lines()
        .filter(|l| l.contains(&port))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    if flows.is_empty() {
        "none".into()
    } else {
        flows.join(" | ")
    }
}

/// Empties the conntrack table of the benchmark's host namespace (where this thread is), so
/// that each measurement starts alike: the connections of one run leave tens of thousands of
/// entries (TIME_WAIT), and berth scans the table whenever an endpoint may lose an allowance
/// (a policy deleted, an endpoint detached).
fn flush_conntrack() -> Result<()> {
    berth_dataplane::conntrack::delete_flows_where(true, true, |_| true)
        .context("flush the host namespace's conntrack table")?;
    Ok(())
}

/// Sets the flag when dropped (threads stop, also when measuring failed).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The p-quantile of the samples, in ms (NaN when there are none).
fn q_ms(samples: &[Duration], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort();
    s.get(quantile_index(s.len(), p))
        .map_or(f64::NAN, |d| ms(*d))
}

fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(f64::NAN)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

// ---------------------------------------------------------------------------------------------
// The whole benchmark.

pub fn bench(client: &Client, dir: &Path, o: &Options) -> Result<()> {
    let mut sizes = o.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if let Some(&n) = sizes
        .iter()
        .chain(&[o.attach_policies])
        .find(|&&n| n > MAX_POLICIES)
    {
        bail!("{n} policies: at most {MAX_POLICIES}");
    }
    let mut b = Bench {
        client,
        dir,
        network: false,
        policies: BTreeSet::new(),
        attached: BTreeSet::new(),
        made: Vec::new(),
        creates: Vec::new(),
        deletes: Vec::new(),
        peak: 0,
    };
    let _: Network = client.post(
        "/v1/networks",
        &CreateNetwork {
            name: NET.into(),
            subnet: Some(SUBNET.into()),
            ..Default::default()
        },
    )?;
    b.network = true;
    // Policies of an earlier run that did not clean up would skew everything.
    let listed: serde_json::Value = client.get("/v1/policies")?;
    if listed.as_array().is_some_and(|a| !a.is_empty()) {
        eprintln!("policy: note: the daemon already holds policies: {listed}");
    }
    let server_sb = b.sandbox("server")?;
    let client_sb = b.sandbox("client")?;
    let server = b.attach(&server_sb, "server")?;
    b.attach(&client_sb, "client")?;
    let server_ip = server
        .ips
        .first()
        .context("the server has no address")?
        .addr();

    if o.changes > 0 {
        let t = Instant::now();
        enforcement(
            &mut b,
            &server_sb,
            &client_sb,
            SocketAddr::new(server_ip, ECHO_PORT),
            o.changes,
        )?;
        eprintln!(
            "policy: enforcement done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let mut attach = (o.attach_n > 0).then(|| AttachPlan::new(o.attach_n, o.attach_policies));
    // The attaches are timed between the connection runs when those visit both numbers of
    // policies (no policy changes of their own), else on their own.
    let shared = o.secs > 0
        && sizes.contains(&0)
        && o.attach_policies > 0
        && sizes.contains(&o.attach_policies);
    if o.secs > 0 && !sizes.is_empty() {
        let t = Instant::now();
        let plan = attach.as_mut().filter(|_| shared);
        cost(&mut b, &server_sb, &client_sb, server_ip, &sizes, o, plan)?;
        eprintln!(
            "policy: connection cost done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(plan) = attach.as_mut() {
        if !shared {
            let t = Instant::now();
            attach_cost(&mut b, plan)?;
            eprintln!(
                "policy: attach cost done in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        print_attach(plan, "quiet");
        if o.load_threads > 0 {
            let mut loaded = AttachPlan::new(plan.n, plan.policies);
            let t = Instant::now();
            let load = Load::start(o.load_threads);
            attach_cost(&mut b, &mut loaded)?;
            let avg = load_average();
            drop(load);
            eprintln!(
                "policy: loaded attach cost done in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            print_attach(
                &loaded,
                &format!(
                    "loaded: {} busy threads, load average {avg}",
                    o.load_threads
                ),
            );
        }
    }
    if o.api_changes > 0 && o.attach_policies > 0 {
        let t = Instant::now();
        b.set_policies(o.attach_policies)?;
        settle(o.attach_policies);
        let quiet = api_changes(&mut b, o.api_changes)?;
        let mut runs = vec![("quiet".to_string(), quiet)];
        if o.load_threads > 0 {
            let load = Load::start(o.load_threads);
            let loaded = api_changes(&mut b, o.api_changes)?;
            runs.push((format!("loaded (load average {})", load_average()), loaded));
            drop(load);
        }
        eprintln!(
            "policy: API changes done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        println!(
            "\nPolicy changes with {} policies in place (every one selects the server): {} each of \
             create, replace (PUT) and delete of one more policy that selects the server, timed from \
             the API call to its answer (enforced on this host when it answers).",
            o.attach_policies, o.api_changes
        );
        println!(
            "| run | create p50 | create p99 | replace p50 | replace p99 | delete p50 | delete p99 |"
        );
        println!(
            "|-----|-----------:|-----------:|------------:|------------:|-----------:|-----------:|"
        );
        let mut worst: f64 = 0.0;
        for (label, [c, r, d]) in &runs {
            println!(
                "| {label} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                q_ms(c, 0.5),
                q_ms(c, 0.99),
                q_ms(r, 0.5),
                q_ms(r, 0.99),
                q_ms(d, 0.5),
                q_ms(d, 0.99)
            );
            worst = worst
                .max(q_ms(c, 0.99))
                .max(q_ms(r, 0.99))
                .max(q_ms(d, 0.99));
        }
        println!(
            "Target p99 <= 300 ms with {} policies in place, loaded: {} (worst p99 {worst:.1} ms).",
            o.attach_policies,
            met(worst <= 300.0)
        );
    }
    if !b.creates.is_empty() || !b.deletes.is_empty() {
        println!(
            "\nPolicy API calls made to change the number in place (up to {} policies): \
             create p50 {:.2} ms, p99 {:.2} ms ({} calls); delete p50 {:.2} ms, p99 {:.2} ms ({} calls).",
            b.peak,
            q_ms(&b.creates, 0.5),
            q_ms(&b.creates, 0.99),
            b.creates.len(),
            q_ms(&b.deletes, 0.5),
            q_ms(&b.deletes, 0.99),
            b.deletes.len(),
        );
    }
    let t = Instant::now();
    b.set_policies(0)?;
    drop(b);
    eprintln!("policy: cleaned up in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Enforcement latency.

/// The probes of one flow: when each was sent and whether it was answered.
struct Probes {
    base: Instant,
    /// Nanoseconds since `base` at which probe `seq` was sent, at `seq % RING`.
    sent: Vec<AtomicU64>,
    /// `seq + 1` once probe `seq` is answered, at `seq % RING`.
    answered: Vec<AtomicU64>,
    /// Probes sent so far.
    next: AtomicU64,
    stop: AtomicBool,
}

impl Probes {
    fn new() -> Probes {
        Probes {
            base: Instant::now(),
            sent: (0..RING).map(|_| AtomicU64::new(0)).collect(),
            answered: (0..RING).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn slot(seq: u64) -> usize {
        (seq % RING as u64) as usize
    }

    fn sent_at(&self, seq: u64) -> u64 {
        self.sent[Self::slot(seq)].load(Ordering::Relaxed)
    }

    fn is_answered(&self, seq: u64) -> bool {
        self.answered[Self::slot(seq)].load(Ordering::Relaxed) == seq + 1
    }

    fn count(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Sends a probe every [`PROBE_EVERY`] until `stop`, on the flow (socket) `flow` says.
    fn send(&self, socks: &[UdpSocket], flow: &AtomicUsize) {
        let mut seq = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let sock = &socks[flow.load(Ordering::Relaxed)];
            let i = Self::slot(seq);
            self.answered[i].store(0, Ordering::Relaxed);
            self.sent[i].store(self.now(), Ordering::Relaxed);
            self.next.store(seq + 1, Ordering::Release);
            // A refused send (an ICMP error that came back on the flow) is a dropped probe.
            let _ = sock.send(&seq.to_le_bytes());
            seq += 1;
            std::thread::sleep(PROBE_EVERY);
        }
    }

    /// Records the answers on the flow `flow` says until `stop` (the sockets have a short
    /// receive timeout, so that a switch is followed at once; answers wait in the socket).
    fn receive(&self, socks: &[UdpSocket], flow: &AtomicUsize) {
        let mut buf = [0u8; 64];
        while !self.stop.load(Ordering::Relaxed) {
            if let Ok(8) = socks[flow.load(Ordering::Relaxed)].recv(&mut buf) {
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                self.answered[Self::slot(seq)].store(seq + 1, Ordering::Relaxed);
            }
        }
    }

    /// The last answered probe in `from..to`.
    fn last_answered(&self, from: u64, to: u64) -> Option<u64> {
        (from..to).rev().find(|&s| self.is_answered(s))
    }

    fn first_answered(&self, from: u64, to: u64) -> Option<u64> {
        (from..to).find(|&s| self.is_answered(s))
    }
}

/// Answers every datagram with itself until `stop`.
fn echo(sock: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

/// One change: the deny policy created (`deny`) or deleted.
struct Phase {
    deny: bool,
    /// Just before the call, ns since the probes' base.
    t0: u64,
    /// Probes sent before the call was made.
    s0: u64,
    /// How long the call took.
    call: Duration,
    /// Probes sent before the next change (set when it starts).
    s_end: u64,
}

/// The latency of one change, from the answers: for a creation, from t0 to the sending of
/// the first probe after which no probe was answered; for a deletion, to the sending of the
/// first probe answered. `None`: no effect before the next change.
fn latency(p: &Probes, ph: &Phase) -> Option<Duration> {
    let at = if ph.deny {
        let from = ph.s0.saturating_sub(1);
        let cut = p.last_answered(from, ph.s_end).map_or(from, |l| l + 1);
        if cut >= ph.s_end {
            return None;
        }
        p.sent_at(cut)
    } else {
        p.sent_at(p.first_answered(ph.s0, ph.s_end)?)
    };
    Some(Duration::from_nanos(at.saturating_sub(ph.t0)))
}

/// Waits until the probes show the change took effect (denied: probes unanswered over
/// [`QUIET`], the newest of them older than [`GRACE`]; allowed: one answered); false at
/// [`CHANGE_DEADLINE`].
fn wait_for_effect(p: &Probes, ph: &Phase) -> bool {
    let deadline = ph.t0 + CHANGE_DEADLINE.as_nanos() as u64;
    let (grace, quiet) = (GRACE.as_nanos() as u64, QUIET.as_nanos() as u64);
    loop {
        let now = p.now();
        let n = p.count();
        if ph.deny {
            let from = ph.s0.saturating_sub(1);
            let cut = p.last_answered(from, n).map_or(from, |l| l + 1);
            if cut < n {
                let cut_at = p.sent_at(cut);
                let mature = (cut..n).rev().find(|&s| p.sent_at(s) + grace <= now);
                if mature.is_some_and(|m| p.sent_at(m) >= cut_at + quiet) {
                    return true;
                }
            }
        } else if p.first_answered(ph.s0, n).is_some() {
            return true;
        }
        if now > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn enforcement(
    b: &mut Bench<'_>,
    server_sb: &Path,
    client_sb: &Path,
    echo_at: SocketAddr,
    changes: usize,
) -> Result<()> {
    let deny = deny_all()?;
    flush_conntrack()?;
    let responder = in_netns(server_sb, || {
        let s = UdpSocket::bind(("0.0.0.0", ECHO_PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })?;
    // One flow (source port) per creation, so that a flow a change failed to stop does not
    // spoil the next ones.
    let probers = in_netns(client_sb, || {
        (0..changes.max(1))
            .map(|_| {
                let s = UdpSocket::bind(("0.0.0.0", 0))?;
                s.connect(echo_at)?;
                s.set_read_timeout(Some(Duration::from_millis(2)))?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let flow = AtomicUsize::new(0);
    let probes = Probes::new();
    let stop_echo = AtomicBool::new(false);
    let mut done: Vec<(Phase, Option<Duration>)> = Vec::with_capacity(2 * changes);
    let mut unseen = 0;
    let mut tracked = String::new();
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| echo(&responder, &stop_echo));
        s.spawn(|| probes.send(&probers, &flow));
        s.spawn(|| probes.receive(&probers, &flow));
        let _stop = (StopOnDrop(&probes.stop), StopOnDrop(&stop_echo));
        // The flow must pass before anything is timed.
        let t = Instant::now();
        while probes.first_answered(0, probes.count()).is_none() {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("the UDP probes from the client to {echo_at} get no answer");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        tracked = conntrack_count();
        let mut pending: Option<Phase> = None;
        for k in 0..2 * changes {
            let create = k % 2 == 0;
            if create && k > 0 {
                // A fresh flow, passing before the policy is made.
                flow.store(k / 2, Ordering::Relaxed);
                let from = probes.count() + 1;
                let t = Instant::now();
                while probes.first_answered(from, probes.count()).is_none() {
                    if t.elapsed() > CHANGE_DEADLINE {
                        eprintln!("policy: a new flow gets no answer with no policy in place");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(SETTLE);
            }
            let s0 = probes.count();
            let t0 = probes.now();
            let started = Instant::now();
            if create {
                b.create(&deny)?;
            } else {
                b.delete(DENY)?;
            }
            let ph = Phase {
                deny: create,
                t0,
                s0,
                call: started.elapsed(),
                s_end: u64::MAX,
            };
            // The change before this one is over: work it out from all its answers.
            if let Some(mut prev) = pending.take() {
                prev.s_end = s0;
                let l = latency(&probes, &prev);
                done.push((prev, l));
            }
            if !wait_for_effect(&probes, &ph) {
                unseen += 1;
                eprintln!(
                    "policy: {} had no effect on the probes within {} ms{}",
                    if create { "a creation" } else { "a deletion" },
                    CHANGE_DEADLINE.as_millis(),
                    if unseen == 1 {
                        format!("; the probes' conntrack entries: {}", flow_entries())
                    } else {
                        String::new()
                    }
                );
            }
            pending = Some(ph);
        }
        // Late answers to the last change's probes.
        std::thread::sleep(GRACE * 3);
        if let Some(mut prev) = pending.take() {
            prev.s_end = probes.count();
            let l = latency(&probes, &prev);
            done.push((prev, l));
        }
        Ok(())
    })?;
    if b.policies.contains(DENY) {
        b.delete(DENY)?;
    }

    println!(
        "\nPolicy enforcement, {changes} changes of each kind, alternating (same run): the client sandbox sends a UDP probe \
         with a sequence number every {} us on one flow (a new one for each creation) to an echo responder in the server sandbox (app=server) and \
         records the answers; t0 is taken just before the API call; {tracked} conntrack entries in the host \
         namespace at the start.",
        PROBE_EVERY.as_micros()
    );
    println!(
        "- create: POST /v1/policies of a policy isolating app=server's ingress with no rule; latency = send time of \
         the first probe after which no probe is answered, minus t0 (the flow is established, so its conntrack \
         entry has to go too; 0 when the first probe after t0 is already dropped)."
    );
    println!(
        "- delete: DELETE /v1/policies/{DENY}; latency = send time of the first probe answered after t0, minus t0."
    );
    println!(
        "- API call: how long the call took; after the call: changes whose effect came later than the call's answer \
         (+1 ms); failed: changes with no effect before the next one (give-up after {} ms); each creation is made on a new flow (source port), established before t0.",
        CHANGE_DEADLINE.as_millis()
    );
    println!(
        "| change                                     | p50 ms | p99 ms | max ms | API call p50 ms | API call p99 ms | after the call | failed |"
    );
    println!(
        "|--------------------------------------------|-------:|-------:|-------:|----------------:|----------------:|---------------:|-------:|"
    );
    let mut p99s = Vec::new();
    for (deny, label) in [
        (true, "create deny policy -> first probe dropped"),
        (false, "delete it -> first probe answered"),
    ] {
        let phases: Vec<&(Phase, Option<Duration>)> =
            done.iter().filter(|(ph, _)| ph.deny == deny).collect();
        let lat: Vec<Duration> = phases.iter().filter_map(|(_, l)| *l).collect();
        let calls: Vec<Duration> = phases.iter().map(|(ph, _)| ph.call).collect();
        let failed = phases.iter().filter(|(_, l)| l.is_none()).count();
        let late = phases
            .iter()
            .filter(|(ph, l)| l.is_some_and(|l| l > ph.call + Duration::from_millis(1)))
            .count();
        let max = lat.iter().max().map_or(f64::NAN, |d| ms(*d));
        println!(
            "| {label:<42} | {:>6.2} | {:>6.2} | {max:>6.2} | {:>15.2} | {:>15.2} | {late:>14} | {failed:>6} |",
            q_ms(&lat, 0.5),
            q_ms(&lat, 0.99),
            q_ms(&calls, 0.5),
            q_ms(&calls, 0.99),
        );
        p99s.push((q_ms(&lat, 0.99), failed));
    }
    println!(
        "Published, not measured here: kube-network-policies with 1,000 pods: enforce ~0.31-0.33 s, revoke ~2.3 s."
    );
    let ok = p99s.iter().all(|(p, f)| *p <= 300.0 && *f == 0) && unseen == 0;
    println!(
        "Target p99 <= 300 ms: {} (create p99 {:.2} ms, delete p99 {:.2} ms, {} failed).",
        met(ok),
        p99s[0].0,
        p99s[1].0,
        p99s[0].1 + p99s[1].1
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. What policies in place cost new connections.

/// Serves `listener` until `stop`: one byte for every connection, then close.
fn serve(l: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // The listener's receive timeout ends accept() now and then to look at `stop`.
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.write_all(b"x");
        }
    }
}

fn listener(port: u16) -> Result<TcpListener> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    nix::sys::socket::setsockopt(
        &l,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )?;
    Ok(l)
}

/// One connection: connect, read the one byte to the end, close. How long connect() took.
fn connection(to: SocketAddr, timeout: Duration) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut c = TcpStream::connect_timeout(&to, timeout)?;
    let connected = t.elapsed();
    c.set_read_timeout(Some(timeout))?;
    let mut answer = Vec::with_capacity(4);
    c.read_to_end(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(connected)
}

struct Run {
    rate: f64,
    connect: Vec<Duration>,
    failed: usize,
}

/// `clients` threads in the client sandbox making connections to `to` for `secs`.
fn connections(from: &Path, to: SocketAddr, clients: usize, secs: u32) -> Result<Run> {
    let (rate, connect, failed) = closed_loop(from, clients, secs, "policy", |_| {
        connection(to, Duration::from_secs(1))
            .map_err(|e| std::io::Error::new(e.kind(), format!("connection to {to}: {e}")))
    })?;
    Ok(Run {
        rate,
        connect,
        failed,
    })
}

fn cost(
    b: &mut Bench<'_>,
    server_sb: &Path,
    client_sb: &Path,
    server_ip: std::net::IpAddr,
    sizes: &[usize],
    o: &Options,
    mut attach: Option<&mut AttachPlan>,
) -> Result<()> {
    let clients = o.clients.max(1);
    let runs = o.runs.max(1);
    // The order the numbers of policies are visited in: up, down, up...
    let visits: Vec<usize> = (0..runs)
        .flat_map(|r| -> Vec<usize> {
            if r % 2 == 0 {
                (0..sizes.len()).collect()
            } else {
                (0..sizes.len()).rev().collect()
            }
        })
        .collect();
    // Attach blocks (kind, count) after the runs of some visits: for each kind, half at the
    // first visit of its number of policies and half at the last.
    let mut blocks: Vec<Vec<(usize, usize)>> = vec![Vec::new(); visits.len()];
    if let Some(plan) = attach.as_deref() {
        for (kind, n) in [(0, 0), (1, plan.policies), (2, plan.policies)] {
            let at: Vec<usize> = (0..visits.len())
                .filter(|&i| sizes[visits[i]] == n)
                .collect();
            if let (Some(&first), Some(&last)) = (at.first(), at.last()) {
                let [one, other] = plan.halves();
                blocks[first].push((kind, one));
                blocks[last].push((kind, other));
            }
        }
    }
    let (open, closed) = in_netns(server_sb, || {
        Ok((listener(TCP_PORT)?, listener(CLOSED_PORT)?))
    })?;
    let to = SocketAddr::new(server_ip, TCP_PORT);
    let other = SocketAddr::new(server_ip, CLOSED_PORT);
    let stop = AtomicBool::new(false);
    // Per size: runs, whether the server was isolated, allow elements in the kernel.
    let mut results: Vec<(Vec<Run>, Option<bool>, Option<usize>)> =
        sizes.iter().map(|_| (Vec::new(), None, None)).collect();
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..clients {
            s.spawn(|| serve(&open, &stop));
        }
        s.spawn(|| serve(&closed, &stop));
        let _stop = StopOnDrop(&stop);
        for (visit, &k) in visits.iter().enumerate() {
            let n = sizes[k];
            b.set_policies(n)?;
            settle(n);
            flush_conntrack()?;
            // Warm up, and see that the allowed port passes and whether the other does.
            let reached = in_netns(client_sb, || {
                for _ in 0..50 {
                    connection(to, Duration::from_secs(1))
                        .with_context(|| format!("connection to {to} with {n} policies"))?;
                }
                Ok(connection(other, Duration::from_millis(300)).is_ok())
            })?;
            let res = &mut results[k];
            if res.1.is_none() {
                res.1 = Some(!reached);
                res.2 = allow_elements();
            }
            if reached == (n > 0) {
                eprintln!(
                    "policy: with {n} policies the client {} the server's port {CLOSED_PORT}",
                    if reached { "reaches" } else { "does not reach" }
                );
            }
            res.0.push(connections(client_sb, to, clients, o.secs)?);
            if let Some(plan) = attach.as_deref_mut() {
                for &(kind, count) in &blocks[visit] {
                    attach_block(b, plan, kind, count)?;
                    settle(n);
                }
            }
        }
        Ok(())
    })?;

    let summary = |runs: &[Run]| {
        (
            median(runs.iter().map(|r| r.rate).collect()),
            median(runs.iter().map(|r| q_ms(&r.connect, 0.5)).collect()),
            median(runs.iter().map(|r| q_ms(&r.connect, 0.99)).collect()),
            runs.iter().map(|r| r.failed).sum::<usize>(),
        )
    };
    let base_n = sizes[0];
    let base = summary(&results[0].0);
    println!(
        "\nNew connections with policies in place: short TCP connections (connect, read 1 byte, close) from the client \
         sandbox to the server, {clients} client thread(s), {} s x {runs} runs per number of policies, the order \
         alternating between runs (same run), the host namespace's conntrack table emptied before each run, medians \
         over the runs; connect = the connect() call.",
        o.secs
    );
    println!(
        "- N policies: one allowing app=client on port {TCP_PORT}/tcp and N-1 more selecting app=server, each \
         allowing app=client-i (none exist) and one address of 198.18.0.0/15 on port {FILLER_PORT}+i/tcp: the server \
         is ingress-isolated and its allow elements grow with N; 0: no policy. isolated: port {CLOSED_PORT} of the \
         server unreachable; elements: berth's IPv4 ingress allow sets, read with nft."
    );
    let (vs_rate, vs_p99) = (format!("conns/s vs {base_n}"), format!("p99 vs {base_n}"));
    println!(
        "| policies | isolated | elements | conns/s | connect p50 ms | connect p99 ms | failed | {vs_rate:>14} | {vs_p99:>10} |"
    );
    println!(
        "|---------:|:--------:|---------:|--------:|---------------:|---------------:|-------:|---------------:|-----------:|"
    );
    let mut last = None;
    for (n, (runs, isolated, elements)) in sizes.iter().zip(&results) {
        let (rate, p50, p99, failed) = summary(runs);
        let isolated = isolated.map_or("-", |i| if i { "yes" } else { "no" });
        let elements = elements.map_or("-".to_string(), |e| e.to_string());
        println!(
            "| {n:>8} | {isolated:^8} | {elements:>8} | {rate:>7.0} | {p50:>14.3} | {p99:>14.3} | {failed:>6} | {:>13.1}% | {:>9.1}% |",
            100.0 * rate / base.0,
            100.0 * p99 / base.2,
        );
        last = Some((*n, rate, p99));
    }
    if let Some((n, rate, p99)) = last.filter(|(n, ..)| *n != base_n) {
        let slower = 100.0 * (1.0 - rate / base.0);
        println!(
            "Target <= 5% slower at {n} than at {base_n} policies: {} (conns/s {slower:+.1}% slower, connect p99 {:+.1}%).",
            met(slower <= 5.0),
            100.0 * (p99 / base.2 - 1.0),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. What policies in place add to an attach.

/// The attaches to time, and their samples.
struct AttachPlan {
    /// Attaches of each kind.
    n: usize,
    /// Policies in place for the second kind.
    policies: usize,
    /// [no policy, `policies` all selecting the endpoint, `policies` none selecting it]:
    /// (attach, detach) samples.
    samples: [(Vec<Duration>, Vec<Duration>); 3],
    /// How the blocks were placed, for the explanation.
    order: Vec<usize>,
}

impl AttachPlan {
    fn new(n: usize, policies: usize) -> AttachPlan {
        AttachPlan {
            n,
            policies,
            samples: Default::default(),
            order: Vec::new(),
        }
    }

    /// The two blocks of attaches of one kind: half each.
    fn halves(&self) -> [usize; 2] {
        [self.n / 2, self.n - self.n / 2]
    }
}

/// `count` attaches of new sandboxes labelled app=server, then their detaches, each timed, with
/// whatever policies are in place (kind 0: none, 1: `plan.policies`).
fn attach_block(b: &mut Bench<'_>, plan: &mut AttachPlan, kind: usize, count: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let sbs = (0..count)
        .map(|_| {
            let i = b.made.len();
            b.sandbox(&format!("a{i}"))
        })
        .collect::<Result<Vec<_>>>()?;
    flush_conntrack()?;
    // Kind 2: an endpoint of the same network that none of the policies selects.
    let app = if kind == 2 { "bystander" } else { "server" };
    for sb in &sbs {
        let t = Instant::now();
        b.attach(sb, app)?;
        plan.samples[kind].0.push(t.elapsed());
    }
    for sb in &sbs {
        let t = Instant::now();
        b.detach(sb)?;
        plan.samples[kind].1.push(t.elapsed());
    }
    for sb in &sbs {
        netns::remove(sb)?;
        b.made.retain(|p| p != sb);
    }
    plan.order.push([0, plan.policies, plan.policies][kind]);
    Ok(())
}

/// The attaches on their own: blocks with P, 0, 0, P policies (or 0, P, P, 0, from whatever is
/// in place), so that drift over the run falls on both kinds alike and the number of policies
/// changes only twice.
fn attach_cost(b: &mut Bench<'_>, plan: &mut AttachPlan) -> Result<()> {
    let p = plan.policies;
    let now_p = p > 0 && b.policies.contains(ALLOW);
    let order = if now_p {
        [1, 2, 0, 0, 2, 1]
    } else {
        [0, 1, 2, 2, 1, 0]
    };
    let halves = plan.halves();
    let mut seen = [0; 3];
    for kind in order {
        let block = seen[kind];
        seen[kind] += 1;
        let n = [0, p, p][kind];
        b.set_policies(n)?;
        settle(n);
        attach_block(b, plan, kind, halves[block])?;
        settle(n);
    }
    Ok(())
}

fn print_attach(plan: &AttachPlan, run: &str) {
    let (n, policies) = (plan.n, plan.policies);
    let order: Vec<String> = plan.order.iter().map(ToString::to_string).collect();
    println!(
        "\nAttach with policies in place ({run}): POST /v1/endpoints of {n} new sandboxes labelled app=server with no policy, \
         {n} with {policies} in place (the policies above: every one selects app=server, so each attach writes the \
         endpoint's {policies} allow elements: the worst case), and {n} labelled app=bystander with the {policies} in \
         place (none selects it: the usual case, a network with many policies for other endpoints), in blocks of \
         about {} with, in turn, {} policies (same run); each block detached after it (timed too); the host \
         namespace's conntrack table emptied before each block (a detach scans it).",
        n / 2,
        order.join(", "),
    );
    println!(
        "| policies in place | attaches | attach p50 ms | attach p99 ms | detach p50 ms | detach p99 ms |"
    );
    println!(
        "|------------------:|---------:|--------------:|--------------:|--------------:|--------------:|"
    );
    let q = |k: usize| {
        let s = &plan.samples[k];
        [
            q_ms(&s.0, 0.5),
            q_ms(&s.0, 0.99),
            q_ms(&s.1, 0.5),
            q_ms(&s.1, 0.99),
        ]
    };
    let (none, some, others) = (q(0), q(1), q(2));
    for (p, k, v) in [
        ("0".to_string(), 0, none),
        (format!("{policies}, selecting it"), 1, some),
        (format!("{policies}, not selecting it"), 2, others),
    ] {
        println!(
            "| {p:>17} | {:>8} | {:>13.2} | {:>13.2} | {:>13.2} | {:>13.2} |",
            plan.samples[k].0.len(),
            v[0],
            v[1],
            v[2],
            v[3]
        );
    }
    let added =
        |with: &[f64; 4]| -> Vec<f64> { none.iter().zip(with).map(|(a, b)| b - a).collect() };
    let (d, e) = (added(&some), added(&others));
    for (label, d) in [("added, selecting", &d), ("added, not selecting", &e)] {
        println!(
            "| {label:>17} |          | {:>+13.2} | {:>+13.2} | {:>+13.2} | {:>+13.2} |",
            d[0], d[1], d[2], d[3]
        );
    }
    println!(
        "Target <= 1 ms added to an attach by {policies} policies: {} when none selects the endpoint (p50 {:+.2} ms, \
         p99 {:+.2} ms); {} when all {policies} select it (p50 {:+.2} ms, p99 {:+.2} ms).",
        met(e[0] <= 1.0),
        e[0],
        e[1],
        met(d[0] <= 1.0),
        d[0],
        d[1]
    );
}
