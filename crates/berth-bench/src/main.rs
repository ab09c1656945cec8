//! `berth-bench`: attach and detach latency, berth beside the baselines, in one run.
//!
//! Everything happens inside a private "host" network namespace that this process enters at
//! start (it is single-threaded, so that is safe), with sandboxes made by berth's own netns
//! code in a temporary directory. berth is driven through its API socket (and, for a
//! like-for-like comparison with the plugins, through the CLI, process start included); the
//! reference CNI `bridge`+`host-local` plugins and netavark are spawned directly, as a runtime
//! on that host would. Run as root: `cargo build --release && target/release/berth-bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_api::{Attach, Client, CreateNetwork, Detach, Endpoint, Network};
use berth_dataplane::netns;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Attach/detach latency: berth vs the reference CNI plugins and netavark")]
struct Args {
    /// Runs of berth through the API: sandboxes attached in a row, then detached.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
    n: Vec<usize>,
    /// Sandboxes for the CLI and the baselines (each spawns a process per call).
    #[arg(long, default_value_t = 100)]
    baseline_n: usize,
    /// Skip the baselines (e.g. where their packages are not installed).
    #[arg(long)]
    no_baselines: bool,
}

struct Row {
    tool: String,
    n: usize,
    op: &'static str,
    samples: Vec<Duration>,
}

impl Row {
    fn print(&self) {
        let mut s = self.samples.clone();
        s.sort();
        let pct = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)];
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
        println!(
            "| {:<28} | {:>5} | {:<8} | {:>7} | {:>7} | {:>7} | {:>7} |",
            self.tool,
            self.n,
            self.op,
            ms(pct(0.5)),
            ms(pct(0.99)),
            ms(self.samples[0]),
            ms(*self.samples.last().unwrap())
        );
    }
}

struct Bench {
    host: PathBuf,
    dir: PathBuf,
    berth: PathBuf,
    daemon: Option<Child>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("sb")) {
            for e in entries.flatten() {
                let _ = netns::remove(&e.path());
            }
        }
        let _ = netns::remove(&self.host);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("berth-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sb"))?;
    let berth = std::env::current_exe()?.with_file_name("berth");
    if !berth.exists() {
        bail!(
            "{} not found: build it first (cargo build --release)",
            berth.display()
        );
    }
    let mut b = Bench {
        host: dir.join("host"),
        dir: dir.clone(),
        berth,
        daemon: None,
    };
    netns::create(&b.host)?;
    let host = std::fs::File::open(&b.host)?;
    nix::sched::setns(&host, nix::sched::CloneFlags::CLONE_NEWNET).context("enter host netns")?;

    b.daemon = Some(
        Command::new(&b.berth)
            .args(["daemon", "--log-level", "warn", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--netns-dir")
            .arg(dir.join("netns"))
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let socket = dir.join("run/berth.sock");
    let client = Client::new(&socket);
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get::<serde_json::Value>("/v1/status").is_err() {
        if Instant::now() > deadline {
            bail!("daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _: Network = client.post(
        "/v1/networks",
        &CreateNetwork {
            name: "bench".into(),
            subnet: Some("10.77.0.0/20".into()),
            ..Default::default()
        },
    )?;

    let mut rows = Vec::new();
    let max = args
        .n
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(args.baseline_n);
    let sandboxes: Vec<PathBuf> = (0..max)
        .map(|i| dir.join("sb").join(format!("s{i}")))
        .collect();
    for p in &sandboxes {
        netns::create(p)?;
    }

    for &n in &args.n {
        let (attach, detach) = berth_api_run(&client, &sandboxes[..n])?;
        rows.push(Row {
            tool: "berth (API)".into(),
            n,
            op: "attach",
            samples: attach,
        });
        rows.push(Row {
            tool: "berth (API)".into(),
            n,
            op: "detach",
            samples: detach,
        });
    }
    let (attach, detach) = berth_cli_run(&b.berth, &socket, &sandboxes[..args.baseline_n])?;
    rows.push(Row {
        tool: "berth (CLI process)".into(),
        n: args.baseline_n,
        op: "attach",
        samples: attach,
    });
    rows.push(Row {
        tool: "berth (CLI process)".into(),
        n: args.baseline_n,
        op: "detach",
        samples: detach,
    });

    let installed =
        Path::new("/usr/lib/cni/bridge").exists() && Path::new("/usr/lib/podman/netavark").exists();
    if !args.no_baselines && !installed {
        eprintln!("baselines skipped: apt-get install containernetworking-plugins netavark");
    }
    if !args.no_baselines && installed {
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("baselines");
        let (add, del) = cni_reference_run(&here, &dir, &sandboxes[..args.baseline_n])?;
        rows.push(Row {
            tool: "cni bridge+host-local".into(),
            n: args.baseline_n,
            op: "ADD",
            samples: add,
        });
        rows.push(Row {
            tool: "cni bridge+host-local".into(),
            n: args.baseline_n,
            op: "DEL",
            samples: del,
        });
        let (setup, teardown) = netavark_run(&here, &dir, &sandboxes[..args.baseline_n])?;
        rows.push(Row {
            tool: "netavark 1.4".into(),
            n: args.baseline_n,
            op: "setup",
            samples: setup,
        });
        rows.push(Row {
            tool: "netavark 1.4".into(),
            n: args.baseline_n,
            op: "teardown",
            samples: teardown,
        });
    }

    println!(
        "\n| tool                         |     N | op       | p50 ms  | p99 ms  | first   | last    |"
    );
    println!(
        "|------------------------------|------:|----------|--------:|--------:|--------:|--------:|"
    );
    for r in &rows {
        r.print();
    }
    Ok(())
}

fn timed(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn berth_api_run(client: &Client, sbs: &[PathBuf]) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut attach = Vec::new();
    for p in sbs {
        let req = Attach {
            network: "bench".into(),
            sandbox: p.display().to_string(),
            ..Default::default()
        };
        attach.push(timed(|| {
            client
                .post::<_, Endpoint>("/v1/endpoints", &req)
                .map(drop)
                .map_err(Into::into)
        })?);
    }
    let mut detach = Vec::new();
    for p in sbs {
        let req = Detach {
            network: "bench".into(),
            sandbox: Some(p.display().to_string()),
            ..Default::default()
        };
        detach.push(timed(|| {
            client
                .post::<_, serde_json::Value>("/v1/detach", &req)
                .map(drop)
                .map_err(Into::into)
        })?);
    }
    Ok((attach, detach))
}

fn spawn_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn berth_cli_run(
    berth: &Path,
    socket: &Path,
    sbs: &[PathBuf],
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut attach = Vec::new();
    for p in sbs {
        attach.push(timed(|| {
            spawn_ok(
                Command::new(berth)
                    .arg("--socket")
                    .arg(socket)
                    .arg("attach")
                    .arg(p)
                    .args(["--network", "bench"]),
            )
        })?);
    }
    let mut detach = Vec::new();
    for p in sbs {
        detach.push(timed(|| {
            spawn_ok(
                Command::new(berth)
                    .arg("--socket")
                    .arg(socket)
                    .arg("detach")
                    .arg(p)
                    .args(["--network", "bench"]),
            )
        })?);
    }
    Ok((attach, detach))
}

fn with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn cni_reference_run(
    here: &Path,
    dir: &Path,
    sbs: &[PathBuf],
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let conf = std::fs::read_to_string(here.join("cni-ref-bridge.json"))?
        .replace("DATADIR", &dir.join("host-local").display().to_string());
    let mut out = (Vec::new(), Vec::new());
    for (cmd, samples) in [("ADD", &mut out.0), ("DEL", &mut out.1)] {
        for (i, p) in sbs.iter().enumerate() {
            samples.push(timed(|| {
                with_stdin(
                    Command::new("/usr/lib/cni/bridge")
                        .env("CNI_COMMAND", cmd)
                        .env("CNI_CONTAINERID", format!("c{i}"))
                        .env("CNI_NETNS", p)
                        .env("CNI_IFNAME", "eth0")
                        .env("CNI_PATH", "/usr/lib/cni"),
                    &conf,
                )
            })?);
        }
    }
    Ok(out)
}

fn netavark_run(
    here: &Path,
    dir: &Path,
    sbs: &[PathBuf],
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let template = std::fs::read_to_string(here.join("netavark-net.json"))?;
    let cfg = dir.join("netavark");
    let mut out = (Vec::new(), Vec::new());
    for (cmd, samples) in [("setup", &mut out.0), ("teardown", &mut out.1)] {
        for (i, p) in sbs.iter().enumerate() {
            let ip = format!("10.89.{}.{}", i / 250, i % 250 + 2);
            let conf = template
                .replace("CID", &format!("cid{i}"))
                .replace("NAME", &i.to_string())
                .replace("IPADDR", &ip);
            samples.push(timed(|| {
                with_stdin(
                    Command::new("/usr/lib/podman/netavark")
                        .arg("--config")
                        .arg(&cfg)
                        .arg(cmd)
                        .arg(p),
                    &conf,
                )
            })?);
        }
    }
    Ok(out)
}
