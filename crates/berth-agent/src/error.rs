use berth_dataplane::DataplaneError;
use berth_ipam::IpamError;
use berth_model::ModelError;
use berth_store::StoreError;

/// Every failure of an agent operation. The variant decides the HTTP status; the message is the
/// one line the user sees, so it names the object and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kernel: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("corrupt record {key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("internal: {0}")]
    Internal(String),
}

impl AgentError {
    pub fn http_status(&self) -> u16 {
        match self {
            AgentError::Invalid(_)
            | AgentError::Model(_)
            | AgentError::Dataplane(DataplaneError::NotNetns { .. }) => 400,
            AgentError::Ipam(IpamError::OutsideSubnet { .. } | IpamError::Reserved { .. }) => 400,
            AgentError::NotFound(_) => 404,
            AgentError::Conflict(_) | AgentError::Ipam(_) => 409,
            // The store (etcd) cannot be reached: try again later. Clients map this to their
            // protocol's "try again" (CNI code 11).
            AgentError::Store(StoreError::Unavailable(_)) => 503,
            _ => 500,
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;
