//! Everything berth does to the kernel, over netlink, with no helper processes.
//!
//! Calls are synchronous: the agent runs them on blocking threads. A netlink socket acts in the
//! namespace it was created in, so [`Netlink::open_in`] creates sockets for other namespaces on
//! a throwaway thread and hands them back; no thread that outlives the call ever changes
//! namespace.

mod bridge;
pub mod conntrack;
pub mod hostns;
mod netlink;
pub mod netns;
pub mod nftables;
pub mod sockets;
pub mod sysctl;
mod vxlan;

pub use bridge::{
    BridgeSpec, EndpointSpec, REAP_GROUP, Repair, SandboxLinkState, attach_endpoint,
    create_runtime_endpoint, delete_link, ensure_bridge, ensure_endpoint, reap, retire_endpoint,
    sandbox_state,
};
pub use netlink::{LINK_MARK, Link, LinkEvent, LinkRef, LinkWatch, Netlink, ROUTE_PROTOCOL, Route};
pub use vxlan::{
    RemoteEntry, Remotes, VXLAN_OVERHEAD, VXLAN_PORT, VxlanSpec, add_remote, delete_vxlan,
    ensure_vxlan, remotes, remove_remote, sync_remotes,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataplaneError {
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected netlink reply: {0}")]
    Protocol(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A path given as a network namespace is something else: a caller's mistake, not a
    /// kernel failure (the agent answers it with a 400).
    #[error("{path} is not a network namespace: {why}")]
    NotNetns { path: String, why: String },
}

impl DataplaneError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Kernel { source, .. } | DataplaneError::Io { source, .. } => {
                source.raw_os_error()
            }
            DataplaneError::Protocol(_) | DataplaneError::NotNetns { .. } => None,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DataplaneError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;
