//! Crash safety: SIGKILL the daemon in the middle of a run of attaches (and of detaches),
//! restart it, and check the invariants: no address twice, no address held by a missing
//! endpoint, no berth interface without an endpoint, every attach that returned is durable, and
//! every endpoint works.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_api::{Allocation, Attach, Client, Detach, Endpoint};

use crate::harness::Host;

const SANDBOXES: usize = 200;
const CALLERS: usize = 4;

/// Runs `op` for every sandbox index from `CALLERS` threads until the daemon dies; returns the
/// indices whose call returned success.
fn run_until_killed(
    h: &Host,
    kill_after: usize,
    op: impl Fn(&Client, usize) -> bool + Sync,
) -> Vec<usize> {
    let done = AtomicUsize::new(0);
    let client = h.client().with_timeout(Duration::from_secs(10));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..CALLERS)
            .map(|t| {
                let (client, op, done) = (&client, &op, &done);
                s.spawn(move || {
                    let mut ok = Vec::new();
                    for i in (t..SANDBOXES).step_by(CALLERS) {
                        if !op(client, i) {
                            break;
                        }
                        ok.push(i);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.load(Ordering::Relaxed) < kill_after {
            assert!(
                Instant::now() < deadline,
                "calls did not progress:\n{}",
                h.log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..2000)));
        h.kill();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn check_invariants(h: &Host) -> Vec<Endpoint> {
    let c = h.client();
    let eps: Vec<Endpoint> = c.get("/v1/endpoints").unwrap();
    let allocs: Vec<Allocation> = c.get("/v1/networks/blue/allocations").unwrap();
    let ids: HashSet<&str> = eps.iter().map(|e| e.id.as_str()).collect();

    // No address twice: among endpoints, and each endpoint address is the one IPAM holds for it.
    let mut owner_of: HashMap<String, String> = HashMap::new();
    for a in &allocs {
        assert!(
            owner_of.insert(a.ip.clone(), a.owner.clone()).is_none(),
            "{} held twice",
            a.ip
        );
        assert!(
            a.owner == "gateway" || ids.contains(a.owner.as_str()),
            "{} held by missing endpoint {}",
            a.ip,
            a.owner
        );
    }
    let mut seen = HashSet::new();
    for e in &eps {
        for ip in &e.ips {
            let ip = ip.addr().to_string();
            assert!(seen.insert(ip.clone()), "{ip} on two endpoints");
            assert_eq!(owner_of.get(&ip), Some(&e.id), "IPAM owner of {ip}");
        }
    }
    assert_eq!(
        allocs.len(),
        eps.len() + 1,
        "one allocation per endpoint plus the gateway"
    );

    // No berth interface without an endpoint, and none missing.
    let links: HashSet<String> = h.host_links().into_iter().collect();
    let veths: HashSet<&String> = links
        .iter()
        .filter(|l| l.starts_with("berth") && !l.starts_with("berth-"))
        .collect();
    let expected: HashSet<&String> = eps.iter().map(|e| &e.host_ifname).collect();
    assert_eq!(veths, expected, "host veths match endpoints");

    // Every endpoint works: it reaches the gateway through the bridge, and a sample of them
    // reach another endpoint. (Not every pair: the kernel's ARP table limit, gc_thresh3, is
    // shared by all namespaces on the machine, and entries younger than 5 s cannot be
    // reclaimed, so a full mesh of pings here would overflow it.)
    let peer = eps.first().map(|e| e.ips[0].addr().to_string());
    for (i, e) in eps.iter().enumerate() {
        let sb = e.netns.sandbox.as_deref().unwrap();
        assert!(h.reaches(sb, "10.91.0.1"), "{sb} reaches the gateway");
        if let Some(p) = peer.as_ref().filter(|_| i % 20 == 1) {
            assert!(h.reaches(sb, p), "{sb} reaches {p}");
        }
    }
    eps
}

#[test]
fn sigkill_during_attach_and_detach_leaks_nothing() {
    let seed = fastrand::u64(..);
    fastrand::seed(seed);
    eprintln!("crash test seed {seed}");
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/23"]);
    let c = h.client();
    for i in 0..SANDBOXES {
        let _: serde_json::Value = c
            .post(
                "/v1/sandboxes",
                &serde_json::json!({ "name": format!("s{i}") }),
            )
            .unwrap();
    }

    // Kill while attaching.
    let kill_after = fastrand::usize(20..SANDBOXES - 40);
    let attached = run_until_killed(&h, kill_after, |c, i| {
        let req = Attach {
            network: "blue".into(),
            sandbox: format!("s{i}"),
            ..Default::default()
        };
        c.post::<_, Endpoint>("/v1/endpoints", &req).is_ok()
    });
    h.start();
    let eps = check_invariants(&h);
    let present: HashSet<String> = eps.iter().filter_map(|e| e.netns.sandbox.clone()).collect();
    for i in &attached {
        assert!(
            present.contains(&format!("s{i}")),
            "attach of s{i} returned success but was lost"
        );
    }
    eprintln!(
        "killed after {} attaches; {} endpoints after restart",
        attached.len(),
        eps.len()
    );

    // The runtime retries what did not finish: everything attaches, addresses stay unique.
    for i in 0..SANDBOXES {
        if !present.contains(&format!("s{i}")) {
            let req = Attach {
                network: "blue".into(),
                sandbox: format!("s{i}"),
                ..Default::default()
            };
            h.client()
                .post::<_, Endpoint>("/v1/endpoints", &req)
                .unwrap();
        }
    }
    assert_eq!(check_invariants(&h).len(), SANDBOXES);

    // Kill while detaching.
    let kill_after = fastrand::usize(20..SANDBOXES - 40);
    let detached = run_until_killed(&h, kill_after, |c, i| {
        let req = Detach {
            network: "blue".into(),
            sandbox: Some(format!("s{i}")),
            ..Default::default()
        };
        c.post::<_, serde_json::Value>("/v1/detach", &req).is_ok()
    });
    h.start();
    let eps = check_invariants(&h);
    let present: HashSet<String> = eps.iter().filter_map(|e| e.netns.sandbox.clone()).collect();
    for i in &detached {
        assert!(
            !present.contains(&format!("s{i}")),
            "detach of s{i} returned success but came back"
        );
    }
}
