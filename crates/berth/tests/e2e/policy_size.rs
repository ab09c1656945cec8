//! The biggest policies berth takes: applied, replaced and removed through the CLI as they
//! grow, each call in a process of its own with a timeout, so that a kernel that takes time
//! out of proportion shows as a failed test and never as a machine wedged behind the
//! nftables lock. Too big a policy is refused, naming it and by how much, and changes nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{BERTH, Host, endpoint_ip};

/// A NetworkPolicy on network `big` selecting every endpoint, allowing in from `cidrs` /16s
/// (10.100.0.0/16 on) each with `excepts` /32 exceptions, to `ports` TCP port ranges. Variant
/// 1 moves every exception by one address: a replace then changes every element.
fn policy_file(dir: &Path, cidrs: usize, excepts: usize, ports: usize, variant: u8) -> String {
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: big\n  network: big\nspec:\n  podSelector: {}\n  ingress:\n    - from:\n",
    );
    for c in 0..cidrs {
        let (hi, lo) = (100 + c / 256, c % 256);
        y.push_str(&format!(
            "        - ipBlock:\n            cidr: {hi}.{lo}.0.0/16\n            except:\n"
        ));
        for e in 0..excepts {
            y.push_str(&format!(
                "              - {hi}.{lo}.{e}.{}/32\n",
                7 + variant
            ));
        }
    }
    y.push_str("      ports:\n");
    for p in 0..ports {
        let first = 1000 + p * 100;
        y.push_str(&format!(
            "        - {{protocol: TCP, port: {first}, endPort: {}}}\n",
            first + 50
        ));
    }
    let path = dir.join(format!("big-{cidrs}-{excepts}-{ports}-{variant}.yaml"));
    std::fs::write(&path, y).unwrap();
    path.display().to_string()
}

/// Runs the CLI in a process of its own, killed after `timeout`: how long it took, and
/// whether it succeeded (and its stderr).
fn timed(h: &Host, args: &[&str], timeout: Duration) -> (Duration, bool, String) {
    let start = Instant::now();
    let mut child = Command::new(BERTH)
        .arg("--socket")
        .arg(h.socket())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (start.elapsed(), status.success(), err);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("berth {args:?}: not done within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A command in the host's namespace that needs the kernel's network configuration lock (as
/// `ip netns add` and nft do): done within a few seconds, or the host is wedged.
fn kernel_answers(h: &Host) {
    let start = Instant::now();
    let out = Command::new("timeout")
        .args(["20", "nsenter"])
        .arg(format!("--net={}", h.netns_path()))
        .args(["nft", "list", "table", "inet", "berth"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nft list after {:?}: {}: {}",
        start.elapsed(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn big_policies_stay_quick_and_too_big_ones_are_refused() {
    let h = Host::new();
    h.ok(&["network", "create", "big", "--subnet", "10.77.0.0/24"]);
    for sb in ["a", "b"] {
        h.ok(&["sandbox", "create", sb]);
    }
    h.ok(&["attach", "a", "--network", "big"]);
    let b = h.json(&["attach", "b", "--network", "big"]);
    let b_ip = endpoint_ip(&b, false);
    assert!(h.reaches("a", &b_ip));
    let dir = h.dir.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let limit = Duration::from_secs(60);
    // (CIDRs, exceptions each, port ranges): the last is the 78 KB policy scaled up
    // to near the limit of kernel elements per policy (70 x 257 + 16).
    let steps = [(2, 16, 4), (16, 64, 16), (16, 256, 16), (70, 256, 16)];
    println!("| CIDRs x excepts, ports | apply ms | replace ms | remove ms |");
    let mut per_element = Vec::new();
    for (cidrs, excepts, ports) in steps {
        let first = policy_file(&dir, cidrs, excepts, ports, 0);
        let second = policy_file(&dir, cidrs, excepts, ports, 1);
        let (apply, ok, err) = timed(&h, &["policy", "apply", "-f", &first], limit);
        assert!(ok, "apply {cidrs}x{excepts}: {err}");
        // Enforced: only the CIDRs may come in, so a no longer reaches b.
        assert!(h.cannot_reach("a", &b_ip), "{cidrs}x{excepts}");
        let (replace, ok, err) = timed(&h, &["policy", "apply", "-f", &second], limit);
        assert!(ok, "replace {cidrs}x{excepts}: {err}");
        let (remove, ok, err) = timed(&h, &["policy", "rm", "big"], limit);
        assert!(ok, "remove {cidrs}x{excepts}: {err}");
        assert!(h.reaches("a", &b_ip), "{cidrs}x{excepts} removed");
        kernel_answers(&h);
        println!(
            "| {cidrs:>3} x {excepts:>3}, {ports:>2} | {:>8.0} | {:>10.0} | {:>9.0} |",
            apply.as_secs_f64() * 1000.0,
            replace.as_secs_f64() * 1000.0,
            remove.as_secs_f64() * 1000.0
        );
        let elements = (cidrs * (excepts + 1) + ports) as f64;
        per_element.push((
            elements,
            (apply + replace + remove).as_secs_f64() / elements,
        ));
    }
    // Linear: per element, the biggest costs no more than a few times the second step's (the
    // first is mostly fixed costs).
    let (small, large) = (per_element[1], per_element[per_element.len() - 1]);
    assert!(
        large.1 < small.1 * 6.0,
        "per element {:.6} s at {} elements, {:.6} s at {}",
        small.1,
        small.0,
        large.1,
        large.0
    );

    // Past the limit: refused before anything is written, naming the policy and the excess.
    let huge = policy_file(&dir, 100, 256, 16, 0);
    let (_, ok, err) = timed(&h, &["policy", "apply", "-f", &huge], limit);
    assert!(!ok);
    assert!(
        err.contains("\"big\"")
            && err.contains("kernel elements")
            && err.contains("over the limit"),
        "{err}"
    );
    assert_eq!(h.json(&["policy", "ls"]).as_array().map(Vec::len), Some(0));
    assert!(h.reaches("a", &b_ip), "nothing changed");
    kernel_answers(&h);
}
