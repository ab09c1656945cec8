//! Address pools for one subnet.
//!
//! A [`Pool`] is the in-memory index of which addresses of a subnet are taken. It hands out the
//! next free address after the last one it handed out (like host-local and Docker, so a released
//! address is not reused at once while peers may still cache its MAC), accepts requests for
//! specific addresses, and never returns a taken address. The store, not the pool, is the source
//! of truth: the agent rebuilds pools from the store at start and commits every allocation there
//! with a create-if-absent check, so that two daemons sharing a store can never hand out one
//! address twice.
//!
//! Cost does not grow with the number of allocated addresses: pools of up to 2^24 addresses use a
//! two-level bitmap (finding a free bit skips full 64-bit words through a summary), larger ones
//! (IPv6 /64s) a hash set probed from a cursor, where free space is effectively unbounded.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpamError {
    #[error("no free address left in {0}")]
    Exhausted(IpNet),
    #[error("address {ip} is not in subnet {subnet}")]
    OutsideSubnet { ip: IpAddr, subnet: IpNet },
    #[error(
        "address {ip} cannot be assigned in {subnet}: it is the subnet's network or broadcast address"
    )]
    Reserved { ip: IpAddr, subnet: IpNet },
    #[error("address {0} is already in use")]
    InUse(IpAddr),
}

/// Largest pool kept as a bitmap (2 MiB of bits at most).
const BITMAP_MAX: u128 = 1 << 24;
/// How many random-free probes a sparse pool makes before calling itself full.
const SPARSE_PROBES: u32 = 4096;

/// The free/taken index of one subnet.
#[derive(Debug, Clone)]
pub struct Pool {
    subnet: IpNet,
    /// Offset from the network address of the first and last assignable address.
    first: u128,
    last: u128,
    /// Where the next search starts (offset).
    cursor: u128,
    taken: Taken,
}

#[derive(Debug, Clone)]
enum Taken {
    Dense(Bitmap),
    Sparse(HashSet<u128>),
}

impl Pool {
    /// An empty pool over every assignable address of `subnet`: all but the network and (IPv4)
    /// broadcast addresses, except in /31 and /32 (RFC 3021) where every address is assignable.
    pub fn new(subnet: IpNet) -> Self {
        let subnet = subnet.trunc();
        let host_bits = u32::from(subnet.max_prefix_len() - subnet.prefix_len());
        let size: u128 = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let (first, last) = match subnet {
            IpNet::V4(_) if host_bits <= 1 => (0, size - 1),
            IpNet::V4(_) => (1, size - 2),
            IpNet::V6(_) if host_bits == 0 => (0, 0),
            // IPv6 has no broadcast; the all-zero address is the subnet-router anycast.
            IpNet::V6(_) => (1, size.saturating_sub(1)),
        };
        let span = last - first + 1;
        let taken = if span <= BITMAP_MAX {
            Taken::Dense(Bitmap::new(span as usize))
        } else {
            Taken::Sparse(HashSet::new())
        };
        Pool {
            subnet,
            first,
            last,
            cursor: first,
            taken,
        }
    }

    /// A pool over one block of a larger subnet (an overlay network's per-host block): every
    /// address of the block is assignable except the subnet's own network and (IPv4)
    /// broadcast addresses, which a block at either end of the subnet contains.
    pub fn block(block: IpNet, subnet: IpNet) -> Self {
        let block = block.trunc();
        let mut pool = Pool::new(block);
        let host_bits = u32::from(block.max_prefix_len() - block.prefix_len());
        if host_bits > 1 && block != subnet.trunc() {
            // Widen to the whole block, then hold back what the subnet reserves.
            pool.first = 0;
            pool.last = (1u128 << host_bits) - 1;
            pool.cursor = 0;
            pool.taken = Taken::Dense(Bitmap::new((pool.last + 1) as usize));
            let reserved = [
                Some(subnet.network()),
                subnet.addr().is_ipv4().then(|| subnet.broadcast()),
            ];
            for ip in reserved.into_iter().flatten() {
                if block.contains(&ip) {
                    let _ = pool.take(ip);
                }
            }
        }
        pool
    }

    pub fn subnet(&self) -> IpNet {
        self.subnet
    }

    /// How many addresses are taken.
    pub fn taken_count(&self) -> usize {
        match &self.taken {
            Taken::Dense(b) => b.count(),
            Taken::Sparse(s) => s.len(),
        }
    }

    /// Marks `ip` taken. Fails if it is outside the assignable range or already taken.
    pub fn take(&mut self, ip: IpAddr) -> Result<(), IpamError> {
        let off = self.offset_of(ip)?;
        let fresh = match &mut self.taken {
            Taken::Dense(b) => b.set((off - self.first) as usize),
            Taken::Sparse(s) => s.insert(off),
        };
        if fresh {
            Ok(())
        } else {
            Err(IpamError::InUse(ip))
        }
    }

    /// Marks `ip` free again. Freeing a free or foreign address does nothing.
    pub fn release(&mut self, ip: IpAddr) {
        if let Ok(off) = self.offset_of(ip) {
            match &mut self.taken {
                Taken::Dense(b) => b.clear((off - self.first) as usize),
                Taken::Sparse(s) => {
                    s.remove(&off);
                }
            }
        }
    }

    pub fn is_taken(&self, ip: IpAddr) -> bool {
        match self.offset_of(ip) {
            Ok(off) => match &self.taken {
                Taken::Dense(b) => b.get((off - self.first) as usize),
                Taken::Sparse(s) => s.contains(&off),
            },
            Err(_) => false,
        }
    }

    /// Takes the next free address after the last one handed out, wrapping around.
    pub fn allocate(&mut self) -> Result<IpAddr, IpamError> {
        let span = self.last - self.first + 1;
        let start = self.cursor - self.first;
        let found = match &mut self.taken {
            Taken::Dense(b) => b.next_clear_from(start as usize).map(|i| i as u128),
            Taken::Sparse(s) => (0..u128::from(SPARSE_PROBES))
                .map(|i| (start + i) % span)
                .find(|i| !s.contains(&(self.first + i))),
        };
        let rel = found.ok_or(IpamError::Exhausted(self.subnet))?;
        let off = self.first + rel;
        match &mut self.taken {
            Taken::Dense(b) => {
                b.set(rel as usize);
            }
            Taken::Sparse(s) => {
                s.insert(off);
            }
        }
        self.cursor = if off == self.last {
            self.first
        } else {
            off + 1
        };
        Ok(self.addr_at(off))
    }

    fn offset_of(&self, ip: IpAddr) -> Result<u128, IpamError> {
        if !self.subnet.contains(&ip) {
            return Err(IpamError::OutsideSubnet {
                ip,
                subnet: self.subnet,
            });
        }
        let off = to_u128(ip) - to_u128(self.subnet.network());
        if off < self.first || off > self.last {
            return Err(IpamError::Reserved {
                ip,
                subnet: self.subnet,
            });
        }
        Ok(off)
    }

    fn addr_at(&self, off: u128) -> IpAddr {
        let n = to_u128(self.subnet.network()) + off;
        match self.subnet {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }
}

/// The prefix length of the blocks an overlay network's subnet is split into: 64 addresses
/// (/26 for IPv4, /122 for IPv6, as Calico does), or the whole subnet when it is smaller.
pub fn block_prefix(subnet: IpNet) -> u8 {
    let want = match subnet {
        IpNet::V4(_) => 26,
        IpNet::V6(_) => 122,
    };
    want.max(subnet.prefix_len())
}

/// The `index`th block of `subnet` (blocks of [`block_prefix`]), if there is one.
pub fn nth_block(subnet: IpNet, index: u128) -> Option<IpNet> {
    let prefix = block_prefix(subnet);
    let bits = u32::from(prefix - subnet.prefix_len());
    if bits < 128 && index >= (1u128 << bits) {
        return None;
    }
    let shift = u32::from(subnet.max_prefix_len() - prefix);
    let base = to_u128(subnet.network()) + (index << shift);
    let addr = match subnet {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(base).ok()?)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(base)),
    };
    IpNet::new(addr, prefix).ok()
}

/// How many blocks `subnet` has (saturating).
pub fn block_count(subnet: IpNet) -> u128 {
    let bits = u32::from(block_prefix(subnet) - subnet.prefix_len());
    if bits >= 128 {
        u128::MAX
    } else {
        1u128 << bits
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A bitmap with a summary bit per 64-bit word that is full, so that finding a clear bit costs
/// one summary word per 4096 addresses, not one probe per taken address.
#[derive(Debug, Clone)]
struct Bitmap {
    len: usize,
    words: Vec<u64>,
    full: Vec<u64>,
}

impl Bitmap {
    fn new(len: usize) -> Self {
        let nwords = len.div_ceil(64);
        let mut words = vec![0u64; nwords];
        // Bits past the end count as taken so they are never handed out.
        if !len.is_multiple_of(64) {
            words[nwords - 1] = !0u64 << (len % 64);
        }
        let mut b = Bitmap {
            len,
            words,
            full: vec![0u64; nwords.div_ceil(64)],
        };
        for w in 0..nwords {
            b.update_summary(w);
        }
        b
    }

    fn count(&self) -> usize {
        let all: usize = self.words.iter().map(|w| w.count_ones() as usize).sum();
        // Less the padding bits past the end, which are always set.
        all - (self.words.len() * 64 - self.len)
    }

    fn get(&self, i: usize) -> bool {
        self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was clear.
    fn set(&mut self, i: usize) -> bool {
        let was_clear = !self.get(i);
        self.words[i / 64] |= 1 << (i % 64);
        self.update_summary(i / 64);
        was_clear
    }

    fn clear(&mut self, i: usize) {
        self.words[i / 64] &= !(1 << (i % 64));
        self.update_summary(i / 64);
    }

    fn update_summary(&mut self, w: usize) {
        let bit = 1u64 << (w % 64);
        if self.words[w] == !0 {
            self.full[w / 64] |= bit;
        } else {
            self.full[w / 64] &= !bit;
        }
    }

    /// The first clear bit at or after `from`, wrapping around to the start.
    fn next_clear_from(&self, from: usize) -> Option<usize> {
        let w = from / 64;
        let here = !self.words[w] & (!0u64 << (from % 64));
        if here != 0 {
            return Some(w * 64 + here.trailing_zeros() as usize);
        }
        self.next_nonfull_word(w + 1)
            .or_else(|| self.next_nonfull_word(0))
            .map(|w| w * 64 + (!self.words[w]).trailing_zeros() as usize)
            .filter(|&i| i < self.len)
    }

    fn next_nonfull_word(&self, from_word: usize) -> Option<usize> {
        let nwords = self.words.len();
        if from_word >= nwords {
            return None;
        }
        let mut s = from_word / 64;
        let mut mask = !0u64 << (from_word % 64);
        while s < self.full.len() {
            let free = !self.full[s] & mask;
            if free != 0 {
                let w = s * 64 + free.trailing_zeros() as usize;
                return (w < nwords).then_some(w);
            }
            s += 1;
            mask = !0;
        }
        None
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn blocks_split_a_subnet_and_keep_its_reserved_addresses() {
        let subnet: IpNet = "10.8.0.0/24".parse().unwrap();
        assert_eq!(block_prefix(subnet), 26);
        assert_eq!(block_count(subnet), 4);
        assert_eq!(nth_block(subnet, 1).unwrap().to_string(), "10.8.0.64/26");
        assert_eq!(nth_block(subnet, 4), None);
        // A subnet smaller than a block is one block.
        let small: IpNet = "10.9.0.0/28".parse().unwrap();
        assert_eq!(nth_block(small, 0), Some(small));
        assert_eq!(block_count(small), 1);
        let v6: IpNet = "fd00:1::/64".parse().unwrap();
        assert_eq!(nth_block(v6, 2).unwrap().to_string(), "fd00:1::80/122");

        // The first block holds the subnet's network address back, the last its broadcast;
        // a middle block hands out all 64.
        let mut first = Pool::block(nth_block(subnet, 0).unwrap(), subnet);
        assert!(first.take("10.8.0.0".parse().unwrap()).is_err());
        let mut middle = Pool::block(nth_block(subnet, 1).unwrap(), subnet);
        let got: Vec<IpAddr> = (0..64).map(|_| middle.allocate().unwrap()).collect();
        assert_eq!(got[0].to_string(), "10.8.0.64");
        assert_eq!(got[63].to_string(), "10.8.0.127");
        assert!(middle.allocate().is_err());
        assert_eq!(middle.taken_count(), 64);
        let mut last = Pool::block(nth_block(subnet, 3).unwrap(), subnet);
        let n = std::iter::from_fn(|| last.allocate().ok()).count();
        assert_eq!(n, 63, "10.8.0.255 is the broadcast address");
        assert_eq!(first.taken_count(), 1);
        let mut p = Pool::new(subnet);
        assert_eq!(p.taken_count(), 0);
        p.allocate().unwrap();
        assert_eq!(p.taken_count(), 1);
    }
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_hands_out_in_order_and_skips_network_and_broadcast() {
        let mut p = Pool::new(net("10.0.0.0/30"));
        assert_eq!(p.allocate().unwrap(), ip("10.0.0.1"));
        assert_eq!(p.allocate().unwrap(), ip("10.0.0.2"));
        assert_eq!(p.allocate(), Err(IpamError::Exhausted(net("10.0.0.0/30"))));
        assert!(matches!(
            p.take(ip("10.0.0.3")),
            Err(IpamError::Reserved { .. })
        ));
        assert!(matches!(
            p.take(ip("10.0.0.0")),
            Err(IpamError::Reserved { .. })
        ));
        assert!(matches!(
            p.take(ip("10.0.1.1")),
            Err(IpamError::OutsideSubnet { .. })
        ));
    }

    #[test]
    fn point_to_point_subnets_use_every_address() {
        let mut p = Pool::new(net("10.0.0.0/31"));
        assert_eq!(p.allocate().unwrap(), ip("10.0.0.0"));
        assert_eq!(p.allocate().unwrap(), ip("10.0.0.1"));
        assert!(p.allocate().is_err());
        let mut p = Pool::new(net("10.0.0.7/32"));
        assert_eq!(p.allocate().unwrap(), ip("10.0.0.7"));
    }

    #[test]
    fn release_is_reused_only_after_wrapping() {
        let mut p = Pool::new(net("192.168.5.0/29"));
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.release(a);
        assert_ne!(
            p.allocate().unwrap(),
            a,
            "a just-released address is not reused first"
        );
        for _ in 0..3 {
            p.allocate().unwrap();
        }
        assert_eq!(
            p.allocate().unwrap(),
            a,
            "after wrapping the released address comes back"
        );
        assert!(p.is_taken(b));
        assert!(p.allocate().is_err());
    }

    #[test]
    fn requested_address_conflicts() {
        let mut p = Pool::new(net("10.1.0.0/24"));
        p.take(ip("10.1.0.1")).unwrap();
        assert_eq!(
            p.take(ip("10.1.0.1")),
            Err(IpamError::InUse(ip("10.1.0.1")))
        );
        assert_eq!(
            p.allocate().unwrap(),
            ip("10.1.0.2"),
            "taken addresses are skipped"
        );
    }

    #[test]
    fn ipv6_large_and_small() {
        let mut p = Pool::new(net("fd00:91::/64"));
        p.take(ip("fd00:91::1")).unwrap();
        assert_eq!(p.allocate().unwrap(), ip("fd00:91::2"));
        let mut small = Pool::new(net("fd00::/126"));
        let got: Vec<_> = (0..3).map(|_| small.allocate().unwrap()).collect();
        assert_eq!(got, vec![ip("fd00::1"), ip("fd00::2"), ip("fd00::3")]);
        assert!(small.allocate().is_err());
    }

    #[test]
    fn a_full_large_pool_finds_the_one_hole() {
        let mut p = Pool::new(net("10.0.0.0/16"));
        let all: Vec<_> = (0..65534).map(|_| p.allocate().unwrap()).collect();
        assert!(p.allocate().is_err());
        p.release(all[40000]);
        assert_eq!(p.allocate().unwrap(), all[40000]);
    }

    proptest! {
        /// Whatever the sequence of allocations, requests and releases, no address is ever held
        /// twice, and the pool agrees with a model of what is held.
        #[test]
        fn never_a_duplicate(prefix in 22u8..31, ops in proptest::collection::vec((0u8..3, 0u32..2048), 1..400)) {
            let subnet = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 7, 0, 0)), prefix).unwrap().trunc();
            let mut p = Pool::new(subnet);
            let mut held: BTreeSet<IpAddr> = BTreeSet::new();
            for (op, n) in ops {
                match op {
                    0 => match p.allocate() {
                        Ok(a) => prop_assert!(held.insert(a), "duplicate {a}"),
                        Err(IpamError::Exhausted(_)) => {
                            let hosts = (1u32 << (32 - prefix)) - 2;
                            prop_assert_eq!(held.len() as u32, hosts);
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    1 => {
                        let a = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 7, 0, 0)) + n));
                        match p.take(a) {
                            Ok(()) => prop_assert!(held.insert(a)),
                            Err(IpamError::InUse(_)) => prop_assert!(held.contains(&a)),
                            Err(_) => prop_assert!(!subnet.contains(&a) || a == subnet.network() || a == subnet.broadcast()),
                        }
                    }
                    _ => {
                        if let Some(&a) = held.iter().nth(n as usize % held.len().max(1)) {
                            p.release(a);
                            held.remove(&a);
                        }
                    }
                }
                for a in &held {
                    prop_assert!(p.is_taken(*a));
                }
            }
        }
    }
}
