use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ErrorBody, MAX_BODY};

/// Why a call failed. Each message says its cause once: the I/O error is part of the message,
/// not also a `source()`, so a printer that walks the chain does not repeat it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the berth daemon at {socket}: {cause} (is `berth daemon` running?)")]
    Unreachable {
        socket: String,
        cause: std::io::Error,
    },
    /// The socket (or its directory) is not this user's to use.
    #[error(
        "permission denied on the berth daemon's socket {socket}: only root, and the members of \
         the daemon's --socket-group if it has one, may use it"
    )]
    Denied { socket: String },
    /// The daemon took the request and closed the connection without a whole answer: it
    /// stopped or died meanwhile. The request may or may not have taken effect.
    #[error("the daemon closed the connection before answering (at {socket})")]
    Closed { socket: String },
    #[error("the berth daemon at {socket} did not answer within {} s", timeout.as_secs())]
    TimedOut { socket: String, timeout: Duration },
    /// The request is over the daemon's body limit: it would be refused, so it is not sent.
    #[error("request body too large: {size} bytes, the daemon takes at most {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api { status: u16, message: String },
    #[error("bad answer from the berth daemon: {0}")]
    Protocol(String),
}

/// A client of one daemon's API socket. Each call is one short HTTP/1.1 exchange.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    /// Bounds how long a call may wait for the daemon.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call("POST", path, Some(body))
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call("PUT", path, Some(body))
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("DELETE", path, None::<&()>)
    }

    pub fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        if body.len() > MAX_BODY {
            return Err(ClientError::TooLarge {
                size: body.len(),
                limit: MAX_BODY,
            });
        }
        let unreachable = |cause| ClientError::Unreachable {
            socket: self.socket.display().to_string(),
            cause,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::Denied {
                socket: self.socket.display().to_string(),
            },
            _ => unreachable(e),
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        // Once connected, a failure is the daemon going away or not answering.
        let lost = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::TimedOut {
                    socket: self.socket.display().to_string(),
                    timeout: self.timeout,
                }
            }
            std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof => self.closed(),
            _ => unreachable(e),
        };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\nAccept: application/json\r\n"
        )
        .into_bytes();
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    body.len()
                )
                .as_bytes(),
            );
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(&body);
        if let Err(e) = stream.write_all(&req) {
            // The daemon may answer a request before reading all of it (a body it refuses)
            // and close the connection: that answer is still there to be read.
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Err(lost(e));
            }
        }
        let raw = read_answer(&mut stream).map_err(lost)?;
        let (status, payload) = parse_response(&raw).map_err(|e| match e {
            Parse::Truncated => self.closed(),
            Parse::Bad(what) => ClientError::Protocol(what.into()),
        })?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&payload).map_err(|e| {
                ClientError::Protocol(format!("{e} in {}", String::from_utf8_lossy(&payload)))
            })
        } else {
            let message = serde_json::from_slice::<ErrorBody>(&payload)
                .map(|b| b.error)
                .unwrap_or_else(|_| {
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&payload))
                });
            Err(ClientError::Api { status, message })
        }
    }

    fn closed(&self) -> ClientError {
        ClientError::Closed {
            socket: self.socket.display().to_string(),
        }
    }
}

/// Everything the daemon sent until it closed the connection. A reset (the daemon closed it
/// with some of the request unread) ends the answer as a close does: what arrived before it
/// is kept, and judged whole or not by [`parse_response`].
fn read_answer(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(raw),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Why a response could not be read: it ended early (the connection closed), or it is not
/// HTTP as berth's daemon speaks it.
#[derive(Debug, PartialEq, Eq)]
enum Parse {
    Truncated,
    Bad(&'static str),
}

/// Splits an HTTP/1.1 response into status and body (`Content-Length`, chunked, or to EOF).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), Parse> {
    let bad = Parse::Bad;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(Parse::Truncated)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            length = v.trim().parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding")
            && v.trim().eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut r = rest;
        loop {
            let nl = r
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or(Parse::Truncated)?;
            let size = std::str::from_utf8(&r[..nl])
                .ok()
                .and_then(|s| {
                    usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .ok_or_else(|| bad("bad chunk size"))?;
            r = &r[nl + 2..];
            if size == 0 {
                break;
            }
            if r.len() < size {
                return Err(Parse::Truncated);
            }
            out.extend_from_slice(&r[..size]);
            r = r.get(size + 2..).unwrap_or(&[]);
        }
        out
    } else if let Some(n) = length {
        rest.get(..n).ok_or(Parse::Truncated)?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r).unwrap(), (201, b"{}".to_vec()));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), (200, b"abcde".to_vec()));
        assert_eq!(parse_response(b""), Err(Parse::Truncated));
        assert_eq!(parse_response(b"HTTP/1.1 200 O"), Err(Parse::Truncated));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}"),
            Err(Parse::Truncated)
        );
        assert_eq!(
            parse_response(b"garbage\r\n\r\n"),
            Err(Parse::Bad("no status line"))
        );
    }

    /// A one-shot server on a fresh socket that reads the request and then does `answer`.
    fn serve(answer: impl FnOnce(UnixStream) + Send + 'static) -> (Client, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "berth-client-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            answer(s);
        });
        (Client::new(&sock).with_timeout(Duration::from_secs(5)), dir)
    }

    #[test]
    fn a_daemon_that_closes_the_connection_says_so() {
        for answer in [
            (|s: UnixStream| drop(s)) as fn(UnixStream),
            |mut s| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le");
            },
            |mut s| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}");
            },
        ] {
            let (c, dir) = serve(answer);
            let err = c.get::<serde_json::Value>("/v1/status").unwrap_err();
            assert!(matches!(err, ClientError::Closed { .. }), "{err}");
            assert!(
                err.to_string()
                    .starts_with("the daemon closed the connection"),
                "{err}"
            );
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// A daemon that refuses a body before reading it all answers and closes: the answer is
    /// the error, not "the daemon closed the connection".
    #[test]
    fn an_answer_to_a_request_cut_short_is_read() {
        let (c, dir) = serve(|mut s| {
            let body = br#"{"error":"request body too large: at most 2097152 bytes"}"#;
            let head = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(body);
        });
        let big = serde_json::Value::String("x".repeat(1 << 20));
        match c.post::<_, serde_json::Value>("/v1/networks", &big) {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, 413);
                assert!(message.contains("too large"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A body the daemon would refuse is not sent.
    #[test]
    fn a_body_over_the_limit_is_refused_before_it_is_sent() {
        let big = serde_json::Value::String("x".repeat(MAX_BODY));
        let err = Client::new("/nonexistent/berth.sock")
            .post::<_, serde_json::Value>("/v1/networks", &big)
            .unwrap_err();
        assert!(
            matches!(err, ClientError::TooLarge { size, limit: MAX_BODY } if size == MAX_BODY + 2),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "request body too large: 2097154 bytes, the daemon takes at most 2097152"
        );
    }

    #[test]
    fn an_unreachable_daemon_names_the_cause_once() {
        let err = Client::new("/nonexistent/berth.sock")
            .get::<serde_json::Value>("/v1/status")
            .unwrap_err();
        let text = err.to_string();
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
        assert!(std::error::Error::source(&err).is_none(), "{text}");
        assert!(text.contains("is `berth daemon` running?"), "{text}");
    }
}
