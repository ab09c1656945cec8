//! Bad input gets a one-line error naming the problem, a non-zero exit, and changes nothing in
//! the store or the kernel.

use std::process::Stdio;

use serde_json::Value;

use crate::harness::Host;

#[test]
fn every_bad_request_is_refused_and_changes_nothing() {
    let h = Host::new();
    h.ok(&[
        "network",
        "create",
        "blue",
        "--subnet",
        "10.91.0.0/24",
        "--ipv6-subnet",
        "fd00:91::/64",
    ]);
    h.ok(&["network", "create", "green", "--subnet", "10.92.0.0/24"]);
    h.ok(&["sandbox", "create", "web"]);
    h.ok(&["sandbox", "create", "db"]);
    h.ok(&["attach", "web", "--network", "blue", "--ip", "10.91.0.10"]);
    let before = h.snapshot();

    let cases: &[(&[&str], &str)] = &[
        (
            &["network", "create", "red", "--subnet", "10.91.0.0/16"],
            "overlaps 10.91.0.0/24",
        ),
        (
            &["network", "create", "red", "--subnet", "10.91.0.128/25"],
            "overlaps 10.91.0.0/24",
        ),
        (
            &[
                "network",
                "create",
                "red",
                "--subnet",
                "10.93.0.0/24",
                "--ipv6-subnet",
                "fd00:91::/48",
            ],
            "overlaps fd00:91::/64",
        ),
        (
            &["network", "create", "red", "--subnet", "10.93.0.0/33"],
            "invalid CIDR",
        ),
        (
            &["network", "create", "red", "--subnet", "banana"],
            "invalid CIDR",
        ),
        (
            &["network", "create", "red", "--subnet", "10.93.0.5/24"],
            "host bits are set",
        ),
        (
            &[
                "network",
                "create",
                "red",
                "--subnet",
                "10.93.0.0/24",
                "--gateway",
                "10.94.0.1",
            ],
            "outside subnet",
        ),
        (
            &[
                "network",
                "create",
                "red",
                "--subnet",
                "10.93.0.0/24",
                "--gateway",
                "10.93.0.255",
            ],
            "broadcast",
        ),
        (
            &[
                "network",
                "create",
                "red",
                "--subnet",
                "10.93.0.0/24",
                "--mtu",
                "20",
            ],
            "invalid MTU",
        ),
        (
            &["network", "create", "blue", "--subnet", "10.93.0.0/24"],
            "already exists",
        ),
        (&["network", "create", "bad/name"], "invalid network name"),
        (&["network", "rm", "blue"], "in use"),
        (&["network", "rm", "nosuch"], "no network named"),
        (
            &["attach", "db", "--network", "blue", "--ip", "10.92.0.5"],
            "outside network",
        ),
        (
            &["attach", "db", "--network", "blue", "--ip", "10.91.0.10"],
            "already in use",
        ),
        (
            &["attach", "db", "--network", "blue", "--ip", "10.91.0.1"],
            "already in use",
        ),
        (
            &["attach", "db", "--network", "blue", "--ip", "10.91.0.255"],
            "broadcast",
        ),
        (
            &["attach", "db", "--network", "blue", "--ip", "not-an-ip"],
            "invalid IP address",
        ),
        (&["attach", "db", "--network", "nosuch"], "no network named"),
        (
            &["attach", "nosuch", "--network", "blue"],
            "no sandbox named",
        ),
        (
            &["attach", "/tmp", "--network", "blue"],
            "not a usable network namespace",
        ),
        (
            &["attach", "web", "--network", "green"],
            "already has an interface named eth0",
        ),
        (
            &["attach", "web", "--network", "blue", "--ifname", "eth1"],
            "already attached to network",
        ),
        (
            &[
                "attach",
                "db",
                "--network",
                "blue",
                "--ifname",
                "way-too-long-name",
            ],
            "invalid interface name",
        ),
        (
            &[
                "attach",
                "db",
                "--network",
                "blue",
                "--mac",
                "01:00:5e:00:00:01",
            ],
            "unicast",
        ),
        (
            &["attach", "db", "--network", "blue", "--mac", "zz"],
            "invalid MAC",
        ),
        (&["detach", "db", "--network", "blue"], "not attached"),
        (
            &["detach", "web", "--network", "nosuch"],
            "no network named",
        ),
        (&["sandbox", "create", "a/b"], "invalid sandbox name"),
        (&["sandbox", "create", ".."], "invalid sandbox name"),
        (&["sandbox", "create", "web"], "already exists"),
        (&["sandbox", "rm", "nosuch"], "no sandbox named"),
        (&["endpoint", "rm", "nosuch"], "no endpoint"),
    ];
    for (args, expected) in cases {
        let err = h.fails(args);
        assert!(
            err.contains(expected),
            "berth {args:?}: expected {expected:?} in {err:?}"
        );
        assert_eq!(h.snapshot(), before, "berth {args:?} changed something");
    }

    // The API itself: malformed and unknown bodies are 400 with a JSON error, unknown paths 404.
    let c = h.client();
    for (method, path, body) in [
        ("POST", "/v1/networks", "{not json"),
        ("POST", "/v1/networks", r#"{"name": 5}"#),
        (
            "POST",
            "/v1/endpoints",
            r#"{"network": "blue", "sandbox": "db", "bogus": 1}"#,
        ),
        ("POST", "/v1/detach", "[]"),
    ] {
        let raw: Value = serde_json::from_str(body).unwrap_or(Value::String(body.into()));
        let err = c.call::<_, Value>(method, path, Some(&raw)).unwrap_err();
        match err {
            berth_api::ClientError::Api { status, message } => {
                assert_eq!(status, 400, "{path} {body}: {message}");
                assert!(message.starts_with("invalid request body"), "{message}");
            }
            other => panic!("{other}"),
        }
    }
    match c.get::<Value>("/v1/nope").unwrap_err() {
        berth_api::ClientError::Api { status, .. } => assert_eq!(status, 404),
        other => panic!("{other}"),
    }
    assert_eq!(h.snapshot(), before);

    // A second daemon on the same state directory refuses to start, and the first keeps going.
    let out = h.spawn_daemon("state").wait_with_output().unwrap();
    assert!(!out.status.success());
    let log = h.log();
    assert!(log.contains("is in use by another berth daemon"), "{log}");
    assert_eq!(h.snapshot(), before);
}

#[test]
fn cli_usage_errors_exit_non_zero() {
    let h = Host::bare();
    // No daemon: a clear message, not a hang.
    let err = h.fails(&["network", "ls"]);
    assert!(err.contains("cannot reach the berth daemon"), "{err}");
    let o = h.berth(&["attach", "web"]);
    assert_eq!(o.status.code(), Some(2), "clap usage error");
    // A daemon with a bad DNS suffix says so and leaves nothing behind.
    let state = h.dir.join("bad-state");
    let o = h.berth(&[
        "daemon",
        "--dns-suffix",
        "not a domain",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("invalid DNS suffix"),
        "{err}"
    );
    assert!(!state.exists());
    let o = std::process::Command::new(crate::harness::BERTH)
        .arg("frobnicate")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!o.success());
}
