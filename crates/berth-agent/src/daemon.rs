//! `berth daemon`: open the store, repair the kernel, serve the API until SIGTERM. Stopping
//! leaves every container connected: the kernel state is the containers', not the daemon's.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_dataplane::{Netlink, hostns};
use berth_model::FALLBACK_MTU;
pub use berth_store::{ClientCert, TlsFiles};
use berth_store::{EtcdStore, RedbStore, Store};
use tokio::net::UnixListener;

use crate::hosts::{HostIdentity, HostLease, default_host_id};
use crate::overlay::{ClusterReconciler, Kernel};
use crate::scope::HostScoped;
use crate::serve::{Access, Dialect};
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
    /// `--socket-group`: the group whose members may use the API and Docker plugin sockets
    /// beside root; `None`: root only.
    pub socket_group: Option<String>,
    /// How long an API or plugin client may take (see [`crate::serve::CLIENT_TIMEOUT`]).
    pub client_timeout: Duration,
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
    // Nothing the daemon makes is writable by others, whatever umask it was started with;
    // what is private (the state, the sockets) is made so explicitly.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    // Configuration first: a bad option changes nothing, not even the state directory.
    let dns = cfg
        .dns
        .clone()
        .map(berth_dns::Dns::new)
        .transpose()
        .map_err(|e| AgentError::Invalid(e.to_string()))?;
    let access = Access {
        group: cfg.socket_group.as_deref().map(socket_group).transpose()?,
    };
    // Before anything else: a second daemon in this namespace must not touch the first one's
    // kernel state (its repair pass would take the first's links for strays).
    let _only_daemon = claim_network_namespace()?;
    let (api_cap, docker_cap) = crate::serve::connection_caps(raise_open_files_limit());
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
    std::fs::create_dir_all(&cfg.netns_dir).map_err(|e| {
        AgentError::Invalid(format!("cannot create {}: {e}", cfg.netns_dir.display()))
    })?;
    make_run_dir(&cfg.run_dir, &access)?;
    // The sockets too before the repair pass: a daemon that cannot serve changes nothing.
    // Clients that connect meanwhile wait in the backlog until the repair is done.
    let socket = cfg.socket();
    let listener = bind_socket(&socket, &access)?;
    let docker_listener = match &cfg.docker_plugin_socket {
        Some(path) => match bind_socket(path, &access) {
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
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let docker = docker_listener.map(|(listener, path)| {
        tracing::info!(
            socket = %path.display(), max_connections = docker_cap, "Docker plugin API ready"
        );
        let served = crate::serve::Socket {
            what: "the berth Docker plugin",
            dialect: Dialect::DockerPlugin,
            access: access.clone(),
            max_connections: docker_cap,
            client_timeout: cfg.client_timeout,
        };
        tokio::spawn(crate::serve::serve(
            listener,
            crate::docker::router(agent.clone()),
            served,
            stopping.clone(),
        ))
    });
    tracing::info!(
        max_connections = api_cap, client_timeout = ?cfg.client_timeout,
        group = ?cfg.socket_group, "API ready"
    );
    let api = crate::serve::Socket {
        what: "the berth API",
        dialect: Dialect::Api,
        access,
        max_connections: api_cap,
        client_timeout: cfg.client_timeout,
    };
    let api = tokio::spawn(crate::serve::serve(
        listener,
        crate::api::router(agent),
        api,
        stopping,
    ));
    shutdown_signal().await;
    let _ = stop.send(true);
    let _ = api.await;
    if let Some(docker) = docker {
        let _ = docker.await;
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(path) = &cfg.docker_plugin_socket {
        let _ = std::fs::remove_file(path);
    }
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
/// (often 1,024) goes up to the hard one, as Go programs do at start. Returns the limit in
/// force, which the API's connection caps are made from.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit; assuming 1024");
            1024
        }
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

/// Makes sure this is the only berth daemon in the calling thread's network namespace, for
/// as long as the returned lock lives (see [`hostns`]: a lock only root can hold). The error
/// names the daemon that runs (by pid).
fn claim_network_namespace() -> Result<hostns::DaemonLock> {
    match hostns::DaemonLock::claim()? {
        hostns::Claim::Held(lock) => Ok(lock),
        hostns::Claim::Taken { pid } => {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            Err(AgentError::Conflict(format!(
                "another berth daemon{who} is running in this network namespace; not starting"
            )))
        }
    }
}

/// `--socket-group NAME`: its id and name.
fn socket_group(name: &str) -> Result<(u32, String)> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok((g.gid.as_raw(), g.name)),
        Ok(None) => Err(AgentError::Invalid(format!(
            "invalid --socket-group {name:?}: no such group"
        ))),
        Err(e) => Err(AgentError::Invalid(format!(
            "cannot look up --socket-group {name:?}: {e}"
        ))),
    }
}

/// The run directory, root's alone (0700) or, with a socket group, searchable by that group
/// (0710), so that only those who may use the API reach its socket.
fn make_run_dir(dir: &std::path::Path, access: &Access) -> Result<()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        AgentError::Invalid(format!("cannot {what} {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("create", &e))?;
    let mode = match &access.group {
        Some((gid, _)) => {
            nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(*gid)))
                .map_err(|e| fail("chown", &e))?;
            0o710
        }
        None => 0o700,
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail("chmod", &e))
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
/// still serves. The socket is root's (0600), or its group's too (0660); whoever connects in
/// the moment before the mode is set is still checked by its credentials.
fn bind_socket(path: &std::path::Path, access: &Access) -> Result<UnixListener> {
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
    let listener = UnixListener::bind(path)
        .map_err(|e| AgentError::Invalid(format!("cannot listen on {}: {e}", path.display())))?;
    let restrict = || -> std::result::Result<(), String> {
        let mode = match &access.group {
            Some((gid, _)) => {
                nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(*gid)))
                    .map_err(|e| format!("chown: {e}"))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod: {e}"))
    };
    if let Err(e) = restrict() {
        let _ = std::fs::remove_file(path);
        return Err(AgentError::Invalid(format!(
            "cannot restrict {}: {e}",
            path.display()
        )));
    }
    Ok(listener)
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
