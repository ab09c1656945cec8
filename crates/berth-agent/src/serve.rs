//! Serving the API and the Docker plugin on their unix sockets: who may use them (the peer's
//! credentials, `SO_PEERCRED`), how many clients at once, and how long a client may take
//! (docs/api.md, "Connections").
//!
//! Each socket serves at most its cap of connections, well below the open-files limit, so the
//! daemon's own work (netlink, nftables, the store, DNS) always has descriptors left. A client
//! past the cap takes the place of the oldest connection that is not being answered (idle, or
//! still sending its request): connections that hold on to a slot without asking anything
//! cannot lock others out, and a request being answered is never cut.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use berth_api::MAX_BODY;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

/// Connections the API serves at once. Every client (the CLI, `berth-cni`, scripts) holds one
/// while it waits for an answer; a host starting a thousand containers at once is well under.
pub const API_MAX_CONNECTIONS: usize = 1024;
/// Connections the Docker plugin serves at once: the engine's calls, which the plugin
/// answers one at a time anyway.
pub const DOCKER_MAX_CONNECTIONS: usize = 256;
/// How long a client may take: to send a complete request head after connecting or after its
/// previous answer (so also how long a kept-alive connection may stay idle), to send the body
/// after the head, and to go on reading its answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The caps of the API and of the Docker plugin under an open-files limit: at most half of
/// the descriptors go to clients (three quarters of those to the API), the rest stays for the
/// daemon's own work.
pub fn connection_caps(open_files: u64) -> (usize, usize) {
    let for_clients = usize::try_from(open_files / 2).unwrap_or(usize::MAX);
    (
        API_MAX_CONNECTIONS.min(for_clients / 4 * 3).max(1),
        DOCKER_MAX_CONNECTIONS.min(for_clients / 4).max(1),
    )
}

/// Who may use a socket: root, and the members of one group if given.
#[derive(Debug, Clone)]
pub struct Access {
    /// The group's id and name.
    pub group: Option<(u32, String)>,
}

impl Access {
    /// Why the peer of `stream` may not use the socket; `None` if it may. The peer's
    /// credentials are those it connected with, whatever the socket file's mode.
    fn refusal(&self, stream: &UnixStream, what: &str) -> Option<String> {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => return Some(format!("cannot read the client's credentials: {e}")),
        };
        if cred.uid() == 0 {
            return None;
        }
        let who = match &self.group {
            Some((gid, name)) => {
                if cred.gid() == *gid || peer_groups(stream).is_ok_and(|g| g.contains(gid)) {
                    return None;
                }
                format!("root and members of group {name}")
            }
            None => "root".to_string(),
        };
        Some(format!(
            "permission denied: uid {} may not use {what}; only {who} may",
            cred.uid()
        ))
    }
}

/// The peer's supplementary groups as it connected (`SO_PEERGROUPS`, Linux 4.13).
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * GID).map_err(io::Error::other)?;
        // SAFETY: `groups` is valid for writes of `len` bytes, and `len` is a valid socklen_t
        // the kernel updates; the descriptor is borrowed from `stream` for the call.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize / GID;
        if r == 0 {
            groups.truncate(len);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && len > groups.len() {
            groups.resize(len, 0);
            continue;
        }
        return Err(e);
    }
}

/// How a socket's own refusals (403, 408) are shaped: as the rest of its answers.
#[derive(Debug, Clone, Copy)]
pub enum Dialect {
    /// `{"error": ...}` (docs/api.md).
    Api,
    /// `{"Err": ...}`, as Docker's plugin protocol has it.
    DockerPlugin,
}

/// One socket to serve.
#[derive(Debug, Clone)]
pub struct Socket {
    /// What it is, for messages: "the berth API".
    pub what: &'static str,
    pub dialect: Dialect,
    pub access: Access,
    pub max_connections: usize,
    pub client_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` turns true; then stops accepting, lets the
/// requests being answered finish and closes every connection.
pub async fn serve(
    listener: UnixListener,
    router: Router,
    socket: Socket,
    mut shutdown: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    let slots = Arc::new(Slots::new(socket.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    'accepting: loop {
        while connections.try_join_next().is_some() {}
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (or another passing failure): the clients wait in the
                    // backlog a moment rather than the loop spinning.
                    tracing::warn!(socket = socket.what, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let slot = loop {
            let room = slots.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if let Some(slot) = slots.admit() {
                break slot;
            }
            // Full: this one waits for an idle connection to close for it, or for one being
            // answered to finish.
            tokio::select! {
                _ = room => {}
                _ = stopped(&mut shutdown) => break 'accepting,
            }
        };
        connections.spawn(connection(
            stream,
            router.clone(),
            socket.clone(),
            slots.clone(),
            slot,
            shutdown.clone(),
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Returns once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The connections of one socket, oldest first.
struct Slots {
    max: usize,
    open: Mutex<Open>,
    /// Raised when a connection ends or finishes an answer: there may be room.
    room: Notify,
}

#[derive(Default)]
struct Open {
    next: u64,
    live: BTreeMap<u64, Arc<Slot>>,
    /// Connections told to close for a newcomer that have not closed yet: they still hold
    /// their descriptors, so they count against the cap until they are gone.
    closing: usize,
}

/// One connection's place.
struct Slot {
    id: u64,
    /// Requests being answered (taken in, answer not yet written whole).
    answering: AtomicUsize,
    /// Raised to close the connection at once: a newer client takes its place.
    evict: Notify,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max,
            open: Mutex::new(Open::default()),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection if there is room. Without room, the oldest connection
    /// not being answered is told to close (unless one is closing already), and the newcomer
    /// waits for [`Slots::room`]: at most `max` connections hold descriptors at any time.
    fn admit(&self) -> Option<Arc<Slot>> {
        let mut open = self.lock();
        if open.live.len() + open.closing >= self.max {
            if open.closing == 0
                && let Some(idle) = open
                    .live
                    .values()
                    .find(|s| s.answering.load(Ordering::Acquire) == 0)
                    .map(|s| s.id)
                && let Some(evicted) = open.live.remove(&idle)
            {
                open.closing += 1;
                evicted.evict.notify_one();
            }
            return None;
        }
        let slot = Arc::new(Slot {
            id: open.next,
            answering: AtomicUsize::new(0),
            evict: Notify::new(),
        });
        open.next += 1;
        open.live.insert(slot.id, slot.clone());
        Some(slot)
    }

    /// The connection `id` is closed.
    fn release(&self, id: u64) {
        {
            let mut open = self.lock();
            if open.live.remove(&id).is_none() {
                open.closing -= 1;
            }
        }
        self.room.notify_waiters();
    }
}

async fn connection(
    stream: UnixStream,
    router: Router,
    socket: Arc<Socket>,
    slots: Arc<Slots>,
    slot: Arc<Slot>,
    mut shutdown: watch::Receiver<bool>,
) {
    let refusal = socket.access.refusal(&stream, socket.what);
    if let Some(why) = &refusal {
        tracing::info!(socket = socket.what, "refused a client: {why}");
    }
    let io = TokioIo::new(WriteDeadline::new(stream, socket.client_timeout));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(socket.client_timeout);
    let service = {
        let (socket, slots, slot) = (socket.clone(), slots.clone(), slot.clone());
        service_fn(move |req| {
            let (router, socket, slots, slot) =
                (router.clone(), socket.clone(), slots.clone(), slot.clone());
            let refusal = refusal.clone();
            async move {
                Ok::<_, Infallible>(match refusal {
                    Some(why) => refuse(socket.dialect, StatusCode::FORBIDDEN, why),
                    None => answer(req, router, &socket, slots, slot).await,
                })
            }
        })
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(socket = socket.what, error = %e, "connection ended");
                }
                break;
            }
            _ = slot.evict.notified() => {
                tracing::debug!(socket = socket.what, "idle connection closed for a new client");
                break;
            }
            _ = stopped(&mut shutdown), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    slots.release(slot.id);
}

/// Answers one request: its body is read within the client timeout (no more than
/// [`MAX_BODY`] and the frame that passes it, for the router to refuse with its 413), then the router answers it with the
/// connection marked busy until the answer is written.
async fn answer(
    req: Request<Incoming>,
    router: Router,
    socket: &Socket,
    slots: Arc<Slots>,
    slot: Arc<Slot>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(socket.client_timeout, read_body(body)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            return refuse(
                socket.dialect,
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            );
        }
        Err(_) => {
            return refuse(
                socket.dialect,
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    socket.client_timeout.as_secs_f64()
                ),
            );
        }
    };
    let Some(busy) = Busy::enter(slots, slot) else {
        // Closed for a newer client while it sent its body: the connection is going.
        return refuse(
            socket.dialect,
            StatusCode::SERVICE_UNAVAILABLE,
            "closed for a newer client; try again".into(),
        );
    };
    let resp = match router
        .oneshot(Request::from_parts(parts, Body::from(body)))
        .await
    {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    resp.map(|body| Body::new(Answering { body, _busy: busy }))
}

async fn read_body(mut body: Incoming) -> Result<Bytes, hyper::Error> {
    let mut read = Vec::new();
    while read.len() <= MAX_BODY {
        match body.frame().await {
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    read.extend_from_slice(&data);
                }
            }
            None => break,
        }
    }
    Ok(Bytes::from(read))
}

/// An answer of the socket's own, after which the connection is closed.
fn refuse(dialect: Dialect, status: StatusCode, error: String) -> Response<Body> {
    let body = match dialect {
        Dialect::Api => serde_json::json!({ "error": error }),
        Dialect::DockerPlugin => serde_json::json!({ "Err": error }),
    };
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Marks a connection as answering a request for as long as it lives.
struct Busy {
    slots: Arc<Slots>,
    slot: Arc<Slot>,
}

impl Busy {
    /// `None` if the connection was already closed for a newer client. Decided under the
    /// lock [`Slots::admit`] chooses under: a request is never cut once it is answered.
    fn enter(slots: Arc<Slots>, slot: Arc<Slot>) -> Option<Busy> {
        {
            if !slots.lock().live.contains_key(&slot.id) {
                return None;
            }
            slot.answering.fetch_add(1, Ordering::AcqRel);
        }
        Some(Busy { slots, slot })
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slot.answering.fetch_sub(1, Ordering::AcqRel);
        self.slots.room.notify_waiters();
    }
}

/// An answer's body, which keeps its connection busy until it is written whole (hyper drops
/// it then) or the connection goes.
struct Answering {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Answering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A client connection whose writes fail once the client has not read for the timeout: a
/// client that asks and never reads its answer does not hold the connection forever.
struct WriteDeadline {
    stream: UnixStream,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(stream: UnixStream, timeout: Duration) -> WriteDeadline {
        WriteDeadline {
            stream,
            timeout,
            stalled: None,
        }
    }

    /// A write's outcome, with the deadline armed while it waits and cleared once it moves.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read its answer",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_leave_half_the_descriptors_to_the_daemon() {
        assert_eq!(connection_caps(1_048_576), (1024, 256));
        assert_eq!(connection_caps(20_000), (1024, 256));
        assert_eq!(connection_caps(1024), (384, 128));
        assert_eq!(connection_caps(4), (1, 1));
    }

    #[test]
    fn a_full_socket_closes_its_oldest_idle_connection_for_a_new_one() {
        let slots = Arc::new(Slots::new(2));
        let live = |slots: &Slots| slots.lock().live.keys().copied().collect::<Vec<_>>();
        let (a, b) = (slots.admit().unwrap(), slots.admit().unwrap());
        let busy_a = Busy::enter(slots.clone(), a.clone()).expect("a is open");
        // `a` is being answered: `b`, the oldest idle one, is told to close, and the newcomer
        // waits until it has.
        assert!(slots.admit().is_none());
        let evicted = std::pin::pin!(b.evict.notified());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(evicted.poll(&mut cx).is_ready(), "b is told to close");
        assert!(slots.admit().is_none(), "one closes for one newcomer");
        assert!(
            Busy::enter(slots.clone(), b.clone()).is_none(),
            "b starts no answer"
        );
        slots.release(b.id);
        let c = slots.admit().expect("b is gone");
        assert_eq!(live(&slots), vec![a.id, c.id]);
        // Both being answered: no room until one finishes.
        let busy_c = Busy::enter(slots.clone(), c.clone()).expect("c is open");
        assert!(slots.admit().is_none());
        assert_eq!(live(&slots), vec![a.id, c.id], "nothing answered is closed");
        drop(busy_a);
        drop(busy_c);
        slots.release(c.id);
        assert!(slots.admit().is_some());
    }
}
