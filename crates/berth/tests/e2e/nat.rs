//! The outside world: masquerade, isolation, published ports and rules that survive. Each
//! test host gets a second host namespace on a veth "underlay" (see `Outside`).

use std::time::{Duration, Instant};

use crate::harness::{
    HOST_UNDERLAY_IP, Host, OUTSIDE_IP, Outside, PeerEcho, run, tcp_peer, udp_peer,
};

fn nft(h: &Host, args: &str) -> String {
    let mut cmd = vec!["nft"];
    cmd.extend(args.split(' '));
    h.sh(&cmd)
}

#[test]
fn masquerade_out_internal_stays_in_networks_are_isolated() {
    let h = Host::new();
    let out = Outside::new(&h);
    let _server = PeerEcho::start(&out.path(), 7000);
    for (net, subnet) in [
        ("blue", "10.91.0.0/24"),
        ("red", "10.92.0.0/24"),
        ("green", "10.93.0.0/24"),
    ] {
        h.ok(&["network", "create", net, "--subnet", subnet]);
        h.ok(&["sandbox", "create", net]);
        h.ok(&["attach", net, "--network", net]);
    }
    h.ok(&[
        "network",
        "create",
        "inner",
        "--subnet",
        "10.94.0.0/24",
        "--internal",
    ]);
    h.ok(&["sandbox", "create", "inner"]);
    h.ok(&["attach", "inner", "--network", "inner"]);

    let to_outside = format!("{OUTSIDE_IP}:7000");
    assert_eq!(
        tcp_peer(&h.sandbox_path("blue"), &to_outside).as_deref(),
        Some(HOST_UNDERLAY_IP),
        "TCP to another host leaves with the host's address"
    );
    assert_eq!(
        udp_peer(&h.sandbox_path("red"), &to_outside).as_deref(),
        Some(HOST_UNDERLAY_IP),
        "so does UDP"
    );
    assert_eq!(
        tcp_peer(&h.sandbox_path("inner"), &to_outside),
        None,
        "an internal network has no way out"
    );
    assert!(h.cannot_reach("inner", OUTSIDE_IP));

    // Every pair of networks, both ways, in parallel: nothing crosses.
    let ips = [
        ("blue", "10.91.0.2"),
        ("red", "10.92.0.2"),
        ("green", "10.93.0.2"),
        ("inner", "10.94.0.2"),
    ];
    std::thread::scope(|s| {
        for (from, _) in ips {
            for (to, ip) in ips.iter().filter(|(to, _)| *to != from) {
                let h = &h;
                s.spawn(move || {
                    assert!(h.cannot_reach(from, ip), "{from} must not reach {to}");
                });
            }
        }
    });

    // Another host routing to a container address directly does not get in either.
    run(
        "ip",
        &[
            "-n",
            &out.netns,
            "route",
            "add",
            "10.91.0.0/24",
            "via",
            HOST_UNDERLAY_IP,
        ],
    );
    let _inside = PeerEcho::start(&h.sandbox_path("blue"), 7001);
    assert_eq!(tcp_peer(&out.path(), "10.91.0.2:7001"), None);
    // The host itself reaches its containers.
    assert_eq!(
        tcp_peer(std::path::Path::new(&h.netns_path()), "10.91.0.2:7001").as_deref(),
        Some("10.91.0.1")
    );
}

#[test]
fn published_ports_from_outside_localhost_and_hairpin() {
    let h = Host::new();
    let out = Outside::new(&h);
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["sandbox", "create", "client"]);
    h.ok(&["attach", "client", "--network", "blue"]);
    let ep = h.json(&[
        "attach",
        "web",
        "--network",
        "blue",
        "--ip",
        "10.91.0.80",
        "--publish",
        "8080:80",
        "--publish",
        "127.0.0.1:5353:53/udp",
        "--publish",
        "9000-9002:9100-9102/tcp",
    ]);
    assert_eq!(ep["ports"].as_array().unwrap().len(), 5);
    let web = h.sandbox_path("web");
    let _servers: Vec<PeerEcho> = [80, 53, 9100, 9102]
        .into_iter()
        .map(|p| PeerEcho::start(&web, p))
        .collect();
    let host = std::path::PathBuf::from(h.netns_path());

    let published = format!("{HOST_UNDERLAY_IP}:8080");
    assert_eq!(
        tcp_peer(&out.path(), &published).as_deref(),
        Some(OUTSIDE_IP),
        "from another host, with the client's address preserved"
    );
    assert_eq!(
        tcp_peer(&host, "127.0.0.1:8080").as_deref(),
        Some("10.91.0.1"),
        "from the host's localhost"
    );
    assert!(
        tcp_peer(&host, &published).is_some(),
        "from the host's own address"
    );
    assert_eq!(
        tcp_peer(&h.sandbox_path("client"), &published).as_deref(),
        Some("10.91.0.1"),
        "hairpin: a container on the same network through the host's address"
    );
    assert!(tcp_peer(&web, &published).is_some(), "the container itself");
    assert!(
        udp_peer(&host, "127.0.0.1:5353").is_some(),
        "UDP on 127.0.0.1"
    );
    assert_eq!(
        udp_peer(&out.path(), &format!("{HOST_UNDERLAY_IP}:5353")),
        None,
        "a port published on 127.0.0.1 is not published elsewhere"
    );
    for port in [9000, 9002] {
        assert!(
            tcp_peer(&out.path(), &format!("{HOST_UNDERLAY_IP}:{port}")).is_some(),
            "range port {port}"
        );
    }
    assert_eq!(
        tcp_peer(&out.path(), &format!("{HOST_UNDERLAY_IP}:9003")),
        None
    );

    // A host port can be published once.
    h.ok(&["sandbox", "create", "other"]);
    for taken in ["8080:81", "127.0.0.1:8080:80", "9001:9001"] {
        let err = h.fails(&["attach", "other", "--network", "blue", "--publish", taken]);
        assert!(err.contains("already published"), "{taken}: {err}");
    }
    let o = h.berth(&[
        "attach",
        "other",
        "--network",
        "blue",
        "--publish",
        "1-2000:1-2000",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at most 1024"));
    assert_eq!(
        h.json(&["endpoint", "ls", "--network", "blue"])
            .as_array()
            .unwrap()
            .len(),
        2,
        "refused attaches left no endpoint"
    );
    h.ok(&[
        "attach",
        "other",
        "--network",
        "blue",
        "--publish",
        "8080:80/udp",
    ]);
}

#[test]
fn rules_come_back_after_a_flush_and_the_user_chain_is_honoured() {
    let h = Host::new();
    let out = Outside::new(&h);
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["attach", "web", "--network", "blue", "--publish", "8080:80"]);
    let _server = PeerEcho::start(&h.sandbox_path("web"), 80);
    let published = format!("{HOST_UNDERLAY_IP}:8080");
    assert!(tcp_peer(&out.path(), &published).is_some());

    // The operator's chain comes first and berth leaves it alone.
    nft(
        &h,
        "add rule inet berth user ip saddr 192.0.2.2 tcp dport 80 drop",
    );
    assert_eq!(
        tcp_peer(&out.path(), &published),
        None,
        "user drop honoured"
    );
    nft(&h, "flush chain inet berth publish");
    let restored = Instant::now();
    h.eventually("berth's rules are restored", || {
        nft(&h, "list chain inet berth publish").contains("dnat")
    });
    assert!(restored.elapsed() < Duration::from_secs(3));
    assert!(nft(&h, "list chain inet berth user").contains("192.0.2.2"));
    nft(&h, "flush chain inet berth user");
    assert!(tcp_peer(&out.path(), &published).is_some());

    // A firewall reload that flushes everything.
    nft(&h, "flush ruleset");
    let flushed = Instant::now();
    h.eventually("published port works again", || {
        tcp_peer(&out.path(), &published).is_some()
    });
    let took = flushed.elapsed();
    assert!(took < Duration::from_secs(3), "restored after {took:?}");

    // Detach takes the endpoint's elements out; nothing of it stays.
    h.ok(&["detach", "web", "--network", "blue"]);
    h.eventually("the detached endpoint's elements are removed", || {
        !nft(&h, "list table inet berth").contains("8080")
    });
    assert_eq!(tcp_peer(&out.path(), &published), None);
    h.ok(&["network", "rm", "blue"]);
    let table = nft(&h, "list table inet berth");
    assert!(
        !table.contains("berth-"),
        "no bridge left in the sets: {table}"
    );
}
