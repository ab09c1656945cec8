//! Forwarding to the host's resolvers: the nameservers of the daemon's resolv.conf, re-read
//! when the file changes. Over UDP, then over TCP when the answer came back truncated and the
//! client asked over TCP (a UDP client gets the truncated answer and retries over TCP itself).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::wire;

/// How long one upstream server gets to answer before the next is asked. Three servers (the
/// most resolv.conf lists) stay well within a stub resolver's usual 5 s.
pub const PER_SERVER: Duration = Duration::from_millis(1500);
/// resolv.conf's own limit (glibc `MAXNS`).
const MAX_SERVERS: usize = 3;
/// Idle upstream sockets kept per server for reuse.
const IDLE_SOCKETS: usize = 64;

pub struct Upstream {
    path: PathBuf,
    /// The file as last read: its stamp and nameservers.
    cache: Mutex<(Option<Stamp>, Arc<Vec<IpAddr>>)>,
    /// berth's own listening addresses: a resolv.conf pointing at berth must not make it
    /// forward to itself.
    own: Arc<Mutex<HashSet<IpAddr>>>,
    /// Connected UDP sockets that answered, per server, for the next queries: a socket per
    /// query (socket, connect, register, deregister, close) was a third of the forwarding
    /// cost. Each is used by one query at a time, keeps the random source port the kernel
    /// gave it, and every query has a random ID and must get its own question back.
    idle: Mutex<HashMap<SocketAddr, Vec<UdpSocket>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Upstream {
    pub fn new(path: PathBuf, own: Arc<Mutex<HashSet<IpAddr>>>) -> Upstream {
        Upstream {
            path,
            cache: Mutex::new((None, Arc::new(Vec::new()))),
            own,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// The nameservers to ask now; the file is read again when its stamp changed. berth's own
    /// addresses are left out at every call (a network created later may listen on one).
    pub fn servers(&self) -> Vec<SocketAddr> {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(&self.path).ok().map(|m| Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode: m.ino(),
        });
        let listed = {
            let mut cache = self.cache.lock().expect("upstream lock");
            if cache.0 != stamp || stamp.is_none() {
                let text = std::fs::read_to_string(&self.path).unwrap_or_default();
                let servers = parse_resolv_conf(&text);
                tracing::debug!(path = %self.path.display(), ?servers, "upstream resolvers read");
                *cache = (stamp, Arc::new(servers));
            }
            cache.1.clone()
        };
        let own = self.own.lock().expect("own addresses lock");
        listed
            .iter()
            .filter(|ip| !own.contains(ip))
            .take(MAX_SERVERS)
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect()
    }

    /// Asks the upstream servers in turn; `None` when none answered (the caller answers
    /// SERVFAIL).
    pub async fn forward(&self, query: &[u8], over_tcp: bool) -> Option<Vec<u8>> {
        let (client_id, _) = wire::id_and_truncated(query)?;
        for server in self.servers().iter() {
            // A fresh random ID per upstream query.
            let id = fastrand::u16(..);
            let mut msg = query.to_vec();
            msg[..2].copy_from_slice(&id.to_be_bytes());
            let answer = match timeout(PER_SERVER, self.ask_udp(*server, &msg)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::debug!(%server, error = %e, "upstream failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(%server, "upstream timed out");
                    continue;
                }
            };
            let truncated = wire::id_and_truncated(&answer).is_some_and(|(_, tc)| tc);
            let mut answer = if truncated && over_tcp {
                match timeout(PER_SERVER, ask_tcp(*server, &msg)).await {
                    Ok(Ok(a)) => a,
                    _ => answer,
                }
            } else {
                answer
            };
            answer[..2].copy_from_slice(&client_id.to_be_bytes());
            return Some(answer);
        }
        None
    }
}

impl Upstream {
    /// One UDP exchange with `server`, on an idle socket of its or a new one. A socket goes
    /// back to the idle ones only after a good answer; one that failed or timed out (the
    /// future is dropped) is closed.
    async fn ask_udp(&self, server: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        let reused = self
            .idle
            .lock()
            .expect("idle sockets lock")
            .get_mut(&server)
            .and_then(Vec::pop);
        let sock = match reused {
            Some(s) => s,
            None => {
                let local: SocketAddr = match server {
                    SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
                    SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
                };
                let sock = UdpSocket::bind(local).await?;
                // Connected: only the server's datagrams arrive, and an ICMP unreachable fails
                // fast.
                sock.connect(server).await?;
                sock
            }
        };
        sock.send(msg).await?;
        // Room for the largest datagram, left uninitialised: zeroing 64 KiB per query would be
        // a good part of the forwarding cost.
        let mut buf = Vec::with_capacity(65535);
        loop {
            buf.clear();
            sock.recv_buf(&mut buf).await?;
            // Anything that is not the answer to this query is ignored: a late answer to an
            // earlier query on this socket, or spoofing.
            if answers(msg, &buf) {
                break;
            }
        }
        let mut idle = self.idle.lock().expect("idle sockets lock");
        let pool = idle.entry(server).or_default();
        if pool.len() < IDLE_SOCKETS {
            pool.push(sock);
        }
        Ok(buf)
    }
}

/// Whether `answer` is a response to `query`: same ID, QR set, same question bytes.
fn answers(query: &[u8], answer: &[u8]) -> bool {
    let Ok(q) = wire::parse_query(query) else {
        return false;
    };
    let end = 12 + q.question.len();
    answer.len() >= end
        && answer[..2] == query[..2]
        && answer[2] & 0x80 != 0
        && answer[12..end] == *q.question
}

async fn ask_tcp(server: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await?;
    let len = usize::from(stream.read_u16().await?);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    if answers(msg, &buf) {
        Ok(buf)
    } else {
        Err(std::io::Error::other("answer for another query"))
    }
}

/// The `nameserver` addresses of a resolv.conf, in order (scoped IPv6 addresses skipped: the
/// zone index would have to be resolved in the daemon's namespace).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|w| w.parse().ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_answer_to_this_question_counts() {
        use crate::wire::tests::query;
        let q = query(7, "example.org", wire::TYPE_A, false);
        let parsed = wire::parse_query(&q).unwrap();
        let a = wire::answer(&parsed, 0, false, &[], 0, 512);
        assert!(answers(&q, &a));
        let other = query(7, "example.net", wire::TYPE_A, false);
        let b = wire::answer(&wire::parse_query(&other).unwrap(), 0, false, &[], 0, 512);
        assert!(!answers(&q, &b), "same ID, other question");
        let mut c = a.clone();
        c[1] ^= 1;
        assert!(!answers(&q, &c), "other ID");
        assert!(!answers(&q, &q), "a query is not an answer");
        assert!(!answers(&q, &a[..14]));
    }

    #[test]
    fn reads_nameservers_in_order() {
        let text = "# c\nsearch example.org\nnameserver 192.0.2.53\n nameserver bogus\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\noptions ndots:2\n";
        assert_eq!(
            parse_resolv_conf(text),
            [
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn skips_own_addresses_and_rereads_on_change() {
        let dir = std::env::temp_dir().join(format!("berth-dns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.1\nnameserver 192.0.2.1\n").unwrap();
        let own = Arc::new(Mutex::new(HashSet::from(["10.0.0.1".parse().unwrap()])));
        let up = Upstream::new(path.clone(), own);
        assert_eq!(up.servers(), ["192.0.2.1:53".parse().unwrap()]);
        std::fs::write(&path, "nameserver 192.0.2.2\nnameserver 192.0.2.3\nnameserver 192.0.2.4\nnameserver 192.0.2.5\n").unwrap();
        assert_eq!(up.servers().len(), 3);
        assert_eq!(up.servers()[0], "192.0.2.2:53".parse().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(up.servers().is_empty());
    }
}
