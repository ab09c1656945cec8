//! The other real CNI client: Debian's containerd, driven by `ctr run --cni`, which runs CNI
//! ADD when it starts a container and never DEL when the container is removed.
//!
//! containerd runs inside the test's host namespace on its own root, state and socket, in a
//! mount namespace of its own; `ctr` runs in that mount namespace too, because it has no flag
//! or variable for its CNI directories: it reads `/etc/cni/net.d` and looks for plugins in
//! `/opt/cni/bin` and `/usr/lib/cni`, and caches results under `/var/lib/cni`. In that mount
//! namespace (and only there) `/etc/cni/net.d` is the test's configuration directory, `/opt`
//! holds `cni/bin/berth-cni`, and `/run` and `/var/lib/cni` are empty tmpfs, so neither
//! containerd, its shims and runc nor ctr write anything of the machine's. Dropping it, also
//! while a test panics, removes the containers, stops containerd and its shims, and with them
//! that mount namespace.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{BERTH_CNI, Host, busybox_tarball, endpoint_ip};

/// The newest CNI version containerd 1.6 (Debian 12) accepts; it rejects a 1.1.0 result
/// ("unsupported CNI result version") after the plugin has attached the container.
const CNI_VERSION: &str = "1.0.0";

/// Sets up the mount namespace and becomes containerd. `$1` is the test's containerd
/// directory, `$2` the berth-cni binary.
const START: &str = r#"set -e
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /opt
mkdir -p /opt/cni/bin
ln -s "$2" /opt/cni/bin/berth-cni
mount --bind "$1/net.d" /etc/cni/net.d
if [ -d /var/lib/cni ]; then mount -t tmpfs tmpfs /var/lib/cni; else mount -t tmpfs tmpfs /var/lib; fi
exec containerd --config "$1/config.toml"
"#;

pub struct Containerd<'h> {
    host: &'h Host,
    dir: PathBuf,
    daemon: Option<Child>,
}

impl<'h> Containerd<'h> {
    /// Starts containerd with one CNI network, `network` on berth with `subnet`.
    pub fn start(host: &'h Host, network: &str, subnet: &str) -> Self {
        assert!(
            Path::new("/etc/cni/net.d").is_dir(),
            "/etc/cni/net.d is missing (Debian's podman makes it); ctr reads only that directory"
        );
        let dir = host.dir.join("containerd");
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        // The containers' root filesystem: `dir/img`, busybox.
        busybox_tarball(&dir);
        let conflist = json!({
            "cniVersion": CNI_VERSION, "name": network,
            "plugins": [{"type": "berth-cni", "socket": host.socket(), "subnet": subnet}]
        });
        std::fs::write(
            dir.join(format!("net.d/10-{network}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
        let d = |s: &str| dir.join(s).display().to_string();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = \"{}\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\npath = \"{}\"\n",
                d("root"),
                d("state"),
                d("containerd.sock"),
                d("opt"),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let daemon = Command::new("nsenter")
            .arg(format!("--net={}", host.netns_path()))
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", START, "sh"])
            .arg(&dir)
            .arg(BERTH_CNI)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Containerd {
            host,
            dir,
            daemon: Some(daemon),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            let exited = c.daemon.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "containerd exited:\n{}", c.log());
            assert!(
                Instant::now() < deadline,
                "containerd did not start:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs ctr against this containerd, in its network and mount namespaces.
    fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.host.netns_path()));
        if let Some(d) = &self.daemon {
            // nsenter, unshare and sh exec each other: the child is containerd.
            cmd.arg(format!("--mount=/proc/{}/ns/mnt", d.id()));
        }
        cmd.arg("ctr")
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The pid of `id`'s task, if it has one.
    fn pid(&self, id: &str) -> Option<u32> {
        self.ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f[1].parse().unwrap())
        })
    }

    /// `ctr run --cni -d`: starts container `id` (a busybox sleeping) on the CNI network, whose
    /// ADD runs before its process starts. Its pid, or ctr's error.
    fn run(&self, id: &str) -> Result<u32, String> {
        let rootfs = self.dir.join("img").display().to_string();
        // A cgroup of its own, removed with the task; without one runc makes /default/ID and
        // leaves /default behind.
        let cgroup = format!("/{}-{id}", self.host.netns);
        let o = self.ctr(&[
            "run",
            "--cni",
            "-d",
            "--null-io",
            "--cgroup",
            &cgroup,
            "--rootfs",
            &rootfs,
            id,
            "/bin/sleep",
            "600",
        ]);
        if o.status.success() {
            Ok(self.pid(id).expect("a started task"))
        } else {
            Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
        }
    }

    /// Runs `cmd` inside container `id`.
    fn exec(&self, id: &str, cmd: &[&str]) -> Output {
        static EXEC: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let exec_id = format!(
            "exec{}",
            EXEC.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let args = [&["task", "exec", "--exec-id", &exec_id, id][..], cmd].concat();
        self.ctr(&args)
    }

    fn pings(&self, id: &str, ip: &str) -> bool {
        self.exec(id, &["/bin/ping", "-c1", "-w3", ip])
            .status
            .success()
    }

    /// Removes container `id` as a user of ctr does: kill its task, delete the task and the
    /// container. containerd runs no CNI DEL for any of it.
    fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "--signal", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The task can be deleted once it has stopped.
        while self.pid(id).is_some() && !self.ctr(&["task", "rm", id]).status.success() {
            assert!(Instant::now() < deadline, "task {id} did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ok(&["container", "rm", id]);
    }

    /// Pids of the processes (containerd's shims) still running for this containerd.
    fn leftover_processes(&self) -> Vec<i32> {
        let address = self.dir.join("containerd.sock").display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return vec![];
        };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    c.split(|b| *b == 0)
                        .any(|arg| arg.starts_with(address.as_bytes()))
                })
            })
            .collect()
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}", self.log());
        }
        let tasks = String::from_utf8_lossy(&self.ctr(&["task", "ls", "-q"]).stdout).to_string();
        for t in tasks.split_whitespace() {
            let _ = self.ctr(&["task", "rm", "--force", t]);
        }
        let containers =
            String::from_utf8_lossy(&self.ctr(&["container", "ls", "-q"]).stdout).to_string();
        for c in containers.split_whitespace() {
            let _ = self.ctr(&["container", "rm", c]);
        }
        if let Some(mut d) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(d.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        // Shims outlive containerd; the ones of tasks that could not be deleted.
        for pid in self.leftover_processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        berth_dataplane::netns::unmount_below(&self.dir);
    }
}

/// The identity berth keys a namespace by: its inode (all on one nsfs device).
fn netns_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

/// berth's endpoint in the container with task `pid`.
fn endpoint_of(h: &Host, pid: u32) -> Value {
    let path = format!("/proc/{pid}/ns/net");
    let eps = h.json(&["endpoint", "ls"]);
    eps.as_array()
        .unwrap()
        .iter()
        .find(|e| e["netns"]["path"] == path.as_str())
        .unwrap_or_else(|| panic!("no endpoint in {path}: {eps}"))
        .clone()
}

/// The address berth gave the container with task `pid`.
fn address_of(h: &Host, pid: u32) -> String {
    endpoint_ip(&endpoint_of(h, pid), false)
}

fn endpoint_id(h: &Host, pid: u32) -> String {
    endpoint_of(h, pid)["id"].as_str().unwrap().to_string()
}

#[test]
fn containerd_containers_removed_without_cni_del_leave_nothing_behind() {
    let h = Host::new();
    let ctrd = Containerd::start(&h, "blue", "10.93.0.0/24");
    let gateway = "10.93.0.1";

    // Container A on the network: an address, the gateway and a berth sandbox reachable.
    let a = ctrd.run("a").unwrap();
    let a_ip = address_of(&h, a);
    assert!(a_ip.starts_with("10.93.0."), "{a_ip}");
    let a_ep = endpoint_id(&h, a);
    let shown = ctrd.exec("a", &["/bin/ip", "-o", "addr", "show", "eth0"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!(" {a_ip}/24 ")), "{shown}");
    h.ok(&["sandbox", "create", "s1"]);
    let s1 = h.json(&["attach", "s1", "--network", "blue"]);
    let s1_ip = endpoint_ip(&s1, false);
    assert!(ctrd.pings("a", gateway) && ctrd.pings("a", &s1_ip));
    assert!(h.reaches("s1", &a_ip));

    // Removed without CNI DEL; the kernel frees its namespace and hands the lowest free inode
    // number to the next namespace made, so a new container soon gets a dead one's identity.
    // Each container that does not is removed the same way and joins the dead ones.
    let mut dead = vec![(netns_inode(a), "a".to_string())];
    ctrd.remove("a");
    let mut reused = None;
    for i in 0..20 {
        let id = format!("b{i}");
        let pid = ctrd.run(&id).unwrap_or_else(|e| {
            let inode = ctrd.pid(&id).map(netns_inode);
            panic!("ctr run {id} (namespace inode {inode:?}; removed containers' {dead:?}): {e}")
        });
        let ip = address_of(&h, pid);
        assert!(
            ctrd.pings(&id, gateway) && ctrd.pings(&id, &s1_ip),
            "{id} at {ip}"
        );
        let inode = netns_inode(pid);
        if let Some((_, old)) = dead.iter().find(|(d, _)| *d == inode) {
            eprintln!("{id} got the namespace inode {inode} of removed container {old}");
            reused = Some((id, ip, endpoint_id(&h, pid)));
            break;
        }
        dead.push((inode, id.clone()));
        ctrd.remove(&id);
    }
    let (b, b_ip, b_ep) = reused.unwrap_or_else(|| {
        panic!("no new container got a removed one's namespace inode in 20 tries: {dead:?}")
    });
    assert!(h.reaches("s1", &b_ip), "{b}");

    // The removed containers' veths went with their namespaces: the daemon notices and
    // releases their endpoints and addresses, A's among them. What is left: the gateway, the
    // sandbox and B.
    let s1_ep = s1["id"].as_str().unwrap();
    let mut left = vec!["gateway", s1_ep, b_ep.as_str()];
    left.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alloc: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
        let mut owners: Vec<&str> = alloc
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["owner"].as_str().unwrap())
            .collect();
        owners.sort();
        let eps = h.json(&["endpoint", "ls"]);
        if owners == left && eps.as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removed containers' endpoints are still there (A was {a_ep}): {eps}\n\
             allocations: {alloc}\n{}",
            h.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
