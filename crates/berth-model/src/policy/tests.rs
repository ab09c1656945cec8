use std::collections::BTreeSet;

use super::*;
use crate::Requirement;

const EXAMPLE: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-allow-web
  network: blue
spec:
  podSelector: {matchLabels: {app: db}, matchExpressions: [{key: tier, operator: In, values: [a, b]}]}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {protocol: TCP, port: 5432}
    - {protocol: udp, port: 8000, endPort: 8100}
    - {port: http}
  egress:
  - to:
    - ipBlock:
        cidr: 192.168.7.1/16
    ports:
    - port: 53
      protocol: UDP
    - protocol: SCTP
  - {}
  gatewayDNS: false
";

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn port(protocol: Protocol, port: Option<PortRef>, end_port: Option<u16>) -> PolicyPort {
    PolicyPort {
        protocol,
        port,
        end_port,
    }
}

fn name(s: &str) -> PortName {
    s.parse().unwrap()
}

fn one(text: &str) -> Policy {
    let mut policies = parse_policy_documents(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(policies.len(), 1, "{text}");
    policies.remove(0)
}

/// A minimal policy document with `spec` lines after the selector (indented by two).
fn with_spec(spec: &str) -> String {
    format!("metadata: {{name: p, network: blue}}\nspec:\n  podSelector: {{}}\n{spec}")
}

fn round_trip(p: &Policy) -> Policy {
    let json = serde_json::to_string_pretty(p).unwrap();
    let back: Policy = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    assert_eq!(&back, p, "{json}");
    // JSON is YAML too.
    assert_eq!(&one(&format!("# as YAML\n{json}")), p, "{json}");
    back
}

#[test]
fn the_kubernetes_document_reads_as_its_meaning() {
    let p = one(EXAMPLE);
    let mut expected_selector = sel("app=db");
    expected_selector.requirements.push(Requirement {
        key: "tier".into(),
        op: Operator::In(BTreeSet::from(["a".into(), "b".into()])),
    });
    assert_eq!(
        p,
        Policy {
            name: "db-allow-web".into(),
            network: "blue".into(),
            selector: expected_selector,
            ingress_isolated: true,
            egress_isolated: true,
            ingress: vec![PolicyRule {
                peers: vec![
                    Peer::Endpoints(sel("app=web")),
                    Peer::Cidr {
                        cidr: net("10.0.0.0/8"),
                        except: vec![net("10.1.0.0/16")],
                    },
                ],
                ports: vec![
                    port(Protocol::Tcp, Some(PortRef::Number(5432)), None),
                    port(Protocol::Udp, Some(PortRef::Number(8000)), Some(8100)),
                    port(Protocol::Tcp, Some(PortRef::Named(name("http"))), None),
                ],
            }],
            egress: vec![
                PolicyRule {
                    // Host bits are cleared.
                    peers: vec![Peer::Cidr {
                        cidr: net("192.168.0.0/16"),
                        except: vec![],
                    }],
                    ports: vec![
                        port(Protocol::Udp, Some(PortRef::Number(53)), None),
                        port(Protocol::Sctp, None, None),
                    ],
                },
                PolicyRule {
                    peers: vec![],
                    ports: vec![],
                },
            ],
            gateway_dns: false,
        }
    );
    assert!(p.validate().is_ok());
    round_trip(&p);
}

#[test]
fn written_as_a_berth_document() {
    let p = one(EXAMPLE);
    let json: serde_json::Value = serde_json::to_value(&p).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "apiVersion": "berth/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "db-allow-web", "network": "blue"},
            "spec": {
                "podSelector": {
                    "matchLabels": {"app": "db"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}],
                },
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchLabels": {"app": "web"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": 5432},
                        {"protocol": "UDP", "port": 8000, "endPort": 8100},
                        {"protocol": "TCP", "port": "http"},
                    ],
                }],
                "egress": [
                    {
                        "to": [{"ipBlock": {"cidr": "192.168.0.0/16"}}],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "SCTP"}],
                    },
                    {},
                ],
                "gatewayDNS": false,
            },
        })
    );
    // The defaults are left out where Kubernetes has them, gatewayDNS among them.
    let p = one(&with_spec(""));
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(
        json["spec"],
        serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]})
    );
    assert!(p.gateway_dns);
}

#[test]
fn policy_types_default_as_in_kubernetes() {
    let types = |spec: &str| {
        let p = one(&with_spec(spec));
        (p.ingress_isolated, p.egress_isolated)
    };
    assert_eq!(types(""), (true, false));
    assert_eq!(types("  egress: [{}]\n"), (true, true));
    // Kubernetes looks at the rules, not at the key.
    assert_eq!(types("  egress: []\n"), (true, false));
    assert_eq!(types("  policyTypes: []\n"), (true, false));
    assert_eq!(types("  policyTypes: [Egress]\n"), (false, true));
    assert_eq!(
        types("  policyTypes: [Egress]\n  ingress: [{}]\n"),
        (false, true)
    );
    assert_eq!(types("  policyTypes: [Ingress, Egress]\n"), (true, true));
}

#[test]
fn null_is_as_not_given_as_go_reads_it() {
    let p = one(&with_spec(
        "  policyTypes: null\n  ingress:\n  - from: null\n    ports:\n    - {protocol: null, port: null, endPort: null}\n    - {port: 80, endPort: null}\n  egress: null\n  gatewayDNS: null\n",
    ));
    assert_eq!(
        p.ingress,
        vec![PolicyRule {
            peers: vec![],
            ports: vec![
                port(Protocol::Tcp, None, None),
                port(Protocol::Tcp, Some(PortRef::Number(80)), None),
            ],
        }]
    );
    assert!(p.gateway_dns && p.ingress_isolated && !p.egress_isolated);
    let p = one("metadata: {name: p, network: blue}\nspec:\n  podSelector:\n");
    assert_eq!(p.selector, Selector::default());
    // A duplicate is one even as null (serde_json leaves duplicate keys to the map's reader).
    let err = parse_policy_documents(
        r#"{"metadata": {"name": "p", "network": "blue"}, "spec": {"podSelector": {}, "egress": [{"ports": [{"port": null, "port": 80}]}]}}"#,
    )
    .unwrap_err();
    assert!(err.message.contains("duplicate field `port`"), "{err}");
}

#[test]
fn round_trips_policies_built_in_code_once_normalized() {
    let mut p = Policy {
        name: "p".into(),
        network: "blue".into(),
        selector: sel("tier,app=web,env!=dev,!canary,zone notin (a,b),app=web"),
        ingress_isolated: false,
        egress_isolated: true,
        ingress: vec![],
        egress: vec![PolicyRule {
            peers: vec![
                Peer::Endpoints(sel("app in (x),app=y,app=z")),
                Peer::Endpoints(Selector::default()),
                Peer::Cidr {
                    cidr: net("fd00::1/64"),
                    except: vec![net("fd00::1:0/112")],
                },
            ],
            ports: vec![port(Protocol::Tcp, Some(PortRef::Number(1)), Some(65535))],
        }],
        gateway_dns: true,
    };
    p.validate().unwrap();
    let n = p.clone().normalized();
    assert_ne!(n, p);
    // The same meaning.
    for labels in [
        "tier=a,app=web",
        "tier=a,app=web,env=dev",
        "tier=a,app=web,canary=1",
        "tier=a,app=web,zone=a",
        "app=web",
    ] {
        let labels: Labels = labels
            .split(',')
            .map(|kv| kv.split_once('=').unwrap())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(n.selects(&labels), p.selects(&labels), "{labels:?}");
    }
    round_trip(&n);
    assert_eq!(n.clone().normalized(), n);
    p.selector = Selector::default();
    round_trip(&p.normalized());
}

#[test]
fn lists_arrays_and_several_documents() {
    let yaml = "\
---
# nothing
---
metadata: {name: a, network: blue}
spec: {podSelector: {}}
---
metadata: {name: b, network: blue}
spec: {podSelector: {}}
...
---
apiVersion: v1
kind: List
items:
- metadata: {name: c, network: blue}
  spec: {podSelector: {}}
- metadata: {name: d, network: blue}
  spec: {podSelector: {}}
";
    let names: Vec<String> = parse_policy_documents(yaml)
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    let json = r#"[{"metadata": {"name": "a", "namespace": "blue"}, "spec": {"podSelector": {}}},
        {"kind": "List", "items": [{"metadata": {"name": "b", "network": "blue"}, "spec": {"podSelector": null}}]}]"#;
    let policies = parse_policy_documents(json).unwrap();
    assert_eq!(policies.len(), 2);
    assert_eq!(policies[0].network, "blue");
    assert_eq!(policies[1].selector, Selector::default());
    assert_eq!(parse_policy_documents("").unwrap(), vec![]);
    assert_eq!(
        parse_policy_documents("\n# only a comment\n---\n").unwrap(),
        vec![]
    );
    assert_eq!(parse_policy_documents(" []").unwrap(), vec![]);
}

/// Asserts that reading `text` fails on the line holding `at` (its first one), with `why`.
#[track_caller]
fn fails_at(text: &str, at: &str, why: &str) {
    let err = match parse_policy_documents(text) {
        Ok(p) => panic!("accepted {p:?}\n{text}"),
        Err(e) => e,
    };
    let line = 1 + text
        .lines()
        .position(|l| l.contains(at))
        .unwrap_or_else(|| panic!("no {at:?} in the text"));
    assert_eq!(err.line, line, "{err}\n{text}");
    assert!(err.message.contains(why), "{err}\n{text}");
    assert!(
        err.to_string()
            .starts_with(&format!("line {line}, column ")),
        "{err}"
    );
}

#[test]
fn yaml_mistakes_are_reported_where_they_are() {
    let rule = |peers: &str, ports: &str| {
        with_spec(&format!(
            "  ingress:\n  - from:\n{peers}    ports:\n{ports}"
        ))
    };
    let web = "    - podSelector: {matchLabels: {app: web}}\n";
    let any = "    - port: 80\n";
    fails_at(
        &rule(web, "    - port: 80\n      bogus: 1\n"),
        "bogus",
        "unknown field `bogus`",
    );
    fails_at(
        &rule("    - ipBlock:\n        cidr: 10.0.0/8\n", any),
        "10.0.0/8",
        "invalid CIDR \"10.0.0/8\"",
    );
    fails_at(
        &rule(web, "    - protocol: TCP\n      port: 70000\n"),
        "70000",
        "port 70000 is out of range: ports are 1 to 65535",
    );
    fails_at(
        &rule(
            web,
            "    - protocol: UDP\n      port: 8000\n      endPort: 7000\n",
        ),
        "7000",
        "endPort 7000 is below port 8000",
    );
    fails_at(
        &rule(
            "    - podSelector:\n        matchExpressions:\n        - {key: tier, operator: Equals, values: [a]}\n",
            any,
        ),
        "Equals",
        "unknown variant `Equals`",
    );
    fails_at(
        &rule("    - namespaceSelector: {matchLabels: {team: a}}\n", any),
        "namespaceSelector",
        "berth has no namespaces",
    );
    // The second policy of a name, in another document.
    fails_at(
        &format!(
            "{}---\nmetadata:\n  network: red\n  name: p\nspec: {{podSelector: {{}}}}\n",
            with_spec("")
        ),
        "  name: p",
        "a policy named \"p\" is already in this file",
    );
}

#[test]
fn json_mistakes_are_reported_where_they_are() {
    let rule = |peers: &str, ports: &str| {
        format!(
            "{{\"metadata\": {{\"name\": \"p\", \"network\": \"blue\"}},\n\"spec\": {{\"podSelector\": {{}},\n\"ingress\": [{{\n  \"from\": [\n{peers}\n  ],\n  \"ports\": [\n{ports}\n  ]\n}}]}}}}"
        )
    };
    let web = r#"    {"podSelector": {"matchLabels": {"app": "web"}}}"#;
    let any = r#"    {"port": 80}"#;
    fails_at(
        &rule(web, "    {\"port\": 80,\n     \"bogus\": 1\n    }"),
        "bogus",
        "unknown field `bogus`",
    );
    fails_at(
        &rule(
            "    {\"ipBlock\": {\n      \"cidr\": \"10.0.0/8\"\n    }}",
            any,
        ),
        "10.0.0/8",
        "invalid CIDR \"10.0.0/8\"",
    );
    fails_at(
        &rule(
            web,
            "    {\"protocol\": \"TCP\",\n     \"port\": 70000\n    }",
        ),
        "70000",
        "port 70000 is out of range",
    );
    fails_at(
        &rule(
            web,
            "    {\"protocol\": \"UDP\",\n     \"port\": 8000,\n     \"endPort\": 7000\n    }",
        ),
        "7000",
        "endPort 7000 is below port 8000",
    );
    fails_at(
        &rule(
            "    {\"podSelector\": {\"matchExpressions\": [\n      {\"key\": \"tier\",\n       \"operator\": \"Equals\",\n       \"values\": [\"a\"]}]}}",
            any,
        ),
        "Equals",
        "unknown variant `Equals`",
    );
    fails_at(
        &rule("    {\"namespaceSelector\": {}\n    }", any),
        "namespaceSelector",
        "berth has no namespaces",
    );
    fails_at(
        "[{\"metadata\": {\"name\": \"p\", \"network\": \"blue\"}, \"spec\": {\"podSelector\": {}}},\n {\"metadata\": {\"name\": \"p\", \"network\": \"blue\"}, \"spec\": {\"podSelector\": {}}}]",
        " {\"metadata\": {\"name\": \"p\"",
        "a policy named \"p\" is already in this file",
    );
}

#[test]
fn every_kubernetes_rule_is_checked() {
    // The offending entry is on the line with "    - ".
    let peer = |p: &str| with_spec(&format!("  ingress:\n  - from:\n    - {p}\n"));
    let port = |p: &str| with_spec(&format!("  egress:\n  - ports:\n    - {p}\n"));
    let selector =
        |s: &str| format!("metadata: {{name: p, network: blue}}\nspec:\n  podSelector: {s}\n");
    for (text, at, why) in [
        (
            peer("{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}"),
            "    - ",
            "not both",
        ),
        (peer("{}"), "    - ", "needs podSelector"),
        (
            peer("{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}"),
            "    - ",
            "not inside cidr",
        ),
        (
            peer("{ipBlock: {except: [10.0.0.0/8], cidr: 11.0.0.0/8}}"),
            "    - ",
            "not inside cidr 11",
        ),
        (
            peer("{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}"),
            "    - ",
            "must be smaller",
        ),
        (
            peer("{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}"),
            "    - ",
            "is IPv6 but cidr",
        ),
        (
            peer("{ipBlock: {except: []}}"),
            "    - ",
            "missing field `cidr`",
        ),
        (
            peer("{ipBlock: {cidr: 10.0.0.0/8, cidr: 10.0.0.0/8}}"),
            "    - ",
            "duplicate",
        ),
        (port("{port: 0}"), "    - ", "port 0 is out of range"),
        (port("{port: -5}"), "    - ", "port -5 is out of range"),
        (
            port("{port: 80, endPort: 65536}"),
            "    - ",
            "endPort 65536 is out of range",
        ),
        (
            port("{port: http, endPort: 90}"),
            "    - ",
            "needs a numbered port, not the named port \"http\"",
        ),
        (port("{endPort: 90}"), "    - ", "endPort 90 needs a port"),
        (
            port("{endPort: 90, port: 100}"),
            "    - ",
            "endPort 90 is below port 100",
        ),
        (
            port("{port: 'HTTP'}"),
            "    - ",
            "invalid port name \"HTTP\"",
        ),
        (port("{port: '80'}"), "    - ", "invalid port name \"80\""),
        (
            port("{port: 80, endPort: http}"),
            "    - ",
            "expected a port number",
        ),
        (
            port("{protocol: ICMP, port: 80}"),
            "    - ",
            "invalid protocol \"ICMP\": TCP, UDP or SCTP",
        ),
        (
            selector("{matchLabels: {-app: web}}"),
            "podSelector",
            "invalid label \"-app=web\"",
        ),
        (
            selector("{matchLabels: {app: -web}}"),
            "podSelector",
            "value must be",
        ),
        (
            selector("{matchExpressions: [{key: tier, operator: In}]}"),
            "podSelector",
            "operator In on key \"tier\" needs values",
        ),
        (
            selector("{matchExpressions: [{key: tier, operator: NotIn, values: []}]}"),
            "podSelector",
            "needs values",
        ),
        (
            selector("{matchExpressions: [{key: tier, operator: Exists, values: [a]}]}"),
            "podSelector",
            "operator Exists on key \"tier\" takes no values",
        ),
        (
            selector("{matchExpressions: [{key: -t, operator: Exists}]}"),
            "podSelector",
            "invalid label",
        ),
        (
            selector("{matchLabel: {app: web}}"),
            "podSelector",
            "unknown field `matchLabel`",
        ),
        (
            with_spec("  policyTypes: [ingress]\n"),
            "policyTypes",
            "unknown variant `ingress`",
        ),
        (
            with_spec("  podSelector: {matchLabels: {app: web}}\n"),
            "matchLabels",
            "duplicate",
        ),
        (
            with_spec("  egress:\n  - from: []\n"),
            "from",
            "unknown field `from`",
        ),
        (
            "metadata: {name: p, network: blue}\nspec: {}\n".into(),
            "spec",
            "spec.podSelector is required",
        ),
        (
            "metadata: {name: p, network: blue}\n".into(),
            "metadata",
            "spec is required",
        ),
        (
            "metadata: {name: p}\nspec: {podSelector: {}}\n".into(),
            "metadata",
            "metadata.network is required",
        ),
        (
            "metadata: {network: blue}\nspec: {podSelector: {}}\n".into(),
            "metadata",
            "metadata.name is required",
        ),
        (
            "metadata: {name: p, network: blue, namespace: red}\nspec: {podSelector: {}}\n".into(),
            "metadata",
            "network \"blue\" and namespace \"red\" differ",
        ),
        (
            "metadata: {name: 'a b', network: blue}\nspec: {podSelector: {}}\n".into(),
            "metadata",
            "invalid policy name \"a b\"",
        ),
        (
            "metadata: {name: p, network: blue, labels: {}}\nspec: {podSelector: {}}\n".into(),
            "metadata",
            "unknown field `labels`",
        ),
        (
            format!("apiVersion: v2\n{}", with_spec("")),
            "apiVersion",
            "unknown variant `v2`",
        ),
        (
            format!("apiVersion: v1\n{}", with_spec("")),
            "apiVersion",
            "a NetworkPolicy's is networking.k8s.io/v1 or berth/v1",
        ),
        (
            format!("kind: Pod\n{}", with_spec("")),
            "kind",
            "unknown variant `Pod`",
        ),
        (
            format!("kind: NetworkPolicy\nitems: []\n{}", with_spec("")),
            "kind",
            "items belong in a document of kind: List",
        ),
        (
            "kind: List\nitems:\n- kind: List\n  items: []\n".into(),
            "- kind",
            "not a List",
        ),
        (
            "kind: List\nspec: {podSelector: {}}\n".into(),
            "kind",
            "a List has only items",
        ),
        (
            "kind: List\nmetadata: {name: x}\n".into(),
            "kind",
            "a List has only items",
        ),
        (
            format!("{}  gatewayDNS: maybe\n", with_spec("")),
            "gatewayDNS",
            "invalid boolean",
        ),
        (
            format!("{}  gatewayDns: false\n", with_spec("")),
            "gatewayDns",
            "unknown field `gatewayDns`",
        ),
        (
            "metadata: {name: p, network: blue}\nmetadata: {name: q, network: blue}\n".into(),
            "name: q",
            "duplicate mapping key",
        ),
        (
            "- 5\n".into(),
            "5",
            "invalid type: integer `5`, expected a NetworkPolicy or a List",
        ),
    ] {
        // The line of the offending value, or of the map that holds it.
        let err = parse_policy_documents(&text).expect_err(&text);
        assert!(err.message.contains(why), "{err}\n{text}");
        let line = 1 + text.lines().position(|l| l.contains(at)).expect(at);
        assert_eq!(err.line, line, "{err}\n{text}");
    }
}

#[test]
fn mistakes_in_policies_built_in_code_are_found_by_validate() {
    let good = one(EXAMPLE);
    let bad = |change: fn(&mut Policy), why: &str| {
        let mut p = good.clone();
        change(&mut p);
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
    };
    bad(|p| p.name = "a b".into(), "invalid policy name");
    bad(|p| p.network = "".into(), "invalid network name");
    bad(
        |p| (p.ingress_isolated, p.egress_isolated) = (false, false),
        "isolates no direction",
    );
    bad(
        |p| p.selector.requirements[0].key = "-x".into(),
        "selector: invalid label",
    );
    bad(
        |p| p.selector.requirements[1].op = Operator::NotIn(BTreeSet::new()),
        "\"tier notin ()\" needs at least one value",
    );
    bad(
        |p| p.egress[0].ports[0].port = Some(PortRef::Number(0)),
        "invalid policy \"db-allow-web\": egress rule 1: port 0 is out of range",
    );
    bad(
        |p| p.ingress[0].ports[1].end_port = Some(7999),
        "ingress rule 1: endPort 7999 is below port 8000",
    );
    bad(
        |p| p.ingress[0].ports[2].end_port = Some(100),
        "not the named port",
    );
    bad(
        |p| {
            p.ingress[0].peers[1] = Peer::Cidr {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.0.0.0/7")],
            }
        },
        "not inside cidr",
    );
    bad(
        |p| {
            p.ingress[0].peers[0] = Peer::Endpoints(Selector {
                requirements: vec![Requirement {
                    key: "app".into(),
                    op: Operator::Equals("a b".into()),
                }],
            })
        },
        "value must be",
    );
    // Host bits are Kubernetes-valid.
    let mut p = good.clone();
    p.ingress[0].peers[1] = Peer::Cidr {
        cidr: net("10.1.2.3/8"),
        except: vec![net("10.1.2.3/16")],
    };
    assert!(p.validate().is_ok());
}

#[test]
fn selects_by_the_policy_selector() {
    let p = one(EXAMPLE);
    let labels = |s: &str| -> Labels {
        s.split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(p.selects(&labels("app=db,tier=a")));
    assert!(!p.selects(&labels("app=db,tier=c")));
    assert!(!p.selects(&labels("app=db")));
    assert!(one(&with_spec("")).selects(&labels("")));
}

#[test]
fn garbage_and_truncated_files_are_errors_not_panics() {
    let json = serde_json::to_string_pretty(&one(EXAMPLE)).unwrap();
    for text in [EXAMPLE, json.as_str()] {
        for end in 0..text.len() {
            if let Ok(policies) = parse_policy_documents(&text[..end]) {
                // A cut that leaves whole policies, or none.
                assert!(policies.len() <= 1);
            }
        }
    }
    for garbage in [
        "{",
        "[",
        "}",
        "]",
        "---",
        "...",
        "\0",
        "\u{feff}",
        ":",
        "- - -",
        "!!binary aGk=",
        "&a [*a]",
        "*a",
        "{\"a\":",
        "[1, 2",
        "key: [unclosed",
        "\t\tx: y",
        "? [a]\n: b",
        "metadata: &m {name: a, network: b}\nspec: {podSelector: {}}\n---\nmetadata: *m\n",
        "a: &a [&b [*a]]",
        "%YAML 9.9\n---\n",
        "null",
        "~",
        "true",
        "12",
        "\"str\"",
    ] {
        let _ = parse_policy_documents(garbage);
    }
    // Billion laughs: aliases expand only as far as a document is read, and reading stops at
    // the first mistake.
    let mut laughs = String::from("- &l0 [lol]\n");
    for i in 1..40 {
        let l = format!("*l{}", i - 1);
        laughs.push_str(&format!("- &l{i} [{l}, {l}, {l}, {l}]\n"));
    }
    assert!(parse_policy_documents(&laughs).is_err());
    // Deep nesting.
    for open in ["[", "{\"a\": ", "- ", "a: "] {
        assert!(
            parse_policy_documents(&open.repeat(100_000)).is_err(),
            "{open}"
        );
    }
}

#[test]
fn cli_rules_in_every_form() {
    let ingress = |s: &str| PolicyRule::parse_cli(s, true).unwrap_or_else(|e| panic!("{s}: {e}"));
    let egress = |s: &str| PolicyRule::parse_cli(s, false).unwrap_or_else(|e| panic!("{s}: {e}"));
    let all = PolicyRule {
        peers: vec![],
        ports: vec![],
    };
    assert_eq!(ingress(""), all);
    assert_eq!(ingress("  "), all);
    assert_eq!(
        ingress("from=app=web ports=5432/tcp"),
        PolicyRule {
            peers: vec![Peer::Endpoints(sel("app=web"))],
            ports: vec![port(Protocol::Tcp, Some(PortRef::Number(5432)), None)],
        }
    );
    assert_eq!(
        egress("to=cidr:10.0.0.0/8 except=10.1.0.0/16,10.2.0.0/16 ports=53/udp,53/TCP"),
        PolicyRule {
            peers: vec![Peer::Cidr {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.1.0.0/16"), net("10.2.0.0/16")],
            }],
            ports: vec![
                port(Protocol::Udp, Some(PortRef::Number(53)), None),
                port(Protocol::Tcp, Some(PortRef::Number(53)), None),
            ],
        }
    );
    assert_eq!(
        ingress(
            "from=tier in (a, b),!canary from=cidr:10.9.8.7/16 except=10.9.1.0/24 except=10.9.2.0/24 from=tier ports=8000-8100/UDP ports=http,dns/udp,all/sctp,80"
        ),
        PolicyRule {
            peers: vec![
                Peer::Endpoints(sel("tier in (a,b),!canary")),
                Peer::Cidr {
                    cidr: net("10.9.0.0/16"),
                    except: vec![net("10.9.1.0/24"), net("10.9.2.0/24")],
                },
                Peer::Endpoints(sel("tier")),
            ],
            ports: vec![
                port(Protocol::Udp, Some(PortRef::Number(8000)), Some(8100)),
                port(Protocol::Tcp, Some(PortRef::Named(name("http"))), None),
                port(Protocol::Udp, Some(PortRef::Named(name("dns"))), None),
                port(Protocol::Sctp, None, None),
                port(Protocol::Tcp, Some(PortRef::Number(80)), None),
            ],
        }
    );
    // `all` with other peers is still everyone.
    assert_eq!(ingress("from=app=web from=all ports=80").peers, vec![]);
    assert_eq!(ingress("from=all").peers, vec![]);
    // Names may have a '-' and start with a digit.
    assert_eq!(
        ingress("ports=http-alt,8a").ports,
        vec![
            port(Protocol::Tcp, Some(PortRef::Named(name("http-alt"))), None),
            port(Protocol::Tcp, Some(PortRef::Named(name("8a"))), None),
        ]
    );
    // Rules made here pass validation.
    let mut p = one(&with_spec(""));
    p.ingress = vec![ingress(
        "from=app in (a,b) from=cidr:fd00::/8 except=fd00:1::/32 ports=1-65535",
    )];
    p.validate().unwrap();
}

#[test]
fn cli_rule_mistakes_name_the_term() {
    for (spec, ingress, term, why) in [
        (
            "to=app=web",
            true,
            "to=app=web",
            "to= is for --egress; the peers of this rule are from=PEER",
        ),
        (
            "from=app=web",
            false,
            "from=app=web",
            "from= is for --ingress; the peers of this rule are to=PEER",
        ),
        ("from=", true, "from=", "from= needs a value"),
        ("ports=", true, "ports=", "ports= needs a value"),
        ("app=web", true, "app=web", "expected from=PEER"),
        ("ports=80 extra", true, "extra", "expected from=PEER"),
        ("to=app=web", false, "", ""),
        (
            "except=10.0.0.0/8",
            false,
            "except=10.0.0.0/8",
            "except= must follow a cidr: peer",
        ),
        (
            "to=app=web except=10.0.0.0/8",
            false,
            "except=10.0.0.0/8",
            "must follow a cidr",
        ),
        (
            "to=cidr:10.0.0.0/8 ports=80 except=10.1.0.0/16",
            false,
            "except=10.1.0.0/16",
            "must follow",
        ),
        (
            "to=cidr:10.0.0.0/8 except=11.0.0.0/16",
            false,
            "except=11.0.0.0/16",
            "not inside cidr 10.0.0.0/8",
        ),
        (
            "to=cidr:10.0.0.0/8 except=10.1.0.0",
            false,
            "except=10.1.0.0",
            "invalid CIDR \"10.1.0.0\"",
        ),
        (
            "to=cidr:10.0.0/8",
            false,
            "to=cidr:10.0.0/8",
            "invalid CIDR \"10.0.0/8\"",
        ),
        (
            "from=tier in (a",
            true,
            "from=tier in (a",
            "invalid selector",
        ),
        ("from=app=web,", true, "from=app=web,", "empty requirement"),
        (
            "ports=70000",
            true,
            "ports=70000",
            "port 70000 is out of range",
        ),
        ("ports=0", true, "ports=0", "port 0 is out of range"),
        (
            "ports=80,90-80",
            true,
            "ports=80,90-80",
            "the range 90-80 goes downwards",
        ),
        (
            "ports=80/icmp",
            true,
            "ports=80/icmp",
            "\"80/icmp\": the protocol must be tcp, udp or sctp",
        ),
        ("ports=all", true, "ports=all", "say which protocol"),
        (
            "ports=HTTP",
            true,
            "ports=HTTP",
            "invalid port name \"HTTP\"",
        ),
        (
            "ports=80,,81",
            true,
            "ports=80,,81",
            "invalid port name \"\"",
        ),
    ] {
        match PolicyRule::parse_cli(spec, ingress) {
            Ok(_) if term.is_empty() => {}
            Ok(r) => panic!("{spec}: accepted {r:?}"),
            Err(e) => {
                assert!(
                    matches!(&e, ModelError::InvalidPolicyRule { given, .. } if given == term),
                    "{spec}: {e:?}"
                );
                assert!(e.to_string().contains(why), "{spec}: {e}");
                assert!(
                    e.to_string()
                        .starts_with(&format!("invalid policy rule {term:?}: ")),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn named_ports_parse_and_print() {
    let p: NamedPort = "http=8080/tcp".parse().unwrap();
    assert_eq!(
        p,
        NamedPort {
            name: name("http"),
            protocol: Protocol::Tcp,
            port: 8080
        }
    );
    assert_eq!(p.to_string(), "http=8080/tcp");
    let dns: NamedPort = "dns=53/UDP".parse().unwrap();
    assert_eq!(dns.to_string(), "dns=53/udp");
    assert_eq!(dns.to_string().parse::<NamedPort>().unwrap(), dns);
    assert_eq!(
        "web=80".parse::<NamedPort>().unwrap().protocol,
        Protocol::Tcp
    );
    for (bad, why) in [
        ("http", "expected NAME=PORT"),
        ("HTTP=80", "lower-case"),
        ("http=0", "between 1 and 65535"),
        ("http=70000", "between 1 and 65535"),
        ("http=x", "between 1 and 65535"),
        ("http=80/icmp", "tcp, udp or sctp"),
        ("=80", "1 to 15 characters"),
    ] {
        let err = bad.parse::<NamedPort>().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("invalid named port {bad:?}: ")),
            "{err}"
        );
        assert!(err.contains(why), "{bad}: {err}");
    }
}

mod properties {
    use ipnet::Ipv4Net;
    use proptest::prelude::*;

    use super::*;

    fn arb_op() -> impl Strategy<Value = Operator> {
        let value = prop::sample::select(vec!["a", "b", ""]).prop_map(String::from);
        let values = prop::collection::btree_set(value.clone(), 1..3);
        prop_oneof![
            value.clone().prop_map(Operator::Equals),
            value.prop_map(Operator::NotEquals),
            values.clone().prop_map(Operator::In),
            values.prop_map(Operator::NotIn),
            Just(Operator::Exists),
            Just(Operator::DoesNotExist),
        ]
    }

    fn arb_selector() -> impl Strategy<Value = Selector> {
        let key = prop::sample::select(vec!["app", "tier", "x.io/k"]).prop_map(String::from);
        prop::collection::vec((key, arb_op()), 0..5).prop_map(|rs| Selector {
            requirements: rs
                .into_iter()
                .map(|(key, op)| Requirement { key, op })
                .collect(),
        })
    }

    fn arb_peer() -> impl Strategy<Value = Peer> {
        let except = prop::collection::vec((any::<u32>(), 1u8..=8), 0..3);
        let cidr = (any::<u32>(), 0u8..24, except).prop_map(|(addr, len, except)| {
            let cidr = Ipv4Net::new(addr.into(), len).unwrap();
            let except = except
                .into_iter()
                .map(|(host, longer)| {
                    // Inside `cidr`, host bits and all.
                    let inside = u32::from(cidr.network()) | (host & u32::from(cidr.hostmask()));
                    Ipv4Net::new(inside.into(), len + longer).unwrap().into()
                })
                .collect();
            Peer::Cidr {
                cidr: cidr.into(),
                except,
            }
        });
        prop_oneof![arb_selector().prop_map(Peer::Endpoints), cidr]
    }

    fn arb_port() -> impl Strategy<Value = PolicyPort> {
        let protocol = prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp]);
        let port = prop_oneof![
            Just((None, None)),
            (1u16..=65535).prop_map(|p| (Some(PortRef::Number(p)), None)),
            (1u16..=65535, 0u16..100)
                .prop_map(|(p, n)| (Some(PortRef::Number(p)), Some(p.saturating_add(n)))),
            prop::sample::select(vec!["http", "dns-tcp", "8a"])
                .prop_map(|n| (Some(PortRef::Named(n.parse().unwrap())), None)),
        ];
        (protocol, port).prop_map(|(protocol, (port, end_port))| PolicyPort {
            protocol,
            port,
            end_port,
        })
    }

    fn arb_rules() -> impl Strategy<Value = Vec<PolicyRule>> {
        prop::collection::vec(
            (
                prop::collection::vec(arb_peer(), 0..3),
                prop::collection::vec(arb_port(), 0..3),
            )
                .prop_map(|(peers, ports)| PolicyRule { peers, ports }),
            0..3,
        )
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            arb_selector(),
            prop::sample::select(vec![(true, false), (false, true), (true, true)]),
            arb_rules(),
            arb_rules(),
            any::<bool>(),
        )
            .prop_map(|(selector, (i, e), ingress, egress, gateway_dns)| Policy {
                name: "p".into(),
                network: "blue".into(),
                selector,
                ingress_isolated: i,
                egress_isolated: e,
                ingress,
                egress,
                gateway_dns,
            })
    }

    fn arb_labels() -> impl Strategy<Value = Labels> {
        prop::collection::btree_map(
            prop::sample::select(vec!["app", "tier", "x.io/k"]).prop_map(String::from),
            prop::sample::select(vec!["a", "b", "c", ""]).prop_map(String::from),
            0..3,
        )
    }

    proptest! {
        #[test]
        fn normalized_policies_round_trip_and_keep_their_meaning(
            p in arb_policy(),
            labels in prop::collection::vec(arb_labels(), 8),
        ) {
            prop_assert!(p.validate().is_ok(), "{:?}", p.validate());
            let n = p.clone().normalized();
            prop_assert!(n.validate().is_ok());
            for l in &labels {
                prop_assert_eq!(n.selects(l), p.selects(l));
            }
            let json = serde_json::to_string(&n).unwrap();
            let back: Policy = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &n);
            prop_assert_eq!(back.normalized(), n.clone());
            prop_assert_eq!(parse_policy_documents(&format!("# YAML\n{json}")).unwrap(), vec![n]);
        }
    }
}

#[test]
fn named_ports_need_a_port_and_a_name_of_their_own() {
    let p = |s: &str| s.parse::<NamedPort>().unwrap();
    assert!(validate_named_ports(&[p("http=80"), p("pg=5432")]).is_ok());
    assert!(validate_named_ports(&[p("http=80"), p("http=8080/udp")]).is_err());
    let zero = NamedPort {
        port: 0,
        ..p("http=80")
    };
    assert!(validate_named_ports(&[zero]).is_err());
    let many: Vec<NamedPort> = (1..=1025).map(|i| p(&format!("p{i}={i}"))).collect();
    assert!(validate_named_ports(&many[..crate::MAX_NAMED_PORTS]).is_ok());
    assert_eq!(
        validate_named_ports(&many).unwrap_err().to_string(),
        "too many named ports (named_ports): 1025 given, at most 1024 per endpoint"
    );
}

#[test]
fn policies_too_big_for_the_kernel_are_refused() {
    let mut p = parse_policy_documents(EXAMPLE).unwrap().remove(0);
    assert!(p.validate().is_ok());
    let rule = p.ingress[0].clone();
    p.ingress = vec![rule.clone(); MAX_POLICY_PARTS + 1];
    let err = p.validate().unwrap_err().to_string();
    assert!(
        err.ends_with("too many ingress rules: 257 given, at most 256 per policy"),
        "{err}"
    );
    let mut wide = rule.clone();
    wide.peers = vec![wide.peers[0].clone(); 300];
    p.ingress = vec![rule.clone(), wide];
    let err = p.validate().unwrap_err().to_string();
    assert!(
        err.ends_with("ingress rule 2: too many peers: 300 given, at most 256 per rule"),
        "{err}"
    );
    let mut ports = rule.clone();
    ports.ports = vec![ports.ports[0].clone(); 257];
    p.ingress = vec![ports];
    let err = p.validate().unwrap_err().to_string();
    assert!(
        err.ends_with("too many ports: 257 given, at most 256 per rule"),
        "{err}"
    );
    let mut excepts = rule;
    excepts.peers = vec![Peer::Cidr {
        cidr: net("10.0.0.0/8"),
        except: (0..257u32)
            .map(|i| net(&format!("10.{}.{}.0/24", i / 256, i % 256)))
            .collect(),
    }];
    p.ingress = vec![excepts];
    let err = p.validate().unwrap_err().to_string();
    assert!(
        err.ends_with("too many exceptions: 257 given, at most 256 per CIDR"),
        "{err}"
    );
}

/// A policy document's selectors are capped when the policy is validated (a stored one over
/// the caps still reads), and its policy types where they are.
#[test]
fn selectors_and_types_in_documents_are_capped() {
    let doc = |spec: &str| {
        format!("{{\"metadata\": {{\"name\": \"p\", \"network\": \"blue\"}}, \"spec\": {spec}}}")
    };
    let validate = |spec: String| parse_policy_documents(&doc(&spec)).unwrap()[0].validate();
    let labels: Vec<String> = (0..257).map(|i| format!("\"k{i}\": \"v\"")).collect();
    let match_labels = |n: usize| {
        format!(
            "{{\"podSelector\": {{\"matchLabels\": {{{}}}}}}}",
            labels[..n].join(",")
        )
    };
    assert_eq!(validate(match_labels(256)), Ok(()));
    let err = validate(match_labels(257)).unwrap_err().to_string();
    assert!(
        err.ends_with("selector: too many selector terms: 257 given, at most 256 per selector"),
        "{err}"
    );
    let values: Vec<String> = (0..257).map(|i| format!("\"v{i}\"")).collect();
    let err = validate(format!(
        "{{\"podSelector\": {{}}, \"ingress\": [{{\"from\": [{{\"podSelector\": {{\"matchExpressions\": [{{\"key\": \"env\", \"operator\": \"In\", \"values\": [{}]}}]}}}}]}}]}}",
        values.join(",")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.ends_with("too many values of \"env\": 257 given, at most 256 per in or notin"),
        "{err}"
    );
    let err = parse_policy_documents(&doc(
        "{\"podSelector\": {}, \"policyTypes\": [\"Ingress\", \"Egress\", \"Ingress\"]}",
    ))
    .unwrap_err();
    assert!(
        err.message
            .contains("may not specify more than two policyTypes"),
        "{err}"
    );
}
