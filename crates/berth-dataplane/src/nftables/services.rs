//! The load balancer: frontends (a port of a virtual IP, or a node port) and their backends,
//! as elements of berth's maps (the fixed rules that use them are in
//! [`super::service_rules`]).
//!
//! A frontend with `N` backends is one element `frontend : goto lb_N` (in `svc4`/`svc6`, or
//! `frontend : goto lbn_N` in `nodeports4`/`6`) and `N` slot elements
//! `frontend . slot : backend` (`backends4`/`6`, `nodeport_backends4`/`6`), slots 0 to N - 1;
//! chain `lb_N` DNATs new connections to slot `numgen random mod N`. Adding a backend fills
//! slot N; removing the one at slot i moves the last one into i; either way a few elements
//! change, whatever the number of frontends, and all of one [`LoadBalancer::apply`] goes to
//! the kernel as one transaction.
//!
//! An affine frontend also has `frontend : jump remember_<timeout>` (`affine4`/`6`,
//! `nodeport_affine4`/`6`; one chain per timeout in use), where the packet path records
//! `client . frontend : backend` in `affinity4`/`6`; the next connection of that client is
//! DNATed there first. The load balancer deletes those records when their backend leaves.
//! Backends on this host are in `hairpin4`/`6` (as `addr . addr`), so that their connections
//! to themselves are masqueraded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use berth_model::Protocol;

use super::nfnl::{
    Batch, NFT_MSG_DELRULE, NFT_MSG_DESTROYCHAIN, NFT_MSG_DESTROYSETELEM, NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWSETELEM, NLM_F_CREATE, Nfnetlink, attr, attr_str,
    covers, put_str,
};
use super::{
    Data, Element, NFTA_CHAIN_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS,
    NFTA_RULE_TABLE, REMEMBER_PREFIX, TABLE, chain_attrs, expr, ip_bytes, lb_chain, lb_prefix,
    parse_ip, port_bytes, push_elements, push_rule, read_elements, remember_chain, remember_rules,
    spec,
};
use crate::{DataplaneError, Result};

/// The most backends a frontend balances over: chains `lb_1` to `lb_256`.
pub const MAX_BACKENDS: usize = 256;

/// What clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frontend {
    /// A port of a virtual IP (from the service ranges).
    Vip {
        vip: IpAddr,
        protocol: Protocol,
        port: u16,
    },
    /// A port on every local address of this host of one family.
    NodePort {
        ipv6: bool,
        protocol: Protocol,
        port: u16,
    },
}

/// Where a frontend's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// On this host: its connections to its own frontend come back to it, and are
    /// masqueraded so that it answers through the host (hairpin).
    pub local: bool,
}

/// A frontend's backends. More than [`MAX_BACKENDS`]: the frontend balances over that many of
/// them, those it already had first (so that their connections and slots stay), then the
/// others in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pool {
    pub backends: BTreeSet<Backend>,
    /// Client-IP affinity: a client's new connections go to the backend its last one went to,
    /// for this many seconds after that one began (0 is none).
    pub affinity: Option<u32>,
}

impl Frontend {
    fn ipv6(&self) -> bool {
        match self {
            Frontend::Vip { vip, .. } => vip.is_ipv6(),
            Frontend::NodePort { ipv6, .. } => *ipv6,
        }
    }

    fn nodeport(&self) -> bool {
        matches!(self, Frontend::NodePort { .. })
    }

    /// The maps of its kind and family.
    fn maps(&self) -> &'static Maps {
        &MAPS[usize::from(self.nodeport())][usize::from(self.ipv6())]
    }

    /// Its key: address (not for a node port), protocol, port.
    fn key(&self) -> Vec<u8> {
        let (addr, protocol, port) = match *self {
            Frontend::Vip {
                vip,
                protocol,
                port,
            } => (Some(vip), protocol, port),
            Frontend::NodePort { protocol, port, .. } => (None, protocol, port),
        };
        let mut key = addr.map(ip_bytes).unwrap_or_default();
        key.extend_from_slice(&[protocol.number(), 0, 0, 0]);
        key.extend_from_slice(&port_bytes(port));
        key
    }

    fn slot_key(&self, slot: u32) -> Vec<u8> {
        let mut key = self.key();
        key.extend_from_slice(&slot.to_ne_bytes());
        key
    }

    /// A key of one of `maps`' maps, and what follows the frontend in it.
    fn parse<'k>(maps: &Maps, key: &'k [u8]) -> Option<(Frontend, &'k [u8])> {
        let a = match (maps.nodeport, maps.ipv6) {
            (true, _) => 0,
            (false, false) => 4,
            (false, true) => 16,
        };
        let (addr, rest) = key.split_at_checked(a)?;
        let (proto, rest) = rest.split_at_checked(8)?;
        let protocol = Protocol::from_number(proto[0]).filter(|_| proto[1..4] == [0; 3])?;
        let port = u16::from_be_bytes([proto[4], proto[5]]);
        let f = if maps.nodeport {
            Frontend::NodePort {
                ipv6: maps.ipv6,
                protocol,
                port,
            }
        } else {
            Frontend::Vip {
                vip: parse_ip(addr)?,
                protocol,
                port,
            }
        };
        Some((f, rest))
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frontend::Vip {
                vip: IpAddr::V6(vip),
                protocol,
                port,
            } => write!(f, "[{vip}]:{port}/{protocol}"),
            Frontend::Vip {
                vip,
                protocol,
                port,
            } => write!(f, "{vip}:{port}/{protocol}"),
            Frontend::NodePort {
                ipv6,
                protocol,
                port,
            } => write!(
                f,
                "node port {port}/{protocol} (IPv{})",
                if *ipv6 { 6 } else { 4 }
            ),
        }
    }
}

/// The maps of one kind (VIP or node port) and family of frontends.
struct Maps {
    nodeport: bool,
    ipv6: bool,
    /// `frontend : goto lb_N`
    count: &'static str,
    /// `frontend . slot : backend . port`
    backends: &'static str,
    /// `frontend : jump remember_<timeout>`
    affine: &'static str,
    /// Node ports only: `frontend` while it has backends.
    keys: Option<&'static str>,
}

/// By `[node port][IPv6]`.
const MAPS: [[Maps; 2]; 2] = [
    [
        Maps {
            nodeport: false,
            ipv6: false,
            count: "svc4",
            backends: "backends4",
            affine: "affine4",
            keys: None,
        },
        Maps {
            nodeport: false,
            ipv6: true,
            count: "svc6",
            backends: "backends6",
            affine: "affine6",
            keys: None,
        },
    ],
    [
        Maps {
            nodeport: true,
            ipv6: false,
            count: "nodeports4",
            backends: "nodeport_backends4",
            affine: "nodeport_affine4",
            keys: Some("nodeport_keys4"),
        },
        Maps {
            nodeport: true,
            ipv6: true,
            count: "nodeports6",
            backends: "nodeport_backends6",
            affine: "nodeport_affine6",
            keys: Some("nodeport_keys6"),
        },
    ],
];

/// An address and a port as a map value holds them.
fn addr_port(addr: IpAddr, port: u16) -> Vec<u8> {
    let mut v = ip_bytes(addr);
    v.extend_from_slice(&port_bytes(port));
    v
}

/// The address and port of a map value of `addr_len`-byte addresses.
fn parse_addr_port(v: &[u8], addr_len: usize) -> Option<(IpAddr, u16)> {
    let (addr, port) = v.split_at_checked(addr_len)?;
    Some((
        parse_ip(addr)?,
        u16::from_be_bytes([*port.first()?, *port.get(1)?]),
    ))
}

/// The number that ends the chain of a verdict `code` `<prefix>_<number>`.
fn chain_number(data: &Option<Data>, code: i32, prefix: &str) -> Option<u32> {
    match data {
        Some(Data::Verdict {
            code: c,
            chain: Some(chain),
        }) if *c == code => {
            let n: u32 = chain.strip_prefix(prefix)?.parse().ok()?;
            (format!("{prefix}{n}") == *chain).then_some(n)
        }
        _ => None,
    }
}

/// A frontend's elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    /// `frontend : goto lb_N`
    count: Option<u32>,
    /// `frontend . slot : backend` (a backend is local if its address is in the hairpin set)
    slots: BTreeMap<u32, Backend>,
    /// `frontend : jump remember_<seconds>`
    affinity: Option<u32>,
    /// A node port's key element is there.
    keyed: bool,
}

impl Entry {
    fn pool(&self) -> Pool {
        Pool {
            backends: self.slots.values().copied().collect(),
            affinity: self.affinity,
        }
    }

    fn has(&self, addr: IpAddr, port: u16) -> bool {
        self.slots
            .values()
            .any(|b| b.addr == addr && b.port == port)
    }
}

/// The entry a frontend that has `old` gets for `pool`: backends that stay keep their slots,
/// new ones fill the slots of those that left, then the slots after the last; those left over
/// from the end move into what is still free. No backends: no elements at all.
fn plan(f: &Frontend, old: &Entry, pool: &Pool) -> Entry {
    let key = |b: &Backend| (b.addr, b.port);
    // The pool's backend at this address and port (it may have become local, or stopped).
    let in_pool = |b: &Backend| {
        let (a, z) = (
            Backend { local: false, ..*b },
            Backend { local: true, ..*b },
        );
        pool.backends.range(a..=z).next().copied()
    };
    // Those that have slots first, then the others in order, up to the most.
    let mut chosen: Vec<Backend> = Vec::new();
    let mut taken = BTreeSet::new();
    let had = old.slots.values().filter_map(in_pool);
    for b in had.chain(pool.backends.iter().copied()) {
        if chosen.len() == MAX_BACKENDS {
            break;
        }
        if taken.insert(key(&b)) {
            chosen.push(b);
        }
    }
    let n = chosen.len() as u32;
    let by_key: BTreeMap<_, Backend> = chosen.iter().map(|b| (key(b), *b)).collect();
    let mut slots = BTreeMap::new();
    let mut placed = BTreeSet::new();
    for (&s, b) in &old.slots {
        if s < n
            && let Some(c) = by_key.get(&key(b))
            && placed.insert(key(b))
        {
            slots.insert(s, *c);
        }
    }
    let mut rest = chosen.iter().filter(|b| !placed.contains(&key(b)));
    for s in 0..n {
        slots
            .entry(s)
            .or_insert_with(|| *rest.next().expect("as many backends as slots"));
    }
    Entry {
        count: (n > 0).then_some(n),
        slots,
        affinity: pool.affinity.filter(|s| *s > 0 && n > 0),
        keyed: n > 0 && f.nodeport(),
    }
}

/// Element changes for one batch: every deletion goes before every addition, so that a
/// changed value is its key deleted and added again.
#[derive(Default)]
struct Changes {
    delete: BTreeMap<&'static str, Vec<Element>>,
    add: BTreeMap<&'static str, Vec<Element>>,
}

impl Changes {
    fn delete(&mut self, map: &'static str, key: Vec<u8>) {
        self.delete.entry(map).or_default().push(Element::of(key));
    }

    fn add(&mut self, map: &'static str, key: Vec<u8>, data: Option<Data>) {
        self.add.entry(map).or_default().push(Element {
            data,
            ..Element::of(key)
        });
    }

    /// `old` becomes `new` under `key` (`None`: no element).
    fn set(&mut self, map: &'static str, key: Vec<u8>, old: Option<Data>, new: Option<Data>) {
        if old == new {
            return;
        }
        if old.is_some() {
            self.delete(map, key.clone());
        }
        if new.is_some() {
            self.add(map, key, new);
        }
    }

    /// What makes frontend `f`'s elements `new` where they are `old`.
    fn frontend(&mut self, f: &Frontend, old: &Entry, new: &Entry) {
        let maps = f.maps();
        let lb = |n: Option<u32>| n.map(|n| Data::goto(lb_chain(f.nodeport(), n)));
        self.set(maps.count, f.key(), lb(old.count), lb(new.count));
        let backend = |b: Option<&Backend>| b.map(|b| Data::Value(addr_port(b.addr, b.port)));
        let slots: BTreeSet<u32> = old.slots.keys().chain(new.slots.keys()).copied().collect();
        for s in slots {
            self.set(
                maps.backends,
                f.slot_key(s),
                backend(old.slots.get(&s)),
                backend(new.slots.get(&s)),
            );
        }
        let remember = |secs: Option<u32>| secs.map(|s| Data::jump(remember_chain(s)));
        self.set(
            maps.affine,
            f.key(),
            remember(old.affinity),
            remember(new.affinity),
        );
        if let Some(keys) = maps.keys {
            match (old.keyed, new.keyed) {
                (false, true) => self.add(keys, f.key(), None),
                (true, false) => self.delete(keys, f.key()),
                _ => {}
            }
        }
    }

    fn hairpin(&mut self, addr: IpAddr, present: bool) {
        let mut key = ip_bytes(addr);
        key.extend_from_slice(&ip_bytes(addr));
        let set = if addr.is_ipv6() {
            "hairpin6"
        } else {
            "hairpin4"
        };
        if present {
            self.add(set, key, None);
        } else {
            self.delete(set, key);
        }
    }

    fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty()
    }

    fn push(&self, b: &mut Batch) {
        for (map, elements) in &self.delete {
            push_elements(b, NFT_MSG_DESTROYSETELEM, spec(map), elements);
        }
        for (map, elements) in &self.add {
            push_elements(b, NFT_MSG_NEWSETELEM, spec(map), elements);
        }
    }
}

/// Creates chain `remember_<secs>` (or empties it) and writes its rules.
fn push_remember_chain(b: &mut Batch, secs: u32, anonymous_id: &mut u32) {
    let chain = remember_chain(secs);
    b.push(
        NFT_MSG_NEWCHAIN,
        NLM_F_CREATE,
        chain_attrs(NFTA_CHAIN_NAME, &chain),
        format!("create chain {chain}"),
    );
    b.push(
        NFT_MSG_DELRULE,
        0,
        chain_attrs(NFTA_RULE_CHAIN, &chain),
        format!("flush chain {chain}"),
    );
    for r in remember_rules(secs) {
        push_rule(b, &r, anonymous_id, |_| 0);
    }
}

fn push_destroy_chain(b: &mut Batch, chain: &str) {
    b.push(
        NFT_MSG_DESTROYCHAIN,
        0,
        chain_attrs(NFTA_CHAIN_NAME, chain),
        format!("delete chain {chain}"),
    );
}

/// Which keys `deltas` would take from 0 to more (`true`) or back to 0 (`false`).
fn flips<K: Ord + Copy>(
    counts: &BTreeMap<K, usize>,
    deltas: &BTreeMap<K, isize>,
) -> Vec<(K, bool)> {
    deltas
        .iter()
        .filter_map(|(k, d)| {
            let before = counts.get(k).copied().unwrap_or(0);
            let after = before.saturating_add_signed(*d);
            ((before == 0) != (after == 0)).then_some((*k, after > 0))
        })
        .collect()
}

/// Adds `deltas` to `counts`, forgetting what comes to 0.
fn add_counts<K: Ord + Copy>(counts: &mut BTreeMap<K, usize>, deltas: &BTreeMap<K, isize>) {
    for (k, d) in deltas {
        let after = counts
            .get(k)
            .copied()
            .unwrap_or(0)
            .saturating_add_signed(*d);
        if after == 0 {
            counts.remove(k);
        } else {
            counts.insert(*k, after);
        }
    }
}

/// What the kernel holds of the load balancer's.
#[derive(Default)]
struct Kernel {
    entries: BTreeMap<Frontend, Entry>,
    hairpin: BTreeSet<IpAddr>,
    /// The `remember_*` chains, and whether their rules are as berth writes them.
    remember_chains: BTreeMap<String, bool>,
    /// Elements that are no frontend's (of a protocol berth does not know, say).
    foreign: Vec<(&'static str, Vec<u8>)>,
}

/// Reads the load balancer's maps and chains.
fn read(nl: &mut Nfnetlink) -> Result<Kernel> {
    let mut k = Kernel::default();
    let dump = |nl: &mut Nfnetlink, map: &'static str| -> Result<Vec<(Vec<u8>, Option<Data>)>> {
        match read_elements(nl, map)? {
            Ok((elements, _)) => Ok(elements.into_iter().map(|e| (e.key, e.data)).collect()),
            Err(errno) => Err(DataplaneError::Kernel {
                op: format!("read nftables map {map}"),
                source: std::io::Error::from_raw_os_error(errno),
            }),
        }
    };
    for hairpin in ["hairpin4", "hairpin6"] {
        for (key, _) in dump(nl, hairpin)? {
            let (a, b) = key.split_at(key.len() / 2);
            match parse_ip(a).filter(|_| a == b) {
                Some(addr) => {
                    k.hairpin.insert(addr);
                }
                None => k.foreign.push((hairpin, key)),
            }
        }
    }
    for maps in MAPS.iter().flatten() {
        let addr_len = if maps.ipv6 { 16 } else { 4 };
        for (key, data) in dump(nl, maps.count)? {
            let n = chain_number(&data, expr::NFT_GOTO, lb_prefix(maps.nodeport));
            match (Frontend::parse(maps, &key), n) {
                (Some((f, [])), Some(n)) => k.entries.entry(f).or_default().count = Some(n),
                _ => k.foreign.push((maps.count, key)),
            }
        }
        for (key, data) in dump(nl, maps.backends)? {
            let slot = Frontend::parse(maps, &key)
                .and_then(|(f, rest)| Some((f, u32::from_ne_bytes(rest.try_into().ok()?))));
            let backend = match &data {
                Some(Data::Value(v)) => {
                    parse_addr_port(v, addr_len).filter(|_| v.len() == addr_len + 4)
                }
                _ => None,
            };
            match (slot, backend) {
                (Some((f, slot)), Some((addr, port))) => {
                    let local = k.hairpin.contains(&addr);
                    let b = Backend { addr, port, local };
                    k.entries.entry(f).or_default().slots.insert(slot, b);
                }
                _ => k.foreign.push((maps.backends, key)),
            }
        }
        for (key, data) in dump(nl, maps.affine)? {
            let secs = chain_number(&data, expr::NFT_JUMP, REMEMBER_PREFIX);
            match (Frontend::parse(maps, &key), secs) {
                (Some((f, [])), Some(secs)) => {
                    k.entries.entry(f).or_default().affinity = Some(secs)
                }
                _ => k.foreign.push((maps.affine, key)),
            }
        }
        if let Some(keys) = maps.keys {
            for (key, _) in dump(nl, keys)? {
                match Frontend::parse(maps, &key) {
                    Some((f, [])) => k.entries.entry(f).or_default().keyed = true,
                    _ => k.foreign.push((keys, key)),
                }
            }
        }
    }
    let mut table_only = Vec::new();
    put_str(&mut table_only, NFTA_CHAIN_TABLE, TABLE);
    let mut names = Vec::new();
    nl.dump(NFT_MSG_GETCHAIN, &table_only, |c| {
        if let Some(name) = attr_str(c, NFTA_CHAIN_NAME)
            && name.starts_with(REMEMBER_PREFIX)
        {
            names.push(name.to_string());
        }
    })?
    .map_err(|errno| DataplaneError::Kernel {
        op: "read nftables chains".into(),
        source: std::io::Error::from_raw_os_error(errno),
    })?;
    for name in names {
        let intact = match name[REMEMBER_PREFIX.len()..].parse::<u32>() {
            Ok(secs) if remember_chain(secs) == name => remember_chain_intact(nl, secs)?,
            _ => false,
        };
        k.remember_chains.insert(name, intact);
    }
    Ok(k)
}

/// Whether chain `remember_<secs>` has exactly the rules berth writes there.
fn remember_chain_intact(nl: &mut Nfnetlink, secs: u32) -> Result<bool> {
    let chain = remember_chain(secs);
    let mut a = Vec::new();
    put_str(&mut a, NFTA_RULE_TABLE, TABLE);
    put_str(&mut a, NFTA_RULE_CHAIN, &chain);
    let mut got = Vec::new();
    let dumped = nl.dump(NFT_MSG_GETRULE, &a, |r| {
        got.push(attr(r, NFTA_RULE_EXPRESSIONS).unwrap_or_default().to_vec())
    })?;
    let want = remember_rules(secs);
    Ok(dumped == Ok(true)
        && got.len() == want.len()
        && want
            .iter()
            .zip(&got)
            .all(|(w, g)| covers(g, &expr::encode(&w.exprs, expr::Refs::Dump))))
}

/// Berth's frontends as it last wrote them to the kernel (see the module's documentation).
/// Calls are synchronous. It acts in the network namespace of the thread that made it.
pub struct LoadBalancer {
    /// Kept open: closing an nf_tables socket waits for the kernel to free the last
    /// transaction (an RCU grace period, milliseconds), which would be most of each change.
    nl: Option<Nfnetlink>,
    entries: BTreeMap<Frontend, Entry>,
    /// Slots of local backends, per address: its hairpin element is there while above 0.
    hairpin: BTreeMap<IpAddr, usize>,
    /// Affine frontends per timeout (seconds): its `remember_<secs>` chain is there while
    /// above 0.
    remember: BTreeMap<u32, usize>,
    /// A sweep of the affinity maps failed and is to be done again.
    sweep_pending: bool,
}

impl LoadBalancer {
    /// A load balancer that knows of no frontends (a placeholder: one that is to write the
    /// kernel comes from [`LoadBalancer::from_kernel`]).
    pub fn empty() -> LoadBalancer {
        LoadBalancer {
            nl: None,
            entries: BTreeMap::new(),
            hairpin: BTreeMap::new(),
            remember: BTreeMap::new(),
            sweep_pending: false,
        }
    }

    fn of(entries: BTreeMap<Frontend, Entry>) -> LoadBalancer {
        let mut lb = LoadBalancer {
            entries,
            ..LoadBalancer::empty()
        };
        for e in lb.entries.values() {
            for b in e.slots.values().filter(|b| b.local) {
                *lb.hairpin.entry(b.addr).or_default() += 1;
            }
            if let Some(secs) = e.affinity {
                *lb.remember.entry(secs).or_default() += 1;
            }
        }
        lb
    }

    /// Reads the maps back from the kernel (after a daemon restart: then
    /// [`LoadBalancer::sync_all`] rewrites nothing that is right). Berth's table must be
    /// installed ([`super::install`]).
    pub fn from_kernel() -> Result<LoadBalancer> {
        let mut nl = Nfnetlink::open()?;
        let k = read(&mut nl)?;
        Ok(LoadBalancer {
            nl: Some(nl),
            ..LoadBalancer::of(k.entries)
        })
    }

    /// Runs `f` with the socket, which is kept if `f` succeeds (after an error, what is left
    /// unread on it is unknown).
    fn with_socket<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Nfnetlink) -> Result<T>,
    ) -> Result<T> {
        let mut nl = match self.nl.take() {
            Some(nl) => nl,
            None => Nfnetlink::open()?,
        };
        let out = f(self, &mut nl)?;
        self.nl = Some(nl);
        Ok(out)
    }

    /// A frontend's backends and affinity as the kernel has them (a backend is `local` if its
    /// address is in the hairpin set); `None` when it has no backends.
    pub fn pool(&self, f: &Frontend) -> Option<Pool> {
        self.entries.get(f).map(Entry::pool)
    }

    /// How many frontends have backends.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes these frontends' pools what is given (`None`, or no backends: the frontend is
    /// removed), touching only their elements, in one transaction: on error nothing changed,
    /// here or in the kernel. A frontend given twice gets the last. Returns the backends that
    /// left their frontends, for the caller to end their flows (see
    /// [`crate::conntrack::delete_flows`]).
    ///
    /// The work is that of the elements that change, whatever the number of frontends, but
    /// for affinity: when an affine frontend loses a backend (or its affinity), the affinity
    /// maps are read to delete what pointed there. That happens after the transaction; if it
    /// fails, it is tried again at the next call. The kernel's own commit does grow with the
    /// number of frontends when a frontend's number of backends changes: it validates every
    /// frontend's `goto lb_N` again (some 80 ns each on Linux 6.18).
    pub fn apply(
        &mut self,
        changes: &[(Frontend, Option<Pool>)],
    ) -> Result<Vec<(Frontend, Backend)>> {
        self.with_socket(|lb, nl| lb.apply_with(nl, changes))
    }

    fn apply_with(
        &mut self,
        nl: &mut Nfnetlink,
        changes: &[(Frontend, Option<Pool>)],
    ) -> Result<Vec<(Frontend, Backend)>> {
        let mut wanted: BTreeMap<Frontend, Option<&Pool>> = BTreeMap::new();
        for (f, pool) in changes {
            check_family(f, pool.as_ref())?;
            wanted.insert(*f, pool.as_ref());
        }
        let empty = Entry::default();
        let mut planned: Vec<(Frontend, Entry)> = Vec::with_capacity(wanted.len());
        let mut ch = Changes::default();
        let mut hairpin: BTreeMap<IpAddr, isize> = BTreeMap::new();
        let mut remember: BTreeMap<u32, isize> = BTreeMap::new();
        let mut left = Vec::new();
        let mut sweep = self.sweep_pending;
        for (f, pool) in wanted {
            let old = self.entries.get(&f).unwrap_or(&empty);
            let new = pool.map_or_else(Entry::default, |p| plan(&f, old, p));
            if *old == new {
                continue;
            }
            ch.frontend(&f, old, &new);
            account(old, &new, &mut hairpin, &mut remember);
            let gone = gone(&f, old, &new);
            sweep |= old.affinity.is_some() && (!gone.is_empty() || new.affinity.is_none());
            left.extend(gone);
            planned.push((f, new));
        }
        for (addr, present) in flips(&self.hairpin, &hairpin) {
            ch.hairpin(addr, present);
        }
        let timeouts = flips(&self.remember, &remember);
        let mut b = Batch::default();
        let mut anonymous_id = 1;
        for &(secs, present) in &timeouts {
            if present {
                push_remember_chain(&mut b, secs, &mut anonymous_id);
            }
        }
        ch.push(&mut b);
        for &(secs, present) in &timeouts {
            if !present {
                push_destroy_chain(&mut b, &remember_chain(secs));
            }
        }
        nl.commit(&b)?;
        for (f, new) in planned {
            if new.count.is_none() && new.slots.is_empty() {
                self.entries.remove(&f);
            } else {
                self.entries.insert(f, new);
            }
        }
        add_counts(&mut self.hairpin, &hairpin);
        add_counts(&mut self.remember, &remember);
        if sweep {
            self.sweep_pending = self.sweep(nl).is_err();
        }
        Ok(left)
    }

    /// Makes the kernel hold exactly these frontends (start-up, and after the table was
    /// damaged): re-reads the maps, removes frontends not in `want`, and rewrites whatever
    /// differs (elements, the hairpin set, the `remember_*` chains), in one transaction; then
    /// deletes affinities that point to no backend of an affine frontend. Returns the backends
    /// that left their frontends.
    pub fn sync_all(
        &mut self,
        want: &BTreeMap<Frontend, Pool>,
    ) -> Result<Vec<(Frontend, Backend)>> {
        self.with_socket(|lb, nl| lb.sync_all_with(nl, want))
    }

    fn sync_all_with(
        &mut self,
        nl: &mut Nfnetlink,
        want: &BTreeMap<Frontend, Pool>,
    ) -> Result<Vec<(Frontend, Backend)>> {
        for (f, pool) in want {
            check_family(f, Some(pool))?;
        }
        let k = read(nl)?;
        let mut ch = Changes::default();
        let mut left = Vec::new();
        let mut entries = BTreeMap::new();
        let empty = Entry::default();
        let frontends: BTreeSet<&Frontend> = k.entries.keys().chain(want.keys()).collect();
        for f in frontends {
            let old = k.entries.get(f).unwrap_or(&empty);
            let new = want.get(f).map_or_else(Entry::default, |p| plan(f, old, p));
            ch.frontend(f, old, &new);
            left.extend(gone(f, old, &new));
            if new.count.is_some() {
                entries.insert(*f, new);
            }
        }
        for (map, key) in k.foreign {
            ch.delete(map, key);
        }
        let lb = LoadBalancer::of(entries);
        let want_hairpin: BTreeSet<IpAddr> = lb.hairpin.keys().copied().collect();
        for addr in k.hairpin.symmetric_difference(&want_hairpin) {
            ch.hairpin(*addr, want_hairpin.contains(addr));
        }
        let mut b = Batch::default();
        let mut anonymous_id = 1;
        for &secs in lb.remember.keys() {
            if k.remember_chains.get(&remember_chain(secs)) != Some(&true) {
                push_remember_chain(&mut b, secs, &mut anonymous_id);
            }
        }
        ch.push(&mut b);
        for chain in k.remember_chains.keys() {
            let used = chain[REMEMBER_PREFIX.len()..]
                .parse::<u32>()
                .is_ok_and(|secs| {
                    lb.remember.contains_key(&secs) && remember_chain(secs) == *chain
                });
            if !used {
                push_destroy_chain(&mut b, chain);
            }
        }
        nl.commit(&b)?;
        *self = lb;
        self.sweep_pending = self.sweep(nl).is_err();
        Ok(left)
    }

    /// Deletes the affinities that point to no backend of an affine frontend.
    fn sweep(&self, nl: &mut Nfnetlink) -> Result<()> {
        let mut ch = Changes::default();
        // The backends of the affine frontends met, as they are met.
        let mut backends: BTreeMap<Frontend, BTreeSet<(IpAddr, u16)>> = BTreeMap::new();
        for (map, ipv6) in [("affinity4", false), ("affinity6", true)] {
            let elements = match read_elements(nl, map)? {
                Ok((elements, _)) => elements,
                Err(errno) => {
                    return Err(DataplaneError::Kernel {
                        op: format!("read nftables map {map}"),
                        source: std::io::Error::from_raw_os_error(errno),
                    });
                }
            };
            for e in elements {
                let keep = self
                    .affinity(ipv6, &e)
                    .and_then(|(f, to)| {
                        let entry = self.entries.get(&f).filter(|e| e.affinity.is_some())?;
                        let of = backends.entry(f).or_insert_with(|| {
                            entry.slots.values().map(|b| (b.addr, b.port)).collect()
                        });
                        Some(of.contains(&to))
                    })
                    .unwrap_or(false);
                if !keep {
                    ch.delete(map, e.key);
                }
            }
        }
        if ch.is_empty() {
            return Ok(());
        }
        let mut b = Batch::default();
        ch.push(&mut b);
        nl.commit(&b)
    }

    /// An affinity element's frontend (a VIP's if there is one of its address, protocol and
    /// port, else a node port's) and backend.
    fn affinity(&self, ipv6: bool, e: &Element) -> Option<(Frontend, (IpAddr, u16))> {
        // client . frontend address . protocol . port : backend . port
        let a = if ipv6 { 16 } else { 4 };
        let daddr = parse_ip(e.key.get(a..2 * a)?)?;
        let protocol = Protocol::from_number(*e.key.get(2 * a)?)?;
        let port = u16::from_be_bytes([*e.key.get(2 * a + 4)?, *e.key.get(2 * a + 5)?]);
        let Some(Data::Value(v)) = &e.data else {
            return None;
        };
        let vip = Frontend::Vip {
            vip: daddr,
            protocol,
            port,
        };
        let node = Frontend::NodePort {
            ipv6,
            protocol,
            port,
        };
        let f = if self.entries.contains_key(&vip) {
            vip
        } else {
            node
        };
        Some((f, parse_addr_port(v, a)?))
    }
}

/// A backend of the other family than its frontend's is the caller's mistake.
fn check_family(f: &Frontend, pool: Option<&Pool>) -> Result<()> {
    match pool.and_then(|p| p.backends.iter().find(|b| b.addr.is_ipv6() != f.ipv6())) {
        Some(b) => Err(DataplaneError::io(
            format!(
                "frontend {f}: backend {} is of another address family",
                b.addr
            ),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )),
        None => Ok(()),
    }
}

/// Counts the hairpin and affinity-timeout uses that go from `old` to `new`.
fn account(
    old: &Entry,
    new: &Entry,
    hairpin: &mut BTreeMap<IpAddr, isize>,
    remember: &mut BTreeMap<u32, isize>,
) {
    for (e, d) in [(old, -1), (new, 1)] {
        for b in e.slots.values().filter(|b| b.local) {
            *hairpin.entry(b.addr).or_default() += d;
        }
        if let Some(secs) = e.affinity {
            *remember.entry(secs).or_default() += d;
        }
    }
}

/// The backends of `old` that `new` does not have.
fn gone(f: &Frontend, old: &Entry, new: &Entry) -> Vec<(Frontend, Backend)> {
    let mut out: Vec<(Frontend, Backend)> = Vec::new();
    for b in old.slots.values() {
        if !new.has(b.addr, b.port) && !out.iter().any(|(_, o)| o == b) {
            out.push((*f, *b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn b(last: u8) -> Backend {
        Backend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            port: 80,
            local: false,
        }
    }

    fn pool(backends: &[u8]) -> Pool {
        Pool {
            backends: backends.iter().map(|i| b(*i)).collect(),
            affinity: None,
        }
    }

    fn vip() -> Frontend {
        Frontend::Vip {
            vip: "10.96.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn slots(e: &Entry) -> Vec<u8> {
        e.slots
            .values()
            .map(|b| match b.addr {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect()
    }

    #[test]
    fn backends_keep_their_slots_and_the_last_fills_a_hole() {
        let e = plan(&vip(), &Entry::default(), &pool(&[1, 2, 3, 4]));
        assert_eq!((e.count, slots(&e)), (Some(4), vec![1, 2, 3, 4]));
        // 2 leaves: 4, the last, moves into its slot.
        let e2 = plan(&vip(), &e, &pool(&[1, 3, 4]));
        assert_eq!((e2.count, slots(&e2)), (Some(3), vec![1, 4, 3]));
        // A new one takes the next slot; one that replaces another takes its slot.
        let e3 = plan(&vip(), &e2, &pool(&[1, 3, 4, 5]));
        assert_eq!(slots(&e3), vec![1, 4, 3, 5]);
        let e4 = plan(&vip(), &e3, &pool(&[1, 3, 5, 6]));
        assert_eq!(slots(&e4), vec![1, 6, 3, 5]);
        let mut ch = Changes::default();
        ch.frontend(&vip(), &e3, &e4);
        // One slot rewritten (deleted and added), nothing else.
        assert_eq!(ch.delete["backends4"].len(), 1);
        assert_eq!(ch.add["backends4"].len(), 1);
        assert_eq!(ch.add.len() + ch.delete.len(), 2);
        // Nothing left: no elements.
        assert_eq!(plan(&vip(), &e4, &pool(&[])), Entry::default());
    }

    #[test]
    fn more_than_the_most_keeps_those_it_had() {
        let on = |port| Backend { port, ..b(1) };
        let e = plan(&vip(), &Entry::default(), &pool(&[7, 8]));
        let many = Pool {
            backends: (1000..1300).map(on).chain([b(7), b(8)]).collect(),
            affinity: None,
        };
        let full = plan(&vip(), &e, &many);
        assert_eq!(full.count, Some(MAX_BACKENDS as u32));
        assert_eq!(&slots(&full)[..3], &[7, 8, 1]);
        // The first of the others, in order, take the rest.
        assert!(full.has(on(1000).addr, 1253));
        assert!(!full.has(on(1000).addr, 1254));
    }

    #[test]
    fn a_load_balancer_moves_to_a_blocking_thread() {
        fn send<T: Send>() {}
        send::<LoadBalancer>();
    }

    #[test]
    fn counts_flip_at_zero() {
        let mut counts = BTreeMap::from([(1, 2usize), (3, 1)]);
        let deltas = BTreeMap::from([(1, -2), (2, 1), (3, 1)]);
        assert_eq!(flips(&counts, &deltas), vec![(1, false), (2, true)]);
        add_counts(&mut counts, &deltas);
        assert_eq!(counts, BTreeMap::from([(2, 1), (3, 2)]));
    }

    #[test]
    fn keys_in_the_kernel_layout() {
        let f = vip();
        // As `nft --debug=netlink` shows `10.96.0.1 . tcp . 80 . 2`.
        assert_eq!(
            f.slot_key(2),
            [10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0, 2, 0, 0, 0]
        );
        assert_eq!(
            Frontend::parse(f.maps(), &f.slot_key(2)),
            Some((f, &[2u8, 0, 0, 0][..]))
        );
        let n = Frontend::NodePort {
            ipv6: true,
            protocol: Protocol::Udp,
            port: 30053,
        };
        assert_eq!(n.maps().count, "nodeports6");
        assert_eq!(Frontend::parse(n.maps(), &n.key()), Some((n, &[][..])));
        assert_eq!(Frontend::parse(n.maps(), &[99, 0, 0, 0, 0, 1, 0, 0]), None);
    }
}
