//! A small nf_tables netlink client: batches that the kernel applies as one transaction, the
//! generation id, and dumps (which, with plain requests, also serve ctnetlink). No `nft`
//! process and no libnftnl: the messages are the ones libnftnl sends for nft's text (see
//! `nft --debug=mnl`).

use std::os::fd::AsFd;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::{DataplaneError, Result};

// linux/netfilter/nfnetlink.h, nf_tables.h, linux/netlink.h.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// A batch's condition: the generation it was made at (`NFNL_BATCH_GENID`).
const NFNL_BATCH_GENID: u16 = 1;
pub(super) const NFT_MSG_NEWTABLE: u16 = 0;
pub(super) const NFT_MSG_GETTABLE: u16 = 1;
pub(super) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(super) const NFT_MSG_GETCHAIN: u16 = 4;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
pub(super) const NFT_MSG_DELRULE: u16 = 8;
pub(super) const NFT_MSG_NEWSET: u16 = 9;
pub(super) const NFT_MSG_GETSET: u16 = 10;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(super) const NFT_MSG_GETSETELEM: u16 = 13;
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
// Delete like `DELCHAIN` and `DELSETELEM`, but what is already gone is no error (Linux 6.3).
pub(super) const NFT_MSG_DESTROYCHAIN: u16 = 27;
pub(super) const NFT_MSG_DESTROYSET: u16 = 29;
pub(super) const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
pub(super) const NFPROTO_INET: u8 = 1;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_VERDICT_CHAIN: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(super) const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
pub(super) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(super) const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub(super) const NFTA_SET_ELEM_KEY_END: u16 = 10;
pub(super) const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP_INTR: u16 = 0x10;
pub(super) const NLM_F_APPEND: u16 = 0x800;
pub(super) const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// Largest attribute payload: the length field is 16 bits.
pub(super) const MAX_ATTR: usize = u16::MAX as usize - 4;

/// How long a reply may take: the kernel answers a batch while it is being sent, so this
/// only bounds a wait that would otherwise be endless.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    debug_assert!(len <= u16::MAX as usize, "netlink attribute too long");
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

pub(crate) fn put_nested(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    put_attr(buf, kind | NLA_F_NESTED, &inner);
}

pub(super) fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut z = s.as_bytes().to_vec();
    z.push(0);
    put_attr(buf, kind, &z);
}

/// nf_tables' 32-bit attributes are in network order.
pub(super) fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put_attr(buf, kind, &v.to_be_bytes());
}

/// Iterates over `(type, payload)` of the attributes in `buf`, the nested flag cleared.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    raw_attrs(buf).map(|(kind, payload)| (kind & !NLA_F_NESTED, payload))
}

fn raw_attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]);
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The payload of the first attribute of type `kind`.
pub(crate) fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

pub(super) fn attr_str(buf: &[u8], kind: u16) -> Option<&str> {
    let v = attr(buf, kind)?;
    std::str::from_utf8(v.strip_suffix(&[0]).unwrap_or(v)).ok()
}

pub(super) fn attr_u32(buf: &[u8], kind: u16) -> Option<u32> {
    Some(u32::from_be_bytes(attr(buf, kind)?.try_into().ok()?))
}

/// Whether `got` (attributes as the kernel dumps them) holds every attribute of `want`
/// (attributes as berth sends them): each type as often, in the same order, with the same
/// value, nested ones compared the same way. The kernel dumps more (handles, counters,
/// defaults) and in its own order, so equality of bytes would not do.
pub(super) fn covers(got: &[u8], want: &[u8]) -> bool {
    let mut kinds: Vec<u16> = raw_attrs(want).map(|(k, _)| k & !NLA_F_NESTED).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds.into_iter().all(|kind| {
        let wanted: Vec<(u16, &[u8])> = raw_attrs(want)
            .filter(|(k, _)| k & !NLA_F_NESTED == kind)
            .collect();
        let found: Vec<&[u8]> = attrs(got)
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| v)
            .collect();
        wanted.len() == found.len()
            && wanted.iter().zip(&found).all(|((k, w), g)| {
                if k & NLA_F_NESTED != 0 {
                    covers(g, w)
                } else {
                    g == w
                }
            })
    })
}

/// The errno of an `NLMSG_ERROR` message (0 for an acknowledgement); `None` for any other
/// message or a truncated one.
fn errno_of(kind: u16, payload: &[u8]) -> Option<i32> {
    let code = payload.get(..4).filter(|_| kind == NLMSG_ERROR)?;
    Some(-i32::from_ne_bytes([code[0], code[1], code[2], code[3]]))
}

pub(super) fn enoent() -> i32 {
    nix::errno::Errno::ENOENT as i32
}

/// Messages to be applied as one transaction: all of them or, if the kernel refuses one,
/// none.
#[derive(Default)]
pub(super) struct Batch {
    /// `(NFT_MSG_*, extra flags, attributes, what it does, for errors)`
    messages: Vec<(u16, u16, Vec<u8>, String)>,
    /// The generation the batch is for: the kernel refuses it (`ERESTART`) if any change was
    /// made since.
    generation: Option<u32>,
}

impl Batch {
    /// A batch that the kernel applies only if nftables is still at `generation` (see
    /// [`Nfnetlink::generation`]): one made of what was read then.
    pub(super) fn at_generation(generation: u32) -> Batch {
        Batch {
            generation: Some(generation),
            ..Batch::default()
        }
    }

    pub(super) fn push(&mut self, kind: u16, flags: u16, attrs: Vec<u8>, what: String) {
        self.messages.push((kind, flags, attrs, what));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// A kernel error for operation `op`.
fn kernel_error(op: impl Into<String>, errno: i32) -> DataplaneError {
    DataplaneError::Kernel {
        op: op.into(),
        source: std::io::Error::from_raw_os_error(errno),
    }
}

pub(crate) struct Nfnetlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Nfnetlink {
    pub(crate) fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| DataplaneError::io("nfnetlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| DataplaneError::io("nfnetlink bind", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| DataplaneError::io("nfnetlink connect", e))?;
        // An error would otherwise echo the whole refused message, up to 64 KiB each.
        socket
            .set_cap_ack(true)
            .map_err(|e| DataplaneError::io("nfnetlink NETLINK_CAP_ACK", e))?;
        nix::sys::socket::setsockopt(
            &socket.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0),
        )
        .map_err(|e| kernel_error("nfnetlink SO_RCVTIMEO", e as i32))?;
        Ok(Nfnetlink {
            socket,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Appends one message: netlink header, nfgenmsg, attributes.
    fn message(
        &mut self,
        out: &mut Vec<u8>,
        kind: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: &[u8],
    ) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.push(family);
        out.push(0);
        out.extend_from_slice(&res_id.to_be_bytes());
        out.extend_from_slice(attrs);
        self.seq
    }

    fn send(&mut self, out: &[u8]) -> Result<()> {
        // A whole table with thousands of elements is larger than the default send buffer,
        // and netlink takes a message whole or not at all.
        if out.len() > 128 * 1024 {
            nix::sys::socket::setsockopt(
                &self.socket.as_fd(),
                nix::sys::socket::sockopt::SndBufForce,
                &(out.len() + 64 * 1024),
            )
            .map_err(|e| kernel_error("nfnetlink SO_SNDBUFFORCE", e as i32))?;
        }
        self.socket
            .send(out, 0)
            .map_err(|e| DataplaneError::io("nfnetlink send", e))?;
        Ok(())
    }

    /// Sends `batch` as one transaction and waits for the kernel's verdict on each message.
    /// The first refusal is the error; the kernel then applied none of the batch.
    pub(super) fn commit(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        let mut condition = Vec::new();
        if let Some(generation) = batch.generation {
            put_u32(&mut condition, NFNL_BATCH_GENID, generation);
        }
        let begin = self.message(
            &mut out,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &condition,
        );
        // Only the last message asks for an acknowledgement: the kernel answers a refused
        // message anyway, and thousands of acknowledgements would overflow the receive buffer.
        let last = batch.messages.len() - 1;
        let mut pending: Vec<(u32, &str)> = Vec::with_capacity(batch.messages.len());
        for (i, (kind, flags, attrs, what)) in batch.messages.iter().enumerate() {
            let ack = if i == last { NLM_F_ACK } else { 0 };
            let seq = self.message(
                &mut out,
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                NLM_F_REQUEST | ack | flags,
                NFPROTO_INET,
                0,
                attrs,
            );
            pending.push((seq, what));
        }
        self.message(
            &mut out,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.send(&out)?;
        // The kernel answers once the whole batch is through, in order: each refused message's
        // error, then the last message's acknowledgement (or error); an error about the batch
        // itself comes for its first message.
        let mut err = None;
        let mut done = false;
        while !done {
            let mut batch_refused = None;
            self.recv_each(|kind, seq, payload| {
                let Some(errno) = errno_of(kind, payload) else {
                    return;
                };
                if seq == begin && errno != 0 {
                    batch_refused = Some(errno);
                }
                if let Some(i) = pending.iter().position(|(s, _)| *s == seq) {
                    if errno != 0 && err.is_none() {
                        err = Some(kernel_error(format!("nftables: {}", pending[i].1), errno));
                    }
                    done |= i == last;
                }
            })?;
            if let Some(errno) = batch_refused {
                return Err(kernel_error("nftables batch", errno));
            }
        }
        err.map_or(Ok(()), Err)
    }

    /// nftables' generation id: every committed change to any table, by anyone, bumps it.
    pub(super) fn generation(&mut self) -> Result<u32> {
        let mut out = Vec::new();
        let seq = self.message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
            NLM_F_REQUEST,
            0,
            0,
            &[],
        );
        self.send(&out)?;
        let mut generation = None;
        let mut err = None;
        while generation.is_none() && err.is_none() {
            self.recv_each(|kind, s, payload| {
                if s != seq {
                    return;
                }
                match errno_of(kind, payload) {
                    Some(errno) => err = Some(kernel_error("read nftables generation", errno)),
                    None => {
                        generation =
                            attr_u32(payload.get(4..).unwrap_or_default(), NFTA_GEN_ID).or(Some(0))
                    }
                }
            })?;
        }
        match err {
            Some(e) => Err(e),
            None => Ok(generation.unwrap_or(0)),
        }
    }

    /// Asks for one object of type `kind` (`NFT_MSG_GET*`): its attributes, or the kernel's
    /// errno (`ENOENT`: there is none).
    pub(super) fn get(&mut self, kind: u16, attrs: &[u8]) -> Result<Result<Vec<u8>, i32>> {
        let mut out = Vec::new();
        let seq = self.message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST,
            NFPROTO_INET,
            0,
            attrs,
        );
        self.send(&out)?;
        let mut answer = None;
        while answer.is_none() {
            self.recv_each(|k, s, payload| {
                if s == seq {
                    answer = Some(match errno_of(k, payload) {
                        Some(errno) => Err(errno),
                        None => Ok(payload.get(4..).unwrap_or_default().to_vec()),
                    });
                }
            })?;
        }
        Ok(answer.expect("loop ends with an answer"))
    }

    /// Dumps objects of type `kind` (`NFT_MSG_GET*`) and calls `each` with the attributes of
    /// every one. `Ok(Err(errno))` when the kernel refuses (`ENOENT`: no such table or set);
    /// `Ok(Ok(false))` when the objects changed during the dump, so that it may be torn.
    pub(super) fn dump(
        &mut self,
        kind: u16,
        attrs: &[u8],
        each: impl FnMut(&[u8]),
    ) -> Result<Result<bool, i32>> {
        self.dump_of(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NFPROTO_INET,
            attrs,
            each,
        )
    }

    /// [`Nfnetlink::dump`] for any subsystem: `kind` is the whole message type, `family` the
    /// nfgenmsg's.
    pub(crate) fn dump_of(
        &mut self,
        kind: u16,
        family: u8,
        attrs: &[u8],
        mut each: impl FnMut(&[u8]),
    ) -> Result<Result<bool, i32>> {
        let mut out = Vec::new();
        let seq = self.message(&mut out, kind, NLM_F_REQUEST | NLM_F_DUMP, family, 0, attrs);
        self.send(&out)?;
        let mut end = None;
        let mut consistent = true;
        while end.is_none() {
            self.recv_all(|k, flags, s, payload| {
                if s != seq {
                    return;
                }
                if flags & NLM_F_DUMP_INTR != 0 {
                    consistent = false;
                }
                match k {
                    NLMSG_DONE => end = Some(Ok(consistent)),
                    NLMSG_ERROR => {
                        end = Some(match errno_of(k, payload).unwrap_or(0) {
                            0 => Ok(consistent),
                            errno => Err(errno),
                        })
                    }
                    _ => each(payload.get(4..).unwrap_or_default()),
                }
            })?;
        }
        Ok(end.expect("loop ends with an end"))
    }

    /// Sends requests that are not part of a batch (`(whole message type, nfgenmsg family,
    /// attributes)`), many to a datagram, and returns each one's errno (0: done).
    pub(crate) fn requests(&mut self, requests: &[(u16, u8, Vec<u8>)]) -> Result<Vec<i32>> {
        let mut errnos = vec![0; requests.len()];
        let mut rest = requests;
        let mut done = 0;
        while !rest.is_empty() {
            // Acknowledgements of one datagram's requests fit the receive buffer many times.
            let mut out = Vec::new();
            let mut seqs = Vec::new();
            for (kind, family, attrs) in rest {
                if !out.is_empty() && out.len() + attrs.len() > 16 * 1024 {
                    break;
                }
                seqs.push(self.message(
                    &mut out,
                    *kind,
                    NLM_F_REQUEST | NLM_F_ACK,
                    *family,
                    0,
                    attrs,
                ));
            }
            self.send(&out)?;
            let mut answered = 0;
            while answered < seqs.len() {
                self.recv_each(|kind, seq, payload| {
                    if let (Some(errno), Some(i)) =
                        (errno_of(kind, payload), seqs.iter().position(|s| *s == seq))
                    {
                        errnos[done + i] = errno;
                        answered += 1;
                    }
                })?;
            }
            done += seqs.len();
            rest = &rest[seqs.len()..];
        }
        Ok(errnos)
    }

    fn recv_each(&mut self, mut each: impl FnMut(u16, u32, &[u8])) -> Result<()> {
        self.recv_all(|kind, _, seq, payload| each(kind, seq, payload))
    }

    /// Receives one datagram and calls `each(type, flags, seq, payload)` for every message
    /// in it.
    fn recv_all(&mut self, mut each: impl FnMut(u16, u16, u32, &[u8])) -> Result<()> {
        let n = self
            .socket
            .recv(&mut &mut self.buf[..], 0)
            .map_err(|e| DataplaneError::io("nfnetlink recv", e))?;
        let mut rest = &self.buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                return Err(DataplaneError::Protocol(
                    "truncated nfnetlink message".into(),
                ));
            }
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let flags = u16::from_ne_bytes([rest[6], rest[7]]);
            let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
            each(kind, flags, seq, &rest[16..len]);
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_ignores_what_the_kernel_adds_and_compares_nested_values() {
        let mut want = Vec::new();
        put_u32(&mut want, 1, 7);
        put_nested(&mut want, 2, |n| put_attr(n, 1, b"ab"));
        let mut got = Vec::new();
        put_u32(&mut got, 9, 1);
        // Nested without the flag, as nf_tables dumps many.
        let mut inner = Vec::new();
        put_attr(&mut inner, 3, b"x");
        put_attr(&mut inner, 1, b"ab");
        put_attr(&mut got, 2, &inner);
        put_u32(&mut got, 1, 7);
        assert!(covers(&got, &want));
        let mut other = Vec::new();
        put_u32(&mut other, 1, 8);
        put_attr(&mut other, 2, &inner);
        assert!(!covers(&other, &want));
        // A list must have as many entries.
        let mut two = got.clone();
        put_u32(&mut two, 1, 7);
        assert!(!covers(&two, &want));
    }
}
