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

/// Runs `nft` (a test tool only: berth itself speaks nfnetlink) in this thread's namespace.
fn nft_output(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft is installed on test machines");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn nft(args: &str) {
    let out = nft_output(&args.split(' ').collect::<Vec<_>>(), None);
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nft_list(what: &str) -> String {
    let mut args = vec!["list"];
    args.extend(what.split(' '));
    String::from_utf8_lossy(&nft_output(&args, None).stdout).into_owned()
}

/// `nft --debug=netlink list table inet berth`: every element's bytes and every rule's
/// expressions as libnftnl prints them, without the handles, each set's elements sorted
/// (a hash set's order is its random seed's).
fn nft_expressions() -> String {
    let out = nft_output(&["--debug=netlink", "list", "table", "inet", "berth"], None);
    let mut blocks: Vec<Vec<String>> = Vec::new();
    // The debug dump comes before the listing; rule headers carry handles.
    for l in String::from_utf8_lossy(&out.stdout)
        .lines()
        .take_while(|l| !l.starts_with("table "))
    {
        match l.strip_prefix("inet berth ") {
            Some(rest) => blocks.push(vec![format!(
                "inet berth {}",
                rest.split(' ').next().unwrap_or("")
            )]),
            None => blocks
                .last_mut()
                .expect("a header first")
                .push(l.to_string()),
        }
    }
    for b in &mut blocks {
        if b[0].contains('@') {
            b[1..].sort();
        }
    }
    blocks.concat().join("\n")
}

mod fw {
    use berth_dataplane::nftables::{Forward, NetworkRules, ServiceRules};
    use berth_model::{PortMapping, Protocol};

    pub fn fwd(protocol: Protocol, host_ip: Option<&str>, port: u16, target: &str) -> Forward {
        Forward {
            mapping: PortMapping {
                protocol,
                host_ip: host_ip.map(|s| s.parse().unwrap()),
                host_port: port,
                container_port: 80,
            },
            target: target.parse().unwrap(),
        }
    }

    pub fn network(bridge: &str, internal: bool, subnets: &[&str], dns: &[&str]) -> NetworkRules {
        NetworkRules {
            bridge: bridge.into(),
            internal,
            subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
            dns: dns.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    /// Something in every set and map, adjacent subnets in the interval sets.
    pub fn sample() -> (Vec<NetworkRules>, Vec<Forward>) {
        let nets = vec![
            network(
                "berth-a",
                false,
                &["10.9.0.0/24", "fd00:9::/64"],
                &["10.9.0.1:53", "[fd00:9::1]:53"],
            ),
            network("berth-b", false, &["10.9.1.0/24"], &["10.9.1.1:53"]),
            network("berth-c", true, &["10.9.2.0/24"], &[]),
        ];
        let fwds = vec![
            fwd(Protocol::Tcp, None, 8080, "10.9.0.2"),
            fwd(Protocol::Udp, Some("127.0.0.1"), 5353, "10.9.0.3"),
            fwd(Protocol::Sctp, None, 8082, "fd00:9::3"),
            fwd(Protocol::Tcp, Some("fd00:9::1"), 8083, "fd00:9::3"),
        ];
        (nets, fwds)
    }

    /// Service ranges of both families; node ports source-NATed to an address in IPv4 and
    /// masqueraded in IPv6.
    pub fn services() -> ServiceRules {
        ServiceRules {
            ranges: vec![
                "10.96.0.0/16".parse().unwrap(),
                "10.98.0.0/16".parse().unwrap(),
                "fd96::/112".parse().unwrap(),
            ],
            nodeport_source4: Some("192.0.2.1".parse().unwrap()),
            nodeport_source6: None,
        }
    }
}

#[test]
fn nftables_install_writes_what_the_nft_script_writes() {
    use berth_dataplane::nftables;
    let (nets, fwds) = fw::sample();
    let svcs = fw::services();
    let script = nftables::ruleset(&nets, &fwds, &svcs);
    // The old way, `nft -f`, in a namespace of its own.
    let (nets2, fwds2, svcs2) = (nets.clone(), fwds.clone(), svcs.clone());
    let (theirs, their_exprs) = std::thread::spawn(move || {
        let _host = private_host();
        let out = nft_output(&["-f", "-"], Some(&script));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // berth's check finds nft's table to be exactly berth's.
        assert_eq!(
            nftables::check(&nets2, &fwds2, &svcs2).unwrap(),
            Vec::<String>::new()
        );
        (nft_list("table inet berth"), nft_expressions())
    })
    .join()
    .unwrap();

    let _host = private_host();
    nftables::install(&nets, &fwds, &svcs).unwrap();
    assert_eq!(nft_list("table inet berth"), theirs);
    assert_eq!(nft_expressions(), their_exprs);
    assert!(theirs.contains("10.9.0.0/24, 10.9.1.0/24"), "{theirs}");
    assert!(their_exprs.contains(
        "[ nat dnat ip6 addr_min reg 1 addr_max reg 1 proto_min reg 2 proto_max reg 2 flags 0x3 ]"
    ));
    // The service rules are there, down to the last balancing chain.
    for rule in [
        "ip daddr . meta l4proto . th dport vmap @svc4",
        "meta nfproto ipv6 meta l4proto . th dport vmap @nodeports6",
        "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 256 map @backends6",
        "@nodeport_keys4 snat ip to 192.0.2.1",
        "@nodeport_keys6 masquerade",
        "ip saddr . ip daddr @hairpin4 masquerade",
        "ct original ip6 daddr @service_ranges6 accept",
        "meta l4proto tcp reject with tcp reset",
        "elements = { 10.96.0.0/16, 10.98.0.0/16 }",
    ] {
        assert!(theirs.contains(rule), "{rule}");
    }
    assert_eq!(
        nftables::check(&nets, &fwds, &svcs).unwrap(),
        Vec::<String>::new()
    );
}

#[test]
fn nftables_reinstall_keeps_the_user_chain_and_a_refused_batch_changes_nothing() {
    use berth_dataplane::nftables::{self, Backend, Frontend, LoadBalancer, Pool, ServiceRules};
    let _host = private_host();
    let (nets, fwds) = fw::sample();
    let (svcs, none) = (fw::services(), ServiceRules::default());
    nftables::install(&nets, &fwds, &svcs).unwrap();
    nft("add rule inet berth user ip saddr 192.0.2.9 drop");
    // The load balancer's elements and chains are its own: a reinstall keeps them.
    let web = Frontend::Vip {
        vip: "10.96.0.10".parse().unwrap(),
        protocol: berth_model::Protocol::Tcp,
        port: 80,
    };
    let pool = Pool {
        backends: [Backend {
            addr: "10.9.0.2".parse().unwrap(),
            port: 8443,
            local: true,
        }]
        .into(),
        affinity: Some(30),
    };
    LoadBalancer::from_kernel()
        .unwrap()
        .apply(&[(web, Some(pool.clone()))])
        .unwrap();
    let fewer = [fw::network("berth-z", false, &["10.8.0.0/24"], &[])];
    let one = [fw::fwd(berth_model::Protocol::Tcp, None, 9999, "10.8.0.2")];
    nftables::install(&fewer, &one, &none).unwrap();
    assert!(nft_list("chain inet berth user").contains("192.0.2.9"));
    assert_eq!(
        nftables::check(&fewer, &one, &none).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(LoadBalancer::from_kernel().unwrap().pool(&web), Some(pool));
    assert!(nft_list("chain inet berth remember_30").contains("timeout 30s"));
    assert!(!nft_list("set inet berth service_ranges4").contains("10.96"));
    let table = nft_list("table inet berth");
    assert!(
        !table.contains("berth-a") && !table.contains("8080"),
        "{table}"
    );

    // A set of another type where berth's should be: the kernel refuses the batch, and
    // nothing of it happens (no flush, no new elements).
    nft("flush chain inet berth guard");
    nft("flush chain inet berth guard_out");
    nft("delete set inet berth dns4");
    nft("add set inet berth dns4 { type ipv4_addr ; }");
    let before = nft_list("table inet berth");
    let err = nftables::install(&nets, &fwds, &svcs).unwrap_err();
    assert!(err.to_string().contains("nftables"), "{err}");
    assert_eq!(nft_list("table inet berth"), before);
}

#[test]
fn nftables_elements_and_damage_detection() {
    use berth_dataplane::nftables::{self, Forward, ServiceRules};
    use berth_model::Protocol::Tcp;
    let _host = private_host();
    let no_services = ServiceRules::default();
    let nets = [fw::network(
        "berth-test1",
        false,
        &["10.9.0.0/24"],
        &["10.9.0.1:53", "[fd00:9::1]:53"],
    )];
    let installed = fw::fwd(Tcp, None, 8080, "10.9.0.2");
    let intact = |fwds: &[Forward]| nftables::check(&nets, fwds, &no_services).unwrap();
    let damaged = |what: &str| {
        let damage = nftables::check(&nets, &[installed], &no_services).unwrap();
        assert!(
            damage.iter().any(|d| d.contains(what)),
            "{what}: {damage:?}"
        );
    };
    let none: Vec<String> = Vec::new();
    assert_eq!(intact(&[]), vec!["table inet berth is missing"]);
    nftables::install(&nets, &[installed], &no_services).unwrap();
    assert_eq!(intact(&[installed]), none);
    assert!(nft_list("map inet berth ports4_any").contains("tcp . 8080 : 10.9.0.2 . 80"));
    assert!(nft_list("set inet berth dns4").contains("10.9.0.1 . 53"));
    assert!(nft_list("set inet berth dns6").contains("fd00:9::1 . 53"));

    // In-process elements land where nft's own text puts them.
    let added = [
        fw::fwd(Tcp, Some("127.0.0.1"), 8081, "10.9.0.3"),
        fw::fwd(Tcp, None, 8082, "fd00:9::3"),
        fw::fwd(Tcp, Some("fd00:9::1"), 8083, "fd00:9::3"),
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
    let mut all = added.to_vec();
    all.push(installed);
    assert_eq!(intact(&all), none);
    damaged("map ports4_ip: 0 of 0 elements missing, 1 unexpected");

    // A clash with an element berth did not expect is refused and changes nothing.
    let clash = [
        fw::fwd(Tcp, None, 9000, "10.9.0.4"),
        fw::fwd(Tcp, None, 8080, "10.9.0.9"),
    ];
    assert!(nftables::add_forwards(&clash).is_err());
    assert!(!nft_list("map inet berth ports4_any").contains("9000"));

    nftables::delete_forwards(&added).unwrap();
    nftables::delete_forwards(&added).unwrap();
    assert!(!nft_list("table inet berth").contains("10.9.0.3"));
    assert_eq!(intact(&[installed]), none);

    // Every kind of damage is seen, and a reinstall repairs it. Any change bumps the
    // generation; none leaves it.
    let mut generation = nftables::generation().unwrap();
    assert_eq!(nftables::generation().unwrap(), generation);
    for (change, what) in [
        (
            "flush set inet berth bridges",
            "set bridges: 1 of 1 elements missing",
        ),
        ("flush map inet berth ports4_any", "map ports4_any: 1 of 1"),
        ("flush set inet berth masq4", "set masq4: 2 of 2"),
        (
            "add element inet berth intra { \"x\" . \"y\" }",
            "set intra: 0 of 1 elements missing, 1 unexpected",
        ),
        (
            "flush chain inet berth publish",
            "chain publish has 0 rules instead of 6",
        ),
        (
            "insert rule inet berth into_network accept",
            "chain into_network has 6 rules",
        ),
        (
            "add chain inet berth forward { type filter hook forward priority filter ; policy drop ; }",
            "chain forward is not",
        ),
        (
            "add table inet berth { flags dormant ; }",
            "table inet berth is dormant",
        ),
        ("delete table inet berth", "table inet berth is missing"),
        ("flush ruleset", "table inet berth is missing"),
    ] {
        nft(change);
        let now = nftables::generation().unwrap();
        assert_ne!(now, generation, "{change}");
        damaged(what);
        nftables::install(&nets, &[installed], &no_services).unwrap();
        assert_eq!(intact(&[installed]), none, "repaired after {change}");
        generation = nftables::generation().unwrap();
    }
    // A deleted chain (after the rule that went to it).
    nft("flush chain inet berth forward");
    nft("delete chain inet berth into_network");
    damaged("chain into_network is missing");
    damaged("chain forward has 0 rules instead of 6");
    nftables::install(&nets, &[installed], &no_services).unwrap();
    assert_eq!(intact(&[installed]), none);
    // A deleted policy map (after the rules that look into it): its elements are not the
    // table's to compare, but it must be there.
    nft("flush chain inet berth policies");
    nft("delete map inet berth pol_tgt_in4");
    damaged("map pol_tgt_in4 is missing");
    nftables::install(&nets, &[installed], &no_services).unwrap();
    assert_eq!(intact(&[installed]), none);

    nft("flush ruleset");
    assert!(
        nftables::add_forwards(&added).is_err(),
        "no table, no elements"
    );
    nftables::delete_forwards(&added).unwrap();
}

#[test]
fn nftables_install_takes_a_batch_larger_than_a_socket_buffer() {
    use berth_dataplane::nftables;
    use berth_model::Protocol;
    let _host = private_host();
    let svcs = fw::services();
    let nets = [fw::network("berth-big", false, &["10.100.0.0/16"], &[])];
    // About 1.3 MB of elements: many messages in one batch, one send.
    let fwds: Vec<_> = (0..24_000u32)
        .map(|i| {
            let target = format!("10.100.{}.{}", i / 250, 2 + i % 250);
            let host_ip = (i % 2 == 0).then_some("127.0.0.1");
            fw::fwd(Protocol::Tcp, host_ip, 10_000 + (i / 2) as u16, &target)
        })
        .collect();
    nftables::install(&nets, &fwds, &svcs).unwrap();
    assert_eq!(
        nftables::check(&nets, &fwds, &svcs).unwrap(),
        Vec::<String>::new()
    );
    let listed = nft_list("map inet berth ports4_ip");
    assert_eq!(listed.matches(" : 10.100.").count(), 12_000);
    nftables::delete_forwards(&fwds[..100]).unwrap();
    assert_eq!(
        nftables::check(&nets, &fwds, &svcs).unwrap(),
        [
            "map ports4_any: 50 of 12000 elements missing, 0 unexpected",
            "map ports4_ip: 50 of 12000 elements missing, 0 unexpected"
        ]
    );
}

/// What the guard's check and a reinstall cost with 1,000 endpoints' worth of elements
/// (50 networks, 1,000 published ports) and with a small table, against `nft -f` of the same
/// table. A benchmark, not a test (medians printed, nothing asserted on time):
/// `cargo test -p berth-dataplane --test kernel -- --ignored --nocapture`.
#[test]
#[ignore]
fn nftables_cost_with_a_thousand_endpoints() {
    use berth_dataplane::nftables::{self, Forward, NetworkRules};
    use berth_model::Protocol;
    use std::time::{Duration, Instant};
    let _host = private_host();
    let none = fw::services();
    let nets: Vec<_> = (0..50)
        .map(|i| {
            fw::network(
                &format!("berth-{i:04x}"),
                false,
                &[&format!("10.{}.{}.0/24", 100 + i / 200, i % 200)],
                &[&format!("10.{}.{}.1:53", 100 + i / 200, i % 200)],
            )
        })
        .collect();
    let fwds: Vec<_> = (0..1000u16)
        .map(|i| {
            let target = format!("10.100.{}.{}", i / 20, 2 + i % 20);
            match i % 4 {
                0 => fw::fwd(Protocol::Udp, Some("127.0.0.1"), 20000 + i, &target),
                _ => fw::fwd(Protocol::Tcp, None, 20000 + i, &target),
            }
        })
        .collect();
    let median = |runs: usize, f: &mut dyn FnMut()| {
        let mut times: Vec<Duration> = (0..runs)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        times.sort();
        times[runs / 2]
    };
    let generation = median(101, &mut || {
        nftables::generation().unwrap();
    });
    let (small_nets, small_fwds) = fw::sample();
    let table = |nets: &[NetworkRules], fwds: &[Forward]| {
        let install = median(11, &mut || nftables::install(nets, fwds, &none).unwrap());
        let check = median(51, &mut || {
            assert!(nftables::check(nets, fwds, &none).unwrap().is_empty())
        });
        // A table of its own each time: nft 1.0.6 cannot take the script again over an
        // existing table (see `nftables::ruleset`).
        let script = format!(
            "add table inet berth\ndelete table inet berth\n{}",
            nftables::ruleset(nets, fwds, &none)
        );
        let nft_f = median(11, &mut || {
            assert!(nft_output(&["-f", "-"], Some(&script)).status.success())
        });
        format!("install {install:?}, nft -f {nft_f:?}, check {check:?}")
    };
    println!("generation id: {generation:?}");
    println!(
        "3 networks, 4 forwards: {}",
        table(&small_nets, &small_fwds)
    );
    println!("50 networks, 1,000 forwards: {}", table(&nets, &fwds));
}

#[test]
fn nftables_set_elements_rewrites_only_the_elements() {
    use berth_dataplane::nftables;
    let _host = private_host();
    let (nets, fwds) = fw::sample();
    let svcs = fw::services();
    // Without berth's table there is nothing to fill: the caller installs instead.
    assert!(nftables::set_elements(&nets, &fwds, &svcs).is_err());
    nftables::install(&nets[..1], &[], &svcs).unwrap();
    // Every rule and chain with its handle: a rewritten rule gets a new one.
    let handles = || {
        let out = nft_output(&["-a", "list", "table", "inet", "berth"], None);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("# handle"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let rules_before = handles();
    assert!(rules_before.len() > 100, "{rules_before:?}");
    nftables::set_elements(&nets, &fwds, &svcs).unwrap();
    // Exactly what a whole install of the same would hold, and not one rule rewritten.
    assert_eq!(
        nftables::check(&nets, &fwds, &svcs).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(handles(), rules_before);
    // And back down to one network.
    nftables::set_elements(&nets[..1], &[], &svcs).unwrap();
    assert_eq!(
        nftables::check(&nets[..1], &[], &svcs).unwrap(),
        Vec::<String>::new()
    );
}
