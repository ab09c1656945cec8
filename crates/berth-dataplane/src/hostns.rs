//! Host network namespaces: the lock a berth daemon holds on the namespace it runs in (at most
//! one daemon per namespace), and the namespaces no container attach may take.
//!
//! The lock is an open-file-description lock (`F_OFD_SETLK`) on `/run/lock/berth/netns-DEV-INO`,
//! a file named by the namespace's identity in a directory only root may enter. No other user
//! can take or hold it (an abstract socket name, berth's guard before, any local user could
//! bind first and so keep the daemon from starting), the kernel drops it when the daemon dies
//! (no stale lock), and root can tell whether a daemon runs in a namespace (`F_OFD_GETLK`)
//! without taking the lock. The directory is one per mount namespace: daemons that should see
//! each other must share `/run`.

use std::fmt;
use std::fs::{DirBuilder, File, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use crate::{DataplaneError, Result};

/// Where daemons' namespace locks live: root's alone (0700).
pub const LOCK_DIR: &str = "/run/lock/berth";

/// The lock a daemon holds on its network namespace for as long as it lives; dropping it
/// removes the lock file and releases the lock.
#[derive(Debug)]
pub struct DaemonLock {
    path: PathBuf,
    _file: File,
}

/// What [`DaemonLock::claim`] found.
#[derive(Debug)]
pub enum Claim {
    Held(DaemonLock),
    /// Another daemon holds the namespace (its pid, when it could be read).
    Taken {
        pid: Option<u32>,
    },
}

impl DaemonLock {
    /// Takes the lock of the calling thread's network namespace, writing this process's pid
    /// into it for the next daemon's error message.
    pub fn claim() -> Result<Claim> {
        let ns = namespace_of(Path::new("/proc/thread-self/ns/net"))?;
        let dir = lock_dir()?;
        let path = dir.join(lock_name(&ns));
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| DataplaneError::io(format!("open {}", path.display()), e))?;
            match fcntl(&file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_WRLCK))) {
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
                    return Ok(Claim::Taken {
                        pid: read_pid(&mut file),
                    });
                }
                Err(e) => {
                    return Err(DataplaneError::Kernel {
                        op: format!("lock {}", path.display()),
                        source: e.into(),
                    });
                }
            }
            // A daemon that was stopping may have removed the file between our open and our
            // lock: then the lock is on a file no one else will find, and we start over.
            let opened = file
                .metadata()
                .map_err(|e| DataplaneError::io(format!("stat {}", path.display()), e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == opened.dev() && now.ino() == opened.ino() => {}
                _ => continue,
            }
            file.set_len(0)
                .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
                .map_err(|e| DataplaneError::io(format!("write {}", path.display()), e))?;
            remove_stale_locks(&dir);
            return Ok(Claim::Held(DaemonLock { path, _file: file }));
        }
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        // Removed while still locked: a daemon starting now either finds no file (and makes
        // its own) or locks this one after we are gone and sees it is no longer at the path.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes the lock files no daemon holds: those of daemons that were killed (a clean stop
/// removes its own). A daemon that opened one of them and is about to lock it finds it gone
/// from the path after locking, and starts over with a new one.
fn remove_stale_locks(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let free = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .is_ok_and(|f| {
                let mut probe = whole_file(libc::F_WRLCK);
                fcntl(&f, FcntlArg::F_OFD_GETLK(&mut probe)).is_ok()
                    && probe.l_type == libc::F_UNLCK as libc::c_short
            });
        if free {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Why a network namespace is a host's and not a container's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNamespace {
    /// A berth daemon runs in it (the one asking, or another).
    Daemon { pid: Option<u32> },
    /// The machine's initial network namespace, or that of PID 1.
    Initial,
    /// The namespace of the process asking (the runtime's own, for `berth-cni`).
    Caller,
}

impl fmt::Display for HostNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostNamespace::Daemon { pid: Some(pid) } => {
                write!(f, "the berth daemon with pid {pid} runs in it")
            }
            HostNamespace::Daemon { pid: None } => write!(f, "a berth daemon runs in it"),
            HostNamespace::Initial => {
                write!(f, "it is the machine's initial one, or that of PID 1")
            }
            HostNamespace::Caller => write!(f, "it is the namespace of the process asking"),
        }
    }
}

/// The inode of the machine's initial network namespace, fixed by the kernel
/// (`PROC_NET_INIT_INO`): it tells that namespace even where `/proc/1/ns/net` cannot be read
/// (PID 1 in another user namespace, `hidepid`), through any path that leads to it.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// Whether the network namespace open at `ns` (a namespace file, as [`crate::netns::open`]
/// gives) is a host's: one a berth daemon runs in, the machine's initial one or PID 1's, or
/// the caller's own. Moving a container's interface, addresses and default route there would
/// take over that host's networking.
pub fn host_namespace(ns: &File) -> Result<Option<HostNamespace>> {
    let ns = ns
        .metadata()
        .map_err(|e| DataplaneError::io("stat namespace", e))?;
    if let Some(pid) = daemon_in(&ns)? {
        return Ok(Some(HostNamespace::Daemon { pid }));
    }
    let same = |path: &str| namespace_of(Path::new(path)).is_ok_and(|m| same_file(&m, &ns));
    if ns.ino() == INIT_NET_INO || same("/proc/1/ns/net") {
        return Ok(Some(HostNamespace::Initial));
    }
    if same("/proc/thread-self/ns/net") {
        return Ok(Some(HostNamespace::Caller));
    }
    Ok(None)
}

/// `Some(pid)` when a daemon holds the lock of the namespace `ns`, without taking it.
fn daemon_in(ns: &Metadata) -> Result<Option<Option<u32>>> {
    let path = Path::new(LOCK_DIR).join(lock_name(ns));
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataplaneError::io(format!("open {}", path.display()), e)),
    };
    let mut probe = whole_file(libc::F_WRLCK);
    fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| DataplaneError::Kernel {
        op: format!("test the lock of {}", path.display()),
        source: e.into(),
    })?;
    if probe.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(read_pid(&mut file)))
}

/// The lock directory, made root's alone (0700) if it is not already; one that is a symlink
/// or someone else's is refused, as a lock there could be held by its owner.
fn lock_dir() -> Result<PathBuf> {
    let dir = Path::new(LOCK_DIR);
    let io = |what: &str, e| DataplaneError::io(format!("{what} {}", dir.display()), e);
    if let Some(parent) = dir.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| io("create the parent of", e))?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create", e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io("stat", e))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(DataplaneError::io(
            format!("the lock directory {}", dir.display()),
            std::io::Error::other(format!(
                "it must be a directory owned by uid {me}, not a symlink or another user's"
            )),
        ));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", e))?;
    }
    Ok(dir.to_path_buf())
}

fn namespace_of(path: &Path) -> Result<Metadata> {
    std::fs::metadata(path).map_err(|e| DataplaneError::io(format!("stat {}", path.display()), e))
}

fn same_file(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn lock_name(ns: &Metadata) -> String {
    format!("netns-{}-{}", ns.dev(), ns.ino())
}

/// A lock request on the whole file.
fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all zeroes is a valid value;
    // the fields that matter are set below (the others must be zero for OFD locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (a namespace of its own, and the lock directory under /run).
    #[test]
    fn one_daemon_lock_per_namespace_and_it_marks_a_host_namespace() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let own = File::open("/proc/thread-self/ns/net").unwrap();
            assert_eq!(host_namespace(&own).unwrap(), Some(HostNamespace::Caller));
            let Claim::Held(lock) = DaemonLock::claim().unwrap() else {
                panic!("a fresh namespace is free");
            };
            let me = Some(std::process::id());
            assert!(matches!(DaemonLock::claim().unwrap(), Claim::Taken { pid } if pid == me));
            assert_eq!(
                host_namespace(&own).unwrap(),
                Some(HostNamespace::Daemon { pid: me })
            );
            let dir = std::fs::symlink_metadata(LOCK_DIR).unwrap();
            assert_eq!(dir.permissions().mode() & 0o777, 0o700);
            drop(lock);
            assert_eq!(host_namespace(&own).unwrap(), Some(HostNamespace::Caller));
            // A killed daemon's file (no one holds it) goes when the next daemon starts.
            let stale = Path::new(LOCK_DIR).join("netns-0-1");
            std::fs::write(&stale, "1").unwrap();
            let Claim::Held(_again) = DaemonLock::claim().unwrap() else {
                panic!("released on drop");
            };
            assert!(!stale.exists());
        })
        .join()
        .unwrap();
    }

    /// The initial namespace is told by its inode, also where PID 1's cannot be opened.
    #[test]
    fn the_initial_namespace_is_a_host_namespace() {
        let own = File::open("/proc/self/ns/net").unwrap();
        if own.metadata().unwrap().ino() != INIT_NET_INO {
            eprintln!("skipped: the tests do not run in the initial network namespace");
            return;
        }
        let verdict = host_namespace(&own).unwrap();
        assert!(
            matches!(
                verdict,
                Some(HostNamespace::Initial | HostNamespace::Daemon { .. })
            ),
            "{verdict:?}"
        );
    }
}
