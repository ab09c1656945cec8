//! Commands the kernel tests run in the private namespaces they make (each test binary uses
//! a part of them).
#![allow(dead_code)]

use std::fs::File;
use std::process::{Command, Output};

use nix::sched::{CloneFlags, setns};

pub fn output(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Runs a command that must succeed; its standard output.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = output(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NS ...`
pub fn ip(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// A command inside namespace `ns` (with its own /sys).
pub fn exec(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Moves this thread into namespace `ns`.
pub fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap();
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
}

/// Runs `f` on a thread in namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .unwrap()
}

/// Makes network namespace `name` as the labs' hosts and containers need it: forwarding on,
/// no duplicate address detection (IPv6 addresses usable at once), loopback up.
pub fn routing_netns(name: &str) {
    run("ip", &["netns", "add", name]);
    for (key, value) in [
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
    ] {
        exec(name, &["sysctl", "-qw", &format!("{key}={value}")]);
    }
    ip(name, &["link", "set", "lo", "up"]);
}
