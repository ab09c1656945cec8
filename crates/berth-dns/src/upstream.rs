//! Forwarding to the host's resolvers: the nameservers of the daemon's resolv.conf, re-read
//! when the file changes. Over UDP, then over TCP when the answer came back truncated and the
//! client asked over TCP (a UDP client gets the truncated answer and retries over TCP itself).

use std::collections::HashSet;
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

pub struct Upstream {
    path: PathBuf,
    /// The file as last read: its stamp and nameservers.
    cache: Mutex<(Option<Stamp>, Arc<Vec<IpAddr>>)>,
    /// berth's own listening addresses: a resolv.conf pointing at berth must not make it
    /// forward to itself.
    own: Arc<Mutex<HashSet<IpAddr>>>,
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
            // A fresh ID (and a fresh socket, so a fresh source port) per upstream query.
            let id = fastrand::u16(..);
            let mut msg = query.to_vec();
            msg[..2].copy_from_slice(&id.to_be_bytes());
            let answer = match timeout(PER_SERVER, ask_udp(*server, &msg, id)).await {
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
                match timeout(PER_SERVER, ask_tcp(*server, &msg, id)).await {
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

async fn ask_udp(server: SocketAddr, msg: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: only the server's datagrams arrive, and an ICMP unreachable fails fast.
    sock.connect(server).await?;
    sock.send(msg).await?;
    // Room for the largest datagram, left uninitialised: zeroing 64 KiB per query would be
    // a good part of the forwarding cost.
    let mut buf = Vec::with_capacity(65535);
    loop {
        buf.clear();
        sock.recv_buf(&mut buf).await?;
        // Anything that is not the answer to this ID is ignored (spoofing, stale answers).
        if wire::id_and_truncated(&buf).is_some_and(|(got, _)| got == id) && buf[2] & 0x80 != 0 {
            return Ok(buf);
        }
    }
}

async fn ask_tcp(server: SocketAddr, msg: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await?;
    let len = usize::from(stream.read_u16().await?);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    if wire::id_and_truncated(&buf).is_some_and(|(got, _)| got == id) {
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
