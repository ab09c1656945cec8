//! Services across hosts: one VIP balanced over backends on two hosts from clients on either,
//! and a published port (NodePort) answering on every host's address, from another machine
//! on the underlay and from the host itself.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{Cluster, eventually};
use crate::multihost::create_overlay;
use crate::services::{Identify, ask, spread};

const CONVERGE: Duration = Duration::from_secs(15);

/// Makes sandbox `name` on host `i`, attached to `net` with `labels`; its IPv4 address.
fn sandbox(c: &Cluster, i: usize, name: &str, net: &str, labels: &[&str]) -> String {
    let h = c.host(i);
    h.ok(&["sandbox", "create", name]);
    let mut args = vec!["attach", name, "--network", net];
    for l in labels {
        args.extend_from_slice(&["--label", l]);
    }
    let ep: Value = h.json(&args);
    crate::harness::endpoint_ip(&ep, false)
}

/// The backends host `i` balances the service over, by endpoint address.
fn backends_on(c: &Cluster, i: usize, svc: &str) -> Result<BTreeSet<String>, String> {
    let o = c.host(i).berth(&["-o", "json", "service", "inspect", svc]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    Ok(v["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["ips"][0].as_str().unwrap_or_default().to_string())
        .collect())
}

/// Connects until every one of `want` answered (at most `tries` connections).
fn reaches_all(from: &Path, to: &str, want: &[&str], tries: usize) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for _ in 0..tries {
        match ask(from, to) {
            Ok(a) => {
                seen.insert(a.split(' ').next().unwrap_or_default().to_string());
            }
            Err(e) => return Err(format!("{to}: {e}")),
        }
        if want.iter().all(|w| seen.contains(*w)) {
            return Ok(());
        }
    }
    Err(format!("{to}: only {seen:?} answered"))
}

#[test]
fn a_service_spans_hosts_and_its_published_port_answers_on_every_host() {
    let c = Cluster::new(2);
    create_overlay(
        &c,
        "ov",
        &[
            "--subnet",
            "10.192.0.0/24",
            "--ipv6-subnet",
            "fd00:192::/64",
        ],
    );
    let b1_ip = sandbox(&c, 1, "b1", "ov", &["app=web"]);
    let b2_ip = sandbox(&c, 2, "b2", "ov", &["app=web"]);
    let c1_ip = sandbox(&c, 1, "c1", "ov", &[]);
    let c2_ip = sandbox(&c, 2, "c2", "ov", &[]);
    let path = |i: usize, s: &str| -> PathBuf { c.host(i).sandbox_path(s) };
    let _servers = [
        Identify::start(&path(1, "b1"), "b1", 8080),
        Identify::start(&path(2, "b2"), "b2", 8080),
    ];
    let svc: Value = c.host(1).json(&[
        "service",
        "create",
        "web",
        "--network",
        "ov",
        "--selector",
        "app=web",
        "--port",
        "http=80:8080",
        "--publish",
        "30080",
    ]);
    let vip = svc["vips"][0].as_str().unwrap().to_string();
    let want: BTreeSet<String> = [b1_ip.clone(), b2_ip.clone()].into();
    for i in c.indices() {
        eventually(
            &format!("h{i} balances over both backends"),
            CONVERGE,
            || {
                let got = backends_on(&c, i, "web")?;
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        );
    }

    // From a client on either host, to backends on both; the backends see the client.
    let to = format!("{vip}:80");
    for (i, client, client_ip) in [(1, "c1", &c1_ip), (2, "c2", &c2_ip)] {
        let mut seen_clients = BTreeSet::new();
        eventually(&format!("{client} reaches b1 and b2"), CONVERGE, || {
            reaches_all(&path(i, client), &to, &["b1", "b2"], 60)
        });
        let (counts, clients) = spread(&path(i, client), &to, 60);
        assert_eq!(counts.len(), 2, "{client}: {counts:?}");
        seen_clients.extend(clients);
        assert_eq!(
            seen_clients,
            BTreeSet::from([client_ip.clone()]),
            "the backends see {client}'s own address"
        );
    }

    // Over IPv6 too, the first connection included (no neighbour entry of a backend on
    // another host is warm on the client's host).
    let vip6 = svc["vips"][1].as_str().unwrap().to_string();
    assert!(vip6.contains(':'), "{svc}");
    for (i, client) in [(1, "c1"), (2, "c2")] {
        let (counts, _) = spread(&path(i, client), &format!("[{vip6}]:80"), 30);
        assert_eq!(counts.len(), 2, "{client} over IPv6: {counts:?}");
    }

    // Its name, on the other host.
    let out = c.host(2).in_netns(
        &path(2, "c2"),
        &[
            "dig",
            "@10.192.0.1",
            "+short",
            "+time=2",
            "+tries=1",
            "-q",
            "web.ov.berth.local",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), vip);

    // The published port, on each host's underlay address: from another machine on the
    // underlay and from the host itself.
    let underlay = PathBuf::from(format!("/run/netns/{}", c.underlay));
    for i in c.indices() {
        let at = format!("{}:30080", c.addr(i));
        eventually(&format!("{at} answers from the underlay"), CONVERGE, || {
            reaches_all(&underlay, &at, &["b1", "b2"], 60)
        });
        let host_ns = PathBuf::from(c.host(i).netns_path());
        reaches_all(&host_ns, &at, &["b1", "b2"], 60).unwrap();
    }

    // A backend leaves on h2: h1 stops sending it connections.
    c.host(2).ok(&["detach", "b2", "--network", "ov"]);
    eventually("h1 follows b2's detach", CONVERGE, || {
        let got = backends_on(&c, 1, "web")?;
        if got == BTreeSet::from([b1_ip.clone()]) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    let (counts, _) = spread(&path(1, "c1"), &to, 30);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b1"], "{counts:?}");
}
