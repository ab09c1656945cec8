//! `berth`: the CLI (a client of the daemon's API and nothing more) and `berth daemon`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use berth_api::{
    Attach, Client, CreateNetwork, CreateSandbox, DEFAULT_SOCKET, Detach, Endpoint, Network,
    PortMapping, Sandbox, Status,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Container networking: networks, sandboxes, endpoints."
)]
struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "BERTH_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-host agent in the foreground.
    Daemon(DaemonArgs),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage sandboxes (named network namespaces made by berth).
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Attach a sandbox (name or network-namespace path) to a network.
    Attach(AttachArgs),
    /// Detach a sandbox from a network.
    Detach {
        sandbox: String,
        #[arg(long)]
        network: String,
    },
    /// Inspect endpoints.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Daemon health and counts.
    Status,
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
    #[arg(long, default_value = "/run/docker/plugins/berth.sock")]
    docker_plugin_socket: PathBuf,
    /// DNS port on every network's gateway addresses; 0: no DNS.
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Qualified names are NAME.NETWORK.<suffix>.
    #[arg(long, default_value = berth_dns::DEFAULT_SUFFIX)]
    dns_suffix: String,
    /// Names berth does not know are forwarded to this file's nameservers (re-read on change).
    #[arg(long, default_value = "/etc/resolv.conf")]
    dns_resolv_conf: PathBuf,
    /// Sandboxes' resolv.conf go to <dir>/<sandbox>/resolv.conf, where `ip netns exec` finds them.
    #[arg(long, default_value = "/etc/netns")]
    sandbox_etc_dir: PathBuf,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: tracing::Level,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network (a bridge on this host).
    Create {
        name: String,
        /// IPv4 subnet; default: a free /24 from 10.210.0.0/16.
        #[arg(long)]
        subnet: Option<String>,
        /// IPv4 gateway; default: the subnet's first address.
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        ipv6_subnet: Option<String>,
        #[arg(long)]
        ipv6_gateway: Option<String>,
        /// Default: the MTU of the host's default-route interface, else 1500.
        #[arg(long)]
        mtu: Option<u32>,
        /// No way out of the host.
        #[arg(long)]
        internal: bool,
    },
    #[command(alias = "list")]
    Ls,
    Inspect {
        name: String,
    },
    #[command(alias = "remove")]
    Rm {
        name: String,
    },
}

#[derive(Subcommand)]
enum SandboxCmd {
    Create {
        name: String,
    },
    #[command(alias = "list")]
    Ls,
    Inspect {
        name: String,
    },
    /// Detach from every network, then remove the namespace.
    #[command(alias = "remove")]
    Rm {
        name: String,
    },
    /// Run a command inside the sandbox's network namespace.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Args)]
struct AttachArgs {
    /// A sandbox name or a network-namespace path (e.g. /proc/1234/ns/net).
    sandbox: String,
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
    #[arg(long)]
    mac: Option<String>,
    /// Publish a host port: [HOST_IP:]HOST_PORT[-END]:PORT[-END][/tcp|udp|sctp]; repeatable.
    #[arg(long = "publish", short = 'p', value_parser = parse_publish_arg)]
    publish: Vec<Vec<PortMapping>>,
}

fn parse_publish_arg(s: &str) -> Result<Vec<PortMapping>, String> {
    berth_api::parse_publish(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum EndpointCmd {
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        network: Option<String>,
    },
    Inspect {
        id: String,
    },
    #[command(alias = "remove")]
    Rm {
        id: String,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("berth: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Daemon(args) => daemon(args),
        Command::Status => {
            let s: Status = client.get("/v1/status")?;
            show(out, &s, |s| {
                println!("daemon     up (berth {})", s.version);
                println!("socket     {}", cli.socket.display());
                println!("store      {}", s.store);
                println!("netns dir  {}", s.netns_dir);
                println!("networks   {}", s.networks);
                println!("endpoints  {}", s.endpoints);
                println!("sandboxes  {}", s.sandboxes);
            })
        }
        Command::Network(cmd) => network(&client, out, cmd),
        Command::Sandbox(cmd) => sandbox(&client, out, cmd),
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
                    ..Default::default()
                },
            )?;
            show(out, &ep, print_endpoint)
        }
        Command::Detach { sandbox, network } => {
            let v: serde_json::Value = client.post(
                "/v1/detach",
                &Detach {
                    network: network.clone(),
                    sandbox: Some(sandbox.clone()),
                    ..Default::default()
                },
            )?;
            show(out, &v, |_| println!("{sandbox} detached from {network}"))
        }
        Command::Endpoint(cmd) => match cmd {
            EndpointCmd::Ls { network } => {
                let path = match network {
                    Some(n) => format!("/v1/endpoints?network={}", url_component(&n)),
                    None => "/v1/endpoints".into(),
                };
                let eps: Vec<Endpoint> = client.get(&path)?;
                show(out, &eps, |eps| {
                    table(
                        &["ID", "NETWORK", "SANDBOX", "IFNAME", "MAC", "ADDRESSES"],
                        eps.iter().map(|e| {
                            vec![
                                e.id.clone(),
                                e.network.clone(),
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
        } => {
            let req = CreateNetwork {
                name,
                subnet,
                gateway,
                ipv6_subnet,
                ipv6_gateway,
                mtu,
                internal,
            };
            let n: Network = client.post("/v1/networks", &req)?;
            show(out, &n, print_network)
        }
        NetworkCmd::Ls => {
            let nets: Vec<Network> = client.get("/v1/networks")?;
            show(out, &nets, |nets| {
                table(
                    &["NAME", "ID", "BRIDGE", "SUBNETS", "MTU", "INTERNAL"],
                    nets.iter().map(|n| {
                        vec![
                            n.name.clone(),
                            n.id.clone(),
                            n.bridge.clone(),
                            join(&n.subnets.iter().map(|s| s.cidr).collect::<Vec<_>>()),
                            n.mtu.to_string(),
                            n.internal.to_string(),
                        ]
                    }),
                )
            })
        }
        NetworkCmd::Inspect { name } => {
            inspect::<Network>(client, out, "networks", &name, print_network)
        }
        NetworkCmd::Rm { name } => remove(client, out, "networks", &name),
    }
}

fn sandbox(client: &Client, out: Output, cmd: SandboxCmd) -> Result<()> {
    match cmd {
        SandboxCmd::Create { name } => {
            let s: Sandbox = client.post("/v1/sandboxes", &CreateSandbox { name })?;
            show(out, &s, |s| println!("{}", s.path))
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
            println!("{}\t{}", s.name, s.path)
        }),
        SandboxCmd::Rm { name } => remove(client, out, "sandboxes", &name),
        SandboxCmd::Exec { name, command } => {
            let s: Sandbox = client.get(&format!("/v1/sandboxes/{}", url_component(&name)))?;
            let ns = std::fs::File::open(&s.path).with_context(|| format!("open {}", s.path))?;
            // The CLI is single-threaded here, and it is about to exec: entering the namespace
            // on this thread is exactly what we want.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter sandbox {name}"))?;
            let err = std::process::Command::new(&command[0])
                .args(&command[1..])
                .exec();
            bail!("cannot run {}: {err}", command[0])
        }
    }
}

fn daemon(args: DaemonArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(berth_agent::daemon::run(
        berth_agent::daemon::DaemonConfig {
            state_dir: args.state_dir,
            run_dir: args.run_dir,
            netns_dir: args.netns_dir,
            docker_plugin_socket: Some(args.docker_plugin_socket)
                .filter(|p| !p.as_os_str().is_empty()),
            dns: (args.dns_port != 0).then_some(berth_dns::DnsConfig {
                suffix: args.dns_suffix,
                port: args.dns_port,
                resolv_conf: args.dns_resolv_conf,
            }),
            sandbox_etc_dir: args.sandbox_etc_dir,
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
    show(out, &v, |_| println!("{name}"))
}

fn show<T: Serialize>(out: Output, v: &T, human: impl FnOnce(&T)) -> Result<()> {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => human(v),
    }
    Ok(())
}

fn print_network(n: &Network) {
    println!("name      {}", n.name);
    println!("id        {}", n.id);
    println!("bridge    {}", n.bridge);
    for s in &n.subnets {
        println!("subnet    {} gateway {}", s.cidr, s.gateway);
    }
    println!("mtu       {}", n.mtu);
    println!("internal  {}", n.internal);
    if let Some(dns) = &n.dns {
        let servers: Vec<String> = dns.nameservers.iter().map(|ip| ip.to_string()).collect();
        println!("dns       {} (search {})", servers.join(" "), dns.domain);
    }
}

fn print_endpoint(e: &Endpoint) {
    println!("endpoint  {}", e.id);
    println!("network   {}", e.network);
    println!(
        "sandbox   {}",
        e.netns.sandbox.as_deref().unwrap_or(&e.netns.path)
    );
    println!("ifname    {}", e.ifname);
    println!("mac       {}", e.mac);
    for ip in &e.ips {
        println!("ip        {ip}");
    }
    for p in &e.ports {
        println!("publish   {p}");
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
        println!("{}", s.join("  ").trim_end());
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
