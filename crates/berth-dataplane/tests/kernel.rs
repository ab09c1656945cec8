//! The driver against the real kernel. Each test moves its own thread (the test harness gives
//! every test a fresh one) into a new network namespace that plays the host, so nothing touches
//! the machine's own network, and everything disappears with the thread and the temp dir.

use std::net::IpAddr;

use berth_dataplane::{BridgeSpec, EndpointSpec, Netlink, Repair, netns};
use ipnet::IpNet;
use nix::sched::{CloneFlags, unshare};

fn private_host() -> Netlink {
    unshare(CloneFlags::CLONE_NEWNET).expect("unshare: tests run as root");
    Netlink::open().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn bridge_endpoint_attach_repair_and_cleanup() {
    let mut host = private_host();
    let dir = tempfile::tempdir().unwrap();
    let sb_path = dir.path().join("sb1");
    netns::create(&sb_path).unwrap();
    let ns = netns::open(&sb_path).unwrap();

    let spec = BridgeSpec {
        name: "berth-test0".into(),
        mtu: 1400,
        mac: [0x02, 0, 0, 0, 0, 1],
        addresses: vec![net("10.9.0.1/24"), net("fd00:9::1/64")],
    };
    let bridge = berth_dataplane::ensure_bridge(&mut host, &spec).unwrap();
    assert_eq!(
        berth_dataplane::ensure_bridge(&mut host, &spec).unwrap(),
        bridge,
        "idempotent"
    );
    let mut addrs = host.addresses(bridge).unwrap();
    addrs.retain(|a| !matches!(a.addr(), IpAddr::V6(v6) if v6.segments()[0] == 0xfe80));
    assert_eq!(addrs, spec.addresses);

    let ips = [net("10.9.0.2/24"), net("fd00:9::2/64")];
    let gws: [IpAddr; 2] = ["10.9.0.1".parse().unwrap(), "fd00:9::1".parse().unwrap()];
    let ep = EndpointSpec {
        host_ifname: "berth0000000001".into(),
        bridge_index: bridge,
        mtu: 1400,
        ifname: "eth0".into(),
        mac: [0x02, 0x42, 0, 0, 0, 2],
        ips: ips.to_vec(),
        gateways: gws.to_vec(),
        hairpin: false,
    };
    berth_dataplane::attach_endpoint(&mut host, &ns, &ep).unwrap();
    let hl = host.link_by_name("berth0000000001").unwrap().unwrap();
    assert_eq!((hl.controller, hl.up, hl.mtu), (Some(bridge), true, 1400));

    let mut sb = Netlink::open_in(&ns).unwrap();
    let st = berth_dataplane::sandbox_state(&mut sb, "eth0").unwrap();
    assert!(st.link.as_ref().unwrap().up);
    for ip in &ips {
        assert!(st.addresses.contains(ip), "{ip} in {:?}", st.addresses);
    }
    assert_eq!(st.gateways, gws);

    // A second attach with the same interface name fails and leaves the first one intact.
    let dup = EndpointSpec {
        host_ifname: "berth0000000002".into(),
        ..ep.clone()
    };
    let err = berth_dataplane::attach_endpoint(&mut host, &ns, &dup).unwrap_err();
    assert_eq!(err.errno(), Some(libc_eexist()), "{err}");
    assert!(host.link_by_name("berth0000000002").unwrap().is_none());

    // Repair: nothing to do, then a removed address and route come back.
    assert_eq!(
        berth_dataplane::ensure_endpoint(&mut host, Some(&hl), &ns, &ep).unwrap(),
        Repair::Nothing
    );
    let idx = st.link.unwrap().index;
    sb.delete_link(idx).unwrap();
    assert_eq!(
        berth_dataplane::ensure_endpoint(&mut host, None, &ns, &ep).unwrap(),
        Repair::Recreated
    );
    assert_eq!(
        berth_dataplane::sandbox_state(&mut sb, "eth0")
            .unwrap()
            .gateways,
        gws
    );

    assert!(berth_dataplane::delete_link(&mut host, "berth0000000001").unwrap());
    assert!(!berth_dataplane::delete_link(&mut host, "berth0000000001").unwrap());
    assert!(
        berth_dataplane::sandbox_state(&mut sb, "eth0")
            .unwrap()
            .link
            .is_none(),
        "pair gone"
    );
    drop(sb);
    drop(ns);
    netns::remove(&sb_path).unwrap();
    assert!(!sb_path.exists());
    netns::remove(&sb_path).unwrap();
}

#[test]
fn open_rejects_a_plain_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plain");
    std::fs::write(&p, b"").unwrap();
    assert!(netns::open(&p).is_err());
    assert!(netns::id_at(&p).is_none());
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

fn nft_list(what: &str) -> String {
    let out = std::process::Command::new("nft")
        .args(["list"])
        .args(what.split(' '))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nftables_table_elements_and_damage_detection() {
    use berth_dataplane::nftables::{self, Forward, NetworkRules};
    use berth_model::{PortMapping, Protocol};
    let _host = private_host();
    let nets = [NetworkRules {
        bridge: "berth-test1".into(),
        internal: false,
        subnets: vec![net("10.9.0.0/24")],
        dns: vec![
            "10.9.0.1:53".parse().unwrap(),
            "[fd00:9::1]:53".parse().unwrap(),
        ],
    }];
    let fwd = |host_ip: Option<&str>, port: u16, target: &str| Forward {
        mapping: PortMapping {
            protocol: Protocol::Tcp,
            host_ip: host_ip.map(|s| s.parse().unwrap()),
            host_port: port,
            container_port: 80,
        },
        target: target.parse().unwrap(),
    };
    let installed = fwd(None, 8080, "10.9.0.2");
    nftables::install(&nets, &[installed]).unwrap();
    assert!(nftables::intact().unwrap());
    assert!(nft_list("map inet berth ports4_any").contains("tcp . 8080 : 10.9.0.2 . 80"));
    assert!(nft_list("set inet berth dns4").contains("10.9.0.1 . 53"));
    assert!(nft_list("set inet berth dns6").contains("fd00:9::1 . 53"));

    // In-process elements land where nft's own text puts them.
    let added = [
        fwd(Some("127.0.0.1"), 8081, "10.9.0.3"),
        fwd(None, 8082, "fd00:9::3"),
        fwd(Some("fd00:9::1"), 8083, "fd00:9::3"),
    ];
    nftables::add_forwards(&added).unwrap();
    assert!(
        nft_list("map inet berth ports4_ip").contains("127.0.0.1 . tcp . 8081 : 10.9.0.3 . 80")
    );
    assert!(nft_list("map inet berth ports6_any").contains("tcp . 8082 : fd00:9::3 . 80"));
    assert!(
        nft_list("map inet berth ports6_ip").contains("fd00:9::1 . tcp . 8083 : fd00:9::3 . 80")
    );
    nftables::add_forwards(&added).unwrap();

    // A clash with an element berth did not expect is refused and changes nothing.
    let clash = [fwd(None, 9000, "10.9.0.4"), fwd(None, 8080, "10.9.0.9")];
    assert!(nftables::add_forwards(&clash).is_err());
    assert!(!nft_list("map inet berth ports4_any").contains("9000"));

    // The operator's chain survives a reinstall.
    let status = std::process::Command::new("nft")
        .args([
            "add",
            "rule",
            "inet",
            "berth",
            "user",
            "ip",
            "saddr",
            "192.0.2.9",
            "drop",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    nftables::install(&nets, &[installed]).unwrap();
    assert!(nft_list("chain inet berth user").contains("192.0.2.9"));
    assert!(
        !nft_list("map inet berth ports4_ip").contains("8081"),
        "reinstall is exact"
    );

    nftables::add_forwards(&added).unwrap();
    nftables::delete_forwards(&added).unwrap();
    nftables::delete_forwards(&added).unwrap();
    assert!(!nft_list("table inet berth").contains("10.9.0.3"));

    let flush = |args: &[&str]| {
        assert!(
            std::process::Command::new("nft")
                .args(args)
                .status()
                .unwrap()
                .success()
        );
    };
    flush(&["flush", "chain", "inet", "berth", "publish"]);
    assert!(!nftables::intact().unwrap());
    nftables::install(&nets, &[installed]).unwrap();
    assert!(nftables::intact().unwrap());
    flush(&["flush", "ruleset"]);
    assert!(!nftables::intact().unwrap());
    assert!(
        nftables::add_forwards(&added).is_err(),
        "no table, no elements"
    );
    nftables::delete_forwards(&added).unwrap();
}
