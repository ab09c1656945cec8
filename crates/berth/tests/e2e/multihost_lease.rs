//! A host whose daemon is stalled (SIGSTOP) or stopped for several lease periods keeps its
//! containers reachable from the rest of the cluster: other hosts keep its forwarding entries
//! (only its names go) until it is freed, by the grace period or `berth host rm`. Checked with
//! pings every 0.1 s in both directions, none of which may be lost, and with the kernel's
//! entries. Also what `berth host ls` shows of a stalled and of a gone host.

use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::cluster::{Cluster, LEASE_TTL, Options, eventually, fdb, vxlan_with_vni};
use crate::harness::Host;
use crate::multihost::{
    Ep, create_overlay, dig, eventually_reaches, host_state, sandbox_on, try_hosts, wait_converged,
};

/// How long the hosts get to agree after a change (a loaded 2-core machine).
const CONVERGE: Duration = Duration::from_secs(15);
/// The pings' interval.
const PING_EVERY: Duration = Duration::from_millis(100);

fn stress() -> bool {
    std::env::var("BERTH_STRESS").is_ok_and(|v| v == "1")
}

/// A ping every 0.1 s from a sandbox for a while; `lost` waits for its end.
struct Pinger {
    what: String,
    child: Child,
}

impl Pinger {
    /// `count` pings from `sandbox` on `h` to `ip`, one every 0.1 s.
    fn start(h: &Host, sandbox: &str, ip: &str, count: u64, what: &str) -> Pinger {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", h.sandbox_path(sandbox).display()))
            .args(["ping", "-q", "-n", "-i", "0.1", "-W", "2"])
            .args(["-c", &count.to_string(), ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Pinger {
            what: what.to_string(),
            child,
        }
    }

    /// Waits for the pings to end: (sent, lost).
    fn lost(self) -> (u64, u64) {
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // "170 packets transmitted, 170 received, 0% packet loss, time 16906ms"
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| {
                panic!(
                    "{}: no summary from ping: {text}{}",
                    self.what,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let number = |word: &str| -> u64 {
            line.split(", ")
                .find(|part| part.contains(word))
                .and_then(|part| part.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{}: {line}", self.what))
        };
        let (sent, received) = (number("transmitted"), number("received"));
        eprintln!("{}: {line}", self.what);
        (sent, sent - received)
    }
}

/// Pings during `f`, from `a` on host 1 to `c` and back, and (with three hosts) from host
/// 2 to `c` too; `f` must be done within `span`. Asserts that no ping was lost.
fn no_ping_lost(cl: &Cluster, a: &Ep, c: (usize, &Ep), span: Duration, f: impl FnOnce()) {
    let count = (span.as_millis() / PING_EVERY.as_millis()) as u64;
    let (ci, c) = c;
    let sandbox = |i: usize, ep: &Ep| (cl.host(i), ep.sandbox.clone());
    let (h1, a_sb) = sandbox(1, a);
    let (hc, c_sb) = sandbox(ci, c);
    let mut pingers = vec![
        Pinger::start(h1, &a_sb, c.v4(), count, "a -> c"),
        Pinger::start(hc, &c_sb, a.v4(), count, "c -> a"),
    ];
    if cl.len() > 2 {
        let b_sb = "b2";
        pingers.push(Pinger::start(cl.host(2), b_sb, c.v4(), count, "b2 -> c"));
    }
    let started = Instant::now();
    f();
    assert!(
        started.elapsed() < span,
        "the pings ended before the test did ({:?})",
        started.elapsed()
    );
    for p in pingers {
        let what = p.what.clone();
        let (sent, lost) = p.lost();
        assert_eq!(sent, count, "{what}: pings sent");
        assert_eq!(lost, 0, "{what}: {lost} of {sent} pings lost");
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The status of a DNS answer from a sandbox (`NOERROR`, `NXDOMAIN`, ...).
fn dig_status(h: &Host, sandbox: &str, server: &str, name: &str) -> String {
    let at = format!("@{server}");
    let out = h.in_netns(
        &h.sandbox_path(sandbox),
        &["dig", &at, "+time=1", "+tries=2", name, "A"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_string()
}

/// The host's FDB entries on overlay `vni` that send to `vtep`.
fn entries_to(h: &Host, vni: u64, vtep: &str) -> Vec<String> {
    let Some(dev) = vxlan_with_vni(h, vni) else {
        return vec![];
    };
    fdb(h, dev["ifname"].as_str().unwrap())
        .into_iter()
        .filter(|(_, dst)| dst == vtep)
        .map(|(mac, _)| mac)
        .collect()
}

#[test]
fn a_stalled_daemons_containers_stay_reachable() {
    // Three hosts as in the issue; the grace is long: h3 comes back well within it.
    let cl = Cluster::with(
        3,
        Options {
            gone_grace: 120,
            ..Options::default()
        },
    );
    let made = create_overlay(&cl, "ov", &["--subnet", "10.198.0.0/16"]);
    let vni = made["vni"].as_u64().unwrap();
    let a = sandbox_on(&cl, 1, "a1", "ov", &[]);
    sandbox_on(&cl, 2, "b2", "ov", &[]);
    let c = sandbox_on(&cl, 3, "c3", "ov", &[]);
    wait_converged(&cl, "ov", &[1, 2, 3]);
    let (h1, h3) = (cl.host(1), cl.host(3));
    eventually_reaches(h1, "a1", c.v4(), CONVERGE);
    eventually_reaches(h3, "c3", a.v4(), CONVERGE);
    let qualified = "c3.ov.berth.local";
    assert_eq!(dig_status(h1, "a1", "10.198.0.1", qualified), "NOERROR");

    // h3's daemon frozen for several leases (20 s, as in the issue, with BERTH_STRESS).
    let stall = if stress() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(4 * LEASE_TTL)
    };
    let span = stall + Duration::from_secs(5);
    no_ping_lost(&cl, &a, (3, &c), span, || {
        sleep(Duration::from_secs(1));
        let stalled = Instant::now();
        h3.pause();
        // Its lease lapses: h1 lists it gone, at its address, and stops naming its
        // endpoints, but keeps its entries.
        eventually(
            "h1 lists h3 as gone",
            Duration::from_secs(LEASE_TTL + 3),
            || match host_state(&cl, 1, "h3")?.as_str() {
                "gone" => Ok(()),
                s => Err(format!("h3 is {s}")),
            },
        );
        let listed = &try_hosts(&cl, 1).unwrap()["h3"];
        assert_eq!(listed["address"], cl.addr(3), "{listed}");
        assert_eq!(
            dig_status(h1, "a1", "10.198.0.1", qualified),
            "NXDOMAIN",
            "a lapsed host's names"
        );
        assert_eq!(entries_to(h1, vni, &cl.addr(3)), [c.mac.as_str()]);
        assert_eq!(entries_to(cl.host(2), vni, &cl.addr(3)), [c.mac.as_str()]);
        sleep(stall.saturating_sub(stalled.elapsed()));
        h3.resume();
        eprintln!("h3's daemon was frozen for {:?}", stalled.elapsed());
        eventually("h1 lists h3 as up", CONVERGE, || {
            match host_state(&cl, 1, "h3")?.as_str() {
                "up" => Ok(()),
                s => Err(format!("h3 is {s}")),
            }
        });
    });
    assert!(
        h3.log().contains("host lease lapsed"),
        "h3 noticed its lapse:\n{}",
        h3.log()
    );
    eventually("h1 names c3 again", CONVERGE, || {
        match dig(h1, "a1", "10.198.0.1", qualified, "A") {
            names if names == [c.v4()] => Ok(()),
            names => Err(format!("{names:?}")),
        }
    });
    wait_converged(&cl, "ov", &[1, 2, 3]);
}

#[test]
fn a_stopped_and_restarted_daemons_containers_stay_reachable() {
    let cl = Cluster::with(
        2,
        Options {
            gone_grace: 120,
            ..Options::default()
        },
    );
    let made = create_overlay(&cl, "ov", &["--subnet", "10.199.0.0/16"]);
    let vni = made["vni"].as_u64().unwrap();
    let a = sandbox_on(&cl, 1, "a1", "ov", &[]);
    let c = sandbox_on(&cl, 2, "c2", "ov", &[]);
    wait_converged(&cl, "ov", &[1, 2]);
    let (h1, h2) = (cl.host(1), cl.host(2));
    eventually_reaches(h1, "a1", c.v4(), CONVERGE);
    eventually_reaches(h2, "c2", a.v4(), CONVERGE);

    // Down (SIGTERM) for several leases (60 s, as in the issue, with BERTH_STRESS), then
    // started again, as an upgrade does.
    let down = if stress() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5 * LEASE_TTL)
    };
    let span = down + Duration::from_secs(12);
    no_ping_lost(&cl, &a, (2, &c), span, || {
        sleep(Duration::from_secs(1));
        let stopped = Instant::now();
        cl.stop(2);
        eventually(
            "h1 lists h2 as gone",
            Duration::from_secs(LEASE_TTL + 3),
            || match host_state(&cl, 1, "h2")?.as_str() {
                "gone" => Ok(()),
                s => Err(format!("h2 is {s}")),
            },
        );
        assert_eq!(entries_to(h1, vni, &cl.addr(2)), [c.mac.as_str()]);
        sleep(down.saturating_sub(stopped.elapsed()));
        let started = Instant::now();
        cl.start(2);
        eprintln!(
            "h2's daemon was down for {:?}, started in {:?}",
            stopped.elapsed(),
            started.elapsed()
        );
        eventually("h1 lists h2 as up", CONVERGE, || {
            match host_state(&cl, 1, "h2")?.as_str() {
                "up" => Ok(()),
                s => Err(format!("h2 is {s}")),
            }
        });
    });
    wait_converged(&cl, "ov", &[1, 2]);
}

#[test]
fn a_host_gone_for_good_loses_its_entries() {
    // h2 is removed by hand while gone; h3 is freed when its grace is over.
    let grace = 10;
    let cl = Cluster::with(
        3,
        Options {
            gone_grace: grace,
            ..Options::default()
        },
    );
    let made = create_overlay(&cl, "ov", &["--subnet", "10.200.0.0/16"]);
    let vni = made["vni"].as_u64().unwrap();
    sandbox_on(&cl, 1, "a1", "ov", &[]);
    let b = sandbox_on(&cl, 2, "b2", "ov", &[]);
    let c = sandbox_on(&cl, 3, "c3", "ov", &[]);
    wait_converged(&cl, "ov", &[1, 2, 3]);
    let h1 = cl.host(1);
    eventually_reaches(h1, "a1", b.v4(), CONVERGE);
    eventually_reaches(h1, "a1", c.v4(), CONVERGE);

    let killed = Instant::now();
    cl.kill(2);
    cl.kill(3);
    for id in ["h2", "h3"] {
        eventually(
            &format!("h1 lists {id} as gone"),
            Duration::from_secs(LEASE_TTL + 3),
            || match host_state(&cl, 1, id)?.as_str() {
                "gone" => Ok(()),
                s => Err(format!("{id} is {s}")),
            },
        );
    }
    assert!(h1.reaches("a1", b.v4()), "gone, not yet freed: b2 answers");

    // `berth host rm h2`: h2's entries go at once; h3's stay (its grace is not over).
    let removed: Value = h1.json(&["host", "rm", "h2"]);
    assert_eq!(removed["endpoints"], 1, "{removed}");
    eventually("h1 drops h2's entries", CONVERGE, || {
        match entries_to(h1, vni, &cl.addr(2)) {
            e if e.is_empty() => Ok(()),
            e => Err(format!("{e:?}")),
        }
    });
    assert!(
        killed.elapsed() < Duration::from_secs(grace),
        "too slow to see h3 within its grace"
    );
    assert_eq!(entries_to(h1, vni, &cl.addr(3)), [c.mac.as_str()]);
    assert!(h1.cannot_reach("a1", b.v4()), "b2 after host rm");
    assert!(h1.reaches("a1", c.v4()), "c3 within its grace");
    assert!(!try_hosts(&cl, 1).unwrap().contains_key("h2"));

    // The grace passes: h3 is freed, and its entries go.
    eventually(
        "h1 frees h3 and drops its entries",
        Duration::from_secs(grace + 2 * LEASE_TTL + 5),
        || {
            if try_hosts(&cl, 1)?.contains_key("h3") {
                return Err("h3 still listed".into());
            }
            match entries_to(h1, vni, &cl.addr(3)) {
                e if e.is_empty() => Ok(()),
                e => Err(format!("{e:?}")),
            }
        },
    );
    assert!(h1.cannot_reach("a1", c.v4()), "c3 after the grace");
    wait_converged(&cl, "ov", &[1]);
}

#[test]
fn host_ls_shows_a_stalled_hosts_age_and_a_gone_hosts_address() {
    // A longer lease, so that the stall is visible for a while before it lapses.
    let lease = 8;
    let cl = Cluster::with(
        2,
        Options {
            lease_ttl: lease,
            gone_grace: 120,
            ..Options::default()
        },
    );
    let age = |id: &str| -> (String, u64, Value) {
        let hosts = try_hosts(&cl, 1).unwrap();
        let h = hosts[id].clone();
        let seen = h["last_seen"].as_u64().unwrap();
        (
            h["state"].as_str().unwrap().to_string(),
            now_secs().saturating_sub(seen),
            h,
        )
    };
    // Up and renewing: seen within a renewal period (a third of the lease), give or take
    // the whole seconds etcd and the epoch count in.
    let (state, fresh, h) = age("h2");
    assert_eq!(state, "up");
    assert!(fresh <= lease / 3 + 2, "{h}");

    let h2 = cl.host(2);
    h2.pause();
    let stalled = Instant::now();
    sleep(Duration::from_secs(1));
    let (state, early, h) = age("h2");
    assert_eq!(state, "up", "{h}");
    sleep(Duration::from_secs(5).saturating_sub(stalled.elapsed()));
    let (state, late, h) = age("h2");
    assert_eq!(state, "up", "still within its lease: {h}");
    assert!(
        late >= early + 2 && late >= 5,
        "the age grows while h2 stalls: {early} s, then {late} s: {h}"
    );
    // The table shows it too.
    let table = String::from_utf8_lossy(&cl.host(1).berth(&["host", "ls"]).stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("h2"))
        .unwrap_or_default();
    assert!(row.contains("s ago"), "{table}");

    // Lapsed: gone, with the address it had.
    eventually(
        "h1 lists h2 as gone",
        Duration::from_secs(lease + 3),
        || match host_state(&cl, 1, "h2")?.as_str() {
            "gone" => Ok(()),
            s => Err(format!("h2 is {s}")),
        },
    );
    let (_, _, h) = age("h2");
    assert_eq!(h["address"], cl.addr(2), "{h}");
    assert!(h["vtep_mac"].is_string(), "{h}");
    let table = String::from_utf8_lossy(&cl.host(1).berth(&["host", "ls"]).stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("h2"))
        .unwrap_or_default();
    assert!(row.contains(&cl.addr(2)) && row.contains("gone"), "{table}");

    h2.resume();
    eventually("h2 is up and fresh again", CONVERGE, || {
        let (state, age, h) = age("h2");
        if state == "up" && age <= lease / 3 + 2 {
            Ok(())
        } else {
            Err(format!("{h}"))
        }
    });
}
