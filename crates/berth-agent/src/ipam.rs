//! Addresses: the in-memory pools in front of the store's address keys, and the per-host
//! blocks of overlay networks.
//!
//! A bridge network has one pool per subnet. An overlay network's subnets are split into
//! blocks ([`berth_ipam::block_prefix`]); a host claims a free block with one
//! create-if-absent on `blocks/<network>/<block>`, allocates inside its own blocks with no
//! cluster round trip, and claims another when they are full. Address keys stay
//! create-if-absent, so even a requested address in another host's block, or a block taken
//! from a host thought gone, can never be handed out twice.

use std::net::IpAddr;

use berth_ipam::{IpamError, Pool, block_count, nth_block};
use berth_model::{Block, Driver, Network};
use berth_store::{Compare, Txn, TxnOutcome};
use ipnet::IpNet;

use crate::networks::{claim_subnets, create_conflict};
use crate::{Agent, AgentError, Result, encode, keys};

/// VNIs handed out when none is asked for start above the 12-bit VLAN range, as Docker's.
const FIRST_AUTO_VNI: u32 = 4096;

/// What an in-memory take needs before it can succeed.
enum Take {
    Got(IpAddr),
    /// Every block this host has in the subnet is full (or it has none).
    NeedBlock,
}

impl Agent {
    /// Takes one address (`requested`, else the next free) in the subnet `cidr` of a network,
    /// in memory; the caller commits it to the store or releases it again. On an overlay
    /// network it claims a new block when this host's are full.
    pub(crate) async fn take_in_subnet(
        &self,
        network: &str,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<IpAddr> {
        let known = self.pools.lock().expect("pools lock").contains_key(network);
        if !known {
            // An overlay network another host made: this host has no blocks in it yet.
            let net = self.network(network).await?;
            if net.driver == Driver::Overlay {
                self.pools
                    .lock()
                    .expect("pools lock")
                    .entry(network.to_string())
                    .or_default();
            }
        }
        for _ in 0..64 {
            match self.take_in_memory(network, cidr, requested)? {
                Take::Got(ip) => return Ok(ip),
                Take::NeedBlock => self.claim_block(network, cidr).await?,
            }
        }
        Err(AgentError::Conflict(format!(
            "cannot claim an address block in {cidr} of network {network:?}: too much contention; try again"
        )))
    }

    fn take_in_memory(
        &self,
        network: &str,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<Take> {
        let in_use = |e| match e {
            IpamError::InUse(ip) => AgentError::Conflict(format!(
                "address {ip} is already in use on network {network:?}"
            )),
            other => other.into(),
        };
        let mut pools = self.pools.lock().expect("pools lock");
        let pools = pools.get_mut(network).ok_or_else(|| {
            AgentError::Conflict(format!("{cidr} is not a subnet of network {network:?}"))
        })?;
        // A bridge network: one pool for the whole subnet.
        if let Some(pool) = pools.iter_mut().find(|p| p.subnet() == cidr) {
            return match requested {
                Some(ip) => pool.take(ip).map(|()| Take::Got(ip)).map_err(in_use),
                None => Ok(Take::Got(pool.allocate()?)),
            };
        }
        // An overlay network: this host's blocks of the subnet.
        let mut blocks = pools
            .iter_mut()
            .filter(|p| cidr.contains(&p.subnet().addr()));
        match requested {
            Some(ip) => match blocks.find(|p| p.subnet().contains(&ip)) {
                Some(pool) => pool.take(ip).map(|()| Take::Got(ip)).map_err(in_use),
                // In another host's block, or in none: the store's create-if-absent decides.
                None => Ok(Take::Got(ip)),
            },
            None => Ok(blocks
                .find_map(|p| p.allocate().ok())
                .map_or(Take::NeedBlock, Take::Got)),
        }
    }

    /// Frees one address in a network's in-memory pools.
    pub(crate) fn release_ip(&self, network: &str, ip: IpAddr) {
        if let Some(pools) = self.pools.lock().expect("pools lock").get_mut(network) {
            pools.iter_mut().for_each(|p| p.release(ip));
        }
    }

    /// Claims a free block of `subnet` for this host and adds it to the in-memory pools
    /// with the addresses the store already holds in it. Fails when no block is free.
    async fn claim_block(&self, network: &str, subnet: IpNet) -> Result<()> {
        let _one = self.block_claims.lock().await;
        // Another attach of this host may have claimed one while this one waited.
        let have_room = self
            .pools
            .lock()
            .expect("pools lock")
            .get(network)
            .is_some_and(|ps| {
                ps.iter()
                    .any(|p| subnet.contains(&p.subnet().addr()) && p.clone().allocate().is_ok())
            });
        if have_room {
            return Ok(());
        }
        let claimed: std::collections::HashSet<String> = self
            .store
            .list(&keys::blocks_prefix(network))
            .await?
            .items
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        let count = block_count(subnet);
        // Hosts start looking at different places, so that they rarely race for one block.
        let start = u128::from(fnv(&self.host.id)) % count.max(1);
        let candidates = (start..count).chain(0..start).take(4096);
        for i in candidates {
            let Some(block) = nth_block(subnet, i) else {
                continue;
            };
            let key = keys::block(network, block);
            if claimed.contains(&key) {
                continue;
            }
            let txn = Txn::new()
                .when(Compare::Absent(key.clone()))
                .put(key, self.host.id.clone());
            match self.commit(txn).await? {
                TxnOutcome::Committed { .. } => {}
                TxnOutcome::CompareFailed(_) => {
                    self.block_claim_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
            }
            let gateways: Vec<IpAddr> = self
                .network(network)
                .await?
                .subnets
                .iter()
                .map(|s| s.gateway)
                .collect();
            let mut pool = block_pool(block, subnet, &gateways);
            for kv in self.store.list(&keys::ipam_prefix(network)).await?.items {
                if let Some(ip) = keys::ipam_address(&kv.key).filter(|ip| block.contains(ip)) {
                    let _ = pool.take(ip);
                }
            }
            self.pools
                .lock()
                .expect("pools lock")
                .entry(network.to_string())
                .or_default()
                .push(pool);
            tracing::info!(network, %block, "address block claimed");
            return Ok(());
        }
        Err(AgentError::Conflict(format!(
            "network {network:?} has no free address block left in {subnet}"
        )))
    }

    /// Whether this host holds address blocks of the network.
    pub(crate) fn holds_blocks(&self, network: &str) -> bool {
        self.pools
            .lock()
            .expect("pools lock")
            .get(network)
            .is_some_and(|ps| !ps.is_empty())
    }

    /// The compares an attach makes so that its addresses come from blocks this host still
    /// owns (a host thought gone may have had its blocks freed).
    pub(crate) fn block_compares(&self, net: &Network, ips: &[IpNet]) -> Vec<Compare> {
        if net.driver != Driver::Overlay {
            return Vec::new();
        }
        let pools = self.pools.lock().expect("pools lock");
        let Some(pools) = pools.get(&net.name) else {
            return Vec::new();
        };
        ips.iter()
            .filter_map(|ip| pools.iter().find(|p| p.subnet().contains(&ip.addr())))
            .map(|p| {
                Compare::Value(
                    keys::block(&net.name, p.subnet()),
                    self.host.id.clone().into_bytes(),
                )
            })
            .collect()
    }

    /// Forgets a block this host lost (freed while it was thought gone).
    pub(crate) fn forget_block(&self, key: &str) {
        let Some(block) = keys::block_cidr(key) else {
            return;
        };
        let network = key
            .strip_prefix(keys::BLOCKS)
            .and_then(|k| k.split('/').next())
            .unwrap_or_default();
        if let Some(ps) = self.pools.lock().expect("pools lock").get_mut(network) {
            ps.retain(|p| p.subnet() != block);
        }
    }

    /// Gives back this host's blocks of an overlay network that hold no address of its own
    /// any more, keeping one per subnet while it has others (so attach and detach do not
    /// claim and release a block each time). Under the topology lock, so no attach is
    /// allocating meanwhile. Best effort: a block kept is claimed, not lost.
    pub(crate) async fn release_empty_blocks(&self, network: &str) {
        let candidates: Vec<IpNet> = {
            let pools = self.pools.lock().expect("pools lock");
            let Some(ps) = pools.get(network) else {
                return;
            };
            ps.iter()
                .filter(|p| {
                    let siblings = ps
                        .iter()
                        .filter(|q| q.subnet().addr().is_ipv4() == p.subnet().addr().is_ipv4())
                        .count();
                    // Only the subnet's own reserved addresses (network, broadcast, gateway,
                    // taken at claim time) may remain.
                    siblings > 1 && p.taken_count() <= 3
                })
                .map(|p| p.subnet())
                .collect()
        };
        if candidates.is_empty() {
            return;
        }
        let _topology = self.topology.write().await;
        let Ok(net) = self.network(network).await else {
            return;
        };
        if net.driver != Driver::Overlay {
            return;
        }
        let holders = match self.store.list(&keys::ipam_prefix(network)).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::debug!(network, error = %e, "cannot check blocks for release");
                return;
            }
        };
        for block in candidates {
            let used = holders.iter().any(|kv| {
                kv.value != keys::GATEWAY_OWNER.as_bytes()
                    && keys::ipam_address(&kv.key).is_some_and(|ip| block.contains(&ip))
            });
            if used {
                continue;
            }
            let key = keys::block(network, block);
            let txn = Txn::new()
                .when(Compare::Value(
                    key.clone(),
                    self.host.id.clone().into_bytes(),
                ))
                .delete(key.clone());
            match self.commit(txn).await {
                Ok(_) => {
                    self.forget_block(&key);
                    tracing::info!(network, %block, "empty address block released");
                }
                Err(e) => tracing::debug!(network, error = %e, "cannot release an empty block"),
            }
        }
    }

    /// Gives back this host's blocks of a network (it has no endpoints on it any more).
    pub(crate) async fn release_blocks(&self, network: &str) -> Result<()> {
        let mine = self.host.id.as_bytes();
        for kv in self.store.list(&keys::blocks_prefix(network)).await?.items {
            if kv.value != mine {
                continue;
            }
            self.commit(
                Txn::new()
                    .when(Compare::Value(kv.key.clone(), kv.value.clone()))
                    .delete(kv.key.clone()),
            )
            .await?;
            self.forget_block(&kv.key);
        }
        Ok(())
    }

    /// The network's blocks and their hosts (for `network inspect`).
    pub(crate) async fn blocks(&self, network: &str) -> Result<Vec<Block>> {
        Ok(self
            .store
            .list(&keys::blocks_prefix(network))
            .await?
            .items
            .into_iter()
            .filter_map(|kv| {
                Some(Block {
                    cidr: keys::block_cidr(&kv.key)?,
                    host: String::from_utf8_lossy(&kv.value).into_owned(),
                })
            })
            .collect())
    }

    /// Records an overlay network with its VNI (the one asked for, or the lowest free one)
    /// and gateway addresses, in one transaction. Nothing is made in the kernel: a host
    /// realizes the network when its first endpoint joins.
    pub(crate) async fn create_overlay(
        &self,
        mut net: Network,
        requested_vni: Option<u32>,
    ) -> Result<Network> {
        let taken: std::collections::HashSet<u32> = self
            .store
            .list(keys::VNIS)
            .await?
            .items
            .iter()
            .filter_map(|kv| kv.key[keys::VNIS.len()..].parse().ok())
            .collect();
        let vni = match requested_vni {
            Some(v) if taken.contains(&v) => {
                return Err(AgentError::Conflict(format!(
                    "VNI {v} is used by another overlay network"
                )));
            }
            Some(v) => v,
            // A random free one: a VNI just given up may still be on a device somewhere
            // (a host that was down), and two hosts creating at once rarely pick the same.
            None => std::iter::repeat_with(|| fastrand::u32(FIRST_AUTO_VNI..=0xff_ffff))
                .take(64)
                .chain(FIRST_AUTO_VNI..=0xff_ffff)
                .find(|v| !taken.contains(v))
                .ok_or_else(|| AgentError::Conflict("no free VNI left".into()))?,
        };
        net.vni = Some(vni);
        let mut txn = Txn::new()
            .when(Compare::Absent(keys::network(&net.name)))
            .when(Compare::Absent(keys::vni(vni)))
            .put(keys::network(&net.name), encode(&net))
            .put(keys::vni(vni), net.name.clone());
        for s in &net.subnets {
            txn = txn.put(keys::ipam(&net.name, s.gateway), keys::GATEWAY_OWNER);
        }
        match self.commit(claim_subnets(&net, txn)).await? {
            TxnOutcome::Committed { .. } => {}
            TxnOutcome::CompareFailed(Compare::Absent(k)) if k.starts_with(keys::VNIS) => {
                return Err(AgentError::Conflict(format!(
                    "VNI {vni} was taken by another overlay network meanwhile; try again"
                )));
            }
            TxnOutcome::CompareFailed(c) => return Err(create_conflict(&net, &c)),
        }
        self.pools
            .lock()
            .expect("pools lock")
            .insert(net.name.clone(), Vec::new());
        tracing::info!(
            "overlay network {} created: VNI {vni}, {}",
            net.name,
            crate::networks::subnets_line(&net)
        );
        Ok(net)
    }
}

/// The pool of one block: the subnet's reserved addresses and its gateway (anycast, on the
/// bridge of every host) are never handed out, whatever the store says.
pub(crate) fn block_pool(block: IpNet, subnet: IpNet, gateways: &[IpAddr]) -> Pool {
    let mut pool = Pool::block(block, subnet);
    for gw in gateways.iter().filter(|g| block.contains(*g)) {
        let _ = pool.take(*gw);
    }
    pool
}

/// FNV-1a: a stable spread of host ids over a subnet's blocks.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
