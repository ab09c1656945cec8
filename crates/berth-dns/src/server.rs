//! The sockets: a UDP socket and a TCP listener per gateway address. Local answers are written
//! from the receiving task, a batch per system call (no task per query); forwarded queries get
//! a task each, bounded per network and per client, so a slow upstream holds no local answer
//! back and one client cannot starve another. Every query counts against its client's rate
//! (see [`limits`](crate::limits)). TCP clients get a slot each from a bounded set, a few per
//! client, and a newcomer displaces the longest-idle connection when the set is full, so
//! stalled or half-open connections, from however many addresses, cannot keep others out.
//! Tasks that outlive a listener (forwards, TCP sessions) hold it weakly: stopping a network
//! frees its addresses at once.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::timeout;

use crate::batch::{self, Received};
use crate::limits::{Client, Rates, TcpConns, Verdict};
use crate::upstream::Upstream;
use crate::{Clients, DnsConfig, DnsError, NetworkDns, Step, Zone, respond, wire};

/// Forwarded queries in flight at once per network; beyond it, SERVFAIL at once.
const MAX_FORWARDS: usize = 256;
/// A client's forwarded queries in flight (UDP and TCP, all networks) are at most its rate
/// times this: what it takes to forward the whole rate to an upstream that answers within it
/// (50 at the default rate, a fifth of a network's, so one client cannot take them all).
/// Beyond it, REFUSED at once.
const FORWARD_LATENCY: Duration = Duration::from_millis(10);
/// Clients whose query rate is remembered; a full table forgets idle clients first.
const RATE_TABLE: usize = 4096;
/// TCP connections per listener.
const MAX_TCP_CLIENTS: usize = 64;
/// TCP connections one client may hold at once per listener, so that a few clients' idle
/// connections are all a newcomer may have to displace.
const MAX_TCP_PER_CLIENT: usize = 8;
/// A TCP client that sends nothing for this long is dropped, as is one that takes longer to
/// send one query or to take one answer (RFC 7766 §6.2.3: seconds).
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
    pub rates: Mutex<Rates>,
    /// Forwarded queries in flight per client, and how many one may have.
    pub forwarding: Arc<Mutex<HashMap<Client, usize>>>,
    pub forwards_per_client: usize,
}

impl Shared {
    pub fn new(cfg: DnsConfig) -> Shared {
        let own = Arc::new(Mutex::new(HashSet::new()));
        Shared {
            upstream: Upstream::new(cfg.resolv_conf.clone(), own.clone()),
            own,
            rates: Mutex::new(Rates::new(cfg.client_qps, RATE_TABLE)),
            forwards_per_client: forwards_per_client(cfg.client_qps),
            cfg,
            networks: Mutex::new(HashMap::new()),
            clients: RwLock::new(Clients::default()),
            forwarding: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A hold on one of `client`'s forwards in flight; None when it has its share.
    fn forwarding(&self, client: Client) -> Option<InFlight> {
        InFlight::take(&self.forwarding, client, self.forwards_per_client)
    }

    /// The verdict on one query of `client`'s.
    fn verdict(&self, client: Client) -> Verdict {
        self.rates
            .lock()
            .expect("rates lock")
            .verdict(client, Instant::now())
    }

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
    let mut verdicts = Vec::with_capacity(batch::BATCH);
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
        // The batch's clients and rates under one hold of each lock.
        verdicts.clear();
        {
            let clients = net.shared.clients.read().expect("clients lock");
            let mut rates = net.shared.rates.lock().expect("rates lock");
            let now = Instant::now();
            verdicts.extend((0..n).map(|i| match rx.peer(i) {
                Some(peer) => {
                    let client = clients.client(peer.ip());
                    (client, rates.verdict(client, now))
                }
                None => (Client::Stranger, Verdict::Drop),
            }));
        }
        for (i, &(client, verdict)) in verdicts.iter().enumerate() {
            match verdict {
                Verdict::Answer => {}
                Verdict::Refuse => {
                    answers.extend(refusal(rx.datagram(i), false).map(|r| (r, i)));
                    continue;
                }
                Verdict::Drop => continue,
            }
            let others = || match rx.peer(i) {
                Some(peer) => net.shared.other_zones(peer.ip(), &net.zone.network),
                None => Vec::new(),
            };
            match respond(&net.zone, rx.datagram(i), false, &others) {
                Step::Reply(r) => answers.push((r, i)),
                Step::Ignore => {}
                Step::Forward => {
                    if let Some(peer) = rx.peer(i) {
                        spawn_forward(&sock, &net, rx.datagram(i), peer, client).await;
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

/// Forwards one UDP query in a task of its own; REFUSED at once when the client has too many
/// in flight, SERVFAIL when the network has.
async fn spawn_forward(
    sock: &Arc<UdpSocket>,
    net: &Network,
    msg: &[u8],
    peer: SocketAddr,
    client: Client,
) {
    let Some(mine) = net.shared.forwarding(client) else {
        if let Some(r) = refusal(msg, false) {
            let _ = sock.send_to(&r, peer).await;
        }
        return;
    };
    let Ok(permit) = net.forwards.clone().try_acquire_owned() else {
        let _ = sock.send_to(&servfail(msg, false), peer).await;
        return;
    };
    let (sock, shared, msg) = (Arc::downgrade(sock), net.shared.clone(), msg.to_vec());
    tokio::spawn(async move {
        let _held = (permit, mine);
        let answer = forward(&shared, &msg, false).await;
        // The network may have gone meanwhile, and its socket with it.
        if let Some(sock) = Weak::upgrade(&sock) {
            let _ = sock.send_to(&answer, peer).await;
        }
    });
}

/// A client's hold on a count it may have at most so many of (forwards in flight); given back
/// on drop.
struct InFlight {
    counts: Arc<Mutex<HashMap<Client, usize>>>,
    client: Client,
}

impl InFlight {
    fn take(
        counts: &Arc<Mutex<HashMap<Client, usize>>>,
        client: Client,
        cap: usize,
    ) -> Option<InFlight> {
        let mut c = counts.lock().expect("in-flight lock");
        let n = c.entry(client).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(InFlight {
            counts: counts.clone(),
            client,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("in-flight lock");
        if let Some(n) = c.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.client);
            }
        }
    }
}

/// A listener's connections, and the tasks serving them (to close one that is displaced).
struct Sessions {
    conns: TcpConns,
    tasks: HashMap<u64, AbortHandle>,
}

/// One connection's place among its listener's; given back when its task ends or is aborted.
struct Session {
    sessions: Arc<Mutex<Sessions>>,
    id: u64,
}

impl Session {
    /// Marks the connection busy (`true`) or idle; false when it was displaced meanwhile.
    fn mark(&self, busy: bool) -> bool {
        let mut s = self.sessions.lock().expect("tcp sessions lock");
        if busy {
            s.conns.busy(self.id)
        } else {
            s.conns.idle(self.id, Instant::now())
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut s = self.sessions.lock().expect("tcp sessions lock");
        s.conns.close(self.id);
        s.tasks.remove(&self.id);
    }
}

async fn serve_tcp(listener: TcpListener, net: Arc<Network>) {
    let sessions = Arc::new(Mutex::new(Sessions {
        conns: TcpConns::new(MAX_TCP_CLIENTS, MAX_TCP_PER_CLIENT),
        tasks: HashMap::new(),
    }));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(network = %net.zone.network, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let client = net
            .shared
            .clients
            .read()
            .expect("clients lock")
            .client(peer.ip());
        let displaced = {
            let mut s = sessions.lock().expect("tcp sessions lock");
            // Refused (closed at once rather than left to queue unseen) only when every
            // connection in its way is busy with a query.
            let Some((id, evicted)) = s.conns.admit(client, Instant::now()) else {
                continue;
            };
            let session = Session {
                sessions: sessions.clone(),
                id,
            };
            let weak = Arc::downgrade(&net);
            let task = tokio::spawn(async move {
                let _ = timeout(
                    TCP_SESSION,
                    tcp_session(stream, peer.ip(), client, weak, session),
                )
                .await;
            });
            s.tasks.insert(id, task.abort_handle());
            evicted.and_then(|e| s.tasks.remove(&e))
        };
        if let Some(task) = displaced {
            tracing::debug!(network = %net.zone.network, %peer, "DNS TCP connection displaced an idle one");
            task.abort();
        }
    }
}

/// Queries on one TCP connection, one after the other (RFC 7766 framing), while the network
/// is served and the connection is not displaced.
async fn tcp_session(
    mut stream: TcpStream,
    peer: IpAddr,
    client: Client,
    net: Weak<Network>,
    session: Session,
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
        if !session.mark(true) {
            return Ok(());
        }
        let answer = match net.shared.verdict(client) {
            Verdict::Answer => {
                let others = || net.shared.other_zones(peer, &net.zone.network);
                match respond(&net.zone, &msg, true, &others) {
                    Step::Reply(r) => Some(r),
                    Step::Ignore => None,
                    Step::Forward => match net.shared.forwarding(client) {
                        Some(_mine) => Some(forward(&net.shared, &msg, true).await),
                        None => refusal(&msg, true),
                    },
                }
            }
            Verdict::Refuse => refusal(&msg, true),
            Verdict::Drop => None,
        };
        drop(net);
        // Nothing to say (a response, or a client far over its rate): the connection ends.
        let Some(answer) = answer else {
            return Ok(());
        };
        if !session.mark(false) {
            return Ok(());
        }
        let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&answer);
        timeout(TCP_IDLE, stream.write_all(&framed))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
}

/// How many forwarded queries a client of rate `qps` may have in flight (see
/// [`FORWARD_LATENCY`]), from one to a network's.
fn forwards_per_client(qps: u32) -> usize {
    let n = (f64::from(qps) * FORWARD_LATENCY.as_secs_f64()) as usize;
    n.clamp(1, MAX_FORWARDS)
}

/// The upstream answer, or SERVFAIL when no upstream server answered.
async fn forward(shared: &Shared, msg: &[u8], tcp: bool) -> Vec<u8> {
    match shared.upstream.forward(msg, tcp).await {
        Some(a) => a,
        None => servfail(msg, tcp),
    }
}

/// REFUSED for a client over its share; None for a message that gets no answer at all.
fn refusal(msg: &[u8], tcp: bool) -> Option<Vec<u8>> {
    match wire::parse_query(msg) {
        Ok(_) => Some(error_answer(msg, wire::RCODE_REFUSED, tcp)),
        Err(wire::Rejected::Code { header, .. }) => {
            Some(wire::bare_answer(header, wire::RCODE_REFUSED))
        }
        Err(wire::Rejected::Drop) => None,
    }
}

fn servfail(msg: &[u8], tcp: bool) -> Vec<u8> {
    error_answer(msg, wire::RCODE_SERVFAIL, tcp)
}

/// An answer with `rcode` and the query's question (or only its header, if it has none).
fn error_answer(msg: &[u8], rcode: u8, tcp: bool) -> Vec<u8> {
    match wire::parse_query(msg) {
        Ok(q) => {
            let limit = if tcp {
                usize::from(u16::MAX)
            } else {
                q.udp_limit()
            };
            wire::answer(&q, rcode, false, &[], 0, limit)
        }
        Err(_) => {
            let mut header = [0u8; 4];
            header.iter_mut().zip(msg).for_each(|(h, m)| *h = *m);
            wire::bare_answer(header, rcode)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_in_flight_follow_the_rate_up_to_a_networks() {
        assert_eq!(forwards_per_client(crate::DEFAULT_CLIENT_QPS), 50);
        assert_eq!(forwards_per_client(1), 1);
        assert_eq!(forwards_per_client(crate::MAX_CLIENT_QPS), MAX_FORWARDS);
    }
}
