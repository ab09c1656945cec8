//! Services across hosts: one VIP balanced over backends on two hosts from clients on either,
//! and a published port (NodePort) answering on every host's address, from another machine
//! on the underlay and from the host itself. A host whose daemon stalls past its lease: its
//! backends leave the load balancer, their established connections stay.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, LEASE_TTL, Options, eventually};
use crate::harness::{ServerThreads, in_ns, tcp_connects};
use crate::multihost::{create_overlay, host_state};
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

/// A TCP server on `port` in a namespace that echoes every line back, on connections that
/// stay open. Stopped on drop.
fn line_echo(netns: &Path, port: u16) -> ServerThreads {
    let listener = in_ns(netns, || TcpListener::bind(("::", port)).unwrap());
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let accept = std::thread::spawn(move || {
        let mut sessions = Vec::new();
        while !s.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((c, _)) => {
                    let s = s.clone();
                    sessions.push(std::thread::spawn(move || {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let mut out = c.try_clone().unwrap();
                        let mut lines = BufReader::new(c);
                        let mut line = String::new();
                        while !s.load(Ordering::Relaxed) {
                            match lines.read_line(&mut line) {
                                Ok(0) => return,
                                Ok(_) => {
                                    if out.write_all(line.as_bytes()).is_err() {
                                        return;
                                    }
                                    line.clear();
                                }
                                Err(_) => {}
                            }
                        }
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        for t in sessions {
            let _ = t.join();
        }
    });
    ServerThreads {
        stop,
        threads: vec![accept],
    }
}

/// One line there and back on an open connection.
fn echoes(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, n: usize) -> Result<(), String> {
    let sent = format!("line {n}\n");
    conn.write_all(sent.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = String::new();
    reader.read_line(&mut got).map_err(|e| e.to_string())?;
    if got == sent {
        Ok(())
    } else {
        Err(format!("sent {sent:?}, got {got:?}"))
    }
}

#[test]
fn a_stalled_hosts_backends_leave_the_balancer_but_keep_their_connections() {
    let c = Cluster::with(
        2,
        Options {
            gone_grace: 120,
            ..Options::default()
        },
    );
    create_overlay(&c, "ov", &["--subnet", "10.201.0.0/24"]);
    let b2_ip = sandbox(&c, 2, "b2", "ov", &["app=echo"]);
    sandbox(&c, 1, "c1", "ov", &[]);
    let _server = line_echo(&c.host(2).sandbox_path("b2"), 8080);
    let svc: Value = c.host(1).json(&[
        "service",
        "create",
        "echo",
        "--network",
        "ov",
        "--selector",
        "app=echo",
        "--port",
        "7:8080",
    ]);
    let to: SocketAddr = format!("{}:7", svc["vips"][0].as_str().unwrap())
        .parse()
        .unwrap();
    eventually("h1 balances over b2", CONVERGE, || {
        match backends_on(&c, 1, "echo")? {
            b if b == BTreeSet::from([b2_ip.clone()]) => Ok(()),
            b => Err(format!("{b:?}")),
        }
    });
    let client = c.host(1).sandbox_path("c1");
    let mut conn = in_ns(&client, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
    })
    .expect("a connection through the VIP");
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    echoes(&mut conn, &mut reader, 0).unwrap();

    // h2's daemon stalls for several leases: b2 leaves h1's balancer (no new connection
    // gets it), but the open connection carries on.
    let h2 = c.host(2);
    h2.pause();
    let stalled = Instant::now();
    eventually(
        "h1 lists h2 as gone",
        Duration::from_secs(LEASE_TTL + 3),
        || match host_state(&c, 1, "h2")?.as_str() {
            "gone" => Ok(()),
            s => Err(format!("h2 is {s}")),
        },
    );
    eventually(
        "h1 takes b2 out of its balancer",
        CONVERGE,
        || match backends_on(&c, 1, "echo")? {
            b if b.is_empty() => Ok(()),
            b => Err(format!("{b:?}")),
        },
    );
    assert!(
        !tcp_connects(&client, &to.to_string()),
        "a new connection while the only backend's host is gone"
    );
    let mut n = 1;
    while stalled.elapsed() < Duration::from_secs(4 * LEASE_TTL) {
        echoes(&mut conn, &mut reader, n).unwrap_or_else(|e| {
            panic!(
                "the open connection, {:?} into the stall: {e}",
                stalled.elapsed()
            )
        });
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    h2.resume();
    eventually(
        "h1 balances over b2 again",
        CONVERGE,
        || match backends_on(&c, 1, "echo")? {
            b if b == BTreeSet::from([b2_ip.clone()]) => Ok(()),
            b => Err(format!("{b:?}")),
        },
    );
    echoes(&mut conn, &mut reader, n).unwrap();
    eventually("a new connection reaches b2", CONVERGE, || {
        tcp_connects(&client, &to.to_string())
            .then_some(())
            .ok_or_else(|| "refused".to_string())
    });
}
