//! Why etcd cannot be used, in words a person can act on.
//!
//! When a request fails below gRPC (no connection, a TLS handshake that fails, a connection
//! closed at once), [`probe`] connects to the endpoint the way the client does, one step at a
//! time (name, TCP, TLS, HTTP/2), and names the first step that fails. tonic wraps these causes
//! in layers of transport errors whose text means nothing to a person and loses what matters
//! (which TLS alert, which certificate check): a probe asks the network directly instead.

use std::error::Error as _;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme,
};

use super::tls::Tls;

/// One etcd endpoint.
#[derive(Debug)]
pub(crate) struct Target {
    /// As the user gave it, with its scheme (`https://10.0.0.1:2379`).
    pub url: String,
    /// The host name or address (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
}

/// Why an endpoint cannot be used.
#[derive(Debug)]
pub(crate) enum Cause {
    NameNotFound {
        host: String,
        why: String,
    },
    Refused,
    NoAnswer(Duration),
    Unreachable(String),
    /// Closed or reset by the other end, with nothing more known.
    Closed(String),
    ServerNotTrusted {
        ca: PathBuf,
    },
    WrongName {
        host: String,
    },
    ServerCertExpired,
    ServerCertNotYetValid,
    ServerCertUnusable(String),
    ClientCertRefused {
        cert: PathBuf,
        alert: String,
    },
    ClientCertRequired,
    /// TLS was not configured, and the endpoint speaks TLS.
    ExpectsTls,
    /// TLS was configured, and the endpoint speaks plain HTTP/2.
    NotTls,
    Handshake(String),
    /// An error status without a transport failure behind it: etcd's own ("etcdserver: no
    /// leader"), or a stream that ended without one.
    Status(String),
    Other(String),
}

impl Cause {
    /// The cause and what to check, e.g. "connection refused; check that etcd is running and
    /// listens on 10.0.0.1:2379". `at` is the endpoint's host:port.
    pub(crate) fn explain(&self, at: &str) -> String {
        match self {
            Cause::NameNotFound { host, why } => format!(
                "the host name {host} cannot be resolved ({why}); check the name in --store and \
                 this host's DNS settings"
            ),
            Cause::Refused => {
                format!("connection refused; check that etcd is running and listens on {at}")
            }
            Cause::NoAnswer(after) => format!(
                "no answer within {}; check that etcd is running (not stopped or overloaded) \
                 and that this host can reach {at}",
                seconds(*after)
            ),
            Cause::Unreachable(why) => {
                format!("{why}; check this host's routes and firewall towards {at}")
            }
            Cause::Closed(how) => format!(
                "{how}; check that etcd is running and that no firewall or proxy between this \
                 host and {at} cuts the connection"
            ),
            Cause::ServerNotTrusted { ca } => format!(
                "the TLS handshake failed because etcd's certificate is not signed by the CA in \
                 --etcd-ca {}; give --etcd-ca the CA that issued etcd's certificate (etcd's \
                 --cert-file)",
                ca.display()
            ),
            Cause::WrongName { host } => format!(
                "the TLS handshake failed because etcd's certificate is not valid for {host}; \
                 use in --store a name or address that etcd's certificate lists, or reissue \
                 the certificate for {host}"
            ),
            Cause::ServerCertExpired => "the TLS handshake failed because etcd's certificate \
                                         has expired; renew it, or check this host's clock"
                .into(),
            Cause::ServerCertNotYetValid => "the TLS handshake failed because etcd's \
                                             certificate is not valid yet; check this host's \
                                             clock"
                .into(),
            Cause::ServerCertUnusable(why) => format!(
                "the TLS handshake failed because etcd's certificate cannot be used ({why}); \
                 check etcd's --cert-file"
            ),
            Cause::ClientCertRefused { cert, alert } => format!(
                "the TLS handshake failed because etcd refused this host's client certificate \
                 --etcd-cert {} ({alert}); give a certificate signed by a CA that etcd trusts \
                 (etcd's --trusted-ca-file)",
                cert.display()
            ),
            Cause::ClientCertRequired => "the TLS handshake failed because etcd requires a \
                                          client certificate; give --etcd-cert and --etcd-key"
                .into(),
            Cause::ExpectsTls => "etcd there speaks TLS and berth was started without it; \
                                  give --etcd-ca (the CA of etcd's certificate), and --etcd-cert \
                                  with --etcd-key if etcd asks for client certificates"
                .into(),
            Cause::NotTls => "etcd there does not speak TLS; start berth without --etcd-ca, \
                              --etcd-cert and --etcd-key, or give etcd a certificate (its \
                              --cert-file and --key-file)"
                .into(),
            Cause::Handshake(why) => format!(
                "the TLS handshake failed ({why}); check that --etcd-ca, --etcd-cert and \
                 --etcd-key match etcd's TLS settings"
            ),
            Cause::Status(message) => {
                format!("{message}; check etcd's health (etcdctl endpoint health) and its log")
            }
            Cause::Other(why) => format!("{why}; check that etcd is running and reachable at {at}"),
        }
    }
}

/// The client's HTTP/2 connection preface and an empty SETTINGS frame: an HTTP/2 server
/// answers it with a SETTINGS frame of its own.
const HTTP2_PREFACE: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Whether `target` can be used with these TLS settings (`None`: plain); `None` if every step
/// works. The caller bounds it in time.
pub(crate) async fn probe(target: &Target, tls: Option<&Tls>) -> Option<Cause> {
    let tcp = match connect(target).await {
        Ok(tcp) => tcp,
        Err(cause) => return Some(cause),
    };
    match tls {
        None => match http2_answer(tcp).await {
            Answer::Http2 => None,
            Answer::Tls => Some(Cause::ExpectsTls),
            Answer::Other => Some(not_etcd()),
            Answer::Nothing(how) => match speaks_tls(target).await {
                Some(true) => Some(Cause::ExpectsTls),
                _ => Some(Cause::Closed(how)),
            },
        },
        Some(tls) => probe_tls(target, tcp, tls).await,
    }
}

async fn connect(target: &Target) -> Result<TcpStream, Cause> {
    let addrs: Vec<_> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| {
            let why = e.to_string();
            Cause::NameNotFound {
                host: target.host.clone(),
                why: why
                    .strip_prefix("failed to lookup address information: ")
                    .unwrap_or(&why)
                    .to_string(),
            }
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => io_cause(&e),
        None => Cause::NameNotFound {
            host: target.host.clone(),
            why: "no address".into(),
        },
    })
}

/// A failed socket operation as a cause.
fn io_cause(e: &io::Error) -> Cause {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Cause::Refused,
        K::HostUnreachable => Cause::Unreachable("no route to the host".into()),
        K::NetworkUnreachable => Cause::Unreachable("the network is unreachable".into()),
        _ => match io_words(e) {
            Some(words) => Cause::Closed(words.into()),
            None => Cause::Other(e.to_string()),
        },
    }
}

/// Plain words for the ways a connection ends.
fn io_words(e: &io::Error) -> Option<&'static str> {
    use io::ErrorKind as K;
    Some(match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "the connection was reset",
        K::ConnectionAborted => "the connection was aborted",
        K::BrokenPipe | K::UnexpectedEof => "the connection was closed",
        K::TimedOut => "the connection timed out",
        K::HostUnreachable => "no route to the host",
        K::NetworkUnreachable => "the network is unreachable",
        K::NotConnected => "not connected",
        _ => return None,
    })
}

enum Answer {
    Http2,
    /// A TLS record (an alert, as a TLS server sends to a client that does not speak TLS).
    Tls,
    /// Something else: not etcd's client port.
    Other,
    /// The connection ended without an answer.
    Nothing(String),
}

/// Reads until `buf` is full or the stream ends; how much it read, or the error that ended it
/// before anything came.
async fn read_up_to(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match stream.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if n == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(n)
}

/// What a plain connection answers to an HTTP/2 preface.
async fn http2_answer(mut tcp: TcpStream) -> Answer {
    let _ = tcp.write_all(HTTP2_PREFACE).await;
    let mut first = [0u8; 9];
    match read_up_to(&mut tcp, &mut first).await {
        // A frame header: 3 bytes of length, then the type (4: SETTINGS).
        Ok(9) if first[3] == 4 => Answer::Http2,
        // A TLS record header: content type (21: alert, 22: handshake), then version 3.x.
        Ok(n) if n >= 2 && matches!(first[0], 21 | 22) && first[1] == 3 => Answer::Tls,
        Ok(0) => Answer::Nothing("the connection was closed at once".into()),
        Ok(_) => Answer::Other,
        Err(e) => Answer::Nothing(io_words(&e).unwrap_or("the connection failed").into()),
    }
}

fn not_etcd() -> Cause {
    Cause::Other("what answers there does not speak HTTP/2, so it is not etcd".into())
}

/// "2s", "0.5s".
fn seconds(d: Duration) -> String {
    match d.subsec_millis() {
        0 => format!("{}s", d.as_secs()),
        _ => format!("{:.1}s", d.as_secs_f64()),
    }
}

/// Whether the endpoint answers a TLS handshake (whatever its certificate); `None`: unknown.
async fn speaks_tls(target: &Target) -> Option<bool> {
    let tcp = connect(target).await.ok()?;
    let seen = Arc::new(SeesCertificate(AtomicBool::new(false)));
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(seen.clone())
            .with_no_client_auth();
    let name = ServerName::try_from(target.host.clone()).ok()?;
    let _ = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    Some(seen.0.load(Ordering::Relaxed))
}

/// A verifier that notes that a server presented a certificate and refuses it: the probe for
/// "does this endpoint speak TLS at all", which trusts nothing and sends nothing.
#[derive(Debug)]
struct SeesCertificate(AtomicBool);

impl ServerCertVerifier for SeesCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.store(true, Ordering::Relaxed);
        Err(rustls::Error::General("probe only".into()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("probe only".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("probe only".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls error inside an I/O error of tokio-rustls, if that is what it is.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

async fn probe_tls(target: &Target, tcp: TcpStream, tls: &Tls) -> Option<Cause> {
    let Ok(name) = ServerName::try_from(target.host.clone()) else {
        return Some(Cause::Other(format!(
            "{} is not a valid TLS server name",
            target.host
        )));
    };
    let mut stream = match TlsConnector::from(tls.rustls.clone())
        .connect(name, tcp)
        .await
    {
        Ok(stream) => stream,
        Err(e) => {
            return Some(match rustls_error(&e) {
                Some(rustls::Error::InvalidCertificate(c)) => certificate_cause(c, target, tls),
                Some(rustls::Error::AlertReceived(alert)) => alert_cause(*alert, tls),
                Some(
                    rustls::Error::InvalidMessage(_)
                    | rustls::Error::InappropriateMessage { .. }
                    | rustls::Error::InappropriateHandshakeMessage { .. },
                ) => not_tls_or(target, "etcd's answer is not TLS").await,
                Some(other) => Cause::Handshake(other.to_string()),
                // A server that does not speak TLS closes or resets the connection.
                None => {
                    let how = io_words(&e).map_or_else(|| e.to_string(), Into::into);
                    not_tls_or(target, &how).await
                }
            });
        }
    };
    // TLS 1.3 ends the client's part of the handshake before the server has checked the
    // client's certificate: a refusal comes as the first thing read.
    let _ = stream.write_all(HTTP2_PREFACE).await;
    let _ = stream.flush().await;
    let mut first = [0u8; 9];
    match stream.read(&mut first).await {
        Ok(n) if n > 0 => None,
        Ok(_) => Some(closed_after_handshake(tls, "it closed the connection")),
        Err(e) => Some(match rustls_error(&e) {
            Some(rustls::Error::AlertReceived(alert)) => alert_cause(*alert, tls),
            Some(other) => Cause::Handshake(other.to_string()),
            None => closed_after_handshake(tls, io_words(&e).unwrap_or("the connection failed")),
        }),
    }
}

/// A handshake that failed on something that is not TLS: plain HTTP/2 there means the
/// endpoint has no TLS at all.
async fn not_tls_or(target: &Target, why: &str) -> Cause {
    if let Ok(tcp) = connect(target).await
        && let Answer::Http2 = http2_answer(tcp).await
    {
        return Cause::NotTls;
    }
    Cause::Handshake(why.into())
}

/// etcd ended the connection right after a handshake that worked on this side: it refused
/// (or missed) the client certificate.
fn closed_after_handshake(tls: &Tls, how: &str) -> Cause {
    match &tls.files.client {
        Some(client) => Cause::ClientCertRefused {
            cert: client.cert.clone(),
            alert: format!("{how} after the handshake"),
        },
        None => Cause::ClientCertRequired,
    }
}

fn certificate_cause(e: &CertificateError, target: &Target, tls: &Tls) -> Cause {
    use CertificateError as C;
    match e {
        C::UnknownIssuer | C::BadSignature => Cause::ServerNotTrusted {
            ca: tls.files.ca.clone(),
        },
        C::NotValidForName | C::NotValidForNameContext { .. } => Cause::WrongName {
            host: target.host.clone(),
        },
        C::Expired | C::ExpiredContext { .. } => Cause::ServerCertExpired,
        C::NotValidYet | C::NotValidYetContext { .. } => Cause::ServerCertNotYetValid,
        other => Cause::ServerCertUnusable(words(&format!("{other:?}"))),
    }
}

/// A TLS alert from etcd during or right after the handshake.
fn alert_cause(alert: AlertDescription, tls: &Tls) -> Cause {
    use AlertDescription as A;
    match (alert, &tls.files.client) {
        (A::CertificateRequired, _) | (A::BadCertificate, None) => Cause::ClientCertRequired,
        (
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::DecryptError,
            Some(client),
        ) => Cause::ClientCertRefused {
            cert: client.cert.clone(),
            alert: format!("its TLS alert: {}", words(&format!("{alert:?}"))),
        },
        (alert, _) => Cause::Handshake(format!(
            "etcd sent the TLS alert {}",
            words(&format!("{alert:?}"))
        )),
    }
}

/// "UnknownCA" as "unknown CA", "BadCertificate" as "bad certificate".
fn words(camel: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = camel.chars().take_while(|c| c.is_alphanumeric()).collect();
    for (i, c) in chars.iter().enumerate() {
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
        let prev_lower = i > 0 && chars[i - 1].is_lowercase();
        if i > 0 && c.is_uppercase() && (prev_lower || next_lower) {
            out.push(' ');
        }
        if c.is_uppercase() && next_lower {
            out.extend(c.to_lowercase());
        } else {
            out.push(*c);
        }
    }
    out
}

/// The I/O error at the root of a failure tonic reported, and the TLS error inside it.
fn root_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        source = e.source();
    }
    None
}

/// A failure tonic reported, as a cause (for when a probe found nothing to blame).
pub(crate) fn transport_cause(e: &(dyn std::error::Error + 'static)) -> Cause {
    match root_io(e) {
        Some(io) => match rustls_error(io) {
            Some(tls) => Cause::Handshake(tls.to_string()),
            None => io_cause(io),
        },
        None => Cause::Other("the connection failed".into()),
    }
}

/// A failure tonic reported, in words.
pub(crate) fn transport_words(e: &(dyn std::error::Error + 'static)) -> String {
    match root_io(e) {
        Some(io) => match rustls_error(io) {
            Some(tls) => format!("the TLS connection failed ({tls})"),
            None => io_words(io).map_or_else(|| io.to_string(), Into::into),
        },
        None => "the connection failed".into(),
    }
}

/// A gRPC status in words: its message (etcd's, or tonic's for a stream that ended without
/// one), or the transport failure behind it.
pub(crate) fn status_words(status: &tonic::Status) -> String {
    match (status.source(), status.message()) {
        (Some(source), _) => transport_words(source),
        (None, "") => status.code().description().into(),
        (None, message) => message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_becomes_words() {
        assert_eq!(words("UnknownCA"), "unknown CA");
        assert_eq!(words("BadCertificate"), "bad certificate");
        assert_eq!(words("CertificateRequired"), "certificate required");
        assert_eq!(
            words("InvalidPurposeContext { .. }"),
            "invalid purpose context"
        );
    }
}
