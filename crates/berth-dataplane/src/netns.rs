//! Named network namespaces (berth sandboxes) and references to any namespace by path.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

use crate::{DataplaneError, Netlink, Result};

/// Creates a new network namespace, kept alive by a bind mount at `path` (as `ip netns add`
/// does), with `lo` up. The namespace is made on a throwaway thread: `unshare` changes only the
/// calling thread, and that thread must not go back to serving other work.
pub fn create(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|e| DataplaneError::io(format!("create {}", path.display()), e))?;
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| kernel("unshare network namespace", e))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| kernel(&format!("bind-mount namespace at {}", path.display()), e))?;
            let mut nl = Netlink::open()?;
            let lo = nl
                .link_by_name("lo")?
                .ok_or_else(|| DataplaneError::Protocol("new namespace has no lo".into()))?;
            nl.set_link(lo.index, lo.mtu, None)
        })
        .join()
        .unwrap_or_else(|_| Err(DataplaneError::Protocol("netns thread panicked".into())))
    });
    if result.is_err() {
        let _ = remove(path);
    }
    result
}

/// Unmounts and deletes a namespace created by [`create`]. Missing is fine: removal is
/// idempotent so that a retried or repeated cleanup succeeds.
pub fn remove(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(kernel(&format!("unmount {}", path.display()), e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::io(format!("remove {}", path.display()), e)),
    }
}

/// Opens a namespace by path and checks that it is a network namespace.
///
/// Anything else is refused here with [`DataplaneError::NotNetns`], before any kernel work:
/// `setns` on a mount or PID namespace, or on a plain file, would fail later with an error
/// that says nothing about the path the user gave.
pub fn open(path: &Path) -> Result<File> {
    let not_netns = |why: &str| DataplaneError::NotNetns {
        path: path.display().to_string(),
        why: why.to_string(),
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_netns("no such file"));
        }
        Err(e) => return Err(DataplaneError::io(format!("open {}", path.display()), e)),
    };
    // nsfs files live on the nsfs filesystem; a plain file would be a mistake (or an unmounted
    // sandbox placeholder).
    let st = nix::sys::statfs::fstatfs(&f)
        .map_err(|e| kernel(&format!("statfs {}", path.display()), e))?;
    if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        let kind = match f.metadata() {
            Ok(m) if m.is_dir() => "it is a directory",
            Ok(m) if m.is_file() => "it is a regular file",
            _ => "it is not a namespace file",
        };
        return Err(not_netns(kind));
    }
    match nstype(&f) {
        Ok(t) if t == CloneFlags::CLONE_NEWNET.bits() => Ok(f),
        Ok(t) => Err(not_netns(&format!("it is a {} namespace", nstype_name(t)))),
        Err(e) => Err(kernel(&format!("namespace type of {}", path.display()), e)),
    }
}

/// The `CLONE_NEW*` flag of the namespace `f` refers to (`NS_GET_NSTYPE`, Linux 4.11).
fn nstype(f: &File) -> std::result::Result<i32, nix::errno::Errno> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the namespace the descriptor
    // refers to; the descriptor is valid for the duration of the call because `f` is borrowed.
    let t = unsafe { nix::libc::ioctl(f.as_raw_fd(), nix::libc::NS_GET_NSTYPE) };
    nix::errno::Errno::result(t)
}

/// A person's name for a `CLONE_NEW*` namespace type.
fn nstype_name(t: i32) -> &'static str {
    let flags = CloneFlags::from_bits_truncate(t);
    [
        (CloneFlags::CLONE_NEWNS, "mount"),
        (CloneFlags::CLONE_NEWUTS, "UTS"),
        (CloneFlags::CLONE_NEWIPC, "IPC"),
        (CloneFlags::CLONE_NEWUSER, "user"),
        (CloneFlags::CLONE_NEWPID, "PID"),
        (CloneFlags::CLONE_NEWCGROUP, "cgroup"),
    ]
    .into_iter()
    .find(|(f, _)| flags == *f)
    .map_or("non-network", |(_, n)| n)
}

/// The identity of an open namespace: `dev:inode` of its nsfs file.
pub fn id_of(f: &File) -> Result<String> {
    let m = f
        .metadata()
        .map_err(|e| DataplaneError::io("stat namespace", e))?;
    Ok(format!("{}:{}", m.dev(), m.ino()))
}

/// The identity of the namespace at `path`, or `None` if nothing (or no namespace) is there now.
pub fn id_at(path: &Path) -> Option<String> {
    open(path).ok().and_then(|f| id_of(&f).ok())
}

/// Lazily unmounts every mount at or below `dir`, deepest first: what a container runtime
/// run under `dir` (its namespaces, rootfs, shm) may leave behind. Best effort, for cleanup.
pub fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<&Path> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(Path::new)
        .filter(|m| m.starts_with(dir))
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in ours {
        let _ = umount2(m, MntFlags::MNT_DETACH);
    }
}

fn kernel(op: &str, e: nix::errno::Errno) -> DataplaneError {
    DataplaneError::Kernel {
        op: op.to_string(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs no privileges: any process may open its own namespace files.
    #[test]
    fn open_accepts_only_network_namespaces() {
        assert!(open(Path::new("/proc/self/ns/net")).is_ok());
        let dir = std::env::temp_dir();
        let file = dir.join(format!("berth-netns-test-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let cases = [
            ("/proc/self/ns/mnt".into(), "it is a mount namespace"),
            ("/proc/self/ns/uts".into(), "it is a UTS namespace"),
            (dir.clone(), "it is a directory"),
            (file.clone(), "it is a regular file"),
            (dir.join("berth-no-such-netns"), "no such file"),
        ];
        for (path, why) in cases {
            match open(&path) {
                Err(DataplaneError::NotNetns { why: got, .. }) => assert_eq!(got, why, "{path:?}"),
                other => panic!("{path:?}: {other:?}"),
            }
        }
        let _ = std::fs::remove_file(&file);
    }
}
