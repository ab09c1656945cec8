//! What users and attackers found (issue 20): an attach that took over a host's own
//! namespace, a daemon guard any local user could take, a store and sockets open to every
//! user, and clients that held every connection and descriptor of the API.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Host, settled};
use crate::plugin_fuzz::post;

/// Starts the host's daemon with `args` under umask 000, the widest there is.
fn start_under_umask_000(h: &Host, args: &[&str]) {
    h.start_with(|cmd| {
        cmd.args(args);
        // SAFETY: umask is async-signal-safe, and the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::stat::umask(nix::sys::stat::Mode::empty());
                Ok(())
            });
        }
    });
}

/// Runs `cmd` as `uid`/`gid`, with supplementary groups `groups` (none if empty).
fn as_user(uid: u32, gid: u32, groups: &str, cmd: &[&str]) -> Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!("--groups={groups}")
    };
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &groups,
        ])
        .arg("--")
        .args(cmd)
        .output()
        .unwrap()
}

/// A GET of the API, or a POST to the plugin, by `curl` as `uid`/`gid`: `None` when it cannot
/// even connect, else the status and body.
fn curl_as(uid: u32, gid: u32, groups: &str, socket: &Path, path: &str) -> Option<(u16, Value)> {
    let socket = socket.to_str().unwrap();
    let url = format!("http://berth{path}");
    let mut cmd = vec![
        "curl",
        "-s",
        "--unix-socket",
        socket,
        "-w",
        "\n%{http_code}",
    ];
    if path.starts_with("/Plugin") {
        cmd.extend(["-X", "POST"]);
    }
    cmd.push(&url);
    let out = as_user(uid, gid, groups, &cmd);
    if out.status.code() == Some(7) {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    Some((
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    ))
}

fn mode(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (m.permissions().mode() & 0o7777, m.gid())
}

/// Everything about a host namespace an attach could change: links, addresses, routes.
fn kernel_of(h: &Host) -> String {
    settled(
        &["link", "addr", "route"]
            .iter()
            .map(|what| h.sh(&["ip", "-o", what, "show"]))
            .chain([h.sh(&["ip", "-6", "route", "show"])])
            .collect::<String>(),
    )
}

/// An attach, a CNI ADD and a Docker Join into the daemon's own namespace (by its path and by
/// /proc/PID), the machine's (PID 1's) or another test host's are refused with a 400, CNI
/// code 4 and a one-line CLI error, and change nothing: the host keeps its routes (here a
/// default route as the report's host had), no address is taken, no link or record made.
#[test]
fn an_attach_never_lands_in_a_hosts_namespace() {
    let h = Host::new();
    let other = Host::new();
    h.sh(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
    ]);
    h.sh(&["ip", "addr", "add", "192.168.78.2/24", "dev", "up0"]);
    h.sh(&["ip", "link", "set", "up0", "up"]);
    h.sh(&["ip", "route", "add", "default", "via", "192.168.78.1"]);
    h.ok(&["network", "create", "blue", "--subnet", "10.78.7.0/24"]);
    // The Docker side: a network and an endpoint the engine is about to join.
    let plugin = |method: &str, body: Value| {
        let (status, answer) = post(&h, method, body.to_string().as_bytes());
        (status, serde_json::from_slice::<Value>(&answer).unwrap())
    };
    let (_, pool) = plugin(
        "IpamDriver.RequestPool",
        json!({"AddressSpace": "berth-local", "Pool": "10.78.8.0/24", "SubPool": "", "Options": {}, "V6": false}),
    );
    let pool = pool["PoolID"].as_str().unwrap().to_string();
    let (_, gw) = plugin(
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool, "Address": "",
               "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
    );
    let (status, _) = plugin(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n1", "Options": {"com.docker.network.generic": {}},
               "IPv4Data": [{"AddressSpace": "berth-local", "Pool": "10.78.8.0/24",
                             "Gateway": gw["Address"]}], "IPv6Data": []}),
    );
    assert_eq!(status, 200);
    let (status, _) = plugin(
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e1",
               "Interface": {"Address": "10.78.8.5/24", "AddressIPv6": "", "MacAddress": ""},
               "Options": {}}),
    );
    assert_eq!(status, 200);
    // CreateEndpoint makes the endpoint's veth in the background.
    h.eventually("the Docker endpoint's veth is made", || {
        h.host_links()
            .iter()
            .any(|l| l.starts_with("berth") && !l.starts_with("berth-"))
    });

    let before = (h.snapshot(), kernel_of(&h), kernel_of(&other));
    let own_by_pid = format!("/proc/{}/ns/net", h.daemon_pid());
    let pid1_readable = std::fs::File::open("/proc/1/ns/net").is_ok();
    for path in [
        own_by_pid.as_str(),
        &h.netns_path(),
        &other.netns_path(),
        "/proc/1/ns/net",
    ] {
        // Where this machine lets no one open PID 1's namespace (PID 1 in another user
        // namespace), that is the refusal; the initial namespace is also told by its inode.
        let host_refusal = |msg: &str| {
            msg.contains("is a host's network namespace, not a container's")
                || (path == "/proc/1/ns/net"
                    && !pid1_readable
                    && msg.contains("not a usable network namespace"))
        };
        let err = h.fails(&["attach", path, "--network", "blue"]);
        assert!(host_refusal(&err), "{path}: {err}");
        match h.client().post::<_, Value>(
            "/v1/endpoints",
            &json!({"network": "blue", "sandbox": path, "ifname": "eth9"}),
        ) {
            Err(berth_api::ClientError::Api { status, message }) => {
                assert_eq!(status, 400, "{path}: {message}");
                assert!(host_refusal(&message), "{path}: {message}");
            }
            other => panic!("{path}: {other:?}"),
        }
        // CNI: the network named by the configuration does not exist, and is not made.
        let conf = json!({"cniVersion": "1.0.0", "name": "cnet", "type": "berth-cni",
                          "socket": h.socket(), "subnet": "10.78.9.0/24"});
        let (ok, out) = h.cni(
            "berth-cni",
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", path),
                ("CNI_IFNAME", "eth9"),
            ],
            &conf,
        );
        assert!(!ok, "{path}: {out}");
        assert_eq!(out["code"], 4, "{path}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains("CNI_NETNS"), "{msg}");
        if path != "/proc/1/ns/net" || pid1_readable {
            assert!(msg.contains("host's network namespace"), "{msg}");
        }
        // The engine moves the interface itself: berth checks a key it can open.
        if path != "/proc/1/ns/net" || pid1_readable {
            let (status, answer) = plugin(
                "NetworkDriver.Join",
                json!({"NetworkID": "n1", "EndpointID": "e1", "SandboxKey": path}),
            );
            assert_eq!(status, 400, "{path}: {answer}");
            let err = answer["Err"].as_str().unwrap();
            assert!(host_refusal(err), "{err}");
        }
        assert_eq!(
            (h.snapshot(), kernel_of(&h), kernel_of(&other)),
            before,
            "{path}: changed something"
        );
    }
    // A container's namespace is attached as ever, and the engine's endpoint joins one.
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["attach", "web", "--network", "blue"]);
    let (status, answer) = plugin(
        "NetworkDriver.Join",
        json!({"NetworkID": "n1", "EndpointID": "e1", "SandboxKey": "/var/run/docker/netns/x"}),
    );
    assert_eq!(status, 200, "{answer}");
}

/// A process that holds the abstract socket name berth's guard used to be, as nobody, in a
/// namespace. Killed on drop.
struct Squatter(Child);

impl Squatter {
    fn bind(netns: &str) -> Squatter {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "perl",
            ])
            .args([
                "-MSocket",
                "-e",
                r#"socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
                   bind($s, pack_sockaddr_un("\0berth-daemon")) or die "bind: $!";
                   listen($s, 5) or die "listen: $!"; $| = 1; print "bound\n"; sleep 600"#,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 6];
        child.stdout.take().unwrap().read_exact(&mut line).unwrap();
        assert_eq!(&line, b"bound\n");
        Squatter(child)
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An unprivileged user who binds the old guard's name first does not keep the daemon from
/// starting, cannot read or take its lock, and cannot use the API or the plugin socket: not
/// through the files (root's, 0600/0700, even under umask 000), and not when an admin opens
/// them up either (the credentials it connects with are checked: 403). Root can.
#[test]
fn unprivileged_users_neither_block_the_daemon_nor_use_it() {
    let h = Host::bare();
    let _squatter = Squatter::bind(&h.netns_path());
    start_under_umask_000(&h, &[]);
    let (api, plugin) = (h.socket(), h.docker_plugin_socket());
    for (path, want) in [
        (h.state_dir(), 0o700),
        (h.state_dir().join("berth.redb"), 0o600),
        (h.dir.join("run"), 0o700),
        (api.clone(), 0o600),
        (plugin.clone(), 0o600),
        (Path::new("/run/lock/berth").to_path_buf(), 0o700),
    ] {
        assert_eq!(mode(&path).0, want, "mode of {path:?}");
    }
    let lock = std::fs::read_dir("/run/lock/berth")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|pid| pid == h.daemon_pid().to_string()))
        .expect("the daemon's lock file");
    let cat = as_user(65534, 65534, "", &["cat", lock.to_str().unwrap()]);
    assert!(!cat.status.success(), "nobody reads the daemon's lock");

    assert_eq!(curl_as(65534, 65534, "", &api, "/v1/status"), None);
    assert_eq!(curl_as(65534, 65534, "", &plugin, "/Plugin.Activate"), None);
    // Opened up by hand: the files no longer stop anyone, the credentials check does.
    for (path, wide) in [
        (h.dir.join("run"), 0o755),
        (api.clone(), 0o666),
        (plugin.clone(), 0o666),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wide)).unwrap();
    }
    let (status, body) = curl_as(65534, 65534, "", &api, "/v1/status").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("permission denied: uid 65534 may not use the berth API"),
        "{body}"
    );
    let (status, body) = curl_as(65534, 65534, "", &plugin, "/Plugin.Activate").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body["Err"].as_str().unwrap().contains("permission denied"),
        "{body}"
    );
    assert_eq!(
        curl_as(0, 0, "", &api, "/v1/status").map(|(s, _)| s),
        Some(200)
    );
    assert_eq!(
        curl_as(0, 0, "", &plugin, "/Plugin.Activate").map(|(s, _)| s),
        Some(200)
    );
    assert!(h.json(&["network", "ls"]).as_array().unwrap().is_empty());
}

/// With `--socket-group nogroup`, the sockets are that group's (0660, run directory 0710, also
/// under umask 000) and its members use them, by primary or supplementary group; others
/// cannot connect, or get a 403 where the files let them.
#[test]
fn a_socket_group_uses_the_sockets_and_no_one_else() {
    let h = Host::bare();
    start_under_umask_000(&h, &["--socket-group", "nogroup"]);
    let nogroup: u32 = 65534;
    let (api, plugin) = (h.socket(), h.docker_plugin_socket());
    assert_eq!(mode(&h.dir.join("run")), (0o710, nogroup));
    assert_eq!(mode(&api), (0o660, nogroup));
    assert_eq!(mode(&plugin), (0o660, nogroup));
    for (gid, groups) in [(nogroup, ""), (4242, "65534")] {
        let status =
            |socket: &Path, path: &str| curl_as(4242, gid, groups, socket, path).map(|(s, _)| s);
        assert_eq!(status(&api, "/v1/status"), Some(200), "gid {gid} +{groups}");
        assert_eq!(status(&plugin, "/Plugin.Activate"), Some(200));
    }
    assert_eq!(curl_as(4242, 4242, "", &api, "/v1/status"), None);
    std::fs::set_permissions(&api, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(h.dir.join("run"), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (status, body) = curl_as(4242, 4242, "", &api, "/v1/status").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .ends_with("only root and members of group nogroup may"),
        "{body}"
    );
}

/// A client connection the test holds open: idle, or stopped in the middle of its request.
fn open_client(socket: &Path, i: usize) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let partial: &[u8] = match i % 3 {
        0 => b"",
        1 => b"GET /v1/status HTTP/1.1\r\nHost: berth\r\n",
        _ => b"POST /v1/networks HTTP/1.1\r\nHost: berth\r\nContent-Length: 100\r\n\r\n{\"na",
    };
    s.write_all(partial).unwrap();
    s
}

/// Whether the daemon closes `s` within `by`, and what it sent before (an answer of its own,
/// or none).
fn closed_by(s: &mut UnixStream, by: Instant) -> (bool, Vec<u8>) {
    let (mut read, mut buf) = (Vec::new(), [0u8; 64 * 1024]);
    loop {
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (false, read);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (true, read),
            Ok(n) => read.extend_from_slice(&buf[..n]),
            // Closed with some of what the client sent unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (true, read),
            Err(_) => return (false, read),
        }
    }
}

/// Clients that connect and send nothing, half a head or half a body, 1,400 of them on a
/// daemon allowed 1,024 open files, neither keep a new client from being answered at once nor
/// keep the daemon from its own work (a network: netlink and nftables; an attach), and are
/// closed after the client timeout; so is a client that never reads its answers.
#[test]
fn idle_and_half_sent_clients_neither_starve_the_api_nor_the_daemon() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let timeout = Duration::from_secs(3);
    let h = Host::bare();
    h.start_with(|cmd| {
        cmd.args(["--client-timeout-ms", "3000"]);
        // SAFETY: setrlimit is async-signal-safe, and the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                setrlimit(Resource::RLIMIT_NOFILE, 1024, 1024).map_err(std::io::Error::from)
            });
        }
    });
    let (api, plugin) = (h.socket(), h.docker_plugin_socket());
    let mut held: Vec<UnixStream> = (0..1100).map(|i| open_client(&api, i)).collect();
    held.extend((0..300).map(|i| open_client(&plugin, i)));
    let flooded = Instant::now();

    // A client that asks 3,000 times without reading: its answers fill the socket.
    let mut greedy = UnixStream::connect(&api).unwrap();
    greedy
        .write_all(&b"GET /v1/status HTTP/1.1\r\nHost: berth\r\n\r\n".repeat(3000))
        .unwrap();
    let stalled = Instant::now();

    let c = h.client().with_timeout(Duration::from_secs(2));
    c.get::<Value>("/v1/status")
        .expect("a new client is answered");
    let started = Instant::now();
    c.post::<_, Value>(
        "/v1/networks",
        &json!({"name": "blue", "subnet": "10.79.0.0/24"}),
    )
    .expect("the daemon makes a network (netlink, nftables, the store)");
    c.post::<_, Value>("/v1/sandboxes", &json!({"name": "web"}))
        .unwrap();
    c.post::<_, Value>(
        "/v1/endpoints",
        &json!({"network": "blue", "sandbox": "web"}),
    )
    .unwrap();
    eprintln!(
        "network, sandbox and attach under the flood: {:?}",
        started.elapsed()
    );
    assert_eq!(post(&h, "Plugin.Activate", b"").0, 200);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", h.daemon_pid()))
        .unwrap()
        .count();
    eprintln!("daemon descriptors with 1,400 clients: {fds}");
    assert!(
        fds < 768,
        "{fds} descriptors: the caps keep half of 1024 for the daemon"
    );

    let deadline = flooded + timeout + Duration::from_secs(3);
    let open = held
        .iter_mut()
        .map(|s| closed_by(s, deadline).0)
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 0, "clients still connected after the timeout");
    // Read only once the daemon gave up writing: reading earlier would let it go on.
    std::thread::sleep(
        (stalled + timeout + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    let (closed, answers) = closed_by(&mut greedy, Instant::now() + Duration::from_secs(3));
    let answered = answers
        .windows(15)
        .filter(|w| w == b"HTTP/1.1 200 OK")
        .count();
    assert!(
        closed && answered < 3000,
        "closed {closed}, {answered} answers"
    );
    assert!(!h.log().contains("Too many open files"), "{}", h.log());
}
