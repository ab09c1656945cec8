//! How the daemon reaches etcd: over TLS with a CA only or with a client certificate; what each
//! TLS mistake says, as the user sees it (`berth daemon`'s exit status and stderr); and what
//! the daemon's start, the CLI and the daemon's log say while etcd cannot be reached: one
//! sentence with the cause and what to check, never Rust's internals.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::cluster::{Cluster, EtcdTls, Options, UNDERLAY_GW};
use crate::harness::Host;

/// Text that gives away Rust's or a library's internals instead of a cause.
const INTERNALS: &[&str] = &[
    "tonic::",
    "Os {",
    "Error(",
    "transport error",
    "grpc request error",
    "h2 protocol",
    "kind:",
];

fn assert_plain(text: &str) {
    for bad in INTERNALS {
        assert!(!text.contains(bad), "{bad:?} in: {text}");
    }
}

/// A test CA that writes its certificate, and the certificates it issues, as PEM files.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("berth test {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `sans` (addresses or names) and its key: NAME.pem, NAME-key.pem.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// The certificates of a test: etcd's and a client's from one CA, and a client certificate
/// from another CA. Removed on drop.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    etcd: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    stranger: (PathBuf, PathBuf),
}

impl Pki {
    fn new() -> Pki {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "berth-e2e-pki-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new(&dir, "ca");
        let other = Ca::new(&dir, "other-ca");
        Pki {
            etcd: ca.issue(
                &dir,
                "etcd",
                &[UNDERLAY_GW],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: ca.issue(&dir, "client", &[], ExtendedKeyUsagePurpose::ClientAuth),
            stranger: other.issue(&dir, "stranger", &[], ExtendedKeyUsagePurpose::ClientAuth),
            ca: ca.pem,
            other_ca: other.pem,
            dir,
        }
    }

    /// etcd with TLS; with `client_auth`, it asks for client certificates from our CA, and
    /// the daemons present ours.
    fn etcd(&self, client_auth: bool) -> EtcdTls {
        EtcdTls {
            cert: self.etcd.0.clone(),
            key: self.etcd.1.clone(),
            ca: self.ca.clone(),
            client_ca: client_auth.then(|| self.ca.clone()),
            client: client_auth.then(|| self.client.clone()),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Starts `berth daemon` with `flags` on host `h`, which must fail: its one-line error (the
/// last line of its stderr), after checking that it has no internals in it.
fn daemon_fails(h: &Host, flags: &[String]) -> String {
    let mut child = h
        .daemon_command("state")
        .args(flags)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("berth daemon {flags:?} still runs after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert_eq!(status.code(), Some(1), "berth daemon {flags:?}: {stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("berth: error: "), "{flags:?}: {stderr}");
    assert_plain(&last);
    last
}

/// The flags that point a daemon at the cluster's etcd, without TLS.
fn store_flags(c: &Cluster) -> Vec<String> {
    [
        "--store".to_string(),
        c.etcd_endpoint(),
        "--etcd-prefix".into(),
        c.prefix.clone(),
        "--host-id".into(),
        "h1".into(),
    ]
    .into()
}

fn flags(base: &[String], more: &[&str]) -> Vec<String> {
    base.iter()
        .cloned()
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

#[test]
fn etcd_over_tls_with_a_ca_only_or_with_a_client_certificate() {
    let pki = Pki::new();
    for client_auth in [false, true] {
        let c = Cluster::with(
            1,
            Options {
                etcd_tls: Some(pki.etcd(client_auth)),
                ..Options::default()
            },
        );
        let h = c.host(1);
        let before = c.etcd_keys().lines().count();
        h.ok(&[
            "network",
            "create",
            "tls",
            "--driver",
            "overlay",
            "--subnet",
            "10.181.0.0/24",
        ]);
        assert!(
            c.etcd_keys().lines().count() > before,
            "client certificate {client_auth}: the network is not in etcd:\n{}",
            c.etcd_keys()
        );
        let status = h.ok(&["status"]);
        assert!(
            status.contains(&format!("https://{UNDERLAY_GW}:2379")),
            "{status}"
        );
    }
}

#[test]
fn etcd_tls_mistakes_name_their_cause_and_the_flag_to_fix() {
    let pki = Pki::new();
    let c = Cluster::with(
        1,
        Options {
            etcd_tls: Some(pki.etcd(true)),
            start_daemons: false,
            ..Options::default()
        },
    );
    let h = c.host(1);
    let store = store_flags(&c);
    let (ca, other_ca) = (p(&pki.ca), p(&pki.other_ca));
    let (cert, key) = (p(&pki.client.0), p(&pki.client.1));
    let (stranger, stranger_key) = (p(&pki.stranger.0), p(&pki.stranger.1));
    let https = format!("https://{UNDERLAY_GW}:2379");
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "no TLS flags",
            store.clone(),
            vec!["speaks TLS".into(), "give --etcd-ca".into()],
        ),
        (
            "CA only, and etcd asks for a client certificate",
            flags(&store, &["--etcd-ca", &ca]),
            vec![
                "etcd requires a client certificate".into(),
                "give --etcd-cert and --etcd-key".into(),
            ],
        ),
        (
            "another CA than etcd's",
            flags(
                &store,
                &[
                    "--etcd-ca",
                    &other_ca,
                    "--etcd-cert",
                    &cert,
                    "--etcd-key",
                    &key,
                ],
            ),
            vec![
                "etcd's certificate is not signed by the CA in --etcd-ca".into(),
                other_ca.clone(),
            ],
        ),
        (
            "a client certificate from another CA",
            flags(
                &store,
                &[
                    "--etcd-ca",
                    &ca,
                    "--etcd-cert",
                    &stranger,
                    "--etcd-key",
                    &stranger_key,
                ],
            ),
            vec![
                "etcd refused this host's client certificate --etcd-cert".into(),
                stranger.clone(),
                "signed by a CA that etcd trusts".into(),
            ],
        ),
        (
            "a key that is not the certificate's",
            flags(
                &store,
                &[
                    "--etcd-ca",
                    &ca,
                    "--etcd-cert",
                    &cert,
                    "--etcd-key",
                    &stranger_key,
                ],
            ),
            vec![format!(
                "--etcd-key {stranger_key} is not the key of --etcd-cert {cert}"
            )],
        ),
        (
            "a key file as the CA",
            flags(&store, &["--etcd-ca", &key]),
            vec![format!("--etcd-ca {key}: holds no PEM certificate")],
        ),
        (
            "a certificate without its key",
            flags(&store, &["--etcd-ca", &ca, "--etcd-cert", &cert]),
            vec!["--etcd-cert needs --etcd-key".into()],
        ),
        (
            "a key without its certificate",
            flags(&store, &["--etcd-ca", &ca, "--etcd-key", &key]),
            vec!["--etcd-key needs --etcd-cert".into()],
        ),
        (
            "a client certificate without a CA",
            flags(&store, &["--etcd-cert", &cert, "--etcd-key", &key]),
            vec!["need --etcd-ca".into()],
        ),
        (
            "an https:// store",
            vec![
                "--store".into(),
                https.clone(),
                "--etcd-ca".into(),
                ca.clone(),
                "--host-id".into(),
                "h1".into(),
            ],
            vec![format!(
                "write etcd://{UNDERLAY_GW}:2379 with --etcd-ca FILE"
            )],
        ),
        (
            "TLS flags with the embedded store",
            vec![
                "--etcd-ca".into(),
                ca.clone(),
                "--host-id".into(),
                "h1".into(),
            ],
            vec!["--etcd-ca applies only to --store etcd://".into()],
        ),
    ];
    for (what, flags, expected) in &cases {
        let err = daemon_fails(h, flags);
        for e in expected {
            assert!(err.contains(e.as_str()), "{what}: {e:?} not in: {err}");
        }
        eprintln!("{what}: {err}");
    }
    // The same host and etcd with the right flags.
    c.start(1);
    h.ok(&["network", "ls"]);
}

#[test]
fn etcd_out_of_reach_is_one_plain_sentence_with_the_cause() {
    let pki = Pki::new();
    let c = Cluster::bare(1);
    let h = c.host(1);
    let at = format!("{UNDERLAY_GW}:2379");

    // Before the daemon runs: TLS flags against a plain etcd, and no etcd to be reached.
    let err = daemon_fails(h, &flags(&store_flags(&c), &["--etcd-ca", &p(&pki.ca)]));
    assert!(err.contains("etcd there does not speak TLS"), "{err}");
    assert!(err.contains("without --etcd-ca"), "{err}");
    c.block_etcd(1);
    let err = daemon_fails(h, &c.daemon_flags(1));
    assert!(
        err.contains(&format!(
            "cannot connect to etcd at http://{at}: connection refused; check that etcd is \
             running and listens on {at}"
        )),
        "{err}"
    );
    c.unblock_etcd(1);

    // A running daemon cut off from etcd: refused at once, then frozen (no answer).
    c.start(1);
    h.ok(&[
        "network",
        "create",
        "a",
        "--driver",
        "overlay",
        "--subnet",
        "10.183.0.0/24",
    ]);
    c.block_etcd(1);
    let err = h.fails(&[
        "network",
        "create",
        "b",
        "--driver",
        "overlay",
        "--subnet",
        "10.184.0.0/24",
    ]);
    assert_plain(&err);
    assert!(
        err.contains(&format!("etcd at http://{at}: connection refused")),
        "{err}"
    );
    assert!(err.contains("check that etcd is running"), "{err}");
    // The daemon's own attempt meanwhile (it renews its 3 s lease every second) is logged.
    h.eventually("the daemon logs its refused lease renewal", || {
        h.log()
            .lines()
            .any(|l| l.contains("cannot renew the host lease") && l.contains("connection refused"))
    });
    c.unblock_etcd(1);
    c.etcd_stop();
    let err = h.fails(&[
        "network",
        "create",
        "c",
        "--driver",
        "overlay",
        "--subnet",
        "10.185.0.0/24",
    ]);
    c.etcd_cont();
    assert_plain(&err);
    assert!(
        err.contains(&format!(
            "etcd at http://{at}: no answer within 2s; check that etcd is running"
        )),
        "{err}"
    );
    // Back, and what the daemon logged meanwhile is as plain.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !h
        .berth(&[
            "network",
            "create",
            "d",
            "--driver",
            "overlay",
            "--subnet",
            "10.186.0.0/24",
        ])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "no recovery:\n{}", h.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = h.log();
    let told: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    for line in told {
        assert_plain(line);
    }
}
