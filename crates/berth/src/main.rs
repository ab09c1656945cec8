//! `berth`: the CLI (a client of the daemon's API and nothing more) and `berth daemon`.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use berth_api::{
    Allocation, Attach, CheckReport, Client, CreateNetwork, CreateSandbox, CreateService,
    DEFAULT_SOCKET, Detach, Endpoint, HostView, NamedPort, Network, PortMapping, Sandbox, Service,
    Status,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

/// `println!` for the CLI's output: when stdout is a pipe whose reader has gone (`berth ... |
/// head -1`), the process ends quietly with status 0, as Unix tools do, instead of panicking.
/// SIGPIPE itself stays ignored (Rust's default): the CLI also writes to the daemon's socket,
/// where a closed connection must be an error message, not a silent death.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::emit(format_args!($($arg)*))
    };
}

// After `say!`, which it uses.
mod policy;

fn emit(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("berth: error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Container networking: networks, sandboxes, endpoints, services."
)]
struct Cli {
    /// The daemon's API socket (client commands).
    #[arg(long, env = "BERTH_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format of client commands.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// `--socket` and `-o` after a client command (`berth network ls -o json`): the same flags as
/// before the command, which they override. Kept off `daemon`, which has no use for them.
#[derive(Args, Clone, Default)]
struct ClientOpts {
    /// The daemon's API socket [env: BERTH_SOCKET; default: /run/berth/berth.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Output format [default: table].
    #[arg(short = 'o', long = "output", global = true, value_enum)]
    output: Option<Output>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, for scripts.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-host agent in the foreground.
    Daemon(DaemonArgs),
    /// Manage networks.
    Network {
        #[command(subcommand)]
        cmd: NetworkCmd,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Manage sandboxes (named network namespaces made by berth).
    Sandbox {
        #[command(subcommand)]
        cmd: SandboxCmd,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Attach a sandbox (name or network-namespace path) to a network.
    Attach(AttachArgs),
    /// Detach a sandbox from a network.
    Detach {
        /// The sandbox name or network-namespace path.
        sandbox: String,
        /// The network to leave.
        #[arg(long)]
        network: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Inspect, check and remove endpoints.
    Endpoint {
        #[command(subcommand)]
        cmd: EndpointCmd,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Daemon health and counts.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// The hosts of the cluster.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Manage services: virtual IPs load-balanced over a network's endpoints that match a
    /// label selector.
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Manage network policies: which endpoints may talk to which, by labels (Kubernetes
    /// NetworkPolicy's meaning).
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// List the hosts: up (lease alive; LAST SEEN is its last renewal) and gone (records kept
    /// for the grace period; LAST SEEN is when the lapse was first noticed).
    Ls,
    /// Free a gone host's endpoints, addresses and blocks now.
    Rm {
        /// The host's id.
        id: String,
    },
}

impl Command {
    /// The client flags given after the command; `None` for `daemon`.
    fn client_opts(&self) -> Option<&ClientOpts> {
        match self {
            Command::Daemon(_) => None,
            Command::Network { opts, .. }
            | Command::Sandbox { opts, .. }
            | Command::Detach { opts, .. }
            | Command::Endpoint { opts, .. }
            | Command::Host { opts, .. }
            | Command::Service { opts, .. }
            | Command::Policy { opts, .. }
            | Command::Status { opts } => Some(opts),
            Command::Attach(a) => Some(&a.opts),
        }
    }
}

#[derive(Args)]
struct DaemonArgs {
    /// Where the embedded store lives.
    #[arg(long, default_value = "/var/lib/berth")]
    state_dir: PathBuf,
    /// Runtime files; the API socket is <run-dir>/berth.sock.
    #[arg(long, default_value = "/run/berth")]
    run_dir: PathBuf,
    /// Where sandboxes are bind-mounted (as `ip netns` does).
    #[arg(long, default_value = "/run/netns")]
    netns_dir: PathBuf,
    /// Docker plugin socket (NetworkDriver and IpamDriver); empty: no Docker plugin.
    /// Default: /run/docker/plugins/berth.sock in the machine's own network namespace,
    /// none in a private one.
    #[arg(long)]
    docker_plugin_socket: Option<std::ffi::OsString>,
    /// DNS port on every network's gateway addresses; 0: no DNS.
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Qualified names are NAME.NETWORK.<suffix>.
    #[arg(long, default_value = berth_dns::DEFAULT_SUFFIX)]
    dns_suffix: String,
    /// Names berth does not know are forwarded to this file's nameservers (re-read on change).
    #[arg(long, default_value = "/etc/resolv.conf")]
    dns_resolv_conf: PathBuf,
    /// DNS queries a second each client gets answered (as many at once); as many again are
    /// refused, the rest dropped. A client is an endpoint's address; all other source
    /// addresses together count as one.
    #[arg(long, default_value_t = berth_dns::DEFAULT_CLIENT_QPS)]
    dns_client_qps: u32,
    /// Sandboxes' resolv.conf go to <dir>/<sandbox>/resolv.conf, where `ip netns exec` finds them.
    #[arg(long, default_value = "/etc/netns")]
    sandbox_etc_dir: PathBuf,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: tracing::Level,
    /// Seconds a Docker endpoint must look dead (container gone, engine not asking) before
    /// berth releases it; for tests.
    #[arg(long, hide = true, default_value_t = berth_agent::docker::DOCKER_ENDPOINT_GRACE.as_secs())]
    docker_endpoint_grace: u64,
    /// The desired-state store: `embedded` (one host, in --state-dir) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (shared by every host of a cluster).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// The key prefix of berth's records in etcd (several clusters can share one etcd).
    #[arg(long, default_value = "/berth/")]
    etcd_prefix: String,
    /// etcd over TLS: the CA that signed etcd's certificate (PEM). Alone: server-only TLS;
    /// with --etcd-cert and --etcd-key, for an etcd that asks for client certificates.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// This host's client certificate for etcd (PEM); needs --etcd-key and --etcd-ca.
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// This host's id in the cluster (letters, digits, '-', '_', '.'); default: from /etc/machine-id.
    #[arg(long)]
    host_id: Option<String>,
    /// The underlay address other hosts send overlay traffic to; default: the address of the
    /// default-route interface.
    #[arg(long)]
    advertise_address: Option<std::net::IpAddr>,
    /// Seconds of the lease this host registers under: other hosts take it for gone this long
    /// after its daemon stopped renewing it.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    host_lease_ttl: u64,
    /// Seconds a gone host's addresses and blocks stay reserved for it, and other hosts keep
    /// forwarding to its containers, before any host frees them (`berth host rm` frees them
    /// at once).
    #[arg(long, default_value_t = 600)]
    host_gone_grace: u64,
    /// The range service VIPs come from, e.g. `--service-cidr 10.96.0.0/16`; repeat for IPv6
    /// (at most one range per family). It must be the same on every host of the cluster.
    /// Default: 10.211.0.0/16 and fd00:b5:5e7::/112, or the ranges the cluster already uses.
    #[arg(long = "service-cidr", value_name = "CIDR", value_parser = parse_service_cidr_arg)]
    service_cidrs: Vec<String>,
    /// The group whose members may use the API and Docker plugin sockets beside root (the
    /// sockets become 0660 and the run directory 0710, owned by that group). Default: root
    /// only.
    #[arg(long, value_name = "NAME")]
    socket_group: Option<String>,
    /// Milliseconds an API or plugin client may take to send a request head (or stay idle
    /// between requests), to send its body, or to read on; for tests.
    #[arg(long, hide = true, default_value_t = berth_agent::serve::CLIENT_TIMEOUT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    client_timeout_ms: u64,
}

/// `--service-cidr`: a range with no special meaning (not loopback, link-local, multicast...),
/// in canonical form; returned as text, re-parsed by [`daemon`].
fn parse_service_cidr_arg(s: &str) -> Result<String, String> {
    berth_api::parse_subnet(s)
        .map(|net| net.to_string())
        .map_err(|e| e.to_string())
}

/// `--store`: embedded or etcd://endpoints, and etcd's TLS flags, which make sense only
/// together: every combination that cannot work is refused here, naming the flag to fix.
fn store_config(args: &DaemonArgs) -> anyhow::Result<berth_agent::daemon::StoreConfig> {
    use berth_agent::daemon::{ClientCert, StoreConfig, TlsFiles};
    let tls_flags: Vec<&str> = [
        ("--etcd-ca", args.etcd_ca.is_some()),
        ("--etcd-cert", args.etcd_cert.is_some()),
        ("--etcd-key", args.etcd_key.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect();
    if args.store == "embedded" {
        if !tls_flags.is_empty() {
            bail!(
                "{} {} only to --store etcd://HOST:PORT: the embedded store does not use TLS",
                tls_flags.join(", "),
                if tls_flags.len() == 1 {
                    "applies"
                } else {
                    "apply"
                }
            );
        }
        return Ok(StoreConfig::Embedded);
    }
    let Some(list) = args.store.strip_prefix("etcd://") else {
        if let Some((scheme @ ("http" | "https"), _)) = args.store.split_once("://") {
            let hosts: Vec<&str> = args
                .store
                .split(',')
                .map(|e| e.trim().split_once("://").map_or(e, |(_, hp)| hp))
                .collect();
            let tls = if scheme == "https" {
                " with --etcd-ca FILE (the CA of etcd's certificate) for TLS"
            } else {
                ""
            };
            bail!(
                "invalid --store {:?}: write etcd://{}{tls}",
                args.store,
                hosts.join(",")
            );
        }
        bail!(
            "invalid --store {:?}: `embedded` or etcd://HOST:PORT[,HOST:PORT...]",
            args.store
        );
    };
    let tls = match (&args.etcd_ca, &args.etcd_cert, &args.etcd_key) {
        (None, None, None) => None,
        (Some(ca), None, None) => Some(TlsFiles {
            ca: ca.clone(),
            client: None,
        }),
        (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
            ca: ca.clone(),
            client: Some(ClientCert {
                cert: cert.clone(),
                key: key.clone(),
            }),
        }),
        (_, Some(_), None) => {
            bail!("--etcd-cert needs --etcd-key, the private key of that certificate")
        }
        (_, None, Some(_)) => bail!("--etcd-key needs --etcd-cert, the certificate of that key"),
        (None, Some(_), Some(_)) => bail!(
            "--etcd-cert and --etcd-key need --etcd-ca, the CA that signed etcd's certificate"
        ),
    };
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        bail!("invalid --store {:?}: no etcd endpoint", args.store);
    }
    if let Some(e) = endpoints.iter().find(|e| e.contains("://")) {
        bail!(
            "invalid --store {:?}: {e} has a scheme; write HOST:PORT after etcd:// (TLS comes \
             from --etcd-ca)",
            args.store
        );
    }
    if !args.etcd_prefix.starts_with('/') || !args.etcd_prefix.ends_with('/') {
        bail!(
            "invalid --etcd-prefix {:?}: it starts and ends with '/'",
            args.etcd_prefix
        );
    }
    Ok(StoreConfig::Etcd {
        endpoints,
        prefix: args.etcd_prefix.clone(),
        tls,
    })
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network (a bridge on this host).
    Create {
        /// The network's name.
        name: String,
        /// IPv4 subnet; default: a free /24 from 10.210.0.0/16.
        #[arg(long)]
        subnet: Option<String>,
        /// IPv4 gateway; default: the subnet's first address.
        #[arg(long)]
        gateway: Option<String>,
        /// IPv6 subnet (at most /126); default: no IPv6.
        #[arg(long)]
        ipv6_subnet: Option<String>,
        /// IPv6 gateway; default: the subnet's first address.
        #[arg(long)]
        ipv6_gateway: Option<String>,
        /// Default: the MTU of the host's default-route interface, else 1500; 1280 or more with IPv6.
        #[arg(long)]
        mtu: Option<u32>,
        /// No way out of the host.
        #[arg(long)]
        internal: bool,
        /// `bridge`: on this host only; `overlay`: on every host of the cluster, over VXLAN
        /// (MTU: the underlay's less 50).
        #[arg(long, default_value = "bridge")]
        driver: String,
        /// The overlay network's VXLAN id (1 to 16777215); default: a random free one from
        /// 4096 up (never one just given back; see docs/api.md).
        #[arg(long)]
        vni: Option<u32>,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls,
    /// Show one network.
    Inspect {
        /// The network's name.
        name: String,
    },
    /// Show the addresses a network has handed out, and to whom.
    Allocations {
        /// The network's name.
        name: String,
    },
    /// Remove a network that has no endpoints.
    #[command(alias = "remove")]
    Rm {
        /// The network's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Create a sandbox: a network namespace with `lo` up, at <netns-dir>/NAME.
    Create {
        /// The sandbox's name.
        name: String,
    },
    /// List sandboxes.
    #[command(alias = "list")]
    Ls,
    /// Show one sandbox.
    Inspect {
        /// The sandbox's name.
        name: String,
    },
    /// Detach from every network, then remove the namespace.
    #[command(alias = "remove")]
    Rm {
        /// The sandbox's name.
        name: String,
    },
    /// Run a command inside the sandbox's network namespace.
    Exec {
        /// The sandbox's name.
        name: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Args)]
struct AttachArgs {
    /// A sandbox name or a network-namespace path (e.g. /proc/1234/ns/net).
    sandbox: String,
    /// The network to join.
    #[arg(long)]
    network: String,
    /// Requested address; give twice for IPv4 and IPv6.
    #[arg(long = "ip")]
    ips: Vec<String>,
    /// Interface name inside the sandbox.
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// Name for service discovery; default: the sandbox name.
    #[arg(long)]
    name: Option<String>,
    /// Another name for service discovery (several endpoints may share one); repeatable.
    #[arg(long = "alias")]
    aliases: Vec<String>,
    /// MAC address (unicast, not all-zero); default: derived from the IPv4 address.
    #[arg(long)]
    mac: Option<String>,
    /// Publish a host port: [HOST_IP:]HOST_PORT[-END]:PORT[-END][/tcp|udp|sctp]; repeatable.
    #[arg(long = "publish", short = 'p', value_parser = parse_publish_arg)]
    publish: Vec<Vec<PortMapping>>,
    /// Publish the ports even where a process of the host already serves them (it then gets
    /// none of their traffic); without it such a port is refused.
    #[arg(long, requires = "publish")]
    force: bool,
    #[command(flatten)]
    opts: ClientOpts,
    /// Route the sandbox's default traffic through this network (default: the network
    /// attached first keeps it).
    #[arg(long)]
    default_route: bool,
    /// A label, KEY=VALUE (Kubernetes' rules), for services and policies; repeatable.
    #[arg(long = "label", short = 'l', value_parser = parse_label_arg)]
    labels: Vec<(String, String)>,
    /// A port the endpoint names, NAME=PORT[/tcp|udp|sctp], for policies to refer to by
    /// name, e.g. `--port-name http=8080`; repeatable.
    #[arg(long = "port-name", value_name = "NAME=PORT")]
    named_ports: Vec<NamedPort>,
}

fn parse_label_arg(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid label {s:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

fn parse_publish_arg(s: &str) -> Result<Vec<PortMapping>, String> {
    berth_api::parse_publish(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// List endpoints.
    #[command(alias = "list")]
    Ls {
        /// Only the endpoints on this network.
        #[arg(long)]
        network: Option<String>,
    },
    /// Show one endpoint.
    Inspect {
        /// The endpoint's id.
        id: String,
    },
    /// Compare an endpoint's interfaces in the kernel with its record; exit 1 on a difference.
    Check {
        /// The endpoint's id.
        id: String,
    },
    /// Detach an endpoint and release its addresses.
    #[command(alias = "remove")]
    Rm {
        /// The endpoint's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a service: a virtual IP (one per address family of the network) and a DNS name
    /// in front of the network's endpoints whose labels match the selector.
    Create {
        /// The service's name (a DNS label), e.g. `web`.
        name: String,
        /// The network whose endpoints it balances over, e.g. `--network blue`.
        #[arg(long, value_name = "NET")]
        network: String,
        /// Kubernetes' label selector, e.g. `-l 'app=web,tier in (front,edge),!canary'`;
        /// repeatable (all must hold). Default: every endpoint of the network.
        #[arg(long = "selector", short = 'l', value_name = "SEL")]
        selectors: Vec<String>,
        /// [NAME=]PORT[:TARGET][/tcp|udp|sctp], e.g. `--port http=80:8080/tcp`; repeatable.
        #[arg(long = "port", value_name = "SPEC", required = true)]
        ports: Vec<String>,
        /// Publish a port on every host's addresses: NODEPORT, or PORT_OR_NAME=NODEPORT when
        /// the service has several ports, e.g. `--publish http=30080`; repeatable.
        #[arg(long = "publish", value_name = "SPEC")]
        publish: Vec<String>,
        /// `client-ip`: a client's connections keep going to the same backend, e.g.
        /// `--session-affinity client-ip`. Default: none.
        #[arg(long, value_enum, value_name = "AFFINITY")]
        session_affinity: Option<SessionAffinity>,
        /// How long a quiet client keeps its backend: seconds, or with s, m or h, e.g.
        /// `--affinity-timeout 30m`. Default: 3h.
        #[arg(long, value_name = "DUR")]
        affinity_timeout: Option<String>,
        /// The service's virtual IP, one per address family, e.g. `--vip 10.211.0.10`;
        /// repeatable. Default: free ones from the service range.
        #[arg(long = "vip", value_name = "IP")]
        vips: Vec<std::net::IpAddr>,
    },
    /// List services.
    #[command(alias = "list")]
    Ls {
        /// Only the services on this network, e.g. `--network blue`.
        #[arg(long, value_name = "NET")]
        network: Option<String>,
    },
    /// Show one service, with its backends.
    Inspect {
        /// The service's name.
        name: String,
    },
    /// Remove services.
    #[command(alias = "remove")]
    Rm {
        /// The services' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SessionAffinity {
    /// Every connection goes to a random backend.
    None,
    /// A client's connections go to the backend its last one went to.
    ClientIp,
}

impl SessionAffinity {
    /// The API's spelling.
    fn as_str(self) -> &'static str {
        match self {
            SessionAffinity::None => "none",
            SessionAffinity::ClientIp => "client-ip",
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("berth: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let opts = cli.command.client_opts().cloned().unwrap_or_default();
    let out = opts.output.unwrap_or(cli.output);
    let socket = opts.socket.unwrap_or(cli.socket);
    let client = Client::new(&socket);
    match cli.command {
        Command::Daemon(args) => daemon(args),
        Command::Status { .. } => {
            let s: Status = client.get("/v1/status")?;
            show(out, &s, |s| {
                say!("daemon     up (berth {})", s.version);
                say!("socket     {}", socket.display());
                say!("store      {}", s.store);
                say!(
                    "host       {}{}",
                    s.host,
                    s.address.map(|a| format!(" ({a})")).unwrap_or_default()
                );
                say!("netns dir  {}", s.netns_dir);
                say!("networks   {}", s.networks);
                say!("endpoints  {}", s.endpoints);
                say!("sandboxes  {}", s.sandboxes);
            })
        }
        Command::Network { cmd, .. } => network(&client, out, cmd),
        Command::Service { cmd, .. } => service(&client, out, cmd),
        Command::Policy { cmd, .. } => policy::policy(&client, out, cmd),
        Command::Host { cmd, .. } => match cmd {
            HostCmd::Ls => {
                let hosts: Vec<HostView> = client.get("/v1/hosts")?;
                show(out, &hosts, |hosts| {
                    table(
                        &["ID", "ADDRESS", "STATE", "ENDPOINTS", "LAST SEEN"],
                        hosts.iter().map(|h| {
                            vec![
                                h.id.clone(),
                                h.address.map(|a| a.to_string()).unwrap_or_default(),
                                h.state.clone(),
                                h.endpoints.to_string(),
                                ago(h.last_seen),
                            ]
                        }),
                    )
                })
            }
            HostCmd::Rm { id } => remove(&client, out, "hosts", &id),
        },
        Command::Sandbox { cmd, .. } => sandbox(&client, out, cmd),
        Command::Attach(a) => {
            let ep: Endpoint = client.post(
                "/v1/endpoints",
                &Attach {
                    network: a.network,
                    sandbox: a.sandbox,
                    ifname: Some(a.ifname),
                    ips: a.ips,
                    mac: a.mac,
                    name: a.name,
                    aliases: a.aliases,
                    ports: a.publish.into_iter().flatten().collect(),
                    force: a.force,
                    default_route: a.default_route,
                    labels: a.labels.into_iter().collect(),
                    named_ports: a.named_ports,
                    ..Default::default()
                },
            )?;
            show(out, &ep, print_endpoint)
        }
        Command::Detach {
            sandbox, network, ..
        } => {
            let v: serde_json::Value = client.post(
                "/v1/detach",
                &Detach {
                    network: network.clone(),
                    sandbox: Some(sandbox.clone()),
                    ..Default::default()
                },
            )?;
            show(out, &v, |_| say!("{sandbox} detached from {network}"))
        }
        Command::Endpoint { cmd, .. } => match cmd {
            EndpointCmd::Ls { network } => {
                let path = match network {
                    Some(n) => format!("/v1/endpoints?network={}", url_component(&n)),
                    None => "/v1/endpoints".into(),
                };
                let eps: Vec<Endpoint> = client.get(&path)?;
                show(out, &eps, |eps| {
                    table(
                        &[
                            "ID",
                            "NETWORK",
                            "HOST",
                            "SANDBOX",
                            "IFNAME",
                            "MAC",
                            "ADDRESSES",
                        ],
                        eps.iter().map(|e| {
                            vec![
                                e.id.clone(),
                                e.network.clone(),
                                e.host.clone().unwrap_or_default(),
                                e.netns
                                    .sandbox
                                    .clone()
                                    .unwrap_or_else(|| e.netns.path.clone()),
                                e.ifname.clone(),
                                e.mac.to_string(),
                                join(&e.ips),
                            ]
                        }),
                    )
                })
            }
            EndpointCmd::Inspect { id } => {
                inspect::<Endpoint>(&client, out, "endpoints", &id, print_endpoint)
            }
            EndpointCmd::Check { id } => {
                let r: CheckReport =
                    client.get(&format!("/v1/endpoints/{}/check", url_component(&id)))?;
                show(out, &r, |r| {
                    if r.problems.is_empty() {
                        say!("{id}: ok");
                    }
                    for p in &r.problems {
                        say!("{p}");
                    }
                })?;
                if !r.problems.is_empty() {
                    bail!(
                        "endpoint {id} differs from its record in {} way(s)",
                        r.problems.len()
                    );
                }
                Ok(())
            }
            EndpointCmd::Rm { id } => remove(&client, out, "endpoints", &id),
        },
    }
}

fn network(client: &Client, out: Output, cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            gateway,
            ipv6_subnet,
            ipv6_gateway,
            mtu,
            internal,
            driver,
            vni,
        } => {
            let req = CreateNetwork {
                name,
                subnet,
                gateway,
                ipv6_subnet,
                ipv6_gateway,
                mtu,
                internal,
                driver: Some(driver),
                vni,
            };
            let n: Network = client.post("/v1/networks", &req)?;
            show(out, &n, print_network)
        }
        NetworkCmd::Ls => {
            let nets: Vec<Network> = client.get("/v1/networks")?;
            show(out, &nets, |nets| {
                table(
                    &[
                        "NAME", "ID", "DRIVER", "HOST", "BRIDGE", "SUBNETS", "MTU", "INTERNAL",
                        "DOCKER",
                    ],
                    nets.iter().map(|n| {
                        let docker: Vec<&str> = n
                            .docker_networks
                            .iter()
                            .map(|id| &id[..id.len().min(12)])
                            .collect();
                        vec![
                            n.name.clone(),
                            n.id.clone(),
                            n.driver.to_string(),
                            // Bridge networks are their host's; overlay networks everyone's.
                            n.host.clone().unwrap_or_default(),
                            n.bridge.clone(),
                            join(&n.subnets.iter().map(|s| s.cidr).collect::<Vec<_>>()),
                            n.mtu.to_string(),
                            n.internal.to_string(),
                            docker.join(","),
                        ]
                    }),
                )
            })
        }
        NetworkCmd::Inspect { name } => {
            inspect::<Network>(client, out, "networks", &name, print_network)
        }
        NetworkCmd::Allocations { name } => {
            let allocs: Vec<Allocation> = client.get(&format!(
                "/v1/networks/{}/allocations",
                url_component(&name)
            ))?;
            show(out, &allocs, |allocs| {
                table(
                    &["ADDRESS", "OWNER"],
                    allocs.iter().map(|a| vec![a.ip.clone(), a.owner.clone()]),
                )
            })
        }
        NetworkCmd::Rm { name } => remove(client, out, "networks", &name),
    }
}

fn service(client: &Client, out: Output, cmd: ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create {
            name,
            network,
            selectors,
            ports,
            publish,
            session_affinity,
            affinity_timeout,
            vips,
        } => {
            // The daemon validates everything; the CLI only passes the text on.
            let req = CreateService {
                name,
                network,
                selector: selectors.join(","),
                ports,
                publish,
                session_affinity: session_affinity.map(|a| a.as_str().to_string()),
                affinity_timeout,
                vips,
            };
            let s: Service = client.post("/v1/services", &req)?;
            show(out, &s, print_service)
        }
        ServiceCmd::Ls { network } => {
            let path = match network {
                Some(n) => format!("/v1/services?network={}", url_component(&n)),
                None => "/v1/services".into(),
            };
            let svcs: Vec<Service> = client.get(&path)?;
            show(out, &svcs, |svcs| {
                table(
                    &["NAME", "NETWORK", "VIPS", "PORTS", "BACKENDS", "SELECTOR"],
                    svcs.iter().map(|s| {
                        vec![
                            s.name.clone(),
                            s.network.clone(),
                            join(&s.vips),
                            // A published port reads "... (published on N)": ", " between.
                            s.ports
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                            s.backends.len().to_string(),
                            selector_text(s),
                        ]
                    }),
                )
            })
        }
        ServiceCmd::Inspect { name } => {
            inspect::<Service>(client, out, "services", &name, print_service)
        }
        ServiceCmd::Rm { names } => remove_all(client, out, "services", "service(s)", &names),
    }
}

fn sandbox(client: &Client, out: Output, cmd: SandboxCmd) -> Result<()> {
    match cmd {
        SandboxCmd::Create { name } => {
            let s: Sandbox = client.post("/v1/sandboxes", &CreateSandbox { name })?;
            show(out, &s, |s| say!("{}", s.path))
        }
        SandboxCmd::Ls => {
            let sbs: Vec<Sandbox> = client.get("/v1/sandboxes")?;
            show(out, &sbs, |sbs| {
                table(
                    &["NAME", "PATH"],
                    sbs.iter().map(|s| vec![s.name.clone(), s.path.clone()]),
                )
            })
        }
        SandboxCmd::Inspect { name } => inspect::<Sandbox>(client, out, "sandboxes", &name, |s| {
            say!("{}\t{}", s.name, s.path)
        }),
        SandboxCmd::Rm { name } => remove(client, out, "sandboxes", &name),
        SandboxCmd::Exec { name, command } => {
            let s: Sandbox = client.get(&format!("/v1/sandboxes/{}", url_component(&name)))?;
            let ns = std::fs::File::open(&s.path).with_context(|| format!("open {}", s.path))?;
            // The CLI is single-threaded here, and it is about to exec: entering the namespace
            // on this thread is exactly what we want.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter sandbox {name}"))?;
            // SAFETY: nothing else runs in this single-threaded process, and it is about to
            // exec: the command gets the default SIGPIPE (death on a closed pipe, as from a
            // shell) instead of the "ignore" Rust's runtime set for this process.
            unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGPIPE,
                    nix::sys::signal::SigHandler::SigDfl,
                )
            }
            .context("reset SIGPIPE")?;
            let err = std::process::Command::new(&command[0])
                .args(&command[1..])
                .exec();
            bail!("cannot run {}: {err}", command[0])
        }
    }
}

fn daemon(args: DaemonArgs) -> Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let store = store_config(&args)?;
    let service_cidrs = args
        .service_cidrs
        .iter()
        .map(|c| berth_api::parse_subnet(c))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, c) in service_cidrs.iter().enumerate() {
        if let Some(other) = service_cidrs[..i]
            .iter()
            .find(|o| o.addr().is_ipv4() == c.addr().is_ipv4())
        {
            bail!("--service-cidr {other} and {c}: at most one IPv4 and one IPv6 service range");
        }
    }
    rt.block_on(berth_agent::daemon::run(
        berth_agent::daemon::DaemonConfig {
            store,
            host_id: args.host_id,
            advertise_address: args.advertise_address,
            host_lease_ttl: std::time::Duration::from_secs(args.host_lease_ttl),
            host_gone_grace: std::time::Duration::from_secs(args.host_gone_grace),
            // Empty when --service-cidr is not given: the agent applies the defaults.
            service_cidrs,
            state_dir: args.state_dir,
            run_dir: args.run_dir,
            netns_dir: args.netns_dir,
            docker_plugin_socket: match args.docker_plugin_socket {
                None => berth_agent::daemon::default_docker_plugin_socket(),
                Some(p) if p.is_empty() => None,
                Some(p) => Some(PathBuf::from(p)),
            },
            dns: (args.dns_port != 0).then_some(berth_dns::DnsConfig {
                suffix: args.dns_suffix,
                port: args.dns_port,
                resolv_conf: args.dns_resolv_conf,
                client_qps: args.dns_client_qps,
            }),
            sandbox_etc_dir: args.sandbox_etc_dir,
            docker_endpoint_grace: std::time::Duration::from_secs(args.docker_endpoint_grace),
            socket_group: args.socket_group,
            client_timeout: std::time::Duration::from_millis(args.client_timeout_ms),
        },
    ))?;
    Ok(())
}

/// `inspect` of any kind: GET /v1/<collection>/<name>.
fn inspect<T: serde::de::DeserializeOwned + Serialize>(
    client: &Client,
    out: Output,
    collection: &str,
    name: &str,
    human: impl FnOnce(&T),
) -> Result<()> {
    let v: T = client.get(&format!("/v1/{collection}/{}", url_component(name)))?;
    show(out, &v, human)
}

/// `rm` of any kind: DELETE /v1/<collection>/<name>; prints the name.
fn remove(client: &Client, out: Output, collection: &str, name: &str) -> Result<()> {
    let v: serde_json::Value =
        client.delete(&format!("/v1/{collection}/{}", url_component(name)))?;
    show(out, &v, |_| say!("{name}"))
}

/// `rm` of several, like `docker rm a b`: every name is tried; the failures are reported
/// and make the exit status non-zero (one name alone fails with its own error).
fn remove_all(
    client: &Client,
    out: Output,
    collection: &str,
    what: &str,
    names: &[String],
) -> Result<()> {
    if let [name] = names {
        return remove(client, out, collection, name);
    }
    let mut failed = 0;
    for name in names {
        if let Err(e) = remove(client, out, collection, name) {
            eprintln!("berth: error: {name}: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} {what} not removed", names.len());
    }
    Ok(())
}

fn show<T: Serialize>(out: Output, v: &T, human: impl FnOnce(&T)) -> Result<()> {
    match out {
        Output::Json => say!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => human(v),
    }
    Ok(())
}

fn print_network(n: &Network) {
    say!("name      {}", n.name);
    say!("id        {}", n.id);
    say!("driver    {}", n.driver);
    if let Some(vni) = n.vni {
        say!("vni       {vni}");
    }
    if let Some(host) = &n.host {
        say!("host      {host}");
    }
    say!("bridge    {}", n.bridge);
    for s in &n.subnets {
        say!("subnet    {} gateway {}", s.cidr, s.gateway);
    }
    say!("mtu       {}", n.mtu);
    say!("internal  {}", n.internal);
    for id in &n.docker_networks {
        say!("docker    network {id}");
    }
    if let Some(dns) = &n.dns {
        let servers: Vec<String> = dns.nameservers.iter().map(|ip| ip.to_string()).collect();
        say!("dns       {} (search {})", servers.join(" "), dns.domain);
    }
    for b in &n.blocks {
        say!("block     {} host {}", b.cidr, b.host);
    }
}

fn print_service(s: &Service) {
    say!("name      {}", s.name);
    say!("network   {}", s.network);
    say!("selector  {}", selector_text(s));
    for vip in &s.vips {
        say!("vip       {vip}");
    }
    for p in &s.ports {
        say!("port      {p}");
    }
    match s.affinity_timeout {
        Some(t) => say!("affinity  client-ip, {t}s"),
        None => say!("affinity  none"),
    }
    if s.backends.is_empty() {
        say!("backends  none (connections are refused)");
    }
    for b in &s.backends {
        let mut line = format!("backend   {}", b.endpoint);
        if let Some(name) = &b.name {
            line += &format!(" {name}");
        }
        if let Some(host) = &b.host {
            line += &format!(" host {host}");
        }
        say!("{line} {}", join(&b.ips));
    }
}

/// A service's selector as people read it; the empty one selects every endpoint.
fn selector_text(s: &Service) -> String {
    if s.selector.is_empty() {
        "(every endpoint)".into()
    } else {
        s.selector.to_string()
    }
}

/// "12s ago" for a time in seconds since the epoch.
fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match now.saturating_sub(secs) {
        _ if secs == 0 => "?".into(),
        0 => "now".into(),
        d => format!("{d}s ago"),
    }
}

fn print_endpoint(e: &Endpoint) {
    say!("endpoint  {}", e.id);
    say!("network   {}", e.network);
    if let Some(host) = &e.host {
        say!("host      {host}");
    }
    say!(
        "sandbox   {}",
        e.netns.sandbox.as_deref().unwrap_or(&e.netns.path)
    );
    say!("ifname    {}", e.ifname);
    say!("mac       {}", e.mac);
    for ip in &e.ips {
        say!("ip        {ip}");
    }
    for p in &e.ports {
        say!("publish   {p}");
    }
    for gw in &e.default_gateways {
        say!("default   via {gw}");
    }
    for (k, v) in &e.labels {
        say!("label     {k}={v}");
    }
    for p in &e.named_ports {
        say!("port name {p}");
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("{}", s.join("  ").trim_end());
    };
    line(headers.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Percent-encodes a path or query component (names are restricted, paths are not).
fn url_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every flag says in one line what it is for.
    #[test]
    fn every_command_and_flag_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() {
                missing.push(path.to_string());
            }
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && a.get_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cli, "berth", &mut missing);
        assert!(missing.is_empty(), "undescribed: {missing:?}");
    }

    #[test]
    fn client_flags_go_before_or_after_client_commands_only() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("daemon")
            .unwrap()
            .render_help()
            .to_string();
        // (`--socket-group` is the daemon's own.)
        assert!(
            !help.contains("--socket <") && !help.contains("--output"),
            "{help}"
        );
        for args in [
            &["berth", "-o", "json", "--socket", "/s", "network", "ls"][..],
            &["berth", "network", "ls", "-o", "json", "--socket", "/s"],
            &["berth", "network", "-o", "json", "ls", "--socket", "/s"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let opts = cli.command.client_opts().cloned().unwrap_or_default();
            assert!(
                opts.output.unwrap_or(cli.output) == Output::Json
                    && opts.socket.unwrap_or(cli.socket) == std::path::Path::new("/s"),
                "{args:?}"
            );
        }
        assert!(Cli::try_parse_from(["berth", "daemon", "-o", "json"]).is_err());
        assert!(Cli::try_parse_from(["berth", "--socket", "/s", "daemon"]).is_ok());
    }

    #[test]
    fn service_commands_pass_text_on_and_reject_unknown_affinities() {
        let cli = Cli::try_parse_from([
            "berth",
            "service",
            "create",
            "web",
            "--network",
            "blue",
            "-l",
            "app=web",
            "--selector",
            "tier in (a,b)",
            "--port",
            "http=80:8080",
            "--port",
            "53/udp",
            "--publish",
            "http=30080",
            "--session-affinity",
            "client-ip",
            "--affinity-timeout",
            "30m",
            "--vip",
            "10.211.0.10",
            "-o",
            "json",
        ])
        .unwrap();
        assert!(cli.command.client_opts().unwrap().output == Some(Output::Json));
        let Command::Service {
            cmd:
                ServiceCmd::Create {
                    selectors,
                    ports,
                    session_affinity,
                    vips,
                    ..
                },
            ..
        } = cli.command
        else {
            panic!("not service create");
        };
        assert_eq!(selectors.join(","), "app=web,tier in (a,b)");
        assert_eq!(ports, ["http=80:8080", "53/udp"]);
        assert_eq!(
            session_affinity.map(SessionAffinity::as_str),
            Some("client-ip")
        );
        assert_eq!(vips, ["10.211.0.10".parse::<std::net::IpAddr>().unwrap()]);
        let create = ["berth", "service", "create", "web", "--network", "blue"];
        for bad in [
            &["--port", "80", "--session-affinity", "sticky"][..],
            &["--port", "80", "--bogus"],
            &[],
        ] {
            let args: Vec<&str> = create.iter().chain(bad).copied().collect();
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["berth", "service", "rm"]).is_err());
        assert!(Cli::try_parse_from(["berth", "service", "rm", "a", "b"]).is_ok());
        assert!(Cli::try_parse_from(["berth", "service", "ls", "--network", "blue"]).is_ok());
    }

    #[test]
    fn service_cidrs_are_ranges_in_canonical_form() {
        let cli = Cli::try_parse_from([
            "berth",
            "daemon",
            "--service-cidr",
            "10.96.0.0/16",
            "--service-cidr",
            "fd00:96::/112",
        ])
        .unwrap();
        let Command::Daemon(args) = cli.command else {
            panic!("not daemon");
        };
        assert_eq!(args.service_cidrs, ["10.96.0.0/16", "fd00:96::/112"]);
        for bad in ["10.96.0.1/16", "127.0.0.0/16", "10.96.0.0", "nope"] {
            assert!(
                Cli::try_parse_from(["berth", "daemon", "--service-cidr", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
