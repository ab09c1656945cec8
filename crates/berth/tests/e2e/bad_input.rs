//! Bad input gets a one-line error naming the problem, a non-zero exit, and changes nothing in
//! the store or the kernel.

use std::process::{Command, Stdio};

use berth_api::{Attach, ClientError, CreateNetwork};
use serde_json::{Value, json};

use crate::harness::{BERTH, Host};
use crate::plugin_fuzz::post;

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
            "is the gateway of 10.91.0.0/24",
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
            "/tmp is not a network namespace: it is a directory",
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

    // A second daemon in the same namespace refuses to start, and the first keeps going.
    let out = h.spawn_daemon("state").wait_with_output().unwrap();
    assert!(!out.status.success());
    let log = h.log();
    assert!(
        log.contains("another berth daemon (pid ") && log.contains("in this network namespace"),
        "{log}"
    );
    assert_eq!(h.snapshot(), before);

    // So does one in another namespace on the same state directory.
    let other = Host::bare();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", other.netns_path()))
        .arg(crate::harness::BERTH)
        .args(["daemon", "--dns-port", "0", "--state-dir"])
        .arg(h.state_dir())
        .arg("--run-dir")
        .arg(other.dir.join("run"))
        .arg("--netns-dir")
        .arg(other.dir.join("netns"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another berth daemon"), "{err}");
    assert_eq!(h.snapshot(), before);
}

#[test]
fn cli_usage_errors_exit_non_zero() {
    let h = Host::bare();
    // No daemon: a clear message, not a hang.
    let err = h.fails(&["network", "ls"]);
    assert!(err.contains("cannot reach the berth daemon"), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "cause said once: {err}");
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
    // And so does one with a DNS client rate out of its range.
    for qps in ["0", "1000001"] {
        let o = h.berth(&[
            "daemon",
            "--dns-client-qps",
            qps,
            "--state-dir",
            state.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("invalid DNS client rate"),
            "{err}"
        );
        assert!(!state.exists());
    }
    let o = std::process::Command::new(crate::harness::BERTH)
        .arg("frobnicate")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!o.success());
}

/// A `network create` through the CLI and the API with one bad value: a one-line error naming
/// the problem, a 400, and no network record or bridge left behind.
fn refused_create(h: &Host, req: &CreateNetwork, expected: &str) {
    let mut args = vec!["network".to_string(), "create".into(), req.name.clone()];
    for (flag, v) in [
        ("--subnet", &req.subnet),
        ("--gateway", &req.gateway),
        ("--ipv6-subnet", &req.ipv6_subnet),
        ("--ipv6-gateway", &req.ipv6_gateway),
    ] {
        if let Some(v) = v {
            args.extend([flag.to_string(), v.clone()]);
        }
    }
    if let Some(m) = req.mtu {
        args.extend(["--mtu".to_string(), m.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = h.fails(&args);
    assert!(
        err.contains(expected),
        "{args:?}: expected {expected:?} in {err:?}"
    );
    match h
        .client()
        .post::<_, Value>("/v1/networks", req)
        .unwrap_err()
    {
        ClientError::Api { status, message } => {
            assert_eq!(status, 400, "{args:?}: {message}");
            assert!(message.contains(expected), "{message}");
        }
        other => panic!("{args:?}: {other}"),
    }
}

/// An attach through the CLI and the API with one bad value: refused with a 400.
fn refused_attach(h: &Host, req: &Attach, expected: &str) {
    let mut args = vec![
        "attach".to_string(),
        req.sandbox.clone(),
        "--network".into(),
        req.network.clone(),
    ];
    for ip in &req.ips {
        args.extend(["--ip".to_string(), ip.clone()]);
    }
    if let Some(m) = &req.mac {
        args.extend(["--mac".to_string(), m.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = h.fails(&args);
    assert!(
        err.contains(expected),
        "{args:?}: expected {expected:?} in {err:?}"
    );
    match h
        .client()
        .post::<_, Value>("/v1/endpoints", req)
        .unwrap_err()
    {
        ClientError::Api { status, message } => {
            assert_eq!(status, 400, "{args:?}: {message}");
            assert!(message.contains(expected), "{message}");
        }
        other => panic!("{args:?}: {other}"),
    }
}

#[test]
fn subnets_and_values_that_cannot_work_are_refused_before_anything_is_made() {
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
    h.ok(&["sandbox", "create", "db"]);
    let plain = h.dir.join("plain-file");
    std::fs::write(&plain, b"").unwrap();
    let before = h.snapshot();
    let links = h.host_links();

    let v4 = |subnet: &str| CreateNetwork {
        name: "red".into(),
        subnet: Some(subnet.into()),
        ..Default::default()
    };
    let v6 = |subnet: &str| CreateNetwork {
        name: "red".into(),
        subnet: Some("10.93.0.0/24".into()),
        ipv6_subnet: Some(subnet.into()),
        ..Default::default()
    };
    let cases: Vec<(CreateNetwork, &str)> = vec![
        (v4("127.0.0.0/24"), "loopback"),
        (v4("224.0.0.0/24"), "IPv4 multicast"),
        (v4("240.0.0.0/24"), "reserved"),
        (v4("0.0.0.0/24"), "\"this network\""),
        (v4("169.254.0.0/24"), "IPv4 link-local"),
        (v4("10.93.0.0/31"), "longest usable IPv4 prefix is /30"),
        (v4("10.93.0.7/32"), "longest usable IPv4 prefix is /30"),
        (v4("10.93.0.5/24"), "host bits are set"),
        (v6("fe80::/64"), "IPv6 link-local"),
        (v6("ff02::/64"), "IPv6 multicast"),
        (v6("::1/128"), "IPv6 loopback"),
        (v6("::ffff:0:0/96"), "IPv4-mapped"),
        (v6("fd00:93::/127"), "longest usable IPv6 prefix is /126"),
        (
            CreateNetwork {
                mtu: Some(1000),
                ..v6("fd00:93::/64")
            },
            "needs at least 1280",
        ),
        (
            CreateNetwork {
                gateway: Some("10.93.0.0".into()),
                ..v4("10.93.0.0/24")
            },
            "network or broadcast",
        ),
    ];
    for (req, expected) in &cases {
        refused_create(&h, req, expected);
        assert_eq!(h.snapshot(), before, "{req:?} changed something");
    }
    // Nothing was made: no record, no bridge.
    assert!(h.berth(&["network", "inspect", "red"]).status.code() == Some(1));
    assert_eq!(h.host_links(), links);

    let attach = |sandbox: &str, ip: Option<&str>, mac: Option<&str>| Attach {
        network: "blue".into(),
        sandbox: sandbox.into(),
        ips: ip.into_iter().map(str::to_string).collect(),
        mac: mac.map(str::to_string),
        ..Default::default()
    };
    let plain = plain.to_str().unwrap();
    let attaches = [
        (attach("db", None, Some("00:00:00:00:00:00")), "all-zero"),
        (attach("db", None, Some("ff:ff:ff:ff:ff:ff")), "unicast"),
        (attach("db", Some("10.91.0.1"), None), "is the gateway"),
        (attach("db", Some("fd00:91::1"), None), "is the gateway"),
        (
            attach("db", Some("10.91.0.0"), None),
            "is the network address",
        ),
        (
            attach("db", Some("10.91.0.255"), None),
            "is the broadcast address",
        ),
        // The daemon opens the path: its own mount namespace.
        (
            attach("/proc/self/ns/mnt", None, None),
            "/proc/self/ns/mnt is not a network namespace: it is a mount namespace",
        ),
        (
            attach(plain, None, None),
            "is not a network namespace: it is a regular file",
        ),
        (
            attach("/nonexistent/netns", None, None),
            "/nonexistent/netns is not a network namespace: no such file",
        ),
    ];
    for (req, expected) in &attaches {
        refused_attach(&h, req, expected);
        assert_eq!(h.snapshot(), before, "{req:?} changed something");
    }
}

#[test]
fn berth_cni_refuses_bad_env_and_config_with_the_spec_codes() {
    let h = Host::new();
    h.ok(&["sandbox", "create", "ctr"]);
    let netns = h.sandbox_path("ctr");
    let netns = netns.to_str().unwrap();
    let plain = h.dir.join("plain-file");
    std::fs::write(&plain, b"").unwrap();
    let plain = plain.to_str().unwrap();
    let dir = h.dir.to_str().unwrap();
    let before = h.snapshot();
    let conf = |extra: Value| {
        let mut c = json!({
            "cniVersion": "1.1.0", "name": "cnired", "type": "berth-cni",
            "socket": h.socket(), "subnet": "10.97.0.0/24",
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let env = cni_add_env;
    // (environment, configuration, expected code, text the message names)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Value, u64, &'a str);
    let cases: Vec<Case<'_>> = vec![
        // 4: an environment variable that cannot work, named in the message.
        (
            env("/proc/self/ns/mnt", ""),
            conf(json!({})),
            4,
            "CNI_NETNS",
        ),
        (env(plain, ""), conf(json!({})), 4, "CNI_NETNS"),
        (env(dir, ""), conf(json!({})), 4, "CNI_NETNS"),
        (
            env("/nonexistent/netns", ""),
            conf(json!({})),
            4,
            "CNI_NETNS",
        ),
        (
            env(netns, "MAC=00:00:00:00:00:00"),
            conf(json!({})),
            4,
            "CNI_ARGS MAC",
        ),
        (
            env(netns, "IP=10.97.0.300"),
            conf(json!({})),
            4,
            "CNI_ARGS IP",
        ),
        // 7: a configuration value that cannot work.
        (
            env(netns, ""),
            conf(json!({"subnet": "127.0.0.0/24"})),
            7,
            "loopback",
        ),
        (
            env(netns, ""),
            conf(json!({"subnet": "10.97.0.0/32"})),
            7,
            "/30",
        ),
        (
            env(netns, ""),
            conf(json!({"ipv6Subnet": "ff02::/64"})),
            7,
            "multicast",
        ),
        (
            env(netns, ""),
            conf(json!({"ipv6Subnet": "::1/128"})),
            7,
            "loopback",
        ),
        (
            env(netns, ""),
            conf(json!({"ipv6Subnet": "fd00:97::/64", "mtu": 1000})),
            7,
            "1280",
        ),
        (
            env(netns, ""),
            conf(json!({"gateway": "nope"})),
            7,
            "gateway",
        ),
        (
            env(netns, ""),
            conf(json!({"runtimeConfig": {"mac": "00:00:00:00:00:00"}})),
            7,
            "all-zero",
        ),
        // 2: a field berth does not support, named with its value.
        (
            env(netns, ""),
            conf(json!({"ipam": {"type": "host-local"}})),
            2,
            "ipam",
        ),
    ];
    for (env, conf, code, text) in &cases {
        let (ok, out) = h.cni("berth-cni", env, conf);
        assert!(!ok, "{env:?} {conf} should fail");
        assert_eq!(out["code"].as_u64(), Some(*code), "{env:?} {conf}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains(text), "{env:?} {conf}: {msg}");
        // Refused before the daemon was asked: not even the network exists.
        assert_eq!(h.snapshot(), before, "{env:?} {conf} changed something");
    }
    // What only the daemon can tell (the gateway's address) is the daemon's 400: code 7.
    let (ok, out) = h.cni(
        "berth-cni",
        &env(netns, ""),
        &conf(json!({"runtimeConfig": {"ips": ["10.97.0.1"]}})),
    );
    assert!(!ok && out["code"] == 7, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("is the gateway"),
        "{out}"
    );
    assert!(h.json(&["endpoint", "ls"]).as_array().unwrap().is_empty());
}

/// A CNI ADD's environment.
fn cni_add_env<'a>(netns: &'a str, args: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ]
}

/// `berth ... | head -1`: the reader goes away, and the CLI ends quietly instead of
/// panicking about a broken pipe.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let h = Host::new();
    for i in 0..3 {
        h.ok(&["sandbox", "create", &format!("sb{i}")]);
        h.ok(&["network", "create", &format!("n{i}")]);
    }
    for args in [
        &["sandbox", "ls"][..],
        &["network", "ls"],
        &["-o", "json", "network", "ls"],
        &["status"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(BERTH)
            .arg("--socket")
            .arg(h.socket())
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: quiet, got {err}");
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success() || out.status.signal() == Some(nix::libc::SIGPIPE),
            "{args:?}: {:?}",
            out.status
        );
    }
    // Through a shell pipeline as people type it.
    let cmd = format!(
        "{BERTH} --socket {} sandbox ls | head -c1",
        h.socket().display()
    );
    let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// axum's own refusals (a method a path does not have, a body too large) carry the documented
/// `{"error": ...}` body like every other failure.
#[test]
fn every_api_failure_has_a_json_error_body() {
    let h = Host::new();
    let sock = h.socket();
    let big = h.dir.join("big.json");
    std::fs::write(&big, vec![b' '; 3 << 20]).unwrap();
    let big_arg = format!("@{}", big.display());
    for (expected, args) in [
        (405, vec!["-X", "PUT", "http://berth/v1/networks"]),
        (405, vec!["-X", "DELETE", "http://berth/v1/status"]),
        (
            413,
            vec![
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                big_arg.as_str(),
                "http://berth/v1/networks",
            ],
        ),
        (404, vec!["http://berth/v1/nope"]),
    ] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}\n%{content_type}",
                "--unix-socket",
            ])
            .arg(&sock)
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().collect::<Vec<_>>();
        let content_type = lines.pop().unwrap_or_default().to_string();
        let status = lines.pop().unwrap_or_default().to_string();
        let body = lines.join("\n");
        assert_eq!(status, expected.to_string(), "{args:?}: {text}");
        assert!(
            content_type.starts_with("application/json"),
            "{args:?}: {content_type}"
        );
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{args:?}: {e}: {body}"));
        let error = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: {v}"));
        assert!(!error.is_empty(), "{args:?}");
        if expected == 405 {
            assert!(error.contains("not allowed"), "{error}");
        }
        if expected == 413 {
            assert!(error.contains("too large"), "{error}");
        }
    }
}

/// What a refused request must leave as it was: the host's state and kernel, and no service or
/// policy.
fn unchanged(h: &Host, before: &str, what: &str) {
    assert_eq!(h.snapshot(), before, "{what} changed something");
    for path in ["/v1/services", "/v1/policies"] {
        let all: Value = h.client().get(path).unwrap();
        assert_eq!(all, json!([]), "{what} left {path}");
    }
}

/// A request to the API that must be refused with a 400 whose message has `expected`.
fn refused_by_api(h: &Host, method: &str, path: &str, body: &Value, expected: &str) {
    match h.client().call::<_, Value>(method, path, Some(body)) {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 400, "{method} {path}: {message}");
            assert!(
                message.contains(expected),
                "{method} {path}: expected {expected:?} in {message:?}"
            );
            assert!(
                message.len() < 400,
                "{method} {path}: a short message: {message}"
            );
        }
        Ok(_) => panic!("{method} {path}: accepted; expected a 400 with {expected:?}"),
        Err(other) => panic!("{method} {path}: {other}; expected a 400 with {expected:?}"),
    }
}

/// `n` distinct labels, short enough that 100,000 fit in a request.
fn labels(n: usize) -> Value {
    (0..n)
        .map(|i| (format!("l{i}"), json!("v")))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Every list and string of a request has a cap (docs/api.md): one over it is a 400 naming the
/// field, the cap and the size given, through the API and the CLI alike, and changes nothing.
#[test]
fn requests_over_a_cap_are_refused_naming_it_and_change_nothing() {
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
    h.ok(&["sandbox", "create", "db"]);
    let before = h.snapshot();

    let attach = |extra: Value| {
        let mut a = json!({"network": "blue", "sandbox": "db"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    };
    let service = |extra: Value| {
        let mut s = json!({"name": "web", "network": "blue", "ports": ["80"]});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    let policy = |spec: Value| json!({"metadata": {"name": "p", "network": "blue"}, "spec": spec});
    let many = |n: usize, f: &dyn Fn(usize) -> Value| Value::Array((0..n).map(f).collect());
    let terms = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/endpoints",
            attach(json!({"labels": labels(1025)})),
            "too many labels: 1025 given, at most 1024 per endpoint",
        ),
        (
            "/v1/endpoints",
            attach(json!({"labels": {"app": "v".repeat(64)}})),
            "the value is 64 bytes long, at most 63",
        ),
        (
            "/v1/endpoints",
            attach(json!({"labels": {"k".repeat(64): ""}})),
            "the key's name is 64 bytes long, at most 63",
        ),
        (
            "/v1/endpoints",
            attach(json!({"aliases": many(257, &|i| json!(format!("a{i}")))})),
            "too many aliases: 257 given, at most 256 per endpoint",
        ),
        (
            "/v1/endpoints",
            attach(json!({"named_ports": many(1025, &|i| json!(
                {"name": format!("p{i}"), "protocol": "tcp", "port": i + 1}
            ))})),
            "too many named ports (named_ports): 1025 given, at most 1024 per endpoint",
        ),
        (
            "/v1/endpoints",
            attach(json!({"ports": many(4097, &|i| json!(
                {"protocol": "tcp", "host_port": i + 1, "container_port": 80}
            ))})),
            "too many published ports (ports): 4097 given, at most 4096 per endpoint",
        ),
        (
            "/v1/endpoints",
            attach(json!({"ips": ["10.91.0.5", "fd00:91::5", "10.91.0.6"]})),
            "too many ips: 3 given, at most 2 per endpoint (one per address family)",
        ),
        (
            "/v1/endpoints",
            attach(json!({"container_id": "c".repeat(129)})),
            ": 129 bytes long, at most 128",
        ),
        (
            "/v1/endpoints",
            attach(json!({"sandbox": format!("/{}", "n".repeat(4095))})),
            "network namespace path \"/nnnn",
        ),
        (
            "/v1/endpoints",
            attach(json!({"sandbox": format!("/{}", "n".repeat(4095))})),
            ": 4096 bytes long, at most 4095",
        ),
        (
            "/v1/services",
            service(json!({"ports": many(257, &|i| json!((i + 1).to_string()))})),
            "too many ports: 257 given, at most 256 per service",
        ),
        (
            "/v1/services",
            service(json!({
                "ports": many(65, &|i| json!(format!("p{i}={}", i + 1))),
                "publish": many(65, &|i| json!(format!("p{i}={}", 30000 + i))),
            })),
            "too many published ports (publish): 65 given, at most 64 per service",
        ),
        (
            "/v1/services",
            service(json!({"vips": ["10.211.0.5", "10.211.0.6", "fd00:b5:5e7::5"]})),
            "too many vips: 3 given, at most 2 per service",
        ),
        (
            "/v1/services",
            service(json!({"selector": terms(10_000)})),
            "too many selector terms: 10000 given, at most 256 per selector",
        ),
        (
            "/v1/services",
            service(json!({"selector": format!("env in ({})", terms(257))})),
            "too many values of \"env\": 257 given, at most 256 per in or notin",
        ),
        (
            "/v1/policies",
            policy(json!({"podSelector": {"matchLabels": labels(257)}})),
            "too many selector terms: 257 given, at most 256 per selector",
        ),
        (
            "/v1/policies",
            policy(json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress", "Ingress"]})),
            "may not specify more than two policyTypes",
        ),
        (
            "/v1/policies",
            policy(
                json!({"podSelector": {}, "ingress": [{"from": many(257, &|_| json!(
                    {"podSelector": {}}
                ))}]}),
            ),
            "ingress rule 1: too many peers: 257 given, at most 256 per rule",
        ),
        (
            "/v1/gc",
            json!({"network": "blue", "valid": many(8193, &|i| json!(
                {"container_id": format!("c{i}"), "ifname": "eth0"}
            ))}),
            "too many valid attachments: 8193 given, at most 8192 per request",
        ),
    ];
    for (path, body, expected) in &cases {
        refused_by_api(&h, "POST", path, body, expected);
        unchanged(&h, &before, path);
    }

    // The CLI: the same refusals, as one line.
    let label_args: Vec<String> = (0..1025).map(|i| format!("k{i}=v")).collect();
    let mut attach = vec!["attach", "db", "--network", "blue"];
    for l in &label_args {
        attach.extend(["--label", l.as_str()]);
    }
    let port_args: Vec<String> = (1..=257).map(|p| p.to_string()).collect();
    let mut service = vec!["service", "create", "web", "--network", "blue"];
    for p in &port_args {
        service.extend(["--port", p.as_str()]);
    }
    let selector = terms(257);
    let big_file = h.dir.join("policies.yaml");
    std::fs::write(&big_file, vec![b'#'; 3 << 20]).unwrap();
    let cli: Vec<(Vec<&str>, String)> = vec![
        (
            attach,
            "too many labels: 1025 given, at most 1024 per endpoint".into(),
        ),
        (
            service,
            "too many ports: 257 given, at most 256 per service".into(),
        ),
        (
            vec![
                "policy",
                "create",
                "p",
                "--network",
                "blue",
                "-l",
                &selector,
            ],
            "too many selector terms: 257 given, at most 256 per selector".into(),
        ),
        (
            vec!["policy", "apply", "-f", big_file.to_str().unwrap()],
            format!(
                "{} is 3145728 bytes, more than the 2097152 bytes `policy apply` reads",
                big_file.display()
            ),
        ),
    ];
    for (args, expected) in &cli {
        let err = h.fails(args);
        assert!(err.contains(expected), "{:?}: {err}", &args[..3]);
        assert!(err.len() < 400, "{:?}: a short message: {err}", &args[..3]);
        unchanged(&h, &before, args[0]);
    }
}

/// The reported fault: 100,000 labels on one endpoint took the daemon from 17 to 136 MiB.
/// Refused, they leave neither an endpoint nor the memory they would have held: what stays is
/// what parsing the 1.3 MB bodies took (about 12 MiB each, in the allocator's arenas).
#[test]
fn a_huge_label_set_is_refused_without_growing_the_daemon() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    h.ok(&["sandbox", "create", "db"]);
    let before = h.snapshot();
    let rss_before = h.daemon_rss_kib();
    let body = json!({"network": "blue", "sandbox": "db", "labels": labels(100_000)});
    for _ in 0..3 {
        refused_by_api(
            &h,
            "POST",
            "/v1/endpoints",
            &body,
            "too many labels: 100000 given, at most 1024 per endpoint",
        );
    }
    let grown = h.daemon_rss_kib().saturating_sub(rss_before);
    eprintln!("daemon RSS {rss_before} KiB, +{grown} KiB after three refusals");
    assert!(
        grown < 64 << 10,
        "the daemon grew by {grown} KiB ({rss_before} KiB before)"
    );
    unchanged(&h, &before, "100,000 labels");
}

/// The Docker plugin holds an endpoint's driver options and port bindings to the same caps, and
/// a network to one pool per family, answering in the engine's form (`{"Err": ...}`), and a
/// body over the limit too; nothing is made or held.
#[test]
fn docker_requests_over_a_cap_get_the_engines_error_form_and_change_nothing() {
    let h = Host::new();
    h.ok(&["network", "create", "blue", "--subnet", "10.91.0.0/24"]);
    // A Docker network on berth's network blue, with the engine's own IPAM.
    let (status, answer) = post(
        &h,
        "NetworkDriver.CreateNetwork",
        json!({
            "NetworkID": "dn1",
            "Options": {"com.docker.network.generic": {"berth.network": "blue"}},
            "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.91.0.0/24", "Gateway": "10.91.0.1/24"}],
        })
        .to_string()
        .as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let before = h.snapshot();

    let endpoint = |options: serde_json::Map<String, Value>| {
        json!({
            "NetworkID": "dn1", "EndpointID": "ep1",
            "Interface": {"Address": "10.91.0.50/24"}, "Options": options,
        })
        .to_string()
        .into_bytes()
    };
    let options = |n: usize, f: &dyn Fn(usize) -> (String, Value)| (0..n).map(f).collect();
    let bindings: Vec<Value> = (0..4097)
        .map(|i| json!({"Proto": 6, "Port": 80, "HostPort": 1 + i, "HostPortEnd": 1 + i}))
        .collect();
    let mut portmap = serde_json::Map::new();
    portmap.insert("com.docker.network.portmap".into(), Value::Array(bindings));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "NetworkDriver.CreateEndpoint",
            endpoint(options(1025, &|i| {
                (format!("berth.label.l{i}"), json!("v"))
            })),
            400,
            "too many labels (driver options berth.label.*): 1025 given, at most 1024 per endpoint",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            endpoint(options(1025, &|i| {
                (format!("berth.port.p{i}"), json!(format!("{}", i + 1)))
            })),
            400,
            "too many named ports (driver options berth.port.*): 1025 given, at most 1024 per endpoint",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            endpoint(portmap),
            400,
            "too many port bindings (-p): 4097 given, at most 4096 per endpoint",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            vec![b' '; 3 << 20],
            413,
            "request body too large: at most 2097152 bytes",
        ),
        (
            "NetworkDriver.CreateNetwork",
            json!({
                "NetworkID": "dn2",
                "IPv4Data": [
                    {"AddressSpace": "LocalDefault", "Pool": "10.95.0.0/24"},
                    {"AddressSpace": "LocalDefault", "Pool": "10.96.0.0/24"},
                ],
            })
            .to_string()
            .into_bytes(),
            400,
            "too many IPv4 pools (--subnet): 2 given, at most 1 per network (a berth network has one subnet of each family)",
        ),
    ];
    for (method, body, code, expected) in &cases {
        let (status, answer) = post(&h, method, body);
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status, *code, "{expected}: {text}");
        let v: Value = serde_json::from_slice(&answer).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v["Err"].as_str(), Some(*expected), "{v}");
        // Nothing held for the endpoint: no veth, record or address (the snapshot), and the
        // plugin does not know it.
        assert_eq!(h.snapshot(), before, "{expected}: changed something");
        let (status, _) = post(
            &h,
            "NetworkDriver.EndpointOperInfo",
            br#"{"NetworkID": "dn1", "EndpointID": "ep1"}"#,
        );
        assert_eq!(status, 404, "{expected}: the endpoint is unknown");
    }
}
