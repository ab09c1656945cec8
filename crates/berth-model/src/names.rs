//! Kernel object names. Everything berth creates is recognisably berth's, so that reconciliation
//! can find what it owns, and remove what the store no longer knows, without touching anything
//! else on the host.

/// Linux limit on interface names (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Bridges: `berth-` and 9 hex digits of the network id.
pub const BRIDGE_PREFIX: &str = "berth-";
/// Host ends of veth pairs: `berth` and 10 hex digits of the endpoint id (no dash, unlike bridges).
pub const VETH_PREFIX: &str = "berth";

/// VXLAN devices of overlay networks: `bvx` and 12 hex digits of the network id.
pub const VXLAN_PREFIX: &str = "bvx";

/// What a detached endpoint's sandbox-side interface is renamed to until it is deleted:
/// `berthx` and 9 hex digits of the endpoint id.
pub const TOMBSTONE_PREFIX: &str = "berthx";

/// `prefix` and as much of `id` as fits in an interface name. By characters, not bytes: an id
/// from a damaged record must not panic the daemon.
fn with_prefix(prefix: &str, id: &str) -> String {
    let take = IFNAME_MAX - prefix.len();
    let mut name = prefix.to_string();
    name.extend(id.chars().take(take));
    name
}

pub fn tombstone_name(endpoint_id: &str) -> String {
    with_prefix(TOMBSTONE_PREFIX, endpoint_id)
}

pub fn bridge_name(network_id: &str) -> String {
    with_prefix(BRIDGE_PREFIX, network_id)
}

pub fn vxlan_name(network_id: &str) -> String {
    with_prefix(VXLAN_PREFIX, network_id)
}

pub fn veth_name(endpoint_id: &str) -> String {
    with_prefix(VETH_PREFIX, endpoint_id)
}

/// Whether a link name is one berth would have made (a bridge, a host-side veth or an overlay
/// network's VXLAN device).
pub fn is_berth_link_name(name: &str) -> bool {
    let hex = match name.strip_prefix(VETH_PREFIX) {
        Some(rest) => rest.strip_prefix('-').unwrap_or(rest),
        None => match name.strip_prefix(VXLAN_PREFIX) {
            Some(rest) => rest,
            None => return false,
        },
    };
    !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_are_recognised() {
        let id = "0123456789abcdef";
        let b = bridge_name(id);
        let v = veth_name(id);
        let x = vxlan_name(id);
        assert_eq!(b, "berth-012345678");
        assert_eq!(v, "berth0123456789");
        assert_eq!(x, "bvx0123456789ab");
        assert!(b.len() <= IFNAME_MAX && v.len() <= IFNAME_MAX && x.len() <= IFNAME_MAX);
        assert!(is_berth_link_name(&b) && is_berth_link_name(&v) && is_berth_link_name(&x));
        for other in [
            "eth0", "berth", "berth-", "berthx1", "docker0", "br-berth", "bvx", "bvx-1", "bvxz",
        ] {
            assert!(!is_berth_link_name(other), "{other}");
        }
    }
}
