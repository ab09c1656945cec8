//! Test hosts: each is a private network namespace with its own berth daemon (own state, run
//! and netns directories), so tests never touch the machine's network and run side by side.
//! Dropping a host, also while a test panics, kills its daemon and removes every namespace,
//! mount and file it made.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use berth_api::Client;
use serde_json::Value;

pub const BERTH: &str = env!("CARGO_BIN_EXE_berth");
pub const BERTH_CNI: &str = env!("CARGO_BIN_EXE_berth-cni");
pub const CNI_PLUGINS: &str = "/usr/lib/cni";
static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A busybox root filesystem with the applets the tests use, packed as `<dir>/img.tar` for a
/// container engine to import (there is no registry here).
pub fn busybox_tarball(dir: &Path) -> PathBuf {
    let bin = dir.join("img/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "ip", "ping", "sleep", "cat", "nslookup"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let tarball = dir.join("img.tar");
    run_ok(
        "tar",
        &[
            "-C",
            dir.join("img").to_str().unwrap(),
            "-cf",
            tarball.to_str().unwrap(),
            ".",
        ],
    );
    tarball
}

pub struct Host {
    pub netns: String,
    pub dir: PathBuf,
    /// Locked poisoned or not: a test that panics while starting the daemon must still have
    /// it killed on drop.
    daemon: std::sync::Mutex<Option<Child>>,
}

impl Host {
    /// A host namespace with `lo` up and a running daemon.
    pub fn new() -> Host {
        let h = Host::bare();
        h.start();
        h
    }

    /// A host namespace without a daemon.
    pub fn bare() -> Host {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let netns = format!("berth-e2e-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&netns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok("ip", &["netns", "add", &netns]);
        let h = Host {
            netns,
            dir,
            daemon: Default::default(),
        };
        h.sh(&["ip", "link", "set", "lo", "up"]);
        h
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/berth.sock")
    }

    pub fn docker_plugin_socket(&self) -> PathBuf {
        self.dir.join("run/docker-plugin.sock")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket()).with_timeout(Duration::from_secs(30))
    }

    /// The daemon's upstream resolvers (none unless a test writes some).
    pub fn resolv_conf(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }

    /// Where the daemon writes sandboxes' resolv.conf (instead of /etc/netns).
    pub fn sandbox_etc_dir(&self) -> PathBuf {
        self.dir.join("etc-netns")
    }

    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// The daemon's state directory (`start` uses it).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The command that runs this host's daemon on the state directory `state`, logging to
    /// the host's daemon log, for a test to add flags or environment to. `nsenter` is named
    /// by its full path, so a test may give the daemon a `PATH` of its own.
    pub fn daemon_command(&self, state: &str) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let nsenter = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join("nsenter"))
            .find(|p| p.exists())
            .expect("nsenter on PATH");
        let mut cmd = Command::new(nsenter);
        cmd.arg(format!("--net={}", self.netns_path()))
            .arg(BERTH)
            .args(["daemon", "--log-level", "debug", "--state-dir"])
            .arg(self.dir.join(state))
            .arg("--run-dir")
            .arg(self.dir.join("run"))
            .arg("--netns-dir")
            .arg(self.dir.join("netns"))
            .arg("--docker-plugin-socket")
            .arg(self.docker_plugin_socket())
            .arg("--dns-resolv-conf")
            .arg(self.resolv_conf())
            .arg("--sandbox-etc-dir")
            .arg(self.sandbox_etc_dir())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    /// Starts a daemon in the background without waiting for it.
    pub fn spawn_daemon(&self, state: &str) -> Child {
        self.daemon_command(state).spawn().unwrap()
    }

    /// Starts the daemon and waits until it answers.
    pub fn start(&self) {
        self.start_with(|_| {});
    }

    /// Starts the daemon with `customize` applied to its command (flags, environment), and
    /// waits until it answers. It is the host's daemon: `kill`, `stop` and drop end it.
    pub fn start_with(&self, customize: impl FnOnce(&mut Command)) {
        let mut daemon = self
            .daemon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(daemon.is_none(), "daemon already running");
        let mut cmd = self.daemon_command("state");
        customize(&mut cmd);
        self.wait_ready(daemon.insert(cmd.spawn().unwrap()));
    }

    /// Waits until a daemon answers on this host's socket; panics with the log if `child`
    /// exits first or it takes over 30 s.
    pub fn wait_ready(&self, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client().get::<Value>("/v1/status").is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("daemon exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether this host has a daemon started by `start`/`start_with` and not yet ended by
    /// `kill`/`stop`.
    pub fn running(&self) -> bool {
        self.daemon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&self) {
        if let Some(mut d) = self
            .daemon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// Freezes the daemon (SIGSTOP), as a stalled process: its containers run on. `resume`,
    /// `kill` and drop work on a frozen daemon.
    pub fn pause(&self) {
        self.signal_daemon(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Undoes `pause` (SIGCONT).
    pub fn resume(&self) {
        self.signal_daemon(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal_daemon(&self, signal: nix::sys::signal::Signal) {
        let daemon = self
            .daemon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let d = daemon.as_ref().expect("a running daemon");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.id() as i32), signal).unwrap();
    }

    /// SIGTERM, as a service manager stops it.
    pub fn stop(&self) {
        if let Some(mut d) = self
            .daemon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            let status = d.wait().unwrap();
            assert!(
                status.success(),
                "daemon exit on SIGTERM: {status}\n{}",
                self.log()
            );
        }
    }

    /// The daemon's pid. `nsenter` execs the daemon in place, so the child is the daemon.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .expect("a running daemon")
            .id()
    }

    /// The daemon's resident memory in KiB (`VmRSS`).
    pub fn daemon_rss_kib(&self) -> u64 {
        let pid = self.daemon_pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.starts_with("Name:\tberth\n"),
            "pid {pid} is the daemon: {status}"
        );
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix(" kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"))
    }

    /// Waits up to 5 s for `cond`; for effects that are asynchronous by design.
    pub fn eventually(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs the CLI against this host's daemon.
    pub fn berth(&self, args: &[&str]) -> Output {
        Command::new(BERTH)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.berth(args);
        assert!(
            o.status.success(),
            "berth {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a CLI command that must fail; returns its one-line error.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.berth(args);
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        assert!(!o.status.success(), "berth {args:?} should have failed");
        assert_eq!(
            err.lines().count(),
            1,
            "one-line error expected, got: {err}"
        );
        assert!(err.starts_with("berth: error: "), "{err}");
        err
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs a command in the host namespace.
    pub fn sh(&self, cmd: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.netns.as_str()];
        a.extend_from_slice(cmd);
        run_ok("ip", &a)
    }

    pub fn sandbox_path(&self, sandbox: &str) -> PathBuf {
        self.dir.join("netns").join(sandbox)
    }

    /// Runs a command inside a sandbox (or any netns path).
    pub fn in_netns(&self, netns: &Path, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(cmd)
            .output()
            .unwrap()
    }

    /// Whether `sandbox` reaches `ip`: one echo a second for up to 3 s, because a peer whose
    /// neighbour entry is being re-probed (an address that just moved) answers only at the next
    /// probe, up to a second later.
    pub fn reaches(&self, sandbox: &str, ip: &str) -> bool {
        self.ping_args(sandbox, ip, &["-c1", "-w3"])
    }

    /// Whether `sandbox` gets no answer from `ip` within a second.
    pub fn cannot_reach(&self, sandbox: &str, ip: &str) -> bool {
        !self.ping_args(sandbox, ip, &["-c1", "-W1"])
    }

    fn ping_args(&self, sandbox: &str, ip: &str, args: &[&str]) -> bool {
        let mut cmd = vec!["ping", "-q"];
        cmd.extend_from_slice(args);
        cmd.push(ip);
        self.in_netns(&self.sandbox_path(sandbox), &cmd)
            .status
            .success()
    }

    /// Runs a CNI plugin (`berth-cni` by default, else one from /usr/lib/cni) inside the host
    /// namespace, as a runtime on this host would; returns (success, parsed stdout).
    pub fn cni(&self, plugin: &str, env: &[(&str, &str)], conf: &Value) -> (bool, Value) {
        use std::io::Write;
        let exe = if plugin == "berth-cni" {
            BERTH_CNI.to_string()
        } else {
            format!("{CNI_PLUGINS}/{plugin}")
        };
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .arg(&exe)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_PATH", CNI_PLUGINS)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!(
                    "{plugin} printed non-JSON ({e}): {stdout}\nstderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        (out.status.success(), parsed)
    }

    /// Link names in the host namespace.
    pub fn host_links(&self) -> Vec<String> {
        self.sh(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .collect()
    }

    /// Everything observable about the host: the daemon's state and the kernel's. Used to show
    /// that a rejected request changed nothing. What the kernel changes on its own is left
    /// out (see [`settled`]).
    pub fn snapshot(&self) -> String {
        settled(&self.snapshot_all())
    }

    fn snapshot_all(&self) -> String {
        let mut s = String::new();
        for what in [["network", "ls"], ["endpoint", "ls"], ["sandbox", "ls"]] {
            s += &self.json(&what).to_string();
        }
        for n in self.json(&["network", "ls"]).as_array().unwrap() {
            let name = n["name"].as_str().unwrap();
            s += &serde_json::to_string(
                &self
                    .client()
                    .get::<Value>(&format!("/v1/networks/{name}/allocations"))
                    .unwrap(),
            )
            .unwrap();
        }
        s += &self.sh(&["ip", "-o", "link", "show"]);
        s += &self.sh(&["ip", "-o", "addr", "show"]);
        for sb in self.json(&["sandbox", "ls"]).as_array().unwrap() {
            let p = sb["path"].as_str().unwrap();
            s += &String::from_utf8_lossy(
                &self
                    .in_netns(Path::new(p), &["ip", "-o", "addr", "show"])
                    .stdout,
            );
            s += &String::from_utf8_lossy(
                &self.in_netns(Path::new(p), &["ip", "route", "show"]).stdout,
            );
        }
        s
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- daemon log of {} ---\n{}", self.netns, self.log());
        }
        self.kill();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("netns")) {
            for e in entries.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = run("ip", &["netns", "del", &self.netns]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ip` output without what the kernel changes on its own after a change: IPv6 link-local
/// addresses (their DAD state changes a second after a link comes up), and links' carrier and
/// operational state, also as routes show it (`linkdown`): a new veth's carrier, and its
/// bridge's with it, is reported up to a second later. A link's being set up or down (`UP`)
/// is kept.
pub fn settled(ip_output: &str) -> String {
    ip_output
        .lines()
        .filter(|l| !l.contains(" fe80::"))
        .map(|l| {
            let l = l
                .replace("NO-CARRIER,", "")
                .replace(",LOWER_UP", "")
                .replace(" linkdown", "");
            match l.split_once(" state ") {
                Some((head, rest)) => {
                    format!("{head}{}", rest.find(' ').map_or("", |i| &rest[i..]))
                }
                None => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A process in a fresh network namespace of its own, like a container: attachable by
/// `/proc/PID/ns/net`. Killed on drop.
pub struct Container {
    child: Child,
}

impl Container {
    pub fn start() -> Container {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .spawn()
            .unwrap();
        let c = Container { child };
        // Wait until the child is inside its own namespace.
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(c.netns()).ok().is_none_or(|l| l == mine) {
            assert!(Instant::now() < deadline, "unshare did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        c
    }

    pub fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.child.id())
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A second host on the "underlay": a namespace joined to a test host by a veth, the host at
/// 192.0.2.1/24 (`under0`) and this one at 192.0.2.2/24. Deleted on drop.
pub struct Outside {
    pub netns: String,
}

pub const HOST_UNDERLAY_IP: &str = "192.0.2.1";
pub const OUTSIDE_IP: &str = "192.0.2.2";

impl Outside {
    pub fn new(h: &Host) -> Outside {
        let netns = format!("{}-out", h.netns);
        run_ok("ip", &["netns", "add", &netns]);
        let o = Outside { netns };
        run_ok(
            "ip",
            &[
                "-n", &h.netns, "link", "add", "under0", "type", "veth", "peer", "name", "eth0",
                "netns", &o.netns,
            ],
        );
        for (ns, dev, ip) in [
            (h.netns.as_str(), "under0", "192.0.2.1/24"),
            (o.netns.as_str(), "eth0", "192.0.2.2/24"),
        ] {
            run_ok("ip", &["-n", ns, "addr", "add", ip, "dev", dev]);
            run_ok("ip", &["-n", ns, "link", "set", dev, "up"]);
            run_ok("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        o
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns))
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

/// An endpoint's (API JSON) IPv4 or IPv6 address, without prefix length.
pub fn endpoint_ip(ep: &Value, v6: bool) -> String {
    ep["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().split('/').next().unwrap().to_string())
        .find(|i| i.contains(':') == v6)
        .unwrap()
}

/// Runs `f` on a short-lived thread inside the namespace at `path`; sockets made there belong
/// to that namespace for good.
pub fn in_ns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// A TCP and a UDP server on one port in a namespace, answering every client with the
/// address it sees the client at: that is how tests see NAT. Stopped on drop.
/// Threads serving a test until dropped: then `stop` is raised and they are joined.
pub struct ServerThreads {
    pub stop: Arc<AtomicBool>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for ServerThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct PeerEcho {
    /// Held for its drop, which stops the threads.
    _serving: ServerThreads,
}

impl PeerEcho {
    pub fn start(netns: &Path, port: u16) -> PeerEcho {
        use std::io::Write;
        let (tcp, udp) = in_ns(netns, || {
            (
                std::net::TcpListener::bind(("::", port)).unwrap(),
                std::net::UdpSocket::bind(("::", port)).unwrap(),
            )
        });
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s1 = stop.clone();
        let t1 = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.write_all(peer_ip(peer).as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let s2 = stop.clone();
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(peer_ip(peer).as_bytes(), peer);
                }
            }
        });
        PeerEcho {
            _serving: ServerThreads {
                stop,
                threads: vec![t1, t2],
            },
        }
    }
}

/// The client's address as a dual-stack server sees it, IPv4 unmapped.
fn peer_ip(peer: std::net::SocketAddr) -> String {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| v4.to_string())
            .unwrap_or_else(|| v6.to_string()),
        ip => ip.to_string(),
    }
}

/// Connects from the namespace at `from` to `to` over TCP; the address the server saw us at.
pub fn tcp_peer(from: &Path, to: &str) -> Option<String> {
    use std::io::Read;
    let addr: std::net::SocketAddr = to.parse().unwrap();
    let stream = in_ns(from, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    });
    let mut stream = stream.ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut s = String::new();
    stream.read_to_string(&mut s).ok()?;
    Some(s)
}

/// Whether a TCP connection from the namespace at `from` to `to` is accepted.
pub fn tcp_connects(from: &Path, to: &str) -> bool {
    let addr: std::net::SocketAddr = to.parse().unwrap();
    in_ns(from, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
    })
    .is_ok()
}

/// A busybox container's command serving TCP port 7000.
pub const HTTPD_ON_7000: &[&str] = &["/bin/busybox", "httpd", "-f", "-p", "7000", "-h", "/"];

/// Checks that a container `run` starts with a published `host_port` answers on it from
/// another host, and that after `remove` nothing answers there any more.
pub fn published_until_removed(
    h: &Host,
    host_port: u16,
    run: impl FnOnce(),
    remove: impl FnOnce(),
) {
    let out = Outside::new(h);
    run();
    let published = format!("{HOST_UNDERLAY_IP}:{host_port}");
    h.eventually("the published port answers from another host", || {
        tcp_connects(&out.path(), &published)
    });
    remove();
    assert!(
        !tcp_connects(&out.path(), &published),
        "unpublished with the container"
    );
}

/// Sends a UDP datagram from the namespace at `from` to `to`; the address the server saw us
/// at, if an answer came.
pub fn udp_peer(from: &Path, to: &str) -> Option<String> {
    let addr: std::net::SocketAddr = to.parse().unwrap();
    let any = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = in_ns(from, || std::net::UdpSocket::bind(any).unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    // A few tries: the first datagram may wait for neighbour resolution.
    for _ in 0..4 {
        sock.send_to(b"?", addr).ok()?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}
