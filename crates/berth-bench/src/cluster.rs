//! Many hosts: berth on etcd, measured in one run beside the embedded store and beside the
//! floors that bound it.
//!
//! The cluster is made of network namespaces this process creates (named with its pid) and
//! removes on drop, also when a step fails or panics:
//! - an "underlay" namespace with the bridge `br0` at 198.51.100.1/24, where etcd runs (its data
//!   in a temporary directory);
//! - three hosts `h1`..`h3`, each on a veth to `br0` at 198.51.100.(10+i), with a daemon on
//!   etcd (`--store etcd://198.51.100.1:2379 --etcd-prefix /berth-bench-PID/ --host-id hI
//!   --advertise-address ... --host-lease-ttl 10 --dns-port 53`);
//! - one host `emb` whose daemon keeps the embedded store, for the like-for-like comparison;
//! - two namespaces `x1`, `x2` on the same underlay for a hand-made VXLAN pair (no berth),
//!   and behind a bridge in each of them a namespace `y1`/`y2` (berth's topology, by hand).
//!
//! Every daemon has its own state, run and netns directories and an empty upstream
//! resolv.conf; sandboxes are made through each daemon's API (`POST /v1/sandboxes`).
//!
//! What is measured, each in the same run as what it is compared with:
//! 1. attach/detach latency, N sequential calls: embedded store (bridge network) and etcd
//!    (overlay and bridge networks), round-robin so that drift hits all alike, beside a bare
//!    etcd transaction (create-if-absent: three compares, three puts) timed from host h1's
//!    namespace through `berth_store::EtcdStore`;
//! 2. convergence: an endpoint attached on h1 until its address answers an ICMP echo from a
//!    sandbox on h2 and until its name resolves on h2's DNS (probes every millisecond from
//!    sockets in that sandbox, timed from the attach's answer);
//! 3. TCP throughput (iperf3) sandbox on h1 to sandbox on h2 over berth's overlay, against a
//!    hand-made VXLAN pair between x1 and x2 (and the same behind a bridge and a veth, y1
//!    and y2), alternating runs;
//! 4. cluster-wide attach throughput: 3 hosts x C concurrent callers attaching to one overlay
//!    network; attaches/s, latency, block-claim retries (`GET /v1/status`), and that every
//!    address handed out is unique.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_api::{
    Allocation, Attach, Client, CreateNetwork, CreateSandbox, Detach, Endpoint, Network, Sandbox,
    Status,
};
use berth_dataplane::netns;
use berth_store::{Compare, EtcdStore, Store, Txn, TxnOutcome};
use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};

use crate::{Row, timed};

const UNDERLAY_GW: &str = "198.51.100.1";
const UNDERLAY_PREFIX: &str = "198.51.100";
const ETCD_CLIENT: &str = "198.51.100.1:2379";
const UNDERLAY_MTU: u32 = 1500;
/// `--host-lease-ttl` of the benchmarked daemons: the default.
const LEASE_TTL: u64 = 10;
/// Hosts on etcd.
const HOSTS: usize = 3;
/// The hand-made VXLAN pair: a port of its own, beside berth's 4789.
const HANDMADE_VNI: &str = "99";
const HANDMADE_PORT: &str = "4790";
/// How long a probe waits for convergence before counting a failure.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(5);
/// The prober sandbox's ARP retransmit time. The kernel's default (1 s) would make any probe
/// sent before the remote entries exist wait a whole second for its next ARP request; 10 ms
/// gives the probe its resolution back (see `convergence`).
const PROBE_ARP_RETRANS_MS: u32 = 10;

/// What `bench` runs; from berth-bench's flags.
pub struct Options {
    /// Sequential attaches (and detaches) per kind for the latency comparison; 0 skips all.
    pub n: usize,
    /// Attaches on h1 timed until they answer on h2.
    pub converge_n: usize,
    /// Concurrent callers per host for the cluster-wide attach throughput (0 skips it).
    pub callers: usize,
    /// Attaches per caller.
    pub attaches_per_caller: usize,
    /// Seconds per iperf3 run (0 skips the throughput comparison).
    pub iperf_secs: u32,
    pub iperf_runs: usize,
    /// The daemons' `--log-level`.
    pub log_level: String,
}

/// Runs every cluster benchmark and prints its tables; the cluster is removed on return.
pub fn bench(berth: &Path, dir: &Path, opts: &Options) -> Result<()> {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("cluster benchmarks skipped: apt-get install etcd-server etcd-client");
        return Ok(());
    }
    let t = Instant::now();
    let c = Cluster::new(berth, &dir.join("cluster"), &opts.log_level)?;
    eprintln!(
        "cluster: etcd, {HOSTS} hosts on etcd and one embedded, up in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let mut verdicts = Vec::new();
    let mut notes = Vec::new();
    if opts.n > 0 {
        let (r, v, rpcs) = latency(&c, opts.n)?;
        rows.extend(r);
        verdicts.extend(v);
        notes.push(rpcs);
    }
    let mut conv = None;
    if opts.converge_n > 0 || opts.iperf_secs > 0 {
        conv = Some(Convergence::setup(&c)?);
    }
    if let Some(cv) = &conv
        && opts.converge_n > 0
    {
        let (r, v) = cv.run(&c, opts.converge_n)?;
        rows.extend(r);
        verdicts.extend(v);
    }
    let mut wide = None;
    if opts.callers > 0 && opts.attaches_per_caller > 0 {
        let (r, summary) = cluster_attach(&c, opts.callers, opts.attaches_per_caller)?;
        rows.extend(r);
        wide = Some(summary);
    }

    println!(
        "\nMany hosts: {HOSTS} host namespaces with daemons on one etcd 3.4 (underlay bridge, \
         MTU {UNDERLAY_MTU}), one host on the embedded store; same run:"
    );
    crate::print_table(&rows);
    if let Some(w) = wide {
        notes.push(w);
    }
    for n in &notes {
        println!("\n{n}");
    }
    if let Some(cv) = &conv
        && opts.iperf_secs > 0
    {
        let v = cv.throughput(&c, opts.iperf_secs, opts.iperf_runs.max(1))?;
        verdicts.extend(v);
    }
    println!("\nTargets (issue #12):");
    for v in &verdicts {
        println!("- {v}");
    }
    drop(conv);
    drop(c);
    Ok(())
}

/// p-quantile of samples, by the rule of `Row::print`.
fn pct(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(crate::quantile_index(s.len(), p))
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn row(tool: impl Into<String>, op: &'static str, samples: Vec<Duration>, failed: usize) -> Row {
    Row {
        tool: tool.into(),
        n: samples.len() + failed,
        op,
        samples,
        failed,
    }
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `ip -n NS ARGS...`
fn ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

/// A command run in the network namespace at `path` (`nsenter --net`, which keeps our mount
/// namespace: the sandboxes' bind mounts are visible).
fn nsenter(path: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={path}")).args(cmd);
    c
}

/// Runs `f` on a thread that has entered the network namespace at `path`: sockets it makes
/// belong to that namespace (and keep belonging to it, whichever thread uses them later).
fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter {path}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A host namespace and its daemon.
struct Host {
    /// The namespace's name (`/run/netns/<ns>`).
    ns: String,
    /// `--host-id`.
    id: String,
    dir: PathBuf,
    /// Its underlay address (hosts on etcd).
    addr: Option<String>,
    daemon: Option<Child>,
    client: Client,
}

impl Host {
    fn netns(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }

    fn sandbox(&self, name: &str) -> Result<Sandbox> {
        self.client
            .post(
                "/v1/sandboxes",
                &CreateSandbox {
                    name: name.to_string(),
                },
            )
            .with_context(|| format!("create sandbox {name} on {}", self.id))
    }

    fn sandboxes(&self, prefix: &str, n: usize) -> Result<Vec<Sandbox>> {
        (0..n)
            .map(|i| self.sandbox(&format!("{prefix}{i}")))
            .collect()
    }

    fn network(&self, req: CreateNetwork) -> Result<Network> {
        let name = req.name.clone();
        self.client
            .post("/v1/networks", &req)
            .with_context(|| format!("create network {name} on {}", self.id))
    }

    fn status(&self) -> Result<Status> {
        Ok(self.client.get("/v1/status")?)
    }

    fn attach(&self, network: &str, sandbox: &str) -> Result<Endpoint> {
        Ok(self.client.post(
            "/v1/endpoints",
            &Attach {
                network: network.into(),
                sandbox: sandbox.into(),
                ..Default::default()
            },
        )?)
    }

    fn detach(&self, network: &str, sandbox: &str) -> Result<()> {
        self.client.post::<_, serde_json::Value>(
            "/v1/detach",
            &Detach {
                network: network.into(),
                sandbox: Some(sandbox.into()),
                ..Default::default()
            },
        )?;
        Ok(())
    }
}

/// The underlay, etcd, the hosts and the extra namespaces. Dropping it stops the daemons and
/// etcd, unmounts the sandboxes and deletes every namespace and file it made.
struct Cluster {
    tag: String,
    dir: PathBuf,
    prefix: String,
    underlay: Option<String>,
    etcd: Option<Child>,
    /// h1..h3 (on etcd), then `emb` (embedded store).
    hosts: Vec<Host>,
    /// Namespaces without a daemon (the hand-made VXLAN pair).
    extra: Vec<String>,
}

impl Cluster {
    fn new(berth: &Path, dir: &Path, log_level: &str) -> Result<Cluster> {
        let tag = format!("berth-bench-{}", std::process::id());
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut c = Cluster {
            prefix: format!("/{tag}/"),
            tag,
            dir: dir.to_path_buf(),
            underlay: None,
            etcd: None,
            hosts: Vec::new(),
            extra: Vec::new(),
        };
        let ul = c.add_netns("ul")?;
        c.underlay = Some(ul.clone());
        ip(&ul, &["link", "add", "br0", "type", "bridge"])?;
        ip(
            &ul,
            &["addr", "add", &format!("{UNDERLAY_GW}/24"), "dev", "br0"],
        )?;
        ip(&ul, &["link", "set", "br0", "up"])?;
        c.start_etcd()?;

        for i in 1..=HOSTS {
            let ns = c.add_netns(&format!("h{i}"))?;
            let addr = format!("{UNDERLAY_PREFIX}.{}", 10 + i);
            c.hosts.push(Host {
                client: Client::new(dir.join(&ns).join("run/berth.sock"))
                    .with_timeout(Duration::from_secs(60)),
                dir: dir.join(&ns),
                ns: ns.clone(),
                id: format!("h{i}"),
                addr: Some(addr.clone()),
                daemon: None,
            });
            c.join_underlay(&ns, &format!("h{i}"), &addr)?;
        }
        let ns = c.add_netns("emb")?;
        c.hosts.push(Host {
            client: Client::new(dir.join(&ns).join("run/berth.sock"))
                .with_timeout(Duration::from_secs(60)),
            dir: dir.join(&ns),
            ns,
            id: "emb".into(),
            addr: None,
            daemon: None,
        });
        c.make_handmade_pair()?;
        // Started one after the other: each waits until its daemon answers.
        for k in 0..c.hosts.len() {
            c.start_daemon(k, berth, log_level)?;
        }
        Ok(c)
    }

    /// Host `i` on etcd (1-based).
    fn host(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    fn embedded(&self) -> &Host {
        &self.hosts[HOSTS]
    }

    /// A new namespace `<tag>-<suffix>` with `lo` up, deleted on drop.
    fn add_netns(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.extra.push(name.clone());
        ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Joins namespace `ns` to the underlay bridge: a veth (`port` on the bridge, `ul0` in
    /// `ns`) with `addr`/24 and a default route via the bridge's address.
    fn join_underlay(&self, ns: &str, port: &str, addr: &str) -> Result<()> {
        let ul = self.underlay.as_deref().context("no underlay")?;
        ip(
            ul,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "ul0", "netns", ns,
            ],
        )?;
        ip(ul, &["link", "set", port, "master", "br0"])?;
        ip(ul, &["link", "set", port, "up"])?;
        ip(
            ns,
            &["link", "set", "ul0", "mtu", &UNDERLAY_MTU.to_string()],
        )?;
        ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "ul0"])?;
        ip(ns, &["link", "set", "ul0", "up"])?;
        ip(ns, &["route", "add", "default", "via", UNDERLAY_GW])?;
        Ok(())
    }

    fn etcdctl(&self, args: &[&str]) -> Command {
        let ul = self.underlay.as_deref().unwrap_or_default();
        let mut c = nsenter(
            &format!("/run/netns/{ul}"),
            &[
                "etcdctl",
                "--endpoints",
                ETCD_CLIENT,
                "--dial-timeout",
                "2s",
                "--command-timeout",
                "10s",
            ],
        );
        c.args(args).env("ETCDCTL_API", "3");
        c
    }

    fn start_etcd(&mut self) -> Result<()> {
        let ul = self.underlay.clone().context("no underlay")?;
        let log = std::fs::File::create(self.dir.join("etcd.log"))?;
        let url = format!("http://{ETCD_CLIENT}");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ul}"))
            .arg("etcd")
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd")?;
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.etcd.as_mut().context("no etcd")?.try_wait()? {
                bail!(
                    "etcd exited with {st}; see {}",
                    self.dir.join("etcd.log").display()
                );
            }
            if run(&mut self.etcdctl(&["endpoint", "health"])).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_daemon(&mut self, k: usize, berth: &Path, log_level: &str) -> Result<()> {
        let prefix = self.prefix.clone();
        let h = &mut self.hosts[k];
        std::fs::create_dir_all(&h.dir)?;
        let resolv = h.dir.join("resolv.conf");
        std::fs::write(&resolv, "")?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", h.netns()))
            .arg(berth)
            .args(["daemon", "--log-level", log_level, "--dns-port", "53"])
            .arg("--state-dir")
            .arg(h.dir.join("state"))
            .arg("--run-dir")
            .arg(h.dir.join("run"))
            .arg("--netns-dir")
            .arg(h.dir.join("netns"))
            .args(["--docker-plugin-socket", ""])
            .arg("--dns-resolv-conf")
            .arg(&resolv)
            .arg("--sandbox-etc-dir")
            .arg(h.dir.join("etc-netns"))
            .args(["--host-id", &h.id]);
        if let Some(addr) = &h.addr {
            cmd.args(["--store", &format!("etcd://{ETCD_CLIENT}")])
                .args(["--etcd-prefix", &prefix])
                .args(["--advertise-address", addr])
                .args(["--host-lease-ttl", &LEASE_TTL.to_string()]);
        }
        let child = h.daemon.insert(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("start berth daemon")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while h.client.get::<serde_json::Value>("/v1/status").is_err() {
            if let Some(st) = child.try_wait()? {
                bail!("daemon of {} exited with {st}", h.id);
            }
            if Instant::now() > deadline {
                bail!("daemon of {} did not come up", h.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Daemons first (SIGTERM to all, then wait; SIGKILL after 5 s), then the sandboxes'
        // bind mounts, then etcd, then every namespace (taking their interfaces along).
        for h in &self.hosts {
            if let Some(d) = &h.daemon {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(d.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for h in &mut self.hosts {
            if let Some(mut d) = h.daemon.take() {
                while matches!(d.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = d.kill();
                let _ = d.wait();
            }
            netns::unmount_below(&h.dir);
        }
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        for ns in self.extra.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 1. Attach/detach latency: embedded, etcd overlay, etcd bridge and the bare etcd txn,
///    round-robin, N each.
fn latency(c: &Cluster, n: usize) -> Result<(Vec<Row>, Vec<String>, String)> {
    let (emb, h1) = (c.embedded(), c.host(1));
    emb.network(CreateNetwork {
        name: "lat".into(),
        subnet: Some("10.180.0.0/16".into()),
        ..Default::default()
    })?;
    h1.network(CreateNetwork {
        name: "latov".into(),
        subnet: Some("10.181.0.0/16".into()),
        driver: Some("overlay".into()),
        ..Default::default()
    })?;
    h1.network(CreateNetwork {
        name: "latbr".into(),
        subnet: Some("10.182.0.0/16".into()),
        ..Default::default()
    })?;
    let kinds: [(&Host, &str, &str, &str); 3] = [
        (emb, "lat", "le", "berth, embedded store, bridge"),
        (h1, "latov", "lo", "berth, etcd, overlay"),
        (h1, "latbr", "lb", "berth, etcd, bridge"),
    ];
    let sbs: Vec<Vec<Sandbox>> = kinds
        .iter()
        .map(|(h, _, p, _)| h.sandboxes(&format!("{p}-"), n))
        .collect::<Result<_>>()?;
    // Attached apart, with etcd's request counters read around them.
    let counted = [
        ("overlay", "latov", h1.sandboxes("lx-", RPC_SAMPLE)?),
        ("bridge", "latbr", h1.sandboxes("ly-", RPC_SAMPLE)?),
    ];

    // The whole phase runs in h1's namespace: the floor's etcd connection is made (and
    // remade, if it must be) there, on h1's path to etcd. The API sockets are files.
    let prefix = format!("{}floor/", c.prefix);
    let h1_ns = h1.netns();
    let (attach, detach, floor, rpcs) = in_netns(&h1_ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = rt
            .block_on(EtcdStore::connect(
                &[format!("http://{ETCD_CLIENT}")],
                &prefix,
                None,
            ))
            .context("floor: connect to etcd")?;
        // An endpoint record's size, and two small index entries, as an attach writes.
        let value = vec![b'x'; 420];
        let mut attach: [Vec<Duration>; 3] = Default::default();
        let mut detach: [Vec<Duration>; 3] = Default::default();
        let mut floor: [Vec<Duration>; 2] = Default::default();
        let mut revs = Vec::with_capacity(n);
        // Round i: the i-th sandbox of each kind.
        let rounds: Vec<[&str; 3]> = (0..n)
            .map(|i| [0, 1, 2].map(|k| sbs[k][i].name.as_str()))
            .collect();
        for (i, names) in rounds.iter().enumerate() {
            for (k, (h, net, _, _)) in kinds.iter().enumerate() {
                attach[k].push(timed(|| h.attach(net, names[k]).map(drop))?);
            }
            let keys = floor_keys(i);
            let txn = keys
                .iter()
                .fold(Txn::new(), |t, k| t.when(Compare::Absent(k.clone())))
                .put(keys[0].clone(), value.clone())
                .put(keys[1].clone(), b"0123456789abcdef".to_vec())
                .put(keys[2].clone(), b"0123456789abcdef".to_vec());
            let t = Instant::now();
            let out = rt.block_on(store.txn(txn))?;
            floor[0].push(t.elapsed());
            match out {
                TxnOutcome::Committed { revision } => revs.push(revision),
                other => bail!("floor txn {i}: {other:?}"),
            }
        }
        for (i, (names, rev)) in rounds.iter().zip(&revs).enumerate() {
            for (k, (h, net, _, _)) in kinds.iter().enumerate() {
                detach[k].push(timed(|| h.detach(net, names[k]))?);
            }
            let keys = floor_keys(i);
            let txn = keys.iter().fold(
                Txn::new().when(Compare::ModRevision(keys[0].clone(), *rev)),
                |t, k| t.delete(k.clone()),
            );
            let t = Instant::now();
            let out = rt.block_on(store.txn(txn))?;
            floor[1].push(t.elapsed());
            if !matches!(out, TxnOutcome::Committed { .. }) {
                bail!("floor delete txn {i}: {out:?}");
            }
        }
        // etcd's requests per attach and detach, counted by etcd itself (every host's
        // requests: what one attach costs the cluster's store).
        let per = |a: &Requests, b: &Requests| {
            let mut v: Vec<String> = b
                .iter()
                .filter_map(|(m, n)| {
                    let d = n - a.get(m).copied().unwrap_or(0.0);
                    (d > 0.0).then(|| format!("{m} {:.1}", d / RPC_SAMPLE as f64))
                })
                .collect();
            v.sort();
            v.join(", ")
        };
        let mut rpcs = Vec::new();
        for (kind, net, sbs) in &counted {
            let before = etcd_requests()?;
            for sb in sbs {
                h1.attach(net, &sb.name)?;
            }
            let attached = etcd_requests()?;
            for sb in sbs {
                h1.detach(net, &sb.name)?;
            }
            let detached = etcd_requests()?;
            rpcs.push(format!(
                "etcd requests (all hosts) per {kind} attach on h1: {}; per detach: {}",
                per(&before, &attached),
                per(&attached, &detached),
            ));
        }
        let rpcs = format!(
            "{}\n({RPC_SAMPLE} of each, sequential, apart from the timed ones)",
            rpcs.join("\n")
        );
        Ok((attach, detach, floor, rpcs))
    })?;

    let mut rows = Vec::new();
    for (k, (_, _, _, label)) in kinds.iter().enumerate() {
        rows.push(row(*label, "attach", attach[k].clone(), 0));
        rows.push(row(*label, "detach", detach[k].clone(), 0));
    }
    rows.push(row(
        "etcd txn (floor), from h1",
        "create",
        floor[0].clone(),
        0,
    ));
    rows.push(row(
        "etcd txn (floor), from h1",
        "delete",
        floor[1].clone(),
        0,
    ));

    let f50 = pct(&floor[0], 0.5);
    let bound = 2.0 * ms(f50) + 1.0;
    let mut verdicts = Vec::new();
    for k in [1, 2] {
        let (p50, p99) = (pct(&attach[k], 0.5), pct(&attach[k], 0.99));
        verdicts.push(format!(
            "{} attach p50 {:.2} ms <= 2 x floor {:.2} ms + 1 ms = {bound:.2} ms: {}; \
             p99 {:.2} ms <= 20 ms: {}",
            kinds[k].3,
            ms(p50),
            ms(f50),
            met(ms(p50) <= bound),
            ms(p99),
            met(ms(p99) <= 20.0),
        ));
    }
    Ok((rows, verdicts, rpcs))
}

/// Attaches (and detaches) whose etcd requests are counted.
const RPC_SAMPLE: usize = 20;

/// gRPC requests etcd has started, by method (`Range`, `Txn`, `LeaseGrant`, ...).
type Requests = std::collections::BTreeMap<String, f64>;

/// etcd's `grpc_server_started_total` counters, from its /metrics (read from the calling
/// thread's namespace).
fn etcd_requests() -> Result<Requests> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(ETCD_CLIENT)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let mut out = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_started_total{") else {
            continue;
        };
        let Some(method) = rest
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|m| m.split('"').next())
        else {
            continue;
        };
        let n: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(method.to_string()).or_default() += n;
    }
    if out.is_empty() {
        bail!("no grpc_server_started_total in etcd's /metrics");
    }
    Ok(out)
}

fn floor_keys(i: usize) -> [String; 3] {
    [
        format!("endpoints/{i:016x}"),
        format!("members/floor/{i}"),
        format!(
            "ipam/floor/10.{}.{}.{}",
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255
        ),
    ]
}

/// The overlay network `cv` seen from h2: a prober sandbox with its sockets, and what the
/// throughput comparison needs.
struct Convergence {
    /// The prober sandbox on h2 (iperf3 client too).
    probe: Sandbox,
    /// A raw ICMP socket and a UDP socket (connected to the gateway's port 53), both in the
    /// prober's namespace. The raw socket is driven through std's `UdpSocket`, whose
    /// `send_to`/`recv_from` are plain sendto/recvfrom on an AF_INET datagram-style socket.
    icmp: UdpSocket,
    udp: UdpSocket,
    /// An endpoint on h1 (iperf3 server), made by the first trial or by `throughput`.
    server: std::sync::Mutex<Option<(Sandbox, Ipv4Addr)>>,
}

const CV: &str = "cv";

impl Convergence {
    fn setup(c: &Cluster) -> Result<Convergence> {
        let net = c.host(1).network(CreateNetwork {
            name: CV.into(),
            subnet: Some("10.183.0.0/16".into()),
            driver: Some("overlay".into()),
            ..Default::default()
        })?;
        let gateway = match net.subnets.first().map(|s| s.gateway) {
            Some(IpAddr::V4(g)) => g,
            other => bail!("network {CV}: no IPv4 gateway ({other:?})"),
        };
        let h2 = c.host(2);
        let probe = h2.sandbox("probe")?;
        h2.attach(CV, &probe.name)?;
        run(&mut nsenter(
            &probe.path,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv4.neigh.eth0.retrans_time_ms={PROBE_ARP_RETRANS_MS}"),
            ],
        ))?;
        let (icmp, udp) = in_netns(&probe.path, || {
            let icmp = UdpSocket::from(socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )?);
            icmp.set_read_timeout(Some(Duration::from_micros(500)))?;
            let udp = UdpSocket::bind("0.0.0.0:0")?;
            udp.connect((gateway, 53))?;
            udp.set_read_timeout(Some(Duration::from_micros(500)))?;
            Ok((icmp, udp))
        })?;
        Ok(Convergence {
            probe,
            icmp,
            udp,
            server: Default::default(),
        })
    }

    /// 2. `n` sandboxes attached on h1 in a row; for each, from its attach's answer until
    ///    its address answers ICMP echo from h2's prober and until its name resolves on h2's
    ///    DNS.
    fn run(&self, c: &Cluster, n: usize) -> Result<(Vec<Row>, Vec<String>)> {
        let h1 = c.host(1);
        let sbs = h1.sandboxes("cv-", n)?;
        let (mut attach, mut ping, mut dns) = (Vec::new(), Vec::new(), Vec::new());
        // The same, counted from the attach call instead of its answer.
        let (mut ping_call, mut dns_call) = (Vec::new(), Vec::new());
        let (mut ping_failed, mut dns_failed) = (0, 0);
        for (i, sb) in sbs.iter().enumerate() {
            let t = Instant::now();
            let ep = h1.attach(CV, &sb.name)?;
            let answered = Instant::now();
            attach.push(answered - t);
            let addr = match ep.ips.first().map(|ip| ip.addr()) {
                Some(IpAddr::V4(a)) => a,
                other => bail!("endpoint {}: no IPv4 address ({other:?})", ep.id),
            };
            let name = format!("{}.{CV}.{}", sb.name, berth_dns::DEFAULT_SUFFIX);
            let (p, d) = std::thread::scope(|s| {
                let p = s.spawn(|| self.ping_until(addr, i as u16, answered));
                let d = s.spawn(|| self.resolve_until(&name, addr, i as u16, answered));
                (p.join(), d.join())
            });
            let (p, d) = (
                p.unwrap_or_else(|e| std::panic::resume_unwind(e))?,
                d.unwrap_or_else(|e| std::panic::resume_unwind(e))?,
            );
            let took = answered - t;
            match p {
                Some(p) => {
                    ping.push(p);
                    ping_call.push(took + p);
                }
                None => ping_failed += 1,
            }
            match d {
                Some(d) => {
                    dns.push(d);
                    dns_call.push(took + d);
                }
                None => dns_failed += 1,
            }
            if i == 0 {
                *self.server.lock().expect("server lock") = Some((sb.clone(), addr));
            }
        }
        // Judged from the attach call (the stricter of the two).
        let verdict = |what: &str, answered: &[Duration], call: &[Duration], failed: usize| {
            let p99 = ms(pct(call, 0.99));
            format!(
                "convergence, {what}: p99 {p99:.1} ms after the attach call ({:.1} ms after \
                 its answer) <= 250 ms: {}{}",
                ms(pct(answered, 0.99)),
                met(p99 <= 250.0 && failed == 0),
                failures(failed),
            )
        };
        let verdicts = vec![
            verdict("ping from h2", &ping, &ping_call, ping_failed),
            verdict("name on h2's DNS", &dns, &dns_call, dns_failed),
        ];
        Ok((
            vec![
                row("attach on h1 (overlay, peer h2)", "attach", attach, 0),
                row("h1 attached -> ping from h2", "converge", ping, ping_failed),
                row("h1 attached -> DNS on h2", "converge", dns, dns_failed),
                row(
                    "h1 attach call -> ping from h2",
                    "converge",
                    ping_call,
                    ping_failed,
                ),
                row(
                    "h1 attach call -> DNS on h2",
                    "converge",
                    dns_call,
                    dns_failed,
                ),
            ],
            verdicts,
        ))
    }

    /// ICMP echo to `addr` every millisecond until one is answered: the time since `since`,
    /// or `None` after [`CONVERGE_DEADLINE`].
    fn ping_until(&self, addr: Ipv4Addr, ident: u16, since: Instant) -> Result<Option<Duration>> {
        let to = SocketAddr::from((addr, 0));
        let mut buf = [0u8; 1500];
        let mut seq: u16 = 0;
        while since.elapsed() < CONVERGE_DEADLINE {
            seq = seq.wrapping_add(1);
            // Sending fails while the neighbour is unresolved: that is what is waited out.
            let _ = self.icmp.send_to(&echo_request(ident, seq), to);
            let next = Instant::now() + Duration::from_millis(1);
            while Instant::now() < next {
                let Ok((len, from)) = self.icmp.recv_from(&mut buf) else {
                    continue;
                };
                // A raw socket hands over the IP header too.
                let pkt = &buf[..len];
                let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
                if from.ip() == IpAddr::V4(addr)
                    && pkt.len() >= ihl + 8
                    && pkt[ihl] == 0
                    && u16::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5]]) == ident
                {
                    return Ok(Some(since.elapsed()));
                }
            }
        }
        Ok(None)
    }

    /// An A query for `name` to h2's DNS every millisecond until one is answered with `addr`.
    fn resolve_until(
        &self,
        name: &str,
        addr: Ipv4Addr,
        trial: u16,
        since: Instant,
    ) -> Result<Option<Duration>> {
        let mut buf = [0u8; 1500];
        let mut seq: u16 = 0;
        while since.elapsed() < CONVERGE_DEADLINE {
            seq = seq.wrapping_add(1);
            let id = trial.wrapping_mul(4099).wrapping_add(seq);
            let _ = self.udp.send(&dns_query(id, name));
            let next = Instant::now() + Duration::from_millis(1);
            while Instant::now() < next {
                let Ok(len) = self.udp.recv(&mut buf) else {
                    continue;
                };
                let m = &buf[..len];
                // No EDNS in the query, so a one-address answer ends with that address.
                if len >= 12 + 4
                    && m[3] & 0x0f == 0
                    && u16::from_be_bytes([m[6], m[7]]) > 0
                    && m[len - 4..] == addr.octets()
                {
                    return Ok(Some(since.elapsed()));
                }
            }
        }
        Ok(None)
    }

    /// 3. iperf3 from h2's prober to a sandbox on h1 over `cv`, against the same from x2 to
    ///    x1 over a hand-made VXLAN pair on the same underlay; alternating, median of `runs`.
    fn throughput(&self, c: &Cluster, secs: u32, runs: usize) -> Result<Vec<String>> {
        if Command::new("iperf3").arg("-v").output().is_err() {
            eprintln!("cluster throughput skipped: apt-get install iperf3");
            return Ok(Vec::new());
        }
        let server = self.server.lock().expect("server lock").clone();
        let (server_sb, server_ip) = match server {
            Some(s) => s,
            None => {
                let h1 = c.host(1);
                let sb = h1.sandbox("ipf")?;
                let ep = h1.attach(CV, &sb.name)?;
                match ep.ips.first().map(|ip| ip.addr()) {
                    Some(IpAddr::V4(a)) => (sb, a),
                    other => bail!("endpoint {}: no IPv4 address ({other:?})", ep.id),
                }
            }
        };
        let pair = c.handmade_pair();
        let mut servers = Vec::new();
        for ns in [&server_sb.path, &pair.x1, &pair.y1] {
            servers.push(Killed(
                nsenter(ns, &["iperf3", "-s", "-p", "5201"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
        // (label, client namespace, its interface, server address), alternating runs.
        let paths = [
            (
                "berth overlay, sandbox h2 -> sandbox h1",
                self.probe.path.as_str(),
                "eth0",
                server_ip.to_string(),
            ),
            (
                "hand-made VXLAN pair, namespace -> namespace",
                pair.x2.as_str(),
                "vx0",
                "10.99.0.1".to_string(),
            ),
            (
                "hand-made VXLAN + bridge + veth (no berth)",
                pair.y2.as_str(),
                "eth0",
                "10.98.0.1".to_string(),
            ),
        ];
        let mut got: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for _ in 0..runs {
            for (k, (_, client, _, target)) in paths.iter().enumerate() {
                got[k].push(crate::ports::iperf(client, target, 5201, secs)?);
            }
        }
        let medians: Vec<f64> = got
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            })
            .collect();
        println!(
            "\nTCP across hosts (underlay veths on a bridge), iperf3 1 stream, {secs} s x {runs}, \
             medians, runs alternating:"
        );
        println!("| path                                           |  MTU | Gbit/s |");
        println!("|------------------------------------------------|-----:|-------:|");
        for ((label, client, dev, _), g) in paths.iter().zip(&medians) {
            println!("| {label:<46} | {:>4} | {g:>6.2} |", mtu(client, dev)?);
        }
        let (o, p, t) = (medians[0], medians[1], medians[2]);
        let ratio = 100.0 * o / p;
        println!("| berth / hand-made pair                         |      | {ratio:>5.1}% |");
        println!(
            "| berth / hand-made with bridge + veth           |      | {:>5.1}% |",
            100.0 * o / t
        );
        Ok(vec![format!(
            "overlay throughput {o:.2} Gbit/s = {ratio:.1} % of a hand-made VXLAN pair \
             ({p:.2} Gbit/s) >= 95 %: {} ({:.1} % of the same pair behind a bridge and veth)",
            met(ratio >= 95.0),
            100.0 * o / t
        )])
    }
}

fn failures(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} never converged within {CONVERGE_DEADLINE:?})"),
    }
}

/// The hand-made VXLAN pair's namespaces (paths).
struct Pair {
    /// The VXLAN ends, with `vx0` at 10.99.0.1 and .2.
    x1: String,
    x2: String,
    /// Sandbox-like namespaces behind a bridge in x1 and x2, at 10.98.0.1 and .2.
    y1: String,
    y2: String,
}

impl Cluster {
    fn handmade_pair(&self) -> Pair {
        let path = |n: &str| format!("/run/netns/{}-{n}", self.tag);
        Pair {
            x1: path("x1"),
            x2: path("x2"),
            y1: path("y1"),
            y2: path("y2"),
        }
    }

    /// Two namespaces `x1`, `x2` on the underlay at 198.51.100.21 and .22, each with
    /// - a VXLAN device `vx0` (VNI 99, port 4790, pointing at the other, MTU of the underlay
    ///   minus 50) at 10.99.0.1 and .2: no bridge, no veth, no berth;
    /// - and berth's topology by hand: a bridge `br1` with a second VXLAN device `vx1` (VNI
    ///   98, port 4791) and a veth to a namespace `y1`/`y2` at 10.98.0.1 and .2.
    fn make_handmade_pair(&mut self) -> Result<()> {
        let mtu = (UNDERLAY_MTU - 50).to_string();
        for (k, other) in [(1, 2), (2, 1)] {
            let ns = self.add_netns(&format!("x{k}"))?;
            let y = self.add_netns(&format!("y{k}"))?;
            let (local, remote) = (
                format!("{UNDERLAY_PREFIX}.{}", 20 + k),
                format!("{UNDERLAY_PREFIX}.{}", 20 + other),
            );
            self.join_underlay(&ns, &format!("x{k}"), &local)?;
            for (dev, vni, port) in [("vx0", HANDMADE_VNI, HANDMADE_PORT), ("vx1", "98", "4791")] {
                ip(
                    &ns,
                    &[
                        "link", "add", dev, "type", "vxlan", "id", vni, "local", &local, "remote",
                        &remote, "dstport", port, "dev", "ul0",
                    ],
                )?;
                ip(&ns, &["link", "set", dev, "mtu", &mtu])?;
            }
            ip(
                &ns,
                &["addr", "add", &format!("10.99.0.{k}/24"), "dev", "vx0"],
            )?;
            ip(&ns, &["link", "set", "vx0", "up"])?;
            ip(&ns, &["link", "add", "br1", "type", "bridge"])?;
            ip(&ns, &["link", "set", "vx1", "master", "br1"])?;
            ip(
                &ns,
                &[
                    "link", "add", "s0", "type", "veth", "peer", "name", "eth0", "netns", &y,
                ],
            )?;
            ip(&ns, &["link", "set", "s0", "mtu", &mtu])?;
            ip(&ns, &["link", "set", "s0", "master", "br1"])?;
            for dev in ["vx1", "s0", "br1"] {
                ip(&ns, &["link", "set", dev, "up"])?;
            }
            ip(&y, &["link", "set", "eth0", "mtu", &mtu])?;
            ip(
                &y,
                &["addr", "add", &format!("10.98.0.{k}/24"), "dev", "eth0"],
            )?;
            ip(&y, &["link", "set", "eth0", "up"])?;
        }
        Ok(())
    }
}

/// The MTU of `dev` in the namespace at `path`.
fn mtu(path: &str, dev: &str) -> Result<u32> {
    let out = run(&mut nsenter(
        path,
        &["ip", "-o", "link", "show", "dev", dev],
    ))?;
    out.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no mtu in {out:?}"))
}

/// An ICMP echo request with 56 bytes of payload, checksummed.
fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0xa5; 56]);
    let mut sum: u32 = p
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

/// A recursive A query for `name`, without EDNS.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// 4. Every host's `callers` callers attach `per_caller` fresh sandboxes each to one new
///    overlay network, all at once; then detach them the same way.
fn cluster_attach(c: &Cluster, callers: usize, per_caller: usize) -> Result<(Vec<Row>, String)> {
    const NET: &str = "wide";
    c.host(1).network(CreateNetwork {
        name: NET.into(),
        subnet: Some("10.184.0.0/16".into()),
        driver: Some("overlay".into()),
        ..Default::default()
    })?;
    let hosts: Vec<&Host> = (1..=HOSTS).map(|i| c.host(i)).collect();
    let sbs: Vec<Vec<Sandbox>> = hosts
        .iter()
        .map(|h| h.sandboxes(&format!("w{}-", h.id), callers * per_caller))
        .collect::<Result<_>>()?;
    let retries = |hosts: &[&Host]| -> Result<Vec<u64>> {
        hosts
            .iter()
            .map(|h| Ok(h.status()?.block_claim_retries))
            .collect()
    };
    let before = retries(&hosts)?;

    // Each caller: (latencies, endpoints, failures, first failure).
    type Got = (Vec<Duration>, Vec<Endpoint>, usize, Option<String>);
    let work = |detach: bool| -> (Vec<Got>, Duration) {
        let start = Instant::now();
        let got = std::thread::scope(|s| {
            let handles: Vec<_> = hosts
                .iter()
                .enumerate()
                .flat_map(|(k, h)| {
                    let sbs = &sbs[k];
                    (0..callers).map(move |cl| (h, &sbs[cl * per_caller..(cl + 1) * per_caller]))
                })
                .map(|(h, mine)| {
                    s.spawn(move || {
                        let mut got: Got = (Vec::new(), Vec::new(), 0, None);
                        for sb in mine {
                            let t = Instant::now();
                            let r = if detach {
                                h.detach(NET, &sb.name).map(|()| None)
                            } else {
                                h.attach(NET, &sb.name).map(Some)
                            };
                            match r {
                                Ok(ep) => {
                                    got.0.push(t.elapsed());
                                    got.1.extend(ep);
                                }
                                Err(e) => {
                                    got.2 += 1;
                                    got.3.get_or_insert(format!("{} {}: {e:#}", h.id, sb.name));
                                }
                            }
                        }
                        got
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Vec<Got>>()
        });
        (got, start.elapsed())
    };
    let merge = |got: Vec<Got>| {
        let mut all: Got = (Vec::new(), Vec::new(), 0, None);
        for g in got {
            all.0.extend(g.0);
            all.1.extend(g.1);
            all.2 += g.2;
            if all.3.is_none() {
                all.3 = g.3;
            }
        }
        all
    };
    let (attached, attach_wall) = work(false);
    let attached = merge(attached);
    if let Some(e) = &attached.3 {
        eprintln!("cluster-wide attach, first failure: {e}");
    }
    let after = retries(&hosts)?;

    // Every address handed out, as the callers were told and as the store holds them.
    let mut told = HashSet::new();
    let mut dup_told = 0;
    for ep in &attached.1 {
        for ip in &ep.ips {
            if !told.insert(ip.addr()) {
                dup_told += 1;
            }
        }
    }
    let allocs: Vec<Allocation> = c
        .host(1)
        .client
        .get(&format!("/v1/networks/{NET}/allocations"))?;
    let mut held = HashSet::new();
    let mut dup_held = 0;
    let mut held_by_endpoints = 0;
    for a in &allocs {
        if !held.insert(a.ip.clone()) {
            dup_held += 1;
        }
        if a.owner != "gateway" {
            held_by_endpoints += 1;
        }
    }
    let unique = dup_told == 0 && dup_held == 0 && held_by_endpoints == attached.1.len();

    let (detached, detach_wall) = work(true);
    let detached = merge(detached);
    if let Some(e) = &detached.3 {
        eprintln!("cluster-wide detach, first failure: {e}");
    }

    let total = hosts.len() * callers * per_caller;
    let label = format!("etcd overlay, {HOSTS} hosts x {callers} callers");
    let rows = vec![
        row(label.clone(), "attach", attached.0.clone(), attached.2),
        row(label, "detach", detached.0.clone(), detached.2),
    ];
    let per_host: Vec<String> = hosts
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(h, (b, a))| format!("{} {}", h.id, a - b))
        .collect();
    let summary = format!(
        "Cluster-wide: {total} attaches ({HOSTS} hosts x {callers} callers x {per_caller}) in \
         {:.2} s = {:.0} attaches/s ({} failed); detaches {:.0}/s ({} failed).\n\
         Block-claim retries during the attaches: {} ({}).\n\
         Addresses: {} told to callers, {} duplicates; {} held in the store by endpoints \
         (+{} gateway), {} duplicates: {}.",
        attach_wall.as_secs_f64(),
        attached.0.len() as f64 / attach_wall.as_secs_f64(),
        attached.2,
        detached.0.len() as f64 / detach_wall.as_secs_f64(),
        detached.2,
        after.iter().sum::<u64>() - before.iter().sum::<u64>(),
        per_host.join(", "),
        told.len(),
        dup_told,
        held_by_endpoints,
        allocs.len() - held_by_endpoints,
        dup_held,
        if unique {
            "every address unique"
        } else {
            "NOT UNIQUE"
        },
    );
    Ok((rows, summary))
}
