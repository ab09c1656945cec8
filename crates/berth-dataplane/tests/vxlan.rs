//! Overlay networks against the real kernel. Two "hosts" (network namespaces) share an
//! "underlay" namespace's bridge; each has berth's bridge with the same anycast gateway, a
//! VXLAN device and one "container". Everything lives in private namespaces made with
//! `ip netns add` and removed by a guard, even when an assertion fails; the machine's own
//! network namespace is never touched.

mod common;

use common::{exec, ip, output, run};

use std::fs::File;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_dataplane::{
    BridgeSpec, EndpointSpec, Netlink, RemoteEntry, Remotes, VXLAN_PORT, VxlanSpec,
};
use ipnet::IpNet;

const VNI: u32 = 4242;
const UNDERLAY_MTU: u32 = 1500;
const MTU: u32 = UNDERLAY_MTU - berth_dataplane::VXLAN_OVERHEAD;
const BRIDGE: &str = "berth-ovl";
/// The anycast gateway's MAC: the same on every host.
const GW_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const GW4: &str = "10.77.0.1";
const GW6: &str = "fd77::1";

/// Private namespaces, deleted when dropped (also when a test panics).
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn new(roles: &[&str]) -> Self {
        let mut ns = Namespaces { names: vec![] };
        for role in roles {
            let name = format!("bvt{}{role}", std::process::id());
            // Recorded before it exists, so a half-made set is still cleaned up.
            ns.names.push(name.clone());
            run("ip", &["netns", "add", &name]);
            // No IPv6 link-local addresses (so no DAD, MLD or router solicitations): the only
            // traffic is what the test sends, which makes the packet counters exact.
            exec(
                &name,
                &["sysctl", "-qw", "net.ipv6.conf.default.addr_gen_mode=1"],
            );
        }
        ns
    }

    fn name(&self, role: &str) -> &str {
        let name = format!("bvt{}{role}", std::process::id());
        self.names.iter().find(|n| **n == name).expect("known role")
    }

    fn netlink(&self, role: &str) -> Netlink {
        let f = File::open(format!("/run/netns/{}", self.name(role))).unwrap();
        Netlink::open_in(&f).unwrap()
    }

    fn file(&self, role: &str) -> File {
        File::open(format!("/run/netns/{}", self.name(role))).unwrap()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn counter(ns: &str, dev: &str, stat: &str) -> u64 {
    exec(
        ns,
        &["cat", &format!("/sys/class/net/{dev}/statistics/{stat}")],
    )
    .trim()
    .parse()
    .unwrap()
}

/// One ping attempt from namespace `ns`; extra arguments before the target.
fn ping_once(ns: &str, wait: &str, extra: &[&str], target: &str) -> bool {
    let mut args = vec!["netns", "exec", ns, "ping", "-n", "-q", "-c1", "-W", wait];
    args.extend_from_slice(extra);
    args.push(target);
    output("ip", &args).status.success()
}

/// Pings until one answer comes back, for at most 5 s (the machine may be slow); panics if
/// none does.
fn assert_ping(ns: &str, extra: &[&str], target: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping_once(ns, "1", extra, target) {
        assert!(
            Instant::now() < deadline,
            "{ns}: ping {extra:?} {target} gets no answer"
        );
    }
}

/// One ping that must get no answer. Half a second is ample: on this path an answer takes
/// well under a millisecond.
fn assert_no_ping(ns: &str, extra: &[&str], target: &str) {
    assert!(
        !ping_once(ns, "0.5", extra, target),
        "{ns}: ping {extra:?} {target} was answered"
    );
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One host of the overlay.
struct Host {
    ns: &'static str,
    container: &'static str,
    underlay: IpAddr,
    nl: Netlink,
    bridge: u32,
    vxlan: u32,
    spec: VxlanSpec,
    /// The container's MAC and addresses.
    mac: [u8; 6],
    ip4: IpAddr,
    ip6: IpAddr,
}

impl Host {
    /// This host's container as another host's remote entries.
    fn remote_entries(&self) -> [RemoteEntry; 2] {
        [self.ip4, self.ip6].map(|ip| RemoteEntry {
            mac: self.mac,
            ip,
            vtep: self.underlay,
        })
    }
}

/// Underlay, two hosts, a container on each; no remote entries yet.
fn overlay(ns: &Namespaces) -> [Host; 2] {
    let u = ns.name("u");
    ip(u, &["link", "add", "ubr", "type", "bridge"]);
    ip(u, &["link", "set", "ubr", "up"]);
    let vx_name = berth_model::vxlan_name("0123456789abcdef");
    let hosts = [("h1", "c1", 1u8), ("h2", "c2", 2u8)];
    // The underlay first, with permanent neighbours for the other VTEP: no ARP on the underlay
    // either, so its counters count tunnelled packets only.
    for (h, _, i) in hosts {
        let hn = ns.name(h);
        let port = format!("u{i}");
        ip(
            u,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", hn,
            ],
        );
        ip(u, &["link", "set", &port, "master", "ubr", "up"]);
        let mac = format!("02:00:00:00:00:1{i}");
        ip(hn, &["link", "set", "eth0", "address", &mac, "mtu", "1500"]);
        ip(
            hn,
            &["addr", "add", &format!("192.0.2.1{i}/24"), "dev", "eth0"],
        );
        ip(hn, &["link", "set", "eth0", "up"]);
        ip(hn, &["link", "set", "lo", "up"]);
    }
    for (h, _, i) in hosts {
        let other = 3 - i;
        ip(
            ns.name(h),
            &[
                "neigh",
                "replace",
                &format!("192.0.2.1{other}"),
                "lladdr",
                &format!("02:00:00:00:00:1{other}"),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        );
    }
    hosts.map(|(h, c, i)| {
        let mut nl = ns.netlink(h);
        let bridge = berth_dataplane::ensure_bridge(
            &mut nl,
            &BridgeSpec {
                name: BRIDGE.into(),
                mtu: MTU,
                mac: GW_MAC,
                addresses: vec![net("10.77.0.1/24"), net("fd77::1/64")],
            },
        )
        .unwrap();
        let underlay_index = nl.link_by_name("eth0").unwrap().unwrap().index;
        let underlay = addr(&format!("192.0.2.1{i}"));
        let spec = VxlanSpec {
            name: vx_name.clone(),
            vni: VNI,
            local: underlay,
            port: VXLAN_PORT,
            mtu: MTU,
            mac: [0x02, 0xbe, 0, 0, 0x10, i],
            bridge_index: bridge,
            underlay_index: Some(underlay_index),
        };
        let vxlan = berth_dataplane::ensure_vxlan(&mut nl, &spec).unwrap();
        let mac = [0x02, 0x42, 10, 77, 0, 1 + i];
        let ip4 = addr(&format!("10.77.0.{}", 1 + i));
        let ip6 = addr(&format!("fd77::{}", 1 + i));
        berth_dataplane::attach_endpoint(
            &mut nl,
            &ns.file(c),
            &EndpointSpec {
                host_ifname: format!("berth000000000{i}"),
                bridge_index: bridge,
                mtu: MTU,
                ifname: "eth0".into(),
                mac,
                ips: vec![IpNet::new(ip4, 24).unwrap(), IpNet::new(ip6, 64).unwrap()],
                gateways: vec![addr(GW4), addr(GW6)],
                hairpin: false,
            },
        )
        .unwrap();
        Host {
            ns: if i == 1 { "h1" } else { "h2" },
            container: c,
            underlay,
            nl,
            bridge,
            vxlan,
            spec,
            mac,
            ip4,
            ip6,
        }
    })
}

/// Packets host `h` sent into the underlay, and packets its VXLAN device sent.
fn sent(ns: &Namespaces, h: &Host) -> (u64, u64) {
    let n = ns.name(h.ns);
    (
        counter(n, "eth0", "tx_packets"),
        counter(n, &h.spec.name, "tx_packets"),
    )
}

#[test]
fn overlay_without_flooding_or_learning() {
    let started = Instant::now();
    let ns = Namespaces::new(&["u", "h1", "h2", "c1", "c2"]);
    let [mut h1, mut h2] = overlay(&ns);
    let (c1, c2) = (ns.name(h1.container), ns.name(h2.container));
    let (n1, n2) = (ns.name(h1.ns), ns.name(h2.ns));
    let vx = h1.spec.name.clone();

    // The device is as specified, and ensuring it again changes nothing.
    let link = h1.nl.link_by_name(&vx).unwrap().unwrap();
    assert_eq!(
        (
            link.index,
            link.kind.as_deref(),
            link.mtu,
            link.controller,
            link.mac
        ),
        (
            h1.vxlan,
            Some("vxlan"),
            MTU,
            Some(h1.bridge),
            Some(h1.spec.mac)
        )
    );
    assert!(link.up);
    let details = ip(n1, &["-d", "link", "show", "dev", &vx]);
    for want in [
        "vxlan id 4242 local 192.0.2.11 dev eth0 ",
        "dstport 4789 nolearning proxy ",
        " learning off ",
        " neigh_suppress off ",
    ] {
        assert!(details.contains(want), "{want:?} not in {details}");
    }
    let vxlan_line = details.lines().find(|l| l.contains("vxlan id")).unwrap();
    assert!(
        !vxlan_line.contains("group") && !vxlan_line.contains("remote"),
        "no default destination: {vxlan_line}"
    );
    let links = h1.nl.links().unwrap();
    assert_eq!(
        berth_dataplane::ensure_vxlan(&mut h1.nl, &h1.spec).unwrap(),
        h1.vxlan
    );
    assert_eq!(h1.nl.links().unwrap(), links, "second ensure is a no-op");
    // What can be fixed in place is fixed in place.
    ip(n1, &["link", "set", &vx, "nomaster"]);
    ip(n1, &["link", "set", &vx, "mtu", "1400", "down"]);
    assert_eq!(
        berth_dataplane::ensure_vxlan(&mut h1.nl, &h1.spec).unwrap(),
        h1.vxlan
    );
    ip(
        n1,
        &["link", "set", &vx, "type", "bridge_slave", "learning", "on"],
    );
    assert_eq!(
        berth_dataplane::ensure_vxlan(&mut h1.nl, &h1.spec).unwrap(),
        h1.vxlan
    );
    assert_eq!(h1.nl.links().unwrap(), links, "repaired");
    assert!(ip(n1, &["-d", "link", "show", "dev", &vx]).contains(" learning off "));
    assert_eq!(
        berth_dataplane::remotes(&mut h1.nl, h1.vxlan).unwrap(),
        Remotes::default()
    );

    // 1. Without remote entries nothing resolves and nothing leaves the host.
    let before = sent(&ns, &h1);
    assert_no_ping(c1, &[], &h2.ip4.to_string());
    assert_no_ping(c1, &[], &h2.ip6.to_string());
    assert_eq!(sent(&ns, &h1), before, "nothing floods");

    // 2. With them, both families work both ways.
    let to_h1 = h2.remote_entries();
    let to_h2 = h1.remote_entries();
    for e in &to_h1 {
        berth_dataplane::add_remote(&mut h1.nl, h1.vxlan, e).unwrap();
    }
    for e in &to_h2 {
        berth_dataplane::add_remote(&mut h2.nl, h2.vxlan, e).unwrap();
    }
    // Idempotent.
    berth_dataplane::add_remote(&mut h1.nl, h1.vxlan, &to_h1[0]).unwrap();
    let r1 = berth_dataplane::remotes(&mut h1.nl, h1.vxlan).unwrap();
    assert_eq!(
        r1,
        Remotes {
            fdb: vec![(h2.mac, h2.underlay)],
            bridge_fdb: vec![h2.mac],
            neighbours: vec![(h2.ip4, h2.mac), (h2.ip6, h2.mac)],
        }
    );
    assert!(r1.is_exactly(&to_h1));
    let mut complete = to_h1.to_vec();
    complete.sort();
    assert_eq!(r1.complete(), complete);
    assert!(
        berth_dataplane::remotes(&mut h2.nl, h2.vxlan)
            .unwrap()
            .is_exactly(&to_h2)
    );
    assert_ping(c1, &[], &h2.ip4.to_string());
    assert_ping(c2, &[], &h1.ip4.to_string());
    assert_ping(c1, &[], &h2.ip6.to_string());
    assert_ping(c2, &[], &h1.ip6.to_string());

    // Frames for a remote endpoint leave by the VXLAN port only, never flooded to the other
    // local ports (the bridge learns nothing from that port: add_remote's static bridge entry
    // is what tells it). An idle port that gets no broadcast or multicast counts the unicast
    // frames it is sent.
    ip(
        n1,
        &[
            "link", "add", "idle0", "type", "veth", "peer", "name", "idle1",
        ],
    );
    ip(n1, &["link", "set", "idle0", "master", BRIDGE, "up"]);
    ip(n1, &["link", "set", "idle1", "up"]);
    ip(
        n1,
        &[
            "link",
            "set",
            "idle0",
            "type",
            "bridge_slave",
            "mcast_flood",
            "off",
            "bcast_flood",
            "off",
        ],
    );
    let idle = counter(n1, "idle0", "tx_packets");
    assert!(ping_once(c1, "2", &["-c5", "-i0.01"], &h2.ip4.to_string()));
    assert_eq!(counter(n1, "idle0", "tx_packets"), idle, "flooded locally");

    // 3. A full-size packet crosses with DF set; one byte more does not fit.
    let sb = berth_dataplane::sandbox_state(&mut ns.netlink("c1"), "eth0").unwrap();
    assert_eq!(sb.link.unwrap().mtu, MTU);
    let full = (MTU - 28).to_string();
    assert_ping(c1, &["-M", "do", "-s", &full], &h2.ip4.to_string());
    let over = (MTU - 27).to_string();
    assert_no_ping(c1, &["-M", "do", "-s", &over], &h2.ip4.to_string());

    // 4. No ARP crosses the underlay: with both containers' caches empty, one ping costs
    //    exactly one tunnelled packet each way (the echo and its reply); the ARP both sides
    //    need is answered by their own host's VXLAN device.
    ip(c1, &["neigh", "flush", "all"]);
    ip(c2, &["neigh", "flush", "all"]);
    let (b1, b2) = (sent(&ns, &h1), sent(&ns, &h2));
    assert!(ping_once(c1, "2", &[], &h2.ip4.to_string()));
    let (a1, a2) = (sent(&ns, &h1), sent(&ns, &h2));
    assert_eq!(
        (a1.0 - b1.0, a1.1 - b1.1, a2.0 - b2.0, a2.1 - b2.1),
        (1, 1, 1, 1),
        "underlay/vxlan packets sent by host 1 and host 2"
    );
    let cache = ip(c1, &["neigh", "show", &h2.ip4.to_string()]);
    assert!(cache.contains(&mac_str(h2.mac)), "{cache}");
    // The same for NDP.
    let (b1, b2) = (sent(&ns, &h1), sent(&ns, &h2));
    assert!(ping_once(c1, "2", &[], &h2.ip6.to_string()));
    let (a1, a2) = (sent(&ns, &h1), sent(&ns, &h2));
    assert_eq!(
        (a1.0 - b1.0, a1.1 - b1.1, a2.0 - b2.0, a2.1 - b2.1),
        (1, 1, 1, 1),
        "IPv6: underlay/vxlan packets sent by host 1 and host 2"
    );
    // An address nobody has: no answer, and nothing is sent anywhere.
    let before = sent(&ns, &h1);
    assert_no_ping(c1, &[], "10.77.0.9");
    assert_no_ping(c1, &[], "fd77::9");
    assert_eq!(sent(&ns, &h1), before, "unknown addresses stay on the host");

    // 7. The gateway answers on each host, locally, and is never a remote.
    ip(c1, &["neigh", "flush", "all"]);
    ip(c2, &["neigh", "flush", "all"]);
    let (b1, b2) = (sent(&ns, &h1), sent(&ns, &h2));
    for c in [c1, c2] {
        assert_ping(c, &[], GW4);
        assert_ping(c, &[], GW6);
        let cache = ip(c, &["neigh", "show", GW4]);
        assert!(cache.contains(&mac_str(GW_MAC)), "{cache}");
    }
    assert_eq!((sent(&ns, &h1), sent(&ns, &h2)), (b1, b2));
    for h in [&mut h1, &mut h2] {
        let r = berth_dataplane::remotes(&mut h.nl, h.vxlan).unwrap();
        assert!(!r.fdb.iter().any(|(m, _)| *m == GW_MAC), "{r:?}");
        assert!(!r.bridge_fdb.contains(&GW_MAC), "{r:?}");
        assert!(
            !r.neighbours
                .iter()
                .any(|(ip, m)| *m == GW_MAC || *ip == addr(GW4) || *ip == addr(GW6)),
            "{r:?}"
        );
        let fdb = run(
            "bridge",
            &["-n", ns.name(h.ns), "fdb", "show", "dev", &h.spec.name],
        );
        assert!(!fdb.contains(&mac_str(GW_MAC)), "{fdb}");
    }

    // 5. Removing: an endpoint's forwarding entries go with its last address.
    berth_dataplane::remove_remote(&mut h1.nl, h1.vxlan, &to_h1[0]).unwrap();
    let r = berth_dataplane::remotes(&mut h1.nl, h1.vxlan).unwrap();
    assert!(r.is_exactly(&to_h1[1..]), "{r:?}");
    assert_ping(c1, &[], &h2.ip6.to_string());
    berth_dataplane::remove_remote(&mut h1.nl, h1.vxlan, &to_h1[1]).unwrap();
    assert_eq!(
        berth_dataplane::remotes(&mut h1.nl, h1.vxlan).unwrap(),
        Remotes::default()
    );
    assert_no_ping(c1, &[], &h2.ip4.to_string());
    // Removing what is not there is fine.
    berth_dataplane::remove_remote(&mut h1.nl, h1.vxlan, &to_h1[1]).unwrap();

    // Replacing moves an entry to another VTEP, and the old VTEP is gone.
    for e in &to_h1 {
        berth_dataplane::add_remote(&mut h1.nl, h1.vxlan, e).unwrap();
    }
    assert_ping(c1, &[], &h2.ip4.to_string());
    let moved = to_h1.map(|e| RemoteEntry {
        vtep: addr("192.0.2.99"),
        ..e
    });
    for e in &moved {
        berth_dataplane::add_remote(&mut h1.nl, h1.vxlan, e).unwrap();
    }
    let r = berth_dataplane::remotes(&mut h1.nl, h1.vxlan).unwrap();
    assert_eq!(r.fdb, vec![(h2.mac, addr("192.0.2.99"))]);
    assert!(r.is_exactly(&moved), "{r:?}");
    assert_no_ping(c1, &[], &h2.ip4.to_string());
    // Removing the entries as they were before the move leaves the moved ones alone.
    for e in &to_h1 {
        berth_dataplane::remove_remote(&mut h1.nl, h1.vxlan, e).unwrap();
    }
    assert!(
        berth_dataplane::remotes(&mut h1.nl, h1.vxlan)
            .unwrap()
            .is_exactly(&moved)
    );

    // A reconciler needs one call: stale entries go, missing ones come, and then all is quiet.
    let stray = RemoteEntry {
        mac: [0x02, 0x42, 10, 77, 0, 50],
        ip: addr("10.77.0.50"),
        vtep: h2.underlay,
    };
    berth_dataplane::add_remote(&mut h1.nl, h1.vxlan, &stray).unwrap();
    // Half an entry: a neighbour without forwarding entries.
    h1.nl
        .request(
            neighbour_only(h1.vxlan, addr("10.77.0.51")),
            netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
            "half entry",
        )
        .unwrap();
    assert!(berth_dataplane::sync_remotes(&mut h1.nl, h1.vxlan, None, &to_h1).unwrap() > 0);
    assert!(
        berth_dataplane::remotes(&mut h1.nl, h1.vxlan)
            .unwrap()
            .is_exactly(&to_h1)
    );
    assert_eq!(
        berth_dataplane::sync_remotes(&mut h1.nl, h1.vxlan, None, &to_h1).unwrap(),
        0
    );
    assert_ping(c1, &[], &h2.ip4.to_string());
    assert_ping(c1, &[], &h2.ip6.to_string());

    // 6. A host re-added with a new underlay address gets a new device, without the old
    //    entries, sending from the new address.
    let readdressed = VxlanSpec {
        local: addr("192.0.2.21"),
        ..h1.spec.clone()
    };
    let new_index = berth_dataplane::ensure_vxlan(&mut h1.nl, &readdressed).unwrap();
    assert_ne!(new_index, h1.vxlan);
    assert_eq!(
        berth_dataplane::ensure_vxlan(&mut h1.nl, &readdressed).unwrap(),
        new_index
    );
    let details = ip(n1, &["-d", "link", "show", "dev", &vx]);
    assert!(details.contains("local 192.0.2.21 "), "{details}");
    assert!(details.contains(&format!("master {BRIDGE} ")), "{details}");
    assert_eq!(
        berth_dataplane::remotes(&mut h1.nl, new_index).unwrap(),
        Remotes::default()
    );
    // The VNI is part of the device too.
    let renumbered = VxlanSpec {
        vni: VNI + 1,
        ..readdressed.clone()
    };
    let renumbered_index = berth_dataplane::ensure_vxlan(&mut h1.nl, &renumbered).unwrap();
    assert_ne!(renumbered_index, new_index);
    assert!(ip(n1, &["-d", "link", "show", "dev", &vx]).contains("vxlan id 4243 "));
    // So is its MAC.
    let new_mac = VxlanSpec {
        mac: [0x02, 0xbe, 0, 0, 0x10, 9],
        ..renumbered.clone()
    };
    let new_mac_index = berth_dataplane::ensure_vxlan(&mut h1.nl, &new_mac).unwrap();
    assert_ne!(new_mac_index, renumbered_index);
    let link = h1.nl.link_by_name(&vx).unwrap().unwrap();
    assert_eq!((link.mac, link.up), (Some(new_mac.mac), true));

    assert!(berth_dataplane::delete_vxlan(&mut h1.nl, &vx).unwrap());
    assert!(!berth_dataplane::delete_vxlan(&mut h1.nl, &vx).unwrap());
    assert!(h2.nl.link_by_name(&vx).unwrap().is_some(), "{n2} untouched");

    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// A permanent neighbour entry with no FDB entries behind it, as a crash between two
/// requests could leave.
fn neighbour_only(index: u32, ip: IpAddr) -> netlink_packet_route::RouteNetlinkMessage {
    use netlink_packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
    };
    let mut msg = NeighbourMessage::default();
    msg.header.family = netlink_packet_route::AddressFamily::Inet;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::from(ip)),
        NeighbourAttribute::LinkLayerAddress(vec![0x02, 0x42, 10, 77, 0, 51]),
    ];
    netlink_packet_route::RouteNetlinkMessage::NewNeighbour(msg)
}
