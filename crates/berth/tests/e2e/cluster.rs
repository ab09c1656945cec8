//! Test clusters: several test hosts (see `harness::Host`) joined by veths to a Linux bridge in
//! an "underlay" namespace, where etcd runs. Host `i` (1-based) is `h<i>` at
//! 198.51.100.(10+i)/24 on its `ul0`, with a default route via the underlay's 198.51.100.1,
//! where etcd listens. Every daemon of one cluster uses the same etcd key prefix, unique to
//! the cluster, so clusters never see each other's state even on one etcd.
//!
//! Dropping a cluster, also while a test panics, kills its daemons and etcd and removes every
//! namespace, interface and file it made.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Host, run, run_ok};

/// The underlay bridge's address, where etcd listens.
pub const UNDERLAY_GW: &str = "198.51.100.1";
pub const UNDERLAY_PREFIX: &str = "198.51.100";
/// The MTU of every host's underlay interface.
pub const UNDERLAY_MTU: u32 = 1500;
/// VXLAN over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;
/// The daemons' default host lease, in seconds (`--host-lease-ttl`): short, for tests.
pub const LEASE_TTL: u64 = 3;
/// The default `--host-gone-grace`, in seconds.
pub const GONE_GRACE: u64 = 5;
const ETCD_CLIENT: &str = "198.51.100.1:2379";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How a cluster is made.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--host-gone-grace` of every daemon, in seconds.
    pub gone_grace: u64,
    /// `--host-lease-ttl` of every daemon, in seconds.
    pub lease_ttl: u64,
    /// Whether `Cluster::with` starts the daemons.
    pub start_daemons: bool,
    /// etcd over TLS, and the daemons with the matching flags; `None`: plain.
    pub etcd_tls: Option<EtcdTls>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            gone_grace: GONE_GRACE,
            lease_ttl: LEASE_TTL,
            start_daemons: true,
            etcd_tls: None,
        }
    }
}

/// PEM files of an etcd that speaks TLS on its client port.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// etcd's certificate (valid for [`UNDERLAY_GW`]) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA of etcd's certificate (`--etcd-ca` of the daemons, `--cacert` of etcdctl).
    pub ca: PathBuf,
    /// `Some`: etcd asks for client certificates signed by this CA (`--client-cert-auth`).
    pub client_ca: Option<PathBuf>,
    /// The client certificate and key the daemons and etcdctl present, if any.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// The daemon's TLS flags for this etcd.
    pub fn daemon_flags(&self) -> Vec<String> {
        let mut flags = vec!["--etcd-ca".to_string(), path(&self.ca)];
        if let Some((cert, key)) = &self.client {
            flags.extend([
                "--etcd-cert".into(),
                path(cert),
                "--etcd-key".into(),
                path(key),
            ]);
        }
        flags
    }
}

fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

pub struct Cluster {
    /// The underlay namespace: the bridge `br0` at 198.51.100.1/24, and etcd.
    pub underlay: String,
    /// etcd's data directory and log.
    pub dir: PathBuf,
    /// The etcd key prefix of this cluster's daemons (`--etcd-prefix`).
    pub prefix: String,
    opts: Options,
    hosts: Vec<Host>,
    /// Each host's current underlay address (and `--advertise-address`).
    addrs: Mutex<Vec<String>>,
    etcd: Mutex<Option<Child>>,
}

impl Cluster {
    /// `n` hosts with running daemons, and etcd.
    pub fn new(n: usize) -> Cluster {
        Cluster::with(n, Options::default())
    }

    /// `n` hosts without daemons, and etcd.
    pub fn bare(n: usize) -> Cluster {
        Cluster::with(
            n,
            Options {
                start_daemons: false,
                ..Options::default()
            },
        )
    }

    pub fn with(n: usize, opts: Options) -> Cluster {
        assert!((1..=200).contains(&n), "{n} hosts");
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let underlay = format!("berth-e2e-ul-{}-{k}", std::process::id());
        let dir = std::env::temp_dir().join(&underlay);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok("ip", &["netns", "add", &underlay]);
        // From here on, a panic drops the cluster, which removes what was made so far.
        let mut c = Cluster {
            prefix: format!("/berth-test-{}-{k}/", std::process::id()),
            underlay,
            dir,
            opts,
            hosts: Vec::new(),
            addrs: Mutex::new(Vec::new()),
            etcd: Mutex::new(None),
        };
        let ul = c.underlay.clone();
        let ip = |args: &[&str]| {
            let mut a = vec!["-n", ul.as_str()];
            a.extend_from_slice(args);
            run_ok("ip", &a);
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "add", "br0", "type", "bridge"]);
        ip(&["addr", "add", &format!("{UNDERLAY_GW}/24"), "dev", "br0"]);
        ip(&["link", "set", "br0", "up"]);
        c.start_etcd();

        for i in 1..=n {
            let h = Host::bare();
            let port = format!("h{i}");
            // The veth is made in the underlay namespace, its peer moved into the host's.
            ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "ul0", "netns", &h.netns,
            ]);
            ip(&["link", "set", &port, "master", "br0"]);
            ip(&["link", "set", &port, "up"]);
            let addr = format!("{UNDERLAY_PREFIX}.{}", 10 + i);
            let hn = |args: &[&str]| {
                let mut a = vec!["-n", h.netns.as_str()];
                a.extend_from_slice(args);
                run_ok("ip", &a);
            };
            hn(&["link", "set", "ul0", "mtu", &UNDERLAY_MTU.to_string()]);
            hn(&["link", "set", "ul0", "up"]);
            hn(&["addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
            hn(&["route", "add", "default", "via", UNDERLAY_GW]);
            c.hosts.push(h);
            c.addrs.lock().unwrap().push(addr);
        }
        if c.opts.start_daemons {
            for i in 1..=n {
                c.start(i);
            }
        }
        c
    }

    /// `https` for an etcd with TLS, else `http`.
    fn etcd_scheme(&self) -> &'static str {
        match self.opts.etcd_tls {
            Some(_) => "https",
            None => "http",
        }
    }

    fn start_etcd(&self) {
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let url = format!("{}://{ETCD_CLIENT}", self.etcd_scheme());
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.underlay))
            .arg("etcd")
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", &url])
            .args(["--advertise-client-urls", &url])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"]);
        if let Some(tls) = &self.opts.etcd_tls {
            cmd.arg("--cert-file").arg(&tls.cert);
            cmd.arg("--key-file").arg(&tls.key);
            if let Some(ca) = &tls.client_ca {
                cmd.arg("--trusted-ca-file")
                    .arg(ca)
                    .arg("--client-cert-auth");
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut etcd = self.etcd.lock().unwrap();
        let child = etcd.insert(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("etcd exited with {status}:\n{}", self.etcd_log());
            }
            if self
                .etcdctl_output(&["endpoint", "health"])
                .status
                .success()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up:\n{}",
                self.etcd_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn etcd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// etcd's process id (nsenter execs it: the child is etcd).
    pub fn etcd_pid(&self) -> i32 {
        let etcd = self.etcd.lock().unwrap();
        etcd.as_ref().expect("etcd runs").id() as i32
    }

    /// Freezes etcd (SIGSTOP): an outage that keeps its data.
    pub fn etcd_stop(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.etcd_pid()),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
    }

    /// Ends an `etcd_stop` outage (SIGCONT).
    pub fn etcd_cont(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.etcd_pid()),
            nix::sys::signal::Signal::SIGCONT,
        )
        .unwrap();
    }

    /// `etcd://198.51.100.1:2379`, as the daemons' `--store`.
    pub fn etcd_endpoint(&self) -> String {
        format!("etcd://{ETCD_CLIENT}")
    }

    fn etcdctl_output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.underlay))
            .arg("etcdctl")
            .arg("--endpoints")
            .arg(format!("{}://{ETCD_CLIENT}", self.etcd_scheme()))
            .args(["--dial-timeout", "2s", "--command-timeout", "10s"]);
        if let Some(tls) = &self.opts.etcd_tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if let Some((cert, key)) = &tls.client {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        cmd.args(args).env("ETCDCTL_API", "3").output().unwrap()
    }

    /// Runs etcdctl (API v3) against the cluster's etcd from the underlay namespace; its
    /// stdout. Panics when it fails.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let o = self.etcdctl_output(args);
        assert!(
            o.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// etcd's current revision.
    pub fn etcd_revision(&self) -> i64 {
        let status: Value =
            serde_json::from_str(&self.etcdctl(&["endpoint", "status", "-w", "json"])).unwrap();
        status[0]["Status"]["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revision in {status}"))
    }

    /// Compacts etcd's history at its current revision (and waits until it is done): a watch
    /// from any earlier revision is refused as compacted. Returns the revision.
    pub fn etcd_compact(&self) -> i64 {
        let rev = self.etcd_revision();
        self.etcdctl(&["compaction", "--physical", &rev.to_string()]);
        rev
    }

    /// The cluster's keys (under its prefix), for messages.
    pub fn etcd_keys(&self) -> String {
        let o = self.etcdctl_output(&["get", "--prefix", "--keys-only", &self.prefix]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Host `i`, 1-based.
    pub fn host(&self, i: usize) -> &Host {
        assert!(
            (1..=self.hosts.len()).contains(&i),
            "no host {i}: hosts are 1..={}",
            self.hosts.len()
        );
        &self.hosts[i - 1]
    }

    /// Host `i`'s id: `h<i>`.
    pub fn host_id(&self, i: usize) -> String {
        format!("h{i}")
    }

    /// The host numbers, 1..=n.
    pub fn indices(&self) -> std::ops::RangeInclusive<usize> {
        1..=self.hosts.len()
    }

    /// Host `i`'s current underlay address, which its daemon advertises.
    pub fn addr(&self, i: usize) -> String {
        self.host(i);
        self.addrs.lock().unwrap()[i - 1].clone()
    }

    /// The host number of a host id, if it is one of ours.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        let i: usize = id.strip_prefix('h')?.parse().ok()?;
        self.indices().contains(&i).then_some(i)
    }

    /// The daemon flags that make host `i` a member of the cluster.
    pub fn daemon_flags(&self, i: usize) -> Vec<String> {
        let mut flags: Vec<String> = [
            "--store".to_string(),
            self.etcd_endpoint(),
            "--etcd-prefix".into(),
            self.prefix.clone(),
            "--host-id".into(),
            self.host_id(i),
            "--advertise-address".into(),
            self.addr(i),
            "--host-lease-ttl".into(),
            self.opts.lease_ttl.to_string(),
            "--host-gone-grace".into(),
            self.opts.gone_grace.to_string(),
        ]
        .into();
        if let Some(tls) = &self.opts.etcd_tls {
            flags.extend(tls.daemon_flags());
        }
        flags
    }

    /// Starts host `i`'s daemon as a cluster member (advertising its current underlay address)
    /// and waits until it answers.
    pub fn start(&self, i: usize) {
        let flags = self.daemon_flags(i);
        self.host(i).start_with(|cmd| {
            cmd.args(&flags);
        });
    }

    /// SIGKILL of host `i`'s daemon, as a crash: its sandboxes and kernel state stay.
    pub fn kill(&self, i: usize) {
        self.host(i).kill();
    }

    /// SIGTERM of host `i`'s daemon; asserts a clean exit.
    pub fn stop(&self, i: usize) {
        self.host(i).stop();
    }

    /// Moves host `i` to another underlay address (its daemon should be down: the next
    /// `start` advertises the new one).
    pub fn set_addr(&self, i: usize, addr: &str) {
        let ns = self.host(i).netns.clone();
        run_ok("ip", &["-n", &ns, "addr", "flush", "dev", "ul0"]);
        run_ok(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "ul0",
            ],
        );
        // Flushing the address took the default route with it.
        run_ok(
            "ip",
            &["-n", &ns, "route", "replace", "default", "via", UNDERLAY_GW],
        );
        self.addrs.lock().unwrap()[i - 1] = addr.to_string();
    }

    /// Cuts host `i` off from etcd (and only etcd): its packets to etcd's client port are
    /// answered with a TCP reset, so its connections fail at their next packet and new ones
    /// are refused, rather than hanging.
    pub fn block_etcd(&self, i: usize) {
        let ns = self.host(i).netns.clone();
        let rules = format!(
            "table inet berth-e2e-block {{\n\
               chain out {{\n\
                 type filter hook output priority 0; policy accept;\n\
                 ip daddr {UNDERLAY_GW} tcp dport 2379 reject with tcp reset\n\
               }}\n\
             }}\n"
        );
        let path = self.dir.join(format!("block-{i}.nft"));
        std::fs::write(&path, rules).unwrap();
        run_ok(
            "nsenter",
            &[
                &format!("--net=/run/netns/{ns}"),
                "nft",
                "-f",
                path.to_str().unwrap(),
            ],
        );
    }

    /// Undoes `block_etcd`.
    pub fn unblock_etcd(&self, i: usize) {
        let ns = self.host(i).netns.clone();
        run_ok(
            "nsenter",
            &[
                &format!("--net=/run/netns/{ns}"),
                "nft",
                "delete",
                "table",
                "inet",
                "berth-e2e-block",
            ],
        );
    }

    /// Host `i`'s established TCP connections to etcd.
    pub fn etcd_connections(&self, i: usize) -> usize {
        let ns = self.host(i).netns.clone();
        run_ok(
            "ss",
            &[
                "-N",
                &ns,
                "-Htn",
                "state",
                "established",
                "dst",
                ETCD_CLIENT,
            ],
        )
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    }

    /// Runs a command in host `i`'s namespace (not a sandbox's); its output.
    pub fn in_host(&self, i: usize, cmd: &[&str]) -> Output {
        let h = self.host(i);
        h.in_netns(Path::new(&h.netns_path()), cmd)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Daemons first (dropping a host kills its daemon and removes its namespace, which
        // takes its end of the underlay veth along), then etcd, then the underlay.
        for h in &self.hosts {
            h.kill();
        }
        if let Some(mut etcd) = self.etcd.lock().unwrap().take() {
            let pid = nix::unistd::Pid::from_raw(etcd.id() as i32);
            // Continued first, so that nothing is left stopped whatever happens next.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        if std::thread::panicking() {
            let log = self.etcd_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- etcd log of {} (last {} lines) ---",
                self.underlay,
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        self.hosts.clear();
        let _ = run("ip", &["netns", "del", &self.underlay]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One entry of a VXLAN device's forwarding database.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FdbEntry {
    pub mac: String,
    /// The remote VTEP, for entries the device itself holds (`self`); none for the bridge's.
    pub dst: Option<String>,
}

/// Every FDB entry of `dev` in host `h`'s namespace (`bridge -j fdb show dev DEV`), the
/// bridge's own (`master`) entries included.
pub fn fdb_all(h: &Host, dev: &str) -> Vec<FdbEntry> {
    let out = run_ok("bridge", &["-n", &h.netns, "-j", "fdb", "show", "dev", dev]);
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
        .unwrap_or_else(|e| panic!("bridge -j fdb show: {e}: {out}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| FdbEntry {
            mac: e["mac"].as_str().unwrap().to_ascii_lowercase(),
            dst: e["dst"].as_str().map(canonical_ip),
        })
        .collect()
}

/// The FDB entries of `dev` that send to a remote VTEP: sorted `(mac, dst)`.
pub fn fdb(h: &Host, dev: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = fdb_all(h, dev)
        .into_iter()
        .filter_map(|e| Some((e.mac, e.dst?)))
        .collect();
    v.sort();
    v
}

/// The neighbour entries of `dev` in host `h`'s namespace that have a link-layer address:
/// sorted `(ip, mac)`, addresses in canonical form.
pub fn neigh(h: &Host, dev: &str) -> Vec<(String, String)> {
    let out = run_ok("ip", &["-n", &h.netns, "-j", "neigh", "show", "dev", dev]);
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
        .unwrap_or_else(|e| panic!("ip -j neigh show: {e}: {out}"));
    let mut v: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                canonical_ip(e["dst"].as_str()?),
                e["lladdr"].as_str()?.to_ascii_lowercase(),
            ))
        })
        .collect();
    v.sort();
    v
}

/// `ip -j -d link show` of host `h`'s links (all of them, or of one type).
pub fn links(h: &Host, kind: Option<&str>) -> Vec<Value> {
    let mut args = vec!["-n", h.netns.as_str(), "-j", "-d", "link", "show"];
    if let Some(kind) = kind {
        args.extend_from_slice(&["type", kind]);
    }
    let out = run_ok("ip", &args);
    let v: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
        .unwrap_or_else(|e| panic!("ip -j link show: {e}: {out}"));
    v.as_array().unwrap().clone()
}

/// One link of host `h` (`ip -j -d link show dev DEV`), if it exists.
pub fn link(h: &Host, dev: &str) -> Option<Value> {
    let o = run(
        "ip",
        &["-n", &h.netns, "-j", "-d", "link", "show", "dev", dev],
    );
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?.first().cloned()
}

/// The VXLAN device of host `h` with network identifier `vni`, if there is one.
pub fn vxlan_with_vni(h: &Host, vni: u64) -> Option<Value> {
    links(h, Some("vxlan"))
        .into_iter()
        .find(|l| l["linkinfo"]["info_data"]["id"].as_u64() == Some(vni))
}

/// An address in its canonical text form (IPv6 compressed, lower case).
pub fn canonical_ip(s: &str) -> String {
    s.parse::<std::net::IpAddr>()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// Polls `check` every 50 ms until it passes; panics with its last complaint after `within`.
pub fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) => assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting until {what}: {why}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
