//! `docker run -d` on a berth network against Docker's own bridge and `--network none`, in one
//! run: what each network adds to a container start. dockerd runs inside the benchmark's
//! private host namespace, with its default bridge and iptables there, so its bridge costs
//! what it costs on a real host and none of its rules reach the machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Row;

pub struct Dockerd {
    dir: PathBuf,
    spec: PathBuf,
    child: Child,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]).unwrap_or_default();
        for id in ids.split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .args(["-f", &self.dir.display().to_string()])
            .status();
        berth_dataplane::netns::unmount_below(&self.dir);
        let _ = std::fs::remove_file(&self.spec);
    }
}

impl Dockerd {
    /// Starts dockerd in the current (private) namespace, pointed at berth's plugin socket.
    pub fn start(dir: &Path, plugin: &str, plugin_socket: &Path) -> Result<Dockerd> {
        std::fs::create_dir_all(dir.join("img/bin"))?;
        std::fs::create_dir_all("/etc/docker/plugins")?;
        let spec = PathBuf::from(format!("/etc/docker/plugins/{plugin}.spec"));
        std::fs::write(&spec, format!("unix://{}\n", plugin_socket.display()))?;
        let d = |s: &str| dir.join(s).display().to_string();
        let child = Command::new("dockerd")
            .args(["--host", &format!("unix://{}", d("docker.sock"))])
            .args([
                "--data-root",
                &d("data"),
                "--exec-root",
                &d("exec"),
                "--pidfile",
                &d("docker.pid"),
            ])
            .args(["--storage-driver", "vfs"])
            // Its timestamped debug log splits a start into phases (see `engine_phases`).
            .arg("--debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dockerd.log"))?)
            .spawn()
            .context("start dockerd (apt-get install docker.io)")?;
        let dockerd = Dockerd {
            dir: dir.to_path_buf(),
            spec,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while dockerd.docker(&["info"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not start; see {}",
                    dir.join("dockerd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let img = dir.join("img/bin");
        std::fs::copy("/bin/busybox", img.join("busybox")).context("busybox-static")?;
        std::os::unix::fs::symlink("busybox", img.join("sleep"))?;
        let tarball = dir.join("img.tar");
        let tar = Command::new("tar")
            .arg("-C")
            .arg(dir.join("img"))
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .status()?;
        if !tar.success() {
            bail!("tar failed");
        }
        dockerd.docker(&["import", &tarball.display().to_string(), "busybox:local"])?;
        Ok(dockerd)
    }

    fn docker(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("docker")
            .args([
                "-H",
                &format!("unix://{}", self.dir.join("docker.sock").display()),
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "docker {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `docker run -d` of `n` containers on each network, round-robin; then removes them.
    pub fn run_bench(&self, plugin: &str, n: usize) -> Result<Vec<Row>> {
        self.docker(&[
            "network",
            "create",
            "-d",
            plugin,
            "--ipam-driver",
            plugin,
            "--subnet",
            "10.79.0.0/20",
            "berthnet",
        ])?;
        self.docker(&["network", "create", "--subnet", "10.80.0.0/20", "bridgenet"])?;
        let variants = [
            ("docker --network none", "none"),
            ("docker bridge network", "bridgenet"),
            ("docker berth network", "berthnet"),
        ];
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
        for i in 0..n {
            for (v, (_, net)) in variants.iter().enumerate() {
                let t = Instant::now();
                self.docker(&[
                    "run",
                    "-d",
                    "--name",
                    &format!("b{v}x{i}"),
                    "--network",
                    net,
                    "busybox:local",
                    "sleep",
                    "600",
                ])?;
                samples[v].push(t.elapsed());
            }
        }
        let ids = self.docker(&["ps", "-aq"])?;
        for id in ids.split_whitespace() {
            self.docker(&["rm", "-f", id])?;
        }
        self.docker(&["network", "rm", "berthnet", "bridgenet"])?;
        let log = std::fs::read_to_string(self.dir.join("dockerd.log"))?;
        print_engine_phases(&engine_phases(&log), &variants.map(|(name, _)| name));
        Ok(variants
            .iter()
            .zip(samples)
            .map(|((name, _), samples)| Row {
                tool: name.to_string(),
                n,
                op: "run -d",
                samples,
                failed: 0,
            })
            .collect())
    }
}

/// One container start as dockerd's debug log times it.
#[derive(Debug, Default)]
struct StartPhases {
    /// From the start call to the runtime's bundle: libnetwork allocates the network, which
    /// is where a driver's calls are (a remote driver's over HTTP, the bridge's in process).
    to_runtime: Option<f64>,
    /// libnetwork's prestart hook: it moves and configures the interface in the new
    /// namespace and sets up the embedded DNS resolver's rules there.
    set_key: Option<f64>,
}

/// Phases of each `b{variant}x{i}` container start, by variant, in milliseconds.
fn engine_phases(log: &str) -> HashMap<usize, Vec<StartPhases>> {
    let mut by_variant: HashMap<usize, Vec<StartPhases>> = HashMap::new();
    let mut current: Option<(usize, Option<f64>)> = None;
    for line in log.lines() {
        let Some(at) = log_time(line) else { continue };
        if let Some(name) = line.split("containers/create?name=b").nth(1) {
            let variant = name.split('x').next().and_then(|v| v.parse().ok());
            current = variant.map(|v| {
                by_variant
                    .entry(v)
                    .or_default()
                    .push(StartPhases::default());
                (v, None)
            });
            continue;
        }
        let Some((variant, started)) = current.as_mut() else {
            continue;
        };
        let phases = by_variant
            .get_mut(variant)
            .and_then(|v| v.last_mut())
            .expect("pushed at create");
        if line.contains("/start\"") && started.is_none() {
            *started = Some(at);
        } else if line.contains("bundle dir created") && phases.to_runtime.is_none() {
            phases.to_runtime = started.map(|s| (at - s) * 1e3);
        } else if let Some(took) = line.split("set key processing took ").nth(1) {
            phases.set_key = took.split(' ').next().and_then(go_duration_ms);
        }
    }
    by_variant
}

/// Seconds since midnight of a logrus line's `time="2026-11-23T16:18:10.973681268Z"`.
fn log_time(line: &str) -> Option<f64> {
    let t = line.strip_prefix("time=\"")?.split('"').next()?;
    let clock = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A Go `time.Duration` as printed (`70.5ms`, `950µs`, `1.2s`), in milliseconds.
fn go_duration_ms(d: &str) -> Option<f64> {
    for (unit, scale) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(v) = d.strip_suffix(unit) {
            return v.parse::<f64>().ok().map(|v| v * scale);
        }
    }
    None
}

fn print_engine_phases(phases: &HashMap<usize, Vec<StartPhases>>, names: &[&str]) {
    let median = |v: usize, f: fn(&StartPhases) -> Option<f64>| {
        let mut xs: Vec<f64> = phases.get(&v)?.iter().filter_map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied()
    };
    let cell = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    let over = |x: Option<f64>, base: Option<f64>| match (x, base) {
        (Some(x), Some(b)) => format!("{:+.2}", x - b),
        _ => "-".into(),
    };
    println!(
        "\nWhere the time of a start goes, from dockerd's debug log (medians, ms; variant 0 is the base):"
    );
    println!("| {:<30} | start → runtime | adds  | set key | adds  |", "");
    println!("|--------------------------------|----------------:|------:|--------:|------:|");
    let base = (median(0, |p| p.to_runtime), median(0, |p| p.set_key));
    for (v, name) in names.iter().enumerate() {
        let (to_runtime, set_key) = (median(v, |p| p.to_runtime), median(v, |p| p.set_key));
        println!(
            "| {name:<30} | {:>15} | {:>5} | {:>7} | {:>5} |",
            cell(to_runtime),
            over(to_runtime, base.0),
            cell(set_key),
            over(set_key, base.1),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_come_from_the_debug_log() {
        let log = r#"time="2026-11-23T16:18:10.973681268Z" level=debug msg="Calling POST /v1.41/containers/create?name=b1x10"
time="2026-11-23T16:18:10.977524245Z" level=debug msg="Calling POST /v1.41/containers/a71/start"
time="2026-11-23T16:18:10.980397938Z" level=debug msg="bundle dir created" bundle=/x
time="2026-11-23T16:18:11.101604578Z" level=debug msg="sandbox set key processing took 70.572451ms for container a71"
time="2026-11-23T16:18:11.128748083Z" level=debug msg="Calling POST /v1.41/containers/create?name=b0x11"
time="2026-11-23T16:18:11.133182207Z" level=debug msg="Calling POST /v1.41/containers/2cf/start"
time="2026-11-23T16:18:11.134182207Z" level=debug msg="bundle dir created" bundle=/y
time="2026-11-23T16:18:11.157660457Z" level=debug msg="sandbox set key processing took 950µs for container 2cf"
"#;
        let p = engine_phases(log);
        let bridge = &p[&1][0];
        assert!((bridge.to_runtime.unwrap() - 2.873693).abs() < 1e-3);
        assert!((bridge.set_key.unwrap() - 70.572451).abs() < 1e-6);
        assert!((p[&0][0].set_key.unwrap() - 0.95).abs() < 1e-9);
        assert!((p[&0][0].to_runtime.unwrap() - 1.0).abs() < 1e-3);
        assert_eq!(go_duration_ms("1.5s"), Some(1500.0));
        assert_eq!(go_duration_ms("soon"), None);
    }
}
