//! The sockets: a UDP socket and a TCP listener per gateway address. Local answers are written
//! from the receiving task, a batch per system call (no task per query); forwarded queries get
//! a task each, bounded per network, so a slow upstream holds no local answer back and one
//! network's clients cannot starve another's. TCP clients get a slot each from a bounded set
//! and idle timeouts, so stalled or half-open connections cannot exhaust anything UDP needs.
//! Tasks that outlive a listener (forwards, TCP sessions) hold it weakly: stopping a network
//! frees its addresses at once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::batch::{self, Received};
use crate::upstream::Upstream;
use crate::{Clients, DnsConfig, DnsError, NetworkDns, Step, Zone, respond, wire};

/// Forwarded queries in flight at once per network; beyond it, SERVFAIL at once.
const MAX_FORWARDS: usize = 256;
/// TCP connections per listener.
const MAX_TCP_CLIENTS: usize = 64;
/// A TCP client that sends nothing for this long is dropped (RFC 7766 §6.2.3: seconds).
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Whatever a TCP client does, its connection ends after this.
const TCP_SESSION: Duration = Duration::from_secs(30);

pub struct Shared {
    pub cfg: DnsConfig,
    pub upstream: Upstream,
    /// Every address berth listens on (for the upstream filter).
    pub own: Arc<Mutex<HashSet<IpAddr>>>,
    pub networks: Mutex<HashMap<String, Served>>,
    pub clients: RwLock<Clients>,
}

impl Shared {
    /// The zones of the other networks of the namespace that sent from `client`.
    fn other_zones(&self, client: IpAddr, network: &str) -> Vec<Arc<Zone>> {
        let networks = self
            .clients
            .read()
            .expect("clients lock")
            .networks_of(client);
        if networks.len() < 2 {
            return Vec::new();
        }
        let served = self.networks.lock().expect("networks lock");
        networks
            .iter()
            .filter(|n| n.as_str() != network)
            .filter_map(|n| served.get(n).map(|s| s.zone.clone()))
            .collect()
    }
}

/// What a network's listener tasks work with.
struct Network {
    zone: Arc<Zone>,
    shared: Arc<Shared>,
    forwards: Arc<Semaphore>,
}

pub struct Served {
    pub zone: Arc<Zone>,
    listen: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn serve_network(shared: &Arc<Shared>, net: &NetworkDns) -> Result<(), DnsError> {
    let mut nets = shared.networks.lock().expect("networks lock");
    if nets.get(&net.name).is_some_and(|s| s.listen == net.listen) {
        return Ok(());
    }
    // Gateways do not change; if they did, the old listeners go first.
    nets.remove(&net.name);
    let network = Arc::new(Network {
        zone: Arc::new(Zone::new(
            &net.name,
            &shared.cfg.suffix,
            net.subnets.clone(),
            net.internal,
        )),
        shared: shared.clone(),
        forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
    });
    let mut sockets = Vec::new();
    for ip in &net.listen {
        let addr = SocketAddr::new(*ip, shared.cfg.port);
        let bound = (|| {
            let udp = UdpSocket::from_std(bind(addr, Type::DGRAM)?.into())?;
            let tcp = TcpListener::from_std(bind(addr, Type::STREAM)?.into())?;
            Ok((udp, tcp))
        })();
        sockets.push(bound.map_err(|source| DnsError::Bind { addr, source })?);
    }
    // Only once every socket is bound: a failure leaves nothing running.
    let mut tasks = Vec::new();
    for (udp, tcp) in sockets {
        tasks.push(tokio::spawn(serve_udp(Arc::new(udp), network.clone())));
        tasks.push(tokio::spawn(serve_tcp(tcp, network.clone())));
    }
    shared
        .own
        .lock()
        .expect("own addresses lock")
        .extend(net.listen.iter().copied());
    tracing::debug!(network = %net.name, listen = ?net.listen, "serving DNS");
    nets.insert(
        net.name.clone(),
        Served {
            zone: network.zone.clone(),
            listen: net.listen.clone(),
            tasks,
        },
    );
    Ok(())
}

pub fn stop_network(shared: &Shared, name: &str) {
    let served = shared.networks.lock().expect("networks lock").remove(name);
    if let Some(s) = served {
        let mut own = shared.own.lock().expect("own addresses lock");
        for ip in &s.listen {
            own.remove(ip);
        }
    }
}

/// A socket on `addr` that may be bound before the address exists (`IP_FREEBIND`).
fn bind(addr: SocketAddr, ty: Type) -> std::io::Result<Socket> {
    let proto = if ty == Type::DGRAM {
        Protocol::UDP
    } else {
        Protocol::TCP
    };
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if ty == Type::STREAM {
        // A restarted daemon binds again while old connections sit in TIME_WAIT. Not for
        // UDP, where it would let a second server on the same address share the queries.
        sock.set_reuse_address(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
        sock.set_freebind_v6(true)?;
    } else {
        sock.set_freebind_v4(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    if ty == Type::STREAM {
        sock.listen(128)?;
    }
    Ok(sock)
}

async fn serve_udp(sock: Arc<UdpSocket>, net: Arc<Network>) {
    let fd = sock.as_raw_fd();
    let mut rx = Received::new();
    let mut answers: Vec<(Vec<u8>, usize)> = Vec::with_capacity(batch::BATCH);
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let n = match sock.try_io(Interest::READABLE, || rx.recv(fd)) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(network = %net.zone.network, error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        answers.clear();
        for i in 0..n {
            let others = || match rx.peer(i) {
                Some(peer) => net.shared.other_zones(peer.ip(), &net.zone.network),
                None => Vec::new(),
            };
            match respond(&net.zone, rx.datagram(i), false, &others) {
                Step::Reply(r) => answers.push((r, i)),
                Step::Ignore => {}
                Step::Forward => {
                    if let Some(peer) = rx.peer(i) {
                        spawn_forward(&sock, &net, rx.datagram(i), peer).await;
                    }
                }
            }
        }
        let mut sent = 0;
        while sent < answers.len() {
            match sock.try_io(Interest::WRITABLE, || rx.send(fd, &answers[sent..])) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if sock.writable().await.is_err() {
                        return;
                    }
                }
                // This answer cannot go (its sender is unreachable): the next may.
                Err(_) => sent += 1,
            }
        }
    }
}

/// Forwards one UDP query in a task of its own; SERVFAIL at once when the network has too
/// many in flight.
async fn spawn_forward(sock: &Arc<UdpSocket>, net: &Network, msg: &[u8], peer: SocketAddr) {
    let Ok(permit) = net.forwards.clone().try_acquire_owned() else {
        let _ = sock.send_to(&servfail(msg, false), peer).await;
        return;
    };
    let (sock, shared, msg) = (Arc::downgrade(sock), net.shared.clone(), msg.to_vec());
    tokio::spawn(async move {
        let _permit = permit;
        let answer = forward(&shared, &msg, false).await;
        // The network may have gone meanwhile, and its socket with it.
        if let Some(sock) = Weak::upgrade(&sock) {
            let _ = sock.send_to(&answer, peer).await;
        }
    });
}

/// Connections one client address may hold at once, so that one client cannot take every
/// slot and leave others whose UDP answers were truncated nowhere to retry.
const MAX_TCP_PER_CLIENT: usize = 8;

/// A client's hold on one of its connections; given back on drop.
struct ClientSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl ClientSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, client: IpAddr) -> Option<ClientSlot> {
        let mut c = counts.lock().expect("tcp clients lock");
        let n = c.entry(client).or_default();
        if *n >= MAX_TCP_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: counts.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("tcp clients lock");
        if let Some(n) = c.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.client);
            }
        }
    }
}

async fn serve_tcp(listener: TcpListener, net: Arc<Network>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    let per_client = Arc::new(Mutex::new(HashMap::new()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(network = %net.zone.network, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // All slots taken (or all of this client's): close at once rather than let
        // connections queue unseen.
        let Some(mine) = ClientSlot::take(&per_client, peer.ip()) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let net = Arc::downgrade(&net);
        tokio::spawn(async move {
            let _slots = (slot, mine);
            let _ = timeout(TCP_SESSION, tcp_session(stream, peer.ip(), net)).await;
        });
    }
}

/// Queries on one TCP connection, one after the other (RFC 7766 framing), while the network
/// is served.
async fn tcp_session(
    mut stream: TcpStream,
    peer: IpAddr,
    net: Weak<Network>,
) -> std::io::Result<()> {
    loop {
        let Ok(len) = timeout(TCP_IDLE, stream.read_u16()).await else {
            return Ok(());
        };
        let mut msg = vec![0u8; usize::from(len?)];
        timeout(TCP_IDLE, stream.read_exact(&mut msg))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let Some(net) = net.upgrade() else {
            return Ok(());
        };
        let others = || net.shared.other_zones(peer, &net.zone.network);
        let answer = match respond(&net.zone, &msg, true, &others) {
            Step::Reply(r) => r,
            Step::Ignore => return Ok(()),
            Step::Forward => forward(&net.shared, &msg, true).await,
        };
        drop(net);
        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&answer);
        timeout(TCP_IDLE, stream.write_all(&framed))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
}

/// The upstream answer, or SERVFAIL when no upstream server answered.
async fn forward(shared: &Shared, msg: &[u8], tcp: bool) -> Vec<u8> {
    match shared.upstream.forward(msg, tcp).await {
        Some(a) => a,
        None => servfail(msg, tcp),
    }
}

fn servfail(msg: &[u8], tcp: bool) -> Vec<u8> {
    match wire::parse_query(msg) {
        Ok(q) => {
            let limit = if tcp {
                usize::from(u16::MAX)
            } else {
                q.udp_limit()
            };
            wire::answer(&q, wire::RCODE_SERVFAIL, false, &[], 0, limit)
        }
        Err(_) => {
            let mut header = [0u8; 4];
            header.iter_mut().zip(msg).for_each(|(h, m)| *h = *m);
            wire::bare_answer(header, wire::RCODE_SERVFAIL)
        }
    }
}
