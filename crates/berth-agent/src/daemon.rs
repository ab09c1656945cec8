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

use crate::hosts::{HostIdentity, HostLease, default_host_id};
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
    let (store, lease_store): (Arc<dyn Store>, LeaseStore) = match &cfg.store {
        StoreConfig::Embedded => {
            let store: Arc<dyn Store> = Arc::new(RedbStore::open(&cfg.state_dir)?);
            (store.clone(), LeaseStore::Same(store))
        }
        StoreConfig::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            let etcd = Etcd {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                tls: tls.clone(),
                host_id: host_id.clone(),
            };
            (etcd.open().await?, LeaseStore::Own(etcd))
        }
    };
    let shared = matches!(lease_store, LeaseStore::Own(_));
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
        let lease = LeaseKeeper::start(agent.host_lease(cfg.host_lease_ttl), lease_store).await?;
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
        Ok((lease, policy_watches))
    };
    let (_lease, policy_watches) = match prepared.await {
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

/// How this host reaches etcd.
struct Etcd {
    endpoints: Vec<String>,
    prefix: String,
    tls: Option<TlsFiles>,
    host_id: String,
}

impl Etcd {
    /// A client of its own (its connection's tasks run on the calling runtime), scoped to
    /// this host.
    async fn open(&self) -> Result<Arc<dyn Store>> {
        let etcd = EtcdStore::connect(&self.endpoints, &self.prefix, self.tls.clone()).await?;
        Ok(Arc::new(HostScoped::new(Arc::new(etcd), &self.host_id)))
    }
}

/// The store the host lease is kept in.
enum LeaseStore {
    /// The daemon's own (embedded) store: its renewals are memory only, nothing to wait on.
    Same(Arc<dyn Store>),
    /// A connection of its own to etcd: renewals do not queue behind the daemon's lists,
    /// watches and transactions on one HTTP/2 connection.
    Own(Etcd),
}

/// This host's registration, kept on a thread of its own with a runtime and store client of
/// its own: no task, lock, kernel call or big store request of the daemon's can hold a
/// renewal back. Dropping it stops renewing without revoking the lease: a daemon restarted
/// within the TTL is never seen gone.
struct LeaseKeeper {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Registers this host (see [`HostLease::register_at_start`]) and keeps it registered;
    /// returns once it is registered.
    async fn start(lease: HostLease, store: LeaseStore) -> Result<LeaseKeeper> {
        use tokio::sync::oneshot;
        let (registered_tx, registered_rx) = oneshot::channel::<Result<()>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let run = move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let why = format!("cannot start the host lease's runtime: {e}");
                    let _ = registered_tx.send(Err(AgentError::Internal(why)));
                    return;
                }
            };
            runtime.block_on(async move {
                let keep = async {
                    // Made on this runtime: its connection's tasks run here too.
                    let store = match store {
                        LeaseStore::Same(s) => s,
                        LeaseStore::Own(etcd) => match etcd.open().await {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = registered_tx.send(Err(e));
                                return;
                            }
                        },
                    };
                    match lease.register_at_start(&*store).await {
                        Ok(id) => {
                            let _ = registered_tx.send(Ok(()));
                            lease.keep(&*store, id).await;
                        }
                        Err(e) => {
                            let _ = registered_tx.send(Err(e));
                        }
                    }
                };
                tokio::select! {
                    _ = keep => {}
                    _ = stop_rx => {}
                }
            });
        };
        let thread = std::thread::Builder::new()
            .name("berth-lease".into())
            .spawn(run)
            .map_err(|e| {
                AgentError::Internal(format!("cannot start the host lease thread: {e}"))
            })?;
        let keeper = LeaseKeeper {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match registered_rx.await {
            Ok(registered) => registered.map(|()| keeper),
            Err(_) => Err(AgentError::Internal("the host lease thread ended".into())),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's runtime blocked for several TTLs (one thread, stuck in a blocking call):
    /// the lease is renewed all along, never lapsing or replaced.
    #[test]
    fn the_lease_is_kept_while_the_daemons_runtime_is_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
        let agent = Agent::new(store.clone(), dir.path().join("netns"), 1500).with_host(
            HostIdentity {
                id: "h1".into(),
                address: Some("198.51.100.11".parse().unwrap()),
                mtu: 1500,
            },
            true,
        );
        let ttl = Duration::from_millis(1500);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let _keeper =
                LeaseKeeper::start(agent.host_lease(ttl), LeaseStore::Same(store.clone()))
                    .await
                    .unwrap();
            let lease = store.get("hosts/h1").await.unwrap().unwrap().lease;
            assert!(lease.is_some());
            std::thread::sleep(ttl * 3);
            let after = store.get("hosts/h1").await.unwrap();
            assert_eq!(
                after.and_then(|kv| kv.lease),
                lease,
                "the registration lapsed while the daemon's runtime was blocked"
            );
        });
    }
}
