//! nf_tables expressions, typed, encoded as libnftnl sends them for nft's text (what
//! `nft --debug=netlink` prints as `[ meta load oifname => reg 1 ]` and so on).

use std::borrow::Cow;

use super::nfnl::{NFTA_DATA_VALUE, NFTA_LIST_ELEM, put_attr, put_nested, put_str, put_u32};

/// Register 0 holds the verdict; 1 to 4 are the 16-byte registers. The 4-byte registers
/// (`NFT_REG32_00` = 8 onwards) alias them: 9 is bytes 4..8 of register 1, so a concatenated
/// key or map value runs on from one register into the next.
pub(super) const REG1: u32 = 1;
pub(super) const REG2: u32 = 2;
pub(super) const REG32_01: u32 = 9;
pub(super) const REG32_02: u32 = 10;
pub(super) const REG32_05: u32 = 13;
/// The verdict register, where a verdict map's lookup puts its verdict.
pub(super) const REG_VERDICT: u32 = 0;

/// The register that starts at byte `offset` of the data registers, named as the kernel names
/// it in a dump: a 16-byte register where one starts, a 4-byte one elsewhere (`REG32_05` is
/// `reg(20)`).
pub(super) const fn reg(offset: u32) -> u32 {
    let word = offset / 4;
    if word.is_multiple_of(4) {
        word / 4 + 1
    } else {
        8 + word
    }
}

/// `meta` keys (`enum nft_meta_keys`).
#[derive(Debug, Clone, Copy)]
pub(super) enum MetaKey {
    IifName = 6,
    OifName = 7,
    NfProto = 15,
    L4Proto = 16,
}

/// `ct` keys (`enum nft_ct_keys`).
#[derive(Debug, Clone, Copy)]
pub(super) enum CtKey {
    State = 0,
    Status = 2,
    /// `ct original proto-dst` (with the original direction)
    ProtoDst = 12,
    /// `ct original ip daddr`
    DstIp = 20,
    /// `ct original ip6 daddr`
    DstIp6 = 22,
}

/// Where a `payload` offset counts from (`enum nft_payload_bases`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Base {
    Network = 1,
    Transport = 2,
}

pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFPROTO_IPV6: u8 = 10;
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const IPPROTO_UDP: u8 = 17;
pub(super) const IPPROTO_ICMPV6: u8 = 58;
/// `ct state` bits (`NF_CT_STATE_BIT`): established and related.
pub(super) const CT_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
/// `ct state new`
pub(super) const CT_NEW: u32 = 0x8;
/// `tcp flags`: where they are in the TCP header, and the bits of `fin | syn | rst | ack`
/// and `syn`.
pub(super) const TCP_FLAGS_OFFSET: u32 = 13;
pub(super) const TCP_FIN_SYN_RST_ACK: u8 = 0x01 | 0x02 | 0x04 | 0x10;
pub(super) const TCP_SYN: u8 = 0x02;
/// `ct status dnat` (`IPS_DST_NAT`).
pub(super) const IPS_DST_NAT: u32 = 0x20;
/// `fib ... type local` (`RTN_LOCAL`).
pub(super) const RTN_LOCAL: u32 = 2;

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
pub(super) const NFT_JUMP: i32 = -3;
pub(super) const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// `reject with tcp reset` (`NFT_REJECT_TCP_RST`).
pub(super) const REJECT_TCP_RST: u32 = 1;
/// `reject with icmpx port-unreachable` (`NFT_REJECT_ICMPX_UNREACH`,
/// `NFT_REJECT_ICMPX_PORT_UNREACH`): ICMP or ICMPv6, whichever the packet's family takes.
pub(super) const REJECT_ICMPX: u32 = 2;
pub(super) const ICMPX_PORT_UNREACH: u8 = 1;

/// The `{ tcp, udp, sctp }` of `meta l4proto { tcp, udp, sctp }`: an anonymous constant set,
/// created in the same batch just before the rule that uses it and deleted with that rule.
pub(super) struct AnonSet {
    pub key_type: u32,
    pub key_len: u32,
    pub elements: &'static [&'static [u8]],
    /// What nft stores for itself: key byte order and `typeof meta l4proto`, so that it
    /// lists the set as `{ tcp, udp, sctp }`.
    pub userdata: &'static [u8],
}

pub(super) static L4_PROTOCOLS: AnonSet = AnonSet {
    key_type: 12, // inet_proto
    key_len: 1,
    elements: &[&[6], &[17], &[132]],
    userdata: &[
        0, 4, 1, 0, 0, 0, 3, 14, 0, 4, 9, 0, 0, 0, 1, 6, 0, 4, 16, 0, 0, 0,
    ],
};

/// The `{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert }` of
/// `icmpv6 type { ... }`: neighbour discovery and router solicitation and advertisement.
pub(super) static ICMPV6_ND: AnonSet = AnonSet {
    key_type: 29, // icmpv6_type
    key_len: 1,
    elements: &[&[133], &[134], &[135], &[136]],
    userdata: &[
        0, 4, 2, 0, 0, 0, 3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 14, 0, 0, 0, 1, 4, 1, 0, 0, 0,
    ],
};

#[derive(Debug, Clone)]
pub(super) enum SetRef {
    /// A set of the table's, or one made for a policy profile.
    Named(Cow<'static, str>),
    Anonymous(&'static AnonSet),
}

impl std::fmt::Debug for AnonSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnonSet({:?})", self.elements)
    }
}

#[derive(Debug, Clone)]
pub(super) enum Expr {
    /// `[ meta load KEY => reg DREG ]`
    Meta { key: MetaKey, dreg: u32 },
    /// `[ cmp eq|neq reg SREG VALUE ]`
    Cmp {
        sreg: u32,
        neq: bool,
        value: Vec<u8>,
    },
    /// `[ lookup reg SREG set SET (dreg DREG) ]`: a set membership test (not in the set, when
    /// inverted) or, with `dreg`, a map lookup that loads the value.
    Lookup {
        sreg: u32,
        set: SetRef,
        dreg: Option<u32>,
        invert: bool,
    },
    /// `[ immediate reg 0 VERDICT ]`
    Verdict { code: i32, chain: Option<String> },
    /// `[ immediate reg DREG VALUE ]`
    Immediate { dreg: u32, value: Vec<u8> },
    /// `[ ct load KEY => reg DREG (, dir original) ]`
    Ct {
        key: CtKey,
        dreg: u32,
        original: bool,
    },
    /// `[ bitwise reg R = ( reg R & MASK ) ^ 0 ]`, as long as the mask.
    And { reg: u32, mask: Vec<u8> },
    /// `[ counter pkts 0 bytes 0 ]`
    Counter,
    /// `[ payload load LEN b @ BASE header + OFFSET => reg DREG ]`
    Payload {
        base: Base,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `[ fib daddr type => reg DREG ]`
    FibDaddrType { dreg: u32 },
    /// `[ nat dnat|snat FAMILY addr_min reg ADDR (proto_min reg PROTO) ]`
    Nat {
        snat: bool,
        family: u8,
        addr: u32,
        proto: Option<u32>,
    },
    /// `[ masq ]`
    Masq,
    /// `[ notrack ]`
    Notrack,
    /// `[ numgen reg DREG = random mod MODULUS ]`
    Numgen { dreg: u32, modulus: u32 },
    /// `[ dynset update reg_key KEY set SET sreg_data DATA timeout MS ]`: adds the element or,
    /// when it is there, restarts its timeout.
    DynsetUpdate {
        key: u32,
        set: &'static str,
        data: u32,
        timeout_ms: u64,
    },
    /// `[ reject type KIND code CODE ]`
    Reject { kind: u32, code: Option<u8> },
}

pub(super) fn meta(key: MetaKey, dreg: u32) -> Expr {
    Expr::Meta { key, dreg }
}

pub(super) fn cmp_eq(sreg: u32, value: &[u8]) -> Expr {
    Expr::Cmp {
        sreg,
        neq: false,
        value: value.to_vec(),
    }
}

/// `cmp neq reg SREG 0`: some bit of a masked host-order value is set.
pub(super) fn nonzero(sreg: u32) -> Expr {
    Expr::Cmp {
        sreg,
        neq: true,
        value: 0u32.to_ne_bytes().to_vec(),
    }
}

pub(super) fn lookup(sreg: u32, set: impl Into<Cow<'static, str>>) -> Expr {
    Expr::Lookup {
        sreg,
        set: SetRef::Named(set.into()),
        dreg: None,
        invert: false,
    }
}

/// `!= @set`: the key in `sreg` is not in the set.
pub(super) fn not_in(sreg: u32, set: &'static str) -> Expr {
    Expr::Lookup {
        sreg,
        set: SetRef::Named(set.into()),
        dreg: None,
        invert: true,
    }
}

pub(super) fn lookup_anonymous(sreg: u32, set: &'static AnonSet) -> Expr {
    Expr::Lookup {
        sreg,
        set: SetRef::Anonymous(set),
        dreg: None,
        invert: false,
    }
}

/// A map lookup: the value for the key in `sreg` lands in `dreg` (no match: the rule ends).
/// A verdict map's lands in [`REG_VERDICT`].
pub(super) fn map(sreg: u32, map: impl Into<Cow<'static, str>>, dreg: u32) -> Expr {
    Expr::Lookup {
        sreg,
        set: SetRef::Named(map.into()),
        dreg: Some(dreg),
        invert: false,
    }
}

pub(super) fn accept() -> Expr {
    Expr::Verdict {
        code: NF_ACCEPT,
        chain: None,
    }
}

pub(super) fn drop() -> Expr {
    Expr::Verdict {
        code: NF_DROP,
        chain: None,
    }
}

pub(super) fn jump(chain: &str) -> Expr {
    Expr::Verdict {
        code: NFT_JUMP,
        chain: Some(chain.to_string()),
    }
}

/// `return`: on with the rule after the `jump` that led here.
pub(super) fn ret() -> Expr {
    Expr::Verdict {
        code: NFT_RETURN,
        chain: None,
    }
}

pub(super) fn goto(chain: &str) -> Expr {
    Expr::Verdict {
        code: NFT_GOTO,
        chain: Some(chain.to_string()),
    }
}

pub(super) fn immediate(dreg: u32, value: &[u8]) -> Expr {
    Expr::Immediate {
        dreg,
        value: value.to_vec(),
    }
}

pub(super) fn ct(key: CtKey, dreg: u32) -> Expr {
    Expr::Ct {
        key,
        dreg,
        original: false,
    }
}

/// A `ct original ...` key: of the connection's first packet, before any NAT.
pub(super) fn ct_original(key: CtKey, dreg: u32) -> Expr {
    Expr::Ct {
        key,
        dreg,
        original: true,
    }
}

/// `cmp neq reg SREG VALUE`
pub(super) fn cmp_neq(sreg: u32, value: &[u8]) -> Expr {
    Expr::Cmp {
        sreg,
        neq: true,
        value: value.to_vec(),
    }
}

/// A mask on a host-order 32-bit value.
pub(super) fn and(reg: u32, mask: u32) -> Expr {
    Expr::And {
        reg,
        mask: mask.to_ne_bytes().to_vec(),
    }
}

/// A mask on a value of the mask's length, in network order (an address prefix).
pub(super) fn and_bytes(reg: u32, mask: &[u8]) -> Expr {
    Expr::And {
        reg,
        mask: mask.to_vec(),
    }
}

/// A mask on one byte.
pub(super) fn and_u8(reg: u32, mask: u8) -> Expr {
    Expr::And {
        reg,
        mask: vec![mask],
    }
}

/// What nft puts after a host-order value in the key of an interval set (whose ranges the
/// kernel compares in network order): `len` bytes as `size`-byte words.
pub(super) fn counter() -> Expr {
    Expr::Counter
}

pub(super) fn payload(base: Base, offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base,
        offset,
        len,
        dreg,
    }
}

pub(super) fn fib_daddr_type(dreg: u32) -> Expr {
    Expr::FibDaddrType { dreg }
}

pub(super) fn dnat(family: u8, addr: u32, proto: u32) -> Expr {
    Expr::Nat {
        snat: false,
        family,
        addr,
        proto: Some(proto),
    }
}

pub(super) fn snat(family: u8, addr: u32) -> Expr {
    Expr::Nat {
        snat: true,
        family,
        addr,
        proto: None,
    }
}

pub(super) fn masq() -> Expr {
    Expr::Masq
}

pub(super) fn notrack() -> Expr {
    Expr::Notrack
}

pub(super) fn numgen_random(dreg: u32, modulus: u32) -> Expr {
    Expr::Numgen { dreg, modulus }
}

pub(super) fn dynset_update(key: u32, set: &'static str, data: u32, timeout_ms: u64) -> Expr {
    Expr::DynsetUpdate {
        key,
        set,
        data,
        timeout_ms,
    }
}

pub(super) fn reject(kind: u32, code: Option<u8>) -> Expr {
    Expr::Reject { kind, code }
}

/// What a lookup names its set by.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refs {
    /// In a batch: the named sets' and this rule's anonymous set's ids in the batch
    /// (`NFTA_LOOKUP_SET_ID`), so that sets created by the same batch are found. A named set
    /// with id 0 is not of the batch and goes by its name alone.
    Batch {
        set_id: fn(&str) -> u32,
        anonymous_id: u32,
    },
    /// To compare with a dump: names only, and none for an anonymous set (the kernel
    /// names it `__setN`).
    Dump,
}

// Attribute types per expression (linux/netfilter/nf_tables.h).
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Cmp { .. } => "cmp",
            Expr::Lookup { .. } => "lookup",
            Expr::Verdict { .. } | Expr::Immediate { .. } => "immediate",
            Expr::Ct { .. } => "ct",
            Expr::And { .. } => "bitwise",
            Expr::Counter => "counter",
            Expr::Payload { .. } => "payload",
            Expr::FibDaddrType { .. } => "fib",
            Expr::Nat { .. } => "nat",
            Expr::Masq => "masq",
            Expr::Notrack => "notrack",
            Expr::Numgen { .. } => "numgen",
            Expr::DynsetUpdate { .. } => "dynset",
            Expr::Reject { .. } => "reject",
        }
    }

    /// The expression's `NFTA_EXPR_DATA`, `None` for those without parameters.
    fn data(&self, refs: Refs) -> Option<Vec<u8>> {
        let mut d = Vec::new();
        match self {
            Expr::Meta { key, dreg } => {
                put_u32(&mut d, 2, *key as u32); // NFTA_META_KEY
                put_u32(&mut d, 1, *dreg); // NFTA_META_DREG
            }
            Expr::Cmp { sreg, neq, value } => {
                put_u32(&mut d, 1, *sreg); // NFTA_CMP_SREG
                put_u32(&mut d, 2, u32::from(*neq)); // NFTA_CMP_OP: NFT_CMP_EQ, NFT_CMP_NEQ
                put_nested(&mut d, 3, |v| put_attr(v, NFTA_DATA_VALUE, value)); // NFTA_CMP_DATA
            }
            Expr::Lookup {
                sreg,
                set,
                dreg,
                invert,
            } => {
                put_u32(&mut d, 2, *sreg); // NFTA_LOOKUP_SREG
                if let Some(dreg) = dreg {
                    put_u32(&mut d, 3, *dreg); // NFTA_LOOKUP_DREG
                }
                // NFTA_LOOKUP_SET, NFTA_LOOKUP_SET_ID
                match (set, refs) {
                    (SetRef::Named(name), refs) => put_set(&mut d, 1, 4, name, refs),
                    (SetRef::Anonymous(_), Refs::Batch { anonymous_id, .. }) => {
                        put_str(&mut d, 1, ANONYMOUS_SET_NAME);
                        put_u32(&mut d, 4, anonymous_id);
                    }
                    (SetRef::Anonymous(_), Refs::Dump) => {}
                }
                if *invert {
                    put_u32(&mut d, 5, 1); // NFTA_LOOKUP_FLAGS: NFT_LOOKUP_F_INV
                }
            }
            Expr::Immediate { dreg, value } => {
                put_u32(&mut d, 1, *dreg); // NFTA_IMMEDIATE_DREG
                put_nested(&mut d, 2, |v| put_attr(v, NFTA_DATA_VALUE, value)); // NFTA_IMMEDIATE_DATA
            }
            Expr::Verdict { code, chain } => {
                put_u32(&mut d, 1, 0); // NFTA_IMMEDIATE_DREG: NFT_REG_VERDICT
                put_nested(&mut d, 2, |data| {
                    // NFTA_IMMEDIATE_DATA { NFTA_DATA_VERDICT { CODE, CHAIN } }
                    put_nested(data, 2, |v| {
                        put_attr(v, 1, &code.to_be_bytes());
                        if let Some(chain) = chain {
                            put_str(v, 2, chain);
                        }
                    })
                });
            }
            Expr::Ct {
                key,
                dreg,
                original,
            } => {
                put_u32(&mut d, 2, *key as u32); // NFTA_CT_KEY
                put_u32(&mut d, 1, *dreg); // NFTA_CT_DREG
                if *original {
                    put_attr(&mut d, 3, &[0]); // NFTA_CT_DIRECTION: IP_CT_DIR_ORIGINAL
                }
            }
            Expr::And { reg, mask } => {
                put_u32(&mut d, 1, *reg); // NFTA_BITWISE_SREG
                put_u32(&mut d, 2, *reg); // NFTA_BITWISE_DREG
                put_u32(&mut d, 3, mask.len() as u32); // NFTA_BITWISE_LEN
                put_nested(&mut d, 4, |v| put_attr(v, NFTA_DATA_VALUE, mask)); // NFTA_BITWISE_MASK
                put_nested(&mut d, 5, |v| {
                    put_attr(v, NFTA_DATA_VALUE, &vec![0; mask.len()]) // NFTA_BITWISE_XOR
                });
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                put_u32(&mut d, 1, *dreg); // NFTA_PAYLOAD_DREG
                put_u32(&mut d, 2, *base as u32); // NFTA_PAYLOAD_BASE
                put_u32(&mut d, 3, *offset); // NFTA_PAYLOAD_OFFSET
                put_u32(&mut d, 4, *len); // NFTA_PAYLOAD_LEN
            }
            Expr::FibDaddrType { dreg } => {
                put_u32(&mut d, 3, 2); // NFTA_FIB_FLAGS: NFTA_FIB_F_DADDR
                put_u32(&mut d, 2, 3); // NFTA_FIB_RESULT: NFT_FIB_RESULT_ADDRTYPE
                put_u32(&mut d, 1, *dreg); // NFTA_FIB_DREG
            }
            Expr::Nat {
                snat,
                family,
                addr,
                proto,
            } => {
                put_u32(&mut d, 1, u32::from(!*snat)); // NFTA_NAT_TYPE: NFT_NAT_SNAT, NFT_NAT_DNAT
                put_u32(&mut d, 2, u32::from(*family)); // NFTA_NAT_FAMILY
                put_u32(&mut d, 3, *addr); // NFTA_NAT_REG_ADDR_MIN
                if let Some(proto) = proto {
                    put_u32(&mut d, 5, *proto); // NFTA_NAT_REG_PROTO_MIN
                }
            }
            Expr::Numgen { dreg, modulus } => {
                put_u32(&mut d, 1, *dreg); // NFTA_NG_DREG
                put_u32(&mut d, 2, *modulus); // NFTA_NG_MODULUS
                put_u32(&mut d, 3, 1); // NFTA_NG_TYPE: NFT_NG_RANDOM
            }
            Expr::DynsetUpdate {
                key,
                set,
                data,
                timeout_ms,
            } => {
                put_u32(&mut d, 4, *key); // NFTA_DYNSET_SREG_KEY
                put_u32(&mut d, 5, *data); // NFTA_DYNSET_SREG_DATA
                put_u32(&mut d, 3, 1); // NFTA_DYNSET_OP: NFT_DYNSET_OP_UPDATE
                put_set(&mut d, 1, 2, set, refs); // NFTA_DYNSET_SET_NAME, NFTA_DYNSET_SET_ID
                put_attr(&mut d, 6, &timeout_ms.to_be_bytes()); // NFTA_DYNSET_TIMEOUT
            }
            Expr::Reject { kind, code } => {
                put_u32(&mut d, 1, *kind); // NFTA_REJECT_TYPE
                if let Some(code) = code {
                    put_attr(&mut d, 2, &[*code]); // NFTA_REJECT_ICMP_CODE
                }
            }
            // A counter starts at 0, and what it counted is no part of what a rule is.
            Expr::Masq | Expr::Notrack | Expr::Counter => return None,
        }
        Some(d)
    }

    pub(super) fn anonymous_set(&self) -> Option<&'static AnonSet> {
        match self {
            Expr::Lookup {
                set: SetRef::Anonymous(s),
                ..
            } => Some(s),
            _ => None,
        }
    }
}

/// A named set by its name and, in a batch that creates it, its id.
fn put_set(d: &mut Vec<u8>, name_attr: u16, id_attr: u16, name: &str, refs: Refs) {
    put_str(d, name_attr, name);
    if let Refs::Batch { set_id, .. } = refs
        && set_id(name) != 0
    {
        put_u32(d, id_attr, set_id(name));
    }
}

/// What nft names an anonymous set it creates; the kernel fills in the number.
pub(super) const ANONYMOUS_SET_NAME: &str = "__set%d";

/// A rule's `NFTA_RULE_EXPRESSIONS` payload.
pub(super) fn encode(exprs: &[Expr], refs: Refs) -> Vec<u8> {
    let mut list = Vec::new();
    for e in exprs {
        put_nested(&mut list, NFTA_LIST_ELEM, |el| {
            put_str(el, NFTA_EXPR_NAME, e.name());
            if let Some(data) = e.data(refs) {
                put_nested(el, NFTA_EXPR_DATA, |d| d.extend_from_slice(&data));
            }
        });
    }
    list
}
