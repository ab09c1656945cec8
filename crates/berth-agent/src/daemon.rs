//! `berth daemon`: open the store, repair the kernel, serve the API until SIGTERM. Stopping
//! leaves every container connected: the kernel state is the containers', not the daemon's.

use std::path::PathBuf;
use std::sync::Arc;

use berth_dataplane::Netlink;
use berth_model::FALLBACK_MTU;
use berth_store::{RedbStore, Store};
use tokio::net::UnixListener;

use crate::{Agent, AgentError, Result};

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub netns_dir: PathBuf,
    /// Where to serve Docker's NetworkDriver and IpamDriver plugin API; `None`: not at all.
    pub docker_plugin_socket: Option<PathBuf>,
    /// DNS on every network's gateways; `None`: no DNS.
    pub dns: Option<berth_dns::DnsConfig>,
    /// Where berth sandboxes' resolv.conf files go (`DIR/SANDBOX/resolv.conf`).
    pub sandbox_etc_dir: PathBuf,
}

impl DaemonConfig {
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("berth.sock")
    }
}

pub async fn run(cfg: DaemonConfig) -> Result<()> {
    // Configuration first: a bad option changes nothing, not even the state directory.
    let dns = cfg
        .dns
        .clone()
        .map(berth_dns::Dns::new)
        .transpose()
        .map_err(|e| AgentError::Invalid(e.to_string()))?;
    raise_open_files_limit();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&cfg.state_dir)?);
    for dir in [&cfg.run_dir, &cfg.netns_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    }
    let default_mtu = tokio::task::spawn_blocking(|| Netlink::open()?.default_route_mtu())
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??
        .unwrap_or(FALLBACK_MTU);
    let mut agent = Agent::new(store, cfg.netns_dir.clone(), default_mtu);
    if let Some(dns) = dns {
        agent = agent.with_discovery(crate::Discovery::new(dns, cfg.sandbox_etc_dir.clone()));
    }
    let agent = Arc::new(agent);
    let report = agent.reconcile().await?;
    tracing::info!(?report, "kernel reconciled with the store");
    agent.sync_firewall().await?;
    agent.load_dns().await?;

    let socket = cfg.socket();
    let listener = bind_socket(&socket)?;
    tracing::info!(socket = %socket.display(), mtu = default_mtu, "berth daemon ready");
    tokio::spawn(agent.clone().run_reaper());
    tokio::spawn(agent.clone().run_firewall_guard());
    let docker = match &cfg.docker_plugin_socket {
        Some(path) => {
            let listener = bind_socket(path)?;
            tracing::info!(socket = %path.display(), "Docker plugin API ready");
            let router = crate::docker::router(agent.clone());
            Some(tokio::spawn(
                async move { axum::serve(listener, router).await },
            ))
        }
        None => None,
    };
    let served = axum::serve(listener, crate::api::router(agent))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&socket);
    if let (Some(task), Some(path)) = (docker, &cfg.docker_plugin_socket) {
        task.abort();
        let _ = std::fs::remove_file(path);
    }
    served.map_err(|e| AgentError::Internal(format!("API server: {e}")))?;
    tracing::info!("berth daemon stopped; containers stay connected");
    Ok(())
}

/// Every forwarded DNS query holds a socket while it waits: the soft limit on open files
/// (often 1,024) goes up to the hard one, as Go programs do at start.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Listens on a unix socket, replacing a stale socket file but refusing one a live daemon
/// still serves.
fn bind_socket(path: &std::path::Path) -> Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::Conflict(format!(
            "another daemon is serving on {}",
            path.display()
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
        .map_err(|e| AgentError::Invalid(format!("cannot listen on {}: {e}", path.display())))
}
