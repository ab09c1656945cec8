//! The sockets: a UDP socket and a TCP listener per gateway address. Local answers are written
//! from the receiving task, a batch per system call (no task per query); forwarded queries get a task each, bounded, so
//! a slow upstream holds no local answer back. TCP clients get a slot each from a bounded set
//! and idle timeouts, so stalled or half-open connections cannot exhaust anything UDP needs.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::batch::{self, Received};
use crate::upstream::Upstream;
use crate::{DnsConfig, DnsError, NetworkDns, Step, Zone, respond, wire};

/// Forwarded queries in flight at once, over all networks; beyond it, SERVFAIL at once.
pub const MAX_FORWARDS: usize = 1024;
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
    pub forwards: Arc<Semaphore>,
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
    let zone = Arc::new(Zone::new(
        &net.name,
        &shared.cfg.suffix,
        net.subnets.clone(),
        net.internal,
    ));
    let mut tasks = Vec::new();
    for ip in &net.listen {
        let addr = SocketAddr::new(*ip, shared.cfg.port);
        let bound = bind(addr, Type::DGRAM).and_then(|udp| Ok((udp, bind(addr, Type::STREAM)?)));
        let (udp, tcp) = match bound {
            Ok(pair) => pair,
            Err(source) => {
                tasks.iter().for_each(JoinHandle::abort);
                return Err(DnsError::Bind { addr, source });
            }
        };
        let udp = Arc::new(
            UdpSocket::from_std(udp.into()).map_err(|source| DnsError::Bind { addr, source })?,
        );
        let tcp =
            TcpListener::from_std(tcp.into()).map_err(|source| DnsError::Bind { addr, source })?;
        tasks.push(tokio::spawn(serve_udp(udp, zone.clone(), shared.clone())));
        tasks.push(tokio::spawn(serve_tcp(tcp, zone.clone(), shared.clone())));
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
            zone,
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

async fn serve_udp(sock: Arc<UdpSocket>, zone: Arc<Zone>, shared: Arc<Shared>) {
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
                tracing::debug!(network = %zone.network, error = %e, "DNS receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        answers.clear();
        for i in 0..n {
            match respond(&zone, rx.datagram(i), false) {
                Step::Reply(r) => answers.push((r, i)),
                Step::Ignore => {}
                Step::Forward => {
                    if let Some(peer) = rx.peer(i) {
                        spawn_forward(&sock, &shared, rx.datagram(i), peer).await;
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

/// Forwards one UDP query in a task of its own; SERVFAIL at once when too many are in flight.
async fn spawn_forward(sock: &Arc<UdpSocket>, shared: &Arc<Shared>, msg: &[u8], peer: SocketAddr) {
    let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
        let _ = sock.send_to(&servfail(msg, false), peer).await;
        return;
    };
    let (sock, shared, msg) = (sock.clone(), shared.clone(), msg.to_vec());
    tokio::spawn(async move {
        let _permit = permit;
        let answer = forward(&shared, &msg, false).await;
        let _ = sock.send_to(&answer, peer).await;
    });
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(network = %zone.network, error = %e, "DNS accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // All slots taken: close at once rather than let connections queue unseen.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (zone, shared) = (zone.clone(), shared.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _ = timeout(TCP_SESSION, tcp_session(stream, &zone, &shared)).await;
        });
    }
}

/// Queries on one TCP connection, one after the other (RFC 7766 framing).
async fn tcp_session(mut stream: TcpStream, zone: &Zone, shared: &Shared) -> std::io::Result<()> {
    loop {
        let Ok(len) = timeout(TCP_IDLE, stream.read_u16()).await else {
            return Ok(());
        };
        let mut msg = vec![0u8; usize::from(len?)];
        timeout(TCP_IDLE, stream.read_exact(&mut msg))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let answer = match respond(zone, &msg, true) {
            Step::Reply(r) => r,
            Step::Ignore => return Ok(()),
            Step::Forward => forward(shared, &msg, true).await,
        };
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
        Err(_) => wire::bare_answer(u16::from_be_bytes([msg[0], msg[1]]), wire::RCODE_SERVFAIL),
    }
}
