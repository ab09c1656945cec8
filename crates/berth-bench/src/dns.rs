//! DNS: dnsperf against berth and against aardvark-dns (podman's DNS server) in one run, both
//! given the same names, each server pinned to CPU 1 and dnsperf to CPU 0.
//!
//! berth answers on the network's gateway; aardvark-dns listens on a second address of the
//! same bridge and has the same endpoints in its config file (names, addresses, and the
//! client, which aardvark-dns wants to know). Forwarded names go to a small upstream on this
//! host's loopback that answers every name at once, so the figure is the forwarder's own cost.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_api::{Attach, Client, CreateNetwork, Endpoint, Network};
use berth_dataplane::netns;
use berth_dns::wire;

const AARDVARK: &str = "/usr/lib/podman/aardvark-dns";
const SUBNET: &str = "10.79.0.0/24";
const BERTH_SERVER: &str = "10.79.0.1";
const AARDVARK_SERVER: &str = "10.79.0.254";
/// The local upstream both servers forward to.
pub const UPSTREAM: &str = "127.0.0.53";

/// One dnsperf run's figures, and the server's CPU time per answered query.
struct Perf {
    qps: f64,
    avg_ms: f64,
    lost: String,
    cpu_us: f64,
}

/// A process's CPU time so far (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // Linux reports these in USER_HZ, which is 100 on every architecture it runs on.
    Ok(ticks / 100.0)
}

/// The resolv.conf both servers read their upstream from.
pub fn upstream_resolv_conf(dir: &Path) -> PathBuf {
    dir.join("upstream-resolv.conf")
}

/// Answers every query with one A record, from a thread on `UPSTREAM:53`, until dropped.
pub struct Upstream {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Result<Upstream> {
        let sock = UdpSocket::bind((UPSTREAM, 53)).context("upstream on 127.0.0.53:53")?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let record = [wire::Record::Addr([198, 51, 100, 7].into())];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf)
                    && let Ok(q) = wire::parse_query(&buf[..n])
                {
                    let a =
                        wire::answer(&q, wire::RCODE_NOERROR, false, &record, 60, q.udp_limit());
                    let _ = sock.send_to(&a, peer);
                }
            }
        });
        Ok(Upstream {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// aardvark-dns daemonises; its pid is in its config directory. Killed on drop.
struct Aardvark {
    config: PathBuf,
}

impl Drop for Aardvark {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.config.join("aardvark.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

pub fn bench(
    client: &Client,
    dir: &Path,
    daemon_pid: u32,
    names: usize,
    secs: u32,
    cpu_quota: Option<f64>,
) -> Result<()> {
    if Command::new("dnsperf").arg("-h").output().is_err() || !Path::new(AARDVARK).exists() {
        eprintln!("DNS benchmark skipped: apt-get install dnsperf aardvark-dns");
        return Ok(());
    }
    let net: Network = client.post(
        "/v1/networks",
        &CreateNetwork {
            name: "dns".into(),
            subnet: Some(SUBNET.into()),
            ..Default::default()
        },
    )?;
    let mut entries = Vec::new();
    let mut sandboxes = Vec::new();
    for i in 0..=names {
        let path = dir.join("sb").join(format!("dns{i}"));
        netns::create(&path)?;
        sandboxes.push(path.clone());
        let name = if i == names {
            "client".to_string()
        } else {
            format!("svc{i}")
        };
        let ep: Endpoint = client.post(
            "/v1/endpoints",
            &Attach {
                network: "dns".into(),
                sandbox: path.display().to_string(),
                name: Some(name.clone()),
                ..Default::default()
            },
        )?;
        let ip = ep.ips[0].addr();
        entries.push(format!("{:012x} {ip}  {name}\n", i + 1));
    }
    let client_ns = sandboxes.last().expect("the client").clone();

    // aardvark-dns on a second address of the bridge, with the same names.
    let aardvark_dir = dir.join("aardvark");
    std::fs::create_dir_all(&aardvark_dir)?;
    std::fs::write(
        aardvark_dir.join("dns"),
        format!("{AARDVARK_SERVER}\n{}", entries.concat()),
    )?;
    let resolv = upstream_resolv_conf(dir);
    run(Command::new("ip").args([
        "addr",
        "add",
        &format!("{AARDVARK_SERVER}/24"),
        "dev",
        &net.bridge,
    ]))?;
    // Its /etc/resolv.conf (it has no other way to be told its upstream) in a private mount
    // namespace.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec taskset -c 1 {AARDVARK} --config {} -p 53 run",
        resolv.display(),
        aardvark_dir.display()
    );
    run(Command::new("unshare").args(["-m", "sh", "-c", &script]))?;
    let _aardvark = Aardvark {
        config: aardvark_dir.clone(),
    };
    pin(daemon_pid, "1")?;

    let local = dir.join("local-names.txt");
    let text: String = (0..names).map(|i| format!("svc{i} A\n")).collect();
    std::fs::write(&local, text)?;
    let remote = dir.join("forwarded-names.txt");
    let text: String = (0..1000)
        .map(|i| format!("host{i}.example.com A\n"))
        .collect();
    std::fs::write(&remote, text)?;

    let aardvark_pid: u32 = std::fs::read_to_string(aardvark_dir.join("aardvark.pid"))?
        .trim()
        .parse()
        .context("aardvark-dns pid")?;
    let mut rows = Vec::new();
    // Last, local names again with each server held to half a core (cgroup CPU quota), so
    // that the server and not dnsperf is what runs out.
    let halved = cpu_quota.map(|q| format!("local, {q} CPU"));
    let mut runs = vec![
        ("local names", &local, false),
        ("forwarded names", &remote, false),
    ];
    if let Some(h) = &halved {
        runs.push((h.as_str(), &local, true));
    }
    for (what, queries, limited) in runs {
        let _limit = match (limited, cpu_quota) {
            (true, Some(q)) => Some(CpuLimit::new(q, &[daemon_pid, aardvark_pid])?),
            _ => None,
        };
        for (server, addr, pid) in [
            ("berth", BERTH_SERVER, daemon_pid),
            ("aardvark-dns 1.4", AARDVARK_SERVER, aardvark_pid),
        ] {
            // Warm up (first queries build caches and ARP entries), then measure.
            dnsperf(&client_ns, addr, queries, 1)?;
            let cpu = cpu_seconds(pid)?;
            let mut p = dnsperf(&client_ns, addr, queries, secs)?;
            p.cpu_us = (cpu_seconds(pid)? - cpu) * 1e6 / (p.qps * f64::from(secs));
            rows.push((what, server, p));
        }
    }
    pin(daemon_pid, "0-1")?;

    println!(
        "\n| dnsperf {secs} s on CPU 0, server on CPU 1 | server           |     QPS | avg ms | lost | server CPU µs/query | QPS per server core |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (what, server, p) in &rows {
        println!(
            "| {what:<15} | {server:<16} | {:>7.0} | {:>6.3} | {:>4} | {:>5.2} | {:>7.0} |",
            p.qps,
            p.avg_ms,
            p.lost,
            p.cpu_us,
            1e6 / p.cpu_us
        );
    }
    let whats: Vec<&str> = rows.iter().map(|r| r.0).collect::<Vec<_>>();
    let mut seen = Vec::new();
    for what in whats {
        if seen.contains(&what) {
            continue;
        }
        seen.push(what);
        let of = |s: &str| {
            rows.iter()
                .find(|r| r.0 == what && r.1.starts_with(s))
                .map(|r| &r.2)
        };
        if let (Some(b), Some(a)) = (of("berth"), of("aardvark")) {
            println!(
                "berth / aardvark-dns, {what}: {:.2}x the QPS, {:.2}x less server CPU per query",
                b.qps / a.qps,
                a.cpu_us / b.cpu_us
            );
        }
    }
    for p in &sandboxes {
        let _ = netns::remove(p);
    }
    Ok(())
}

fn dnsperf(client_ns: &Path, server: &str, queries: &Path, secs: u32) -> Result<Perf> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", client_ns.display()))
        .args(["taskset", "-c", "0", "dnsperf", "-s", server, "-d"])
        .arg(queries)
        .args(["-l", &secs.to_string(), "-q", "200"])
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|r| r.trim().to_string()))
            .with_context(|| format!("dnsperf printed no {key:?}:\n{text}"))
    };
    // A server that refused or failed queries would look fast: say so.
    let codes = field("Response codes:")?;
    if codes.split(", ").any(|c| !c.starts_with("NOERROR")) {
        eprintln!("dnsperf against {server}: response codes {codes}");
    }
    let num = |s: String| {
        s.split_whitespace()
            .next()
            .unwrap_or("")
            .parse::<f64>()
            .ok()
    };
    Ok(Perf {
        qps: num(field("Queries per second:")?).context("QPS")?,
        avg_ms: num(field("Average Latency (s):")?).context("latency")? * 1e3,
        lost: field("Queries lost:")?
            .split_whitespace()
            .next()
            .unwrap_or("?")
            .to_string(),
        cpu_us: 0.0,
    })
}

/// A cgroup (v1 `cpu` controller) with a CPU quota, holding the servers while it lives; on
/// drop they go back to the root group and it is removed.
struct CpuLimit {
    dir: PathBuf,
    pids: Vec<u32>,
}

const CPU_CGROUP: &str = "/sys/fs/cgroup/cpu";

impl CpuLimit {
    fn new(cpus: f64, pids: &[u32]) -> Result<CpuLimit> {
        let dir = Path::new(CPU_CGROUP).join(format!("berth-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{} (cgroup v1 cpu controller)", dir.display()))?;
        let limit = CpuLimit {
            dir,
            pids: pids.to_vec(),
        };
        std::fs::write(limit.dir.join("cpu.cfs_period_us"), "100000")?;
        std::fs::write(
            limit.dir.join("cpu.cfs_quota_us"),
            format!("{}", (cpus * 100_000.0) as u64),
        )?;
        for pid in pids {
            std::fs::write(limit.dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(limit)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::fs::write(Path::new(CPU_CGROUP).join("cgroup.procs"), pid.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Moves every thread of a process to the CPUs in `list`.
fn pin(pid: u32, list: &str) -> Result<()> {
    run(Command::new("taskset")
        .args(["-a", "-p", "-c", list, &pid.to_string()])
        .stdout(Stdio::null()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status()?;
    if !st.success() {
        bail!("{cmd:?} failed");
    }
    Ok(())
}
