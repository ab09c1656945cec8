//! The real Docker engine (Debian's docker.io 20.10) using berth as its network and IPAM
//! driver. dockerd runs inside the test's host namespace with its own data and exec roots,
//! no bridge and no iptables, and finds berth through a plugin spec file with a name of its
//! own, removed again at the end.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{HTTPD_ON_7000, Host, ServerThreads, published_until_removed};
use crate::podman::Podman;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A dockerd in a test host's namespace (own roots, no bridge, no iptables) that finds berth's
/// plugin socket by a spec file of its own name, removed at the end.
pub(crate) struct Docker<'h> {
    host: &'h Host,
    dir: PathBuf,
    /// The plugin (and driver) name, unique per test.
    pub(crate) plugin: String,
    spec: PathBuf,
    dockerd: Option<Child>,
}

impl<'h> Docker<'h> {
    pub(crate) fn start(host: &'h Host) -> Self {
        let plugin = format!(
            "berthe2e{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = host.dir.join("docker");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all("/etc/docker/plugins").unwrap();
        let spec = PathBuf::from(format!("/etc/docker/plugins/{plugin}.spec"));
        std::fs::write(
            &spec,
            format!("unix://{}\n", host.docker_plugin_socket().display()),
        )
        .unwrap();
        let mut docker = Docker {
            host,
            dir,
            plugin,
            spec,
            dockerd: None,
        };
        docker.spawn_dockerd();
        let tarball = crate::harness::busybox_tarball(&docker.dir);
        docker.ok(&["import", tarball.to_str().unwrap(), "busybox:local"]);
        docker
    }

    /// Starts dockerd on this test's roots and waits until it answers.
    fn spawn_dockerd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let d = |s: &str| self.dir.join(s).display().to_string();
        self.dockerd = Some(
            Command::new("nsenter")
                .arg(format!("--net={}", self.host.netns_path()))
                .args(["dockerd", "--host", &format!("unix://{}", d("docker.sock"))])
                .args([
                    "--data-root",
                    &d("data"),
                    "--exec-root",
                    &d("exec"),
                    "--pidfile",
                    &d("docker.pid"),
                ])
                .args([
                    "--bridge",
                    "none",
                    "--iptables=false",
                    "--ip6tables=false",
                    "--storage-driver",
                    "vfs",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cmd(&["info"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, as a service manager stops it.
    fn stop_dockerd(&mut self) {
        if let Some(mut d) = self.dockerd.take() {
            let pid = nix::unistd::Pid::from_raw(d.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    fn restart(&mut self) {
        self.stop_dockerd();
        self.spawn_dockerd();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .args([
                "-H",
                &format!("unix://{}", self.dir.join("docker.sock").display()),
            ])
            .args(args)
            .output()
            .unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn fails(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(!o.status.success(), "docker {args:?} should have failed");
        String::from_utf8_lossy(&o.stderr).trim().to_string()
    }

    /// `docker network create -d PLUGIN --ipam-driver PLUGIN ARGS...`, which must succeed.
    fn create_net(&self, args: &[&str]) -> String {
        let p = self.plugin.clone();
        self.ok(&[&["network", "create", "-d", &p, "--ipam-driver", &p], args].concat())
    }

    /// The same, which must fail; the error.
    fn create_net_fails(&self, args: &[&str]) -> String {
        let p = self.plugin.clone();
        self.fails(&[&["network", "create", "-d", &p, "--ipam-driver", &p], args].concat())
    }

    fn ip(&self, container: &str, network: &str) -> String {
        self.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
            container,
        ])
    }

    fn pings(&self, container: &str, ip: &str) -> bool {
        self.cmd(&["exec", container, "ping", "-c1", "-W1", ip])
            .status
            .success()
    }
}

impl Drop for Docker<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- dockerd log ---\n{}", self.log());
        }
        let ids = String::from_utf8_lossy(&self.cmd(&["ps", "-aq"]).stdout).to_string();
        for id in ids.split_whitespace() {
            let _ = self.cmd(&["rm", "-f", id]);
        }
        self.stop_dockerd();
        // dockerd's own containerd and shims, should any outlive it: only processes whose
        // command line names this test's directory, by pid.
        let ours = self.dir.display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&ours) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        berth_dataplane::netns::unmount_below(&self.dir);
        let _ = std::fs::remove_file(&self.spec);
    }
}

#[test]
fn docker_containers_on_a_berth_network() {
    let h = Host::new();
    let d = Docker::start(&h);
    let id = d.create_net(&["--subnet", "10.93.0.0/24", "--gateway", "10.93.0.1", "net1"]);
    let berth_name = format!("docker-{}", &id[..12]);
    let net = h.json(&["network", "inspect", &berth_name]);
    assert_eq!(
        net["subnets"][0],
        json!({"cidr": "10.93.0.0/24", "gateway": "10.93.0.1"})
    );

    for c in ["c1", "c2"] {
        d.ok(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            "net1",
            "busybox:local",
            "sleep",
            "600",
        ]);
    }
    let (ip1, ip2) = (d.ip("c1", "net1"), d.ip("c2", "net1"));
    assert!(ip1.starts_with("10.93.0.") && ip2.starts_with("10.93.0.") && ip1 != ip2);
    assert!(d.pings("c1", &ip2) && d.pings("c2", &ip1));
    let route = d.ok(&["exec", "c1", "ip", "route"]);
    assert!(route.contains("default via 10.93.0.1"), "{route}");

    // A berth sandbox on the network Docker created reaches the containers.
    h.ok(&["sandbox", "create", "s1"]);
    h.ok(&["attach", "s1", "--network", &berth_name]);
    assert!(h.reaches("s1", &ip1));
    assert_eq!(h.json(&["endpoint", "ls"]).as_array().unwrap().len(), 3);

    // docker run -p: the engine's port map becomes a berth published port.
    published_until_removed(
        &h,
        8089,
        || {
            let run = [
                "run",
                "-d",
                "--name",
                "web",
                "--network",
                "net1",
                "-p",
                "8089:7000",
            ];
            d.ok(&[&run[..], &["busybox:local"], HTTPD_ON_7000].concat());
        },
        || {
            d.ok(&["rm", "-f", "web"]);
        },
    );

    // disconnect / connect
    d.ok(&["network", "disconnect", "net1", "c2"]);
    assert!(!d.pings("c1", &ip2));
    assert_eq!(h.json(&["endpoint", "ls"]).as_array().unwrap().len(), 2);
    d.ok(&["network", "connect", "net1", "c2"]);
    let ip2 = d.ip("c2", "net1");
    assert!(d.pings("c1", &ip2), "reconnected");

    // Restarting berth leaves the containers connected and Docker's calls working.
    h.stop();
    assert!(d.pings("c1", &ip2));
    h.start();
    d.ok(&[
        "run",
        "-d",
        "--name",
        "c3",
        "--network",
        "net1",
        "busybox:local",
        "sleep",
        "600",
    ]);
    assert!(d.pings("c3", &ip1));

    // Removing everything leaves no endpoint, address or interface.
    d.ok(&["rm", "-f", "c1", "c2", "c3"]);
    h.ok(&["sandbox", "rm", "s1"]);
    d.ok(&["network", "rm", "net1"]);
    assert!(h.json(&["network", "ls"]).as_array().unwrap().is_empty());
    assert!(h.json(&["endpoint", "ls"]).as_array().unwrap().is_empty());
    h.eventually("no link but lo is left", || h.host_links() == ["lo"]);
}

#[test]
fn docker_podman_and_a_sandbox_share_one_berth_network() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    let d = Docker::start(&h);
    let dnet = d.create_net(&[
        "--subnet",
        "10.91.0.0/24",
        "-o",
        "berth.network=blue",
        "dnet",
    ]);
    // The Docker network on it, by id (the engine does not tell drivers its name).
    assert_eq!(
        h.json(&["network", "inspect", "blue"])["docker_networks"],
        json!([dnet])
    );
    d.ok(&[
        "run",
        "-d",
        "--name",
        "dc",
        "--network",
        "dnet",
        "busybox:local",
        "sleep",
        "600",
    ]);
    let pm = Podman::new(&h, "blue", "10.91.0.0/24");
    pm.ok(&[
        "run",
        "-d",
        "--name",
        "pc",
        "--network",
        "blue",
        "localhost/busybox:local",
        "sleep",
        "600",
    ]);
    let pc_ip = pm.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.blue.IPAddress}}",
        "pc",
    ]);
    h.ok(&["sandbox", "create", "s1"]);
    let s1 = h.json(&["attach", "s1", "--network", "blue"]);
    let s1_ip = s1["ips"][0]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let dc_ip = d.ip("dc", "dnet");
    assert!(
        d.pings("dc", &pc_ip),
        "Docker container reaches the podman container"
    );
    assert!(
        d.pings("dc", &s1_ip),
        "Docker container reaches the berth sandbox"
    );
    assert!(h.reaches("s1", &dc_ip));
    let mut ips: Vec<String> = vec![dc_ip, pc_ip, s1_ip];
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "one IPAM for all three");

    // A bound network outlives the Docker network.
    d.ok(&["rm", "-f", "dc"]);
    d.ok(&["network", "rm", "dnet"]);
    assert_eq!(h.json(&["network", "inspect", "blue"])["name"], "blue");
    assert!(h.reaches("s1", "10.91.0.1"));
}

#[test]
fn docker_bad_requests_are_refused_and_change_nothing() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    let d = Docker::start(&h);
    let before = h.snapshot();
    let err = d.create_net_fails(&["--subnet", "10.91.0.0/16", "bad1"]);
    assert!(err.contains("overlaps 10.91.0.0/24"), "{err}");
    let err = d.create_net_fails(&[
        "--subnet",
        "10.94.0.0/24",
        "-o",
        "berth.network=nosuch",
        "bad2",
    ]);
    assert!(err.contains("no network named"), "{err}");
    let err = d.create_net_fails(&[
        "--subnet",
        "10.94.0.0/24",
        "--ip-range",
        "10.94.0.0/25",
        "bad3",
    ]);
    assert!(err.contains("ip-range"), "{err}");
    d.create_net(&["--subnet", "10.95.0.0/24", "good"]);
    let err = d.fails(&[
        "run",
        "--rm",
        "--network",
        "good",
        "--ip",
        "10.96.0.5",
        "busybox:local",
        "true",
    ]);
    assert!(!err.is_empty());
    d.ok(&["network", "rm", "good"]);
    h.eventually("everything is as before", || h.snapshot() == before);

    // The plugin socket itself: unknown methods are 404, malformed bodies get {"Err"}.
    let sock = h.docker_plugin_socket();
    let call = |path: &str, body: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&sock)
            .args([
                "-X",
                "POST",
                "--data",
                body,
                &format!("http://plugin{path}"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.to_string(),
            serde_json::from_str::<Value>(body).unwrap_or(Value::Null),
        )
    };
    let (code, v) = call("/Plugin.Activate", "");
    assert_eq!(
        (code.as_str(), v),
        (
            "200",
            json!({"Implements": ["NetworkDriver", "IpamDriver"]})
        )
    );
    let (code, v) = call("/NetworkDriver.Frobnicate", "{}");
    assert_eq!(code, "404");
    assert!(v["Err"].is_string());
    for (path, body) in [
        ("/IpamDriver.RequestPool", "{not json"),
        ("/NetworkDriver.CreateNetwork", r#"{"NetworkID": 5}"#),
        (
            "/NetworkDriver.Join",
            r#"{"NetworkID": "x", "EndpointID": "nosuch", "SandboxKey": "/x"}"#,
        ),
        (
            "/IpamDriver.RequestAddress",
            r#"{"PoolID": "nosuch", "Address": "", "Options": null}"#,
        ),
    ] {
        let (code, v) = call(path, body);
        assert_ne!(code, "200", "{path} {body}");
        assert!(
            v["Err"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {v}"
        );
    }
    assert_eq!(h.snapshot(), before);
}

#[test]
fn berth_ipam_serves_another_driver_and_ipv6() {
    let h = Host::new();
    // A parent interface for macvlan inside the test's host namespace.
    h.sh(&[
        "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
    ]);
    h.sh(&["ip", "link", "set", "uplink0", "up"]);
    h.sh(&["ip", "link", "set", "uplink1", "up"]);
    let d = Docker::start(&h);
    let p = d.plugin.clone();
    // Without a subnet berth carves a pool; with one, requested addresses work too.
    d.ok(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "-o",
        "parent=uplink0",
        "--ipam-driver",
        &p,
        "carved",
    ]);
    let carved = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        "carved",
    ]);
    assert_eq!(carved, "10.210.0.0/24", "from berth's default pool");
    d.ok(&["network", "rm", "carved"]);
    d.ok(&[
        "network",
        "create",
        "-d",
        "macvlan",
        "-o",
        "parent=uplink0",
        "--ipam-driver",
        &p,
        "--subnet",
        "10.99.0.0/24",
        "mv",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "m1",
        "--network",
        "mv",
        "busybox:local",
        "sleep",
        "600",
    ]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "m2",
        "--network",
        "mv",
        "--ip",
        "10.99.0.77",
        "busybox:local",
        "sleep",
        "600",
    ]);
    let (m1, m2) = (d.ip("m1", "mv"), d.ip("m2", "mv"));
    assert!(m1.starts_with("10.99.0.") && m1 != m2, "{m1}");
    assert_eq!(m2, "10.99.0.77");
    assert!(
        d.pings("m1", &m2),
        "macvlan containers with berth addresses talk"
    );
    // The pools are held: a berth network cannot take their subnets meanwhile.
    let err = h.fails(&["network", "create", "x", "--subnet", "10.99.0.0/24"]);
    assert!(err.contains("Docker IPAM pool"), "{err}");
    d.ok(&["rm", "-f", "m1", "m2"]);
    d.ok(&["network", "rm", "mv"]);
    h.ok(&["network", "create", "x", "--subnet", "10.99.0.0/24"]);

    // IPv6 on a berth network made by Docker.
    d.create_net(&[
        "--ipv6",
        "--subnet",
        "10.97.0.0/24",
        "--subnet",
        "fd00:97::/64",
        "v6net",
    ]);
    for c in ["v6a", "v6b"] {
        d.ok(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            "v6net",
            "busybox:local",
            "sleep",
            "600",
        ]);
    }
    let b6 = d.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.v6net.GlobalIPv6Address}}",
        "v6b",
    ]);
    assert!(b6.starts_with("fd00:97::"), "{b6}");
    assert!(d.pings("v6a", &b6), "IPv6 between Docker containers");
}

#[test]
fn dockerd_restart_keeps_networks_and_leaks_no_address() {
    let h = Host::new();
    let mut d = Docker::start(&h);
    let id = d.create_net(&["--subnet", "10.98.0.0/24", "net1"]);
    let berth_name = format!("docker-{}", &id[..12]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "c1",
        "--network",
        "net1",
        "busybox:local",
        "sleep",
        "600",
    ]);
    // Restart the engine: containers stop, the network stays.
    d.restart();
    assert!(
        d.ok(&["network", "ls", "--format", "{{.Name}}"])
            .lines()
            .any(|n| n == "net1")
    );
    assert_eq!(
        h.json(&["network", "inspect", &berth_name])["subnets"][0]["cidr"],
        "10.98.0.0/24"
    );
    d.ok(&["start", "c1"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "c2",
        "--network",
        "net1",
        "busybox:local",
        "sleep",
        "600",
    ]);
    assert!(d.pings("c2", &d.ip("c1", "net1")));
    d.ok(&["rm", "-f", "c1", "c2"]);
    h.eventually("only the gateway stays allocated", || {
        let a: Value = h
            .client()
            .get(&format!("/v1/networks/{berth_name}/allocations"))
            .unwrap();
        a.as_array().unwrap().len() == 1
    });
}

/// berth's plugin socket while berth is down, answering every call with an error at once:
/// the engine gives up on the same calls as when nothing listens, without its retries
/// (about 15 s per call, a minute per container).
struct PluginDown {
    /// Held for its drop, which stops the thread.
    _serving: ServerThreads,
}

impl PluginDown {
    fn serve(path: &Path) -> PluginDown {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => answer_berth_is_down(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        PluginDown {
            _serving: ServerThreads {
                stop,
                threads: vec![thread],
            },
        }
    }
}

/// Reads one HTTP request and answers it as a failed plugin call.
fn answer_berth_is_down(mut c: std::os::unix::net::UnixStream) {
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |req: &[u8]| {
        let text = String::from_utf8_lossy(req);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= length
    };
    while !complete(&req) {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = r#"{"Err":"berth is down"}"#;
    let _ = write!(
        c,
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The veth peers berth handed the engine that are in the host namespace.
fn peers_in_host(h: &Host) -> Vec<String> {
    let mut peers: Vec<String> = h
        .host_links()
        .into_iter()
        .filter(|l| l.starts_with("berthp"))
        .collect();
    peers.sort();
    peers
}

#[test]
fn docker_endpoints_of_containers_removed_while_berth_is_down_are_released() {
    let h = Host::new();
    let d = Docker::start(&h);
    let net = |name: &str, subnet: &str| {
        let id = d.create_net(&["--subnet", subnet, name]);
        (format!("docker-{}", &id[..12]), id)
    };
    let (b1, id1) = net("n1", "10.86.0.0/24");
    let (b2, _) = net("n2", "10.87.0.0/24");
    let (b3, _) = net("n3", "10.88.0.0/24");
    // The engine never tells its drivers a network's name: berth shows its Docker id.
    assert_eq!(
        h.json(&["network", "inspect", &b1])["docker_networks"],
        json!([id1])
    );
    for (c, n) in [("live", "n1"), ("c1", "n1"), ("c2", "n2")] {
        d.ok(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            n,
            "busybox:local",
            "sleep",
            "600",
        ]);
    }
    let endpoint_of = |ip: &str| {
        let eps = h.json(&["endpoint", "ls"]);
        let ep = eps.as_array().unwrap().iter().find(|e| {
            e["ips"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a.as_str().unwrap().starts_with(&format!("{ip}/")))
        });
        ep.unwrap()["id"].as_str().unwrap().to_string()
    };
    let (live_ip, c1_ip) = (d.ip("live", "n1"), d.ip("c1", "n1"));
    let (live_ep, c1_ep) = (endpoint_of(&live_ip), endpoint_of(&c1_ip));
    // A sandbox on a network made for Docker keeps it when Docker deletes its network.
    h.ok(&["sandbox", "create", "s1"]);
    h.ok(&["attach", "s1", "--network", &b3]);

    h.kill();
    {
        let _down = PluginDown::serve(&h.docker_plugin_socket());
        d.ok(&["rm", "-f", "c1", "c2"]);
    }
    let dead_peers = peers_in_host(&h);
    assert_eq!(dead_peers.len(), 2, "the engine moved the peers back");

    // Back with the default grace: the dead endpoints stay for now (a container between Join
    // and its namespace looks the same), and `check` tells them from the living.
    h.start();
    assert_eq!(h.json(&["endpoint", "ls"]).as_array().unwrap().len(), 4);
    let check = |ep: &str| -> Value {
        h.client()
            .get(&format!("/v1/endpoints/{ep}/check"))
            .unwrap()
    };
    let problems = check(&c1_ep)["problems"].to_string();
    assert!(problems.contains("the container is gone"), "{problems}");
    assert_eq!(check(&live_ep)["problems"], json!([]));

    // Deleting a Docker network releases what berth still has of it, and the berth network.
    d.ok(&["network", "rm", "n2"]);
    let names = |h: &Host| -> Vec<String> {
        let nets = h.json(&["network", "ls"]);
        let names = nets.as_array().unwrap().iter();
        names
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(!names(&h).contains(&b2), "{b2} is left");
    assert_eq!(peers_in_host(&h).len(), 1);
    // One whose berth network has a sandbox on it leaves that network to berth.
    d.ok(&["network", "rm", "n3"]);
    let n3 = h.json(&["network", "inspect", &b3]);
    assert!(n3.get("docker_networks").is_none(), "{n3}");
    h.ok(&["sandbox", "rm", "s1"]);
    h.ok(&["network", "rm", &b3]);

    // With a short grace, the sweep releases the other: endpoint, veth (the peer with it) and
    // address. The living container keeps its own.
    h.kill();
    h.start_with(|daemon| {
        daemon.args(["--docker-endpoint-grace", "1"]);
    });
    let held = || -> Vec<String> {
        let allocations: Value = h
            .client()
            .get(&format!("/v1/networks/{b1}/allocations"))
            .unwrap();
        let ips = allocations.as_array().unwrap().iter();
        let mut ips: Vec<String> = ips.map(|a| a["ip"].as_str().unwrap().into()).collect();
        ips.sort();
        ips
    };
    h.eventually("the dead endpoint is released", || {
        held() == ["10.86.0.1", live_ip.as_str()]
    });
    assert_eq!(h.json(&["endpoint", "ls"]).as_array().unwrap().len(), 1);
    assert!(peers_in_host(&h).is_empty());
    assert_eq!(check(&live_ep)["problems"], json!([]));
    assert!(d.pings("live", "10.86.0.1"));
    assert!(h.log().contains("Docker endpoint released"));

    d.ok(&["rm", "-f", "live"]);
    d.ok(&["network", "rm", "n1"]);
    h.eventually("nothing of berth's is left", || {
        names(&h).is_empty() && h.host_links() == ["lo"]
    });
}

#[test]
fn docker_driver_options_become_endpoint_labels() {
    let h = Host::new();
    let d = Docker::start(&h);
    let id = d.create_net(&["--subnet", "10.96.0.0/24", "lnet"]);
    let berth_name = format!("docker-{}", &id[..12]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "name=lnet,driver-opt=berth.label.app=web,driver-opt=berth.label.tier=front",
        "busybox:local",
        "sleep",
        "600",
    ]);
    let eps = h.json(&["endpoint", "ls", "--network", &berth_name]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0]["labels"], json!({"app": "web", "tier": "front"}));

    // `docker network connect --driver-opt` too.
    let id2 = d.create_net(&["--subnet", "10.96.1.0/24", "lnet2"]);
    d.ok(&[
        "network",
        "connect",
        "--driver-opt",
        "berth.label.role=cache",
        "lnet2",
        "web",
    ]);
    let eps2 = h.json(&[
        "endpoint",
        "ls",
        "--network",
        &format!("docker-{}", &id2[..12]),
    ]);
    assert_eq!(eps2[0]["labels"], json!({"role": "cache"}), "{eps2}");

    // A label Kubernetes' rules refuse: the engine gets the error, berth keeps nothing.
    let err = String::from_utf8_lossy(
        &d.cmd(&[
            "run",
            "-d",
            "--name",
            "bad",
            "--network",
            "name=lnet,driver-opt=berth.label.app=-web",
            "busybox:local",
            "sleep",
            "600",
        ])
        .stderr,
    )
    .to_string();
    assert!(err.contains("invalid label"), "{err}");
    let eps = h.json(&["endpoint", "ls", "--network", &berth_name]);
    assert_eq!(eps.as_array().unwrap().len(), 1, "{eps}");
}

/// Docker's containers are judged by policy like any endpoint: by the labels their driver
/// options give them, from their first packet (berth writes a container's elements at Join,
/// before the engine moves its interface in and brings it up).
#[test]
fn docker_containers_are_judged_by_policy() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.92.0.0/24"]);
    let d = Docker::start(&h);
    d.create_net(&[
        "--subnet",
        "10.92.0.0/24",
        "-o",
        "berth.network=blue",
        "dnet",
    ]);
    let run = |name: &str, app: &str| {
        d.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &format!("name=dnet,driver-opt=berth.label.app={app}"),
            "busybox:local",
            "sleep",
            "600",
        ]);
        d.ip(name, "dnet")
    };
    // Only app=web reaches the database sandbox.
    h.ok(&[
        "policy",
        "create",
        "db-from-web",
        "--network",
        "blue",
        "-l",
        "app=db",
        "--ingress",
        "from=app=web",
    ]);
    h.ok(&["sandbox", "create", "db"]);
    let db = h.json(&["attach", "db", "--network", "blue", "-l", "app=db"]);
    let db_ip = crate::harness::endpoint_ip(&db, false);
    let web_ip = run("web", "web");
    let other_ip = run("other", "other");
    assert!(d.pings("web", &db_ip), "app=web reaches the database");
    assert!(!d.pings("other", &db_ip), "app=other does not");

    // A policy that selects containers: they accept nothing, those running and those that
    // start after it alike; their own connections still go out, and their replies back.
    h.ok(&[
        "policy",
        "create",
        "web-closed",
        "--network",
        "blue",
        "-l",
        "app=web",
    ]);
    let web2_ip = run("web2", "web");
    for ip in [&web_ip, &web2_ip] {
        assert!(h.cannot_reach("db", ip), "{ip} accepts nothing");
    }
    assert!(d.pings("web2", &db_ip), "web2's own connections go out");
    h.ok(&["policy", "rm", "web-closed"]);
    assert!(h.reaches("db", &web2_ip));
    // The engine does not tell drivers a container's name: explain takes its address.
    let explained = h.json(&["policy", "explain", &other_ip, &db_ip]);
    assert_eq!(explained["allowed"], false, "{explained}");
    assert_eq!(explained["ingress"]["isolated_by"], json!(["db-from-web"]));
}
