//! Backends for the conformance cases: a redb store in a tempdir, and etcd servers that run in
//! private network namespaces this test binary creates (never in the machine's own).
//!
//! A test process cannot reach 127.0.0.1 of another namespace, so every etcd test body runs
//! on a thread of its own that first joins the namespace (setns) and then builds a
//! current-thread runtime there: every socket it opens lives in that namespace.
//!
//! Cleanup: a private etcd is killed and its namespace deleted on drop (also when the test
//! panics). The shared one lives in a static that is never dropped; each etcd has a small
//! watchdog shell that, once this process is gone (however it ended), kills etcd and deletes
//! the namespace and data directory. Namespaces left by a process that no longer exists are
//! swept at the first start.

use std::fs::File;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

use berth_store::{EtcdStore, RedbStore, Store};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

const NS_PREFIX: &str = "berth-store-test-";
pub const ETCD_URL: &str = "http://127.0.0.1:2379";

/// A store under test, with the backend's way to drop old history.
pub struct Backend {
    pub store: Arc<dyn Store>,
    kind: Kind,
}

enum Kind {
    Redb(Arc<RedbStore>),
    Etcd(Arc<EtcdStore>),
}

impl Backend {
    pub fn is_etcd(&self) -> bool {
        matches!(self.kind, Kind::Etcd(_))
    }

    /// Forgets all history up to the current revision.
    pub async fn compact(&self) {
        match &self.kind {
            Kind::Redb(s) => s.compact_history(),
            Kind::Etcd(s) => {
                let rev = s.list("").await.unwrap().revision;
                s.compact(rev).await.unwrap();
            }
        }
    }
}

/// Runs a case against a fresh redb store, on a two-thread runtime so commits really race.
pub fn run_redb(case: impl AsyncFnOnce(&Backend)) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Arc::new(RedbStore::open(dir.path()).unwrap());
        let b = Backend {
            store: s.clone(),
            kind: Kind::Redb(s),
        };
        case(&b).await;
    });
}

pub enum Instance {
    /// One etcd for the whole test binary; cases keep apart by key prefix.
    Shared,
    /// An etcd of the case's own (for cases that compact or stop it).
    Private,
}

/// Runs a case against etcd, with every key under a prefix named after the case.
pub fn run_etcd(name: &str, instance: Instance, case: impl AsyncFnOnce(&Backend) + Send) {
    let private;
    let etcd = match instance {
        Instance::Shared => shared_etcd(),
        Instance::Private => {
            private = Etcd::start();
            &private
        }
    };
    let prefix = format!("/berth-test/{name}/");
    etcd.run(async move || {
        let s = Arc::new(connect(&prefix).await);
        let b = Backend {
            store: s.clone(),
            kind: Kind::Etcd(s),
        };
        case(&b).await;
    });
}

pub async fn connect(prefix: &str) -> EtcdStore {
    EtcdStore::connect(&[ETCD_URL.to_string()], prefix, None)
        .await
        .unwrap()
}

pub fn shared_etcd() -> &'static Etcd {
    static SHARED: OnceLock<Etcd> = OnceLock::new();
    SHARED.get_or_init(Etcd::start)
}

/// One etcd member in a network namespace of its own.
pub struct Etcd {
    pub ns: String,
    child: Child,
    watchdog: Child,
    dir: PathBuf,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes namespaces of earlier runs whose process is gone, with whatever runs in them.
fn sweep_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = p.parse() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        let _ = ip(&["netns", "del", name]);
    }
}

/// Once `parent` is gone: kill etcd, delete the namespace and the data directory.
const WATCHDOG: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
kill -CONT "$2" 2>/dev/null; kill -KILL "$2" 2>/dev/null
ip netns del "$3" 2>/dev/null
rm -rf "$4"
"#;

impl Etcd {
    pub fn start() -> Etcd {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale_namespaces);
        static N: AtomicUsize = AtomicUsize::new(0);
        let ns = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &ns]).unwrap();
        if let Err(e) = ip(&["-n", &ns, "link", "set", "lo", "up"]) {
            let _ = ip(&["netns", "del", &ns]);
            panic!("{e}");
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-store-etcd-")
            .tempdir()
            .unwrap()
            .keep();
        let log = File::create(dir.join("etcd.log")).unwrap();
        let spawned = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                ETCD_URL,
                "--advertise-client-urls",
                ETCD_URL,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "t=http://127.0.0.1:2380",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = ip(&["netns", "del", &ns]);
                let _ = std::fs::remove_dir_all(&dir);
                panic!("cannot start etcd (is etcd-server installed?): {e}");
            }
        };
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("berth-store-test-watchdog")
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .arg(&ns)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut etcd = Etcd {
            ns,
            child,
            watchdog,
            dir,
        };
        etcd.wait_ready();
        etcd
    }

    /// Until etcd answers a request: it accepts connections before it has a leader.
    fn wait_ready(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("etcd exited with {status}: {}", self.log());
            }
            let ok = self.run(async || {
                EtcdStore::connect(&[ETCD_URL.to_string()], "/", None)
                    .await
                    .is_ok()
            });
            if ok {
                return;
            }
            assert!(Instant::now() < until, "etcd did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Runs `body` on a thread in the namespace, on a current-thread runtime built there.
    pub fn run<T: Send>(&self, body: impl AsyncFnOnce() -> T + Send) -> T {
        in_netns(&self.ns, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body())
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = ip(&["netns", "del", &self.ns]) {
            eprintln!("{e}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a new thread that has joined the namespace `ns`, passing its panic on.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `fut`, or a panic naming `what` after a generous deadline (a hang is a failure).
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}
