//! Random bodies for every Docker plugin method: the daemon answers each with well-formed
//! JSON (`{"Err": ...}` on failure), never drops a connection, and is still sound afterwards
//! (it answers, restarts and reconciles). Seeded; the seed is printed to replay a failure.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use serde_json::{Value, json};

use crate::harness::Host;

const METHODS: &[&str] = &[
    "Plugin.Activate",
    "NetworkDriver.GetCapabilities",
    "NetworkDriver.CreateNetwork",
    "NetworkDriver.DeleteNetwork",
    "NetworkDriver.CreateEndpoint",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.EndpointOperInfo",
    "NetworkDriver.Join",
    "NetworkDriver.Leave",
    "NetworkDriver.ProgramExternalConnectivity",
    "IpamDriver.GetCapabilities",
    "IpamDriver.GetDefaultAddressSpaces",
    "IpamDriver.RequestPool",
    "IpamDriver.ReleasePool",
    "IpamDriver.RequestAddress",
    "IpamDriver.ReleaseAddress",
    "NetworkDriver.Nonsense",
];
const KEYS: &[&str] = &[
    "NetworkID",
    "EndpointID",
    "PoolID",
    "Pool",
    "SubPool",
    "Options",
    "V6",
    "Address",
    "AddressIPv6",
    "MacAddress",
    "Interface",
    "IPv4Data",
    "IPv6Data",
    "Gateway",
    "SandboxKey",
    "RequestAddressType",
    "com.docker.network.generic",
    "berth.network",
    "AddressSpace",
];

fn random_string() -> String {
    match fastrand::u8(0..8) {
        0 => format!(
            "10.{}.{}.0/{}",
            fastrand::u8(..),
            fastrand::u8(..),
            fastrand::u8(0..40)
        ),
        1 => format!("10.88.0.{}", fastrand::u8(..)),
        2 => format!("fd00:{:x}::/{}", fastrand::u16(..), fastrand::u8(0..130)),
        3 => "com.docker.network.gateway".into(),
        4 => format!("id{}", fastrand::u8(0..4)),
        5 => "".into(),
        6 => "/proc/1/ns/net".into(),
        _ => (0..fastrand::usize(0..12))
            .map(|_| fastrand::char(..))
            .collect(),
    }
}

fn random_value(depth: u32) -> Value {
    match fastrand::u8(0..if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(fastrand::bool()),
        2 => json!(fastrand::i64(..)),
        3 | 4 => json!(random_string()),
        5 => Value::Array(
            (0..fastrand::usize(0..3))
                .map(|_| random_value(depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..fastrand::usize(0..6))
                .map(|_| {
                    (
                        fastrand::choice(KEYS).unwrap().to_string(),
                        random_value(depth + 1),
                    )
                })
                .collect(),
        ),
    }
}

fn random_body() -> Vec<u8> {
    match fastrand::u8(0..10) {
        0 => Vec::new(),
        1 => (0..fastrand::usize(0..64))
            .map(|_| fastrand::u8(..))
            .collect(),
        2 => b"null".to_vec(),
        _ => {
            let mut obj = serde_json::Map::new();
            for _ in 0..fastrand::usize(0..7) {
                obj.insert(fastrand::choice(KEYS).unwrap().to_string(), random_value(0));
            }
            Value::Object(obj).to_string().into_bytes()
        }
    }
}

/// What earlier answers handed out, for plausible follow-up requests.
#[derive(Default)]
struct Seen {
    pools: Vec<(String, String)>,
    addresses: Vec<String>,
    /// Docker network ids created, with their IPv4 pool.
    networks: Vec<(String, String)>,
}

fn pick<T: Clone>(v: &[T]) -> Option<T> {
    fastrand::choice(v).cloned()
}

/// A body shaped like the engine's for `method`, with ids from a small set and pools and
/// addresses from earlier answers, so that success paths and their orderings are exercised.
fn plausible_body(method: &str, seen: &Seen) -> Vec<u8> {
    let net = format!("net{}", fastrand::u8(0..3));
    let ep = format!("ep{}", fastrand::u8(0..4));
    let pool = pick(&seen.pools);
    let pool_id = pool.as_ref().map_or_else(random_string, |p| p.0.clone());
    let cidr = pool.as_ref().map_or_else(
        || format!("10.{}.0.0/24", fastrand::u8(100..110)),
        |p| p.1.clone(),
    );
    let addr = pick(&seen.addresses).unwrap_or_else(random_string);
    let gw = format!(
        "{}/24",
        cidr.split('/')
            .next()
            .unwrap()
            .trim_end_matches(".0")
            .to_string()
            + ".1"
    );
    let v = match method {
        "IpamDriver.RequestPool" => json!({"AddressSpace": "berth-local",
            "Pool": if fastrand::bool() { String::new() } else { format!("10.{}.0.0/24", fastrand::u8(100..110)) },
            "SubPool": "", "Options": if fastrand::bool() { Value::Null } else { json!({}) }, "V6": fastrand::u8(0..5) == 0}),
        "IpamDriver.ReleasePool" => json!({"PoolID": pool_id}),
        "IpamDriver.RequestAddress" => json!({"PoolID": pool_id,
            "Address": if fastrand::bool() { String::new() } else { addr.split('/').next().unwrap_or("").to_string() },
            "Options": if fastrand::bool() { Value::Null } else { json!({"RequestAddressType": "com.docker.network.gateway"}) }}),
        "IpamDriver.ReleaseAddress" => {
            json!({"PoolID": pool_id, "Address": addr.split('/').next().unwrap_or("")})
        }
        "NetworkDriver.CreateNetwork" => {
            json!({"NetworkID": net, "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "berth-local", "Pool": cidr, "Gateway": gw}], "IPv6Data": []})
        }
        "NetworkDriver.DeleteNetwork" => json!({"NetworkID": net}),
        "NetworkDriver.CreateEndpoint" => {
            // Mostly into a network that exists, at an address of its pool.
            let (net, addr) = match pick(&seen.networks) {
                Some((n, c)) if fastrand::u8(0..4) > 0 => {
                    let base = c
                        .split('/')
                        .next()
                        .unwrap()
                        .trim_end_matches(".0")
                        .to_string();
                    (n, format!("{base}.{}/24", fastrand::u8(2..250)))
                }
                _ => (net, addr),
            };
            json!({"NetworkID": net, "EndpointID": ep,
                "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}, "Options": {}})
        }
        "NetworkDriver.Join" => {
            json!({"NetworkID": net, "EndpointID": ep, "SandboxKey": "/var/run/docker/netns/x", "Options": {}})
        }
        _ => json!({"NetworkID": net, "EndpointID": ep}),
    };
    v.to_string().into_bytes()
}

/// One raw HTTP exchange, as the engine makes it (no Content-Type). Returns (status, body).
/// The daemon may answer a body it refuses before reading all of it, and close: the rest of
/// the body is then not sent, and the answer read all the same.
pub(crate) fn post(h: &Host, method: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = UnixStream::connect(h.docker_plugin_socket()).expect("plugin socket accepts");
    let head = format!(
        "POST /{method} HTTP/1.1\r\nHost: plugin.moby.localhost\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    if let Err(e) = s.write_all(body) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // Closed with some of the body unread: what was answered before is all there is.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("an answer, not {e}"),
        }
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let status = String::from_utf8_lossy(&raw[..end])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, raw[end + 4..].to_vec())
}

#[test]
fn random_plugin_requests_get_well_formed_answers() {
    // FUZZ_SEED=<seed> replays a run.
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    fastrand::seed(seed);
    eprintln!("plugin fuzz seed {seed}");
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    let mut answered = std::collections::BTreeMap::<(String, u16), u32>::new();
    let mut seen = Seen::default();
    for i in 0..800 {
        let method = fastrand::choice(METHODS).unwrap();
        let body = if fastrand::bool() {
            plausible_body(method, &seen)
        } else {
            random_body()
        };
        let (status, answer) = post(&h, method, &body);
        let shown = String::from_utf8_lossy(&body);
        let v: Value = serde_json::from_slice(&answer).unwrap_or_else(|e| {
            panic!(
                "#{i} {method} {shown}: answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&answer)
            )
        });
        assert!(v.is_object(), "#{i} {method} {shown}: {v}");
        *answered.entry((method.to_string(), status)).or_default() += 1;
        if status == 200 {
            if let (Some(id), Some(pool)) = (v["PoolID"].as_str(), v["Pool"].as_str()) {
                seen.pools.push((id.to_string(), pool.to_string()));
            }
            if let Some(a) = v["Address"].as_str() {
                seen.addresses.push(a.to_string());
            }
            if *method == "NetworkDriver.CreateNetwork"
                && let Ok(req) = serde_json::from_slice::<Value>(&body)
                && let (Some(n), Some(c)) = (
                    req["NetworkID"].as_str(),
                    req["IPv4Data"][0]["Pool"].as_str(),
                )
            {
                seen.networks.push((n.to_string(), c.to_string()));
            }
        }
        if status != 200 {
            assert!(
                (400..600).contains(&status),
                "#{i} {method}: status {status}"
            );
            assert!(
                v["Err"].as_str().is_some_and(|e| !e.is_empty()),
                "#{i} {method} {shown}: {v}"
            );
        }
    }
    eprintln!("answers by method and status: {answered:?}");
    let deep = answered
        .iter()
        .filter(|((m, st), _)| {
            *st == 200
                && (m.ends_with("CreateNetwork")
                    || m.ends_with("Join")
                    || m.ends_with("CreateEndpoint"))
        })
        .count();
    assert!(
        deep > 0,
        "the plausible requests reached the success paths: {answered:?}"
    );
    // Still sound: every address is owned by the gateway, a Docker reservation or a live
    // endpoint (once the reaper has released what the last detaches left), and every endpoint
    // has its veth.
    let eps = h.json(&["endpoint", "ls"]);
    let ids: Vec<&str> = eps
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let stray = || -> Vec<String> {
        let mut stray = Vec::new();
        for n in h.json(&["network", "ls"]).as_array().unwrap() {
            let name = n["name"].as_str().unwrap();
            let allocs: Value = h
                .client()
                .get(&format!("/v1/networks/{name}/allocations"))
                .unwrap();
            for a in allocs.as_array().unwrap() {
                let owner = a["owner"].as_str().unwrap();
                if !(owner == "gateway" || owner.starts_with("docker:") || ids.contains(&owner)) {
                    stray.push(format!("{name}: {a}"));
                }
            }
        }
        stray
    };
    h.eventually("no address is held by a missing endpoint", || {
        stray().is_empty()
    });
    let links = h.host_links();
    for e in eps.as_array().unwrap() {
        assert!(
            links
                .iter()
                .any(|l| l == e["host_ifname"].as_str().unwrap()),
            "{e}"
        );
    }
    h.stop();
    h.start();
    assert!(h.ping_gateway_from_new_sandbox("blue"));
}

/// The address berth's IPAM hands out from `pool` (with its prefix length); the pool's
/// gateway if `gateway`.
fn request_address(h: &Host, pool: &str, gateway: bool) -> String {
    let opts = if gateway {
        json!({"RequestAddressType": "com.docker.network.gateway"})
    } else {
        Value::Null
    };
    ok_call(
        h,
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool, "Address": "", "Options": opts}),
    )["Address"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Who holds `ip` in a berth network's IPAM.
fn allocation_owner(h: &Host, network: &str, ip: &str) -> Option<String> {
    let allocs: Value = h
        .client()
        .get(&format!("/v1/networks/{network}/allocations"))
        .unwrap();
    allocs
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["ip"] == ip)
        .map(|a| a["owner"].as_str().unwrap().to_string())
}

/// The engine's CreateEndpoint request for an endpoint with one IPv4 address (with prefix).
fn create_endpoint_body(network: &str, endpoint: &str, address: &str) -> Value {
    json!({"NetworkID": network, "EndpointID": endpoint,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""}, "Options": {}})
}

/// A plugin call that must succeed; its JSON answer.
fn ok_call(h: &Host, method: &str, body: Value) -> Value {
    let (status, answer) = post(h, method, body.to_string().as_bytes());
    let v: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(status, 200, "{method} {body}: {v}");
    v
}

/// Addresses berth's IPAM hands the engine are held in memory until the endpoint that uses
/// them is committed: released ones are free again, and after a crash one is either still
/// free (and taken when the engine's CreateEndpoint brings it) or refused to the engine if
/// someone else took it meanwhile. Never in use twice.
#[test]
fn docker_address_reservations_are_never_handed_out_twice() {
    let h = Host::new();
    let pool = ok_call(
        &h,
        "IpamDriver.RequestPool",
        json!({"AddressSpace": "berth-local", "Pool": "10.97.0.0/24", "SubPool": "", "Options": {}, "V6": false}),
    );
    let pool_id = pool["PoolID"].as_str().unwrap().to_string();
    let address = |h: &Host, gateway: bool| request_address(h, &pool_id, gateway);
    let gw = address(&h, true);
    ok_call(
        &h,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n1", "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "berth-local", "Pool": "10.97.0.0/24", "Gateway": gw}], "IPv6Data": []}),
    );
    let first = address(&h, false);
    let second = address(&h, false);
    assert_ne!(first, second);
    ok_call(
        &h,
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": second.split('/').next().unwrap()}),
    );
    let ask_for = |h: &Host, a: &str| {
        let body =
            json!({"PoolID": pool_id, "Address": a.split('/').next().unwrap(), "Options": null});
        post(h, "IpamDriver.RequestAddress", body.to_string().as_bytes()).0
    };
    assert_eq!(
        ask_for(&h, &second),
        200,
        "a released reservation is free again"
    );
    assert_ne!(ask_for(&h, &first), 200, "a held one is not");

    // The daemon dies holding both in memory only; after it, `first` is free and a sandbox
    // takes it. The engine's CreateEndpoint with it is refused and changes nothing.
    h.kill();
    h.start();
    let ip = first.split('/').next().unwrap();
    h.ok(&["sandbox", "create", "s1"]);
    h.ok(&["attach", "s1", "--network", "docker-n1", "--ip", ip]);
    let before = h.snapshot();
    let (status, answer) = post(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n1", "e1", &first)
            .to_string()
            .as_bytes(),
    );
    let v: Value = serde_json::from_slice(&answer).unwrap();
    assert_ne!(status, 200, "{v}");
    assert!(v["Err"].as_str().unwrap().contains("in use"), "{v}");
    assert_eq!(h.snapshot(), before);
    // `second` is free after the crash too, and the engine's endpoint takes it for good.
    ok_call(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n1", "e2", &second),
    );
    h.ok(&["sandbox", "create", "s2"]);
    let second_ip = second.split('/').next().unwrap();
    let taken = h.fails(&["attach", "s2", "--network", "docker-n1", "--ip", second_ip]);
    assert!(
        taken.contains("in use"),
        "held for the engine's endpoint: {taken}"
    );
    // Join commits the endpoint with its address.
    ok_call(
        &h,
        "NetworkDriver.Join",
        json!({"NetworkID": "n1", "EndpointID": "e2", "SandboxKey": "/var/run/docker/netns/x", "Options": {}}),
    );
    let eps = h.json(&["endpoint", "ls", "--network", "docker-n1"]);
    let joined = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ips"][0] == second.as_str())
        .unwrap_or_else(|| panic!("{eps}"));
    let owner_of = |ip: &str| allocation_owner(&h, "docker-n1", ip);
    assert_eq!(
        owner_of(second_ip).as_deref(),
        joined["id"].as_str(),
        "{eps}"
    );
    // An endpoint deleted before it joins gives its address back to the reservation, which
    // the engine then releases; the veth berth started making for it at CreateEndpoint goes.
    let links = h.host_links();
    let third = address(&h, false);
    ok_call(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n1", "e3", &third),
    );
    assert_ne!(ask_for(&h, &third), 200, "held by e3");
    ok_call(
        &h,
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "e3"}),
    );
    assert_ne!(
        ask_for(&h, &third),
        200,
        "back with the engine's reservation"
    );
    assert_eq!(h.host_links(), links, "no veth left by e3");
    ok_call(
        &h,
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": third.split('/').next().unwrap()}),
    );
    assert_eq!(ask_for(&h, &third), 200, "released");
    let s1 = h.json(&["endpoint", "ls", "--network", "docker-n1"]);
    assert!(
        s1.as_array()
            .unwrap()
            .iter()
            .any(|e| e["netns"]["sandbox"] == "s1" && owner_of(ip).as_deref() == e["id"].as_str()),
        "{s1}"
    );
    // A joined endpoint's address, which berth's IPAM handed out, goes back to the pool's
    // reservation at Leave; only the engine's ReleaseAddress frees it.
    let fifth = address(&h, false);
    let fifth_ip = fifth.split('/').next().unwrap();
    ok_call(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n1", "e5", &fifth),
    );
    ok_call(
        &h,
        "NetworkDriver.Join",
        json!({"NetworkID": "n1", "EndpointID": "e5", "SandboxKey": "/var/run/docker/netns/y", "Options": {}}),
    );
    let joined = owner_of(fifth_ip).unwrap();
    assert!(
        !joined.starts_with("docker:"),
        "the endpoint holds it: {joined}"
    );
    for method in ["NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"] {
        ok_call(&h, method, json!({"NetworkID": "n1", "EndpointID": "e5"}));
    }
    h.eventually("the endpoint no longer holds it", || {
        owner_of(fifth_ip).as_deref() != Some(joined.as_str())
    });
    let reserved = Some(format!("docker:{pool_id}"));
    assert_eq!(owner_of(fifth_ip), reserved, "held until released");
    assert_ne!(ask_for(&h, &fifth), 200, "not handed out meanwhile");
    ok_call(
        &h,
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": fifth_ip}),
    );
    assert_eq!(owner_of(fifth_ip), None, "released");
    // A daemon that dies between CreateEndpoint and Join leaves no veth after its restart.
    let fourth = address(&h, false);
    ok_call(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n1", "e4", &fourth),
    );
    h.kill();
    h.start();
    assert_eq!(h.host_links(), links, "no veth left by e4");
}

impl Host {
    fn ping_gateway_from_new_sandbox(&self, network: &str) -> bool {
        self.ok(&["sandbox", "create", "fuzzcheck"]);
        self.ok(&["attach", "fuzzcheck", "--network", network]);
        self.reaches("fuzzcheck", "10.91.0.1")
    }
}

/// Addresses berth's IPAM hands another driver's network (macvlan, ipvlan: they never create
/// berth endpoints) are never handed out twice: on a berth network's subnet they are reserved
/// in the store at once (and survive a restart); handed out before a berth network served the
/// pool, they move into it when one does, and back to the pool when it goes.
#[test]
fn addresses_for_another_drivers_network_are_never_handed_out_twice() {
    let h = Host::new();
    let request_pool = |h: &Host, cidr: &str| -> String {
        ok_call(
            h,
            "IpamDriver.RequestPool",
            json!({"AddressSpace": "berth-local", "Pool": cidr, "SubPool": "", "Options": {}, "V6": false}),
        )["PoolID"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let address = |h: &Host, pool: &str, gateway: bool| {
        let a = request_address(h, pool, gateway);
        a.split('/').next().unwrap().to_string()
    };
    let release = |h: &Host, pool: &str, ip: &str| {
        ok_call(
            h,
            "IpamDriver.ReleaseAddress",
            json!({"PoolID": pool, "Address": ip}),
        );
    };

    // A macvlan network with --ipam-driver berth on a berth network's subnet.
    h.ok(&["network", "create", "shared", "--subnet", "10.98.0.0/24"]);
    let p1 = request_pool(&h, "10.98.0.0/24");
    assert_eq!(
        address(&h, &p1, true),
        "10.98.0.1",
        "the berth network's gateway"
    );
    let a1 = address(&h, &p1, false);
    assert_eq!(
        allocation_owner(&h, "shared", &a1),
        Some(format!("docker:{p1}"))
    );
    h.kill();
    h.start();
    assert_eq!(
        allocation_owner(&h, "shared", &a1),
        Some(format!("docker:{p1}")),
        "kept across a crash"
    );
    h.ok(&["sandbox", "create", "s1"]);
    let taken = h.fails(&["attach", "s1", "--network", "shared", "--ip", &a1]);
    assert!(taken.contains("in use"), "{taken}");
    // A berth-driver Docker network bound to the same berth network, on the engine's own
    // IPAM, cannot take it over either.
    ok_call(
        &h,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n1", "Options": {"com.docker.network.generic": {"berth.network": "shared"}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.98.0.0/24", "Gateway": "10.98.0.1/24"}],
        "IPv6Data": []}),
    );
    let (status, answer) = post(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n1", "e1", &format!("{a1}/24"))
            .to_string()
            .as_bytes(),
    );
    assert_ne!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("in use"));
    // Nor does that network make the pool count as its own after a restart.
    h.kill();
    h.start();
    let a2 = address(&h, &p1, false);
    assert_eq!(
        allocation_owner(&h, "shared", &a2),
        Some(format!("docker:{p1}"))
    );
    release(&h, &p1, &a2);
    release(&h, &p1, &a1);
    assert_eq!(allocation_owner(&h, "shared", &a1), None, "released");

    // A pool first used by another driver, then by a berth network (identical requests
    // share it): its address moves into the berth network, and back when that goes.
    let p2 = request_pool(&h, "10.99.0.0/24");
    let gw = address(&h, &p2, true);
    let b1 = address(&h, &p2, false);
    assert_eq!(request_pool(&h, "10.99.0.0/24"), p2, "shared");
    ok_call(
        &h,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n2", "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "berth-local", "Pool": "10.99.0.0/24", "Gateway": format!("{gw}/24")}],
        "IPv6Data": []}),
    );
    assert_eq!(
        allocation_owner(&h, "docker-n2", &b1),
        Some(format!("docker:{p2}"))
    );
    for _ in 0..20 {
        assert_ne!(address(&h, &p2, false), b1, "never handed out twice");
    }
    // The pool has another user besides the berth network: what it hands out now may be
    // that driver's, so it is recorded, not held in memory, and outlives the network.
    let c1 = address(&h, &p2, false);
    assert_eq!(
        allocation_owner(&h, "docker-n2", &c1),
        Some(format!("docker:{p2}"))
    );
    // Another Docker network bound to the same berth network, on the engine's own IPAM,
    // cannot take over an address reserved under a pool it does not use.
    ok_call(
        &h,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": "n3", "Options": {"com.docker.network.generic": {"berth.network": "docker-n2"}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.99.0.0/24", "Gateway": format!("{gw}/24")}],
        "IPv6Data": []}),
    );
    let (status, answer) = post(
        &h,
        "NetworkDriver.CreateEndpoint",
        create_endpoint_body("n3", "e3", &format!("{c1}/24"))
            .to_string()
            .as_bytes(),
    );
    assert_ne!(status, 200, "{}", String::from_utf8_lossy(&answer));
    ok_call(
        &h,
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": "n3"}),
    );
    ok_call(
        &h,
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": "n2"}),
    );
    for _ in 0..20 {
        assert_ne!(
            address(&h, &p2, false),
            b1,
            "still held after the network went"
        );
    }
    let ask_for = |h: &Host, ip: &str| {
        let body = json!({"PoolID": p2, "Address": ip, "Options": null});
        post(h, "IpamDriver.RequestAddress", body.to_string().as_bytes()).0
    };
    assert_ne!(ask_for(&h, &b1), 200, "held");
    assert_ne!(ask_for(&h, &c1), 200, "held");
    release(&h, &p2, &b1);
    assert_eq!(ask_for(&h, &b1), 200, "free once the engine releases it");
}
