//! `berth policy ...`: network policies from flags or from files (YAML or JSON, Kubernetes
//! NetworkPolicy's shape), and `explain`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use berth_api::{Client, MAX_BODY, Network, Policy, Selector, read_at_most};
use berth_model::{PolicyRule, Shown, parse_policy_documents};
use clap::{Subcommand, ValueEnum};
use serde_json::Value;

use crate::{Output, remove_all, show, table, url_component};

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Create a policy: the network's endpoints that match the selector accept (ingress) and
    /// open (egress) only the connections its rules allow, with those of every other policy
    /// that selects them (Kubernetes NetworkPolicy's meaning).
    Create {
        /// The policy's name, e.g. `db-allow-web`.
        name: String,
        /// The network whose endpoints it selects, e.g. `--network blue`.
        #[arg(long, value_name = "NET")]
        network: String,
        /// The endpoints it applies to, a label selector, e.g. `--selector app=db`;
        /// repeatable (all must hold). Default: every endpoint of the network.
        #[arg(long = "selector", short = 'l', value_name = "SEL")]
        selectors: Vec<String>,
        /// Connections they may accept: `from=PEER... [except=CIDR,...] [ports=P,...]`, PEER
        /// a label selector, `cidr:CIDR` or `all`; P `5432`, `8000-8100/udp`, `http` (a
        /// named port) or `all/udp`; e.g. `--ingress 'from=app=web ports=5432/tcp'`. `''`
        /// allows everything. Repeatable: each is one rule.
        #[arg(long = "ingress", value_name = "RULE")]
        ingress: Vec<String>,
        /// Connections they may open: `to=PEER... [except=CIDR,...] [ports=P,...]`, e.g.
        /// `--egress 'to=cidr:10.0.0.0/8 ports=53/udp'`. Repeatable.
        #[arg(long = "egress", value_name = "RULE")]
        egress: Vec<String>,
        /// The directions in which the selected endpoints are isolated (Kubernetes'
        /// policyTypes); repeatable. Default: egress if there is an `--egress` rule, ingress
        /// if there is an `--ingress` rule or no rule at all (`berth policy create deny
        /// --network blue` denies every connection into the network's endpoints).
        #[arg(long = "type", value_enum, value_name = "DIR")]
        types: Vec<PolicyType>,
        /// Egress-isolated endpoints may not query berth's DNS on their gateway unless a
        /// rule allows it (by default they may).
        #[arg(long)]
        no_gateway_dns: bool,
    },
    /// Create or replace the policies of a file (`-`: standard input): YAML (documents
    /// separated by `---`) or JSON, in Kubernetes NetworkPolicy's shape with
    /// `metadata.network`. Nothing is applied if anything in the file is wrong.
    Apply {
        /// The file, e.g. `-f policy.yaml`; `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List policies.
    #[command(alias = "list")]
    Ls {
        /// Only the policies on this network.
        #[arg(long, value_name = "NET")]
        network: Option<String>,
    },
    /// Show one policy (its document) and the endpoints it selects.
    Inspect {
        /// The policy's name.
        name: String,
    },
    /// Remove policies.
    #[command(alias = "remove")]
    Rm {
        /// The policies' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Whether a connection from SRC to DST is allowed, and which policy (or default)
    /// decides, from the elements this host's kernel is given. SRC and DST are endpoint ids,
    /// names or addresses (or any address); PORT is `5432`, `5432/tcp`, `53/udp`; without
    /// it, a connection without ports (ping).
    Explain {
        /// Where the connection comes from: an endpoint id, name or address, or any address.
        src: String,
        /// Where it goes: an endpoint id, name or address, or any address.
        dst: String,
        /// `PORT[/tcp|udp|sctp]`, e.g. `5432` or `53/udp`; none: a connection without ports.
        port: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PolicyType {
    Ingress,
    Egress,
}

pub(crate) fn policy(client: &Client, out: Output, cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::Create {
            name,
            network,
            selectors,
            ingress,
            egress,
            types,
            no_gateway_dns,
        } => {
            let p = from_flags(
                name,
                network,
                &selectors,
                &ingress,
                &egress,
                &types,
                no_gateway_dns,
            )?;
            let v: Value = client.post("/v1/policies", &p)?;
            show(out, &v, print_policy)
        }
        PolicyCmd::Apply { file } => apply(client, out, &file),
        PolicyCmd::Ls { network } => {
            let path = match network {
                Some(n) => format!("/v1/policies?network={}", url_component(&n)),
                None => "/v1/policies".into(),
            };
            let all: Vec<Value> = client.get(&path)?;
            show(out, &all, |all| {
                table(
                    &["NAME", "NETWORK", "SELECTOR", "TYPES", "RULES", "SELECTED"],
                    all.iter().map(|v| {
                        let spec = &v["spec"];
                        let rules = |k: &str| spec[k].as_array().map_or(0, Vec::len);
                        vec![
                            text(&v["metadata"]["name"]),
                            text(&v["metadata"]["network"]),
                            selector_text(&spec["podSelector"]),
                            types_text(spec),
                            format!("{} in, {} out", rules("ingress"), rules("egress")),
                            selected(v).len().to_string(),
                        ]
                    }),
                )
            })
        }
        PolicyCmd::Inspect { name } => {
            let v: Value = client.get(&format!("/v1/policies/{}", url_component(&name)))?;
            show(out, &v, print_policy)
        }
        PolicyCmd::Rm { names } => remove_all(client, out, "policies", "policies", &names),
        PolicyCmd::Explain { src, dst, port } => {
            let mut path = format!(
                "/v1/explain?src={}&dst={}",
                url_component(&src),
                url_component(&dst)
            );
            if let Some(p) = &port {
                path += &format!("&port={}", url_component(p));
            }
            let v: Value = client.get(&path)?;
            show(out, &v, |v| {
                print_explanation(v, &src, &dst, port.as_deref())
            })
        }
    }
}

/// The policy `create`'s flags describe; every part checked here, so that a typo is
/// reported with the flag it is in.
fn from_flags(
    name: String,
    network: String,
    selectors: &[String],
    ingress: &[String],
    egress: &[String],
    types: &[PolicyType],
    no_gateway_dns: bool,
) -> Result<Policy> {
    let selector = Selector::from_str(&selectors.join(","))
        .with_context(|| format!("--selector {}", Shown(&selectors.join(","))))?;
    let rules = |specs: &[String], ingress: bool, flag: &str| -> Result<Vec<PolicyRule>> {
        specs
            .iter()
            .map(|s| {
                PolicyRule::parse_cli(s, ingress).with_context(|| format!("{flag} {}", Shown(s)))
            })
            .collect()
    };
    let (ingress_isolated, egress_isolated) = if types.is_empty() {
        (!ingress.is_empty() || egress.is_empty(), !egress.is_empty())
    } else {
        (
            types.contains(&PolicyType::Ingress),
            types.contains(&PolicyType::Egress),
        )
    };
    if !ingress_isolated && !ingress.is_empty() {
        bail!(
            "--ingress rules need --type ingress too (a policy not isolating ingress ignores them)"
        );
    }
    if !egress_isolated && !egress.is_empty() {
        bail!("--egress rules need --type egress too (a policy not isolating egress ignores them)");
    }
    let p = Policy {
        name,
        network,
        selector,
        ingress_isolated,
        egress_isolated,
        ingress: rules(ingress, true, "--ingress")?,
        egress: rules(egress, false, "--egress")?,
        gateway_dns: !no_gateway_dns,
    };
    p.validate()?;
    Ok(p)
}

/// `policy apply -f`: every document is checked, and every network looked up (to say which
/// document names a missing one), before they are sent, all in one request.
fn apply(client: &Client, out: Output, file: &PathBuf) -> Result<()> {
    // The name shown in messages, the input, and its size when it is a file's.
    let (shown, input, size): (String, Box<dyn std::io::Read>, _) = if file.as_os_str() == "-" {
        ("<stdin>".into(), Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
        let size = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        (file.display().to_string(), Box::new(f), size)
    };
    // No more than one request takes: the policies go to the daemon in one.
    let Some(text) = read_at_most(input, MAX_BODY).with_context(|| format!("reading {shown}"))?
    else {
        let size = size.map_or_else(
            || format!("over {MAX_BODY} bytes"),
            |n| format!("{n} bytes"),
        );
        bail!(
            "{shown} is {size}, more than the {MAX_BODY} bytes `policy apply` reads (the daemon's request limit): split it"
        );
    };
    let text = String::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("reading {shown}: it is not UTF-8 text"))?;
    let policies = parse_policy_documents(&text).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    if policies.is_empty() {
        bail!("{shown}: no policy in the file");
    }
    let networks: BTreeSet<String> = client
        .get::<Vec<Network>>("/v1/networks")?
        .into_iter()
        .map(|n| n.name)
        .collect();
    for p in &policies {
        if !networks.contains(&p.network) {
            bail!(
                "{shown}: policy {:?}: no network named {:?}; nothing applied",
                p.name,
                p.network
            );
        }
    }
    // One request: the daemon applies them all in one transaction, or none.
    let views: Vec<Value> = client.put("/v1/policies", &policies)?;
    if out == Output::Json {
        say!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        for p in &policies {
            say!("{} applied", p.name);
        }
    }
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// A Kubernetes label selector (`matchLabels`, `matchExpressions`) in kubectl's syntax.
fn selector_text(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel["matchLabels"].as_object() {
        for (k, v) in m {
            parts.push(format!("{k}={}", text(v)));
        }
    }
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let values: Vec<String> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        let key = text(&e["key"]);
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key,
            _ => format!("!{key}"),
        });
    }
    if parts.is_empty() {
        "(all)".into()
    } else {
        parts.join(",")
    }
}

fn types_text(spec: &Value) -> String {
    spec["policyTypes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| text(t).to_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

fn selected(v: &Value) -> Vec<Value> {
    v["status"]["selectedEndpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn peer_text(p: &Value) -> String {
    if let Some(b) = p.get("ipBlock") {
        let except: Vec<String> = b["except"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        if except.is_empty() {
            return format!("cidr:{}", text(&b["cidr"]));
        }
        return format!("cidr:{} except {}", text(&b["cidr"]), except.join(","));
    }
    selector_text(&p["podSelector"])
}

fn port_text(p: &Value) -> String {
    let proto = p["protocol"].as_str().unwrap_or("TCP").to_lowercase();
    match (&p["port"], p["endPort"].as_u64()) {
        (Value::Null, _) => format!("all/{proto}"),
        (port, Some(end)) => format!("{port}-{end}/{proto}"),
        (Value::String(name), None) => format!("{name}/{proto}"),
        (port, None) => format!("{port}/{proto}"),
    }
}

fn print_rules(spec: &Value, dir: &str, peers_key: &str) {
    for (i, r) in spec[dir].as_array().into_iter().flatten().enumerate() {
        let peers: Vec<String> = r[peers_key]
            .as_array()
            .into_iter()
            .flatten()
            .map(peer_text)
            .collect();
        let ports: Vec<String> = r["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(port_text)
            .collect();
        say!(
            "{dir:<9} {}: {} {}, ports {}",
            i + 1,
            if dir == "ingress" { "from" } else { "to" },
            if peers.is_empty() {
                "anyone".to_string()
            } else {
                peers.join(" | ")
            },
            if ports.is_empty() {
                "all".to_string()
            } else {
                ports.join(",")
            }
        );
    }
}

fn print_policy(v: &Value) {
    let spec = &v["spec"];
    say!("name      {}", text(&v["metadata"]["name"]));
    say!("network   {}", text(&v["metadata"]["network"]));
    say!("selector  {}", selector_text(&spec["podSelector"]));
    say!("isolates  {}", types_text(spec));
    print_rules(spec, "ingress", "from");
    print_rules(spec, "egress", "to");
    if spec["gatewayDNS"] == Value::Bool(false) {
        say!("dns       not allowed by default");
    }
    let sel = selected(v);
    if sel.is_empty() {
        say!("selects   no endpoint yet");
    }
    for ep in sel {
        let ips: Vec<String> = ep["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        say!(
            "selects   {} {}{} {}",
            text(&ep["endpoint"]),
            ep["name"].as_str().unwrap_or("-"),
            ep["host"]
                .as_str()
                .map(|h| format!(" host {h}"))
                .unwrap_or_default(),
            ips.join(" ")
        );
    }
}

fn print_explanation(v: &Value, src: &str, dst: &str, port: Option<&str>) {
    let allowed = v["allowed"].as_bool() == Some(true);
    say!(
        "{}: {src} -> {dst} {}",
        if allowed { "allowed" } else { "denied" },
        port.unwrap_or("(no port)")
    );
    if v["across_networks"] == Value::Bool(true) {
        say!("networks: the two are on different networks, which are isolated from each other");
    }
    let mut ingress_at = dst.to_string();
    if let Some(svc) = v.get("service").filter(|s| s.is_object()) {
        let name = text(&svc["name"]);
        let backends = svc["backends"].as_array().cloned().unwrap_or_default();
        match svc["target_port"].as_u64() {
            None => say!(
                "service  {name} has no port {}: nothing answers",
                port.unwrap_or("without ports (ping)")
            ),
            Some(_) if backends.is_empty() => {
                say!("service  {name} has no backends: nothing answers")
            }
            Some(target) => {
                let refusing = backends
                    .iter()
                    .filter(|b| b["explanation"]["allowed"].as_bool() != Some(true))
                    .count();
                say!(
                    "service  {name}: to its backends' port {target}; {refusing} of {} backends refuse",
                    backends.len()
                );
            }
        }
        for b in &backends {
            let shown = b["name"]
                .as_str()
                .unwrap_or(b["endpoint"].as_str().unwrap_or("?"));
            let e = &b["explanation"];
            let verdict = if e["allowed"].as_bool() == Some(true) {
                "allowed".to_string()
            } else {
                ["egress", "ingress"]
                    .into_iter()
                    .filter(|d| e[*d]["allowed"].as_bool() != Some(true))
                    .map(|d| {
                        let line = judgement_line(&e[d]);
                        format!("denied at {d}: {}", line.trim_start_matches("denied: "))
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            say!("backend  {shown} {}: {verdict}", text(&e["destination"]));
        }
        // The lines below are the deciding backend's (the first that refuses, else the first).
        let deciding = backends
            .iter()
            .find(|b| b["explanation"]["allowed"].as_bool() != Some(true))
            .or(backends.first());
        if let Some(b) = deciding {
            ingress_at = b["name"]
                .as_str()
                .unwrap_or(b["endpoint"].as_str().unwrap_or("?"))
                .to_string();
        }
    }
    for (dir, at) in [("egress", src), ("ingress", ingress_at.as_str())] {
        say!("{dir:<8} at {at}: {}", judgement_line(&v[dir]));
    }
}

/// One end's decision as `policy explain` prints it.
fn judgement_line(j: &Value) -> String {
    let list =
        |k: &str| -> Vec<String> { j[k].as_array().into_iter().flatten().map(text).collect() };
    match j["endpoint"].as_str() {
        None => "not a berth endpoint: not judged".to_string(),
        Some(_) if list("isolated_by").is_empty() => "open: no policy isolates it".to_string(),
        Some(_) if j["allowed"].as_bool() == Some(true) => format!(
            "allowed by {} (isolated by {})",
            list("allowed_by").join(", "),
            list("isolated_by").join(", ")
        ),
        Some(_) => format!(
            "denied: isolated by {}, and no rule of theirs allows it",
            list("isolated_by").join(", ")
        ),
    }
}
