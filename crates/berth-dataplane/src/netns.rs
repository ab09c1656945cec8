//! Named network namespaces (berth sandboxes) and references to any namespace by path.

use std::fs::{File, OpenOptions};
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

/// Opens a namespace by path and checks that it is one.
pub fn open(path: &Path) -> Result<File> {
    let f =
        File::open(path).map_err(|e| DataplaneError::io(format!("open {}", path.display()), e))?;
    // nsfs files live on the nsfs filesystem; a plain file would be a mistake (or an unmounted
    // sandbox placeholder) and setns would fail on it later with a less helpful error.
    let st = nix::sys::statfs::fstatfs(&f)
        .map_err(|e| kernel(&format!("statfs {}", path.display()), e))?;
    if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(DataplaneError::io(
            format!("{} is not a network namespace", path.display()),
            std::io::Error::from_raw_os_error(nix::errno::Errno::EINVAL as i32),
        ));
    }
    Ok(f)
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
