//! Published ports: what three published ports add to an attach, and TCP throughput through a
//! published port against straight to the container's address, in one run.
//!
//! Throughput is measured from a second "host" namespace on a veth underlay (192.0.2.2) to
//! this host (192.0.2.1), with iperf3: once to 192.0.2.1:PORT (DNAT by berth's rules) and once
//! to the container's address, which the operator's chain `user` is told to accept (berth
//! otherwise refuses direct access from other hosts), alternating runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_api::{Attach, Client, Detach, Endpoint, PortMapping, Protocol};

use crate::{Row, timed};

/// Attaches `sbs` alternately without ports and with three published ports, then detaches
/// them; rows for each kind.
pub fn attach_with_ports(client: &Client, sbs: &[PathBuf]) -> Result<Vec<Row>> {
    let mut attach = [Vec::new(), Vec::new()];
    for (i, p) in sbs.iter().enumerate() {
        let with_ports = i % 2;
        let base = 20000 + 3 * i as u16;
        let ports = match with_ports {
            0 => vec![],
            _ => (0..3)
                .map(|k| PortMapping {
                    protocol: Protocol::Tcp,
                    host_ip: None,
                    host_port: base + k,
                    container_port: 80 + k,
                })
                .collect(),
        };
        let req = Attach {
            network: "bench".into(),
            sandbox: p.display().to_string(),
            ports,
            ..Default::default()
        };
        attach[with_ports].push(timed(|| {
            client
                .post::<_, Endpoint>("/v1/endpoints", &req)
                .map(drop)
                .map_err(Into::into)
        })?);
    }
    let mut detach = [Vec::new(), Vec::new()];
    for (i, p) in sbs.iter().enumerate() {
        let req = Detach {
            network: "bench".into(),
            sandbox: Some(p.display().to_string()),
            ..Default::default()
        };
        detach[i % 2].push(timed(|| {
            client
                .post::<_, serde_json::Value>("/v1/detach", &req)
                .map(drop)
                .map_err(Into::into)
        })?);
    }
    let mut rows = Vec::new();
    for (k, label) in ["berth (API), no ports", "berth (API), 3 published ports"]
        .into_iter()
        .enumerate()
    {
        for (op, samples) in [("attach", &attach[k]), ("detach", &detach[k])] {
            rows.push(Row {
                tool: label.into(),
                n: samples.len(),
                op,
                samples: samples.clone(),
                failed: 0,
            });
        }
    }
    Ok(rows)
}

/// The second host: a named namespace joined to ours by a veth. Deleted on drop.
struct Underlay {
    name: String,
}

impl Drop for Underlay {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip").args(args).status()?;
    if !st.success() {
        bail!("ip {args:?} failed");
    }
    Ok(())
}

fn in_netns(path: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={path}")).args(cmd);
    c
}

/// iperf3 from the namespace at `out` to `target:port` for `secs`; Gbit/s received.
pub(crate) fn iperf(out: &str, target: &str, port: u16, secs: u32) -> Result<f64> {
    let o = in_netns(
        out,
        &[
            "iperf3",
            "-c",
            target,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
    )
    .stdin(std::process::Stdio::null())
    .output()?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&o.stderr)))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 to {target}:{port} failed: {v}"))
}

/// Median Gbit/s through a published port and straight to the container, `runs` each.
pub fn throughput(client: &Client, sandbox: &Path, secs: u32, runs: usize) -> Result<()> {
    if Command::new("iperf3").arg("-v").output().is_err() {
        eprintln!("throughput skipped: apt-get install iperf3");
        return Ok(());
    }
    let under = Underlay {
        name: format!("berth-bench-out-{}", std::process::id()),
    };
    ip(&["netns", "add", &under.name])?;
    let out = format!("/run/netns/{}", under.name);
    ip(&[
        "link",
        "add",
        "under0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &under.name,
    ])?;
    ip(&["addr", "add", "192.0.2.1/24", "dev", "under0"])?;
    ip(&["link", "set", "under0", "up"])?;
    for args in [
        vec!["addr", "add", "192.0.2.2/24", "dev", "eth0"],
        vec!["link", "set", "eth0", "up"],
        vec!["link", "set", "lo", "up"],
        vec!["route", "add", "10.77.0.0/20", "via", "192.0.2.1"],
    ] {
        let mut full = vec!["-n", under.name.as_str()];
        full.extend(args);
        ip(&full)?;
    }
    let ep: Endpoint = client.post(
        "/v1/endpoints",
        &Attach {
            network: "bench".into(),
            sandbox: sandbox.display().to_string(),
            ports: vec![PortMapping {
                protocol: Protocol::Tcp,
                host_ip: None,
                host_port: 15201,
                container_port: 5201,
            }],
            ..Default::default()
        },
    )?;
    let target = ep.ips[0].addr().to_string();
    let allow = format!("add rule inet berth user ip saddr 192.0.2.2 ip daddr {target} accept");
    let st = Command::new("nft").args(allow.split(' ')).status()?;
    if !st.success() {
        bail!("nft {allow} failed");
    }
    let mut server: Child = in_netns(
        &sandbox.display().to_string(),
        &["iperf3", "-s", "-p", "5201"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut direct = Vec::new();
    let mut published = Vec::new();
    let result = (|| -> Result<()> {
        for _ in 0..runs {
            direct.push(iperf(&out, &target, 5201, secs)?);
            published.push(iperf(&out, "192.0.2.1", 15201, secs)?);
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, p) = (median(&mut direct), median(&mut published));
    println!("\nTCP throughput from another host namespace, iperf3 {secs} s x {runs}, medians:");
    println!("| path                               | Gbit/s |");
    println!("|------------------------------------|-------:|");
    println!("| straight to the container address  | {d:>6.2} |");
    println!("| through published port (DNAT)      | {p:>6.2} |");
    println!(
        "| published / direct                 | {:>5.1}% |",
        100.0 * p / d
    );
    client.post::<_, serde_json::Value>(
        "/v1/detach",
        &Detach {
            network: "bench".into(),
            sandbox: Some(sandbox.display().to_string()),
            ..Default::default()
        },
    )?;
    Ok(())
}
