//! The kernel switches berth's forwarding relies on, in the calling thread's namespace (a
//! `/proc/sys/net` file acts in the namespace of whoever opens it).

use std::path::Path;

use crate::{DataplaneError, Result};

fn write(path: &str, value: &str) -> Result<()> {
    let current = std::fs::read_to_string(path).map_err(|e| DataplaneError::io(path, e))?;
    if current.trim() == value {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|e| DataplaneError::io(path, e))
}

/// Routes packets between interfaces: IPv4 always, IPv6 when a network has an IPv6 subnet
/// (IPv6 forwarding stops the namespace from accepting router advertisements, so not before).
pub fn enable_forwarding(ipv6: bool) -> Result<()> {
    write("/proc/sys/net/ipv4/ip_forward", "1")?;
    if ipv6 && Path::new("/proc/sys/net/ipv6").exists() {
        write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

/// Lets the bridge carry packets whose source is 127.0.0.1: a port published on the host's
/// loopback address is forwarded into the network with that source before masquerade.
pub fn enable_route_localnet(bridge: &str) -> Result<()> {
    write(
        &format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"),
        "1",
    )
}
