//! berth's nftables table `inet berth`: a fixed ruleset whose every decision is a lookup in a
//! set or map, so that networks and endpoints change only elements.
//!
//! Everything is spoken over nfnetlink in-process; no `nft` process, so the daemon needs no
//! nftables package (`nft` is only a test tool).
//! - The whole table (rules and every element) is written by [`install`] as one batch, which
//!   the kernel applies as one transaction: at daemon start, when a network comes or goes, and
//!   when something else changed berth's rules or elements ([`check`] says what).
//! - An endpoint's published ports are map elements added and removed on their own
//!   ([`add_forwards`], [`delete_forwards`]), one atomic batch each.
//! - The chain `user` is the operator's: jumped to before any forwarding decision of berth's,
//!   created if missing and never flushed.
//! - [`generation`] is nftables' change counter: while it stays put, nothing needs checking.
//! - Services (virtual IPs and node ports load-balanced over backends) are maps too, whose
//!   elements belong to the [`LoadBalancer`]: [`install`] creates those maps but leaves their
//!   elements alone, and [`check`] only sees that they exist.
//! - Network policy's sets are like the load balancer's maps: their elements are written by
//!   [`PolicySets`] alone.

mod expr;
pub(crate) mod nfnl;
mod policy;
mod services;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use berth_model::PortMapping;
use ipnet::IpNet;

use self::expr::{Expr, Refs};
use self::nfnl::{
    Batch, MAX_ATTR, NFT_MSG_DELRULE, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYCHAIN, NFT_MSG_DESTROYSET,
    NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM, NFT_MSG_GETTABLE,
    NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE,
    NFT_SET_ELEM_INTERVAL_END, NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_LIST_ELEM,
    NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_KEY_END,
    NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_SET_ID,
    NFTA_SET_ELEM_LIST_TABLE, NFTA_VERDICT_CHAIN, NFTA_VERDICT_CODE, NLM_F_APPEND, NLM_F_CREATE,
    Nfnetlink, attr, attr_str, attr_u32, attrs, covers, enoent, put_attr, put_nested, put_str,
    put_u32,
};
pub use self::policy::{Applied, MAX_ELEMENTS_PER_TRANSACTION, PolicySets};
pub use self::services::{Backend, Frontend, LoadBalancer, MAX_BACKENDS, Pool};
use crate::{DataplaneError, Result};

pub const TABLE: &str = "berth";

// Attribute types (linux/netfilter/nf_tables.h).
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFT_TABLE_F_DORMANT: u32 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFT_SET_ANONYMOUS: u32 = 1;
const NFT_SET_CONSTANT: u32 = 2;
const NFT_SET_INTERVAL: u32 = 4;
const NFT_SET_MAP: u32 = 8;
const NFT_SET_TIMEOUT: u32 = 0x10;
/// Updated from the packet path (`flags dynamic`).
const NFT_SET_EVAL: u32 = 0x20;
const NF_ACCEPT: u32 = 1;

// nft's data types, and how it numbers a concatenation of them.
const IFNAME: u32 = 41;
const IPV4_ADDR: u32 = 7;
const IPV6_ADDR: u32 = 8;
const INET_PROTO: u32 = 12;
const INET_SERVICE: u32 = 13;
/// A plain number (what `numgen` makes), in host order.
const INTEGER: u32 = 4;
/// A map's value that is a verdict (`NFT_DATA_VERDICT`), of no fixed length.
const VERDICT: (u32, u32) = (0xffff_ff00, 0);

const fn concat(types: &[u32]) -> u32 {
    let mut t = 0;
    let mut i = 0;
    while i < types.len() {
        t = (t << 6) | types[i];
        i += 1;
    }
    t
}

// What nft keeps in a set's user data for its own listing (byte order, `typeof` of a
// concatenation), copied from what it sends, so that `nft list` shows berth's sets as it
// shows its own.
const UD_HOST_ORDER: &[u8] = &[0, 4, 1, 0, 0, 0];
const UD_NET_ORDER: &[u8] = &[0, 4, 2, 0, 0, 0];
const UD_CONCAT: &[u8] = &[0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
const UD_CONCAT_MAP: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 4, 8, 0, 4, 13, 0, 0, 0, 1,
    0, 6, 4, 0, 0, 0, 0,
];
const UD_CONCAT_VMAP: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
];
// The maps of backends are declared with `typeof` (their keys hold `numgen` slots, and nft's
// types have no plain number), which nft keeps as the expressions themselves. nft 1.0.6 lists
// them, but cannot add a rule that uses one it reads back from the kernel ("conflicting
// protocols specified: ip vs. th"): berth's rules are written whole, so only a second
// `nft -f` of [`ruleset`] over an existing table meets that. (`tcp dport` values would avoid
// it, but then nft adds `meta l4proto tcp` to the first rule that uses the map.)
/// `typeof ip daddr . meta l4proto . th dport . numgen random mod 256 : ip daddr . th dport`
const UD_BACKENDS4: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 96, 0, 4, 13, 0, 0, 0, 1, 88, 0, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 14, 0, 4, 9, 0, 0, 0, 1, 6, 0, 4, 16, 0, 0, 0,
    2, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0,
    1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 0, 1, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44,
    0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
/// `typeof ip6 daddr . meta l4proto . th dport . numgen random mod 256 : ip6 daddr . th dport`
const UD_BACKENDS6: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 96, 0, 4, 13, 0, 0, 0, 1, 88, 0, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 14, 0, 4, 9, 0, 0, 0, 1, 6, 0, 4, 16, 0, 0, 0,
    2, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0,
    1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 0, 1, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44,
    0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
/// `typeof meta l4proto . th dport . numgen random mod 256 : ip daddr . th dport`
const UD_NODEPORT_BACKENDS4: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 74, 0, 4, 13, 0, 0, 0, 1, 66, 0, 14, 0, 4, 9, 0, 0, 0,
    1, 6, 0, 4, 16, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0,
    2, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 0, 1, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52,
    0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0,
    1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
/// `typeof meta l4proto . th dport . numgen random mod 256 : ip6 daddr . th dport`
const UD_NODEPORT_BACKENDS6: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 74, 0, 4, 13, 0, 0, 0, 1, 66, 0, 14, 0, 4, 9, 0, 0, 0,
    1, 6, 0, 4, 16, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0,
    2, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 0, 1, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52,
    0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0,
    1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];
/// One named set or map of the table.
struct SetSpec {
    name: &'static str,
    /// Its declaration in nft's language.
    nft: &'static str,
    flags: u32,
    key_type: u32,
    key_len: u32,
    /// A map's value type and length.
    data: Option<(u32, u32)>,
    /// The most elements it takes (0: no limit; a map filled from the packet path needs one).
    size: u32,
    userdata: &'static [u8],
    /// Who writes its elements.
    owner: Owner,
}

/// Who writes a set's elements. [`install`], [`set_elements`] and [`check`] flush, fill and
/// compare the elements of the table's own sets only; the others' they create, or see that
/// they exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// [`install`] and [`set_elements`], from the networks, forwards and services they are
    /// given.
    Table,
    /// The [`LoadBalancer`].
    LoadBalancer,
    /// [`PolicySets`].
    Policy,
}

impl SetSpec {
    fn kind(&self) -> &'static str {
        if self.data.is_some() { "map" } else { "set" }
    }
}

const fn set(name: &'static str, nft: &'static str, key: (u32, u32), ud: &'static [u8]) -> SetSpec {
    SetSpec {
        name,
        nft,
        flags: 0,
        key_type: key.0,
        key_len: key.1,
        data: None,
        size: 0,
        userdata: ud,
        owner: Owner::Table,
    }
}

const fn map(name: &'static str, nft: &'static str, key: (u32, u32), data: (u32, u32)) -> SetSpec {
    SetSpec {
        name,
        nft,
        flags: NFT_SET_MAP,
        key_type: key.0,
        key_len: key.1,
        data: Some(data),
        size: 0,
        userdata: UD_CONCAT_MAP,
        owner: Owner::Table,
    }
}

/// A map of the load balancer's: a verdict map from a frontend to its chain.
const fn lb_vmap(name: &'static str, nft: &'static str, key: (u32, u32)) -> SetSpec {
    SetSpec {
        userdata: UD_CONCAT_VMAP,
        owner: Owner::LoadBalancer,
        ..map(name, nft, key, VERDICT)
    }
}

/// A map of the load balancer's: a frontend's slots, declared with `typeof` (`ud`).
const fn lb_slots(
    name: &'static str,
    nft: &'static str,
    key: (u32, u32),
    data: (u32, u32),
    ud: &'static [u8],
) -> SetSpec {
    SetSpec {
        userdata: ud,
        owner: Owner::LoadBalancer,
        ..map(name, nft, key, data)
    }
}

/// A policy map from a target's address to its profile's chain; its elements are
/// [`PolicySets`]'.
const fn policy_targets(name: &'static str, nft: &'static str, key: (u32, u32)) -> SetSpec {
    SetSpec {
        owner: Owner::Policy,
        userdata: UD_ADDR_VMAP,
        ..map(name, nft, key, VERDICT)
    }
}

/// What nft keeps for `type ipv4_addr : verdict` (or `ipv6_addr`): the key's byte order and
/// the value's.
const UD_ADDR_VMAP: &[u8] = &[0, 4, 2, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0];

/// Each part of a concatenation takes a multiple of 4 bytes.
const V4_PORT: (u32, u32) = (concat(&[IPV4_ADDR, INET_SERVICE]), 8);
const V6_PORT: (u32, u32) = (concat(&[IPV6_ADDR, INET_SERVICE]), 20);
const PROTO_PORT: (u32, u32) = (concat(&[INET_PROTO, INET_SERVICE]), 8);
const V4_PROTO_PORT: (u32, u32) = (concat(&[IPV4_ADDR, INET_PROTO, INET_SERVICE]), 12);
const V6_PROTO_PORT: (u32, u32) = (concat(&[IPV6_ADDR, INET_PROTO, INET_SERVICE]), 24);

const SETS: &[SetSpec] = &[
    set("bridges", "type ifname;", (IFNAME, 16), UD_HOST_ORDER),
    set(
        "intra",
        "type ifname . ifname;",
        (concat(&[IFNAME, IFNAME]), 32),
        UD_CONCAT,
    ),
    set("internal", "type ifname;", (IFNAME, 16), UD_HOST_ORDER),
    SetSpec {
        flags: NFT_SET_INTERVAL,
        ..set(
            "masq4",
            "type ipv4_addr; flags interval;",
            (IPV4_ADDR, 4),
            UD_NET_ORDER,
        )
    },
    SetSpec {
        flags: NFT_SET_INTERVAL,
        ..set(
            "masq6",
            "type ipv6_addr; flags interval;",
            (IPV6_ADDR, 16),
            UD_NET_ORDER,
        )
    },
    set("dns4", "type ipv4_addr . inet_service;", V4_PORT, UD_CONCAT),
    set("dns6", "type ipv6_addr . inet_service;", V6_PORT, UD_CONCAT),
    map(
        "ports4_any",
        "type inet_proto . inet_service : ipv4_addr . inet_service;",
        (concat(&[INET_PROTO, INET_SERVICE]), 8),
        V4_PORT,
    ),
    map(
        "ports4_ip",
        "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;",
        (concat(&[IPV4_ADDR, INET_PROTO, INET_SERVICE]), 12),
        V4_PORT,
    ),
    map(
        "ports6_any",
        "type inet_proto . inet_service : ipv6_addr . inet_service;",
        (concat(&[INET_PROTO, INET_SERVICE]), 8),
        V6_PORT,
    ),
    map(
        "ports6_ip",
        "type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service;",
        (concat(&[IPV6_ADDR, INET_PROTO, INET_SERVICE]), 24),
        V6_PORT,
    ),
    // Services. The configured service ranges: what is addressed there and not load-balanced
    // is refused.
    SetSpec {
        flags: NFT_SET_INTERVAL,
        ..set(
            "service_ranges4",
            "type ipv4_addr; flags interval;",
            (IPV4_ADDR, 4),
            UD_NET_ORDER,
        )
    },
    SetSpec {
        flags: NFT_SET_INTERVAL,
        ..set(
            "service_ranges6",
            "type ipv6_addr; flags interval;",
            (IPV6_ADDR, 16),
            UD_NET_ORDER,
        )
    },
    // The load balancer's: frontend -> `goto lb_N` (N backends; `lbn_N` for a node port);
    // frontend . slot -> backend, slots 0 to N - 1.
    lb_vmap(
        "svc4",
        "type ipv4_addr . inet_proto . inet_service : verdict;",
        V4_PROTO_PORT,
    ),
    lb_vmap(
        "svc6",
        "type ipv6_addr . inet_proto . inet_service : verdict;",
        V6_PROTO_PORT,
    ),
    lb_slots(
        "backends4",
        "typeof ip daddr . meta l4proto . th dport . numgen random mod 256 : ip daddr . th dport;",
        (concat(&[IPV4_ADDR, INET_PROTO, INET_SERVICE, INTEGER]), 16),
        V4_PORT,
        UD_BACKENDS4,
    ),
    lb_slots(
        "backends6",
        "typeof ip6 daddr . meta l4proto . th dport . numgen random mod 256 : ip6 daddr . th dport;",
        (concat(&[IPV6_ADDR, INET_PROTO, INET_SERVICE, INTEGER]), 28),
        V6_PORT,
        UD_BACKENDS6,
    ),
    lb_vmap(
        "nodeports4",
        "type inet_proto . inet_service : verdict;",
        PROTO_PORT,
    ),
    lb_vmap(
        "nodeports6",
        "type inet_proto . inet_service : verdict;",
        PROTO_PORT,
    ),
    // The node ports that have backends, for the rules of nat postrouting, which may not look
    // into `nodeports4`/`6`: the kernel would check their chains, which DNAT, for that hook.
    SetSpec {
        owner: Owner::LoadBalancer,
        ..set(
            "nodeport_keys4",
            "type inet_proto . inet_service;",
            PROTO_PORT,
            UD_CONCAT,
        )
    },
    SetSpec {
        owner: Owner::LoadBalancer,
        ..set(
            "nodeport_keys6",
            "type inet_proto . inet_service;",
            PROTO_PORT,
            UD_CONCAT,
        )
    },
    lb_slots(
        "nodeport_backends4",
        "typeof meta l4proto . th dport . numgen random mod 256 : ip daddr . th dport;",
        (concat(&[INET_PROTO, INET_SERVICE, INTEGER]), 12),
        V4_PORT,
        UD_NODEPORT_BACKENDS4,
    ),
    lb_slots(
        "nodeport_backends6",
        "typeof meta l4proto . th dport . numgen random mod 256 : ip6 daddr . th dport;",
        (concat(&[INET_PROTO, INET_SERVICE, INTEGER]), 12),
        V6_PORT,
        UD_NODEPORT_BACKENDS6,
    ),
    // Client-IP affinity: client . frontend address . protocol . port -> backend, written by
    // the packet path (the `remember_*` chains), deleted by the load balancer.
    SetSpec {
        flags: NFT_SET_MAP | NFT_SET_TIMEOUT | NFT_SET_EVAL,
        size: AFFINITY_SIZE,
        owner: Owner::LoadBalancer,
        ..map(
            "affinity4",
            "type ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; size 1048576; flags dynamic,timeout;",
            (
                concat(&[IPV4_ADDR, IPV4_ADDR, INET_PROTO, INET_SERVICE]),
                16,
            ),
            V4_PORT,
        )
    },
    SetSpec {
        flags: NFT_SET_MAP | NFT_SET_TIMEOUT | NFT_SET_EVAL,
        size: AFFINITY_SIZE,
        owner: Owner::LoadBalancer,
        ..map(
            "affinity6",
            "type ipv6_addr . ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; size 1048576; flags dynamic,timeout;",
            (
                concat(&[IPV6_ADDR, IPV6_ADDR, INET_PROTO, INET_SERVICE]),
                40,
            ),
            V6_PORT,
        )
    },
    // Affine frontends -> `jump remember_<timeout>`.
    lb_vmap(
        "affine4",
        "type ipv4_addr . inet_proto . inet_service : verdict;",
        V4_PROTO_PORT,
    ),
    lb_vmap(
        "affine6",
        "type ipv6_addr . inet_proto . inet_service : verdict;",
        V6_PROTO_PORT,
    ),
    lb_vmap(
        "nodeport_affine4",
        "type inet_proto . inet_service : verdict;",
        PROTO_PORT,
    ),
    lb_vmap(
        "nodeport_affine6",
        "type inet_proto . inet_service : verdict;",
        PROTO_PORT,
    ),
    // Backends on this host, as `addr . addr`: the connections of one to itself.
    SetSpec {
        owner: Owner::LoadBalancer,
        ..set(
            "hairpin4",
            "type ipv4_addr . ipv4_addr;",
            (concat(&[IPV4_ADDR, IPV4_ADDR]), 8),
            UD_CONCAT,
        )
    },
    SetSpec {
        owner: Owner::LoadBalancer,
        ..set(
            "hairpin6",
            "type ipv6_addr . ipv6_addr;",
            (concat(&[IPV6_ADDR, IPV6_ADDR]), 32),
            UD_CONCAT,
        )
    },
    // Network policy (see module `policy`): each target to its profile's chain.
    policy_targets("pol_tgt_in4", "type ipv4_addr : verdict;", (IPV4_ADDR, 4)),
    policy_targets("pol_tgt_in6", "type ipv6_addr : verdict;", (IPV6_ADDR, 16)),
    policy_targets("pol_tgt_eg4", "type ipv4_addr : verdict;", (IPV4_ADDR, 4)),
    policy_targets("pol_tgt_eg6", "type ipv6_addr : verdict;", (IPV6_ADDR, 16)),
];

/// How many clients' affinities a family's map holds at most; beyond that a new client is
/// balanced but not remembered.
const AFFINITY_SIZE: u32 = 1 << 20;

/// The set of this name.
fn spec(name: &str) -> &'static SetSpec {
    SETS.iter()
        .find(|s| s.name == name)
        .expect("a set of berth's")
}

/// The set's id within an install batch, by which rules of the same batch find it.
fn set_id(name: &str) -> u32 {
    SETS.iter()
        .position(|s| s.name == name)
        .map_or(0, |i| i as u32 + 1)
}

/// A base chain's hook.
struct Hook {
    kind: &'static str,
    /// `NF_INET_*`
    hook: u32,
    priority: i32,
    /// The same in nft's language.
    nft: &'static str,
}

/// The operator's chain: created if missing, never flushed.
const USER_CHAIN: &str = "user";

const CHAINS: &[(&str, Option<Hook>)] = &[
    (
        "forward",
        Some(Hook {
            kind: "filter",
            hook: 2,
            priority: 0,
            nft: "type filter hook forward priority filter; policy accept;",
        }),
    ),
    ("into_network", None),
    ("unserved", None),
    // What comes from the networks to this host passes network policy too.
    (
        "input",
        Some(Hook {
            kind: "filter",
            hook: 1,
            priority: 0,
            nft: "type filter hook input priority filter; policy accept;",
        }),
    ),
    (policy::CHAIN, None),
    (
        "guard",
        Some(Hook {
            kind: "filter",
            hook: 0,
            priority: -300,
            nft: "type filter hook prerouting priority raw; policy accept;",
        }),
    ),
    (
        "guard_out",
        Some(Hook {
            kind: "filter",
            hook: 3,
            priority: -300,
            nft: "type filter hook output priority raw; policy accept;",
        }),
    ),
    (
        "filter_out",
        Some(Hook {
            kind: "filter",
            hook: 3,
            priority: 0,
            nft: "type filter hook output priority filter; policy accept;",
        }),
    ),
    (
        "prerouting",
        Some(Hook {
            kind: "nat",
            hook: 0,
            priority: -100,
            nft: "type nat hook prerouting priority dstnat; policy accept;",
        }),
    ),
    (
        "output",
        Some(Hook {
            kind: "nat",
            hook: 3,
            priority: -100,
            nft: "type nat hook output priority -100; policy accept;",
        }),
    ),
    ("services", None),
    ("publish", None),
    (
        "postrouting",
        Some(Hook {
            kind: "nat",
            hook: 4,
            priority: 100,
            nft: "type nat hook postrouting priority srcnat; policy accept;",
        }),
    ),
    ("into_network_nat", None),
];

/// The chains that balance over N backends are `lb_N` for a VIP, `lbn_N` for a node port.
fn lb_prefix(nodeport: bool) -> &'static str {
    if nodeport { "lbn_" } else { "lb_" }
}

fn lb_chain(nodeport: bool, n: u32) -> String {
    format!("{}{n}", lb_prefix(nodeport))
}

/// Every chain of berth's but the operator's: [`CHAINS`], then `lb_1` to `lb_256` and `lbn_1`
/// to `lbn_256`.
fn chains() -> Vec<(String, Option<&'static Hook>)> {
    let named = CHAINS.iter().map(|(c, h)| (c.to_string(), h.as_ref()));
    let balancing = [false, true]
        .into_iter()
        .flat_map(|np| (1..=MAX_BACKENDS as u32).map(move |n| (lb_chain(np, n), None)));
    named.chain(balancing).collect()
}

/// A base chain's type, hook, priority and policy, as `NEWCHAIN` carries them.
fn hook_attrs(h: &Hook) -> Vec<u8> {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_CHAIN_TYPE, h.kind);
    put_u32(&mut a, NFTA_CHAIN_POLICY, NF_ACCEPT);
    put_nested(&mut a, NFTA_CHAIN_HOOK, |n| {
        put_u32(n, NFTA_HOOK_HOOKNUM, h.hook);
        put_u32(n, NFTA_HOOK_PRIORITY, h.priority as u32);
    });
    a
}

/// One rule: its chain, its text in nft's language and the expressions nft makes of it
/// (checked against nft itself by the kernel tests).
struct Rule {
    chain: String,
    nft: String,
    exprs: Vec<Expr>,
}

fn rule(chain: &str, nft: &str, parts: &[Vec<Expr>]) -> Rule {
    Rule {
        chain: chain.to_string(),
        nft: nft.to_string(),
        exprs: parts.concat(),
    }
}

/// `meta nfproto ipv4` or `ipv6`: in the inet family, `ip ...` and `ip6 ...` test the
/// packet's family first.
fn family(ipv6: bool) -> Vec<Expr> {
    use self::expr::{MetaKey::NfProto, NFPROTO_IPV4, NFPROTO_IPV6, REG1, cmp_eq, meta};
    let f = if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
    vec![meta(NfProto, REG1), cmp_eq(REG1, &[f])]
}

/// `meta l4proto { tcp, udp, sctp }`
fn tcp_udp_sctp() -> Vec<Expr> {
    use self::expr::{L4_PROTOCOLS, MetaKey::L4Proto, REG1, lookup_anonymous, meta};
    vec![meta(L4Proto, REG1), lookup_anonymous(REG1, &L4_PROTOCOLS)]
}

/// `ct status dnat`
fn ct_status_dnat() -> Vec<Expr> {
    use self::expr::{CtKey, IPS_DST_NAT, REG1, and, ct, nonzero};
    vec![
        ct(CtKey::Status, REG1),
        and(REG1, IPS_DST_NAT),
        nonzero(REG1),
    ]
}

fn rules(services: &ServiceRules) -> Vec<Rule> {
    use self::expr::{
        Base::{Network, Transport},
        CT_ESTABLISHED_RELATED, CtKey, IPPROTO_UDP,
        MetaKey::{IifName, L4Proto, OifName},
        NFPROTO_IPV4, NFPROTO_IPV6, REG1, REG2, REG32_01, REG32_02, REG32_05, RTN_LOCAL, accept,
        and, cmp_eq, ct, dnat, drop, fib_daddr_type, goto, jump, lookup, map, masq, meta, nonzero,
        notrack, payload,
    };
    let ip = || family(false);
    let ip6 = || family(true);
    let udp = || vec![meta(L4Proto, REG1), cmp_eq(REG1, &[IPPROTO_UDP])];
    let local_goto_publish = || {
        vec![
            fib_daddr_type(REG1),
            cmp_eq(REG1, &RTN_LOCAL.to_ne_bytes()),
            goto("publish"),
        ]
    };
    let (first, last) = service_rules(services);
    // The operator's restrictions come before anything berth allows, then network policy.
    let mut all = vec![
        rule("forward", "jump user", &[vec![jump(USER_CHAIN)]]),
        rule(
            "forward",
            &format!("jump {}", policy::CHAIN),
            &[vec![jump(policy::CHAIN)]],
        ),
    ];
    // Services come first where they share a chain (see [`service_rules`]).
    all.extend(first);
    all.extend([
        rule(
            "forward",
            "oifname @bridges goto into_network",
            &[vec![
                meta(OifName, REG1),
                lookup(REG1, "bridges"),
                goto("into_network"),
            ]],
        ),
        // An internal network has no way out.
        rule(
            "forward",
            "iifname @internal drop",
            &[vec![meta(IifName, REG1), lookup(REG1, "internal"), drop()]],
        ),
        // Within one network (bridged traffic passes here when br_netfilter is loaded).
        rule(
            "into_network",
            "iifname . oifname @intra accept",
            &[vec![
                meta(IifName, REG1),
                meta(OifName, REG2),
                lookup(REG1, "intra"),
                accept(),
            ]],
        ),
        rule(
            "into_network",
            "oifname @internal drop",
            &[vec![meta(OifName, REG1), lookup(REG1, "internal"), drop()]],
        ),
        rule(
            "into_network",
            "ct state established,related accept",
            &[vec![
                ct(CtKey::State, REG1),
                and(REG1, CT_ESTABLISHED_RELATED),
                nonzero(REG1),
                accept(),
            ]],
        ),
        // Published ports, from anywhere, including other berth networks.
        rule(
            "into_network",
            "ct status dnat accept",
            &[ct_status_dnat(), vec![accept()]],
        ),
        // Everything else into a network: other networks (isolation) and other hosts
        // reaching container addresses directly.
        rule("into_network", "drop", &[vec![drop()]]),
        // route_localnet is on for bridges (so 127.0.0.1 can be published); a container must
        // not use it to reach the host's loopback services.
        rule(
            "guard",
            "iifname @bridges ip daddr 127.0.0.0/8 drop",
            &[
                vec![meta(IifName, REG1), lookup(REG1, "bridges")],
                ip(),
                vec![payload(Network, 16, 1, REG1), cmp_eq(REG1, &[127]), drop()],
            ],
        ),
        // berth's DNS servers on the gateways: their UDP traffic is not tracked (as
        // Kubernetes' NodeLocal DNSCache does), which saves two conntrack lookups and an
        // entry per query and keeps a published host port 53 from capturing them.
        // Address and port are one concatenated key, from register 1 on.
        rule(
            "guard",
            "ip daddr . udp dport @dns4 notrack",
            &[
                ip(),
                udp(),
                vec![
                    payload(Network, 16, 4, REG1),
                    payload(Transport, 2, 2, REG32_01),
                    lookup(REG1, "dns4"),
                    notrack(),
                ],
            ],
        ),
        rule(
            "guard",
            "ip6 daddr . udp dport @dns6 notrack",
            &[
                ip6(),
                udp(),
                vec![
                    payload(Network, 24, 16, REG1),
                    payload(Transport, 2, 2, REG2),
                    lookup(REG1, "dns6"),
                    notrack(),
                ],
            ],
        ),
        rule(
            "guard_out",
            "ip saddr . udp sport @dns4 notrack",
            &[
                ip(),
                udp(),
                vec![
                    payload(Network, 12, 4, REG1),
                    payload(Transport, 0, 2, REG32_01),
                    lookup(REG1, "dns4"),
                    notrack(),
                ],
            ],
        ),
        rule(
            "guard_out",
            "ip6 saddr . udp sport @dns6 notrack",
            &[
                ip6(),
                udp(),
                vec![
                    payload(Network, 8, 16, REG1),
                    payload(Transport, 0, 2, REG2),
                    lookup(REG1, "dns6"),
                    notrack(),
                ],
            ],
        ),
        rule(
            "prerouting",
            "fib daddr type local goto publish",
            &[local_goto_publish()],
        ),
        rule(
            "output",
            "fib daddr type local goto publish",
            &[local_goto_publish()],
        ),
        // The maps' keys and values are concatenations too: the value (address . port)
        // lands in register 1 and the 4-byte register after the address.
        rule(
            "publish",
            "meta nfproto ipv4 meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @ports4_ip",
            &[
                ip(),
                tcp_udp_sctp(),
                vec![
                    payload(Network, 16, 4, REG1),
                    meta(L4Proto, REG32_01),
                    payload(Transport, 2, 2, REG32_02),
                    map(REG1, "ports4_ip", REG1),
                    dnat(NFPROTO_IPV4, REG1, REG32_01),
                ],
            ],
        ),
        rule(
            "publish",
            "meta nfproto ipv4 meta l4proto { tcp, udp, sctp } dnat ip to meta l4proto . th dport map @ports4_any",
            &[
                ip(),
                tcp_udp_sctp(),
                vec![
                    meta(L4Proto, REG1),
                    payload(Transport, 2, 2, REG32_01),
                    map(REG1, "ports4_any", REG1),
                    dnat(NFPROTO_IPV4, REG1, REG32_01),
                ],
            ],
        ),
        rule(
            "publish",
            "meta nfproto ipv6 meta l4proto { tcp, udp, sctp } dnat ip6 to ip6 daddr . meta l4proto . th dport map @ports6_ip",
            &[
                ip6(),
                tcp_udp_sctp(),
                vec![
                    payload(Network, 24, 16, REG1),
                    meta(L4Proto, REG2),
                    payload(Transport, 2, 2, REG32_05),
                    map(REG1, "ports6_ip", REG1),
                    dnat(NFPROTO_IPV6, REG1, REG2),
                ],
            ],
        ),
        rule(
            "publish",
            "meta nfproto ipv6 meta l4proto { tcp, udp, sctp } dnat ip6 to meta l4proto . th dport map @ports6_any",
            &[
                ip6(),
                tcp_udp_sctp(),
                vec![
                    meta(L4Proto, REG1),
                    payload(Transport, 2, 2, REG32_01),
                    map(REG1, "ports6_any", REG1),
                    dnat(NFPROTO_IPV6, REG1, REG2),
                ],
            ],
        ),
        rule(
            "postrouting",
            "oifname @bridges goto into_network_nat",
            &[vec![
                meta(OifName, REG1),
                lookup(REG1, "bridges"),
                goto("into_network_nat"),
            ]],
        ),
        rule(
            "postrouting",
            "ip saddr @masq4 masquerade",
            &[
                ip(),
                vec![payload(Network, 12, 4, REG1), lookup(REG1, "masq4"), masq()],
            ],
        ),
        rule(
            "postrouting",
            "ip6 saddr @masq6 masquerade",
            &[
                ip6(),
                vec![payload(Network, 8, 16, REG1), lookup(REG1, "masq6"), masq()],
            ],
        ),
        // Hairpin: a container reaching a published port through a host address gets the
        // answer back through the host only if the server sees the host as the client.
        rule(
            "into_network_nat",
            "ct status dnat ip saddr @masq4 masquerade",
            &[
                ct_status_dnat(),
                ip(),
                vec![payload(Network, 12, 4, REG1), lookup(REG1, "masq4"), masq()],
            ],
        ),
        rule(
            "into_network_nat",
            "ct status dnat ip6 saddr @masq6 masquerade",
            &[
                ct_status_dnat(),
                ip6(),
                vec![payload(Network, 8, 16, REG1), lookup(REG1, "masq6"), masq()],
            ],
        ),
        // A port published on 127.0.0.1 and reached from this host.
        rule(
            "into_network_nat",
            "ip saddr 127.0.0.0/8 masquerade",
            &[
                ip(),
                vec![payload(Network, 12, 1, REG1), cmp_eq(REG1, &[127]), masq()],
            ],
        ),
    ]);
    all.extend(last);
    all.extend(policy::rules());
    all
}

/// The rules of services: those that go first in their chains and those that go last.
///
/// A new connection to a frontend is DNATed in nat `prerouting`/`output` (chain `services`,
/// jumped to first): to the backend its client had last time if the frontend is affine
/// (`affinity4`/`6`), else to slot `numgen random mod N` of its `N` backends, in chain `lb_N`
/// (`lbn_N` for a node port, from chain `publish`, which sees local destinations), where the
/// frontend's element in `svc4`/`6` (`nodeports4`/`6`) sends it.
///
/// In nat `postrouting`, an affine frontend's connection has its client remembered (chain
/// `remember_<seconds>`, per timeout); a node port's connection is source-NATed to this host's
/// address (backends on other hosts reply there, not to the gateway every host has); a
/// backend's connection to itself is masqueraded (hairpin), and other service traffic keeps
/// its client's address. In filter `forward` and `output`, what is addressed to the service
/// ranges and was not DNATed is refused at once.
///
/// Cost: a frontend whose number of backends changes gets a new `goto lb_N` element, and the
/// kernel (6.18) then validates every jump of the table again, which walks every frontend's
/// element (some 80 ns each). A plain map of counts looked up into a fixed verdict map of the
/// `lb_N` would avoid that, but nft 1.0.6 aborts listing a lookup keyed by a map's value, and
/// `nft list ruleset` must keep working on berth's hosts.
fn service_rules(services: &ServiceRules) -> (Vec<Rule>, Vec<Rule>) {
    use self::expr::{
        Base::{Network, Transport},
        CtKey, ICMPX_PORT_UNREACH, IPPROTO_TCP,
        MetaKey::L4Proto,
        NFPROTO_IPV4, NFPROTO_IPV6, REG_VERDICT, REG1, REJECT_ICMPX, REJECT_TCP_RST, accept,
        cmp_eq, ct_original, dnat, goto, immediate, jump, lookup, map, masq, meta, not_in, payload,
        reg, reject, snat,
    };
    let mut first = vec![
        rule("prerouting", "jump services", &[vec![jump("services")]]),
        rule("output", "jump services", &[vec![jump("services")]]),
    ];
    let mut last = Vec::new();
    for ipv6 in [false, true] {
        let (ip, a, nfproto) = if ipv6 {
            ("ip6", 16, NFPROTO_IPV6)
        } else {
            ("ip", 4, NFPROTO_IPV4)
        };
        let (saddr, daddr) = if ipv6 { (8, 24) } else { (12, 16) };
        let v = if ipv6 { "6" } else { "4" };
        let dst_ip = if ipv6 { CtKey::DstIp6 } else { CtKey::DstIp };
        let in_ranges: &'static str = if ipv6 {
            "service_ranges6"
        } else {
            "service_ranges4"
        };
        let [
            affinity,
            svc,
            nodeports,
            nodeport_keys,
            affine,
            nodeport_affine,
            hairpin,
        ] = [
            "affinity",
            "svc",
            "nodeports",
            "nodeport_keys",
            "affine",
            "nodeport_affine",
            "hairpin",
        ]
        .map(|m| spec(&format!("{m}{v}")).name);
        // Keys are concatenations, each part from a 4-byte boundary on; a map's value lands
        // in register 1 onwards.
        first.push(rule(
            "services",
            &format!(
                "meta nfproto ipv{v} dnat {ip} to {ip} saddr . {ip} daddr . meta l4proto . th dport map @{affinity}"
            ),
            &[
                family(ipv6),
                vec![
                    payload(Network, saddr, a, REG1),
                    payload(Network, daddr, a, reg(a)),
                    meta(L4Proto, reg(2 * a)),
                    payload(Transport, 2, 2, reg(2 * a + 4)),
                    map(REG1, affinity, REG1),
                    dnat(nfproto, REG1, reg(a)),
                ],
            ],
        ));
        first.push(rule(
            "services",
            &format!("meta nfproto ipv{v} {ip} daddr . meta l4proto . th dport vmap @{svc}"),
            &[
                family(ipv6),
                vec![
                    payload(Network, daddr, a, REG1),
                    meta(L4Proto, reg(a)),
                    payload(Transport, 2, 2, reg(a + 4)),
                    map(REG1, svc, REG_VERDICT),
                ],
            ],
        ));
        last.push(rule(
            "publish",
            &format!("meta nfproto ipv{v} meta l4proto . th dport vmap @{nodeports}"),
            &[
                family(ipv6),
                vec![
                    meta(L4Proto, REG1),
                    payload(Transport, 2, 2, reg(4)),
                    map(REG1, nodeports, REG_VERDICT),
                ],
            ],
        ));
        // The connection as it first was: to the frontend's address and port.
        let original = |addr_key: CtKey| {
            vec![
                ct_original(addr_key, REG1),
                meta(L4Proto, reg(a)),
                ct_original(CtKey::ProtoDst, reg(a + 4)),
            ]
        };
        let node_port = || {
            vec![
                ct_original(dst_ip, REG1),
                not_in(REG1, in_ranges),
                meta(L4Proto, REG1),
                ct_original(CtKey::ProtoDst, reg(4)),
            ]
        };
        first.push(rule(
            "postrouting",
            &format!(
                "meta l4proto {{ tcp, udp, sctp }} ct status dnat ct original {ip} daddr . meta l4proto . ct original proto-dst vmap @{affine}"
            ),
            &[
                tcp_udp_sctp(),
                ct_status_dnat(),
                original(dst_ip),
                vec![map(REG1, affine, REG_VERDICT)],
            ],
        ));
        first.push(rule(
            "postrouting",
            &format!(
                "meta l4proto {{ tcp, udp, sctp }} ct status dnat ct original {ip} daddr != @{in_ranges} meta l4proto . ct original proto-dst vmap @{nodeport_affine}"
            ),
            &[
                tcp_udp_sctp(),
                ct_status_dnat(),
                node_port(),
                vec![map(REG1, nodeport_affine, REG_VERDICT)],
            ],
        ));
        let source = if ipv6 {
            services.nodeport_source6.map(IpAddr::V6)
        } else {
            services.nodeport_source4.map(IpAddr::V4)
        };
        let (text, nat) = match source {
            Some(addr) => (
                format!("snat {ip} to {addr}"),
                vec![immediate(REG1, &ip_bytes(addr)), snat(nfproto, REG1)],
            ),
            None => ("masquerade".to_string(), vec![masq()]),
        };
        first.push(rule(
            "postrouting",
            &format!(
                "meta l4proto {{ tcp, udp, sctp }} ct status dnat ct original {ip} daddr != @{in_ranges} meta l4proto . ct original proto-dst @{nodeport_keys} {text}"
            ),
            &[
                tcp_udp_sctp(),
                ct_status_dnat(),
                node_port(),
                vec![lookup(REG1, nodeport_keys)],
                nat,
            ],
        ));
        first.push(rule(
            "into_network_nat",
            &format!("meta nfproto ipv{v} {ip} saddr . {ip} daddr @{hairpin} masquerade"),
            &[
                family(ipv6),
                vec![
                    payload(Network, saddr, a, REG1),
                    payload(Network, daddr, a, reg(a)),
                    lookup(REG1, hairpin),
                    masq(),
                ],
            ],
        ));
        for chain in ["forward", "filter_out"] {
            first.push(rule(
                chain,
                &format!("meta nfproto ipv{v} {ip} daddr @{in_ranges} goto unserved"),
                &[
                    family(ipv6),
                    vec![
                        payload(Network, daddr, a, REG1),
                        lookup(REG1, in_ranges),
                        goto("unserved"),
                    ],
                ],
            ));
        }
    }
    // After both hairpin rules: service traffic keeps its client's address.
    for (ip, key, in_ranges) in [
        ("ip", CtKey::DstIp, "service_ranges4"),
        ("ip6", CtKey::DstIp6, "service_ranges6"),
    ] {
        first.push(rule(
            "into_network_nat",
            &format!("ct original {ip} daddr @{in_ranges} accept"),
            &[vec![
                ct_original(key, REG1),
                lookup(REG1, in_ranges),
                accept(),
            ]],
        ));
    }
    first.push(rule(
        "unserved",
        "meta l4proto tcp reject with tcp reset",
        &[vec![
            meta(L4Proto, REG1),
            cmp_eq(REG1, &[IPPROTO_TCP]),
            reject(REJECT_TCP_RST, None),
        ]],
    ));
    first.push(rule(
        "unserved",
        "reject with icmpx port-unreachable",
        &[vec![reject(REJECT_ICMPX, Some(ICMPX_PORT_UNREACH))]],
    ));
    for nodeport in [false, true] {
        for n in 1..=MAX_BACKENDS as u32 {
            first.extend(lb_rules(nodeport, n));
        }
    }
    (first, last)
}

/// Chain `lb_N`'s (or `lbn_N`'s) rules: DNAT to slot `numgen random mod N` of the frontend.
fn lb_rules(nodeport: bool, n: u32) -> Vec<Rule> {
    use self::expr::{
        Base::{Network, Transport},
        MetaKey::L4Proto,
        NFPROTO_IPV4, NFPROTO_IPV6, REG1, dnat, map, meta, numgen_random, payload, reg,
    };
    let chain = lb_chain(nodeport, n);
    [false, true]
        .into_iter()
        .map(|ipv6| {
            let (ip, a, nfproto, v) = if ipv6 {
                ("ip6", 16, NFPROTO_IPV6, "6")
            } else {
                ("ip", 4, NFPROTO_IPV4, "4")
            };
            // The frontend's address (not for a node port), protocol, port, then the slot.
            let (daddr, backends, at) = if nodeport {
                (String::new(), spec(&format!("nodeport_backends{v}")).name, 0)
            } else {
                (format!("{ip} daddr . "), spec(&format!("backends{v}")).name, a)
            };
            let mut exprs = family(ipv6);
            if !nodeport {
                exprs.push(payload(Network, if ipv6 { 24 } else { 16 }, a, REG1));
            }
            exprs.extend([
                meta(L4Proto, reg(at)),
                payload(Transport, 2, 2, reg(at + 4)),
                numgen_random(reg(at + 8), n),
                map(REG1, backends, REG1),
                dnat(nfproto, REG1, reg(a)),
            ]);
            rule(
                &chain,
                &format!(
                    "meta nfproto ipv{v} dnat {ip} to {daddr}meta l4proto . th dport . numgen random mod {n} map @{backends}"
                ),
                &[exprs],
            )
        })
        .collect()
}

/// The rules of chain `remember_<secs>`: remember for `secs` seconds which backend this
/// client got for this frontend (restarted by each new connection it makes there). nft 1.0.6
/// cannot write the IPv6 one (it runs out of registers for a 40-byte key and its value, which
/// the kernel takes), so the tests hold its expressions against a listing.
fn remember_rules(secs: u32) -> Vec<Rule> {
    use self::expr::{
        Base::{Network, Transport},
        CtKey,
        MetaKey::L4Proto,
        REG1, ct_original, dynset_update, meta, payload, reg,
    };
    let chain = remember_chain(secs);
    [false, true]
        .into_iter()
        .map(|ipv6| {
            let (ip, a, dst_ip, (saddr, daddr)) = if ipv6 {
                ("ip6", 16, CtKey::DstIp6, (8, 24))
            } else {
                ("ip", 4, CtKey::DstIp, (12, 16))
            };
            let affinity = if ipv6 { "affinity6" } else { "affinity4" };
            let text = format!(
                "meta nfproto ip{} meta l4proto {{ tcp, udp, sctp }} update @{affinity} {{ {ip} saddr . ct original {ip} daddr . meta l4proto . ct original proto-dst timeout {secs}s : {ip} daddr . th dport }}",
                if ipv6 { "v6" } else { "v4" }
            );
            // Key: client, frontend address, protocol, frontend port; value: backend, port.
            let key_len = 2 * a + 8;
            let parts = [
                family(ipv6),
                tcp_udp_sctp(),
                vec![
                    payload(Network, saddr, a, REG1),
                    ct_original(dst_ip, reg(a)),
                    meta(L4Proto, reg(2 * a)),
                    ct_original(CtKey::ProtoDst, reg(2 * a + 4)),
                    payload(Network, daddr, a, reg(key_len)),
                    payload(Transport, 2, 2, reg(key_len + a)),
                    dynset_update(REG1, affinity, reg(key_len), u64::from(secs) * 1000),
                ],
            ];
            rule(&chain, &text, &parts)
        })
        .collect()
}

/// The chain that remembers affinities for `secs` seconds.
fn remember_chain(secs: u32) -> String {
    format!("{REMEMBER_PREFIX}{secs}")
}

const REMEMBER_PREFIX: &str = "remember_";

/// One network as the firewall sees it.
#[derive(Debug, Clone)]
pub struct NetworkRules {
    pub bridge: String,
    pub internal: bool,
    pub subnets: Vec<IpNet>,
    /// Where berth's DNS answers on this network (empty: no DNS).
    pub dns: Vec<SocketAddr>,
}

/// What the fixed rules of services need to know; the frontends themselves are the
/// [`LoadBalancer`]'s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Where VIPs come from: a connection to an address there that no frontend takes is
    /// refused at once (TCP reset, else ICMP port unreachable), and service traffic is not
    /// masqueraded.
    pub ranges: Vec<IpNet>,
    /// The address connections through a node port are source-NATed to: this host's own, to
    /// which backends on other hosts reply. `None`: masquerade (the outgoing interface's
    /// address, which only backends on this host reach back).
    pub nodeport_source4: Option<Ipv4Addr>,
    pub nodeport_source6: Option<Ipv6Addr>,
}

/// One published port of one endpoint: `mapping` forwarded to `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub mapping: PortMapping,
    pub target: IpAddr,
}

impl Forward {
    fn map(&self) -> &'static str {
        match (self.target.is_ipv4(), self.mapping.host_ip.is_some()) {
            (true, false) => "ports4_any",
            (true, true) => "ports4_ip",
            (false, false) => "ports6_any",
            (false, true) => "ports6_ip",
        }
    }

    fn text(&self) -> String {
        let m = &self.mapping;
        let host = m.host_ip.map(|ip| format!("{ip} . ")).unwrap_or_default();
        format!(
            "{host}{} . {} : {} . {}",
            m.protocol, m.host_port, self.target, m.container_port
        )
    }

    /// The element's key and data in the kernel's layout: each part of a concatenation padded
    /// to 4 bytes, addresses and ports in network order.
    fn key_and_data(&self) -> (Vec<u8>, Vec<u8>) {
        let m = &self.mapping;
        let mut key = Vec::with_capacity(24);
        if let Some(ip) = m.host_ip {
            key.extend_from_slice(&ip_bytes(ip));
        }
        key.extend_from_slice(&[m.protocol.number(), 0, 0, 0]);
        key.extend_from_slice(&port_bytes(m.host_port));
        let mut data = ip_bytes(self.target);
        data.extend_from_slice(&port_bytes(m.container_port));
        (key, data)
    }
}

/// An address from its bytes (4 or 16).
fn parse_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port_bytes(port: u16) -> [u8; 4] {
    let [a, b] = port.to_be_bytes();
    [a, b, 0, 0]
}

/// An interface name as a key: `IFNAMSIZ` bytes, zero-padded.
fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut b = name.as_bytes().to_vec();
    b.resize(16, 0);
    b
}

/// One element as the kernel holds it. An interval set holds a range as two: its first
/// address and, flagged as the end, the first address after it; but an interval set of a
/// concatenation holds it as one, from `key` to `key_end` (both included, field by field).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Element {
    key: Vec<u8>,
    key_end: Option<Vec<u8>>,
    data: Option<Data>,
    interval_end: bool,
}

/// A map element's value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Data {
    Value(Vec<u8>),
    /// A verdict map's: `NFT_JUMP`, `NFT_GOTO` (with a chain) or another verdict code.
    Verdict {
        code: i32,
        chain: Option<String>,
    },
}

impl Data {
    fn goto(chain: String) -> Data {
        Data::Verdict {
            code: expr::NFT_GOTO,
            chain: Some(chain),
        }
    }

    fn jump(chain: String) -> Data {
        Data::Verdict {
            code: expr::NFT_JUMP,
            chain: Some(chain),
        }
    }

    /// As `NFTA_SET_ELEM_DATA`'s payload.
    fn put(&self, d: &mut Vec<u8>) {
        match self {
            Data::Value(v) => put_attr(d, NFTA_DATA_VALUE, v),
            Data::Verdict { code, chain } => put_nested(d, NFTA_DATA_VERDICT, |v| {
                put_attr(v, NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Some(chain) = chain {
                    put_str(v, NFTA_VERDICT_CHAIN, chain);
                }
            }),
        }
    }

    /// From `NFTA_SET_ELEM_DATA`'s payload.
    fn parse(d: &[u8]) -> Option<Data> {
        if let Some(v) = attr(d, NFTA_DATA_VALUE) {
            return Some(Data::Value(v.to_vec()));
        }
        let v = attr(d, NFTA_DATA_VERDICT)?;
        Some(Data::Verdict {
            code: i32::from_be_bytes(attr(v, NFTA_VERDICT_CODE)?.try_into().ok()?),
            chain: attr_str(v, NFTA_VERDICT_CHAIN).map(str::to_string),
        })
    }
}

/// By key, and at the same key an end before a start: adjacent ranges go to the kernel as
/// start, end, start, end, as nft sends them.
impl Ord for Element {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.key, !self.interval_end, &self.key_end, &self.data).cmp(&(
            &other.key,
            !other.interval_end,
            &other.key_end,
            &other.data,
        ))
    }
}

impl PartialOrd for Element {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Element {
    /// A plain element: a key, no value, not an interval's end.
    fn of(key: Vec<u8>) -> Element {
        Element {
            key,
            key_end: None,
            data: None,
            interval_end: false,
        }
    }
}

/// One member of one of berth's sets, in the terms berth thinks in.
enum Member {
    Bridge(String),
    BridgePair(String),
    Subnet(IpNet),
    Dns(SocketAddr),
    Forward(Forward),
}

impl Member {
    /// As an element of `nft`'s language.
    fn text(&self) -> String {
        match self {
            Member::Bridge(b) => format!("\"{b}\""),
            Member::BridgePair(b) => format!("\"{b}\" . \"{b}\""),
            Member::Subnet(net) => net.trunc().to_string(),
            Member::Dns(a) => format!("{} . {}", a.ip(), a.port()),
            Member::Forward(f) => f.text(),
        }
    }

    /// As the kernel's elements.
    fn elements(&self) -> Vec<Element> {
        match self {
            Member::Bridge(b) => vec![Element::of(ifname_bytes(b))],
            Member::BridgePair(b) => {
                let mut k = ifname_bytes(b);
                k.extend_from_slice(&ifname_bytes(b));
                vec![Element::of(k)]
            }
            Member::Subnet(net) => {
                let mut out = vec![Element::of(ip_bytes(net.network()))];
                // The end is the first address after the subnet; a subnet that reaches the
                // last address has none (as nft does it).
                let end = match net.broadcast() {
                    IpAddr::V4(b) => u32::from(b)
                        .checked_add(1)
                        .map(|n| n.to_be_bytes().to_vec()),
                    IpAddr::V6(b) => u128::from(b)
                        .checked_add(1)
                        .map(|n| n.to_be_bytes().to_vec()),
                };
                if let Some(end) = end {
                    out.push(Element {
                        interval_end: true,
                        ..Element::of(end)
                    });
                }
                out
            }
            Member::Dns(a) => {
                let mut k = ip_bytes(a.ip());
                k.extend_from_slice(&port_bytes(a.port()));
                vec![Element::of(k)]
            }
            Member::Forward(f) => {
                let (key, data) = f.key_and_data();
                vec![Element {
                    data: Some(Data::Value(data)),
                    ..Element::of(key)
                }]
            }
        }
    }
}

/// Every set's members for these networks, forwards and services, by set name; none of the
/// load balancer's.
fn members(
    networks: &[NetworkRules],
    forwards: &[Forward],
    services: &ServiceRules,
) -> Vec<(&'static str, Member)> {
    let mut out = Vec::new();
    for n in networks {
        out.push(("bridges", Member::Bridge(n.bridge.clone())));
        out.push(("intra", Member::BridgePair(n.bridge.clone())));
        if n.internal {
            out.push(("internal", Member::Bridge(n.bridge.clone())));
        } else {
            for subnet in &n.subnets {
                let set = if subnet.addr().is_ipv4() {
                    "masq4"
                } else {
                    "masq6"
                };
                out.push((set, Member::Subnet(*subnet)));
            }
        }
        for addr in &n.dns {
            let set = if addr.is_ipv4() { "dns4" } else { "dns6" };
            out.push((set, Member::Dns(*addr)));
        }
    }
    out.extend(forwards.iter().map(|f| (f.map(), Member::Forward(*f))));
    for range in &services.ranges {
        let set = if range.addr().is_ipv4() {
            "service_ranges4"
        } else {
            "service_ranges6"
        };
        out.push((set, Member::Subnet(*range)));
    }
    out
}

/// The elements each of [`SETS`] should hold, in its order, sorted and without duplicates
/// (none for the load balancer's).
fn elements(
    networks: &[NetworkRules],
    forwards: &[Forward],
    services: &ServiceRules,
) -> Vec<Vec<Element>> {
    let mut per_set = vec![Vec::new(); SETS.len()];
    for (set, member) in members(networks, forwards, services) {
        per_set[set_id(set) as usize - 1].extend(member.elements());
    }
    for e in &mut per_set {
        e.sort();
        e.dedup();
    }
    per_set
}

/// The complete table for these networks, forwards and services in `nft`'s language: what
/// [`install`] writes, for people and for the tests that hold the two side by side.
pub fn ruleset(networks: &[NetworkRules], forwards: &[Forward], services: &ServiceRules) -> String {
    let mut s = format!("add table inet {TABLE}\nadd chain inet {TABLE} {USER_CHAIN}\n");
    for set in SETS {
        // A set nft has no type for: berth's own (see module `policy`).
        let unwritable = if set.nft.starts_with('#') { "# " } else { "" };
        let _ = writeln!(
            s,
            "{unwritable}add {} inet {TABLE} {} {{ {} }}",
            set.kind(),
            set.name,
            set.nft.trim_start_matches("# ")
        );
    }
    for (chain, hook) in chains() {
        match hook {
            None => {
                let _ = writeln!(s, "add chain inet {TABLE} {chain}");
            }
            Some(h) => {
                let _ = writeln!(s, "add chain inet {TABLE} {chain} {{ {} }}", h.nft);
            }
        }
        let _ = writeln!(s, "flush chain inet {TABLE} {chain}");
    }
    for set in SETS.iter().filter(|s| s.owner == Owner::Table) {
        let _ = writeln!(s, "flush {} inet {TABLE} {}", set.kind(), set.name);
    }
    for r in rules(services) {
        // A rule nft's language cannot write (see module `policy`).
        let unwritable = if r.nft.starts_with('#') { "# " } else { "" };
        let _ = writeln!(
            s,
            "{unwritable}add rule inet {TABLE} {} {}",
            r.chain,
            r.nft.trim_start_matches("# ")
        );
    }
    for (set, member) in members(networks, forwards, services) {
        let _ = writeln!(s, "add element inet {TABLE} {set} {{ {} }}", member.text());
    }
    s
}

/// Adds `r` to its chain, after its anonymous set if it has one (numbered from
/// `anonymous_id`, which moves on); `set_id` names the sets the same batch creates.
fn push_rule(b: &mut Batch, r: &Rule, anonymous_id: &mut u32, set_id: fn(&str) -> u32) {
    let id = *anonymous_id;
    if let Some(anon) = r.exprs.iter().find_map(Expr::anonymous_set) {
        *anonymous_id += 1;
        let mut a = Vec::new();
        put_str(&mut a, NFTA_SET_TABLE, TABLE);
        put_str(&mut a, NFTA_SET_NAME, expr::ANONYMOUS_SET_NAME);
        put_u32(&mut a, NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT);
        put_u32(&mut a, NFTA_SET_KEY_TYPE, anon.key_type);
        put_u32(&mut a, NFTA_SET_KEY_LEN, anon.key_len);
        put_u32(&mut a, NFTA_SET_ID, id);
        put_nested(&mut a, NFTA_SET_DESC, |d| {
            put_u32(d, NFTA_SET_DESC_SIZE, anon.elements.len() as u32)
        });
        put_attr(&mut a, NFTA_SET_USERDATA, anon.userdata);
        let what = format!("create the anonymous set of `{}`", r.nft);
        b.push(NFT_MSG_NEWSET, NLM_F_CREATE, a, what.clone());
        let mut a = set_attrs(expr::ANONYMOUS_SET_NAME);
        put_u32(&mut a, NFTA_SET_ELEM_LIST_SET_ID, id);
        put_nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
            for key in anon.elements {
                put_element(list, &Element::of(key.to_vec()));
            }
        });
        b.push(NFT_MSG_NEWSETELEM, NLM_F_CREATE, a, what);
    }
    let mut a = chain_attrs(NFTA_RULE_CHAIN, &r.chain);
    let refs = Refs::Batch {
        set_id,
        anonymous_id: id,
    };
    put_nested(&mut a, NFTA_RULE_EXPRESSIONS, |e| {
        e.extend_from_slice(&expr::encode(&r.exprs, refs))
    });
    b.push(
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        a,
        format!("add rule `{}` to chain {}", r.nft, r.chain),
    );
}

/// A set's `NEWSET` attributes but for its id in a batch or, `as_dumped`, those of them that
/// a dump of the set shows as sent (it leaves out flags 0 and has its own length for verdicts).
fn set_spec_attrs(set: &SetSpec, as_dumped: bool) -> Vec<u8> {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_SET_TABLE, TABLE);
    put_str(&mut a, NFTA_SET_NAME, set.name);
    if !as_dumped || set.flags != 0 {
        put_u32(&mut a, NFTA_SET_FLAGS, set.flags);
    }
    put_u32(&mut a, NFTA_SET_KEY_TYPE, set.key_type);
    put_u32(&mut a, NFTA_SET_KEY_LEN, set.key_len);
    if let Some((data_type, data_len)) = set.data {
        put_u32(&mut a, NFTA_SET_DATA_TYPE, data_type);
        if !as_dumped || (data_type, data_len) != VERDICT {
            put_u32(&mut a, NFTA_SET_DATA_LEN, data_len);
        }
    }
    if set.size > 0 {
        put_nested(&mut a, NFTA_SET_DESC, |d| {
            put_u32(d, NFTA_SET_DESC_SIZE, set.size);
        });
    }
    put_attr(&mut a, NFTA_SET_USERDATA, set.userdata);
    a
}

/// Writes the whole table in one transaction: all of it or, on error, none. Berth's chains
/// and sets are created if missing and flushed, so the result is exactly these rules and
/// elements; the `user` chain keeps its rules, the load balancer's maps their elements and
/// its `remember_*` chains stay as they are.
pub fn install(
    networks: &[NetworkRules],
    forwards: &[Forward],
    services: &ServiceRules,
) -> Result<()> {
    let mut b = Batch::default();
    let mut a = Vec::new();
    put_str(&mut a, NFTA_TABLE_NAME, TABLE);
    // Flags 0 also wakes a table someone made dormant.
    put_u32(&mut a, NFTA_TABLE_FLAGS, 0);
    b.push(NFT_MSG_NEWTABLE, 0, a, format!("create table inet {TABLE}"));
    b.push(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        chain_attrs(NFTA_CHAIN_NAME, USER_CHAIN),
        format!("create chain {USER_CHAIN}"),
    );
    for (i, set) in SETS.iter().enumerate() {
        let mut a = set_spec_attrs(set, false);
        put_u32(&mut a, NFTA_SET_ID, i as u32 + 1);
        b.push(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            a,
            format!("create {} {}", set.kind(), set.name),
        );
    }
    for (chain, hook) in chains() {
        let mut a = chain_attrs(NFTA_CHAIN_NAME, &chain);
        if let Some(h) = hook {
            a.extend_from_slice(&hook_attrs(h));
        }
        b.push(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            a,
            format!("create chain {chain}"),
        );
        b.push(
            NFT_MSG_DELRULE,
            0,
            chain_attrs(NFTA_RULE_CHAIN, &chain),
            format!("flush chain {chain}"),
        );
    }
    for set in SETS.iter().filter(|s| s.owner == Owner::Table) {
        b.push(
            NFT_MSG_DELSETELEM,
            0,
            set_attrs(set.name),
            format!("flush {} {}", set.kind(), set.name),
        );
    }
    // The policy chains and sets of earlier versions, which no rule uses any more (the
    // jumps to the chains were flushed above; their rules go with them).
    for legacy in policy::LEGACY_CHAINS {
        b.push(
            NFT_MSG_DESTROYCHAIN,
            0,
            chain_attrs(NFTA_CHAIN_NAME, legacy),
            format!("remove the old policy chain {legacy}"),
        );
    }
    for legacy in policy::LEGACY_SETS {
        let mut a = Vec::new();
        put_str(&mut a, NFTA_SET_TABLE, TABLE);
        put_str(&mut a, NFTA_SET_NAME, legacy);
        b.push(
            NFT_MSG_DESTROYSET,
            0,
            a,
            format!("remove the old policy set {legacy}"),
        );
    }
    let mut anonymous_id = SETS.len() as u32 + 1;
    for r in rules(services) {
        push_rule(&mut b, &r, &mut anonymous_id, set_id);
    }
    for (set, elements) in SETS.iter().zip(elements(networks, forwards, services)) {
        push_elements(&mut b, NFT_MSG_NEWSETELEM, set, &elements);
    }
    Nfnetlink::open()?.commit(&b)
}

/// Rewrites the elements of berth's own sets and maps (networks, published ports, service
/// ranges) in one transaction, and nothing else: what a network coming or going changes,
/// without the cost of the whole table's rules and chains. The load balancer's maps are left
/// alone. Fails if the table or a set is missing (the caller then [`install`]s).
pub fn set_elements(
    networks: &[NetworkRules],
    forwards: &[Forward],
    services: &ServiceRules,
) -> Result<()> {
    let mut b = Batch::default();
    for set in SETS.iter().filter(|s| s.owner == Owner::Table) {
        b.push(
            NFT_MSG_DELSETELEM,
            0,
            set_attrs(set.name),
            format!("flush {} {}", set.kind(), set.name),
        );
    }
    for (set, elements) in SETS.iter().zip(elements(networks, forwards, services)) {
        push_elements(&mut b, NFT_MSG_NEWSETELEM, set, &elements);
    }
    Nfnetlink::open()?.commit(&b)
}

/// The table's name and an object's name (`NFTA_*_TABLE` is 1 for chains, rules and sets).
fn chain_attrs(name_kind: u16, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_CHAIN_TABLE, TABLE);
    put_str(&mut a, name_kind, name);
    a
}

fn set_attrs(set: &str) -> Vec<u8> {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_SET_ELEM_LIST_TABLE, TABLE);
    put_str(&mut a, NFTA_SET_ELEM_LIST_SET, set);
    a
}

fn put_element(list: &mut Vec<u8>, e: &Element) {
    put_nested(list, NFTA_LIST_ELEM, |el| {
        if e.interval_end {
            put_u32(el, NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        }
        put_nested(el, NFTA_SET_ELEM_KEY, |k| {
            put_attr(k, NFTA_DATA_VALUE, &e.key)
        });
        if let Some(end) = &e.key_end {
            put_nested(el, NFTA_SET_ELEM_KEY_END, |k| {
                put_attr(k, NFTA_DATA_VALUE, end)
            });
        }
        if let Some(data) = &e.data {
            put_nested(el, NFTA_SET_ELEM_DATA, |d| data.put(d));
        }
    });
}

/// Adds (`NEWSETELEM`) or deletes (`DELSETELEM`, `DESTROYSETELEM`) elements of one set, in as
/// many messages as a netlink attribute's 64 KiB limit needs.
fn push_elements(b: &mut Batch, op: u16, set: &SetSpec, elements: &[Element]) {
    push_element_list(b, op, set.name, elements);
}

/// [`push_elements`] for a set known by its name.
fn push_element_list(b: &mut Batch, op: u16, set: &str, elements: &[Element]) {
    let (flags, verb) = if op == NFT_MSG_NEWSETELEM {
        (NLM_F_CREATE, "add")
    } else {
        (0, "delete")
    };
    let mut rest = elements;
    while !rest.is_empty() {
        let mut list = Vec::new();
        let mut n = 0;
        for e in rest {
            let before = list.len();
            put_element(&mut list, e);
            if list.len() > MAX_ATTR / 2 && n > 0 {
                list.truncate(before);
                break;
            }
            n += 1;
        }
        let mut a = set_attrs(set);
        put_nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
            l.extend_from_slice(&list)
        });
        b.push(op, flags, a, format!("{verb} {n} elements of {set}"));
        rest = &rest[n..];
    }
}

/// nftables' generation id: every change to any table bumps it, so an unchanged id means
/// berth's table is as it was at the last [`check`].
pub fn generation() -> Result<u32> {
    Nfnetlink::open()?.generation()
}

/// What differs between berth's table in the kernel and what [`install`] would write for
/// these networks, forwards and services, one line each; empty when nothing does. Compares
/// the table, the chains' hooks, every rule's expressions and every set's elements, but not
/// the `user` chain's rules, nor the elements of the load balancer's maps and of the policy
/// sets (only that they are there, as declared), nor the load balancer's `remember_*` chains:
/// those are the [`LoadBalancer`]'s and the policy programmer's to check (see
/// [`PolicySets::elements`]). A change made while this reads shows as a difference too.
pub fn check(
    networks: &[NetworkRules],
    forwards: &[Forward],
    services: &ServiceRules,
) -> Result<Vec<String>> {
    let mut nl = Nfnetlink::open()?;
    let mut damage = Vec::new();
    let refused = |what: &str, errno| DataplaneError::Kernel {
        op: format!("read nftables {what}"),
        source: std::io::Error::from_raw_os_error(errno),
    };
    let mut a = Vec::new();
    put_str(&mut a, NFTA_TABLE_NAME, TABLE);
    match nl.get(NFT_MSG_GETTABLE, &a)? {
        Err(errno) if errno == enoent() => {
            return Ok(vec![format!("table inet {TABLE} is missing")]);
        }
        Err(errno) => return Err(refused("table", errno)),
        Ok(t) => {
            if attr_u32(&t, NFTA_TABLE_FLAGS).unwrap_or(0) & NFT_TABLE_F_DORMANT != 0 {
                damage.push(format!("table inet {TABLE} is dormant"));
            }
        }
    }
    let mut consistent = true;
    // Rules and chains of berth's table only (`NFTA_*_TABLE` is 1 for both).
    let mut table_only = Vec::new();
    put_str(&mut table_only, NFTA_CHAIN_TABLE, TABLE);

    let mut got_chains: Vec<(String, Vec<u8>)> = Vec::new();
    consistent &= nl
        .dump(NFT_MSG_GETCHAIN, &table_only, |c| {
            if attr_str(c, NFTA_CHAIN_TABLE) == Some(TABLE)
                && let Some(name) = attr_str(c, NFTA_CHAIN_NAME)
            {
                got_chains.push((name.to_string(), c.to_vec()));
            }
        })?
        .map_err(|errno| refused("chains", errno))?;
    let all_chains = std::iter::once((USER_CHAIN.to_string(), None)).chain(chains());
    for (name, hook) in all_chains {
        match got_chains.iter().find(|(c, _)| *c == name) {
            None => damage.push(format!("chain {name} is missing")),
            Some((_, got)) => {
                if let Some(h) = hook
                    && !covers(got, &hook_attrs(h))
                {
                    damage.push(format!("chain {name} is not `{}`", h.nft));
                }
            }
        }
    }

    let mut got_rules: Vec<(String, Vec<u8>)> = Vec::new();
    consistent &= nl
        .dump(NFT_MSG_GETRULE, &table_only, |r| {
            if attr_str(r, NFTA_RULE_TABLE) == Some(TABLE)
                && let Some(chain) = attr_str(r, NFTA_RULE_CHAIN)
            {
                let exprs = attr(r, NFTA_RULE_EXPRESSIONS).unwrap_or_default();
                got_rules.push((chain.to_string(), exprs.to_vec()));
            }
        })?
        .map_err(|errno| refused("rules", errno))?;
    let wanted = rules(services);
    let mut want_by_chain: std::collections::HashMap<&str, Vec<&Rule>> = Default::default();
    for r in &wanted {
        want_by_chain.entry(&r.chain).or_default().push(r);
    }
    let mut got_by_chain: std::collections::HashMap<&str, Vec<&[u8]>> = Default::default();
    for (c, e) in &got_rules {
        got_by_chain.entry(c).or_default().push(e);
    }
    for (chain, _) in chains() {
        let want = want_by_chain.remove(chain.as_str()).unwrap_or_default();
        let got = got_by_chain.remove(chain.as_str()).unwrap_or_default();
        if got.len() != want.len() {
            damage.push(format!(
                "chain {chain} has {} rules instead of {}",
                got.len(),
                want.len()
            ));
            continue;
        }
        for (w, g) in want.iter().zip(got) {
            if !covers(g, &expr::encode(&w.exprs, Refs::Dump)) {
                damage.push(format!("chain {chain}: `{}` is changed", w.nft));
            }
        }
    }

    for (set, want) in SETS.iter().zip(elements(networks, forwards, services)) {
        if set.owner != Owner::Table {
            let a = set_spec_attrs(set, true);
            match nl.get(NFT_MSG_GETSET, &a)? {
                Err(errno) if errno == enoent() => {
                    damage.push(format!("{} {} is missing", set.kind(), set.name));
                }
                Err(errno) => return Err(refused("sets", errno)),
                Ok(got) if !covers(&got, &a) => {
                    damage.push(format!("{} {} is not `{}`", set.kind(), set.name, set.nft));
                }
                Ok(_) => {}
            }
            continue;
        }
        let mut got = match read_elements(&mut nl, set.name)? {
            Err(errno) if errno == enoent() => {
                damage.push(format!("{} {} is missing", set.kind(), set.name));
                continue;
            }
            Err(errno) => return Err(refused("set elements", errno)),
            Ok((got, c)) => {
                consistent &= c;
                got
            }
        };
        got.sort();
        let (missing, extra) = difference(&want, &got);
        if missing + extra > 0 {
            damage.push(format!(
                "{} {}: {missing} of {} elements missing, {extra} unexpected",
                set.kind(),
                set.name,
                want.len()
            ));
        }
    }
    if !consistent {
        damage.push("the table changed while it was read".into());
    }
    Ok(damage)
}

/// A set's elements, and whether the dump was consistent; the kernel's errno if it refuses
/// (`ENOENT`: no such set).
fn read_elements(nl: &mut Nfnetlink, set: &str) -> Result<Result<(Vec<Element>, bool), i32>> {
    let mut got = Vec::new();
    let dumped = nl.dump(NFT_MSG_GETSETELEM, &set_attrs(set), |m| {
        let Some(list) = attr(m, NFTA_SET_ELEM_LIST_ELEMENTS) else {
            return;
        };
        for (_, e) in attrs(list) {
            let key = |kind| attr(e, kind).and_then(|v| attr(v, NFTA_DATA_VALUE));
            got.push(Element {
                key: key(NFTA_SET_ELEM_KEY).unwrap_or_default().to_vec(),
                key_end: key(NFTA_SET_ELEM_KEY_END).map(<[u8]>::to_vec),
                data: attr(e, NFTA_SET_ELEM_DATA).and_then(Data::parse),
                interval_end: attr_u32(e, NFTA_SET_ELEM_FLAGS).unwrap_or(0)
                    & NFT_SET_ELEM_INTERVAL_END
                    != 0,
            });
        }
    })?;
    Ok(dumped.map(|consistent| (got, consistent)))
}

/// How many of the sorted `want` are not in the sorted `got`, and how many of `got` are not
/// in `want`.
fn difference<T: Ord>(want: &[T], got: &[T]) -> (usize, usize) {
    let (mut i, mut j, mut missing, mut extra) = (0, 0, 0, 0);
    while i < want.len() || j < got.len() {
        match (want.get(i), got.get(j)) {
            (Some(w), Some(g)) if w == g => (i, j) = (i + 1, j + 1),
            (Some(w), Some(g)) if w < g => (i, missing) = (i + 1, missing + 1),
            (Some(_), None) => (i, missing) = (i + 1, missing + 1),
            _ => (j, extra) = (j + 1, extra + 1),
        }
    }
    (missing, extra)
}

/// Adds published ports' map elements, all or none.
pub fn add_forwards(forwards: &[Forward]) -> Result<()> {
    Nfnetlink::open()?.commit(&forward_batch(NFT_MSG_NEWSETELEM, forwards))
}

/// Removes published ports' map elements; elements already gone are fine.
pub fn delete_forwards(forwards: &[Forward]) -> Result<()> {
    let mut nl = Nfnetlink::open()?;
    match nl.commit(&forward_batch(NFT_MSG_DELSETELEM, forwards)) {
        Err(e) if e.errno() == Some(enoent()) => {
            // One was missing and the batch was refused as a whole: one at a time.
            for f in forwards {
                match nl.commit(&forward_batch(NFT_MSG_DELSETELEM, std::slice::from_ref(f))) {
                    Err(e) if e.errno() == Some(enoent()) => {}
                    other => other?,
                }
            }
            Ok(())
        }
        other => other,
    }
}

/// One batch adding or deleting the forwards' elements.
fn forward_batch(op: u16, forwards: &[Forward]) -> Batch {
    let mut b = Batch::default();
    for set in SETS.iter().filter(|s| s.data.is_some()) {
        let elements: Vec<Element> = forwards
            .iter()
            .filter(|f| f.map() == set.name)
            .map(|f| {
                let (key, data) = f.key_and_data();
                Element {
                    // A deletion names the key only.
                    data: (op == NFT_MSG_NEWSETELEM).then_some(Data::Value(data)),
                    ..Element::of(key)
                }
            })
            .collect();
        push_elements(&mut b, op, set, &elements);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::Protocol;

    fn fwd(host_ip: Option<&str>, target: &str) -> Forward {
        Forward {
            mapping: PortMapping {
                protocol: Protocol::Udp,
                host_ip: host_ip.map(|s| s.parse().unwrap()),
                host_port: 5353,
                container_port: 53,
            },
            target: target.parse().unwrap(),
        }
    }

    #[test]
    fn elements_in_the_kernel_layout() {
        // As `nft --debug=netlink` shows `127.0.0.1 . udp . 5353 : 10.91.0.5 . 53`.
        let (key, data) = fwd(Some("127.0.0.1"), "10.91.0.5").key_and_data();
        assert_eq!(key, [127, 0, 0, 1, 17, 0, 0, 0, 0x14, 0xe9, 0, 0]);
        assert_eq!(data, [10, 91, 0, 5, 0, 53, 0, 0]);
        let (key, data) = fwd(None, "fd00::5").key_and_data();
        assert_eq!(key, [17, 0, 0, 0, 0x14, 0xe9, 0, 0]);
        assert_eq!(data.len(), 20);
        assert_eq!(fwd(None, "fd00::5").map(), "ports6_any");
        assert_eq!(
            fwd(Some("127.0.0.1"), "10.91.0.5").text(),
            "127.0.0.1 . udp . 5353 : 10.91.0.5 . 53"
        );
        // A subnet is its first address and, marked as the end, the one after it.
        let net = Member::Subnet("10.9.0.0/24".parse().unwrap()).elements();
        assert_eq!(net[0], Element::of(vec![10, 9, 0, 0]));
        assert_eq!(net[1].key, [10, 9, 1, 0]);
        assert!(net[1].interval_end);
        assert_eq!(
            Member::Subnet("255.255.255.0/24".parse().unwrap())
                .elements()
                .len(),
            1
        );
    }

    #[test]
    fn the_ruleset_flushes_every_berth_chain_but_the_users() {
        let text = ruleset(&[], &[], &ServiceRules::default());
        assert!(text.contains("add chain inet berth user\n"));
        assert!(!text.contains("flush chain inet berth user"));
        for (chain, _) in chains() {
            assert!(text.contains(&format!("flush chain inet berth {chain}\n")));
        }
        assert!(text.contains("flush chain inet berth lbn_256\n"));
        assert!(text.contains("flush map inet berth ports6_ip\n"));
        assert!(text.contains("flush set inet berth masq4\n"));
        // The load balancer's elements stay.
        assert!(!text.contains("flush map inet berth backends4"));
        assert!(text.contains("add map inet berth backends4 "));
        // So do the policy programmer's; its chain comes right after the operator's.
        assert!(!text.contains("flush map inet berth pol_"));
        assert!(text.contains("add map inet berth pol_tgt_in4 "));
        assert!(text.contains("add rule inet berth policies ip6 saddr vmap @pol_tgt_eg6\n"));
        let forward: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add rule inet berth forward "))
            .take(2)
            .collect();
        assert_eq!(
            forward,
            [
                "add rule inet berth forward jump user",
                "add rule inet berth forward jump policies"
            ]
        );
    }

    #[test]
    fn every_rule_is_in_a_berth_chain_and_every_lookup_names_a_set() {
        let chains = chains();
        let services = ServiceRules {
            nodeport_source4: Some(Ipv4Addr::new(192, 0, 2, 1)),
            ..Default::default()
        };
        for r in rules(&services).iter().chain(&remember_rules(60)) {
            let is_remember = r.chain == remember_chain(60);
            assert!(
                is_remember || chains.iter().any(|(c, _)| *c == r.chain),
                "{}",
                r.chain
            );
            for e in &r.exprs {
                match e {
                    Expr::Lookup {
                        set: expr::SetRef::Named(name),
                        ..
                    } => assert_ne!(set_id(name), 0, "{name}"),
                    Expr::DynsetUpdate { set: name, .. } => {
                        assert_ne!(set_id(name), 0, "{name}")
                    }
                    Expr::Verdict {
                        chain: Some(chain), ..
                    } => assert!(
                        *chain == USER_CHAIN || chains.iter().any(|(c, _)| c == chain),
                        "{chain}"
                    ),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn difference_counts_both_ways() {
        assert_eq!(difference(&[1, 2, 3], &[1, 2, 3]), (0, 0));
        assert_eq!(difference(&[1, 2, 3], &[]), (3, 0));
        assert_eq!(difference(&[1, 3], &[0, 1, 2, 4]), (1, 3));
    }
}
