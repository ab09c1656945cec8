//! `berth-cni` driven as a container runtime drives it: env, config on stdin, result on stdout.

use serde_json::{Value, json};

use crate::harness::{Container, Host};

fn conf(h: &Host, version: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": version, "name": "blue", "type": "berth-cni",
        "socket": h.socket(), "subnet": "10.91.0.0/24", "ipv6Subnet": "fd00:91::/64",
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn env<'a>(cmd: &'a str, cid: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
    ]
}

fn ok(h: &Host, plugin: &str, env: &[(&str, &str)], conf: &Value) -> Value {
    let (success, out) = h.cni(plugin, env, conf);
    assert!(success, "{plugin} {env:?} failed: {out}");
    out
}

fn fails(h: &Host, env: &[(&str, &str)], conf: &Value, code: u64) -> String {
    let (success, out) = h.cni("berth-cni", env, conf);
    assert!(!success, "{env:?} should fail");
    assert_eq!(out["code"].as_u64(), Some(code), "{out}");
    assert!(
        out["cniVersion"].is_string() && out["details"].is_string(),
        "{out}"
    );
    out["msg"].as_str().unwrap().to_string()
}

fn addr(result: &Value, i: usize) -> String {
    result["ips"][i]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

fn allocations(h: &Host) -> usize {
    let a: Value = h.client().get("/v1/networks/blue/allocations").unwrap();
    a.as_array().unwrap().len()
}

#[test]
fn add_check_del_status_gc_and_version() {
    let h = Host::new();
    let (a, b) = (Container::start(), Container::start());
    let c = conf(&h, "1.1.0", json!({}));

    let v = ok(
        &h,
        "berth-cni",
        &[("CNI_COMMAND", "VERSION")],
        &json!({"cniVersion": "1.0.0"}),
    );
    assert_eq!(
        v,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    );

    // ADD creates the network from the config's keys and answers in the asked-for version.
    let ra = ok(&h, "berth-cni", &env("ADD", "ctr-a", &a.netns()), &c);
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["interfaces"][1]["name"], "eth0");
    assert_eq!(ra["interfaces"][1]["sandbox"], a.netns());
    assert_eq!(
        ra["ips"][0],
        json!({"address": "10.91.0.2/24", "gateway": "10.91.0.1", "interface": 1})
    );
    assert_eq!(ra["ips"][1]["address"], "fd00:91::2/64");
    assert_eq!(
        ra["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.91.0.1"}, {"dst": "::/0", "gw": "fd00:91::1"}])
    );
    let net = h.json(&["network", "inspect", "blue"]);
    assert_eq!(net["subnets"][0]["cidr"], "10.91.0.0/24");

    // 0.4.0 results carry the address family; runtimeConfig.ips and mac are honoured.
    let c04 = conf(
        &h,
        "0.4.0",
        json!({"runtimeConfig": {"ips": ["10.91.0.77/24"], "mac": "02:00:00:00:00:77"}}),
    );
    let rb = ok(&h, "berth-cni", &env("ADD", "ctr-b", &b.netns()), &c04);
    assert_eq!(
        (rb["ips"][0]["version"].as_str(), addr(&rb, 0).as_str()),
        (Some("4"), "10.91.0.77")
    );
    assert_eq!(rb["interfaces"][1]["mac"], "02:00:00:00:00:77");
    let ping = h.in_netns(
        std::path::Path::new(&a.netns()),
        &["ping", "-c1", "-W1", "10.91.0.77"],
    );
    assert!(ping.status.success(), "containers reach each other");

    // ADD of an existing (container, ifname) fails; the first attachment is untouched.
    let msg = fails(&h, &env("ADD", "ctr-a", &a.netns()), &c, 100);
    assert!(msg.contains("already"), "{msg}");

    // CHECK passes, then names what is broken.
    ok(&h, "berth-cni", &env("CHECK", "ctr-a", &a.netns()), &c);
    h.in_netns(
        std::path::Path::new(&a.netns()),
        &["ip", "-4", "addr", "flush", "dev", "eth0"],
    );
    let msg = fails(&h, &env("CHECK", "ctr-a", &a.netns()), &c, 101);
    assert!(msg.contains("10.91.0.2/24 is missing"), "{msg}");
    let msg = fails(&h, &env("CHECK", "ctr-zz", &a.netns()), &c, 3);
    assert!(msg.contains("no interface eth0"), "{msg}");

    // A config that disagrees with the existing network is refused, naming the difference.
    let other = conf(&h, "1.1.0", json!({"subnet": "10.99.0.0/24"}));
    let msg = fails(&h, &env("ADD", "ctr-c", &a.netns()), &other, 7);
    assert!(
        msg.contains("subnet is 10.91.0.0/24 in berth, 10.99.0.0/24 in the configuration"),
        "{msg}"
    );

    // STATUS and GC need 1.1.0; GC removes what the runtime no longer knows.
    ok(&h, "berth-cni", &[("CNI_COMMAND", "STATUS")], &c);
    fails(&h, &[("CNI_COMMAND", "STATUS")], &c04, 1);
    let gc = conf(
        &h,
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "ctr-b", "ifname": "eth0"}]}),
    );
    ok(&h, "berth-cni", &[("CNI_COMMAND", "GC")], &gc);
    let eps = h.json(&["endpoint", "ls"]);
    assert_eq!(eps.as_array().unwrap().len(), 1);
    assert_eq!(eps[0]["container_id"], "ctr-b");

    // DEL releases the address, is idempotent, works without the namespace and for unknowns.
    ok(&h, "berth-cni", &env("DEL", "ctr-b", &b.netns()), &c);
    ok(&h, "berth-cni", &env("DEL", "ctr-b", &b.netns()), &c);
    ok(
        &h,
        "berth-cni",
        &[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "never-seen"),
            ("CNI_IFNAME", "eth0"),
        ],
        &c,
    );
    assert!(h.json(&["endpoint", "ls"]).as_array().unwrap().is_empty());
    h.eventually("addresses are released", || allocations(&h) == 2);
}

#[test]
fn bad_requests_get_the_spec_error_codes() {
    let h = Host::new();
    let ctr = Container::start();
    let c = conf(&h, "1.1.0", json!({}));
    let netns = ctr.netns();
    fails(
        &h,
        &[
            ("CNI_CONTAINERID", "x"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
        ],
        &c,
        4,
    );
    fails(
        &h,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
        ],
        &c,
        4,
    );
    fails(
        &h,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "/bad"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
        ],
        &c,
        4,
    );
    fails(
        &h,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "a/b"),
        ],
        &c,
        4,
    );
    fails(&h, &[("CNI_COMMAND", "FROB")], &c, 4);
    let (ok6, out) = h.cni("berth-cni", &env("ADD", "x", &netns), &json!("{not json"));
    assert!(!ok6 && out["code"] == 6 || out["code"] == 7, "{out}");
    fails(
        &h,
        &env("ADD", "x", &netns),
        &json!({"cniVersion": "1.1.0", "type": "berth-cni"}),
        7,
    );
    fails(
        &h,
        &env("ADD", "x", &netns),
        &conf(&h, "0.3.1", json!({})),
        1,
    );
    fails(
        &h,
        &env("ADD", "x", &netns),
        &conf(&h, "1.1.0", json!({"subnet": "10.91.0.0/33"})),
        7,
    );
    fails(
        &h,
        &env("ADD", "x", &netns),
        &conf(&h, "1.1.0", json!({"runtimeConfig": {"ips": ["10.1.2.3"]}})),
        7,
    );
    assert!(
        h.json(&["endpoint", "ls"]).as_array().unwrap().is_empty(),
        "nothing half-applied"
    );

    // The daemon is down: ADD says try again later, STATUS says not available, both at once.
    h.stop();
    let t = std::time::Instant::now();
    fails(&h, &env("ADD", "x", &netns), &c, 11);
    fails(&h, &[("CNI_COMMAND", "STATUS")], &c, 50);
    assert!(t.elapsed() < std::time::Duration::from_secs(5), "no hang");
}

#[test]
fn fifty_parallel_adds_get_distinct_reachable_addresses() {
    let h = Host::new();
    let c = conf(&h, "1.1.0", json!({"ipv6Subnet": null}));
    let c = {
        let mut c = c;
        c.as_object_mut().unwrap().remove("ipv6Subnet");
        c
    };
    let ctrs: Vec<Container> = (0..50).map(|_| Container::start()).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = ctrs
            .iter()
            .enumerate()
            .map(|(i, ctr)| {
                let (h, c) = (&h, &c);
                s.spawn(move || {
                    let cid = format!("par-{i}");
                    ok(h, "berth-cni", &env("ADD", &cid, &ctr.netns()), c)
                })
            })
            .collect();
        hs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = results.iter().map(|r| addr(r, 0)).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 50);
    for (ctr, r) in ctrs.iter().zip(&results).step_by(7) {
        let p = h.in_netns(
            std::path::Path::new(&ctr.netns()),
            &["ping", "-c1", "-W1", "10.91.0.1"],
        );
        assert!(p.status.success(), "{} reaches the gateway", addr(r, 0));
    }
    let first = addr(&results[0], 0);
    let p = h.in_netns(
        std::path::Path::new(&ctrs[49].netns()),
        &["ping", "-c1", "-W1", &first],
    );
    assert!(p.status.success());
}

#[test]
fn chained_with_the_reference_tuning_portmap_and_bandwidth_plugins() {
    let h = Host::new();
    let ctr = Container::start();
    let netns = ctr.netns();
    let list = json!({
        "cniVersion": "1.0.0", "name": "blue",
        "plugins": [
            {"type": "berth-cni", "socket": h.socket(), "subnet": "10.91.0.0/24"},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}, "runtimeConfig": {"bandwidth": {"ingressRate": 8000000, "ingressBurst": 1000000, "egressRate": 8000000, "egressBurst": 1000000}}},
        ]
    });
    // What libcni does: each plugin gets the network's name and version plus its own keys, and
    // (after the first) the previous plugin's result.
    let plugin_conf = |p: &Value, prev: Option<&Value>| {
        let mut c = p.clone();
        c["cniVersion"] = list["cniVersion"].clone();
        c["name"] = list["name"].clone();
        if let Some(prev) = prev {
            c["prevResult"] = prev.clone();
        }
        c
    };
    let plugins = list["plugins"].as_array().unwrap();
    let mut result: Option<Value> = None;
    for p in plugins {
        let kind = p["type"].as_str().unwrap();
        let out = ok(
            &h,
            kind,
            &env("ADD", "chain-1", &netns),
            &plugin_conf(p, result.as_ref()),
        );
        result = Some(out);
    }
    let result = result.unwrap();
    assert_eq!(
        addr(&result, 0),
        "10.91.0.2",
        "the chain passes berth's result through"
    );
    let host_if = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let sysctl = h.in_netns(
        std::path::Path::new(&netns),
        &["cat", "/proc/sys/net/ipv4/conf/eth0/arp_notify"],
    );
    assert_eq!(
        String::from_utf8_lossy(&sysctl.stdout).trim(),
        "1",
        "tuning ran on berth's interface"
    );
    let qdisc = h.sh(&["tc", "qdisc", "show", "dev", &host_if]);
    assert!(
        qdisc.contains("tbf"),
        "bandwidth shaped berth's host veth: {qdisc}"
    );
    let nat = h.sh(&["sh", "-c", "iptables-save -t nat 2>/dev/null || true"]);
    assert!(
        nat.contains("CNI-HOSTPORT-DNAT") && nat.contains("10.91.0.2:80"),
        "portmap used berth's address: {nat}"
    );
    // (portmap 1.1.1's CHECK is left out: it looks for an IPv6 chain it never made when the
    // container has no IPv6 address, whatever plugin came first.)
    for kind in ["berth-cni", "tuning", "bandwidth"] {
        let p = plugins.iter().find(|p| p["type"] == kind).unwrap();
        ok(
            &h,
            kind,
            &env("CHECK", "chain-1", &netns),
            &plugin_conf(p, Some(&result)),
        );
    }

    // DEL runs in reverse order with the final result; nothing of the container is left.
    for p in plugins.iter().rev() {
        ok(
            &h,
            p["type"].as_str().unwrap(),
            &env("DEL", "chain-1", &netns),
            &plugin_conf(p, Some(&result)),
        );
    }
    assert!(h.json(&["endpoint", "ls"]).as_array().unwrap().is_empty());
    let nat = h.sh(&["sh", "-c", "iptables-save -t nat 2>/dev/null || true"]);
    assert!(!nat.contains("10.91.0.2:80"), "{nat}");
    h.eventually("the veth is gone", || !h.host_links().contains(&host_if));
}

#[test]
fn daemon_killed_during_adds_leaks_nothing_and_calls_fail_fast() {
    let h = Host::new();
    let c = conf(&h, "1.1.0", json!({}));
    let ctrs: Vec<Container> = (0..60).map(|_| Container::start()).collect();
    let added = std::sync::atomic::AtomicUsize::new(0);
    // Four runtime workers ADD; the daemon is killed after a random number of successes.
    let outcomes: Vec<(usize, bool, u64, std::time::Duration)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (h, c, ctrs, added) = (&h, &c, &ctrs, &added);
                s.spawn(move || {
                    (t..60)
                        .step_by(4)
                        .map(|i| {
                            let cid = format!("k{i}");
                            let t0 = std::time::Instant::now();
                            let (ok, out) =
                                h.cni("berth-cni", &env("ADD", &cid, &ctrs[i].netns()), c);
                            if ok {
                                added.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            (i, ok, out["code"].as_u64().unwrap_or(0), t0.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let kill_after = fastrand::usize(5..40);
        while added.load(std::sync::atomic::Ordering::Relaxed) < kill_after {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        h.kill();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let failed: Vec<usize> = outcomes.iter().filter(|o| !o.1).map(|o| o.0).collect();
    assert!(!failed.is_empty(), "the daemon died before all ADDs");
    for (i, ok, code, took) in &outcomes {
        if !ok {
            assert!(
                *code == 11 || *code == 999,
                "ADD k{i} while the daemon died: code {code}"
            );
            assert!(
                *took < std::time::Duration::from_secs(15),
                "ADD k{i} hung for {took:?}"
            );
        }
    }

    // Restart; the runtime DELs what failed and tries again.
    h.start();
    for i in &failed {
        ok(
            &h,
            "berth-cni",
            &env("DEL", &format!("k{i}"), &ctrs[*i].netns()),
            &c,
        );
    }
    for i in &failed {
        ok(
            &h,
            "berth-cni",
            &env("ADD", &format!("k{i}"), &ctrs[*i].netns()),
            &c,
        );
    }
    let eps = h.json(&["endpoint", "ls", "--network", "blue"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 60);
    let mut v4: Vec<&str> = eps.iter().map(|e| e["ips"][0].as_str().unwrap()).collect();
    v4.sort();
    v4.dedup();
    assert_eq!(v4.len(), 60, "no address twice");
    h.eventually("every allocation belongs to an endpoint", || {
        allocations(&h) == 2 + 2 * 60
    });
    let veths = h
        .host_links()
        .into_iter()
        .filter(|l| l.starts_with("berth") && !l.starts_with("berth-"))
        .count();
    assert_eq!(veths, 60, "one veth per endpoint");
    for ctr in ctrs.iter().step_by(6) {
        let p = h.in_netns(
            std::path::Path::new(&ctr.netns()),
            &["ping", "-c1", "-W1", "10.91.0.1"],
        );
        assert!(p.status.success());
    }
}

#[test]
fn labels_from_the_config_and_the_pod() {
    let h = Host::new();
    let c = Container::start();
    let netns = c.netns();
    let mut e = env("ADD", "cid-lbl", &netns);
    e.push((
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
    ));
    let good = conf(
        &h,
        "1.1.0",
        json!({"args": {"cni": {"labels": [{"key": "app", "value": "web"}]}}}),
    );
    ok(&h, "berth-cni", &e, &good);
    let eps = h.json(&["endpoint", "ls", "--network", "blue"]);
    assert_eq!(
        eps[0]["labels"],
        json!({
            "app": "web",
            "io.kubernetes.pod.namespace": "shop",
            "io.kubernetes.pod.name": "web-0",
        })
    );
    // A label the rules refuse: the config's fault (code 7), and nothing is made.
    let c2 = Container::start();
    let netns2 = c2.netns();
    let bad = json!({"args": {"cni": {"labels": [{"key": "-app", "value": "web"}]}}});
    let msg = fails(
        &h,
        &env("ADD", "cid-lbl2", &netns2),
        &conf(&h, "1.1.0", bad),
        7,
    );
    assert!(msg.contains("invalid label"), "{msg}");
    assert_eq!(
        h.json(&["endpoint", "ls", "--network", "blue"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The pod is a backend of a service that selects it by its labels, like any endpoint.
    let _server = crate::services::Identify::start(std::path::Path::new(&netns), "pod", 8080);
    let svc = h.json(&[
        "service",
        "create",
        "shop-web",
        "--network",
        "blue",
        "--selector",
        "io.kubernetes.pod.namespace=shop,app=web",
        "--port",
        "80:8080",
    ]);
    assert_eq!(svc["backends"].as_array().unwrap().len(), 1, "{svc}");
    h.ok(&["sandbox", "create", "client"]);
    h.ok(&["attach", "client", "--network", "blue"]);
    let vip = svc["vips"][0].as_str().unwrap();
    let got = crate::services::ask(&h.sandbox_path("client"), &format!("{vip}:80")).unwrap();
    assert!(got.starts_with("pod "), "{got}");
}

/// A configuration whose lists are over the caps the daemon holds an attach to is refused
/// with code 7 naming the key, before anything is asked of the daemon (not even the network
/// is made); `CNI_*` variables over their lengths are code 4 naming the variable.
#[test]
fn over_cap_configs_and_variables_get_codes_7_and_4_and_change_nothing() {
    let h = Host::new();
    let ctr = Container::start();
    let netns = ctr.netns();
    let before = h.snapshot();
    let list = |n: usize, f: &dyn Fn(usize) -> Value| Value::Array((0..n).map(f).collect());
    let add = env("ADD", "c1", &netns);
    // (environment, configuration, message)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Value, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            add.clone(),
            conf(
                &h,
                "1.1.0",
                json!({"args": {"cni": {"labels": list(1025, &|i| {
                    json!({"key": format!("l{i}"), "value": "v"})
                })}}}),
            ),
            "invalid args.cni.labels (with CNI_ARGS' pod name and namespace): too many labels: 1025 given, at most 1024 per endpoint",
        ),
        (
            add.clone(),
            conf(
                &h,
                "1.1.0",
                json!({"args": {"cni": {"namedPorts": list(1025, &|i| {
                    json!({"name": format!("p{i}"), "port": i + 1})
                })}}}),
            ),
            "invalid args.cni.namedPorts: too many named ports (named_ports): 1025 given, at most 1024 per endpoint",
        ),
        (
            add.clone(),
            conf(
                &h,
                "1.1.0",
                json!({"runtimeConfig": {"aliases": {"blue": list(257, &|i| {
                    json!(format!("a{i}"))
                })}}}),
            ),
            "invalid runtimeConfig.aliases: too many aliases: 257 given, at most 256 per endpoint",
        ),
        (
            add.clone(),
            conf(
                &h,
                "1.1.0",
                json!({"runtimeConfig": {"portMappings": list(4097, &|i| {
                    json!({"hostPort": i + 1, "containerPort": 80})
                })}}),
            ),
            "invalid runtimeConfig.portMappings: too many published ports (ports): 4097 given, at most 4096 per endpoint",
        ),
        (
            add.clone(),
            conf(
                &h,
                "1.1.0",
                json!({"runtimeConfig": {"ips": ["10.91.0.5", "fd00:91::5", "10.91.0.6"]}}),
            ),
            "invalid runtimeConfig.ips (with CNI_ARGS IP): too many ips: 3 given, at most 2 per endpoint (one per address family)",
        ),
        (
            vec![("CNI_COMMAND", "GC")],
            conf(
                &h,
                "1.1.0",
                json!({"cni.dev/valid-attachments": list(8193, &|i| {
                    json!({"containerID": format!("c{i}"), "ifname": "eth0"})
                })}),
            ),
            "invalid cni.dev/valid-attachments: too many valid attachments: 8193 given, at most 8192 per request",
        ),
    ];
    for (env, conf, expected) in &cases {
        let msg = fails(&h, env, conf, 7);
        assert_eq!(msg, *expected);
        assert_eq!(h.snapshot(), before, "{expected}: changed something");
    }

    let long_args = "a".repeat((16 << 10) + 1);
    let long_path = "p".repeat((16 << 10) + 1);
    let long_cid = "c".repeat(129);
    let long_netns = format!("/{}", "n".repeat(4095));
    let vars = [
        (
            "CNI_ARGS",
            long_args.as_str(),
            "invalid CNI_ARGS: 16385 bytes long, at most 16384",
        ),
        (
            "CNI_PATH",
            long_path.as_str(),
            "invalid CNI_PATH: 16385 bytes long, at most 16384",
        ),
        (
            "CNI_CONTAINERID",
            long_cid.as_str(),
            "invalid CNI_CONTAINERID: 129 bytes long, at most 128",
        ),
        (
            "CNI_NETNS",
            long_netns.as_str(),
            "invalid CNI_NETNS: 4096 bytes long, at most 4095",
        ),
        (
            "CNI_ARGS",
            "IP=10.91.0.5,10.91.0.6,10.91.0.7",
            "invalid CNI_ARGS IP: too many ips: 3 given, at most 2 per endpoint",
        ),
    ];
    let c = conf(&h, "1.1.0", json!({}));
    for (key, value, expected) in vars {
        let mut with = add.clone();
        with.retain(|(k, _)| *k != key);
        with.push((key, value));
        let msg = fails(&h, &with, &c, 4);
        assert!(msg.starts_with(expected), "{key}: {msg}");
        assert_eq!(h.snapshot(), before, "{key}: changed something");
    }
}

/// The reported fault: a 34 MB configuration was read whole into 926 MB and answered with
/// code 11 (try again). berth-cni reads no more than the daemon's request limit and answers
/// code 7 at once, naming the size (a file's, known) or that it is over the limit (a pipe's).
#[test]
fn a_huge_config_is_refused_at_once_without_reading_it() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let h = Host::new();
    let ctr = Container::start();
    let netns = ctr.netns();
    let before = h.snapshot();
    // Valid JSON, as a runtime would send, 34 MB of labels.
    let mut huge = conf(&h, "1.0.0", json!({})).to_string().into_bytes();
    huge.truncate(huge.len() - 1);
    huge.extend_from_slice(br#","args":{"cni":{"labels":["#);
    let mut i = 0;
    while huge.len() < 34_000_000 {
        huge.extend_from_slice(format!(r#"{{"key":"l{i}","value":"v"}},"#).as_bytes());
        i += 1;
    }
    huge.extend_from_slice(br#"{"key":"last","value":"v"}]}}}"#);
    let file = h.dir.join("huge.json");
    std::fs::write(&file, &huge).unwrap();

    let run = |stdin: Stdio| {
        Command::new("nsenter")
            .arg(format!("--net={}", h.netns_path()))
            .arg(crate::harness::BERTH_CNI)
            .env_clear()
            .envs(env("ADD", "c1", &netns))
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let answer = |out: std::process::Output| -> Value {
        assert!(!out.status.success());
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    };

    // Through a pipe, as runtimes hand it over: the writer is cut off once berth-cni has read
    // its limit.
    let started = Instant::now();
    let mut child = run(Stdio::piped());
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut written = 0;
        for chunk in huge.chunks(64 << 10) {
            if stdin.write_all(chunk).is_err() {
                break;
            }
            written += chunk.len();
        }
        written
    });
    let out = answer(child.wait_with_output().unwrap());
    let elapsed = started.elapsed();
    let written = writer.join().unwrap();
    assert_eq!(out["code"], 7, "{out}");
    assert_eq!(out["cniVersion"], "1.1.0", "{out}");
    assert_eq!(
        out["msg"],
        "the network configuration is over 2097152 bytes, more than the 2097152 bytes berth-cni reads (the daemon's request limit)"
    );
    assert!(
        written < 4 << 20,
        "berth-cni took {written} bytes of the configuration"
    );
    assert!(elapsed < Duration::from_secs(5), "answered in {elapsed:?}");

    // From a file: its size is known, and named.
    let out = answer(
        run(Stdio::from(std::fs::File::open(&file).unwrap()))
            .wait_with_output()
            .unwrap(),
    );
    assert_eq!(out["code"], 7, "{out}");
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(
        out["msg"],
        format!(
            "the network configuration is {size} bytes, more than the 2097152 bytes berth-cni reads (the daemon's request limit)"
        )
    );
    assert_eq!(h.snapshot(), before, "nothing was made");
}
