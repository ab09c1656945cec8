//! Real container engines on different hosts of one cluster, on one overlay network: Docker
//! (a dockerd in host 1's namespace, berth its network and IPAM driver, the Docker network
//! bound to the overlay network with `berth.network`) and podman (CNI backend, berth-cni) on
//! host 2. docs/docker.md, "Overlay networks across hosts".

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::{Cluster, UNDERLAY_MTU, VXLAN_OVERHEAD, eventually};
use crate::docker::Docker;
use crate::podman::Podman;

const NET: &str = "ov";
const SUBNET: &str = "10.197.0.0/16";
const GATEWAY: &str = "10.197.0.1";
const CONVERGE: Duration = Duration::from_secs(15);

/// Host `i`'s listing of the network's endpoints (API JSON).
fn endpoints(c: &Cluster, i: usize) -> Vec<Value> {
    let eps = c.host(i).json(&["endpoint", "ls", "--network", NET]);
    eps.as_array().unwrap().clone()
}

fn endpoint_with_ip<'a>(eps: &'a [Value], ip: &str) -> Option<&'a Value> {
    eps.iter().find(|e| {
        e["ips"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().split('/').next() == Some(ip))
    })
}

/// A shell command for a busybox container: one echo a second to `ip` until one is answered,
/// for up to `CONVERGE` (the other host learns a new endpoint through etcd). ping's output
/// goes to stderr, which `ok` shows when it fails.
fn ping_until_answered(ip: &str) -> String {
    format!(
        "i=0; while [ $i -lt {} ]; do ping -c1 -W1 {ip} >&2 && exit 0; i=$((i+1)); done; exit 1",
        CONVERGE.as_secs()
    )
}

#[test]
fn docker_on_one_host_and_podman_on_another_share_an_overlay() {
    let started = Instant::now();
    let c = Cluster::new(2);
    let (h1, h2) = (c.host(1), c.host(2));
    let made = h1.json(&[
        "network", "create", NET, "--driver", "overlay", "--subnet", SUBNET,
    ]);
    assert_eq!(made["driver"], "overlay", "{made}");
    eventually("h2 knows the network", CONVERGE, || {
        let o = h2.berth(&["network", "inspect", NET]);
        o.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
    });

    // Host 1: Docker, its network bound to the overlay network, as docs/docker.md has it.
    let d = Docker::start(h1);
    let p = d.plugin.clone();
    let dnet = d.ok(&[
        "network",
        "create",
        "-d",
        &p,
        "--ipam-driver",
        &p,
        "-o",
        &format!("berth.network={NET}"),
        "--ipam-opt",
        &format!("berth.network={NET}"),
        "--subnet",
        SUBNET,
        "dnet",
    ]);
    assert_eq!(
        h1.json(&["network", "inspect", NET])["docker_networks"],
        json!([dnet]),
        "the Docker network on the overlay network, by id"
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
    let dc_ip = d.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.dnet.IPAddress}}",
        "dc",
    ]);
    let dc_gw = d.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.dnet.Gateway}}",
        "dc",
    ]);
    assert!(dc_ip.starts_with("10.197."), "{dc_ip}");
    assert_eq!(dc_gw, GATEWAY, "the overlay network's gateway");

    // Host 2: podman through berth-cni, a CNI network of another name whose `network` is the
    // overlay network (besides the configuration Podman::new writes, named after it).
    let pm = Podman::new(h2, NET, SUBNET);
    let conflist = json!({
        "cniVersion": "1.0.0", "name": "pnet",
        "plugins": [{"type": "berth-cni", "socket": h2.socket(), "network": NET}]
    });
    std::fs::write(
        h2.dir.join("podman/net/pnet.conflist"),
        conflist.to_string(),
    )
    .unwrap();
    pm.ok(&[
        "run",
        "-d",
        "--name",
        "pc",
        "--network",
        "pnet",
        "localhost/busybox:local",
        "sleep",
        "600",
    ]);
    let pc_ip = pm.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.pnet.IPAddress}}",
        "pc",
    ]);
    assert!(pc_ip.starts_with("10.197."), "{pc_ip}");
    assert_ne!(pc_ip, dc_ip, "one IPAM for both");

    // Both endpoints are berth endpoints of the overlay network, each on its own host, and
    // every host lists both.
    for i in c.indices() {
        let eps = endpoints(&c, i);
        assert_eq!(eps.len(), 2, "h{i}: {eps:?}");
        let dep = endpoint_with_ip(&eps, &dc_ip).unwrap_or_else(|| panic!("h{i}: {eps:?}"));
        assert_eq!(dep["host"], "h1", "{dep}");
        assert_eq!(dep["runtime_configured"], true, "{dep}");
        let pep = endpoint_with_ip(&eps, &pc_ip).unwrap_or_else(|| panic!("h{i}: {eps:?}"));
        assert_eq!(pep["host"], "h2", "{pep}");
        assert!(pep["container_id"].is_string(), "{pep}");
    }
    // Both containers have the overlay network's MTU, so that full-size packets fit the
    // VXLAN encapsulation.
    let mtu = (UNDERLAY_MTU - VXLAN_OVERHEAD).to_string();
    assert_eq!(
        d.ok(&["exec", "dc", "cat", "/sys/class/net/eth0/mtu"]),
        mtu,
        "the Docker container's MTU"
    );
    assert_eq!(
        pm.ok(&["exec", "pc", "cat", "/sys/class/net/eth0/mtu"]),
        mtu,
        "the podman container's MTU"
    );

    // Across hosts, both ways.
    let t = Instant::now();
    pm.ok(&["exec", "pc", "sh", "-c", &ping_until_answered(&dc_ip)]);
    eprintln!(
        "podman container (h2) reached the Docker container (h1) after {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    d.ok(&["exec", "dc", "sh", "-c", &ping_until_answered(&pc_ip)]);
    eprintln!(
        "Docker container (h1) reached the podman container (h2) after {:?}",
        t.elapsed()
    );
    assert!(
        d.cmd(&["exec", "dc", "ping", "-c1", "-W1", GATEWAY])
            .status
            .success(),
        "the Docker container reaches its gateway"
    );

    // The bound network outlives the Docker network.
    d.ok(&["rm", "-f", "dc"]);
    d.ok(&["network", "rm", "dnet"]);
    for i in c.indices() {
        assert_eq!(c.host(i).json(&["network", "inspect", NET])["name"], NET);
    }

    // The other ways docs/docker.md gives to bind a Docker network: `--subnet` alone beside
    // `-o berth.network` (its recipe for overlay networks), and `--ipam-opt berth.network`
    // instead of `--subnet`.
    let bind = format!("berth.network={NET}");
    for (name, ipam) in [
        ("dsub", ["--subnet", SUBNET]),
        ("dopt", ["--ipam-opt", &bind]),
    ] {
        let mut args = vec![
            "network",
            "create",
            "-d",
            &p,
            "--ipam-driver",
            &p,
            "-o",
            &bind,
        ];
        args.extend(ipam);
        args.push(name);
        let id = d.ok(&args);
        assert_eq!(
            h1.json(&["network", "inspect", NET])["docker_networks"],
            json!([id]),
            "{name}"
        );
        let subnet = d.ok(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
            name,
        ]);
        assert_eq!(subnet, SUBNET, "{name}");
        let container = format!("{name}-c");
        d.ok(&[
            "run",
            "-d",
            "--name",
            &container,
            "--network",
            name,
            "busybox:local",
            "sleep",
            "600",
        ]);
        let ip = d.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{name}.IPAddress}}}}"),
            &container,
        ]);
        let gateway = d.ok(&[
            "inspect",
            "-f",
            &format!("{{{{.NetworkSettings.Networks.{name}.Gateway}}}}"),
            &container,
        ]);
        assert_eq!(gateway, GATEWAY, "{name}");
        let eps = endpoints(&c, 2);
        let ep = endpoint_with_ip(&eps, &ip).unwrap_or_else(|| panic!("{name}: {ip}: {eps:?}"));
        assert_eq!(ep["host"], "h1", "{ep}");
        pm.ok(&["exec", "pc", "sh", "-c", &ping_until_answered(&ip)]);
        d.ok(&["exec", &container, "sh", "-c", &ping_until_answered(&pc_ip)]);
        d.ok(&["rm", "-f", &container]);
        d.ok(&["network", "rm", name]);
    }

    // Nothing of either engine's containers is left on either host.
    pm.ok(&["rm", "--force", "--time", "0", "pc"]);
    for i in c.indices() {
        assert_eq!(c.host(i).json(&["network", "inspect", NET])["name"], NET);
        eventually(
            &format!("h{i} holds nothing of the containers"),
            CONVERGE,
            || {
                let eps = endpoints(&c, i);
                if !eps.is_empty() {
                    return Err(format!("endpoints {eps:?}"));
                }
                let allocs: Value = c
                    .host(i)
                    .client()
                    .get(&format!("/v1/networks/{NET}/allocations"))
                    .map_err(|e| e.to_string())?;
                if allocs != json!([{"ip": GATEWAY, "owner": "gateway"}]) {
                    return Err(format!("allocations {allocs}"));
                }
                let veths: Vec<String> = c
                    .host(i)
                    .host_links()
                    .into_iter()
                    .filter(|l| l.starts_with("berth") && !l.starts_with("berth-"))
                    .collect();
                if !veths.is_empty() {
                    return Err(format!("veths {veths:?}"));
                }
                Ok(())
            },
        );
    }
    eprintln!("docker/podman overlay test took {:?}", started.elapsed());
}
