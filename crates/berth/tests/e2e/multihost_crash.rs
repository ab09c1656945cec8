//! Crash safety across hosts: two daemons on one etcd, callers attaching (then detaching)
//! sandboxes on one overlay network on both hosts at once, and host 1's daemon SIGKILLed in
//! the middle and started again with the same flags. Then, cluster-wide: no address twice, no
//! address held by an endpoint that does not exist, every call that returned success durable,
//! no berth interface on a host without a store record for it, each host's VXLAN entries
//! exactly the other host's endpoints, and a sample of endpoints reaching each other across
//! hosts. (`crash.rs` is the same on one host and its own store.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_api::{Allocation, Attach, Client, Detach, Endpoint, Network};
use serde_json::{Value, json};

use crate::cluster::{Cluster, Options, canonical_ip, eventually, fdb, links, neigh};

const NET: &str = "ov";
const SUBNET: &str = "10.196.0.0/16";
const GATEWAY: &str = "10.196.0.1";
/// Sandboxes per host, and concurrent callers per host.
const PER_HOST: usize = 64;
const CALLERS: usize = 4;
/// How long the hosts get to agree after a change (a loaded 2-core machine).
const CONVERGE: Duration = Duration::from_secs(15);
const HOSTS: [usize; 2] = [1, 2];

fn sandbox(host: usize, k: usize) -> String {
    format!("h{host}s{k}")
}

/// What one host's callers got done.
#[derive(Debug, Default)]
struct Outcome {
    /// Sandbox indices whose call returned success.
    ok: BTreeSet<usize>,
    /// Calls that failed while the host's daemon was not being killed: (index, error).
    failed: Vec<(usize, String)>,
}

/// Runs `op(client, host, k)` for the sandboxes `ks(host)` from `CALLERS` threads per host, on
/// both hosts at once. Once host 1 has had `kill_after` successes its daemon is SIGKILLed
/// (its callers stop at their first failure, as a runtime's would), `while_down` runs, and the
/// daemon is started again with the same flags. Host 2's callers make half their calls before
/// that restart and half from the moment it begins, so that host 2 changes the store while
/// host 1 starts and reconciles.
fn churn(
    c: &Cluster,
    ks: impl Fn(usize) -> Vec<usize> + Sync,
    kill_after: usize,
    while_down: impl FnOnce(),
    op: impl Fn(&Client, usize, usize) -> Result<(), String> + Sync,
) -> BTreeMap<usize, Outcome> {
    let done1 = AtomicUsize::new(0);
    let done2 = AtomicUsize::new(0);
    let killing = AtomicBool::new(false);
    let restarting = AtomicBool::new(false);
    let clients: Vec<Client> = HOSTS
        .iter()
        .map(|&i| c.host(i).client().with_timeout(Duration::from_secs(10)))
        .collect();
    std::thread::scope(|s| {
        // Should this thread panic before the restart, host 2's callers must not wait for it.
        let _release = SetOnDrop(&restarting);
        let mut workers = Vec::new();
        for &i in &HOSTS {
            let mine = ks(i);
            for t in 0..CALLERS {
                let (op, killing, restarting) = (&op, &killing, &restarting);
                let done = if i == 1 { &done1 } else { &done2 };
                let client = &clients[i - 1];
                let share: Vec<usize> = mine.iter().copied().skip(t).step_by(CALLERS).collect();
                let half = share.len() / 2;
                workers.push(s.spawn(move || {
                    let mut out = Outcome::default();
                    for (n, k) in share.into_iter().enumerate() {
                        if i == 2 && n == half {
                            let deadline = Instant::now() + Duration::from_secs(60);
                            while !restarting.load(Ordering::SeqCst) && Instant::now() < deadline {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                        }
                        match op(client, i, k) {
                            Ok(()) => {
                                out.ok.insert(k);
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) if i == 1 && killing.load(Ordering::SeqCst) => break,
                            Err(e) => out.failed.push((k, e)),
                        }
                    }
                    (i, out)
                }));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while done1.load(Ordering::Relaxed) < kill_after {
            assert!(
                Instant::now() < deadline,
                "calls on h1 did not progress:\n{}",
                c.host(1).log()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..2000)));
        killing.store(true, Ordering::SeqCst);
        c.kill(1);
        let killed = Instant::now();
        while_down();
        let before = done2.load(Ordering::Relaxed);
        restarting.store(true, Ordering::SeqCst);
        c.start(1);
        eprintln!(
            "h1 was down for {:?}; h2's calls that returned while it started: {}",
            killed.elapsed(),
            done2.load(Ordering::Relaxed) - before
        );
        let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
        for w in workers {
            let (i, out) = w.join().unwrap();
            let o = outcomes.entry(i).or_default();
            o.ok.extend(out.ok);
            o.failed.extend(out.failed);
        }
        outcomes
    })
}

/// Raises its flag when dropped, also by a panic.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn attach_op(c: &Client, host: usize, k: usize) -> Result<(), String> {
    let req = Attach {
        network: NET.into(),
        sandbox: sandbox(host, k),
        ..Default::default()
    };
    c.post::<_, Endpoint>("/v1/endpoints", &req)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn detach_op(c: &Client, host: usize, k: usize) -> Result<(), String> {
    let req = Detach {
        network: NET.into(),
        sandbox: Some(sandbox(host, k)),
        ..Default::default()
    };
    c.post::<_, Value>("/v1/detach", &req)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The network's endpoints as host `i` lists them (`berth -o json endpoint ls`).
fn listed_endpoints(c: &Cluster, i: usize) -> Result<Vec<Endpoint>, String> {
    let o = c
        .host(i)
        .berth(&["-o", "json", "endpoint", "ls", "--network", NET]);
    if !o.status.success() {
        return Err(format!(
            "endpoint ls on h{i}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("endpoint ls on h{i}: {e}"))
}

/// The invariants that must hold at every moment, even while detached endpoints wait for
/// their reaping: panics at once when one does not. Returns every endpoint of the network in
/// the cluster, by id.
fn never_twice(c: &Cluster) -> BTreeMap<String, Endpoint> {
    // Every host lists the whole cluster's endpoints, and they agree.
    let mut listings: Vec<BTreeMap<String, Endpoint>> = Vec::new();
    for i in HOSTS {
        let eps = listed_endpoints(c, i).unwrap_or_else(|e| panic!("{e}"));
        listings.push(
            eps.into_iter()
                .map(|mut e| {
                    e.default_gateways.clear();
                    (e.id.clone(), e)
                })
                .collect(),
        );
    }
    let eps = listings[0].clone();
    for (n, other) in listings.iter().enumerate().skip(1) {
        let differ: Vec<(&String, Option<&Endpoint>, Option<&Endpoint>)> = eps
            .keys()
            .chain(other.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|id| (id, eps.get(id), other.get(id)))
            .filter(|(_, a, b)| a != b)
            .collect();
        assert!(
            differ.is_empty(),
            "h1 and h{} list different endpoints: {differ:?}",
            n + 1
        );
    }
    let allocs: Vec<Allocation> = c
        .host(2)
        .client()
        .get(&format!("/v1/networks/{NET}/allocations"))
        .unwrap();
    let mut owner_of: HashMap<String, String> = HashMap::new();
    for a in &allocs {
        let ip = canonical_ip(&a.ip);
        assert!(
            owner_of.insert(ip.clone(), a.owner.clone()).is_none(),
            "{ip} held twice in the IPAM: {allocs:?}"
        );
    }
    assert_eq!(
        owner_of.get(GATEWAY).map(String::as_str),
        Some("gateway"),
        "the gateway's allocation"
    );
    let mut on: HashMap<String, &Endpoint> = HashMap::new();
    for e in eps.values() {
        let host = e
            .host
            .as_deref()
            .unwrap_or_else(|| panic!("no host: {e:?}"));
        assert!(
            c.index_of(host).is_some(),
            "endpoint on unknown host {host}: {e:?}"
        );
        assert!(!e.ips.is_empty(), "no address: {e:?}");
        for ip in &e.ips {
            let ip = canonical_ip(&ip.addr().to_string());
            if let Some(other) = on.insert(ip.clone(), e) {
                panic!("{ip} on two endpoints: {other:?} and {e:?}");
            }
            assert_eq!(
                owner_of.get(&ip),
                Some(&e.id),
                "IPAM owner of {ip}, the address of {e:?}"
            );
        }
    }
    eps
}

/// The invariants that hold once the hosts are done with what the crash left (detached
/// endpoints reaped, the restarted host reconciled): `Err` says what is not so yet.
fn settled(c: &Cluster, eps: &BTreeMap<String, Endpoint>, net: &Network) -> Result<(), String> {
    let allocs: Vec<Allocation> = c
        .host(1)
        .client()
        .get(&format!("/v1/networks/{NET}/allocations"))
        .map_err(|e| e.to_string())?;
    // No address held by a missing endpoint.
    for a in &allocs {
        if a.owner != "gateway" && !eps.contains_key(&a.owner) {
            return Err(format!("{} held by missing endpoint {}", a.ip, a.owner));
        }
    }
    let held: usize = eps.values().map(|e| e.ips.len()).sum();
    if allocs.len() != held + 1 {
        return Err(format!(
            "{} allocations for {held} endpoint addresses and the gateway",
            allocs.len()
        ));
    }
    // Every address is in a block of the host its endpoint lives on.
    for e in eps.values() {
        for ip in &e.ips {
            let owner = net
                .blocks
                .iter()
                .find(|b| b.cidr.contains(&ip.addr()))
                .map(|b| b.host.as_str());
            if owner != e.host.as_deref() {
                return Err(format!(
                    "{ip} of {} on {:?} is in a block of {owner:?}: {:?}",
                    e.id, e.host, net.blocks
                ));
            }
        }
    }
    let vni = net.vni.expect("an overlay network has a VNI");
    let vxlan = berth_model_vxlan_name(&net.id);
    for i in HOSTS {
        let h = c.host(i);
        let id = c.host_id(i);
        let local: Vec<&Endpoint> = eps
            .values()
            .filter(|e| e.host.as_deref() == Some(id.as_str()))
            .collect();
        // No berth interface without a record, and none missing: host veths are exactly this
        // host's endpoints'; the only bridge and VXLAN device are the network's.
        let names: BTreeSet<String> = h.host_links().into_iter().collect();
        let veths: BTreeSet<&String> = names
            .iter()
            .filter(|l| l.starts_with("berth") && !l.starts_with("berth-"))
            .collect();
        let want: BTreeSet<&String> = local.iter().map(|e| &e.host_ifname).collect();
        if veths != want {
            return Err(format!(
                "h{i}: host veths {:?}, endpoints' {:?}",
                veths.difference(&want).collect::<Vec<_>>(),
                want.difference(&veths).collect::<Vec<_>>()
            ));
        }
        for l in &names {
            if l.starts_with("berth-") && *l != net.bridge {
                return Err(format!(
                    "h{i}: bridge {l} of no network (the network's is {})",
                    net.bridge
                ));
            }
        }
        let vxlans = links(h, Some("vxlan"));
        for v in &vxlans {
            let name = v["ifname"].as_str().unwrap_or_default();
            let id = v["linkinfo"]["info_data"]["id"].as_u64();
            if name != vxlan || id != Some(u64::from(vni)) {
                return Err(format!(
                    "h{i}: VXLAN device {name} (VNI {id:?}) of no network"
                ));
            }
        }
        if !local.is_empty() && vxlans.is_empty() {
            return Err(format!("h{i} has endpoints but no VXLAN device"));
        }
        // Its VXLAN device sends exactly the other host's endpoints to that host.
        if let Some(dev) = vxlans.first() {
            let dev = dev["ifname"].as_str().unwrap();
            let (mut want_fdb, mut want_neigh) = (Vec::new(), Vec::new());
            for e in eps
                .values()
                .filter(|e| e.host.as_deref() != Some(id.as_str()))
            {
                let owner = c.index_of(e.host.as_deref().unwrap()).unwrap();
                let mac = e.mac.to_string().to_ascii_lowercase();
                want_fdb.push((mac.clone(), c.addr(owner)));
                for ip in &e.ips {
                    want_neigh.push((canonical_ip(&ip.addr().to_string()), mac.clone()));
                }
            }
            want_fdb.sort();
            want_neigh.sort();
            let got_fdb = fdb(h, dev);
            if got_fdb != want_fdb {
                return Err(format!(
                    "h{i} {dev}: FDB has {} entries, the store {}; extra {:?}, missing {:?}",
                    got_fdb.len(),
                    want_fdb.len(),
                    minus(&got_fdb, &want_fdb),
                    minus(&want_fdb, &got_fdb)
                ));
            }
            let got_neigh: Vec<(String, String)> = neigh(h, dev)
                .into_iter()
                .filter(|(ip, _)| !ip.starts_with("fe80:"))
                .collect();
            if got_neigh != want_neigh {
                return Err(format!(
                    "h{i} {dev}: neighbours extra {:?}, missing {:?}",
                    minus(&got_neigh, &want_neigh),
                    minus(&want_neigh, &got_neigh)
                ));
            }
        }
    }
    Ok(())
}

fn minus<T: Ord + Clone>(a: &[T], b: &[T]) -> Vec<T> {
    let b: BTreeSet<&T> = b.iter().collect();
    a.iter().filter(|x| !b.contains(x)).cloned().collect()
}

/// `berth_model::vxlan_name`, which the test crate does not link.
fn berth_model_vxlan_name(network_id: &str) -> String {
    format!("bvx{}", &network_id[..network_id.len().min(12)])
}

/// Checks everything; returns the endpoints once settled.
fn check_invariants(c: &Cluster) -> BTreeMap<String, Endpoint> {
    let t = Instant::now();
    let mut eps = never_twice(c);
    eventually("the cluster settles", CONVERGE, || {
        eps = never_twice(c);
        // Blocks are claimed as attaches need them: read the network again.
        let net: Network = c
            .host(1)
            .client()
            .get(&format!("/v1/networks/{NET}"))
            .map_err(|e| e.to_string())?;
        settled(c, &eps, &net)
    });
    eprintln!("settled after {:?}: {} endpoints", t.elapsed(), eps.len());

    // A sandbox without an endpoint has nothing but lo left in it.
    let attached: BTreeSet<(String, String)> = eps
        .values()
        .filter_map(|e| Some((e.host.clone()?, e.netns.sandbox.clone()?)))
        .collect();
    for i in HOSTS {
        let h = c.host(i);
        for k in 0..PER_HOST {
            let s = sandbox(i, k);
            if attached.contains(&(c.host_id(i), s.clone())) {
                continue;
            }
            let out = h.in_netns(&h.sandbox_path(&s), &["ip", "-o", "link", "show"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let ifs: Vec<&str> = text
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .filter(|n| *n != "lo")
                .collect();
            assert!(
                ifs.is_empty(),
                "h{i} {s} has no endpoint but interfaces {ifs:?}"
            );
        }
    }
    eps
}

/// The sandboxes of host `i` with an endpoint.
fn attached_on(c: &Cluster, eps: &BTreeMap<String, Endpoint>, i: usize) -> BTreeSet<usize> {
    let id = c.host_id(i);
    eps.values()
        .filter(|e| e.host.as_deref() == Some(id.as_str()))
        .map(|e| {
            let s = e
                .netns
                .sandbox
                .as_deref()
                .unwrap_or_else(|| panic!("{e:?}"));
            s.strip_prefix(&format!("h{i}s"))
                .and_then(|k| k.parse().ok())
                .unwrap_or_else(|| panic!("endpoint of a sandbox of no caller: {e:?}"))
        })
        .collect()
}

/// A sample of endpoints reach the gateway, and endpoints on the other host.
fn sample_reaches(c: &Cluster, eps: &BTreeMap<String, Endpoint>) {
    let by_host: BTreeMap<usize, Vec<&Endpoint>> = HOSTS
        .iter()
        .map(|&i| {
            let id = c.host_id(i);
            (
                i,
                eps.values()
                    .filter(|e| e.host.as_deref() == Some(id.as_str()))
                    .collect(),
            )
        })
        .collect();
    let mut pings = 0;
    for (&i, mine) in &by_host {
        let other = &by_host[&(3 - i)];
        let h = c.host(i);
        for (n, e) in mine.iter().enumerate().filter(|(n, _)| n % 7 == 0) {
            let sb = e.netns.sandbox.as_deref().unwrap();
            assert!(h.reaches(sb, GATEWAY), "h{i} {sb} reaches the gateway");
            if other.is_empty() {
                continue;
            }
            let peer = other[n % other.len()];
            let ip = peer.ips[0].addr().to_string();
            assert!(
                h.reaches(sb, &ip),
                "h{i} {sb} reaches {ip} ({:?} on {:?})",
                peer.netns.sandbox,
                peer.host
            );
            pings += 1;
        }
    }
    eprintln!("{pings} pings across hosts");
}

fn host_state(c: &Cluster, viewer: usize, id: &str) -> Option<String> {
    let hosts: Value = c.host(viewer).json(&["host", "ls"]);
    hosts
        .as_array()?
        .iter()
        .find(|h| h["id"] == id)
        .and_then(|h| h["state"].as_str().map(str::to_string))
}

#[test]
fn sigkill_during_churn_on_etcd_with_two_hosts_leaks_and_duplicates_nothing() {
    let started = Instant::now();
    let seed = fastrand::u64(..);
    fastrand::seed(seed);
    eprintln!("multihost crash test seed {seed}");
    // A grace long enough that host 2 keeps host 1's records while it is down (and gone).
    let c = Cluster::with(
        2,
        Options {
            gone_grace: 60,
            ..Options::default()
        },
    );
    let made: Value = c.host(1).json(&[
        "network", "create", NET, "--driver", "overlay", "--subnet", SUBNET,
    ]);
    assert_eq!(made["driver"], "overlay", "{made}");
    eventually("h2 knows the network", CONVERGE, || {
        let o = c.host(2).berth(&["network", "inspect", NET]);
        o.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
    });
    for i in HOSTS {
        let client = c.host(i).client();
        for k in 0..PER_HOST {
            let _: Value = client
                .post("/v1/sandboxes", &json!({ "name": sandbox(i, k) }))
                .unwrap();
        }
    }
    let all = |_: usize| (0..PER_HOST).collect::<Vec<usize>>();

    // Kill host 1 while both hosts attach; start it again at once.
    let t = Instant::now();
    let kill_after = fastrand::usize(6..PER_HOST - 10);
    let out = churn(&c, all, kill_after, || {}, attach_op);
    eprintln!(
        "attach churn {:?}: h1 {} attached before the kill (kill after {kill_after}), h2 {}",
        t.elapsed(),
        out[&1].ok.len(),
        out[&2].ok.len()
    );
    for (i, o) in &out {
        assert!(o.failed.is_empty(), "h{i}: attaches failed: {:?}", o.failed);
    }
    assert_eq!(out[&2].ok.len(), PER_HOST, "every attach on h2 returned");
    let eps = check_invariants(&c);
    for i in HOSTS {
        let present = attached_on(&c, &eps, i);
        for k in &out[&i].ok {
            assert!(
                present.contains(k),
                "attach of {} returned success but was lost",
                sandbox(i, *k)
            );
        }
    }

    // The runtime retries what did not return: everything attaches, addresses stay unique.
    let present = attached_on(&c, &eps, 1);
    for k in (0..PER_HOST).filter(|k| !present.contains(k)) {
        attach_op(&c.host(1).client(), 1, k).unwrap_or_else(|e| panic!("retry of h1s{k}: {e}"));
    }
    let eps = check_invariants(&c);
    assert_eq!(eps.len(), 2 * PER_HOST);
    sample_reaches(&c, &eps);

    // Kill host 1 while both hosts detach (host 2 half of its sandboxes, so that endpoints stay
    // on both); this time it stays down until host 2 sees it gone.
    let t = Instant::now();
    let kill_after = fastrand::usize(6..PER_HOST - 10);
    let ks = |i: usize| -> Vec<usize> {
        if i == 1 {
            (0..PER_HOST).collect()
        } else {
            (0..PER_HOST).filter(|k| k % 2 == 0).collect()
        }
    };
    let out = churn(
        &c,
        ks,
        kill_after,
        || {
            eventually(
                "h2 sees h1 gone",
                Duration::from_secs(20),
                || match host_state(&c, 2, "h1").as_deref() {
                    Some("gone") => Ok(()),
                    s => Err(format!("h1 is {s:?}")),
                },
            )
        },
        detach_op,
    );
    eprintln!(
        "detach churn {:?}: h1 {} detached before the kill (kill after {kill_after}), h2 {}",
        t.elapsed(),
        out[&1].ok.len(),
        out[&2].ok.len()
    );
    for (i, o) in &out {
        assert!(o.failed.is_empty(), "h{i}: detaches failed: {:?}", o.failed);
    }
    assert_eq!(
        out[&2].ok.len(),
        PER_HOST / 2,
        "every detach on h2 returned"
    );
    eventually("h2 sees h1 up again", CONVERGE, || {
        match host_state(&c, 2, "h1").as_deref() {
            Some("up") => Ok(()),
            s => Err(format!("h1 is {s:?}")),
        }
    });
    let eps = check_invariants(&c);
    for i in HOSTS {
        let present = attached_on(&c, &eps, i);
        for k in &out[&i].ok {
            assert!(
                !present.contains(k),
                "detach of {} returned success but it came back",
                sandbox(i, *k)
            );
        }
    }
    assert_eq!(
        attached_on(&c, &eps, 2),
        (0..PER_HOST).filter(|k| k % 2 == 1).collect(),
        "h2's endpoints: the ones it did not detach"
    );
    assert!(
        !attached_on(&c, &eps, 1).is_empty(),
        "h1 was killed before detaching all"
    );
    sample_reaches(&c, &eps);
    eprintln!("multihost crash test took {:?}", started.elapsed());
}
