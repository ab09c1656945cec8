//! The daemon's life beside the kernel: one daemon per namespace, links that vanish while it
//! runs or while it is down, and which network a sandbox's default route goes through.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_api::Attach;
use serde_json::Value;

use crate::harness::{BERTH, Container, Host, endpoint_ip};

/// The sandbox's default route of one family: `via GW dev IF`, or "" when there is none.
fn default_route(h: &Host, sandbox: &str, v6: bool) -> String {
    let family = if v6 { "-6" } else { "-4" };
    let out = h.in_netns(
        &h.sandbox_path(sandbox),
        &["ip", family, "route", "show", "default"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.iter().position(|w| *w == "via") {
        Some(i) => format!("via {} dev {}", words[i + 1], words[i + 3]),
        None => String::new(),
    }
}

fn no_problems(h: &Host, ep: &Value) {
    let id = ep["id"].as_str().unwrap();
    let report: Value = h
        .client()
        .get(&format!("/v1/endpoints/{id}/check"))
        .unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "check of {id}");
}

#[test]
fn a_second_daemon_in_the_namespace_touches_nothing_and_says_who_runs() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.93.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["sandbox", "create", "b"]);
    h.ok(&["attach", "a", "--network", "blue", "-p", "8080:80"]);
    let b = h.json(&["attach", "b", "--network", "blue"]);
    let links = h.host_links();
    let bridges = h.sh(&["nft", "list", "set", "inet", "berth", "bridges"]);
    let ports = h.sh(&["nft", "list", "map", "inet", "berth", "ports4_any"]);

    // Same run directory, another state directory: the case that used to wipe the first
    // daemon's links before noticing the socket was taken.
    let mut second = Killed(h.spawn_daemon("state-second"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "second daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let log = h.log();
    assert!(
        log.contains("another berth daemon (pid "),
        "the refusal names the running daemon:\n{log}"
    );
    assert_eq!(h.host_links(), links, "links untouched");
    assert_eq!(
        h.sh(&["nft", "list", "set", "inet", "berth", "bridges"]),
        bridges
    );
    assert_eq!(
        h.sh(&["nft", "list", "map", "inet", "berth", "ports4_any"]),
        ports
    );
    assert!(h.reaches("a", &endpoint_ip(&b, false)));
    // The first daemon still serves.
    h.ok(&["sandbox", "create", "c"]);
    h.ok(&["attach", "c", "--network", "blue"]);
}

#[test]
fn the_docker_plugin_socket_is_off_with_an_empty_value_and_by_default_in_a_private_namespace() {
    let h = Host::bare();
    let spawn = |extra: &[&str]| {
        let log = std::fs::File::create(h.dir.join("daemon.log")).unwrap();
        Command::new("nsenter")
            .arg(format!("--net={}", h.netns_path()))
            .arg(BERTH)
            .args(["daemon", "--state-dir"])
            .arg(h.state_dir())
            .arg("--run-dir")
            .arg(h.dir.join("run"))
            .arg("--netns-dir")
            .arg(h.dir.join("netns"))
            .args(["--dns-port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    for extra in [&["--docker-plugin-socket", ""][..], &[][..]] {
        let mut d = Killed(spawn(extra));
        h.wait_ready(&mut d.0);
        let log = h.log();
        assert!(
            !log.contains("Docker plugin API ready"),
            "{extra:?}:\n{log}"
        );
    }
    // An explicit one is served.
    let plugin = h.dir.join("plugin.sock");
    let mut d = Killed(spawn(&["--docker-plugin-socket", plugin.to_str().unwrap()]));
    h.wait_ready(&mut d.0);
    assert!(plugin.exists());
}

/// A daemon killed when dropped, also while a test panics.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_default_route_stays_with_the_first_network_and_falls_back_on_detach() {
    let h = Host::new();
    h.ok(&[
        "network",
        "create",
        "red",
        "--subnet",
        "10.94.1.0/24",
        "--ipv6-subnet",
        "fd00:94:1::/64",
    ]);
    h.ok(&["network", "create", "green", "--subnet", "10.94.2.0/24"]);
    h.ok(&[
        "network",
        "create",
        "blue",
        "--subnet",
        "10.94.3.0/24",
        "--ipv6-subnet",
        "fd00:94:3::/64",
    ]);
    h.ok(&["sandbox", "create", "s"]);
    let red = h.json(&["attach", "s", "--network", "red"]);
    let green = h.json(&["attach", "s", "--network", "green", "--ifname", "eth1"]);
    let blue = h.json(&["attach", "s", "--network", "blue", "--ifname", "eth2"]);
    assert_eq!(default_route(&h, "s", false), "via 10.94.1.1 dev eth0");
    assert_eq!(default_route(&h, "s", true), "via fd00:94:1::1 dev eth0");
    assert_eq!(
        red["default_gateways"],
        serde_json::json!(["10.94.1.1", "fd00:94:1::1"])
    );
    assert!(green.get("default_gateways").is_none(), "{green}");
    assert!(blue.get("default_gateways").is_none(), "{blue}");
    for ep in [&red, &green, &blue] {
        no_problems(&h, ep);
    }

    // Detaching a network that does not hold the route leaves it alone.
    h.ok(&["detach", "s", "--network", "green"]);
    assert_eq!(default_route(&h, "s", false), "via 10.94.1.1 dev eth0");
    let green = h.json(&["attach", "s", "--network", "green", "--ifname", "eth1"]);

    // Detaching the holder passes both families to the next-oldest network that has them
    // (green was attached again, after blue).
    h.ok(&["detach", "s", "--network", "red"]);
    assert_eq!(default_route(&h, "s", false), "via 10.94.3.1 dev eth2");
    assert_eq!(default_route(&h, "s", true), "via fd00:94:3::1 dev eth2");
    for ep in [&green, &blue] {
        no_problems(&h, ep);
    }
    // And from blue to green, which has no IPv6: no IPv6 default route is left.
    h.ok(&["detach", "s", "--network", "blue"]);
    assert_eq!(default_route(&h, "s", false), "via 10.94.2.1 dev eth1");
    assert_eq!(default_route(&h, "s", true), "");
    let blue = h.json(&["attach", "s", "--network", "blue", "--ifname", "eth2"]);
    assert_eq!(default_route(&h, "s", false), "via 10.94.2.1 dev eth1");
    assert_eq!(
        default_route(&h, "s", true),
        "via fd00:94:3::1 dev eth2",
        "IPv6 had no holder"
    );
    for ep in [&green, &blue] {
        no_problems(&h, ep);
    }

    // Asked for, a network takes the route.
    let red = h.json(&["attach", "s", "--network", "red", "--default-route"]);
    assert_eq!(default_route(&h, "s", false), "via 10.94.1.1 dev eth0");
    assert_eq!(default_route(&h, "s", true), "via fd00:94:1::1 dev eth0");
    for ep in [&red, &green, &blue] {
        no_problems(&h, ep);
    }

    // A restart finds nothing to repair and changes nothing.
    h.stop();
    h.start();
    let log = h.log();
    let last = log
        .lines()
        .rfind(|l| l.contains("kernel reconciled"))
        .unwrap();
    assert!(last.contains("(0 repaired, 0 removed)"), "{last}");
    assert_eq!(default_route(&h, "s", false), "via 10.94.1.1 dev eth0");
    for ep in [&red, &green, &blue] {
        no_problems(&h, ep);
    }

    // Removing the sandbox removes every record of its default routes with it.
    h.ok(&["sandbox", "rm", "s"]);
    h.eventually("endpoints released", || {
        h.json(&["endpoint", "ls"]).as_array().unwrap().is_empty()
    });
}

#[test]
fn a_running_daemon_repairs_deleted_links_and_releases_endpoints_of_dead_namespaces() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.95.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["sandbox", "create", "b"]);
    let a = h.json(&["attach", "a", "--network", "blue"]);
    let b = h.json(&["attach", "b", "--network", "blue"]);
    let net: Value = h.client().get("/v1/networks/blue").unwrap();
    let bridge = net["bridge"].as_str().unwrap().to_string();

    // A veth deleted by hand is made again; a bridge deleted by hand too, with its ports.
    h.sh(&["ip", "link", "del", a["host_ifname"].as_str().unwrap()]);
    h.eventually("veth re-created", || {
        h.host_links()
            .contains(&a["host_ifname"].as_str().unwrap().to_string())
    });
    assert!(h.reaches("a", &endpoint_ip(&b, false)));
    h.sh(&["ip", "link", "del", &bridge]);
    h.eventually("bridge re-created", || h.host_links().contains(&bridge));
    assert!(h.reaches("b", &endpoint_ip(&a, false)));
    no_problems(&h, &a);
    no_problems(&h, &b);

    // A container whose namespace dies without a DEL: its endpoint is released at once.
    let mut c = Container::start();
    let req = Attach {
        network: "blue".into(),
        sandbox: c.netns(),
        container_id: Some("dead-container".into()),
        ifname: Some("eth0".into()),
        ..Default::default()
    };
    let ep: Value = h.client().post("/v1/endpoints", &req).unwrap();
    let ip = endpoint_ip(&ep, false);
    c.stop();
    h.eventually("endpoint of the dead container released", || {
        let eps = h.json(&["endpoint", "ls"]);
        eps.as_array().unwrap().len() == 2
    });
    h.eventually("its address free", || {
        let allocs: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
        !allocs.to_string().contains(&format!("\"{ip}\""))
    });
    assert!(h.log().contains("endpoint released"));
}

#[test]
fn a_cni_endpoint_whose_veth_died_while_the_daemon_was_down_frees_its_namespace_name() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.96.0.0/24"]);
    // A runtime's named namespace, as podman and containerd make them.
    let ns = format!("{}-ctr", h.netns);
    let path = format!("/run/netns/{ns}");
    crate::harness::run_ok("ip", &["netns", "add", &ns]);
    let _cleanup = scopeguard(|| {
        let _ = crate::harness::run("ip", &["netns", "del", &ns]);
    });
    let attach = |cid: &str| Attach {
        network: "blue".into(),
        sandbox: path.clone(),
        container_id: Some(cid.into()),
        ifname: Some("eth0".into()),
        ..Default::default()
    };
    let first: Value = h.client().post("/v1/endpoints", &attach("first")).unwrap();
    h.kill();
    // The container goes without a DEL while berth is down, and the runtime makes the next
    // one's namespace under the same path with the same inode, which the kernel reuses. The
    // same namespace without the first container's veth is exactly what berth then sees.
    crate::harness::run_ok("ip", &["-n", &ns, "link", "del", "eth0"]);
    h.start();
    let second: Value = h.client().post("/v1/endpoints", &attach("second")).unwrap();
    assert_eq!(
        endpoint_ip(&second, false),
        endpoint_ip(&first, false),
        "the dead endpoint's address was released"
    );
    let eps = h.json(&["endpoint", "ls"]);
    assert_eq!(eps.as_array().unwrap().len(), 1, "{eps}");
    let inside = h.in_netns(Path::new(&path), &["ip", "-o", "addr", "show", "eth0"]);
    assert!(String::from_utf8_lossy(&inside.stdout).contains(&endpoint_ip(&second, false)));
}

/// Runs `f` when dropped, also while a test panics.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[test]
fn endpoints_carry_labels_and_bad_ones_are_refused() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.95.0.0/24"]);
    h.ok(&["sandbox", "create", "web"]);
    let ep = h.json(&[
        "attach",
        "web",
        "--network",
        "blue",
        "--label",
        "app=web",
        "-l",
        "tier=",
        "--label",
        "app.kubernetes.io/part-of=shop",
    ]);
    let want = serde_json::json!({"app": "web", "tier": "", "app.kubernetes.io/part-of": "shop"});
    assert_eq!(ep["labels"], want);
    let id = ep["id"].as_str().unwrap();
    assert_eq!(h.json(&["endpoint", "inspect", id])["labels"], want);

    h.ok(&["sandbox", "create", "db"]);
    for bad in ["-app=web", "app=we b", "Example.com/app=x"] {
        let label = format!("--label={bad}");
        let err = h.fails(&["attach", "db", "--network", "blue", &label]);
        assert!(err.contains("invalid label"), "{bad}: {err}");
    }
    // Refused by the command line itself (clap's usage error).
    let o = h.berth(&["attach", "db", "--network", "blue", "--label", "novalue"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("KEY=VALUE"), "{err}");
    let eps = h.json(&["endpoint", "ls", "--network", "blue"]);
    assert_eq!(
        eps.as_array().unwrap().len(),
        1,
        "nothing of the refused attaches: {eps}"
    );
}
