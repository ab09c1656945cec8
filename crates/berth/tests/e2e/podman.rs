//! The real CNI client: Debian's podman (CNI backend) running containers on a berth network,
//! next to berth sandboxes. podman runs inside the test's host namespace with its own storage,
//! configuration and runtime directories, so it touches nothing of the machine's.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::{BERTH_CNI, HTTPD_ON_7000, Host, busybox_tarball, published_until_removed};

pub struct Podman<'h> {
    host: &'h Host,
    dir: PathBuf,
}

impl<'h> Podman<'h> {
    pub fn new(host: &'h Host, network: &str, subnet: &str) -> Self {
        let dir = host.dir.join("podman");
        let net = dir.join("net");
        std::fs::create_dir_all(&net).unwrap();
        let plugin_dir = PathBuf::from(BERTH_CNI).parent().unwrap().to_path_buf();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = []\n[network]\nnetwork_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                plugin_dir.display(),
                net.display()
            ),
        )
        .unwrap();
        let conflist = json!({
            "cniVersion": "1.0.0", "name": network,
            "plugins": [{"type": "berth-cni", "socket": host.socket(), "subnet": subnet, "capabilities": {"aliases": true, "portMappings": true}}]
        });
        std::fs::write(
            net.join(format!("{network}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
        let p = Podman { host, dir };
        let tarball = busybox_tarball(&p.dir);
        p.ok(&[
            "import",
            tarball.to_str().unwrap(),
            "localhost/busybox:local",
        ]);
        p
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let d = |s: &str| self.dir.join(s).display().to_string();
        Command::new("nsenter")
            .arg(format!("--net={}", self.host.netns_path()))
            .arg("podman")
            .args([
                "--root",
                &d("root"),
                "--runroot",
                &d("runroot"),
                "--tmpdir",
                &d("tmp"),
            ])
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--runtime",
                "runc",
            ])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Removing the containers runs CNI DEL while the daemon is still up.
        let _ = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
        // conmon starts `podman container cleanup` when a container exits; wait for those, or
        // they recreate lock files under our directory after the host has removed it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && Command::new("pgrep")
                .args(["-f", &self.dir.display().to_string()])
                .output()
                .is_ok_and(|o| o.status.success())
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

#[test]
fn podman_containers_and_sandboxes_share_a_berth_network() {
    let h = Host::new();
    let pm = Podman::new(&h, "blue", "10.91.0.0/24");
    for (c, alias) in [("c1", "c1"), ("c2", "cache")] {
        pm.ok(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            "blue",
            "--network-alias",
            alias,
            "localhost/busybox:local",
            "sleep",
            "600",
        ]);
    }
    let ip = |c: &str| {
        pm.ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.blue.IPAddress}}",
            c,
        ])
    };
    let (ip1, ip2) = (ip("c1"), ip("c2"));
    assert!(
        ip1.starts_with("10.91.0.") && ip2.starts_with("10.91.0.") && ip1 != ip2,
        "{ip1} {ip2}"
    );
    let ping = pm.ok(&["exec", "c1", "ping", "-c1", "-W1", &ip2]);
    assert!(ping.contains("1 packets received"), "{ping}");

    // The containers find each other by name through berth's DNS: podman puts the CNI
    // result's nameserver and search domain into their resolv.conf.
    let conf = pm.ok(&["exec", "c1", "cat", "/etc/resolv.conf"]);
    assert!(
        conf.starts_with("search blue.berth.local\nnameserver 10.91.0.1\n"),
        "{conf}"
    );
    for name in ["c2", "c2.blue.berth.local", "cache"] {
        let found = pm.ok(&["exec", "c1", "nslookup", name]);
        assert!(
            found.contains(&format!("Address: {ip2}")),
            "{name}: {found}"
        );
    }

    // A berth sandbox on the same network reaches the podman containers.
    h.ok(&["sandbox", "create", "s1"]);
    h.ok(&["attach", "s1", "--network", "blue"]);
    assert!(h.reaches("s1", &ip1) && h.reaches("s1", &ip2));
    let dig = h.in_netns(
        &h.sandbox_path("s1"),
        &["dig", "+short", "+time=3", "@10.91.0.1", "c1"],
    );
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), ip1);
    let eps = h.json(&["endpoint", "ls"]);
    assert_eq!(eps.as_array().unwrap().len(), 3);

    // podman run -p: the portMappings capability becomes a berth published port.
    published_until_removed(
        &h,
        8088,
        || {
            let run = [
                "run",
                "-d",
                "--name",
                "web",
                "--network",
                "blue",
                "-p",
                "8088:7000",
            ];
            pm.ok(&[&run[..], &["localhost/busybox:local"], HTTPD_ON_7000].concat());
        },
        || {
            pm.ok(&["rm", "--force", "--time", "0", "web"]);
        },
    );

    // podman rm leaves no endpoint and, once reaped, no address behind.
    pm.ok(&["rm", "--force", "--time", "0", "c1", "c2"]);
    let eps = h.json(&["endpoint", "ls"]);
    assert_eq!(eps.as_array().unwrap().len(), 1, "{eps}");
    h.eventually("the containers' addresses are released", || {
        let a: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
        a.as_array().unwrap().len() == 2
    });
}
