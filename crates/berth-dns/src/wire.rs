//! The little of the DNS wire format (RFC 1035, EDNS from RFC 6891) a stub-facing server needs:
//! read one question, write answers that point back at it. Hand-written rather than a general
//! message codec because every query passes through here: it copies the question bytes as they
//! came (case preserved, as clients using 0x20 randomisation expect) and allocates one buffer.

use std::net::IpAddr;
use std::sync::Arc;

pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

const HEADER: usize = 12;
/// A compression pointer to the question name, right after the header: the owner of answers.
const QUESTION_NAME: [u8; 2] = [0xc0, HEADER as u8];
const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
/// Answers over UDP to clients without EDNS fit in this (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_SIZE: usize = 512;
/// The UDP payload size berth advertises and accepts at most (the DNS flag day 2020 value).
pub const EDNS_UDP_SIZE: u16 = 1232;

/// One parsed query: the header fields that matter and the single question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u16,
    /// Recursion desired, echoed in the answer.
    pub rd: bool,
    /// The question name in lower case, labels joined by '.', without the root dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section exactly as it came (name, type, class).
    pub question: &'a [u8],
    /// The client's EDNS UDP payload size, if it sent an OPT record.
    pub edns_size: Option<u16>,
}

impl Query<'_> {
    /// The largest answer the client takes over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns_size {
            Some(n) => usize::from(n.clamp(CLASSIC_UDP_SIZE as u16, EDNS_UDP_SIZE)),
            None => CLASSIC_UDP_SIZE,
        }
    }
}

/// Why a message is not a query berth answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// Not worth an answer: shorter than a header, or itself a response (answering responses
    /// lets two servers loop).
    Drop,
    /// Answer with this code and no question (FORMERR, NOTIMP); `header` is the query's
    /// first four bytes (ID, flags), whose opcode and RD the answer echoes.
    Code { header: [u8; 4], rcode: u8 },
}

pub fn parse_query(msg: &[u8]) -> Result<Query<'_>, Rejected> {
    if msg.len() < HEADER {
        return Err(Rejected::Drop);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & FLAG_QR != 0 {
        return Err(Rejected::Drop);
    }
    let header = [msg[0], msg[1], msg[2], msg[3]];
    let formerr = Rejected::Code {
        header,
        rcode: RCODE_FORMERR,
    };
    let opcode = (flags >> 11) & 0xf;
    if opcode != 0 {
        return Err(Rejected::Code {
            header,
            rcode: RCODE_NOTIMP,
        });
    }
    let count = |at: usize| u16::from_be_bytes([msg[at], msg[at + 1]]);
    let (qdcount, ancount, nscount, arcount) = (count(4), count(6), count(8), count(10));
    if qdcount != 1 || ancount != 0 || nscount != 0 {
        return Err(formerr);
    }
    let (name, end) = read_name(msg, HEADER).ok_or(formerr.clone())?;
    let fixed = msg.get(end..end + 4).ok_or(formerr.clone())?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    let question = &msg[HEADER..end + 4];
    let mut edns_size = None;
    if arcount > 0 {
        // Only the OPT pseudo-record is looked at; TSIG and others are not supported and
        // their presence does not change the answer.
        let at = end + 4;
        if msg.get(at) == Some(&0) {
            let rr = msg.get(at + 1..at + 11).ok_or(formerr)?;
            if u16::from_be_bytes([rr[0], rr[1]]) == TYPE_OPT {
                edns_size = Some(u16::from_be_bytes([rr[2], rr[3]]));
            }
        }
    }
    Ok(Query {
        id,
        rd: flags & FLAG_RD != 0,
        name,
        qtype,
        qclass,
        question,
        edns_size,
    })
}

/// Reads an uncompressed name at `at`: the lower-cased dotted form and the offset after it.
/// Compression pointers are refused: a question has nothing earlier to point at.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            return Some((name, at));
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        // Labels are bytes; anything outside printable ASCII cannot name a berth endpoint, so
        // it is kept escaped and simply never matches.
        for &b in label {
            match b {
                b'!'..=b'~' if b != b'.' && b != b'\\' => name.push(b.to_ascii_lowercase() as char),
                _ => name.push_str(&format!("\\{b:03}")),
            }
        }
        if name.len() > 253 {
            return None;
        }
        at += len;
    }
}

/// One record; in the answer section its owner is the question's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Addr(IpAddr),
    /// A PTR to this name (dotted, without the root dot).
    Ptr(String),
    /// An SRV record (RFC 2782) with priority and weight 0: each names a single target,
    /// so there is nothing to choose between, and the RFC asks for weight 0 then. The target
    /// (dotted, without the root dot) is shared with the zone: an answer copies no name.
    Srv {
        port: u16,
        target: Arc<str>,
    },
}

/// Builds an answer to `q`: its header and question, then `records` until `limit` bytes; the
/// TC bit says when some did not fit.
pub fn answer(
    q: &Query<'_>,
    rcode: u8,
    authoritative: bool,
    records: &[Record],
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    answer_with_extra(q, rcode, authoritative, records, &[], ttl, limit)
}

/// [`answer`], with `extra` in the additional section owned by the target of the first SRV
/// record among `records`: its addresses, which spare the client a second query. They are a
/// hint, so those that do not fit are left out without TC (RFC 2181 §9), as are all of them
/// when no SRV record is answered.
pub fn answer_with_extra(
    q: &Query<'_>,
    rcode: u8,
    authoritative: bool,
    records: &[Record],
    extra: &[Record],
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(HEADER + q.question.len() + 16 * (records.len() + extra.len()) + 11);
    let mut flags = FLAG_QR | FLAG_RA | u16::from(rcode & 0xf);
    if q.rd {
        flags |= FLAG_RD;
    }
    if authoritative {
        flags |= FLAG_AA;
    }
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(q.question);
    let opt_len = if q.edns_size.is_some() { 11 } else { 0 };
    let mut target = None;
    let mut answers: u16 = 0;
    for r in records {
        let mark = out.len();
        let at = push_record(&mut out, QUESTION_NAME, r, ttl);
        if out.len() + opt_len > limit {
            out.truncate(mark);
            flags |= FLAG_TC;
            out[2..4].copy_from_slice(&flags.to_be_bytes());
            break;
        }
        target = target.or(at.and_then(pointer));
        answers += 1;
    }
    let mut additional: u16 = 0;
    if let Some(target) = target {
        for r in extra {
            let mark = out.len();
            push_record(&mut out, target, r, ttl);
            if out.len() + opt_len > limit {
                out.truncate(mark);
                break;
            }
            additional += 1;
        }
    }
    out[6..8].copy_from_slice(&answers.to_be_bytes());
    if q.edns_size.is_some() {
        out.extend_from_slice(&[0]);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        additional += 1;
    }
    out[10..12].copy_from_slice(&additional.to_be_bytes());
    out
}

/// A compression pointer to the name at `at`, if it is within a pointer's reach.
fn pointer(at: usize) -> Option<[u8; 2]> {
    let at = u16::try_from(at).ok().filter(|a| *a < 0x4000)?;
    Some((0xc000 | at).to_be_bytes())
}

/// Appends `r` owned by the name `owner` points at, its data written in place (no buffer per
/// record). For an SRV record, says where its target starts.
fn push_record(out: &mut Vec<u8>, owner: [u8; 2], r: &Record, ttl: u32) -> Option<usize> {
    let rtype = match r {
        Record::Addr(IpAddr::V4(_)) => TYPE_A,
        Record::Addr(IpAddr::V6(_)) => TYPE_AAAA,
        Record::Ptr(_) => TYPE_PTR,
        Record::Srv { .. } => TYPE_SRV,
    };
    out.extend_from_slice(&owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    let start = out.len();
    let mut target = None;
    match r {
        Record::Addr(IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
        Record::Addr(IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
        Record::Ptr(name) => push_name(out, name),
        Record::Srv { port, target: name } => {
            out.extend_from_slice(&[0, 0, 0, 0]);
            out.extend_from_slice(&port.to_be_bytes());
            target = Some(out.len());
            // Never compressed: RFC 2782 forbids it in the target.
            push_name(out, name);
        }
    }
    let len = (out.len() - start) as u16;
    out[start - 2..start].copy_from_slice(&len.to_be_bytes());
    target
}

/// An answer without a question (to a message whose question could not be read), echoing
/// the ID, opcode and RD of the query's `header`.
pub fn bare_answer(header: [u8; 4], rcode: u8) -> Vec<u8> {
    let asked = u16::from_be_bytes([header[2], header[3]]);
    let flags = FLAG_QR | FLAG_RA | (asked & (0x7800 | FLAG_RD)) | u16::from(rcode & 0xf);
    let mut out = header[..2].to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// Appends a dotted name in wire form. Names here come from berth's own records (validated
/// endpoint, service and network names), so labels are short; longer ones are cut to fit the
/// format.
fn push_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let bytes = &label.as_bytes()[..label.len().min(63)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out.push(0);
}

/// The message ID and whether the TC (truncated) bit is set, for relaying upstream answers.
pub fn id_and_truncated(msg: &[u8]) -> Option<(u16, bool)> {
    let h = msg.get(..4)?;
    Some((u16::from_be_bytes([h[0], h[1]]), h[2] & 0x02 != 0))
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa`, nibbles `.ip6.arpa`) stands for.
pub fn reverse_name_addr(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets = [0u8; 4];
        let parts: Vec<&str> = rest.split('.').collect();
        if parts.len() != 4 {
            return None;
        }
        for (i, p) in parts.iter().rev().enumerate() {
            if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
                return None;
            }
            octets[i] = p.parse().ok()?;
        }
        return Some(IpAddr::from(octets));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<&str> = rest.split('.').collect();
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, n) in nibbles.iter().rev().enumerate() {
        if n.len() != 1 {
            return None;
        }
        let v = u8::from_str_radix(n, 16).ok()?;
        bytes[i / 2] |= if i % 2 == 0 { v << 4 } else { v };
    }
    Some(IpAddr::from(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query as `dig` sends it: RD set, optionally with an EDNS OPT record.
    pub fn query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&FLAG_RD.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
        push_name(&mut m, name);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        if edns {
            m.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        m
    }

    #[test]
    fn parses_a_query_lower_cased_with_its_question_bytes() {
        let m = query(7, "Web.Blue.berth.LOCAL", TYPE_A, true);
        let q = parse_query(&m).unwrap();
        assert_eq!(q.id, 7);
        assert!(q.rd);
        assert_eq!(q.name, "web.blue.berth.local");
        assert_eq!((q.qtype, q.qclass), (TYPE_A, CLASS_IN));
        assert_eq!(q.question, &m[12..m.len() - 11]);
        assert_eq!(q.edns_size, Some(4096));
        assert_eq!(q.udp_limit(), 1232);
    }

    #[test]
    fn refuses_responses_short_messages_and_bad_names() {
        assert_eq!(parse_query(&[0; 5]), Err(Rejected::Drop));
        let mut resp = query(1, "a", TYPE_A, false);
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp), Err(Rejected::Drop));
        let code = |m: &[u8]| match parse_query(m) {
            Err(Rejected::Code { header, rcode }) => {
                Some((u16::from_be_bytes([header[0], header[1]]), rcode))
            }
            _ => None,
        };
        let mut update = query(2, "a", TYPE_A, false);
        update[2] |= 5 << 3;
        assert_eq!(code(&update), Some((2, RCODE_NOTIMP)));
        let Err(Rejected::Code { header, rcode }) = parse_query(&update) else {
            unreachable!()
        };
        let a = bare_answer(header, rcode);
        assert_eq!(&a[..2], &[0, 2]);
        assert_eq!(a[2] & 0x79, 0x29, "opcode 5 and RD echoed");
        assert_eq!(a[3] & 0xf, RCODE_NOTIMP);
        let mut pointer = query(3, "a", TYPE_A, false);
        pointer[12] = 0xc0;
        assert_eq!(code(&pointer), Some((3, RCODE_FORMERR)));
        let cut = query(4, "abc", TYPE_A, false);
        assert_eq!(code(&cut[..15]), Some((4, RCODE_FORMERR)));
        let mut two = query(5, "a", TYPE_A, false);
        two[5] = 2;
        assert_eq!(code(&two), Some((5, RCODE_FORMERR)));
    }

    #[test]
    fn answers_point_at_the_question_and_truncate_to_the_limit() {
        let m = query(9, "web", TYPE_A, false);
        let q = parse_query(&m).unwrap();
        let recs: Vec<Record> = (1..=40u8)
            .map(|i| Record::Addr(IpAddr::from([10, 0, 0, i])))
            .collect();
        let a = answer(&q, RCODE_NOERROR, true, &recs[..2], 0, 512);
        assert_eq!(&a[..2], &[0, 9]);
        assert_eq!(a[2] & 0x87, 0x85, "QR, AA, RD");
        assert_eq!(&a[6..8], &[0, 2]);
        assert_eq!(&a[12 + q.question.len()..][..2], &[0xc0, 12]);
        assert_eq!(a.len(), 12 + q.question.len() + 2 * 16);
        let full = answer(&q, RCODE_NOERROR, true, &recs, 0, 512);
        assert!(full.len() <= 512);
        assert_ne!(full[2] & 0x02, 0, "TC set");
        assert_eq!(usize::from(full[7]), (512 - 12 - q.question.len()) / 16);
    }

    #[test]
    fn srv_targets_go_uncompressed_and_extras_point_at_them_or_are_left_out() {
        let m = query(3, "_http._tcp.api", TYPE_SRV, true);
        let q = parse_query(&m).unwrap();
        let target: Arc<str> = "api.blue.berth.local".into();
        let srv = [Record::Srv { port: 80, target }];
        let vips = [
            Record::Addr([10, 211, 0, 7].into()),
            Record::Addr("fd00:b5:5e7::7".parse().unwrap()),
        ];
        let a = answer_with_extra(&q, RCODE_NOERROR, true, &srv, &vips, 0, 1232);
        assert_eq!(
            (&a[6..8], &a[10..12]),
            (&[0, 1][..], &[0, 3][..]),
            "2 + OPT"
        );
        let rr = HEADER + q.question.len();
        assert_eq!(&a[rr..rr + 4], &[0xc0, 12, 0, 33]);
        let rdata = &a[rr + 12..];
        assert_eq!(&rdata[..6], &[0, 0, 0, 0, 0, 80], "priority, weight, port");
        let mut name = Vec::new();
        push_name(&mut name, "api.blue.berth.local");
        assert_eq!(&rdata[6..6 + name.len()], &name[..]);
        let extra = rr + 12 + 6 + name.len();
        let at = rr + 12 + 6;
        assert_eq!(&a[extra..extra + 4], &[0xc0, at as u8, 0, 1]);
        assert_eq!(&a[extra + 16..extra + 20], &[0xc0, at as u8, 0, 28]);
        assert_eq!(a.len(), extra + 16 + 28 + 11);
        // Room for the SRV and the A record only: the AAAA goes, without TC.
        let cut = answer_with_extra(&q, RCODE_NOERROR, true, &srv, &vips, 0, extra + 16 + 11);
        assert_eq!((&cut[6..8], &cut[10..12]), (&[0, 1][..], &[0, 2][..]));
        assert_eq!(cut[2] & 0x02, 0);
        // No SRV, no owner for the extras.
        let none = answer_with_extra(&q, RCODE_NOERROR, true, &[], &vips, 0, 1232);
        assert_eq!(&none[10..12], &[0, 1]);
    }

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name_addr("4.3.2.10.in-addr.arpa"),
            Some("10.2.3.4".parse().unwrap())
        );
        assert_eq!(reverse_name_addr("4.3.2.in-addr.arpa"), None);
        assert_eq!(reverse_name_addr("04.3.2.10.in-addr.arpa"), None);
        let v6: IpAddr = "fd00:91::2".parse().unwrap();
        let IpAddr::V6(a) = v6 else { unreachable!() };
        let nibbles: Vec<String> = a
            .octets()
            .iter()
            .rev()
            .flat_map(|b| [format!("{:x}", b & 0xf), format!("{:x}", b >> 4)])
            .collect();
        assert_eq!(
            reverse_name_addr(&format!("{}.ip6.arpa", nibbles.join("."))),
            Some(v6)
        );
    }
}
