//! Bridge networks: connectivity, isolation, MTU, restarts, cleanup.

use std::path::Path;

use serde_json::Value;

use crate::harness::{Container, Host, endpoint_ip};

#[test]
fn sandboxes_on_a_network_reach_each_other_over_ipv4_and_ipv6() {
    let h = Host::new();
    h.ok(&[
        "network",
        "create",
        "blue",
        "--subnet",
        "10.91.0.0/24",
        "--ipv6-subnet",
        "fd00:91::/64",
    ]);
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["sandbox", "create", "db"]);
    let web = h.json(&["attach", "web", "--network", "blue"]);
    let db = h.json(&[
        "attach",
        "db",
        "--network",
        "blue",
        "--ip",
        "10.91.0.10",
        "--ifname",
        "eth5",
        "--mac",
        "02:42:0a:5b:00:0a",
    ]);
    assert_eq!(
        endpoint_ip(&web, false),
        "10.91.0.2",
        "first free address after the gateway"
    );
    assert_eq!(endpoint_ip(&db, false), "10.91.0.10");
    assert_eq!(db["mac"], "02:42:0a:5b:00:0a");
    assert_eq!(
        web["mac"], "02:42:0a:5b:00:02",
        "MAC derived from the IPv4 address"
    );
    assert!(h.reaches("web", "10.91.0.10"));
    assert!(h.reaches("db", &endpoint_ip(&web, false)));
    assert!(h.reaches("web", &endpoint_ip(&db, true)));
    assert!(h.reaches("db", &endpoint_ip(&web, true)));
    assert!(h.reaches("web", "10.91.0.1"), "gateway answers");

    // The sandbox side is what was asked for: name, MAC, address, default routes.
    let dbp = h.sandbox_path("db");
    let link = String::from_utf8(
        h.in_netns(&dbp, &["ip", "-o", "link", "show", "eth5"])
            .stdout,
    )
    .unwrap();
    assert!(
        link.contains("02:42:0a:5b:00:0a") && link.contains("state UP"),
        "{link}"
    );
    let routes = String::from_utf8(h.in_netns(&dbp, &["ip", "route"]).stdout).unwrap();
    assert!(
        routes.contains("default via 10.91.0.1 dev eth5"),
        "{routes}"
    );
    let routes6 = String::from_utf8(h.in_netns(&dbp, &["ip", "-6", "route"]).stdout).unwrap();
    assert!(
        routes6.contains("default via fd00:91::1 dev eth5"),
        "{routes6}"
    );

    // `berth sandbox exec` runs inside the sandbox.
    let out = h.ok(&[
        "sandbox",
        "exec",
        "web",
        "--",
        "ping",
        "-c1",
        "-W1",
        "10.91.0.10",
    ]);
    assert!(out.contains("1 received"), "{out}");

    let eps = h.json(&["endpoint", "ls", "--network", "blue"]);
    assert_eq!(eps.as_array().unwrap().len(), 2);
    let status = h.json(&["status"]);
    assert_eq!(
        (
            status["networks"].as_u64(),
            status["endpoints"].as_u64(),
            status["sandboxes"].as_u64()
        ),
        (Some(1), Some(2), Some(2))
    );
}

#[test]
fn networks_are_isolated_and_a_sandbox_can_be_on_two() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["network", "create", "green", "--subnet", "10.92.0.0/24"]);
    for sb in ["a", "b", "both"] {
        h.ok(&["sandbox", "create", sb]);
    }
    let a = h.json(&["attach", "a", "--network", "blue"]);
    let b = h.json(&["attach", "b", "--network", "green"]);
    h.ok(&["attach", "both", "--network", "blue"]);
    h.ok(&["attach", "both", "--network", "green", "--ifname", "eth1"]);
    let (a_ip, b_ip) = (endpoint_ip(&a, false), endpoint_ip(&b, false));
    assert!(
        h.reaches("both", &a_ip) && h.reaches("both", &b_ip),
        "a sandbox on both reaches both"
    );
    assert!(
        h.cannot_reach("a", &b_ip),
        "blue cannot reach green through the host"
    );
    assert!(
        h.cannot_reach("b", &a_ip),
        "green cannot reach blue through the host"
    );
    let host_ping = |ip: &str| {
        h.sh(&[
            "sh",
            "-c",
            &format!("ping -c1 -W1 -q {ip} >/dev/null && echo yes || echo no"),
        ])
    };
    assert_eq!(
        host_ping("10.91.0.1").trim(),
        "yes",
        "the host reaches its gateways"
    );
}

#[test]
fn default_subnets_and_mtu() {
    let h = Host::bare();
    // The host's default route leaves through an interface with MTU 1450: networks inherit it.
    h.sh(&[
        "ip", "link", "add", "uplink0", "mtu", "1450", "type", "veth", "peer", "name", "uplink1",
    ]);
    h.sh(&["ip", "link", "set", "uplink0", "up"]);
    h.sh(&["ip", "addr", "add", "192.0.2.2/24", "dev", "uplink0"]);
    h.sh(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
    h.start();
    let green = h.json(&["network", "create", "green"]);
    let red = h.json(&["network", "create", "red", "--mtu", "1400"]);
    assert_eq!(green["subnets"][0]["cidr"], "10.210.0.0/24");
    assert_eq!(green["subnets"][0]["gateway"], "10.210.0.1");
    assert_eq!(
        red["subnets"][0]["cidr"], "10.210.1.0/24",
        "next free /24 of the default pool"
    );
    assert_eq!(green["mtu"], 1450);
    assert_eq!(red["mtu"], 1400);
    h.ok(&["sandbox", "create", "s"]);
    h.ok(&["attach", "s", "--network", "red"]);
    let link = String::from_utf8(
        h.in_netns(&h.sandbox_path("s"), &["ip", "-o", "link", "show", "eth0"])
            .stdout,
    )
    .unwrap();
    assert!(link.contains("mtu 1400"), "{link}");
    let bridge = red["bridge"].as_str().unwrap();
    assert!(
        h.sh(&["ip", "-o", "link", "show", bridge])
            .contains("mtu 1400")
    );
}

#[test]
fn any_namespace_path_can_be_attached_and_is_released_when_it_dies() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["attach", "web", "--network", "blue", "--ip", "10.91.0.5"]);
    let mut c = Container::start();
    let ep = h.json(&[
        "attach",
        &c.netns(),
        "--network",
        "blue",
        "--ip",
        "10.91.0.9",
    ]);
    assert_eq!(ep["netns"]["path"], c.netns());
    assert!(h.reaches("web", "10.91.0.9"), "the container is reachable");
    let cping = h.in_netns(Path::new(&c.netns()), &["ping", "-c1", "-W1", "10.91.0.5"]);
    assert!(cping.status.success());

    // The container dies while the daemon is down: at restart its endpoint and address go.
    h.stop();
    c.stop();
    h.start();
    let eps = h.json(&["endpoint", "ls"]);
    assert_eq!(eps.as_array().unwrap().len(), 1, "{eps}");
    let allocs: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
    let held: Vec<&str> = allocs
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(held, ["10.91.0.1", "10.91.0.5"]);
    assert!(
        !h.host_links()
            .iter()
            .any(|l| l == ep["host_ifname"].as_str().unwrap())
    );
}

#[test]
fn restart_keeps_containers_connected_and_repairs_the_kernel() {
    let h = Host::new();
    h.ok(&[
        "network",
        "create",
        "blue",
        "--subnet",
        "10.91.0.0/24",
        "--ipv6-subnet",
        "fd00:91::/64",
    ]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["sandbox", "create", "b"]);
    let a_host = h.json(&["attach", "a", "--network", "blue"])["host_ifname"]
        .as_str()
        .unwrap()
        .to_string();
    h.ok(&["attach", "b", "--network", "blue"]);
    // SIGTERM stops the daemon and leaves the containers connected.
    h.stop();
    assert!(h.reaches("a", "10.91.0.3"));
    // While it is down: b loses its address and route, a's veth is deleted, and a stray link
    // of berth's (its name and its mark, as a crash mid-attach leaves one) appears.
    h.in_netns(
        &h.sandbox_path("b"),
        &["ip", "addr", "flush", "dev", "eth0"],
    );
    h.sh(&["ip", "link", "del", &a_host]);
    h.sh(&[
        "ip",
        "link",
        "add",
        "berth0123456789",
        "type",
        "veth",
        "peer",
        "name",
        "stray0",
    ]);
    h.sh(&["ip", "link", "set", "berth0123456789", "alias", "berth"]);
    h.start();
    assert!(h.reaches("a", "10.91.0.3"), "a's veth was recreated");
    assert!(h.reaches("b", "10.91.0.2"), "b's address was put back");
    assert!(h.reaches("b", "fd00:91::2"));
    assert!(
        !h.host_links()
            .iter()
            .any(|l| l == "berth0123456789" || l == "stray0"),
        "stray link removed"
    );
    // And the API keeps working after a restart.
    h.ok(&["detach", "a", "--network", "blue"]);
    assert!(h.cannot_reach("b", "10.91.0.2"));
}

#[test]
fn removing_things_leaves_nothing_behind() {
    let h = Host::new();
    let net = h.json(&["network", "create", "blue"]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["sandbox", "create", "b"]);
    let a = h.json(&["attach", "a", "--network", "blue"]);
    h.ok(&["attach", "b", "--network", "blue"]);
    let err = h.fails(&["network", "rm", "blue"]);
    assert!(err.contains("in use by 2 endpoint"), "{err}");
    h.ok(&["detach", "a", "--network", "blue"]);
    // The sandbox is off the network at once; the veth itself is deleted in the background.
    assert!(
        h.in_netns(&h.sandbox_path("a"), &["ip", "link", "show", "eth0"])
            .status
            .code()
            != Some(0)
    );
    let a_host = a["host_ifname"].as_str().unwrap().to_string();
    h.eventually("the detached veth is deleted", || {
        !h.host_links().contains(&a_host)
    });
    h.eventually("the sandbox has only lo", || {
        String::from_utf8_lossy(
            &h.in_netns(&h.sandbox_path("a"), &["ip", "-o", "link"])
                .stdout,
        )
        .lines()
        .count()
            == 1
    });
    // rm of a sandbox detaches it first.
    h.ok(&["sandbox", "rm", "b"]);
    assert!(!h.sandbox_path("b").exists());
    h.ok(&["sandbox", "rm", "a"]);
    h.ok(&["network", "rm", "blue"]);
    let links = h.host_links();
    assert_eq!(
        links,
        ["lo"],
        "no bridge or veth left: {links:?} (bridge was {})",
        net["bridge"]
    );
    let s = h.json(&["status"]);
    assert_eq!(
        (
            s["networks"].as_u64(),
            s["endpoints"].as_u64(),
            s["sandboxes"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    // The address space is free again: the same subnet can be created anew.
    h.ok(&[
        "network",
        "create",
        "blue2",
        "--subnet",
        net["subnets"][0]["cidr"].as_str().unwrap(),
    ]);
}

#[test]
fn concurrent_attaches_get_distinct_addresses() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    let c = h.client();
    for i in 0..48 {
        let _: Value = c
            .post(
                "/v1/sandboxes",
                &serde_json::json!({ "name": format!("s{i}") }),
            )
            .unwrap();
    }
    let eps: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let c = c.clone();
                s.spawn(move || {
                    (0..6)
                        .map(|k| {
                            let req = berth_api::Attach {
                                network: "blue".into(),
                                sandbox: format!("s{}", t * 6 + k),
                                ..Default::default()
                            };
                            c.post::<_, Value>("/v1/endpoints", &req).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut ips: Vec<String> = eps.iter().map(|e| endpoint_ip(e, false)).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 48, "48 distinct addresses");
    assert!(h.reaches("s0", &endpoint_ip(&eps[47], false)));
    assert!(h.reaches("s47", &endpoint_ip(&eps[0], false)));
}

#[test]
fn detach_then_reattach_with_the_same_address_and_name() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["sandbox", "create", "b"]);
    h.ok(&["attach", "b", "--network", "blue"]);
    for round in 0..5 {
        let ep = h.json(&["attach", "a", "--network", "blue", "--ip", "10.91.0.50"]);
        assert_eq!(endpoint_ip(&ep, false), "10.91.0.50", "round {round}");
        assert!(h.reaches("b", "10.91.0.50"), "round {round}");
        h.ok(&["detach", "a", "--network", "blue"]);
        assert!(
            h.cannot_reach("b", "10.91.0.50"),
            "detached at once, round {round}"
        );
    }
    // Once reaped, the address is free and no veth is left of the five rounds.
    h.eventually("detached addresses are released", || {
        let allocs: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
        allocs.as_array().unwrap().len() == 2
    });
    let veths = h
        .host_links()
        .into_iter()
        .filter(|l| l.starts_with("berth") && !l.starts_with("berth-"))
        .count();
    assert_eq!(veths, 1, "only b's veth is left");
}

/// `sandbox rm` racing attaches to the same sandbox: each attach lands before the removal
/// (and goes with the sandbox) or is refused. Nothing is left: no endpoint, no address but the
/// gateway's, no veth, no resolv.conf.
#[test]
fn sandbox_removal_racing_attaches_leaves_nothing() {
    let h = Host::new();
    let networks = ["blue", "green", "red"];
    for (i, n) in networks.iter().enumerate() {
        h.ok(&[
            "network",
            "create",
            n,
            "--subnet",
            &format!("10.9{}.0.0/24", i + 1),
        ]);
    }
    let c = h.client();
    let mut refused = Vec::new();
    // A process in each sandbox keeps its namespace alive past the removal, as a container's
    // would: an interface made there after the removal would stay on the bridge.
    struct Holders(Vec<std::process::Child>);
    impl Drop for Holders {
        fn drop(&mut self) {
            for h in &mut self.0 {
                let _ = h.kill();
                let _ = h.wait();
            }
        }
    }
    let mut holders = Holders(Vec::new());
    for round in 0..25 {
        let name = format!("r{round}");
        let _: Value = c
            .post("/v1/sandboxes", &serde_json::json!({ "name": name }))
            .unwrap();
        holders.0.push(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", h.sandbox_path(&name).display()))
                .args(["sleep", "60"])
                .spawn()
                .unwrap(),
        );
        std::thread::scope(|s| {
            let attaches: Vec<_> = networks
                .iter()
                .enumerate()
                .map(|(i, network)| {
                    let (c, name) = (c.clone(), name.clone());
                    s.spawn(move || {
                        let req = berth_api::Attach {
                            network: network.to_string(),
                            sandbox: name,
                            ifname: Some(format!("eth{i}")),
                            ..Default::default()
                        };
                        c.post::<_, Value>("/v1/endpoints", &req).err()
                    })
                })
                .collect();
            let removed: Value = c.delete(&format!("/v1/sandboxes/{name}")).unwrap();
            assert_eq!(removed["removed"], name.as_str());
            for a in attaches {
                refused.extend(a.join().unwrap().map(|e| e.to_string()));
            }
        });
    }
    for e in &refused {
        assert!(
            e.contains("being removed")
                || e.contains("no sandbox named")
                || e.contains("while being attached"),
            "an attach refused for another reason: {e}"
        );
    }
    let sandboxes: Value = c.get("/v1/sandboxes").unwrap();
    assert_eq!(sandboxes, serde_json::json!([]));
    let endpoints: Value = c.get("/v1/endpoints").unwrap();
    assert_eq!(endpoints, serde_json::json!([]));
    h.eventually("every address but the gateways' is released", || {
        networks.iter().all(|n| {
            let allocs: Value = c.get(&format!("/v1/networks/{n}/allocations")).unwrap();
            allocs.as_array().unwrap().len() == 1
        })
    });
    let veths: Vec<String> = h
        .host_links()
        .into_iter()
        .filter(|l| l.starts_with("berth") && !l.starts_with("berth-"))
        .collect();
    drop(holders);
    assert_eq!(veths, Vec::<String>::new());
    let etc = std::fs::read_dir(h.sandbox_etc_dir())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(etc, 0, "no sandbox resolv.conf left");
}

/// Only interfaces that use IPv6 get a link-local address: a sandbox's interface on an IPv6
/// network does; one on an IPv4-only network and the bridge ports (the host ends) do not, so
/// no duplicate-address probes or MLD reports are flooded to every port of a bridge each time
/// an endpoint comes up.
#[test]
fn ipv6_link_local_addresses_only_where_ipv6_is_used() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&[
        "network",
        "create",
        "dual",
        "--subnet",
        "10.92.0.0/24",
        "--ipv6-subnet",
        "fd00:92::/64",
    ]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["attach", "a", "--network", "blue"]);
    h.ok(&["attach", "a", "--network", "dual", "--ifname", "eth1"]);
    h.ok(&["sandbox", "create", "b"]);
    h.ok(&["attach", "b", "--network", "dual"]);
    let addresses = |dev: &str| {
        let out = h.in_netns(
            &h.sandbox_path("a"),
            &["ip", "-6", "addr", "show", "dev", dev],
        );
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        !addresses("eth0").contains("fe80::"),
        "{}",
        addresses("eth0")
    );
    assert!(
        addresses("eth1").contains("fe80::"),
        "{}",
        addresses("eth1")
    );
    for e in h.json(&["endpoint", "ls"]).as_array().unwrap() {
        let host_end = e["host_ifname"].as_str().unwrap();
        let out = h.sh(&["ip", "-6", "addr", "show", "dev", host_end]);
        assert!(!out.contains("fe80::"), "{host_end}: {out}");
    }
    let dual = h.json(&["endpoint", "ls", "--network", "dual"]);
    let b = dual
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["netns"]["sandbox"] == "b")
        .unwrap();
    let b6 = endpoint_ip(b, true);
    assert!(h.reaches("a", &b6), "IPv6 between sandboxes still works");
    assert!(h.reaches("a", "10.91.0.1"));
}

/// A sandbox removal the daemon's stop cut short (the sandbox is marked `removing`, its
/// endpoints and namespace still there) is finished when the daemon starts again.
#[test]
fn a_sandbox_removal_cut_short_is_finished_at_start() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    h.ok(&["attach", "a", "--network", "blue"]);
    h.ok(&["sandbox", "create", "b"]);
    h.ok(&["attach", "b", "--network", "blue"]);
    h.stop();
    // The store as a stop right after `sandbox rm a` marked the sandbox leaves it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        use berth_store::{RedbStore, Store, Txn};
        let store = RedbStore::open(&h.state_dir()).unwrap();
        let kv = store.get("sandboxes/a").await.unwrap().unwrap();
        let mut sb: Value = serde_json::from_slice(&kv.value).unwrap();
        sb["removing"] = Value::Bool(true);
        store
            .txn(Txn::new().put("sandboxes/a".to_string(), serde_json::to_vec(&sb).unwrap()))
            .await
            .unwrap();
    });
    assert!(h.sandbox_path("a").exists());
    h.start();
    let sandboxes = h.json(&["sandbox", "ls"]);
    let names: Vec<&str> = sandboxes
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b"]);
    let eps = h.json(&["endpoint", "ls"]);
    assert_eq!(eps.as_array().unwrap().len(), 1, "{eps}");
    assert_eq!(eps[0]["netns"]["sandbox"], "b");
    assert!(!h.sandbox_path("a").exists(), "the namespace is gone");
    h.eventually("a's address is released", || {
        let allocs: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
        allocs.as_array().unwrap().len() == 2
    });
    assert!(h.reaches("b", "10.91.0.1"));
}

/// Attaching by the path of a berth sandbox's namespace is attaching that sandbox: the
/// endpoint is the sandbox's (named after it, checked against its removal, removed with it).
#[test]
fn a_sandbox_path_is_the_sandbox() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    let path = h.sandbox_path("a").display().to_string();
    let ep = h.json(&["attach", &path, "--network", "blue"]);
    assert_eq!(ep["netns"]["sandbox"], "a", "{ep}");
    assert_eq!(ep["name"], "a", "{ep}");
    assert!(h.reaches("a", "10.91.0.1"));
    h.ok(&["sandbox", "rm", "a"]);
    assert_eq!(h.json(&["endpoint", "ls"]), serde_json::json!([]));
}

/// The CLI shows a network's allocations and runs `check` on an endpoint: ok while the kernel
/// matches the record, a non-zero exit naming the difference when it does not.
#[test]
fn the_cli_shows_allocations_and_checks_endpoints() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    let ep = h.json(&["attach", "a", "--network", "blue", "--ip", "10.91.0.7"]);
    let id = ep["id"].as_str().unwrap();

    let table = h.ok(&["network", "allocations", "blue"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["ADDRESS", "OWNER"], "{table}");
    assert!(rows.contains(&vec!["10.91.0.1", "gateway"]), "{table}");
    assert!(rows.contains(&vec!["10.91.0.7", id]), "{table}");
    let json = h.json(&["network", "allocations", "blue"]);
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");
    assert!(
        h.fails(&["network", "allocations", "nosuch"])
            .contains("no network named")
    );

    assert_eq!(h.ok(&["endpoint", "check", id]).trim(), format!("{id}: ok"));
    assert_eq!(
        h.json(&["endpoint", "check", id]),
        serde_json::json!({"problems": []})
    );
    let out = h.in_netns(&h.sandbox_path("a"), &["ip", "link", "set", "eth0", "down"]);
    assert!(out.status.success());
    let o = h.berth(&["endpoint", "check", id]);
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("eth0 is down in the namespace"), "{stdout}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("differs from its record"), "{stderr}");
    assert!(
        h.fails(&["endpoint", "check", "nosuch"])
            .contains("no endpoint")
    );
}
