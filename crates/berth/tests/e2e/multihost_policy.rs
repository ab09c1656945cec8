//! Network policies across hosts: an overlay network with endpoints on two hosts, policies
//! made on the first only, enforced by both kernels for their own endpoints. Every pair is
//! probed (TCP, UDP, ping; IPv4 and IPv6) against the model of `policy.rs`, and the second
//! host's `policy explain` must agree with it.

use std::time::Duration;

use serde_json::Value;

use crate::cluster::{Cluster, eventually};
use crate::multihost::create_overlay;
use crate::policy::{
    Ep, Pol, Port, Proto, attach, block, clear_policies, explain_mismatches, is, peer,
    policy_names, rule, serve, settle, tcp, udp,
};

/// How long the second host gets to follow the first (watches are fast; this is for a loaded
/// 2-core machine).
const CONVERGE: Duration = Duration::from_secs(15);
const OV4: &str = "10.192.0.0/24";
const OV6: &str = "fd00:192::/64";

/// One policy set: `policy create` arguments (made on host 1) and the model.
struct Set {
    name: &'static str,
    creates: Vec<Vec<String>>,
    model: Vec<Pol>,
}

fn set(name: &'static str, creates: &[&[&str]], model: Vec<Pol>) -> Set {
    Set {
        name,
        creates: creates
            .iter()
            .map(|a| a.iter().map(|s| s.to_string()).collect())
            .collect(),
        model,
    }
}

fn sets(eps: &[Ep]) -> Vec<Set> {
    let ep = |n: &str| eps.iter().find(|e| e.name == n).unwrap();
    let (w2, x1) = (ep("w2"), ep("x1"));
    let ov = |s| Pol::on("ov", s);
    vec![
        set(
            "ingress by selector across hosts",
            &[&[
                "db-in",
                "--network",
                "ov",
                "--selector",
                "app=db",
                "--ingress",
                "from=app=web ports=5432,9090",
            ]],
            vec![ov(is("app", "db")).ingress(vec![rule(
                vec![peer(is("app", "web"))],
                vec![tcp(5432), tcp(9090)],
            )])],
        ),
        set(
            "egress by selector across hosts",
            &[
                &[
                    "web-out",
                    "--network",
                    "ov",
                    "--selector",
                    "app=web",
                    "--egress",
                    "to=app=db",
                ],
                &[
                    "admin-out",
                    "--network",
                    "ov",
                    "--selector",
                    "role=admin",
                    "--egress",
                    "to=app=web ports=8080,5353/udp",
                ],
            ],
            vec![
                ov(is("app", "web")).egress(vec![rule(vec![peer(is("app", "db"))], vec![])]),
                ov(is("role", "admin")).egress(vec![rule(
                    vec![peer(is("app", "web"))],
                    vec![tcp(8080), udp(5353)],
                )]),
            ],
        ),
        // d1 (host 1) excepts w2 (host 2); d2 (host 2) excepts x1 (host 1) over IPv6.
        set(
            "CIDR blocks excepting endpoints of the other host",
            &[&[
                "db-cidr",
                "--network",
                "ov",
                "--selector",
                "app=db",
                "--ingress",
                &format!("from=cidr:{OV4} except={}", w2.cidr(false)),
                "--ingress",
                &format!("from=cidr:{OV6} except={},{}", w2.cidr(true), x1.cidr(true)),
            ]],
            vec![ov(is("app", "db")).ingress(vec![
                rule(vec![block(OV4, &[w2.cidr(false)])], vec![]),
                rule(vec![block(OV6, &[w2.cidr(true), x1.cidr(true)])], vec![]),
            ])],
        ),
        // d1 names 5432 pg, d2 names 9090 pg: each web reaches the other host's db on that
        // host's db's own port.
        set(
            "egress named port resolved on remote endpoints",
            &[&[
                "web-pg",
                "--network",
                "ov",
                "--selector",
                "app=web",
                "--egress",
                "to=app=db ports=pg",
            ]],
            vec![ov(is("app", "web")).egress(vec![rule(
                vec![peer(is("app", "db"))],
                vec![Port::Named("pg", Proto::Tcp)],
            )])],
        ),
    ]
}

/// `(name, host)` of the endpoints a policy selects, as host `viewer` sees them.
fn selected_on(c: &Cluster, viewer: usize, policy: &str) -> Result<Vec<(String, String)>, String> {
    let o = c
        .host(viewer)
        .berth(&["-o", "json", "policy", "inspect", policy]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    let mut got: Vec<(String, String)> = v["status"]["selectedEndpoints"]
        .as_array()
        .ok_or_else(|| format!("no status.selectedEndpoints: {v}"))?
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_string(),
                e["host"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    got.sort();
    Ok(got)
}

#[test]
fn policies_made_on_one_host_are_enforced_on_both_and_explained_alike() {
    let c = Cluster::new(2);
    let (h1, h2) = (c.host(1), c.host(2));
    create_overlay(&c, "ov", &["--subnet", OV4, "--ipv6-subnet", OV6]);
    let eps = vec![
        attach(h1, "w1", "ov", &["app=web"], &[]),
        attach(h1, "d1", "ov", &["app=db"], &["pg=5432"]),
        attach(h1, "x1", "ov", &["role=admin"], &[]),
        attach(h2, "w2", "ov", &["app=web"], &[]),
        attach(h2, "d2", "ov", &["app=db"], &["pg=9090/tcp"]),
    ];
    let _servers = serve(&eps);
    let warm = settle(&eps, &[], CONVERGE);
    assert!(warm.is_empty(), "without policies:\n{}", warm.join("\n"));

    let mut failures = Vec::new();
    for s in sets(&eps) {
        let mut fail = |f: String| failures.push(format!("[{}] {f}", s.name));
        clear_policies(h1);
        let mut names: Vec<String> = Vec::new();
        for args in &s.creates {
            let mut a = vec!["policy", "create"];
            a.extend(args.iter().map(String::as_str));
            h1.ok(&a);
            names.push(args[0].clone());
        }
        names.sort();
        // Host 2 lists exactly this set's policies...
        let listed = std::time::Instant::now() + CONVERGE;
        loop {
            let mut on2 = policy_names(h2);
            on2.sort();
            if on2 == names {
                break;
            }
            if std::time::Instant::now() > listed {
                fail(format!("host 2 lists {on2:?}, not {names:?}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // ...and both kernels enforce it (host 2 may take a moment to follow).
        for m in settle(&eps, &s.model, CONVERGE) {
            fail(m);
        }
        for m in explain_mismatches(h2, &eps, &s.model, true) {
            fail(format!("on host 2: {m}"));
        }
    }
    // Host 2 knows which endpoints, of either host, a policy made on host 1 selects.
    clear_policies(h1);
    h1.ok(&[
        "policy",
        "create",
        "db-in",
        "--network",
        "ov",
        "--selector",
        "app=db",
    ]);
    let want = vec![
        ("d1".to_string(), c.host_id(1)),
        ("d2".to_string(), c.host_id(2)),
    ];
    eventually("host 2 shows what db-in selects", CONVERGE, || {
        let got = selected_on(&c, 2, "db-in")?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
