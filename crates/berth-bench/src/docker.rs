//! `docker run -d` on a berth network against Docker's own bridge and `--network none`, in one
//! run: what each network adds to a container start. dockerd runs inside the benchmark's
//! private host namespace, with its default bridge and iptables there, so its bridge costs
//! what it costs on a real host and none of its rules reach the machine.

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
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
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
