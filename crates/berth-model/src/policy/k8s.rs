//! The serde form of a policy: a Kubernetes NetworkPolicy document, checked while it is read
//! so that each error is raised where the format still knows the position of what is wrong.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use ipnet::IpNet;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::{
    Peer, Policy, PolicyPort, PolicyRule, PortRef, check_except, check_ports, out_of_range,
};
use crate::selector::check_key_and_values;
use crate::{
    Labels, ModelError, Operator, PortName, Protocol, Requirement, Selector, validate_label,
    validate_name,
};

/// Written on every policy; `networking.k8s.io/v1` is read as the same thing.
const API_VERSION: &str = "berth/v1";

thread_local! {
    /// The names of the policies read so far from one file, while [`unique_names`] runs: a
    /// name given twice is refused where it is given the second time. serde passes no state
    /// into a `Deserialize` impl, and serde-saphyr reads several documents without a seed.
    static FILE_NAMES: RefCell<Option<BTreeSet<String>>> = const { RefCell::new(None) };
}

/// Runs `read` refusing a policy name that it has already read.
pub(super) fn unique_names<R>(read: impl FnOnce() -> R) -> R {
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            FILE_NAMES.with(|names| names.borrow_mut().take());
        }
    }
    FILE_NAMES.with(|names| *names.borrow_mut() = Some(BTreeSet::new()));
    let _forget = Forget;
    read()
}

/// Deserializes `R` from a map and converts it while the format still knows where the map is,
/// so a failed conversion is reported at it (`#[serde(try_from)]` converts after the map is
/// left, when serde_json has moved on to what follows it, maybe on another line).
fn via<'de, D, R, T>(
    d: D,
    expecting: &'static str,
    convert: fn(R) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    R: Deserialize<'de>,
{
    struct Via<R, T> {
        expecting: &'static str,
        convert: fn(R) -> Result<T, String>,
    }
    impl<'de, R: Deserialize<'de>, T> Visitor<'de> for Via<R, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = R::deserialize(MapAccessDeserializer::new(map))?;
            (self.convert)(raw).map_err(de::Error::custom)
        }
    }
    // deserialize_any: a scalar or list is "invalid type: ..., expected EXPECTING".
    d.deserialize_any(Via { expecting, convert })
}

/// A string converted by the given function inside the format's call, where an error is
/// reported at the string (serde_json places an error raised after a value's `deserialize`
/// returned only where the enclosing map or list ends, maybe lines later).
struct Str<F>(&'static str, F);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> DeserializeSeed<'de> for Str<F> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for Str<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
        (self.1)(s).map_err(E::custom)
    }
}

/// A field given twice is an error, as with serde's derive.
fn set<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), E> {
    if slot.replace(value).is_some() {
        return Err(E::duplicate_field(field));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDocument {
    api_version: Option<ApiVersion>,
    kind: Option<Kind>,
    metadata: Option<Metadata>,
    spec: Option<Spec>,
    items: Option<Vec<Policy>>,
}

#[derive(Deserialize, PartialEq, Eq, Clone, Copy)]
enum ApiVersion {
    #[serde(rename = "networking.k8s.io/v1")]
    Networking,
    #[serde(rename = "berth/v1")]
    Berth,
    /// A List's.
    #[serde(rename = "v1")]
    V1,
}

#[derive(Deserialize, PartialEq, Eq, Clone, Copy)]
enum Kind {
    NetworkPolicy,
    List,
}

/// What one document holds: a policy, or a Kubernetes `List` of them.
enum Document {
    One(Policy),
    List(Vec<Policy>),
}

impl Document {
    fn policies(self) -> Vec<Policy> {
        match self {
            Document::One(policy) => vec![policy],
            Document::List(policies) => policies,
        }
    }
}

impl TryFrom<RawDocument> for Document {
    type Error = String;

    fn try_from(raw: RawDocument) -> Result<Document, String> {
        if raw.kind == Some(Kind::List) {
            if raw.api_version.is_some_and(|v| v != ApiVersion::V1) {
                return Err("a List's apiVersion is v1".into());
            }
            if raw.spec.is_some()
                || raw
                    .metadata
                    .is_some_and(|m| m.name.is_some() || m.network.is_some())
            {
                return Err(
                    "a List has only items: each policy has its own metadata and spec".into(),
                );
            }
            return Ok(Document::List(raw.items.unwrap_or_default()));
        }
        if raw.items.is_some() {
            return Err("items belong in a document of kind: List".into());
        }
        if raw.api_version == Some(ApiVersion::V1) {
            return Err(
                "apiVersion v1 is a List's; a NetworkPolicy's is networking.k8s.io/v1 or berth/v1"
                    .into(),
            );
        }
        let metadata = raw
            .metadata
            .ok_or("metadata (name and network) is required")?;
        let name = metadata.name.ok_or("metadata.name is required")?;
        let network = metadata.network.ok_or(
            "metadata.network is required: the network whose endpoints the policy selects",
        )?;
        let spec = raw.spec.ok_or("spec is required")?;
        Ok(Document::One(Policy {
            name,
            network,
            selector: spec.selector,
            ingress_isolated: spec.ingress_isolated,
            egress_isolated: spec.egress_isolated,
            ingress: spec.ingress,
            egress: spec.egress,
            gateway_dns: spec.gateway_dns,
        }))
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        via(d, "a NetworkPolicy", |raw: RawDocument| {
            match raw.try_into()? {
                Document::One(policy) => Ok(policy),
                Document::List(_) => Err("expected one NetworkPolicy, not a List".into()),
            }
        })
    }
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Document, D::Error> {
        via(d, "a NetworkPolicy or a List", |raw: RawDocument| {
            raw.try_into()
        })
    }
}

/// The policies of one document of a file: a policy, a List, or (as JSON files have it) an
/// array of those.
pub(super) struct Policies(pub(super) Vec<Policy>);

impl<'de> Deserialize<'de> for Policies {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Policies, D::Error> {
        struct PoliciesVisitor;
        impl<'de> Visitor<'de> for PoliciesVisitor {
            type Value = Policies;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a NetworkPolicy, a List of them, or an array of them")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Policies, A::Error> {
                let document = Document::deserialize(MapAccessDeserializer::new(map))?;
                Ok(Policies(document.policies()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Policies, A::Error> {
                let mut all = Vec::new();
                while let Some(document) = seq.next_element::<Document>()? {
                    all.extend(document.policies());
                }
                Ok(Policies(all))
            }
        }
        d.deserialize_any(PoliciesVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Option<PolicyName>,
    network: Option<NetworkName>,
    /// Kubernetes' word for berth's network.
    namespace: Option<NetworkName>,
}

struct Metadata {
    name: Option<String>,
    network: Option<String>,
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Metadata, D::Error> {
        via(d, "metadata: name and network", |raw: RawMetadata| {
            let network = match (raw.network, raw.namespace) {
                (Some(network), Some(namespace)) if network.0 != namespace.0 => {
                    return Err(format!(
                        "network {:?} and namespace {:?} differ: namespace is another word for network, give one",
                        network.0, namespace.0
                    ));
                }
                (network, namespace) => network.or(namespace).map(|n| n.0),
            };
            Ok(Metadata {
                name: raw.name.map(|n| n.0),
                network,
            })
        })
    }
}

struct PolicyName(String);

impl<'de> Deserialize<'de> for PolicyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PolicyName, D::Error> {
        Str("a policy name", |name: &str| {
            validate_name("policy", name).map_err(|e| e.to_string())?;
            let again = FILE_NAMES.with(|names| {
                names
                    .borrow_mut()
                    .as_mut()
                    .is_some_and(|names| !names.insert(name.to_string()))
            });
            if again {
                return Err(format!("a policy named {name:?} is already in this file"));
            }
            Ok(PolicyName(name.to_string()))
        })
        .deserialize(d)
    }
}

struct NetworkName(String);

impl<'de> Deserialize<'de> for NetworkName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NetworkName, D::Error> {
        Str("a network name", |name: &str| {
            validate_name("network", name).map_err(|e| e.to_string())?;
            Ok(NetworkName(name.to_string()))
        })
        .deserialize(d)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    #[serde(default, deserialize_with = "present")]
    pod_selector: Option<K8sSelector>,
    policy_types: Option<Vec<PolicyType>>,
    ingress: Option<Vec<IngressRule>>,
    egress: Option<Vec<EgressRule>>,
    #[serde(rename = "gatewayDNS")]
    gateway_dns: Option<bool>,
}

/// A field that is there, even as null (which is `{}` for a selector, as Go reads it).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Deserialize, Serialize, PartialEq, Eq, Clone, Copy)]
enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressRule {
    from: Option<Vec<Peer>>,
    ports: Option<Vec<PolicyPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressRule {
    to: Option<Vec<Peer>>,
    ports: Option<Vec<PolicyPort>>,
}

struct Spec {
    selector: Selector,
    ingress_isolated: bool,
    egress_isolated: bool,
    ingress: Vec<PolicyRule>,
    egress: Vec<PolicyRule>,
    gateway_dns: bool,
}

impl<'de> Deserialize<'de> for Spec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Spec, D::Error> {
        via(d, "a NetworkPolicy spec", |raw: RawSpec| {
            let selector = raw
                .pod_selector
                .ok_or("spec.podSelector is required ({} selects every endpoint of the network)")?
                .0;
            let ingress: Vec<PolicyRule> = raw
                .ingress
                .unwrap_or_default()
                .into_iter()
                .map(|r| rule(r.from, r.ports))
                .collect();
            let egress: Vec<PolicyRule> = raw
                .egress
                .unwrap_or_default()
                .into_iter()
                .map(|r| rule(r.to, r.ports))
                .collect();
            if raw.policy_types.as_ref().is_some_and(|t| t.len() > 2) {
                // Kubernetes' rule.
                return Err("policyTypes: may not specify more than two policyTypes".into());
            }
            // Kubernetes' defaulting: no policyTypes means Ingress, and Egress too when there
            // are egress rules.
            let types = raw
                .policy_types
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| {
                    let mut types = vec![PolicyType::Ingress];
                    if !egress.is_empty() {
                        types.push(PolicyType::Egress);
                    }
                    types
                });
            Ok(Spec {
                selector,
                ingress_isolated: types.contains(&PolicyType::Ingress),
                egress_isolated: types.contains(&PolicyType::Egress),
                ingress,
                egress,
                gateway_dns: raw.gateway_dns.unwrap_or(true),
            })
        })
    }
}

fn rule(peers: Option<Vec<Peer>>, ports: Option<Vec<PolicyPort>>) -> PolicyRule {
    PolicyRule {
        peers: peers.unwrap_or_default(),
        ports: ports.unwrap_or_default(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeer {
    pod_selector: Option<K8sSelector>,
    ip_block: Option<IpBlock>,
    #[serde(rename = "namespaceSelector")]
    _namespace_selector: Option<NoNamespaces>,
}

/// `namespaceSelector`, refused with the reason.
enum NoNamespaces {}

const NO_NAMESPACES: &str = "namespaceSelector: berth has no namespaces; a peer is podSelector (endpoints of the policy's network) or ipBlock";

impl<'de> Deserialize<'de> for NoNamespaces {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NoNamespaces, D::Error> {
        struct Refuse;
        impl<'de> Visitor<'de> for Refuse {
            type Value = NoNamespaces;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(NO_NAMESPACES)
            }
            // Refused before it is read, where the format still places the error at it.
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<NoNamespaces, A::Error> {
                Err(de::Error::custom(NO_NAMESPACES))
            }
        }
        d.deserialize_any(Refuse)
    }
}

/// Kubernetes' NetworkPolicyPeer: `{podSelector: SELECTOR}` or `{ipBlock: {cidr, except}}`.
impl<'de> Deserialize<'de> for Peer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Peer, D::Error> {
        via(d, "a peer: podSelector or ipBlock", |raw: RawPeer| {
            match (raw.pod_selector, raw.ip_block) {
                (Some(selector), None) => Ok(Peer::Endpoints(selector.0)),
                (None, Some(block)) => Ok(Peer::Cidr {
                    cidr: block.cidr,
                    except: block.except,
                }),
                (Some(_), Some(_)) => {
                    Err("a peer is podSelector or ipBlock, not both: give them as two peers".into())
                }
                (None, None) => Err(
                    "a peer needs podSelector (endpoints of the policy's network) or ipBlock"
                        .into(),
                ),
            }
        })
    }
}

impl Serialize for Peer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        match self {
            Peer::Endpoints(selector) => map.serialize_entry("podSelector", &to_k8s(selector))?,
            Peer::Cidr { cidr, except } => {
                #[derive(Serialize)]
                struct IpBlockOut<'a> {
                    cidr: &'a IpNet,
                    #[serde(skip_serializing_if = "<[IpNet]>::is_empty")]
                    except: &'a [IpNet],
                }
                map.serialize_entry("ipBlock", &IpBlockOut { cidr, except })?
            }
        }
        map.end()
    }
}

struct IpBlock {
    cidr: IpNet,
    except: Vec<IpNet>,
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IpBlock, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "lowercase")]
        enum Field {
            Cidr,
            Except,
        }
        struct IpBlockVisitor;
        impl<'de> Visitor<'de> for IpBlockVisitor {
            type Value = IpBlock;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ipBlock: cidr and except")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IpBlock, A::Error> {
                let (mut cidr, mut except) = (None, None);
                while let Some(field) = map.next_key()? {
                    match field {
                        Field::Cidr => {
                            set(&mut cidr, "cidr", map.next_value_seed(cidr_seed(None))?)?
                        }
                        Field::Except => {
                            let value = map.next_value_seed(Except(cidr))?;
                            set(&mut except, "except", value)?
                        }
                    }
                }
                let cidr = cidr.ok_or_else(|| de::Error::missing_field("cidr"))?;
                let except = except.unwrap_or_default();
                // When except came first.
                for e in &except {
                    check_except(&cidr, e).map_err(de::Error::custom)?;
                }
                Ok(IpBlock { cidr, except })
            }
        }
        d.deserialize_any(IpBlockVisitor)
    }
}

/// The `except` list, each entry checked against `cidr` when it came first.
struct Except(Option<IpNet>);

impl<'de> DeserializeSeed<'de> for Except {
    type Value = Vec<IpNet>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<IpNet>, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for Except {
    type Value = Vec<IpNet>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of CIDRs")
    }
    fn visit_none<E>(self) -> Result<Vec<IpNet>, E> {
        Ok(Vec::new())
    }
    fn visit_unit<E>(self) -> Result<Vec<IpNet>, E> {
        Ok(Vec::new())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Vec<IpNet>, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<IpNet>, A::Error> {
        let mut except = Vec::new();
        while let Some(e) = seq.next_element_seed(cidr_seed(self.0))? {
            except.push(e);
        }
        Ok(except)
    }
}

/// A CIDR as Kubernetes takes it (host bits allowed), kept without host bits; with `within`,
/// an exception to that block.
fn cidr_seed(within: Option<IpNet>) -> Str<impl FnOnce(&str) -> Result<IpNet, String>> {
    Str("a CIDR", move |s: &str| {
        let net = s
            .parse::<IpNet>()
            .map_err(|_| ModelError::InvalidCidr(s.to_string()).to_string())?
            .trunc();
        if let Some(cidr) = within {
            check_except(&cidr, &net)?;
        }
        Ok(net)
    })
}

/// Kubernetes' NetworkPolicyPort: `{protocol, port, endPort}`, port a number or a name.
impl<'de> Deserialize<'de> for PolicyPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PolicyPort, D::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "camelCase")]
        enum Field {
            Protocol,
            Port,
            EndPort,
        }
        struct PortVisitor;
        impl<'de> Visitor<'de> for PortVisitor {
            type Value = PolicyPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port: protocol, port and endPort")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PolicyPort, A::Error> {
                // Each given (`Some`), maybe as null (`Some(None)`), which is as not given.
                let (mut protocol, mut port, mut end_port) = (None, None, None);
                while let Some(field) = map.next_key()? {
                    match field {
                        Field::Protocol => {
                            let value = map.next_value::<Option<K8sProtocol>>()?;
                            set(&mut protocol, "protocol", value.map(|p| p.0))?
                        }
                        Field::Port => {
                            let end_port = end_port.flatten();
                            set(
                                &mut port,
                                "port",
                                map.next_value_seed(PortSeed { end_port })?,
                            )?
                        }
                        Field::EndPort => {
                            let port = port.clone().flatten();
                            set(
                                &mut end_port,
                                "endPort",
                                map.next_value_seed(EndPortSeed { port })?,
                            )?
                        }
                    }
                }
                let (port, end_port) = (port.flatten(), end_port.flatten());
                // When endPort came without a port, or before it.
                check_ports(port.as_ref(), end_port).map_err(de::Error::custom)?;
                Ok(PolicyPort {
                    protocol: protocol.flatten().unwrap_or(Protocol::Tcp),
                    port,
                    end_port,
                })
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

impl Serialize for PolicyPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("protocol", &self.protocol.to_string().to_ascii_uppercase())?;
        match &self.port {
            Some(PortRef::Number(n)) => map.serialize_entry("port", n)?,
            Some(PortRef::Named(name)) => map.serialize_entry("port", name)?,
            None => {}
        }
        if let Some(end) = self.end_port {
            map.serialize_entry("endPort", &end)?;
        }
        map.end()
    }
}

/// TCP, UDP or SCTP, in any case.
struct K8sProtocol(Protocol);

impl<'de> Deserialize<'de> for K8sProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<K8sProtocol, D::Error> {
        Str("a protocol", |s: &str| {
            s.parse()
                .map(K8sProtocol)
                .map_err(|_| format!("invalid protocol {s:?}: TCP, UDP or SCTP"))
        })
        .deserialize(d)
    }
}

/// `port`: a number, or a name as a string (Kubernetes' IntOrString), or null (none, as Go
/// reads it); checked against `endPort` when that came first.
struct PortSeed {
    end_port: Option<u16>,
}

impl<'de> DeserializeSeed<'de> for PortSeed {
    type Value = Option<PortRef>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<PortRef>, D::Error> {
        d.deserialize_any(self)
    }
}

impl PortSeed {
    fn check<E: de::Error>(self, port: PortRef) -> Result<Option<PortRef>, E> {
        check_ports(Some(&port), self.end_port).map_err(E::custom)?;
        Ok(Some(port))
    }
}

impl Visitor<'_> for PortSeed {
    type Value = Option<PortRef>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number (1 to 65535) or a port name")
    }
    fn visit_unit<E>(self) -> Result<Option<PortRef>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<PortRef>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<PortRef>, E> {
        let n = port_number("port", n).map_err(E::custom)?;
        self.check(PortRef::Number(n))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Option<PortRef>, E> {
        let n = port_number("port", n).map_err(E::custom)?;
        self.check(PortRef::Number(n))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<PortRef>, E> {
        let name = PortName::parse(s)
            .map_err(|why| E::custom(format!("invalid port name {s:?}: {why}")))?;
        self.check(PortRef::Named(name))
    }
}

/// `endPort` or null, checked against `port` when that came first.
struct EndPortSeed {
    port: Option<PortRef>,
}

impl<'de> DeserializeSeed<'de> for EndPortSeed {
    type Value = Option<u16>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<u16>, D::Error> {
        d.deserialize_any(self)
    }
}

impl EndPortSeed {
    fn check<E: de::Error>(self, end: u16) -> Result<Option<u16>, E> {
        if let Some(port) = &self.port {
            check_ports(Some(port), Some(end)).map_err(E::custom)?;
        }
        Ok(Some(end))
    }
}

impl Visitor<'_> for EndPortSeed {
    type Value = Option<u16>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number (1 to 65535)")
    }
    fn visit_unit<E>(self) -> Result<Option<u16>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<u16>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<u16>, E> {
        let n = port_number("endPort", n).map_err(E::custom)?;
        self.check(n)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Option<u16>, E> {
        let n = port_number("endPort", n).map_err(E::custom)?;
        self.check(n)
    }
}

fn port_number<N: Copy + fmt::Display + TryInto<u16>>(what: &str, n: N) -> Result<u16, String> {
    n.try_into()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| out_of_range(what, n))
}

/// Kubernetes' LabelSelector: `matchLabels` and `matchExpressions`, all of which must hold.
struct K8sSelector(Selector);

/// What is written: `{matchLabels: {...}, matchExpressions: [...]}`, empty parts left out.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct K8sForm {
    #[serde(skip_serializing_if = "Labels::is_empty")]
    match_labels: Labels,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    match_expressions: Vec<Expression>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Expression {
    key: String,
    operator: ExpressionOperator,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    values: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Serialize, PartialEq, Eq, Clone, Copy)]
enum ExpressionOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// The Kubernetes form of a selector: `key=value` requirements (the first for each key) in
/// `matchLabels`, the rest in `matchExpressions`, `!=` as `notin` with one value, which means
/// the same.
fn to_k8s(selector: &Selector) -> K8sForm {
    let mut form = K8sForm::default();
    for r in &selector.requirements {
        let (operator, values) = match &r.op {
            Operator::Equals(v) => match form.match_labels.get(&r.key) {
                None => {
                    form.match_labels.insert(r.key.clone(), v.clone());
                    continue;
                }
                Some(same) if same == v => continue,
                Some(_) => (ExpressionOperator::In, Some(vec![v.clone()])),
            },
            Operator::NotEquals(v) => (ExpressionOperator::NotIn, Some(vec![v.clone()])),
            Operator::In(set) => (ExpressionOperator::In, Some(set.iter().cloned().collect())),
            Operator::NotIn(set) => (
                ExpressionOperator::NotIn,
                Some(set.iter().cloned().collect()),
            ),
            Operator::Exists => (ExpressionOperator::Exists, None),
            Operator::DoesNotExist => (ExpressionOperator::DoesNotExist, None),
        };
        form.match_expressions.push(Expression {
            key: r.key.clone(),
            operator,
            values,
        });
    }
    form
}

fn from_k8s(labels: Labels, expressions: Vec<Requirement>) -> Selector {
    let mut requirements: Vec<Requirement> = labels
        .into_iter()
        .map(|(key, v)| Requirement {
            key,
            op: Operator::Equals(v),
        })
        .collect();
    requirements.extend(expressions);
    Selector { requirements }
}

fn requirement(e: Expression) -> Requirement {
    let values = || e.values.iter().flatten().cloned().collect::<BTreeSet<_>>();
    let op = match e.operator {
        ExpressionOperator::In => Operator::In(values()),
        ExpressionOperator::NotIn => Operator::NotIn(values()),
        ExpressionOperator::Exists => Operator::Exists,
        ExpressionOperator::DoesNotExist => Operator::DoesNotExist,
    };
    Requirement { key: e.key, op }
}

/// The selector as its Kubernetes form reads back.
pub(super) fn canonical(selector: &Selector) -> Selector {
    let form = to_k8s(selector);
    from_k8s(
        form.match_labels,
        form.match_expressions
            .into_iter()
            .map(requirement)
            .collect(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: Option<MatchLabels>,
    match_expressions: Option<Vec<K8sRequirement>>,
}

impl<'de> Deserialize<'de> for K8sSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<K8sSelector, D::Error> {
        // Null is `{}`, as Go reads it.
        let raw = Option::<RawSelector>::deserialize(d)?;
        let selector = raw.map_or_else(Selector::default, |raw| {
            from_k8s(
                raw.match_labels.map(|m| m.0).unwrap_or_default(),
                raw.match_expressions
                    .into_iter()
                    .flatten()
                    .map(|r| r.0)
                    .collect(),
            )
        });
        Ok(K8sSelector(selector))
    }
}

/// Label pairs, each checked where it is.
struct MatchLabels(Labels);

impl<'de> Deserialize<'de> for MatchLabels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MatchLabels, D::Error> {
        struct MatchLabelsVisitor;
        impl<'de> Visitor<'de> for MatchLabelsVisitor {
            type Value = MatchLabels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("matchLabels: a map of label keys to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MatchLabels, A::Error> {
                let mut labels = Labels::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value_seed(Str("a label value", |value: &str| {
                        if labels.contains_key(&key) {
                            return Err(format!("label key {key:?} is given twice"));
                        }
                        let value = value.to_string();
                        validate_label(&key, &value).map_err(|e| e.to_string())?;
                        Ok(value)
                    }))?;
                    labels.insert(key, value);
                }
                Ok(MatchLabels(labels))
            }
        }
        d.deserialize_any(MatchLabelsVisitor)
    }
}

/// One of `matchExpressions`, checked.
struct K8sRequirement(Requirement);

impl<'de> Deserialize<'de> for K8sRequirement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<K8sRequirement, D::Error> {
        via(
            d,
            "an expression: key, operator and values",
            |e: Expression| {
                let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
                match e.operator {
                    ExpressionOperator::In | ExpressionOperator::NotIn if !has_values => {
                        return Err(format!(
                            "operator {:?} on key {:?} needs values",
                            e.operator, e.key
                        ));
                    }
                    ExpressionOperator::Exists | ExpressionOperator::DoesNotExist if has_values => {
                        return Err(format!(
                            "operator {:?} on key {:?} takes no values",
                            e.operator, e.key
                        ));
                    }
                    _ => {}
                }
                let r = requirement(e);
                check_key_and_values(&r).map_err(|e| e.to_string())?;
                Ok(K8sRequirement(r))
            },
        )
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            api_version: &'static str,
            kind: &'static str,
            metadata: MetadataOut<'a>,
            spec: SpecOut<'a>,
        }
        #[derive(Serialize)]
        struct MetadataOut<'a> {
            name: &'a str,
            network: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct SpecOut<'a> {
            pod_selector: K8sForm,
            policy_types: Vec<PolicyType>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            ingress: Vec<RuleOut<'a>>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            egress: Vec<RuleOut<'a>>,
            #[serde(rename = "gatewayDNS", skip_serializing_if = "is_true")]
            gateway_dns: bool,
        }
        let policy_types = [
            (self.ingress_isolated, PolicyType::Ingress),
            (self.egress_isolated, PolicyType::Egress),
        ]
        .into_iter()
        .filter_map(|(on, t)| on.then_some(t))
        .collect();
        fn rules<'a>(rules: &'a [PolicyRule], peers: &'static str) -> Vec<RuleOut<'a>> {
            rules.iter().map(|rule| RuleOut { rule, peers }).collect()
        }
        Out {
            api_version: API_VERSION,
            kind: "NetworkPolicy",
            metadata: MetadataOut {
                name: &self.name,
                network: &self.network,
            },
            spec: SpecOut {
                pod_selector: to_k8s(&self.selector),
                policy_types,
                ingress: rules(&self.ingress, "from"),
                egress: rules(&self.egress, "to"),
                gateway_dns: self.gateway_dns,
            },
        }
        .serialize(s)
    }
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A rule, its peers under `from` or `to`.
struct RuleOut<'a> {
    rule: &'a PolicyRule,
    peers: &'static str,
}

impl Serialize for RuleOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if !self.rule.peers.is_empty() {
            map.serialize_entry(self.peers, &self.rule.peers)?;
        }
        if !self.rule.ports.is_empty() {
            map.serialize_entry("ports", &self.rule.ports)?;
        }
        map.end()
    }
}
