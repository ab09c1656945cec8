//! The TLS files of an etcd connection, read and checked once, before any connection: a file
//! that cannot serve is named with its flag, and so is a key that is not the certificate's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use crate::StoreError;

/// PEM files for a TLS connection to etcd (endpoints must then be `https://` or bare
/// `host:port`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed etcd's server certificate (`--etcd-ca`).
    pub ca: PathBuf,
    /// This host's client certificate, for an etcd that asks for one (its
    /// `--client-cert-auth`); `None`: server-only TLS.
    pub client: Option<ClientCert>,
}

/// A client certificate and its private key, in PEM files.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// `--etcd-cert`.
    pub cert: PathBuf,
    /// `--etcd-key`.
    pub key: PathBuf,
}

/// The checked TLS settings: tonic's for the connections, and the same as a rustls config for
/// the diagnosis of failed ones (see `diagnose`).
pub(crate) struct Tls {
    pub files: TlsFiles,
    pub tonic: tonic::transport::ClientTlsConfig,
    pub rustls: Arc<ClientConfig>,
}

fn unusable(flag: &str, path: &Path, why: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{flag} {}: {why}", path.display()))
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| unusable(flag, path, format_args!("cannot read it ({e})")))
}

fn certificates(
    flag: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| unusable(flag, path, format_args!("not PEM ({e})")))?;
    if certs.is_empty() {
        return Err(unusable(
            flag,
            path,
            "holds no PEM certificate; give a file with a -----BEGIN CERTIFICATE----- block",
        ));
    }
    Ok(certs)
}

impl Tls {
    pub(crate) fn load(files: TlsFiles) -> Result<Tls, StoreError> {
        let ca_pem = read("--etcd-ca", &files.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in certificates("--etcd-ca", &files.ca, &ca_pem)? {
            roots.add(cert).map_err(|e| {
                unusable(
                    "--etcd-ca",
                    &files.ca,
                    format_args!("not a CA certificate rustls can use ({e})"),
                )
            })?;
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| StoreError::Backend(format!("TLS setup: {e}")))?
                .with_root_certificates(roots);
        let mut tonic = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
            // etcd speaks gRPC, always HTTP/2, also if it does not say so in ALPN.
            .assume_http2(true);
        let mut config = match &files.client {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let cert_pem = read("--etcd-cert", &client.cert)?;
                let key_pem = read("--etcd-key", &client.key)?;
                let chain = certificates("--etcd-cert", &client.cert, &cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                    unusable(
                        "--etcd-key",
                        &client.key,
                        "holds no PEM private key; give the file with the key of --etcd-cert",
                    )
                })?;
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| match e {
                        rustls::Error::InconsistentKeys(_) => StoreError::Backend(format!(
                            "--etcd-key {} is not the key of --etcd-cert {}: give the private \
                             key that was made with that certificate",
                            client.key.display(),
                            client.cert.display()
                        )),
                        e => unusable(
                            "--etcd-key",
                            &client.key,
                            format_args!("cannot sign for --etcd-cert ({e})"),
                        ),
                    })?;
                tonic = tonic.identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
                config
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Tls {
            files,
            tonic,
            rustls: Arc::new(config),
        })
    }
}
