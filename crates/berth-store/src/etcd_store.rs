//! The multi-host backend: etcd v3 (tested against 3.4) through `etcd-client`.
//!
//! Every key is stored under a fixed prefix (e.g. "/berth/") so several clusters or tools can
//! share one etcd; the prefix is added on the way in and stripped on the way out. Every call has
//! a deadline of [`REQUEST_TIMEOUT`], and anything that looks like "etcd cannot be reached" maps
//! to [`StoreError::Unavailable`]. The client's channel reconnects by itself when etcd is back.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompactionOptions, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, TxnOpResponse, WatchOptions, WatchResponse, WatchStream,
};

use crate::{
    Compare, Event, KeyValue, LeaseId, LeaseTtl, Listing, Op, Store, StoreError, Txn, TxnOutcome,
    Watch, WatchError, WatchSource,
};

/// The deadline of every request (and of connecting).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings find a dead connection under an open watch. etcd refuses pings more often
/// than every 5 s (`--grpc-keepalive-min-time`).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Lists and watch batches can be larger than tonic's default 4 MiB.
const MAX_MESSAGE: usize = 256 << 20;

/// gRPC status codes (from the gRPC spec) that mean "not reachable / try again".
const GRPC_CANCELLED: i32 = 1;
const GRPC_UNKNOWN: i32 = 2;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_UNAVAILABLE: i32 = 14;

/// PEM files for a TLS connection to etcd (endpoints must then be `https://` or bare
/// `host:port`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// The client certificate and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
    /// For messages: "http://a:2379,http://b:2379".
    endpoints: String,
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// A key as etcd holds it, without the store's prefix.
fn strip(prefix: &str, raw: &[u8]) -> Result<String, StoreError> {
    let key = std::str::from_utf8(raw).map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(raw).into_owned(),
        why: "the key is not UTF-8".into(),
    })?;
    key.strip_prefix(prefix)
        .map(str::to_string)
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_string(),
            why: format!("the key is outside the store prefix {prefix:?}"),
        })
}

fn key_value(prefix: &str, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: strip(prefix, kv.key())?,
        value: kv.value().to_vec(),
        create_revision: rev(kv.create_revision()),
        mod_revision: rev(kv.mod_revision()),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    })
}

fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == GRPC_NOT_FOUND && s.message().contains("lease not found")
        }
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

fn read_pem(what: &str, path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| {
        StoreError::Backend(format!(
            "cannot read etcd TLS {what} {}: {e}",
            path.display()
        ))
    })
}

impl EtcdStore {
    /// Connects and checks that etcd answers, within about [`REQUEST_TIMEOUT`]: a store that
    /// cannot be reached fails here with [`StoreError::Unavailable`] instead of at first use.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<TlsFiles>,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        if let Some(tls) = &tls {
            let config = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read_pem("CA", &tls.ca)?))
                .identity(Identity::from_pem(
                    read_pem("certificate", &tls.cert)?,
                    read_pem("key", &tls.key)?,
                ));
            options = options.with_tls(config);
        }
        let joined = endpoints.join(",");
        let client =
            match tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(endpoints, Some(options)))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(
                    e @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_)),
                )) => {
                    return Err(StoreError::Backend(format!(
                        "bad etcd endpoints {joined}: {e}"
                    )));
                }
                Ok(Err(e)) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot connect to etcd at {joined}: {e}"
                    )));
                }
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot connect to etcd at {joined}: no answer within {REQUEST_TIMEOUT:?}"
                    )));
                }
            };
        let store = EtcdStore {
            client,
            prefix: prefix.to_string(),
            endpoints: joined,
        };
        // The channel connects lazily: ask something to know it works.
        let probe = GetOptions::new().with_count_only();
        let mut kv = store.client.kv_client();
        store
            .call("a first request", kv.get(store.prefix.clone(), Some(probe)))
            .await?;
        Ok(store)
    }

    /// Test hook: compacts etcd's history up to `revision`.
    #[doc(hidden)]
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let revision = i64::try_from(revision).map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut kv = self.client.kv_client();
        self.call(
            "compact",
            kv.compact(revision, Some(CompactionOptions::new().with_physical())),
        )
        .await
        .map(drop)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one request under the deadline and maps its failure.
    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.call_leased(what, request, None).await
    }

    /// [`Self::call`], mapping etcd's "lease not found" to [`StoreError::LeaseNotFound`].
    async fn call_leased<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
        lease: Option<LeaseId>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => match lease {
                Some(id) if lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
                _ => Err(self.map_error(what, e)),
            },
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd at {} did not answer {what} within {REQUEST_TIMEOUT:?}",
                self.endpoints
            ))),
        }
    }

    fn map_error(&self, what: &str, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        let unreachable = match &e {
            E::TransportError(_) | E::IoError(_) => true,
            E::GRpcStatus(s) => matches!(
                s.code() as i32,
                GRPC_CANCELLED | GRPC_UNKNOWN | GRPC_DEADLINE_EXCEEDED | GRPC_UNAVAILABLE
            ),
            _ => false,
        };
        let msg = format!("etcd at {}: {what}: {e}", self.endpoints);
        if unreachable {
            StoreError::Unavailable(msg)
        } else {
            StoreError::Backend(msg)
        }
    }

    fn compare(&self, c: &Compare) -> etcd_client::Compare {
        use etcd_client::{Compare as C, CompareOp};
        match c {
            Compare::Absent(k) => C::create_revision(self.full(k), CompareOp::Equal, 0),
            // etcd compares a missing key's mod revision as 0; ours requires the key.
            Compare::ModRevision(k, 0) => C::mod_revision(self.full(k), CompareOp::Less, 0),
            Compare::ModRevision(k, r) => C::mod_revision(
                self.full(k),
                CompareOp::Equal,
                i64::try_from(*r).unwrap_or(i64::MAX),
            ),
            // etcd fails a value compare on a missing key, as ours does.
            Compare::Value(k, v) => C::value(self.full(k), CompareOp::Equal, v.clone()),
        }
    }

    fn op(&self, op: &Op) -> etcd_client::TxnOp {
        use etcd_client::TxnOp;
        match op {
            Op::Put(k, v) => TxnOp::put(self.full(k), v.clone(), None),
            Op::PutLeased(k, v, l) => TxnOp::put(
                self.full(k),
                v.clone(),
                Some(PutOptions::new().with_lease(*l)),
            ),
            Op::Delete(k) => TxnOp::delete(self.full(k), None),
            Op::DeletePrefix(p) => {
                TxnOp::delete(self.full(p), Some(DeleteOptions::new().with_prefix()))
            }
        }
    }

    fn header_revision(
        &self,
        header: Option<&etcd_client::ResponseHeader>,
    ) -> Result<u64, StoreError> {
        header.map(|h| rev(h.revision())).ok_or_else(|| {
            StoreError::Backend(format!("etcd at {} sent no header", self.endpoints))
        })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call("get", kv.get(self.full(key), None)).await?;
        resp.kvs()
            .first()
            .map(|kv| key_value(&self.prefix, kv))
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let resp = self
            .call(
                "list",
                kv.get(self.full(prefix), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(Listing {
            revision: self.header_revision(resp.header())?,
            items: resp
                .kvs()
                .iter()
                .map(|kv| key_value(&self.prefix, kv))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The else branch first reads every compared key, then applies `otherwise`: the reads
    /// see the state the compares saw, so the first failing compare can be named.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<_> = txn.compares.iter().map(|c| self.compare(c)).collect();
        let then: Vec<_> = txn.ops.iter().map(|o| self.op(o)).collect();
        let otherwise: Vec<_> = txn
            .compares
            .iter()
            .map(|c| etcd_client::TxnOp::get(self.full(c.key()), None))
            .chain(txn.otherwise.iter().map(|o| self.op(o)))
            .collect();
        let request = etcd_client::Txn::new()
            .when(compares)
            .and_then(then)
            .or_else(otherwise);
        // etcd names no lease when one is missing: blame the first one the txn uses.
        let lease = txn.ops.iter().chain(&txn.otherwise).find_map(|o| match o {
            Op::PutLeased(_, _, l) => Some(*l),
            _ => None,
        });
        let mut kv = self.client.kv_client();
        let resp = self.call_leased("txn", kv.txn(request), lease).await?;
        let revision = self.header_revision(resp.header())?;
        if resp.succeeded() {
            return Ok(TxnOutcome::Committed { revision });
        }
        let reads = resp.op_responses();
        for (i, c) in txn.compares.iter().enumerate() {
            let current = match reads.get(i) {
                Some(TxnOpResponse::Get(g)) => g
                    .kvs()
                    .first()
                    .map(|kv| key_value(&self.prefix, kv))
                    .transpose()?,
                _ => {
                    return Err(StoreError::Backend(
                        "etcd txn answer lacks the compared keys".into(),
                    ));
                }
            };
            if !c.holds(current.as_ref()) {
                return Ok(TxnOutcome::CompareFailed(c.clone()));
            }
        }
        Err(StoreError::Backend(
            "etcd failed a compare that holds when read in the same txn".into(),
        ))
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<Watch, StoreError> {
        let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
        let options = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(start);
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let key = self.full(prefix);
        // Wait for etcd to confirm the watch, so a watch that returned is in place; one
        // deadline for both steps.
        let (stream, first) = self
            .call("watch", async {
                let mut stream = client.watch(key, Some(options)).await?;
                let first = stream.message().await?;
                Ok((stream, first))
            })
            .await?;
        let first = match first {
            Some(r) if r.created() && !r.canceled() && r.events().is_empty() => None,
            Some(r) => Some(r),
            None => {
                return Err(StoreError::Unavailable(format!(
                    "etcd at {} closed the watch at once",
                    self.endpoints
                )));
            }
        };
        Ok(Watch::new(WatchSource::Etcd(Box::new(EtcdWatch {
            stream,
            prefix: self.prefix.clone(),
            first,
        }))))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd counts whole seconds (and raises anything below its minimum TTL).
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
            .max(1);
        let mut lease = self.client.lease_client();
        let resp = self.call("lease grant", lease.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd at {} refused a lease: {}",
                self.endpoints,
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    /// One keep-alive round trip on a fresh stream: nothing to cache or to go stale across
    /// reconnects.
    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        self.call_leased("lease keep-alive", lease.keep_alive(id), Some(id))
            .await
            .map(drop)
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        self.call_leased("lease revoke", lease.revoke(id), Some(id))
            .await
            .map(drop)
    }

    async fn lease_ttl(&self, id: LeaseId) -> Result<Option<LeaseTtl>, StoreError> {
        let mut lease = self.client.lease_client();
        let resp = match self
            .call_leased("lease time-to-live", lease.time_to_live(id, None), Some(id))
            .await
        {
            Ok(r) => r,
            Err(StoreError::LeaseNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        // etcd answers "not found" or a TTL of -1 for a lease it does not have any more.
        let secs = |s: i64| Duration::from_secs(u64::try_from(s).unwrap_or(0));
        Ok((resp.ttl() >= 0).then(|| LeaseTtl {
            granted: secs(resp.granted_ttl()),
            remaining: secs(resp.ttl()),
        }))
    }

    fn describe(&self) -> String {
        format!("etcd {} under {:?}", self.endpoints, self.prefix)
    }
}

/// One etcd watch stream; dropping it cancels the watch.
pub(crate) struct EtcdWatch {
    stream: WatchStream,
    prefix: String,
    /// A response read while waiting for the watch to be created.
    first: Option<WatchResponse>,
}

impl EtcdWatch {
    fn strip(&self, raw: &[u8]) -> Result<String, WatchError> {
        strip(&self.prefix, raw).map_err(|e| WatchError::Backend(format!("etcd sent {e}")))
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, WatchError> {
        key_value(&self.prefix, kv).map_err(|e| WatchError::Backend(format!("etcd sent {e}")))
    }

    fn take(&self, resp: WatchResponse, out: &mut VecDeque<Event>) -> Result<(), WatchError> {
        if resp.compact_revision() > 0 {
            return Err(WatchError::Compacted {
                compact_revision: rev(resp.compact_revision()),
            });
        }
        if resp.canceled() {
            return Err(WatchError::Backend(format!(
                "etcd canceled the watch: {}",
                resp.cancel_reason()
            )));
        }
        for e in resp.events() {
            let Some(kv) = e.kv() else {
                return Err(WatchError::Backend(
                    "etcd sent an event without a key".into(),
                ));
            };
            out.push_back(match e.event_type() {
                EventType::Put => Event::Put(self.key_value(kv)?),
                EventType::Delete => Event::Delete {
                    key: self.strip(kv.key())?,
                    revision: rev(kv.mod_revision()),
                    prev: e.prev_kv().map(|p| self.key_value(p)).transpose()?,
                },
            });
        }
        Ok(())
    }

    pub(crate) async fn next_batch(&mut self, out: &mut VecDeque<Event>) -> Result<(), WatchError> {
        loop {
            let resp = match self.first.take() {
                Some(r) => r,
                None => match self.stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(WatchError::Closed),
                    Err(e) => return Err(WatchError::Backend(format!("etcd watch broke: {e}"))),
                },
            };
            self.take(resp, out)?;
            if !out.is_empty() {
                return Ok(());
            }
        }
    }
}
