//! Datagrams in batches: `recvmmsg` takes every query waiting on the socket (up to [`BATCH`])
//! in one system call and `sendmmsg` sends their answers in one, back to the addresses they
//! came from as the kernel gave them (no conversion on the hot path).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

pub const BATCH: usize = 32;
/// Larger datagrams are cut to this, and then fail to parse: no query needs more.
pub const DATAGRAM: usize = 4096;

/// Room for one batch of received datagrams and their senders' addresses.
pub struct Received {
    bufs: Vec<[u8; DATAGRAM]>,
    peers: Vec<libc::sockaddr_storage>,
    peer_lens: Vec<libc::socklen_t>,
    lens: Vec<usize>,
}

impl Received {
    pub fn new() -> Received {
        Received {
            bufs: vec![[0; DATAGRAM]; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (AF_UNSPEC) value.
            peers: vec![unsafe { std::mem::zeroed() }; BATCH],
            peer_lens: vec![0; BATCH],
            lens: vec![0; BATCH],
        }
    }

    /// Receives what is waiting, without blocking: how many datagrams (WouldBlock if none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: DATAGRAM,
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(self.peers.iter_mut())
            .map(|(iov, peer)| {
                // SAFETY: mmsghdr is plain old data; the fields that matter are set below.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (peer as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: every header points at an iovec in `iovs` and an address slot in
        // `self.peers`, each iovec at a DATAGRAM-sized buffer in `self.bufs`; all of them
        // outlive the call, and the count passed is the number of headers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                hdrs.len() as _,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().take(n).enumerate() {
            self.lens[i] = (h.msg_len as usize).min(DATAGRAM);
            self.peer_lens[i] = h.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// Datagram `i` of the last [`Received::recv`].
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// The sender of datagram `i`, for answering it later (forwarded queries).
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        let ss = &self.peers[i];
        match i32::from(ss.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in here (family AF_INET), and
                // sockaddr_storage is large and aligned enough for one.
                let sin =
                    unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for a sockaddr_in6 (family AF_INET6).
                let sin6 =
                    unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    // std keeps the flow label as the kernel has it (network order).
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// Sends `answers` (answer, index of the datagram it answers) without blocking: how many
    /// went out (WouldBlock if none could).
    pub fn send(&self, fd: RawFd, answers: &[(Vec<u8>, usize)]) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = answers
            .iter()
            .map(|(a, _)| libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: a.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(answers)
            .map(|(iov, (_, i))| {
                // SAFETY: mmsghdr is plain old data; the fields that matter are set below.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name =
                    (&self.peers[*i] as *const libc::sockaddr_storage) as *mut libc::c_void;
                h.msg_hdr.msg_namelen = self.peer_lens[*i];
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: every header points at an iovec in `iovs` (each at an answer in `answers`)
        // and at a sender address in `self.peers` with the length the kernel gave; sendmmsg
        // only reads them, and all outlive the call.
        let n =
            unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), hdrs.len() as _, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn receives_a_batch_and_answers_each_sender() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let clients: Vec<std::net::UdpSocket> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (k, c) in clients.iter().enumerate() {
            c.send_to(&[k as u8; 5], server.local_addr().unwrap())
                .unwrap();
        }
        let mut rx = Received::new();
        let n = rx.recv(server.as_raw_fd()).unwrap();
        assert_eq!(n, 3);
        let mut answers = Vec::new();
        for i in 0..n {
            let k = rx.datagram(i)[0];
            assert_eq!(rx.datagram(i), [k; 5]);
            assert_eq!(
                rx.peer(i),
                Some(clients[usize::from(k)].local_addr().unwrap())
            );
            answers.push((vec![k + 100], i));
        }
        assert_eq!(rx.send(server.as_raw_fd(), &answers).unwrap(), 3);
        for (k, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 8];
            let (len, from) = c.recv_from(&mut buf).unwrap();
            assert_eq!(
                (&buf[..len], from),
                (&[k as u8 + 100][..], server.local_addr().unwrap())
            );
        }
        assert_eq!(
            rx.recv(server.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
