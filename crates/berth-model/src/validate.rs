//! Parsing and validation of user input. Each error names the offending value, because it ends
//! up as the one-line message a user sees.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Labels;
use crate::caps::{
    MAX_ALIASES, MAX_CONTAINER_ID, MAX_LABEL_NAME, MAX_LABEL_PREFIX, MAX_LABEL_VALUE, MAX_LABELS,
    MAX_NAME, MAX_NETNS_PATH, MAX_REQUESTED_IPS, Shown, ShownStart, check_count, check_length,
};
use crate::names::IFNAME_MAX;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("invalid label {}: {why}", Shown(.label))]
    InvalidLabel { label: String, why: String },
    #[error("unknown network driver {}: bridge or overlay", Shown(.0))]
    UnknownDriver(String),
    #[error("invalid VNI {0}: must be between 1 and 16777215")]
    InvalidVni(u32),
    #[error("invalid CIDR {}: expected ADDRESS/PREFIX, e.g. 10.91.0.0/24", Shown(.0))]
    InvalidCidr(String),
    #[error("invalid subnet {given}: host bits are set, did you mean {canonical}?")]
    NotCanonical { given: String, canonical: String },
    #[error("invalid {what} name {}: {why}", Shown(.name))]
    InvalidName {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error(
        "invalid interface name {}: 1 to 15 characters, no '/', ':', whitespace, '.' or '..'",
        Shown(.0)
    )]
    InvalidIfname(String),
    #[error(
        "invalid container id {}: letters, digits, '_', '.' and '-', starting with a letter or digit",
        Shown(.0)
    )]
    InvalidContainerId(String),
    #[error("invalid IP address {}", Shown(.0))]
    InvalidAddress(String),
    #[error(
        "invalid MAC address {}: expected six hex bytes like 02:42:0a:5b:00:0a",
        Shown(.0)
    )]
    InvalidMac(String),
    #[error("invalid MAC address {0}: it must be unicast (lowest bit of the first byte clear)")]
    MulticastMac(String),
    #[error("invalid MAC address {0}: the all-zero address cannot be an interface's")]
    ZeroMac(String),
    #[error("invalid MTU {0}: must be between 68 and 65535")]
    InvalidMtu(u32),
    #[error(
        "invalid MTU {0}: a network with an IPv6 subnet needs at least {IPV6_MIN_MTU}, the IPv6 minimum"
    )]
    MtuBelowIpv6Minimum(u32),
    #[error(
        "invalid subnet {subnet}: it overlaps {range}, the {what} range, which containers cannot use"
    )]
    UnusableSubnet {
        subnet: IpNet,
        range: &'static str,
        what: &'static str,
    },
    #[error(
        "invalid subnet {subnet}: no room for a gateway and an endpoint; the longest usable {family} prefix is /{longest}"
    )]
    SubnetTooSmall {
        subnet: IpNet,
        family: &'static str,
        longest: u8,
    },
    #[error(
        "address {ip} cannot be an endpoint's on network {network:?}: it is the {what} of {subnet}"
    )]
    ReservedAddress {
        ip: IpAddr,
        network: String,
        subnet: IpNet,
        what: &'static str,
    },
    #[error("invalid --publish {}: {why}", Shown(.given))]
    InvalidPublish { given: String, why: &'static str },
    #[error("invalid selector {}: {why}", Shown(.given))]
    InvalidSelector { given: String, why: String },
    #[error("invalid service port {}: {why}", Shown(.given))]
    InvalidServicePort { given: String, why: &'static str },
    #[error("invalid service {}: {why}", Shown(.name))]
    InvalidService { name: String, why: String },
    #[error(
        "invalid affinity timeout {}: 1 second to 24h, as seconds or with s, m or h (3h)",
        Shown(.0)
    )]
    InvalidAffinityTimeout(String),
    #[error("invalid policy {}: {why}", Shown(.name))]
    InvalidPolicy { name: String, why: String },
    #[error("invalid policy rule {}: {why}", Shown(.given))]
    InvalidPolicyRule { given: String, why: String },
    #[error("invalid named port {}: {why}", Shown(.given))]
    InvalidNamedPort { given: String, why: &'static str },
    /// A list over its cap (see [`crate::check_count`]).
    #[error("too many {what}: {given} given, at most {cap} {per}")]
    TooMany {
        what: String,
        given: usize,
        cap: usize,
        per: &'static str,
    },
    /// A string over its cap (see [`crate::check_length`]).
    #[error(
        "invalid {what} {}: {} bytes long, at most {cap}",
        ShownStart(.value),
        .value.len()
    )]
    TooLong {
        what: String,
        value: String,
        cap: usize,
    },
}

/// Parses `ADDRESS/PREFIX` and insists on the canonical network form, as Docker does: a subnet
/// with host bits set is almost always a typo for something else.
pub fn parse_cidr(s: &str) -> Result<IpNet, ModelError> {
    let net = IpNet::from_str(s.trim()).map_err(|_| ModelError::InvalidCidr(s.to_string()))?;
    if net.trunc() != net {
        return Err(ModelError::NotCanonical {
            given: s.to_string(),
            canonical: net.trunc().to_string(),
        });
    }
    Ok(net)
}

/// The smallest MTU an IPv6 link may have (RFC 8200 §5).
pub const IPV6_MIN_MTU: u32 = 1280;

/// Address ranges a container network can never use, with what they are: the kernel treats
/// them specially (loopback, multicast, link-local) or not at all (reserved), so a bridge
/// holding one either breaks the host or every attach.
const UNUSABLE: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "IPv4 link-local"),
    ("224.0.0.0/4", "IPv4 multicast"),
    ("240.0.0.0/4", "reserved (and broadcast)"),
    ("::/128", "unspecified address"),
    ("::1/128", "IPv6 loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("fe80::/10", "IPv6 link-local"),
    ("ff00::/8", "IPv6 multicast"),
];

/// The longest prefix that leaves room for the gateway and one endpoint: IPv4 keeps the
/// network and broadcast addresses out (a /31 is a point-to-point link, not a LAN); an IPv6
/// pool keeps the subnet-router anycast address (offset 0) out, see `berth_ipam::Pool`.
const LONGEST_V4: u8 = 30;
const LONGEST_V6: u8 = 126;

/// Checks that containers can live in `subnet`: not in a range with a special meaning, and
/// large enough for the gateway plus at least one endpoint. Done before anything is stored or
/// made, so an unusable subnet is a clear refusal instead of a bridge that breaks every attach.
pub fn validate_subnet(subnet: &IpNet) -> Result<(), ModelError> {
    for (range, what) in UNUSABLE {
        let range_net: IpNet = range.parse().expect("valid built-in range");
        if range_net.contains(subnet) || subnet.contains(&range_net) {
            return Err(ModelError::UnusableSubnet {
                subnet: *subnet,
                range,
                what,
            });
        }
    }
    let (family, longest) = match subnet {
        IpNet::V4(_) => ("IPv4", LONGEST_V4),
        IpNet::V6(_) => ("IPv6", LONGEST_V6),
    };
    if subnet.prefix_len() > longest {
        return Err(ModelError::SubnetTooSmall {
            subnet: *subnet,
            family,
            longest,
        });
    }
    Ok(())
}

/// [`parse_cidr`] and [`validate_subnet`]: a subnet as a user or a front-end gives it.
pub fn parse_subnet(s: &str) -> Result<IpNet, ModelError> {
    let net = parse_cidr(s)?;
    validate_subnet(&net)?;
    Ok(net)
}

/// Network and endpoint names: what Docker accepts for names.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ModelError> {
    let err = |why| ModelError::InvalidName {
        what,
        name: name.to_string(),
        why,
    };
    if name.len() > MAX_NAME {
        return Err(ModelError::TooLong {
            what: format!("{what} name"),
            value: name.to_string(),
            cap: MAX_NAME,
        });
    }
    if name.is_empty() {
        return Err(err("1 to 64 characters"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(err("must start with a letter or digit"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(err("only letters, digits, '_', '.' and '-'"));
    }
    Ok(())
}

/// An endpoint's labels: at most [`MAX_LABELS`], each as [`validate_label`] has it.
pub fn validate_labels(labels: &Labels) -> Result<(), ModelError> {
    check_count("labels", labels.len(), MAX_LABELS, "per endpoint")?;
    labels.iter().try_for_each(|(k, v)| validate_label(k, v))
}

/// Checks a label with Kubernetes' rules, so that selectors written for Kubernetes mean the
/// same here: a key is `[PREFIX/]NAME`, NAME 1 to 63 characters of letters, digits, '-', '_'
/// and '.', starting and ending with a letter or digit, PREFIX a DNS subdomain of at most 253
/// characters; a value is empty or follows NAME's rule.
pub fn validate_label(key: &str, value: &str) -> Result<(), ModelError> {
    fn name_ok(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }
    fn subdomain_ok(s: &str) -> bool {
        s.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
    }
    let bad = |why: String| ModelError::InvalidLabel {
        label: format!("{key}={value}"),
        why,
    };
    let too_long = |part: &str, len: usize, cap: usize| {
        bad(format!("{part} is {len} bytes long, at most {cap}"))
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.len() > MAX_LABEL_PREFIX {
                return Err(too_long("the key's prefix", prefix.len(), MAX_LABEL_PREFIX));
            }
            if !subdomain_ok(prefix) {
                return Err(bad(
                    "the key's prefix must be a lower-case DNS subdomain (e.g. example.com/)"
                        .into(),
                ));
            }
            name
        }
        None => key,
    };
    if name.len() > MAX_LABEL_NAME {
        return Err(too_long("the key's name", name.len(), MAX_LABEL_NAME));
    }
    if !name_ok(name) {
        return Err(bad(
            "the key must be 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into(),
        ));
    }
    if value.len() > MAX_LABEL_VALUE {
        return Err(too_long("the value", value.len(), MAX_LABEL_VALUE));
    }
    if !value.is_empty() && !name_ok(value) {
        return Err(bad(
            "the value must be empty or 1 to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into(),
        ));
    }
    Ok(())
}

/// DNS aliases of an endpoint: at most [`MAX_ALIASES`], each an endpoint name.
pub fn validate_aliases(aliases: &[String]) -> Result<(), ModelError> {
    check_count("aliases", aliases.len(), MAX_ALIASES, "per endpoint")?;
    aliases
        .iter()
        .try_for_each(|a| validate_name("endpoint", a))
}

/// The addresses asked for an endpoint: at most one per address family, each an address.
pub fn parse_requested_ips(ips: &[String]) -> Result<Vec<IpAddr>, ModelError> {
    check_count(
        "ips",
        ips.len(),
        MAX_REQUESTED_IPS,
        "per endpoint (one per address family)",
    )?;
    ips.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| ModelError::InvalidAddress(s.to_string()))
        })
        .collect()
}

/// A CNI container id (the spec's syntax), at most [`MAX_CONTAINER_ID`] bytes.
pub fn validate_container_id(id: &str) -> Result<(), ModelError> {
    check_length("container id", id, MAX_CONTAINER_ID)?;
    let b = id.as_bytes();
    if b.is_empty()
        || !b[0].is_ascii_alphanumeric()
        || !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(ModelError::InvalidContainerId(id.to_string()));
    }
    Ok(())
}

/// Sandbox names become file names under the netns directory, so they must be one path
/// component; we also keep them to the same character set as network names.
pub fn validate_sandbox_name(name: &str) -> Result<(), ModelError> {
    validate_name("sandbox", name)
}

/// How an attach or detach names a namespace: a sandbox's name, or a namespace path (it has a
/// '/') of at most [`MAX_NETNS_PATH`] bytes.
pub fn validate_netns_ref(sandbox: &str) -> Result<(), ModelError> {
    if sandbox.contains('/') {
        check_length("network namespace path", sandbox, MAX_NETNS_PATH)
    } else {
        validate_sandbox_name(sandbox)
    }
}

pub fn validate_ifname(name: &str) -> Result<(), ModelError> {
    check_length("interface name", name, IFNAME_MAX)?;
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic());
    if bad {
        return Err(ModelError::InvalidIfname(name.to_string()));
    }
    Ok(())
}

pub fn validate_mtu(mtu: u32) -> Result<u32, ModelError> {
    if (68..=65535).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(ModelError::InvalidMtu(mtu))
    }
}

/// A network's MTU: [`validate_mtu`], and at least [`IPV6_MIN_MTU`] when the network carries
/// IPv6, since the kernel turns IPv6 off on a link with a smaller MTU.
pub fn validate_network_mtu(mtu: u32, ipv6: bool) -> Result<u32, ModelError> {
    let mtu = validate_mtu(mtu)?;
    if ipv6 && mtu < IPV6_MIN_MTU {
        return Err(ModelError::MtuBelowIpv6Minimum(mtu));
    }
    Ok(mtu)
}

/// An Ethernet address, serialised as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `02:42:` and the IPv4 address, as Docker does: unique on a network because addresses
    /// are, and stable when an address is reused, so peers' neighbour caches stay right when
    /// a container comes back with the same address.
    pub fn from_ipv4(ip: std::net::Ipv4Addr) -> Self {
        let o = ip.octets();
        MacAddr([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }

    /// A random locally administered unicast address.
    pub fn random_local(mut rand: impl FnMut() -> u8) -> Self {
        let mut b = [0u8; 6];
        b.iter_mut().for_each(|x| *x = rand());
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let invalid = || ModelError::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        if out[0] & 1 == 1 {
            return Err(ModelError::MulticastMac(s.to_string()));
        }
        if out == [0; 6] {
            return Err(ModelError::ZeroMac(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_kubernetes_rules() {
        let check = validate_label;
        for (k, v) in [
            ("app", "web"),
            ("tier", ""),
            ("app.kubernetes.io/name", "db-1"),
            ("io.kubernetes.pod.namespace", "default"),
            ("A_b.c-9", "X.y_z-0"),
        ] {
            assert!(check(k, v).is_ok(), "{k}={v}");
        }
        for (k, v, why) in [
            ("", "web", "key must be"),
            ("-app", "web", "key must be"),
            ("app-", "web", "key must be"),
            ("a b", "web", "key must be"),
            (
                &"x".repeat(64),
                "web",
                "the key's name is 64 bytes long, at most 63",
            ),
            (
                &format!("{}/app", "a".repeat(254)),
                "web",
                "the key's prefix is 254 bytes long, at most 253",
            ),
            ("Example.com/app", "web", "prefix"),
            ("/app", "web", "prefix"),
            ("app", "-web", "value must be"),
            (
                "app",
                &"v".repeat(64),
                "the value is 64 bytes long, at most 63",
            ),
            ("app", "a/b", "value must be"),
        ] {
            let e = check(k, v).unwrap_err().to_string();
            assert!(e.contains(why), "{k}={v}: {e}");
        }
    }

    #[test]
    fn an_endpoints_lists_are_capped() {
        let labels = |n: usize| -> Labels {
            (0..n)
                .map(|i| (format!("example.com/key-{i}"), format!("value-{i}")))
                .collect()
        };
        assert_eq!(validate_labels(&labels(MAX_LABELS)), Ok(()));
        assert_eq!(
            validate_labels(&labels(100_000)).unwrap_err().to_string(),
            "too many labels: 100000 given, at most 1024 per endpoint"
        );
        let aliases = |n: usize| (0..n).map(|i| format!("a{i}")).collect::<Vec<_>>();
        assert_eq!(validate_aliases(&aliases(MAX_ALIASES)), Ok(()));
        assert_eq!(
            validate_aliases(&aliases(257)).unwrap_err().to_string(),
            "too many aliases: 257 given, at most 256 per endpoint"
        );
        assert!(validate_aliases(&["-bad".into()]).is_err());
        let ips = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_requested_ips(&ips(&["10.0.0.5", "fd00::5"])).unwrap(),
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(
            parse_requested_ips(&ips(&["10.0.0.5", "10.0.0.6", "10.0.0.7"]))
                .unwrap_err()
                .to_string(),
            "too many ips: 3 given, at most 2 per endpoint (one per address family)"
        );
        assert_eq!(
            parse_requested_ips(&ips(&["nope"])),
            Err(ModelError::InvalidAddress("nope".into()))
        );
    }

    #[test]
    fn names_ids_and_paths_are_capped_with_their_length() {
        assert_eq!(
            validate_name("network", &"n".repeat(65))
                .unwrap_err()
                .to_string(),
            format!(
                "invalid network name {:?}: 65 bytes long, at most 64",
                "n".repeat(65)
            )
        );
        let long = "n".repeat(1 << 20);
        let e = validate_name("network", &long).unwrap_err().to_string();
        assert!(
            e.ends_with("...: 1048576 bytes long, at most 64") && e.len() < 200,
            "{e}"
        );
        assert_eq!(validate_container_id(&"c".repeat(MAX_CONTAINER_ID)), Ok(()));
        assert!(
            validate_container_id(&"c".repeat(129))
                .unwrap_err()
                .to_string()
                .ends_with(": 129 bytes long, at most 128")
        );
        for bad in ["", "-c", "c/d", "c d"] {
            assert_eq!(
                validate_container_id(bad),
                Err(ModelError::InvalidContainerId(bad.into()))
            );
        }
        assert_eq!(validate_netns_ref("web"), Ok(()));
        assert!(validate_netns_ref("we b").is_err());
        let path = |n: usize| format!("/{}", "p".repeat(n - 1));
        assert_eq!(validate_netns_ref(&path(MAX_NETNS_PATH)), Ok(()));
        assert!(
            validate_netns_ref(&path(4096))
                .unwrap_err()
                .to_string()
                .ends_with(": 4096 bytes long, at most 4095")
        );
        assert!(
            validate_ifname("sixteen-chars-xx")
                .unwrap_err()
                .to_string()
                .ends_with(": 16 bytes long, at most 15")
        );
    }

    #[test]
    fn cidr_must_be_canonical() {
        assert_eq!(
            parse_cidr("10.91.0.0/24").unwrap().to_string(),
            "10.91.0.0/24"
        );
        assert_eq!(
            parse_cidr("fd00:91::/64").unwrap().to_string(),
            "fd00:91::/64"
        );
        assert!(matches!(
            parse_cidr("10.91.0.5/24"),
            Err(ModelError::NotCanonical { .. })
        ));
        for bad in ["10.91.0.0", "10.91.0.0/33", "banana", "", "10.300.0.0/16"] {
            assert!(
                matches!(parse_cidr(bad), Err(ModelError::InvalidCidr(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("network", "blue-1.a_b").is_ok());
        for bad in ["", "-x", "a/b", "a b", "..", ".", &"x".repeat(65)] {
            assert!(validate_name("network", bad).is_err(), "{bad:?}");
            assert!(validate_sandbox_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ifnames() {
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["", "a/b", "a b", ".", "..", "sixteen-chars-xx", "a:b"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mac_round_trip() {
        let m: MacAddr = "02:42:0A:5b:00:0a".parse().unwrap();
        assert_eq!(m.to_string(), "02:42:0a:5b:00:0a");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(ModelError::MulticastMac(_))
        ));
        for bad in [
            "02:42:0a:5b:00",
            "02:42:0a:5b:00:0a:01",
            "zz:42:0a:5b:00:0a",
            "2:42:a:5b:0:a",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(ModelError::InvalidMac(_))),
                "{bad}"
            );
        }
        assert_eq!(
            MacAddr::from_ipv4("10.91.0.5".parse().unwrap()).to_string(),
            "02:42:0a:5b:00:05"
        );
        let r = MacAddr::random_local(|| 0xff);
        assert_eq!(r.0[0], 0xfe, "locally administered, unicast");
        assert_eq!(r.0[0] & 1, 0);
    }

    #[test]
    fn mtu_bounds() {
        assert!(validate_mtu(1400).is_ok());
        assert!(validate_mtu(67).is_err());
        assert!(validate_mtu(65536).is_err());
        assert_eq!(validate_network_mtu(1000, false), Ok(1000));
        assert_eq!(validate_network_mtu(1280, true), Ok(1280));
        assert_eq!(
            validate_network_mtu(1279, true),
            Err(ModelError::MtuBelowIpv6Minimum(1279))
        );
        assert_eq!(
            validate_network_mtu(20, true),
            Err(ModelError::InvalidMtu(20))
        );
    }

    #[test]
    fn usable_subnets_are_accepted() {
        for ok in [
            "10.91.0.0/24",
            "10.0.0.0/30",
            "192.168.0.0/16",
            "1.0.0.0/8",
            "126.0.0.0/8",
            "128.0.0.0/8",
            "169.253.0.0/16",
            "223.255.255.0/24",
            "fd00:91::/64",
            "fd00::/126",
            "2001:db8::/32",
            "fe00::/9",
            "fec0::/10",
        ] {
            assert_eq!(
                parse_subnet(ok).map(|n| n.to_string()),
                Ok(ok.into()),
                "{ok}"
            );
        }
    }

    #[test]
    fn unusable_subnets_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            ("0.0.0.0/24", "\"this network\""),
            ("0.0.0.0/0", "\"this network\""),
            ("127.0.0.0/24", "loopback"),
            ("127.0.0.0/8", "loopback"),
            ("96.0.0.0/3", "loopback"),
            ("169.254.0.0/24", "IPv4 link-local"),
            ("169.254.0.0/16", "IPv4 link-local"),
            ("224.0.0.0/24", "IPv4 multicast"),
            ("239.255.0.0/16", "IPv4 multicast"),
            ("240.0.0.0/24", "reserved"),
            ("255.255.255.0/24", "reserved"),
            ("::/128", "unspecified"),
            ("::/64", "unspecified"),
            ("::1/128", "IPv6 loopback"),
            ("::ffff:0:0/96", "IPv4-mapped"),
            ("::ffff:10.0.0.0/120", "IPv4-mapped"),
            ("fe80::/64", "IPv6 link-local"),
            ("fe80::/10", "IPv6 link-local"),
            ("ff02::/64", "IPv6 multicast"),
            ("ff00::/8", "IPv6 multicast"),
        ];
        for (subnet, what) in cases {
            let err = parse_subnet(subnet).unwrap_err();
            assert!(
                matches!(err, ModelError::UnusableSubnet { .. }),
                "{subnet}: {err}"
            );
            assert!(err.to_string().contains(what), "{subnet}: {err}");
        }
    }

    #[test]
    fn subnets_without_room_for_an_endpoint_are_refused() {
        for (subnet, longest) in [
            ("10.0.0.0/31", "/30"),
            ("10.0.0.7/32", "/30"),
            ("fd00::/127", "/126"),
            ("fd00::1/128", "/126"),
        ] {
            let err = parse_subnet(subnet).unwrap_err();
            assert!(
                matches!(err, ModelError::SubnetTooSmall { .. }),
                "{subnet}: {err}"
            );
            assert!(
                err.to_string().contains(&format!(
                    "longest usable IPv{} prefix is {longest}",
                    if subnet.contains(':') { 6 } else { 4 }
                )),
                "{subnet}: {err}"
            );
        }
        // Host bits set stay a typo to point out, before anything else.
        assert!(matches!(
            parse_subnet("10.0.0.5/24"),
            Err(ModelError::NotCanonical { .. })
        ));
    }

    #[test]
    fn zero_and_group_macs_are_refused() {
        for zero in ["00:00:00:00:00:00", "00-00-00-00-00-00"] {
            assert!(
                matches!(zero.parse::<MacAddr>(), Err(ModelError::ZeroMac(_))),
                "{zero}"
            );
        }
        for group in [
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
        ] {
            assert!(
                matches!(group.parse::<MacAddr>(), Err(ModelError::MulticastMac(_))),
                "{group}"
            );
        }
        assert!("02:00:00:00:00:00".parse::<MacAddr>().is_ok());
    }
}
