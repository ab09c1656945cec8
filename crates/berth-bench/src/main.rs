//! `berth-bench`: attach and detach latency, berth beside the baselines, in one run.
//!
//! Everything happens inside a private "host" network namespace that this process enters at
//! start (before any thread exists, so that is safe), with sandboxes made by berth's own netns
//! code in a temporary directory. berth is driven through its API socket, and, like for like
//! with the other tools, through `berth-cni` (process start included); the reference CNI
//! `bridge`+`host-local` plugins and netavark are spawned directly, as a runtime on that host
//! would, each sequentially and with parallel callers. Run as root:
//! `cargo build --release && target/release/berth-bench`.

mod cluster;
mod dns;
mod docker;
mod policy;
mod ports;
mod services;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_api::{Attach, Client, CreateNetwork, Detach, Endpoint, Network};
use berth_dataplane::netns;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Attach/detach latency: berth vs the reference CNI plugins and netavark")]
struct Args {
    /// Runs of berth through the API: sandboxes attached in a row, then detached.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
    n: Vec<usize>,
    /// Runs of the CNI-style comparison (berth-cni, reference plugins, netavark), each
    /// sequential and with --parallel callers.
    #[arg(long, value_delimiter = ',', default_values_t = [100, 1000])]
    cni_n: Vec<usize>,
    /// Concurrent callers for the parallel runs.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Also time `docker run -d` of this many containers on berth, Docker's bridge and no
    /// network (needs docker.io and busybox-static); 0 skips it.
    #[arg(long, default_value_t = 50)]
    docker_n: usize,
    /// Log level of the benchmarked daemon (its log goes to stderr).
    #[arg(long, default_value = "warn")]
    daemon_log_level: String,
    /// Attaches alternating without ports and with three published ports (0 skips it).
    #[arg(long, default_value_t = 200)]
    ports_n: usize,
    /// Seconds per iperf3 run through a published port and direct (0 skips it).
    #[arg(long, default_value_t = 5)]
    iperf_secs: u32,
    /// iperf3 runs of each kind; the median is reported.
    #[arg(long, default_value_t = 3)]
    iperf_runs: usize,
    /// Seconds of dnsperf per server and kind of name (0 skips the DNS benchmark).
    #[arg(long, default_value_t = 10)]
    dns_secs: u32,
    /// Also measure local names with each DNS server held to this many CPUs (cgroup v1 CPU
    /// quota; 0 skips it), where dnsperf would otherwise be the limit.
    #[arg(long, default_value_t = 0.5)]
    dns_cpu_quota: f64,
    /// Endpoints with names on the DNS benchmark's network.
    #[arg(long, default_value_t = 100)]
    dns_names: usize,
    /// Skip the baselines (e.g. where their packages are not installed).
    #[arg(long)]
    no_baselines: bool,
    /// Many hosts (needs etcd-server): sequential attaches and detaches on etcd beside the
    /// embedded store and a bare etcd transaction, N of each; 0 skips every cluster benchmark.
    /// Throughput across hosts uses --iperf-secs and --iperf-runs.
    #[arg(long, default_value_t = 200)]
    cluster_n: usize,
    /// Attaches on one host timed until they answer ping and DNS on another (0 skips it).
    #[arg(long, default_value_t = 50)]
    cluster_converge_n: usize,
    /// Concurrent callers on each of the three hosts for the cluster-wide attach throughput
    /// (0 skips it).
    #[arg(long, default_value_t = 16)]
    cluster_callers: usize,
    /// Attaches by each of those callers.
    #[arg(long, default_value_t = 10)]
    cluster_attaches: usize,
    /// Services (10 backends each) in place while changes to them are timed: berth's load
    /// balancer beside kube-proxy's nftables and iptables layouts.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 1000, 10000])]
    services_n: Vec<usize>,
    /// Changes of each kind (add a service, add a backend, remove one) timed per number of
    /// services; 0 skips the programming benchmark.
    #[arg(long, default_value_t = 100)]
    services_changes: usize,
    /// Changes of each kind for the baselines that reload everything, above 100 services.
    #[arg(long, default_value_t = 5)]
    services_baseline_changes: usize,
    /// Seconds per run of short TCP connections through a service VIP and straight to its
    /// backends (3 runs each, alternating; 0 skips it).
    #[arg(long, default_value_t = 3)]
    services_secs: u32,
    /// Concurrent client threads for those connections.
    #[arg(long, default_value_t = 2)]
    services_clients: usize,
    /// Network policy: changes of each kind (a policy isolating a server created, then
    /// deleted, alternating) timed from the API call to their effect on UDP probes; 0 skips it.
    #[arg(long, default_value_t = 100)]
    policy_changes: usize,
    /// Numbers of policies selecting the server while short TCP connections to it are timed.
    #[arg(long, value_delimiter = ',', default_values_t = [0, 100, 1000])]
    policy_n: Vec<usize>,
    /// Seconds per run of those connections (0 skips them).
    #[arg(long, default_value_t = 3)]
    policy_secs: u32,
    /// Runs per number of policies, the order alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    policy_runs: usize,
    /// Concurrent client threads for those connections.
    #[arg(long, default_value_t = 2)]
    policy_clients: usize,
    /// Attaches timed with no policy in place, and as many with --policy-attach-policies
    /// (0 skips it).
    #[arg(long, default_value_t = 100)]
    policy_attach_n: usize,
    /// Policies in place for the second kind of those attaches.
    #[arg(long, default_value_t = 1000)]
    policy_attach_policies: usize,
    /// Policy creations, replacements and deletions timed with --policy-attach-policies in
    /// place, each kind (0 skips them).
    #[arg(long, default_value_t = 50)]
    policy_api_changes: usize,
    /// Busy threads that load the machine for loaded runs of the policy attaches and changes
    /// (0: quiet runs only).
    #[arg(long, default_value_t = 8)]
    policy_load_threads: usize,
}

/// Where the p-quantile is in `len` sorted samples: the sample at index len·p.
fn quantile_index(len: usize, p: f64) -> usize {
    ((len as f64 * p) as usize).min(len.saturating_sub(1))
}

/// The latency table, header and rows.
fn print_table(rows: &[Row]) {
    println!(
        "\n| tool                           |     N | op       | p50 ms  | p99 ms  | first   | last    | failed |"
    );
    println!(
        "|--------------------------------|------:|----------|--------:|--------:|--------:|--------:|-------:|"
    );
    for r in rows {
        r.print();
    }
}

struct Row {
    tool: String,
    n: usize,
    op: &'static str,
    samples: Vec<Duration>,
    failed: usize,
}

impl Row {
    fn print(&self) {
        let mut s = self.samples.clone();
        s.sort();
        let ms = |d: Option<&Duration>| {
            d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
        };
        let pct = |p: f64| s.get(quantile_index(s.len(), p));
        println!(
            "| {:<30} | {:>5} | {:<8} | {:>7} | {:>7} | {:>7} | {:>7} | {:>6} |",
            self.tool,
            self.n,
            self.op,
            ms(pct(0.5)),
            ms(pct(0.99)),
            ms(self.samples.first()),
            ms(self.samples.last()),
            self.failed,
        );
    }
}

struct Bench {
    host: PathBuf,
    dir: PathBuf,
    berth: PathBuf,
    daemon: Option<Child>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("sb")) {
            for e in entries.flatten() {
                let _ = netns::remove(&e.path());
            }
        }
        let _ = netns::remove(&self.host);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("berth-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sb"))?;
    let berth = std::env::current_exe()?.with_file_name("berth");
    if !berth.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            berth.display()
        );
    }
    let mut b = Bench {
        host: dir.join("host"),
        dir: dir.clone(),
        berth,
        daemon: None,
    };
    netns::create(&b.host)?;
    let host = std::fs::File::open(&b.host)?;
    nix::sched::setns(&host, nix::sched::CloneFlags::CLONE_NEWNET).context("enter host netns")?;
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !up.success() {
        bail!("cannot bring lo up in the benchmark's namespace");
    }
    std::fs::write(
        dns::upstream_resolv_conf(&dir),
        format!("nameserver {}\n", dns::UPSTREAM),
    )?;
    let _upstream = dns::Upstream::start()?;

    b.daemon = Some(
        Command::new(&b.berth)
            .args([
                "daemon",
                "--log-level",
                &args.daemon_log_level,
                "--state-dir",
            ])
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--netns-dir")
            .arg(dir.join("netns"))
            .arg("--docker-plugin-socket")
            .arg(dir.join("run/plugin.sock"))
            .arg("--dns-resolv-conf")
            .arg(dns::upstream_resolv_conf(&dir))
            // dnsperf is one client sending as fast as it can: over the default per-client
            // rate, which would make the DNS figures the limit's rather than the server's.
            // The limit's bookkeeping is still done for every query.
            .args(["--dns-client-qps", &berth_dns::MAX_CLIENT_QPS.to_string()])
            .arg("--sandbox-etc-dir")
            .arg(dir.join("etc-netns"))
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let socket = dir.join("run/berth.sock");
    let client = Client::new(&socket);
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get::<serde_json::Value>("/v1/status").is_err() {
        if Instant::now() > deadline {
            bail!("daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _: Network = client.post(
        "/v1/networks",
        &CreateNetwork {
            name: "bench".into(),
            subnet: Some("10.77.0.0/20".into()),
            ..Default::default()
        },
    )?;

    let mut rows = Vec::new();
    let max = args
        .n
        .iter()
        .chain(&args.cni_n)
        .chain(&[args.ports_n, 1])
        .copied()
        .max()
        .unwrap_or(1);
    let sandboxes: Vec<PathBuf> = (0..max)
        .map(|i| dir.join("sb").join(format!("s{i}")))
        .collect();
    for p in &sandboxes {
        netns::create(p)?;
    }

    for &n in args.n.iter().filter(|&&n| n > 0) {
        let (attach, detach) = berth_api_run(&client, &sandboxes[..n])?;
        rows.push(Row {
            tool: "berth (API)".into(),
            n,
            op: "attach",
            samples: attach,
            failed: 0,
        });
        rows.push(Row {
            tool: "berth (API)".into(),
            n,
            op: "detach",
            samples: detach,
            failed: 0,
        });
    }

    if args.ports_n > 0 {
        rows.extend(ports::attach_with_ports(
            &client,
            &sandboxes[..args.ports_n],
        )?);
    }

    let installed =
        Path::new("/usr/lib/cni/bridge").exists() && Path::new("/usr/lib/podman/netavark").exists();
    if !args.no_baselines && !installed {
        eprintln!("baselines skipped: apt-get install containernetworking-plugins netavark");
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("baselines");
    let mut tools = vec![Tool::berth_cni(&b.berth, &socket)];
    if !args.no_baselines && installed {
        tools.push(Tool::cni_reference(&here, &dir)?);
        tools.push(Tool::netavark(&here, &dir)?);
    }
    for &n in args.cni_n.iter().filter(|&&n| n > 0) {
        for callers in [1, args.parallel] {
            for tool in &tools {
                let label = match callers {
                    1 => tool.name.to_string(),
                    c => format!("{}, {c} callers", tool.name),
                };
                for (op, name) in [(Op::Add, tool.ops.0), (Op::Del, tool.ops.1)] {
                    let (samples, failed) =
                        run_calls(&sandboxes[..n], callers, |i, p| tool.call(op, i, p));
                    rows.push(Row {
                        tool: label.clone(),
                        n,
                        op: name,
                        samples,
                        failed,
                    });
                }
            }
        }
    }

    if args.docker_n > 0 {
        let plugin = format!("berthbench{}", std::process::id());
        let dockerd =
            docker::Dockerd::start(&dir.join("docker"), &plugin, &dir.join("run/plugin.sock"))?;
        rows.extend(dockerd.run_bench(&plugin, args.docker_n)?);
    }

    if !rows.is_empty() {
        print_table(&rows);
    }
    if args.dns_secs > 0 {
        let pid = b.daemon.as_ref().map_or(0, Child::id);
        let quota = Some(args.dns_cpu_quota).filter(|q| *q > 0.0);
        dns::bench(&client, &dir, pid, args.dns_names, args.dns_secs, quota)?;
    }
    if args.iperf_secs > 0 {
        ports::throughput(&client, &sandboxes[0], args.iperf_secs, args.iperf_runs)?;
    }
    if args.services_changes > 0 && !args.services_n.is_empty() {
        services::programming(&services::Options {
            sizes: args.services_n.clone(),
            changes: args.services_changes,
            baseline_changes: args.services_baseline_changes,
            no_baselines: args.no_baselines,
        })?;
    }
    if args.services_secs > 0 {
        services::data_path(
            &client,
            &dir,
            args.services_secs,
            3,
            args.services_clients.max(1),
        )?;
    }
    if args.policy_changes > 0 || args.policy_secs > 0 || args.policy_attach_n > 0 {
        policy::bench(
            &client,
            &dir,
            &policy::Options {
                changes: args.policy_changes,
                sizes: args.policy_n.clone(),
                secs: args.policy_secs,
                runs: args.policy_runs,
                clients: args.policy_clients,
                attach_n: args.policy_attach_n,
                attach_policies: args.policy_attach_policies,
                api_changes: args.policy_api_changes,
                load_threads: args.policy_load_threads,
            },
        )?;
    }
    if args.cluster_n > 0 {
        cluster::bench(
            &b.berth,
            &dir,
            &cluster::Options {
                n: args.cluster_n,
                converge_n: args.cluster_converge_n,
                callers: args.cluster_callers,
                attaches_per_caller: args.cluster_attaches,
                iperf_secs: args.iperf_secs,
                iperf_runs: args.iperf_runs,
                log_level: args.daemon_log_level.clone(),
            },
        )?;
    }
    Ok(())
}

fn timed(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn berth_api_run(client: &Client, sbs: &[PathBuf]) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut attach = Vec::new();
    for p in sbs {
        let req = Attach {
            network: "bench".into(),
            sandbox: p.display().to_string(),
            ..Default::default()
        };
        attach.push(timed(|| {
            client
                .post::<_, Endpoint>("/v1/endpoints", &req)
                .map(drop)
                .map_err(Into::into)
        })?);
    }
    let mut detach = Vec::new();
    for p in sbs {
        let req = Detach {
            network: "bench".into(),
            sandbox: Some(p.display().to_string()),
            ..Default::default()
        };
        detach.push(timed(|| {
            client
                .post::<_, serde_json::Value>("/v1/detach", &req)
                .map(drop)
                .map_err(Into::into)
        })?);
    }
    Ok((attach, detach))
}

/// Times `call` once per sandbox, from `callers` threads taking sandboxes in turn. Samples
/// of successful calls are in completion order; failures are counted (and the first one is
/// printed), since a baseline failing under load is a finding, not a reason to stop.
fn run_calls(
    sbs: &[PathBuf],
    callers: usize,
    call: impl Fn(usize, &Path) -> Result<()> + Sync,
) -> (Vec<Duration>, usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new((Vec::with_capacity(sbs.len()), 0usize));
    std::thread::scope(|s| {
        for _ in 0..callers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = sbs.get(i) else { return };
                    let t = Instant::now();
                    let r = call(i, p);
                    let d = t.elapsed();
                    let mut res = results.lock().expect("results lock");
                    match r {
                        Ok(()) => res.0.push(d),
                        Err(e) => {
                            if res.1 == 0 {
                                eprintln!("first failure (call {i}): {e:#}");
                            }
                            res.1 += 1;
                        }
                    }
                }
            });
        }
    });
    results.into_inner().expect("results lock")
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Del,
}

/// A CNI-style attach tool: one process per call, configuration on stdin.
struct Tool {
    name: &'static str,
    ops: (&'static str, &'static str),
    kind: ToolKind,
}

enum ToolKind {
    /// A CNI plugin binary with its configuration.
    Cni { exe: PathBuf, conf: String },
    /// netavark with its per-container configuration template and config dir.
    Netavark {
        template: String,
        config_dir: PathBuf,
    },
}

impl Tool {
    fn berth_cni(berth: &Path, socket: &Path) -> Tool {
        let conf = serde_json::json!({
            "cniVersion": "1.1.0", "name": "benchcni", "type": "berth-cni",
            "socket": socket, "subnet": "10.78.0.0/20",
        });
        Tool {
            name: "berth-cni",
            ops: ("ADD", "DEL"),
            kind: ToolKind::Cni {
                exe: berth.with_file_name("berth-cni"),
                conf: conf.to_string(),
            },
        }
    }

    fn cni_reference(here: &Path, dir: &Path) -> Result<Tool> {
        let conf = std::fs::read_to_string(here.join("cni-ref-bridge.json"))?
            .replace("DATADIR", &dir.join("host-local").display().to_string());
        Ok(Tool {
            name: "cni bridge+host-local",
            ops: ("ADD", "DEL"),
            kind: ToolKind::Cni {
                exe: "/usr/lib/cni/bridge".into(),
                conf,
            },
        })
    }

    fn netavark(here: &Path, dir: &Path) -> Result<Tool> {
        Ok(Tool {
            name: "netavark 1.4",
            ops: ("setup", "teardown"),
            kind: ToolKind::Netavark {
                template: std::fs::read_to_string(here.join("netavark-net.json"))?,
                config_dir: dir.join("netavark"),
            },
        })
    }

    fn call(&self, op: Op, i: usize, netns: &Path) -> Result<()> {
        let add = matches!(op, Op::Add);
        match &self.kind {
            ToolKind::Cni { exe, conf } => with_stdin(
                Command::new(exe)
                    .env("CNI_COMMAND", if add { "ADD" } else { "DEL" })
                    .env("CNI_CONTAINERID", format!("c{i}"))
                    .env("CNI_NETNS", netns)
                    .env("CNI_IFNAME", "eth0")
                    .env("CNI_PATH", "/usr/lib/cni"),
                conf,
            ),
            ToolKind::Netavark {
                template,
                config_dir,
            } => {
                // netavark takes the address from its caller (no IPAM of its own here).
                let conf = template
                    .replace("CID", &format!("cid{i}"))
                    .replace("NAME", &i.to_string())
                    .replace("IPADDR", &format!("10.89.{}.{}", i / 250, i % 250 + 2));
                with_stdin(
                    Command::new("/usr/lib/podman/netavark")
                        .arg("--config")
                        .arg(config_dir)
                        .arg(if add { "setup" } else { "teardown" })
                        .arg(netns),
                    &conf,
                )
            }
        }
    }
}

fn with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let said = [out.stdout, out.stderr].concat();
        bail!("{}", String::from_utf8_lossy(&said).trim());
    }
    Ok(())
}
