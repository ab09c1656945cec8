//! The sockets that serve a port in the calling thread's network namespace (what `ss -ltuwn`
//! shows), read from the kernel with sock_diag: a published port must not silently take a
//! port a process of the host serves, as Docker's proxy would fail to bind it.

use std::net::IpAddr;

use berth_model::Protocol;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagMessage, inet::nlas::Nla};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{DataplaneError, Result};

/// A socket that serves a port: a listening TCP or SCTP socket, or an unconnected UDP one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub protocol: Protocol,
    /// The address it is bound to: unspecified (`0.0.0.0`, `::`) for every address of its
    /// family. An IPv4-mapped IPv6 address is given as the IPv4 address.
    pub address: IpAddr,
    pub port: u16,
    /// An IPv6 socket that takes IPv4 connections too (not `IPV6_V6ONLY`).
    pub dual_stack: bool,
    /// The socket's inode, by which its process is found ([`holder`]).
    pub inode: u32,
}

impl Listener {
    /// Whether a connection to `addr` on its port would reach this socket; `None`: to any of
    /// the namespace's addresses (which a socket bound to one of them serves too).
    pub fn serves(&self, addr: Option<IpAddr>) -> bool {
        let Some(addr) = addr else { return true };
        let addr = unmapped(addr);
        if self.address == addr {
            return true;
        }
        if !self.address.is_unspecified() {
            return false;
        }
        self.address.is_ipv4() == addr.is_ipv4() || (addr.is_ipv4() && self.dual_stack)
    }

    /// `tcp 0.0.0.0:22`, `udp [::]:53`.
    pub fn describe(&self) -> String {
        match self.address {
            IpAddr::V4(a) => format!("{} {a}:{}", self.protocol, self.port),
            IpAddr::V6(a) => format!("{} [{a}]:{}", self.protocol, self.port),
        }
    }
}

fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Every socket of the calling thread's namespace that serves a port: TCP and SCTP sockets
/// that listen, UDP sockets that are bound and not connected (a connected one only hears its
/// peer), both families. A kernel without SCTP has no SCTP sockets.
pub fn listeners() -> Result<Vec<Listener>> {
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).map_err(|e| DataplaneError::io("sock_diag socket", e))?;
    socket
        .bind_auto()
        .map_err(|e| DataplaneError::io("sock_diag bind", e))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| DataplaneError::io("sock_diag connect", e))?;
    let mut buf = vec![0; 64 * 1024];
    let mut out = Vec::new();
    let kinds = [
        (Protocol::Tcp, IPPROTO_TCP, StateFlags::LISTEN),
        (Protocol::Udp, IPPROTO_UDP, StateFlags::CLOSE),
        (Protocol::Sctp, IPPROTO_SCTP, StateFlags::LISTEN),
    ];
    let mut seq = 0;
    for (protocol, number, states) in kinds {
        for family in [AF_INET, AF_INET6] {
            seq += 1;
            let request = InetRequest {
                family,
                protocol: number,
                extensions: ExtensionFlags::empty(),
                states: states.clone(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            };
            let found = dump(&mut socket, &mut buf, seq, request, protocol);
            match found {
                Ok(found) => out.extend(found),
                // No sock_diag handler for the protocol (SCTP not in this kernel).
                Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT as i32) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

fn dump(
    socket: &mut Socket,
    buf: &mut [u8],
    seq: u32,
    request: InetRequest,
    protocol: Protocol,
) -> Result<Vec<Listener>> {
    let op = || format!("list {protocol} sockets");
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    msg.finalize();
    let mut out_buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut out_buf);
    socket
        .send(&out_buf, 0)
        .map_err(|e| DataplaneError::io("sock_diag send", e))?;
    let mut found = Vec::new();
    loop {
        let n = socket
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| DataplaneError::io("sock_diag recv", e))?;
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n])
                .map_err(|e| DataplaneError::Protocol(format!("{}: {e}", op())))?;
            let len = m.header.length as usize;
            if len == 0 {
                break;
            }
            off += len.next_multiple_of(4);
            if m.header.sequence_number != seq {
                continue;
            }
            match m.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let dual_stack = r.header.family == AF_INET6
                        && !r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true)));
                    found.push(Listener {
                        protocol,
                        address: unmapped(r.header.socket_id.source_address),
                        port: r.header.socket_id.source_port,
                        dual_stack,
                        inode: r.header.inode,
                    });
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        Some(code) => Err(DataplaneError::Kernel {
                            op: op(),
                            source: std::io::Error::from_raw_os_error(-code.get()),
                        }),
                        None => Ok(found),
                    };
                }
                _ => {}
            }
        }
    }
}

/// The process that holds the socket with this inode, as `(pid, command name)`: for telling
/// an operator who serves a port. Looks through every process's descriptors, so it is for
/// error messages, not for every request; `None` when no process of this machine that we can
/// see holds it.
pub fn holder(inode: u32) -> Option<(u32, String)> {
    let target = format!("socket:[{inode}]");
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(address: &str, dual_stack: bool) -> Listener {
        Listener {
            protocol: Protocol::Tcp,
            address: address.parse().unwrap(),
            port: 22,
            dual_stack,
            inode: 1,
        }
    }

    #[test]
    fn a_listener_serves_its_address_and_every_address() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let any4 = listener("0.0.0.0", false);
        assert!(any4.serves(None) && any4.serves(ip("192.0.2.1")));
        assert!(!any4.serves(ip("2001:db8::1")));
        let lo = listener("127.0.0.1", false);
        assert!(lo.serves(None) && lo.serves(ip("127.0.0.1")));
        assert!(!lo.serves(ip("192.0.2.1")));
        let any6 = listener("::", true);
        assert!(any6.serves(ip("192.0.2.1")) && any6.serves(ip("2001:db8::1")));
        let only6 = listener("::", false);
        assert!(!only6.serves(ip("192.0.2.1")) && only6.serves(ip("::1")));
        assert!(only6.serves(None));
        // A published port on a mapped address is on the IPv4 address.
        assert!(lo.serves(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn this_namespace_s_listeners_are_read() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("[::]:0").unwrap();
        let (tport, uport) = (
            tcp.local_addr().unwrap().port(),
            udp.local_addr().unwrap().port(),
        );
        let all = listeners().unwrap();
        let t = all
            .iter()
            .find(|l| l.protocol == Protocol::Tcp && l.port == tport)
            .unwrap_or_else(|| panic!("tcp {tport} in {all:?}"));
        assert_eq!(t.address, "127.0.0.1".parse::<IpAddr>().unwrap());
        let u = all
            .iter()
            .find(|l| l.protocol == Protocol::Udp && l.port == uport)
            .unwrap_or_else(|| panic!("udp {uport} in {all:?}"));
        assert!(u.address.is_unspecified() && u.dual_stack, "{u:?}");
        assert_eq!(
            holder(t.inode).map(|(pid, _)| pid),
            Some(std::process::id())
        );
    }
}
