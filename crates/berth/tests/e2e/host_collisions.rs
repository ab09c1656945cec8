//! Collisions with the host itself: a network over the host's own addresses and routes, a
//! published port a host process serves, and links that only look like berth's.

use std::net::{TcpListener, UdpSocket};
use std::path::Path;

use serde_json::{Value, json};

use crate::harness::{Container, HOST_UNDERLAY_IP, Host, Outside, PeerEcho, in_ns, tcp_peer};
use crate::plugin_fuzz::post;

/// A Docker IPAM RequestPool for `pool` ("" for any) on the plugin socket: the pool it got, or
/// the error it answered.
fn request_pool(h: &Host, pool: &str) -> Result<String, String> {
    let body = json!({"AddressSpace": "berth-local", "Pool": pool, "SubPool": "", "Options": {}, "V6": false});
    let (status, answer) = post(h, "IpamDriver.RequestPool", body.to_string().as_bytes());
    let v: Value = serde_json::from_slice(&answer).unwrap();
    match status {
        200 => Ok(v["Pool"].as_str().unwrap().to_string()),
        _ => Err(v["Err"].as_str().unwrap().to_string()),
    }
}

#[test]
fn a_subnet_over_the_hosts_own_addresses_and_routes_is_refused_naming_the_route() {
    let h = Host::new();
    // The underlay: 192.0.2.1/24 on under0, the router 192.0.2.2 beyond it.
    let _out = Outside::new(&h);
    h.sh(&["ip", "route", "add", "default", "via", "192.0.2.2"]);
    h.sh(&["ip", "route", "add", "10.50.0.0/16", "via", "192.0.2.2"]);
    h.sh(&["ip", "addr", "add", "198.51.100.7/32", "dev", "under0"]);
    h.sh(&[
        "ip",
        "addr",
        "add",
        "2001:db8:78::1/64",
        "dev",
        "under0",
        "nodad",
    ]);
    let before = h.snapshot();

    for (args, overlaps) in [
        // The underlay itself: the bridge would take the router's address.
        (
            vec!["--subnet", "192.0.2.0/24"],
            "subnet 192.0.2.0/24 overlaps the host's route 192.0.2.0/24 dev under0",
        ),
        // Inside it, and around it.
        (
            vec!["--subnet", "192.0.2.128/25"],
            "subnet 192.0.2.128/25 overlaps the host's route 192.0.2.0/24 dev under0",
        ),
        (
            vec!["--subnet", "192.0.0.0/16"],
            "subnet 192.0.0.0/16 overlaps the host's route 192.0.2.0/24 dev under0",
        ),
        // A route through a gateway (a VPN's, say).
        (
            vec!["--subnet", "10.50.3.0/24"],
            "subnet 10.50.3.0/24 overlaps the host's route 10.50.0.0/16 via 192.0.2.2 dev under0",
        ),
        // An address without a prefix route of its own.
        (
            vec!["--subnet", "198.51.100.0/24"],
            "subnet 198.51.100.0/24 overlaps the host's address 198.51.100.7 (dev under0)",
        ),
        (
            vec![
                "--subnet",
                "10.92.0.0/24",
                "--ipv6-subnet",
                "2001:db8:78::/64",
            ],
            "subnet 2001:db8:78::/64 overlaps the host's route 2001:db8:78::/64 dev under0",
        ),
    ] {
        let mut a = vec!["network", "create", "x"];
        a.extend(args);
        let err = h.fails(&a);
        assert!(err.contains(overlaps), "{a:?}: {err}");
    }
    // Through Docker's IPAM too.
    let err = request_pool(&h, "192.0.2.0/24").unwrap_err();
    assert!(
        err.contains("pool 192.0.2.0/24 overlaps the host's route 192.0.2.0/24 dev under0"),
        "{err}"
    );
    assert_eq!(h.snapshot(), before, "a refused subnet changes nothing");
    let route = h.sh(&["ip", "route", "get", "192.0.2.2"]);
    assert!(
        route.contains("dev under0"),
        "the router stays beyond the underlay: {route}"
    );

    // The default route is not a collision (every subnet is inside it), nor are berth's own
    // bridges' routes: another network's overlap is named as that network.
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    let err = h.fails(&["network", "create", "x", "--subnet", "10.91.0.0/25"]);
    assert!(
        err.contains("subnet 10.91.0.0/25 overlaps 10.91.0.0/24 of network \"blue\""),
        "{err}"
    );

    // A carved subnet skips the host's routes, from berth and from Docker's IPAM alike.
    h.sh(&["ip", "route", "add", "10.210.0.0/24", "via", "192.0.2.2"]);
    let auto = h.json(&["network", "create", "auto"]);
    assert_eq!(auto["subnets"][0]["cidr"], "10.210.1.0/24", "{auto}");
    assert_eq!(request_pool(&h, "").unwrap(), "10.210.2.0/24");
    // A route over the whole default pool is named when nothing is left to carve.
    h.sh(&["ip", "route", "add", "10.208.0.0/12", "via", "192.0.2.2"]);
    let err = h.fails(&["network", "create", "full"]);
    assert!(
        err.contains("the default pool 10.210.0.0/16 is used up: all of it is under the host's route 10.208.0.0/12 via 192.0.2.2 dev under0; give --subnet"),
        "{err}"
    );
}

/// Binds sockets in the host namespace, as the host's own services would.
fn host_sockets(h: &Host) -> (TcpListener, UdpSocket, TcpListener) {
    in_ns(Path::new(&h.netns_path()), || {
        (
            TcpListener::bind("0.0.0.0:2222").unwrap(),
            UdpSocket::bind("127.0.0.1:5353").unwrap(),
            // Dual-stack: IPv4 too.
            TcpListener::bind("[::]:2379").unwrap(),
        )
    })
}

#[test]
fn a_published_port_a_host_process_serves_is_refused_unless_forced() {
    let h = Host::new();
    let out = Outside::new(&h);
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    for sb in ["web", "dns", "other"] {
        h.ok(&["sandbox", "create", sb]);
    }
    let _held = host_sockets(&h);
    let me = format!("pid {}", std::process::id());
    let before = h.snapshot();
    for (publish, listener) in [
        ("2222:80", "tcp 0.0.0.0:2222"),
        ("192.0.2.1:2222:80", "tcp 0.0.0.0:2222"),
        // A socket on one address takes a port published on every address.
        ("5353:53/udp", "udp 127.0.0.1:5353"),
        ("127.0.0.1:5353:53/udp", "udp 127.0.0.1:5353"),
        // `::` takes IPv4 too.
        ("192.0.2.1:2379:2379", "tcp [::]:2379"),
    ] {
        let err = h.fails(&["attach", "web", "--network", "blue", "-p", publish]);
        for part in [
            "address already in use on the host by ",
            listener,
            &me,
            "--force",
        ] {
            assert!(err.contains(part), "-p {publish}: {part:?} not in {err}");
        }
    }
    // CNI: a runtime has no way to force, and is told why.
    let ctr = Container::start();
    let conf = json!({"cniVersion": "1.0.0", "name": "blue", "type": "berth-cni",
        "socket": h.socket(), "subnet": "10.91.0.0/24",
        "runtimeConfig": {"portMappings": [{"hostPort": 2222, "containerPort": 80, "protocol": "tcp"}]}});
    let netns = ctr.netns();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "ctr-p"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, answer) = h.cni("berth-cni", &env, &conf);
    let msg = answer["msg"].as_str().unwrap_or_default();
    assert!(
        !ok && msg.contains("address already in use") && !msg.contains("--force"),
        "{answer}"
    );
    assert_eq!(h.snapshot(), before, "a refused port changes nothing");

    // Elsewhere than the socket's address, the port is free: the socket on 127.0.0.1 only.
    h.ok(&[
        "attach",
        "other",
        "--network",
        "blue",
        "-p",
        "192.0.2.1:5353:53/udp",
    ]);
    // berth's own DNS servers on the gateways do not count.
    h.ok(&[
        "attach",
        "dns",
        "--network",
        "blue",
        "-p",
        "53:53/udp",
        "-p",
        "53:53/tcp",
    ]);

    // Forced, the port is the container's: connections from outside reach it, not the host's
    // process (which never answers).
    let _echo = PeerEcho::start(&h.sandbox_path("web"), 80);
    h.ok(&[
        "attach",
        "web",
        "--network",
        "blue",
        "-p",
        "2222:80",
        "--force",
    ]);
    let published = format!("{HOST_UNDERLAY_IP}:2222");
    h.eventually("the forced port reaches the container", || {
        tcp_peer(&out.path(), &published).is_some_and(|seen| seen == "192.0.2.2")
    });
}

/// `ip -d link show NAME`'s alias line, if any.
fn alias(h: &Host, link: &str) -> Option<String> {
    let v: Value = serde_json::from_str(&h.sh(&["ip", "-j", "link", "show", link])).unwrap();
    v[0]["ifalias"].as_str().map(str::to_string)
}

#[test]
fn only_links_berth_marked_as_its_own_are_removed_at_start() {
    let h = Host::new();
    let blue = h.json(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "a"]);
    let ep = h.json(&["attach", "a", "--network", "blue"]);
    let (bridge, veth) = (
        blue["bridge"].as_str().unwrap().to_string(),
        ep["host_ifname"].as_str().unwrap().to_string(),
    );
    // Everything berth makes carries its mark.
    for link in [&bridge, &veth] {
        assert_eq!(alias(&h, link).as_deref(), Some("berth"), "{link}");
    }
    // An operator's links whose names look like berth's.
    h.sh(&[
        "ip",
        "link",
        "add",
        "berth-c0ffee",
        "type",
        "veth",
        "peer",
        "name",
        "berthbeef01",
    ]);
    h.sh(&["ip", "link", "add", "berth-0ddba11", "type", "bridge"]);
    // A stray of berth's own, as a crash mid-attach leaves one: marked, unknown to the store.
    h.sh(&[
        "ip",
        "link",
        "add",
        "berth12345abcd",
        "type",
        "veth",
        "peer",
        "name",
        "strayp",
    ]);
    h.sh(&["ip", "link", "set", "berth12345abcd", "alias", "berth"]);
    // A link of a berth from before marks: known to the store, so it gets the mark.
    h.sh(&["ip", "link", "set", &bridge, "alias", ""]);
    assert_eq!(alias(&h, &bridge), None);

    h.kill();
    h.start();
    let links = h.host_links();
    for kept in [
        "berth-c0ffee",
        "berthbeef01",
        "berth-0ddba11",
        &bridge,
        &veth,
    ] {
        assert!(links.iter().any(|l| l == kept), "{kept} kept: {links:?}");
    }
    for gone in ["berth12345abcd", "strayp"] {
        assert!(
            !links.iter().any(|l| l == gone),
            "{gone} removed: {links:?}"
        );
    }
    assert_eq!(alias(&h, &bridge).as_deref(), Some("berth"));
    let log = h.log();
    for left in ["berth-c0ffee", "berthbeef01", "berth-0ddba11"] {
        assert!(
            log.lines()
                .any(|l| l.contains("left alone") && l.contains(left)),
            "{left} logged:\n{log}"
        );
    }
    assert!(
        log.contains("1 stray links removed (3 unmarked left)"),
        "{log}"
    );
    // The endpoint works on.
    let gw = blue["subnets"][0]["gateway"].as_str().unwrap();
    assert!(h.reaches("a", gw));
}
