//! `berth daemon`: open the store, repair the kernel, serve the API until SIGTERM. Stopping
//! leaves every container connected: the kernel state is the containers', not the daemon's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_dataplane::Netlink;
use berth_model::FALLBACK_MTU;
pub use berth_store::{ClientCert, TlsFiles};
use berth_store::{EtcdStore, RedbStore, Store};
use tokio::net::UnixListener;

use crate::hosts::{HostIdentity, default_host_id};
use crate::overlay::{ClusterReconciler, Kernel};
use crate::scope::HostScoped;
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
    /// How long a Docker endpoint must look dead before berth releases it.
    pub docker_endpoint_grace: std::time::Duration,
    pub store: StoreConfig,
    /// This host's id in the cluster; `None`: from /etc/machine-id.
    pub host_id: Option<String>,
    /// Where other hosts send this host's overlay traffic; `None`: the address of the
    /// default-route interface.
    pub advertise_address: Option<std::net::IpAddr>,
    /// The lease this host registers under: other hosts take it for gone this long after
    /// it stopped renewing.
    pub host_lease_ttl: Duration,
    /// How long a gone host's addresses and blocks stay reserved for it.
    pub host_gone_grace: Duration,
    /// `--service-cidr`: where service VIPs come from; empty: the cluster's (or the
    /// defaults, for the first daemon).
    pub service_cidrs: Vec<ipnet::IpNet>,
}

/// Where the desired state lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded store in the state directory: one host, nothing else to run.
    Embedded,
    /// etcd, shared by every host of the cluster.
    Etcd {
        /// `HOST:PORT` each (or `http://`, `https://` URLs).
        endpoints: Vec<String>,
        prefix: String,
        tls: Option<TlsFiles>,
    },
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
    // Before anything else: a second daemon in this namespace must not touch the first one's
    // kernel state (its repair pass would take the first's links for strays).
    let _only_daemon = claim_network_namespace()?;
    raise_open_files_limit();
    let host_id = match &cfg.host_id {
        Some(id) => id.clone(),
        None => default_host_id()
            .map_err(|e| AgentError::Invalid(format!("cannot derive a host id: {e}")))?,
    };
    berth_model::validate_name("host", &host_id)?;
    let (store, shared): (Arc<dyn Store>, bool) = match &cfg.store {
        StoreConfig::Embedded => (Arc::new(RedbStore::open(&cfg.state_dir)?), false),
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            let etcd = EtcdStore::connect(endpoints, prefix, tls.clone()).await?;
            (Arc::new(HostScoped::new(Arc::new(etcd), &host_id)), true)
        }
    };
    for dir in [&cfg.run_dir, &cfg.netns_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    }
    // The sockets too before the repair pass: a daemon that cannot serve changes nothing.
    // Clients that connect meanwhile wait in the backlog until the repair is done.
    let socket = cfg.socket();
    let listener = bind_socket(&socket)?;
    let docker_listener = match &cfg.docker_plugin_socket {
        Some(path) => match bind_socket(path) {
            Ok(l) => Some((l, path.clone())),
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        },
        None => None,
    };
    let default_mtu = tokio::task::spawn_blocking(|| Netlink::open()?.default_route_mtu())
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??
        .unwrap_or(FALLBACK_MTU);
    let address = match cfg.advertise_address {
        Some(a) => Some(a),
        None => tokio::task::spawn_blocking(default_route_address)
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))??,
    };
    let host = HostIdentity {
        id: host_id,
        address,
        mtu: default_mtu,
    };
    let service_cidrs =
        match crate::services::agree_on_service_cidrs(&*store, &cfg.service_cidrs).await {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        };
    let mut agent = Agent::new(store, cfg.netns_dir.clone(), default_mtu)
        .with_host(host.clone(), shared)
        .with_service_cidrs(service_cidrs);
    if let Some(dns) = dns {
        agent = agent.with_discovery(crate::Discovery::new(dns, cfg.sandbox_etc_dir.clone()));
    }
    let agent = Arc::new(agent);
    let overlay_events = agent
        .take_overlay_events()
        .ok_or_else(|| AgentError::Internal("overlay events taken twice".into()))?;
    let prepared = async {
        // Registered before the repair pass, and kept alive during it (it may take longer
        // than the lease): other hosts point at this one again at once.
        let lease = agent.register_host_at_start(cfg.host_lease_ttl).await?;
        tokio::spawn(agent.clone().run_host_lease(cfg.host_lease_ttl, lease));
        let report = agent.reconcile().await?;
        tracing::info!("{report}");
        agent.restore_firewall().await?;
        if !std::path::Path::new("/proc/sys/net/bridge").exists() {
            tracing::warn!(
                "the kernel module br_netfilter is not loaded: traffic between endpoints of one \
                 bridge passes no policy and no service VIP of the same bridge; `modprobe br_netfilter`"
            );
        }
        // Policies are enforced before the first request: the kernel goes from the elements
        // it kept over the restart to the store's in one transaction.
        let policy_watches = agent.list_policies().await?;
        agent.load_dns().await?;
        Ok(policy_watches)
    };
    let policy_watches = match prepared.await {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            if let Some((_, path)) = &docker_listener {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };

    tracing::info!(
        socket = %socket.display(), mtu = default_mtu, host = %host.id,
        address = ?host.address, store = %agent.status_store(), "berth daemon ready"
    );
    if shared {
        // Only other hosts can be gone: on its own store a host has nothing to collect.
        tokio::spawn(
            agent
                .clone()
                .run_host_collector(cfg.host_lease_ttl, cfg.host_gone_grace),
        );
    }
    tokio::spawn(ClusterReconciler::new(agent.clone(), Arc::new(Kernel)).run(overlay_events));
    tokio::spawn(agent.clone().run_service_reconciler());
    tokio::spawn(agent.clone().run_policy_reconciler(policy_watches));
    tokio::spawn(agent.clone().run_reaper());
    tokio::spawn(
        agent
            .clone()
            .run_docker_endpoint_sweep(cfg.docker_endpoint_grace),
    );
    tokio::spawn(agent.clone().run_firewall_guard());
    tokio::spawn(agent.clone().run_link_watch());
    let docker = match docker_listener {
        Some((listener, path)) => {
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

/// The first address of the interface the default route goes out of (IPv4 first).
fn default_route_address() -> Result<Option<std::net::IpAddr>> {
    let mut nl = Netlink::open()?;
    let Some(oif) = nl.default_routes()?.into_iter().find_map(|(_, oif)| oif) else {
        return Ok(None);
    };
    let mut addrs: Vec<std::net::IpAddr> = nl
        .addresses(oif)?
        .into_iter()
        .map(|a| a.addr())
        .filter(|a| !a.is_loopback() && !is_link_local(a))
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    Ok(addrs.into_iter().next())
}

fn is_link_local(a: &std::net::IpAddr) -> bool {
    match a {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
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

/// The name of the abstract unix socket a daemon holds while it runs. Abstract socket names
/// belong to a network namespace, and the kernel frees the name when the process dies: at most
/// one berth daemon per network namespace, whatever its directories, and no stale lock.
const DAEMON_LOCK_NAME: &[u8] = b"berth-daemon";

/// Makes sure this is the only berth daemon in the calling process's network namespace, for as
/// long as the returned socket lives. The error names the daemon that runs (by pid).
fn claim_network_namespace() -> Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    let name = SocketAddr::from_abstract_name(DAEMON_LOCK_NAME)
        .map_err(|e| AgentError::Internal(format!("abstract socket name: {e}")))?;
    match UnixListener::bind_addr(&name) {
        Ok(l) => {
            // Refused daemons connect to learn the holder's pid: take those connections off
            // the backlog, so a full backlog never blocks a connect.
            let acceptor = l
                .try_clone()
                .map_err(|e| AgentError::Internal(format!("daemon lock socket: {e}")))?;
            std::thread::Builder::new()
                .name("berth-lock".into())
                .spawn(move || {
                    for conn in acceptor.incoming() {
                        drop(conn);
                    }
                })
                .map_err(|e| AgentError::Internal(format!("daemon lock thread: {e}")))?;
            Ok(l)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let pid = UnixStream::connect_addr(&name).ok().and_then(|s| {
                nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.pid())
            });
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            Err(AgentError::Conflict(format!(
                "another berth daemon{who} is running in this network namespace; not starting"
            )))
        }
        Err(e) => Err(AgentError::Internal(format!(
            "cannot hold the daemon lock socket: {e}"
        ))),
    }
}

/// Where Docker looks for plugins: `/run/docker/plugins/NAME.sock`.
pub const DOCKER_PLUGIN_SOCKET: &str = "/run/docker/plugins/berth.sock";

/// The Docker plugin socket when none is given: Docker's plugin directory for a daemon in the
/// machine's own network namespace (that of PID 1), none for one in a private namespace (a
/// test host, a second daemon), so side-by-side daemons never fight over it.
pub fn default_docker_plugin_socket() -> Option<PathBuf> {
    let ns = |p: &str| {
        std::fs::metadata(p).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
    };
    match (ns("/proc/self/ns/net"), ns("/proc/1/ns/net")) {
        (Some(own), Some(init)) if own == init => Some(PathBuf::from(DOCKER_PLUGIN_SOCKET)),
        (Some(_), Some(_)) => None,
        _ => {
            // PID 1's namespace cannot be read (hidepid, a sandbox): serving Docker's plugin
            // directory from what may be a private namespace would take it from the
            // machine's daemon, so not without being asked.
            tracing::warn!(
                "cannot tell whether this is the machine's own network namespace (/proc/1/ns/net \
                 unreadable): no Docker plugin unless --docker-plugin-socket is given"
            );
            None
        }
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
