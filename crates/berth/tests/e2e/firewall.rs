//! berth's nftables table against the outside world: lost set and map elements come back
//! (the guard compares elements, not only rules), and the daemon writes its table without the
//! `nft` program (it speaks nfnetlink itself; `nft` is only these tests' tool).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::{HOST_UNDERLAY_IP, Host, Outside, PeerEcho, tcp_peer};

fn nft(h: &Host, args: &str) -> String {
    let mut cmd = vec!["nft"];
    cmd.extend(args.split(' '));
    h.sh(&cmd)
}

/// The guard's log line for a repair.
const RESTORING: &str = "restoring berth's nftables table";

/// A network, two sandboxes and a published port, reached from another host.
fn published_web(h: &Host) {
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["sandbox", "create", "client"]);
    h.ok(&[
        "attach",
        "client",
        "--network",
        "blue",
        "--ip",
        "10.91.0.10",
    ]);
    h.ok(&[
        "attach",
        "web",
        "--network",
        "blue",
        "--ip",
        "10.91.0.80",
        "--publish",
        "8080:80",
    ]);
}

#[test]
fn flushed_sets_and_maps_are_restored() {
    let h = Host::new();
    let out = Outside::new(&h);
    published_web(&h);
    let _server = PeerEcho::start(&h.sandbox_path("web"), 80);
    let published = format!("{HOST_UNDERLAY_IP}:8080");
    assert!(tcp_peer(&out.path(), &published).is_some());
    assert!(h.reaches("client", "10.91.0.80"));
    // berth's own attaches and detaches are no damage, although each changes the table
    // between the guard's ticks.
    for _ in 0..3 {
        h.ok(&["sandbox", "create", "churn"]);
        h.ok(&[
            "attach",
            "churn",
            "--network",
            "blue",
            "--publish",
            "9000:90",
        ]);
        h.ok(&["sandbox", "rm", "churn"]);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!h.log().contains(RESTORING), "{}", h.log());

    nft(&h, "flush set inet berth bridges");
    let flushed = Instant::now();
    h.eventually("the bridges set is restored", || {
        nft(&h, "list set inet berth bridges").contains("berth-")
    });
    let took = flushed.elapsed();
    assert!(took < Duration::from_secs(3), "restored after {took:?}");
    assert!(
        h.log().contains("set bridges: 1 of 1 elements missing"),
        "{}",
        h.log()
    );
    assert!(h.reaches("client", "10.91.0.80"));

    nft(&h, "flush map inet berth ports4_any");
    assert_eq!(tcp_peer(&out.path(), &published), None, "the port is gone");
    let flushed = Instant::now();
    h.eventually("the published port works again", || {
        tcp_peer(&out.path(), &published).is_some()
    });
    let took = flushed.elapsed();
    assert!(took < Duration::from_secs(3), "restored after {took:?}");
    assert!(nft(&h, "list map inet berth ports4_any").contains("tcp . 8080 : 10.91.0.80 . 80"));

    // An element that the store does not know is taken out again.
    nft(
        &h,
        "add element inet berth ports4_any { tcp . 7777 : 10.91.0.10 . 80 }",
    );
    h.eventually("the stray element is removed", || {
        !nft(&h, "list map inet berth ports4_any").contains("7777")
    });

    // A deleted chain, and the whole table.
    nft(&h, "flush chain inet berth forward");
    nft(&h, "delete chain inet berth into_network");
    h.eventually("the chain is restored", || {
        nft(&h, "list table inet berth").contains("chain into_network {")
    });
    nft(&h, "delete table inet berth");
    h.eventually("the published port works again", || {
        tcp_peer(&out.path(), &published).is_some()
    });
}

#[test]
fn the_daemon_needs_no_nft_program() {
    let h = Host::bare();
    let out = Outside::new(&h);
    let bin: PathBuf = h.dir.join("bin-without-nft");
    std::fs::create_dir_all(&bin).unwrap();
    // The daemon gets a PATH holding no nft.
    h.start_with(|daemon| {
        daemon.env("PATH", &bin);
    });
    published_web(&h);
    let _server = PeerEcho::start(&h.sandbox_path("web"), 80);
    assert!(h.reaches("client", "10.91.0.80"));
    let published = format!("{HOST_UNDERLAY_IP}:8080");
    assert!(
        tcp_peer(&out.path(), &published).is_some(),
        "published port"
    );
    // The guard repairs without nft too.
    nft(&h, "flush ruleset");
    h.eventually("the published port works again", || {
        tcp_peer(&out.path(), &published).is_some()
    });
    h.ok(&["network", "create", "red", "--subnet", "10.92.0.0/24"]);
    let red = h.json(&["network", "inspect", "red"]);
    let bridge = red["bridge"].as_str().unwrap();
    assert!(nft(&h, "list set inet berth bridges").contains(bridge));
}
