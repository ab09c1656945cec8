//! Many hosts: daemons in several host namespaces sharing one etcd over an underlay bridge
//! (see `cluster.rs`), with overlay networks between them. What is checked is what a user
//! sees (traffic, names, the CLI) and what the kernel holds: every host's VXLAN FDB and
//! neighbour entries must equal, exactly, the other hosts' endpoints as the store has them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_api::ClientError;
use serde_json::{Value, json};

use crate::cluster::{
    Cluster, FdbEntry, LEASE_TTL, Options, UNDERLAY_MTU, VXLAN_OVERHEAD, canonical_ip, eventually,
    fdb, fdb_all, link, neigh, vxlan_with_vni,
};
use crate::harness::{Host, PeerEcho, run, tcp_peer};

/// How long the hosts get to agree after a change (the watches are fast; this is for a
/// loaded 2-core machine).
const CONVERGE: Duration = Duration::from_secs(15);
const OVERLAY_MTU: u32 = UNDERLAY_MTU - VXLAN_OVERHEAD;
const DNS_SUFFIX: &str = "berth.local";

/// One endpoint as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ep {
    pub(crate) id: String,
    /// The host id it lives on.
    pub(crate) host: String,
    pub(crate) sandbox: String,
    pub(crate) mac: String,
    /// Without prefix length, canonical.
    pub(crate) ips: Vec<String>,
}

impl Ep {
    fn from_json(v: &Value, lister: &str) -> Ep {
        Ep {
            id: v["id"].as_str().unwrap().to_string(),
            // Endpoints carry the host they live on; a listing without it can only be of the
            // listing host's own endpoints.
            host: v["host"].as_str().unwrap_or(lister).to_string(),
            sandbox: v["netns"]["sandbox"].as_str().unwrap_or("").to_string(),
            mac: v["mac"].as_str().unwrap().to_ascii_lowercase(),
            ips: v["ips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| canonical_ip(i.as_str().unwrap().split('/').next().unwrap()))
                .collect(),
        }
    }

    pub(crate) fn v4(&self) -> &str {
        self.ips.iter().find(|i| !i.contains(':')).unwrap()
    }
}

/// Every endpoint of `net` in the cluster, by id, as the running daemons list them (each
/// host's listing, merged: whether a daemon lists only its own endpoints or all, the union is
/// the cluster's).
fn try_endpoints(c: &Cluster, net: &str) -> Result<BTreeMap<String, Ep>, String> {
    let mut all: BTreeMap<String, Ep> = BTreeMap::new();
    for i in c.indices() {
        let h = c.host(i);
        if !h.running() {
            continue;
        }
        let o = h.berth(&["-o", "json", "endpoint", "ls", "--network", net]);
        if !o.status.success() {
            return Err(format!(
                "endpoint ls on h{i}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        let listed: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
        for v in listed.as_array().unwrap() {
            let ep = Ep::from_json(v, &c.host_id(i));
            if let Some(seen) = all.get(&ep.id)
                && *seen != ep
            {
                return Err(format!(
                    "hosts disagree about an endpoint: {seen:?} / {ep:?}"
                ));
            }
            all.insert(ep.id.clone(), ep);
        }
    }
    Ok(all)
}

fn endpoints(c: &Cluster, net: &str) -> BTreeMap<String, Ep> {
    try_endpoints(c, net).unwrap_or_else(|e| panic!("{e}"))
}

/// `berth host ls` on host `i`, by id.
pub(crate) fn try_hosts(c: &Cluster, i: usize) -> Result<BTreeMap<String, Value>, String> {
    let o = c.host(i).berth(&["-o", "json", "host", "ls"]);
    if !o.status.success() {
        return Err(format!(
            "host ls on h{i}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    Ok(v.as_array()
        .ok_or_else(|| format!("host ls is not an array: {v}"))?
        .iter()
        .map(|h| (h["id"].as_str().unwrap_or_default().to_string(), h.clone()))
        .collect())
}

pub(crate) fn host_state(c: &Cluster, viewer: usize, id: &str) -> Result<String, String> {
    let hosts = try_hosts(c, viewer)?;
    let h = hosts
        .get(id)
        .ok_or_else(|| format!("h{viewer} does not list {id}: {hosts:?}"))?;
    Ok(h["state"].as_str().unwrap_or_default().to_string())
}

/// `network inspect` on host `i`.
fn inspect(c: &Cluster, i: usize, net: &str) -> Value {
    c.host(i).json(&["network", "inspect", net])
}

fn vni_of(c: &Cluster, net: &str) -> u64 {
    let i = c.indices().find(|&i| c.host(i).running()).unwrap();
    let n = inspect(c, i, net);
    n["vni"].as_u64().unwrap_or_else(|| panic!("no vni: {n}"))
}

/// Creates an overlay network on host 1 and waits until every running host knows it.
pub(crate) fn create_overlay(c: &Cluster, net: &str, subnets: &[&str]) -> Value {
    let mut args = vec!["network", "create", net, "--driver", "overlay"];
    args.extend_from_slice(subnets);
    let made: Value = c.host(1).json(&args);
    assert_eq!(made["driver"], "overlay", "{made}");
    for i in c.indices().filter(|&i| c.host(i).running()) {
        eventually(&format!("h{i} knows network {net}"), CONVERGE, || {
            let o = c.host(i).berth(&["-o", "json", "network", "inspect", net]);
            if !o.status.success() {
                return Err(String::from_utf8_lossy(&o.stderr).into_owned());
            }
            let n: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
            if n["id"] != made["id"] {
                return Err(format!("another network: {n}"));
            }
            Ok(())
        });
    }
    made
}

/// Makes sandbox `name` on host `i` and attaches it to `net`; the endpoint.
pub(crate) fn sandbox_on(c: &Cluster, i: usize, name: &str, net: &str, extra: &[&str]) -> Ep {
    let h = c.host(i);
    h.ok(&["sandbox", "create", name]);
    attach(c, i, name, net, extra)
}

fn attach(c: &Cluster, i: usize, name: &str, net: &str, extra: &[&str]) -> Ep {
    let mut args = vec!["attach", name, "--network", net];
    args.extend_from_slice(extra);
    let ep = Ep::from_json(&c.host(i).json(&args), &c.host_id(i));
    assert_eq!(ep.host, c.host_id(i), "{ep:?}");
    ep
}

/// What host `viewer`'s VXLAN device for `net` must hold: an FDB entry to the owner's
/// underlay address and a neighbour entry per address for every endpoint on another host
/// that is listed, up or gone (a gone host keeps its entries until it is freed); nothing
/// else.
type Entries = (Vec<(String, String)>, Vec<(String, String)>);

fn expected_entries(
    c: &Cluster,
    viewer: usize,
    eps: &BTreeMap<String, Ep>,
) -> Result<Entries, String> {
    let hosts = try_hosts(c, viewer)?;
    let me = c.host_id(viewer);
    let (mut f, mut n) = (Vec::new(), Vec::new());
    for ep in eps.values().filter(|e| e.host != me) {
        let Some(addr) = hosts.get(&ep.host).and_then(|h| h["address"].as_str()) else {
            continue;
        };
        let addr = canonical_ip(addr);
        let owner = c
            .index_of(&ep.host)
            .ok_or_else(|| format!("endpoint on unknown host: {ep:?}"))?;
        if addr != c.addr(owner) {
            return Err(format!(
                "h{viewer} has {} at {addr}, its underlay address is {}",
                ep.host,
                c.addr(owner)
            ));
        }
        f.push((ep.mac.clone(), addr));
        for ip in &ep.ips {
            n.push((ip.clone(), ep.mac.clone()));
        }
    }
    f.sort();
    n.sort();
    Ok((f, n))
}

/// Host `h`'s neighbour entries on `dev`, kernel-made link-local ones left out.
pub(crate) fn overlay_neigh(h: &Host, dev: &str) -> Vec<(String, String)> {
    neigh(h, dev)
        .into_iter()
        .filter(|(ip, _)| !ip.starts_with("fe80:"))
        .collect()
}

/// Whether the kernels of `viewers` hold exactly what the store says about `net`.
fn converged(c: &Cluster, net: &str, vni: u64, viewers: &[usize]) -> Result<(), String> {
    let eps = try_endpoints(c, net)?;
    for &v in viewers {
        let h = c.host(v);
        let (want_fdb, want_neigh) = expected_entries(c, v, &eps)?;
        let local = eps.values().any(|e| e.host == c.host_id(v));
        let Some(dev) = vxlan_with_vni(h, vni) else {
            if local {
                return Err(format!(
                    "h{v} has endpoints on {net} but no VXLAN device {vni}"
                ));
            }
            continue;
        };
        let name = dev["ifname"].as_str().unwrap();
        let (got_fdb, got_neigh) = (fdb(h, name), overlay_neigh(h, name));
        if !local && got_fdb.is_empty() && got_neigh.is_empty() {
            continue;
        }
        if got_fdb != want_fdb {
            return Err(format!(
                "h{v} {name} FDB {got_fdb:?}, the store says {want_fdb:?}"
            ));
        }
        if got_neigh != want_neigh {
            return Err(format!(
                "h{v} {name} neighbours {got_neigh:?}, the store says {want_neigh:?}"
            ));
        }
        // The bridge's own entries on the port (if the daemon adds any, so that the bridge
        // sends remote MACs to the port without flooding): the port's MAC and remote
        // endpoints' MACs only.
        let own = dev["address"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let remote_macs: BTreeSet<&str> = want_fdb.iter().map(|(m, _)| m.as_str()).collect();
        let stale: Vec<FdbEntry> = fdb_all(h, name)
            .into_iter()
            .filter(|e| e.dst.is_none() && e.mac != own && !remote_macs.contains(e.mac.as_str()))
            .collect();
        if !stale.is_empty() {
            return Err(format!(
                "h{v} {name} bridge FDB entries of no remote endpoint: {stale:?}"
            ));
        }
    }
    Ok(())
}

pub(crate) fn wait_converged(c: &Cluster, net: &str, viewers: &[usize]) {
    let vni = vni_of(c, net);
    eventually(
        &format!("the kernels of {viewers:?} match the store for {net}"),
        CONVERGE,
        || converged(c, net, vni, viewers),
    );
}

/// `dig +short` from a sandbox: the answers (empty for NXDOMAIN, NODATA or no answer).
pub(crate) fn dig(h: &Host, sandbox: &str, server: &str, name: &str, qtype: &str) -> Vec<String> {
    let at = format!("@{server}");
    let out = h.in_netns(
        &h.sandbox_path(sandbox),
        &["dig", &at, "+short", "+time=1", "+tries=2", name, qtype],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_string)
        .collect()
}

/// Whether `sandbox` on `h` gets an answer to a ping of `size` bytes with don't-fragment.
fn df_ping(h: &Host, sandbox: &str, ip: &str, size: u32) -> bool {
    let size = size.to_string();
    h.in_netns(
        &h.sandbox_path(sandbox),
        &["ping", "-q", "-M", "do", "-s", &size, "-c1", "-w3", ip],
    )
    .status
    .success()
}

pub(crate) fn eventually_reaches(h: &Host, sandbox: &str, ip: &str, within: Duration) {
    eventually(&format!("{sandbox} reaches {ip}"), within, || {
        if h.reaches(sandbox, ip) {
            Ok(())
        } else {
            Err("no echo reply".into())
        }
    });
}

/// The MTU of `ifname` inside a sandbox.
fn sandbox_mtu(h: &Host, sandbox: &str, ifname: &str) -> u64 {
    let out = h.in_netns(
        &h.sandbox_path(sandbox),
        &["ip", "-j", "link", "show", ifname],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["mtu"].as_u64().unwrap()
}

/// The addresses of `ifname` inside a sandbox, canonical.
fn sandbox_addrs(h: &Host, sandbox: &str, ifname: &str) -> BTreeSet<String> {
    let out = h.in_netns(
        &h.sandbox_path(sandbox),
        &["ip", "-j", "addr", "show", ifname],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["local"].as_str().map(canonical_ip))
                .collect()
        })
        .unwrap_or_default()
}

fn v4_net(cidr: &str) -> (u32, u32) {
    let (a, len) = cidr.split_once('/').unwrap();
    let a: Ipv4Addr = a.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(a) & mask, mask)
}

fn v4_in(net: (u32, u32), ip: &str) -> bool {
    let ip: Ipv4Addr = ip.parse().unwrap();
    u32::from(ip) & net.1 == net.0
}

/// The IPv4 blocks of `net` as host `i` shows them: (cidr, owner).
fn v4_blocks(c: &Cluster, i: usize, net: &str) -> Vec<(String, String)> {
    let n = inspect(c, i, net);
    let mut b: Vec<(String, String)> = n["blocks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b["cidr"].as_str().unwrap().to_string(),
                        b["host"].as_str().unwrap().to_string(),
                    )
                })
                .filter(|(cidr, _)| !cidr.contains(':'))
                .collect()
        })
        .unwrap_or_default();
    b.sort();
    b
}

#[test]
fn cluster_comes_up_and_goes_away_cleanly() {
    let c = Cluster::bare(2);
    let names: Vec<String> = c
        .indices()
        .map(|i| c.host(i).netns.clone())
        .chain([c.underlay.clone()])
        .collect();
    let dirs: Vec<std::path::PathBuf> = c
        .indices()
        .map(|i| c.host(i).dir.clone())
        .chain([c.dir.clone()])
        .collect();

    // The hosts reach each other and etcd over the underlay, from their underlay addresses,
    // which are on their default-route interfaces.
    for (from, to) in [(1, 2), (2, 1)] {
        let o = c.in_host(from, &["ping", "-q", "-c1", "-w3", &c.addr(to)]);
        assert!(o.status.success(), "h{from} -> h{to}");
        let route = String::from_utf8_lossy(
            &c.in_host(from, &["ip", "route", "get", "203.0.113.1"])
                .stdout,
        )
        .into_owned();
        assert!(
            route.contains("dev ul0") && route.contains(&format!("src {}", c.addr(from))),
            "{route}"
        );
    }
    let put = c.in_host(
        1,
        &[
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            "198.51.100.1:2379",
            "put",
            &format!("{}smoke", c.prefix),
            "from-h1",
        ],
    );
    assert!(put.status.success(), "{put:?}");
    assert!(c.etcd_keys().contains("smoke"));
    assert_eq!(c.etcd_endpoint(), "etcd://198.51.100.1:2379");

    // Cutting a host off etcd resets its live connections at once, and undoing it lets it
    // back in.
    let watch_key = format!("{}watched", c.prefix);
    let mut watch = Command::new("nsenter")
        .arg(format!("--net={}", c.host(1).netns_path()))
        .args([
            "etcdctl",
            "--endpoints",
            "198.51.100.1:2379",
            "watch",
            &watch_key,
        ])
        .env("ETCDCTL_API", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the watch is connected",
        Duration::from_secs(10),
        || match c.etcd_connections(1) {
            0 => Err("no connection".into()),
            _ => Ok(()),
        },
    );
    c.block_etcd(1);
    c.etcdctl(&["put", &watch_key, "1"]);
    eventually(
        "the watch's connection is reset",
        Duration::from_secs(10),
        || match c.etcd_connections(1) {
            0 => Ok(()),
            n => Err(format!("{n} connections")),
        },
    );
    let _ = watch.kill();
    let _ = watch.wait();
    c.unblock_etcd(1);
    assert!(
        c.in_host(
            1,
            &[
                "env",
                "ETCDCTL_API=3",
                "etcdctl",
                "--endpoints",
                "198.51.100.1:2379",
                "get",
                &watch_key
            ]
        )
        .status
        .success()
    );

    // Compaction, and an outage that keeps the data.
    let rev = c.etcd_compact();
    assert!(rev >= 2, "{rev}");
    c.etcd_stop();
    let stopped = c.in_host(
        2,
        &[
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            "198.51.100.1:2379",
            "--command-timeout",
            "1s",
            "get",
            &watch_key,
        ],
    );
    assert!(!stopped.status.success(), "etcd answered while stopped");
    c.etcd_cont();
    assert!(c.etcdctl(&["get", &watch_key]).contains(&watch_key));

    let etcd_pid = c.etcd_pid();
    let comm = std::fs::read_to_string(format!("/proc/{etcd_pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "etcd", "etcd runs as {etcd_pid}");
    drop(c);

    let left = String::from_utf8_lossy(&run("ip", &["netns", "list"]).stdout).into_owned();
    for n in &names {
        assert!(
            !left.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "{n} left: {left}"
        );
    }
    for d in &dirs {
        assert!(!d.exists(), "{} left", d.display());
    }
    assert!(
        !Path::new(&format!("/proc/{etcd_pid}")).exists(),
        "etcd {etcd_pid} still runs"
    );
}

#[test]
fn overlay_ping_tcp_and_names_across_hosts() {
    let c = Cluster::new(3);
    let made = create_overlay(
        &c,
        "ov",
        &[
            "--subnet",
            "10.188.0.0/16",
            "--ipv6-subnet",
            "fd00:188::/64",
        ],
    );
    let vni = made["vni"].as_u64().unwrap_or_else(|| panic!("{made}"));
    let a = sandbox_on(&c, 1, "a1", "ov", &[]);
    let b = sandbox_on(&c, 2, "b2", "ov", &[]);
    let d = sandbox_on(&c, 3, "c3", "ov", &[]);
    let (h1, h2, h3) = (c.host(1), c.host(2), c.host(3));
    let v6 = |e: &Ep| e.ips.iter().find(|i| i.contains(':')).unwrap().clone();

    // One network, the same everywhere: id, VNI, gateways, MTU underlay - 50.
    let mut gateway_macs = BTreeSet::new();
    for i in c.indices() {
        let n = inspect(&c, i, "ov");
        assert_eq!(n["driver"], "overlay", "h{i}: {n}");
        assert_eq!(n["id"], made["id"], "h{i}");
        assert_eq!(n["vni"].as_u64(), Some(vni), "h{i}");
        assert_eq!(n["subnets"], made["subnets"], "h{i}: gateways");
        assert_eq!(n["mtu"].as_u64(), Some(OVERLAY_MTU.into()), "h{i}: {n}");
        let h = c.host(i);
        let dev = vxlan_with_vni(h, vni).unwrap_or_else(|| panic!("h{i}: no VXLAN {vni}"));
        let name = dev["ifname"].as_str().unwrap();
        let id = made["id"].as_str().unwrap();
        assert_eq!(
            name,
            format!("bvx{}", &id[..id.len().min(12)]),
            "h{i}: VXLAN device"
        );
        assert_eq!(
            dev["linkinfo"]["info_data"]["learning"], false,
            "h{i}: {dev}"
        );
        assert_eq!(dev["mtu"].as_u64(), Some(OVERLAY_MTU.into()), "h{i}: {dev}");
        let bridge = n["bridge"].as_str().unwrap();
        assert!(bridge.starts_with("berth-"), "{bridge}");
        assert_eq!(dev["master"].as_str(), Some(bridge), "h{i}: {dev}");
        let br = link(h, bridge).unwrap_or_else(|| panic!("h{i}: no bridge {bridge}"));
        gateway_macs.insert(br["address"].as_str().unwrap().to_ascii_lowercase());
        let gw_addrs = String::from_utf8_lossy(
            &c.in_host(i, &["ip", "-o", "addr", "show", "dev", bridge])
                .stdout,
        )
        .into_owned();
        assert!(
            gw_addrs.contains("10.188.0.1/16") && gw_addrs.contains("fd00:188::1/64"),
            "h{i}: the gateways on {bridge}: {gw_addrs}"
        );
    }
    assert_eq!(
        gateway_macs.len(),
        1,
        "one gateway MAC on every host: {gateway_macs:?}"
    );
    for (h, s) in [(h1, "a1"), (h2, "b2"), (h3, "c3")] {
        assert_eq!(sandbox_mtu(h, s, "eth0"), u64::from(OVERLAY_MTU), "{s}");
    }

    // Each host holds exactly the other hosts' endpoints, at their underlay addresses.
    wait_converged(&c, "ov", &[1, 2, 3]);
    let dev1 = vxlan_with_vni(h1, vni).unwrap()["ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let mut want_fdb = vec![(b.mac.clone(), c.addr(2)), (d.mac.clone(), c.addr(3))];
    want_fdb.sort();
    assert_eq!(fdb(h1, &dev1), want_fdb);
    let mut want_neigh: Vec<(String, String)> = [&b, &d]
        .iter()
        .flat_map(|e| e.ips.iter().map(|ip| (ip.clone(), e.mac.clone())))
        .collect();
    want_neigh.sort();
    assert_eq!(overlay_neigh(h1, &dev1), want_neigh);

    // Traffic both ways, both families, and from a third host.
    assert!(h1.reaches("a1", b.v4()), "a1 -> b2");
    assert!(h2.reaches("b2", a.v4()), "b2 -> a1");
    assert!(h1.reaches("a1", &v6(&b)), "a1 -> b2 over IPv6");
    assert!(h2.reaches("b2", &v6(&a)), "b2 -> a1 over IPv6");
    assert!(h3.reaches("c3", a.v4()), "c3 -> a1");
    assert!(h1.reaches("a1", &v6(&d)), "a1 -> c3 over IPv6");
    // Full-size packets cross without fragmentation; one byte more does not fit the sandbox.
    let payload4 = OVERLAY_MTU - 20 - 8;
    let payload6 = OVERLAY_MTU - 40 - 8;
    assert!(df_ping(h1, "a1", b.v4(), payload4), "{payload4} bytes, DF");
    assert!(
        df_ping(h2, "b2", &v6(&a), payload6),
        "{payload6} bytes over IPv6"
    );
    assert!(!df_ping(h1, "a1", b.v4(), payload4 + 1), "over the MTU");

    // TCP, with the client's own address: no NAT between hosts.
    let _echo = PeerEcho::start(&h2.sandbox_path("b2"), 7000);
    assert_eq!(
        tcp_peer(&h1.sandbox_path("a1"), &format!("{}:7000", b.v4())).as_deref(),
        Some(a.v4())
    );
    assert_eq!(
        tcp_peer(&h1.sandbox_path("a1"), &format!("[{}]:7000", v6(&b))),
        Some(v6(&a))
    );

    // Each host's DNS knows every host's endpoints.
    assert_eq!(dig(h1, "a1", "10.188.0.1", "b2", "A"), [b.v4()]);
    assert_eq!(
        dig(h1, "a1", "10.188.0.1", &format!("b2.ov.{DNS_SUFFIX}"), "A"),
        [b.v4()]
    );
    assert_eq!(dig(h1, "a1", "fd00:188::1", "b2", "AAAA"), [v6(&b)]);
    assert_eq!(dig(h2, "b2", "10.188.0.1", "c3", "A"), [d.v4()]);
    assert_eq!(dig(h3, "c3", "10.188.0.1", "a1", "AAAA"), [v6(&a)]);
    assert_eq!(
        dig(h1, "a1", "10.188.0.1", "-x", b.v4()),
        [format!("b2.ov.{DNS_SUFFIX}.")]
    );

    // The gateway is everywhere, so never across: not in any FDB, not a neighbour entry.
    let gw_mac = gateway_macs.into_iter().next().unwrap();
    for i in c.indices() {
        let h = c.host(i);
        let dev = vxlan_with_vni(h, vni).unwrap();
        let dev = dev["ifname"].as_str().unwrap();
        let all = fdb_all(h, dev);
        assert!(
            all.iter().all(|e| e.mac != gw_mac),
            "h{i}: the gateway MAC {gw_mac} in the FDB: {all:?}"
        );
        let n = neigh(h, dev);
        assert!(
            n.iter()
                .all(|(ip, mac)| *mac != gw_mac && ip != "10.188.0.1" && ip != "fd00:188::1"),
            "h{i}: the gateway as a neighbour: {n:?}"
        );
    }
    // After all that traffic, still exactly the store's entries (nothing learned).
    wait_converged(&c, "ov", &[1, 2, 3]);
}

/// Endpoints made concurrently on every host: (attachers per host, attaches per attacher).
/// The 3 hosts x 16 x 200 runs with `BERTH_STRESS=1` (about 7 minutes on a 2-core
/// machine, four networks so that no bridge goes over 1,024 ports); by default 16 x 20.
const ATTACHERS: usize = 16;
const ATTACHES: usize = 20;
const STRESS_ATTACHERS: usize = 16;
const STRESS_ATTACHES: usize = 200;
/// Endpoints of one network on one host at most: a Linux bridge takes 1,024 ports.
const PER_BRIDGE: usize = 1000;

fn stress() -> bool {
    std::env::var("BERTH_STRESS").is_ok_and(|v| v == "1")
}

#[test]
fn addresses_unique_under_concurrent_attaches() {
    let (attachers, per) = if stress() {
        (STRESS_ATTACHERS, STRESS_ATTACHES)
    } else {
        (ATTACHERS, ATTACHES)
    };
    // Attacher j uses network j % networks, so no host's bridge goes over its port limit.
    let networks = (attachers * per).div_ceil(PER_BRIDGE).clamp(1, attachers);
    assert_eq!(attachers % networks, 0, "attachers spread evenly");
    let c = Cluster::new(3);
    let net_name = |n: usize| format!("many{n}");
    for n in 0..networks {
        create_overlay(
            &c,
            &net_name(n),
            &["--subnet", &format!("10.{}.0.0/16", 189 + n)],
        );
    }
    let name = |i: usize, j: usize, k: usize| format!("s{i}-{j}-{k}");
    std::thread::scope(|s| {
        for i in c.indices() {
            for j in 0..attachers {
                let c = &c;
                s.spawn(move || {
                    let h = c.host(i);
                    let net = net_name(j % networks);
                    for k in 0..per {
                        let n = name(i, j, k);
                        h.ok(&["sandbox", "create", &n]);
                        h.ok(&["attach", &n, "--network", &net]);
                    }
                });
            }
        }
    });

    for n in 0..networks {
        let network = net_name(n);
        let network = network.as_str();
        let per_host = attachers / networks * per;
        let eps = endpoints(&c, network);
        assert_eq!(eps.len(), c.len() * per_host, "endpoints on {network}");
        let mut holder: BTreeMap<&str, &str> = BTreeMap::new();
        for e in eps.values() {
            for ip in &e.ips {
                if let Some(other) = holder.insert(ip.as_str(), e.id.as_str()) {
                    panic!("{ip} handed out twice: to {other} and to {e:?}");
                }
            }
        }
        for i in c.indices() {
            let on = eps.values().filter(|e| e.host == c.host_id(i)).count();
            assert_eq!(on, per_host, "endpoints of {network} on h{i}");
        }
        // Addresses come from blocks of the subnet, each owned by one host, disjoint; a
        // host's endpoints are in its own blocks. Every host shows the same blocks.
        let subnet = v4_net(&format!("10.{}.0.0/16", 189 + n));
        let blocks = v4_blocks(&c, 1, network);
        assert!(!blocks.is_empty(), "no blocks");
        for i in c.indices() {
            eventually(&format!("h{i} shows the blocks"), CONVERGE, || {
                let b = v4_blocks(&c, i, network);
                if b == blocks {
                    Ok(())
                } else {
                    Err(format!("{b:?} vs h1's {blocks:?}"))
                }
            });
            assert!(
                blocks.iter().any(|(_, h)| *h == c.host_id(i)),
                "h{i} owns no block: {blocks:?}"
            );
        }
        let nets: Vec<((u32, u32), &str)> = blocks
            .iter()
            .map(|(cidr, h)| (v4_net(cidr), h.as_str()))
            .collect();
        for (x, ((net, mask), owner)) in nets.iter().enumerate() {
            assert!(c.index_of(owner).is_some(), "block of {owner}");
            assert!(
                v4_in(subnet, &Ipv4Addr::from(*net).to_string()) && *mask >= subnet.1,
                "block {:?} outside the subnet",
                blocks[x]
            );
            for ((other, other_mask), _) in &nets[x + 1..] {
                let common = mask & other_mask;
                assert_ne!(net & common, other & common, "blocks overlap: {blocks:?}");
            }
        }
        for e in eps.values() {
            assert!(
                nets.iter()
                    .any(|(net, owner)| *owner == e.host && v4_in(*net, e.v4())),
                "{e:?} is in no block of its host: {blocks:?}"
            );
        }
        wait_converged(&c, network, &[1, 2, 3]);
    }

    // Everything detached (concurrently again): no endpoint, no block, no entry is left.
    std::thread::scope(|s| {
        for i in c.indices() {
            for j in 0..attachers {
                let c = &c;
                s.spawn(move || {
                    let h = c.host(i);
                    let net = net_name(j % networks);
                    for k in 0..per {
                        let n = name(i, j, k);
                        h.ok(&["detach", &n, "--network", &net]);
                        h.ok(&["sandbox", "rm", &n]);
                    }
                });
            }
        }
    });
    for n in 0..networks {
        let network = net_name(n);
        assert_eq!(endpoints(&c, &network).len(), 0);
        for i in c.indices() {
            eventually(&format!("h{i} shows no blocks"), CONVERGE, || {
                let net = inspect(&c, i, &network);
                match net["blocks"].as_array().map_or(0, Vec::len) {
                    0 => Ok(()),
                    _ => Err(format!("{}", net["blocks"])),
                }
            });
        }
        wait_converged(&c, &network, &[1, 2, 3]);
    }
}

/// Two hosts on an overlay network `ov` with these subnets, whose addresses a gone host keeps
/// for a minute (long enough to come back to them); the network's VNI.
fn two_hosts_that_come_back(v4: &str, v6: &str) -> (Cluster, u64) {
    let c = Cluster::with(
        2,
        Options {
            gone_grace: 60,
            ..Options::default()
        },
    );
    let made = create_overlay(&c, "ov", &["--subnet", v4, "--ipv6-subnet", v6]);
    let vni = made["vni"].as_u64().unwrap();
    (c, vni)
}

#[test]
fn host_lease_lapse_hides_names_but_keeps_traffic() {
    // A long grace: h2 comes back while the cluster still keeps its addresses for it.
    let (c, vni) = two_hosts_that_come_back("10.190.0.0/16", "fd00:190::/64");
    let a = sandbox_on(&c, 1, "a1", "ov", &[]);
    let b = sandbox_on(&c, 2, "b2", "ov", &[]);
    sandbox_on(&c, 2, "bb2", "ov", &[]);
    let (h1, h2) = (c.host(1), c.host(2));
    wait_converged(&c, "ov", &[1, 2]);
    assert!(h1.reaches("a1", b.v4()));
    assert_eq!(dig(h1, "a1", "10.190.0.1", "b2", "A"), [b.v4()]);
    let on_h2 = |eps: BTreeMap<String, Ep>| -> BTreeMap<String, Vec<String>> {
        eps.into_values()
            .filter(|e| e.host == "h2")
            .map(|e| (e.id, e.ips))
            .collect()
    };
    let before = on_h2(endpoints(&c, "ov"));
    assert_eq!(before.len(), 2);
    let dev1 = vxlan_with_vni(h1, vni).unwrap()["ifname"]
        .as_str()
        .unwrap()
        .to_string();
    let entries_before = (fdb(h1, &dev1), overlay_neigh(h1, &dev1));
    assert_eq!(entries_before.0.len(), 2, "{entries_before:?}");

    // h2's daemon dies; its containers stay. Within the lease and 2 s h1 lists h2 as gone,
    // at its last address, and its names are gone from h1's DNS (NXDOMAIN, not an address
    // that may be dead) ...
    let killed = Instant::now();
    c.kill(2);
    let limit = Duration::from_secs(LEASE_TTL + 2);
    eventually(
        "h1 lists h2 as gone and stops naming its endpoints",
        limit.saturating_sub(killed.elapsed()),
        || {
            let hosts = try_hosts(&c, 1)?;
            let listed = hosts.get("h2").ok_or("h2 not listed")?;
            if listed["state"] != "gone" {
                return Err(format!("{listed}"));
            }
            let names = dig(h1, "a1", "10.190.0.1", &format!("b2.ov.{DNS_SUFFIX}"), "A");
            if !names.is_empty() {
                return Err(format!("b2 still resolves to {names:?}"));
            }
            Ok(())
        },
    );
    let listed = &try_hosts(&c, 1).unwrap()["h2"];
    assert_eq!(
        listed["address"],
        c.addr(2),
        "a gone host's address: {listed}"
    );
    assert!(listed["vtep_mac"].is_string(), "{listed}");
    assert_eq!(host_state(&c, 1, "h1").unwrap(), "up");
    // ... but h1 keeps sending to h2's containers, which answer.
    assert_eq!((fdb(h1, &dev1), overlay_neigh(h1, &dev1)), entries_before);
    assert!(
        h1.reaches("a1", b.v4()),
        "a1 -> b2 while h2's daemon is gone"
    );
    assert!(
        h2.reaches("b2", a.v4()),
        "b2 -> a1 while h2's daemon is gone"
    );
    let kept = sandbox_addrs(h2, "b2", "eth0");
    assert!(kept.contains(b.v4()), "b2 keeps its address: {kept:?}");
    // h1's kernel still matches the store, which keeps h2's endpoints for the grace.
    wait_converged(&c, "ov", &[1]);

    // Back: same endpoints, same addresses, names again.
    c.start(2);
    eventually("h1 lists h2 as up", CONVERGE, || {
        match host_state(&c, 1, "h2")?.as_str() {
            "up" => Ok(()),
            s => Err(format!("state {s}")),
        }
    });
    assert_eq!(
        on_h2(endpoints(&c, "ov")),
        before,
        "h2's endpoints after restart"
    );
    wait_converged(&c, "ov", &[1, 2]);
    eventually_reaches(h1, "a1", b.v4(), CONVERGE);
    eventually_reaches(h2, "b2", a.v4(), CONVERGE);
    eventually("h1 names b2 again", CONVERGE, || {
        match dig(h1, "a1", "10.190.0.1", "b2", "A") {
            names if names == [b.v4()] => Ok(()),
            names => Err(format!("{names:?}")),
        }
    });
}

#[test]
fn etcd_outage() {
    let c = Cluster::new(2);
    create_overlay(&c, "ov", &["--subnet", "10.191.0.0/16"]);
    let a = sandbox_on(&c, 1, "a1", "ov", &[]);
    let b = sandbox_on(&c, 2, "b2", "ov", &[]);
    let (h1, h2) = (c.host(1), c.host(2));
    // Sandboxes for later, while the store is there to record them.
    h1.ok(&["sandbox", "create", "during"]);
    h1.ok(&["sandbox", "create", "after"]);
    wait_converged(&c, "ov", &[1, 2]);
    assert!(h1.reaches("a1", b.v4()));

    c.etcd_stop();
    let outage = Instant::now();
    assert!(h1.reaches("a1", b.v4()), "traffic during the outage");
    assert!(h2.reaches("b2", a.v4()), "traffic during the outage");

    let t = Instant::now();
    let err = h1.fails(&["attach", "during", "--network", "ov"]);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "attach took {took:?}: {err}");
    let lower = err.to_lowercase();
    assert!(
        lower.contains("store") || lower.contains("etcd"),
        "the error names the store: {err}"
    );
    match h1.client().post::<_, Value>(
        "/v1/endpoints",
        &json!({"network": "ov", "sandbox": "during"}),
    ) {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 503, "{message}");
        }
        other => panic!("API attach during the outage: {other:?}"),
    }
    assert!(h1.reaches("a1", b.v4()), "traffic later in the outage");
    assert!(h2.reaches("b2", a.v4()), "traffic later in the outage");
    eprintln!("etcd was stopped for {:?}", outage.elapsed());
    c.etcd_cont();

    // The same daemons attach again once the store is back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let o = h1.berth(&["-o", "json", "attach", "after", "--network", "ov"]);
        if o.status.success() {
            break Ep::from_json(&serde_json::from_slice(&o.stdout).unwrap(), "h1");
        }
        assert!(
            Instant::now() < deadline,
            "attach after the outage: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eventually_reaches(h2, "b2", after.v4(), CONVERGE);
    eventually_reaches(h1, "after", b.v4(), CONVERGE);
    // An attach that failed left nothing behind, not even once the store came back.
    eventually("no endpoint of the failed attach", CONVERGE, || {
        let eps = try_endpoints(&c, "ov")?;
        match eps.values().find(|e| e.sandbox == "during") {
            Some(e) => Err(format!("{e:?}")),
            None => Ok(()),
        }
    });
    wait_converged(&c, "ov", &[1, 2]);
}

#[test]
fn compaction_forces_relist_without_stale_entries() {
    let c = Cluster::new(2);
    create_overlay(
        &c,
        "ov",
        &[
            "--subnet",
            "10.192.0.0/16",
            "--ipv6-subnet",
            "fd00:192::/64",
        ],
    );
    sandbox_on(&c, 1, "w1", "ov", &[]);
    let h2 = c.host(2);
    for s in ["x1", "x2", "x3", "x4", "x5", "x6"] {
        h2.ok(&["sandbox", "create", s]);
    }
    // While h1 watches.
    attach(&c, 2, "x1", "ov", &[]);
    let x2 = attach(&c, 2, "x2", "ov", &[]);
    attach(&c, 2, "x3", "ov", &[]);
    h2.ok(&["detach", "x1", "--network", "ov"]);
    wait_converged(&c, "ov", &[1, 2]);
    c.etcd_compact();

    // h1 cut off from etcd (its connection reset, so it cannot have seen what follows):
    // changes, a compaction past them, more changes.
    c.block_etcd(1);
    eventually(
        "h1's connections to etcd are gone",
        Duration::from_secs(10),
        || match c.etcd_connections(1) {
            0 => Ok(()),
            n => Err(format!("{n} established")),
        },
    );
    h2.ok(&["detach", "x2", "--network", "ov"]);
    attach(&c, 2, "x4", "ov", &[]);
    // x2's address again, with another MAC: h1 must replace, not keep, x2's entries.
    let x5 = attach(
        &c,
        2,
        "x5",
        "ov",
        &["--ip", x2.v4(), "--mac", "02:42:c0:ff:ee:05"],
    );
    assert_eq!(x5.v4(), x2.v4());
    c.etcd_compact();
    let x6 = attach(&c, 2, "x6", "ov", &[]);
    h2.ok(&["detach", "x3", "--network", "ov"]);
    c.unblock_etcd(1);

    // h1's watch resumes from before the compaction; it must relist and end up exactly
    // where the store is.
    wait_converged(&c, "ov", &[1, 2]);
    let h1 = c.host(1);
    eventually_reaches(h1, "w1", x5.v4(), CONVERGE);
    eventually_reaches(h1, "w1", x6.v4(), CONVERGE);

    // And it keeps following: one more change after the relist.
    h2.ok(&["detach", "x4", "--network", "ov"]);
    wait_converged(&c, "ov", &[1, 2]);
}

#[test]
fn host_readded_with_new_address() {
    let (c, vni) = two_hosts_that_come_back("10.193.0.0/16", "fd00:193::/64");
    let a = sandbox_on(&c, 1, "a1", "ov", &[]);
    let b = sandbox_on(&c, 2, "b2", "ov", &[]);
    let (h1, h2) = (c.host(1), c.host(2));
    wait_converged(&c, "ov", &[1, 2]);
    assert!(h1.reaches("a1", b.v4()));
    let old = c.addr(2);

    c.stop(2);
    let new = "198.51.100.50";
    c.set_addr(2, new);
    c.start(2);

    eventually("h1 has h2 at its new address", CONVERGE, || {
        let hosts = try_hosts(&c, 1)?;
        let h = hosts.get("h2").ok_or("h2 not listed")?;
        if h["address"] == new && h["state"] == "up" {
            Ok(())
        } else {
            Err(format!("{h}"))
        }
    });
    wait_converged(&c, "ov", &[1, 2]);
    let dev1 = vxlan_with_vni(h1, vni).unwrap()["ifname"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fdb(h1, &dev1), [(b.mac.clone(), new.to_string())]);
    assert!(
        fdb_all(h1, &dev1)
            .iter()
            .all(|e| e.dst.as_deref() != Some(old.as_str())),
        "nothing points at {old}"
    );
    eventually_reaches(h1, "a1", b.v4(), CONVERGE);
    eventually_reaches(h2, "b2", a.v4(), CONVERGE);
}

/// An overlay network's VNI, when none is asked for, is a random free one from 4096 up (as
/// docs/api.md says, and why): a VNI just given back is not handed out again, and an asked-for
/// VNI is checked.
#[test]
fn vnis_are_random_free_ones_from_4096_and_a_freed_one_is_not_reused() {
    let h = Host::bare();
    let _underlay = crate::harness::Outside::new(&h);
    h.start_with(|c| {
        c.args(["--advertise-address", crate::harness::HOST_UNDERLAY_IP]);
    });
    let vni = |name: &str, subnet: &str| -> u64 {
        let n = h.json(&[
            "network", "create", name, "--driver", "overlay", "--subnet", subnet,
        ]);
        n["vni"].as_u64().unwrap_or_else(|| panic!("no vni: {n}"))
    };
    let first: Vec<u64> = (1..=3)
        .map(|i| vni(&format!("ov{i}"), &format!("10.18{i}.0.0/16")))
        .collect();
    for v in &first {
        assert!((4096..=16_777_215).contains(v), "{first:?}");
    }
    assert_eq!(
        first.iter().collect::<BTreeSet<_>>().len(),
        3,
        "distinct: {first:?}"
    );
    // Not the lowest free ones: 4096, 4097, 4098 would be what "lowest free" gives.
    assert_ne!(first, [4096, 4097, 4098]);
    h.ok(&["network", "rm", "ov1"]);
    let again = vni("ov4", "10.184.0.0/16");
    assert_ne!(
        again, first[0],
        "a VNI just given back is not handed out again"
    );
    // Asked for: taken as asked, once.
    let asked = h.json(&[
        "network",
        "create",
        "ov5",
        "--driver",
        "overlay",
        "--subnet",
        "10.185.0.0/16",
        "--vni",
        "100",
    ]);
    assert_eq!(asked["vni"], 100, "{asked}");
    let err = h.fails(&[
        "network",
        "create",
        "ov6",
        "--driver",
        "overlay",
        "--subnet",
        "10.186.0.0/16",
        "--vni",
        &first[1].to_string(),
    ]);
    assert!(
        err.contains(&format!(
            "VNI {} is used by another overlay network",
            first[1]
        )),
        "{err}"
    );
}
