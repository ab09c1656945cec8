//! The multi-host backend: etcd v3 (tested against 3.4), through a small gRPC client of our
//! own: tonic, with the messages generated once from a trimmed copy of etcd's .proto files and
//! committed (`proto.rs`), so that building berth needs no protoc.
//!
//! Every key is stored under a fixed prefix (e.g. "/berth/") so several clusters or tools can
//! share one etcd; the prefix is added on the way in and stripped on the way out. Every call has
//! a deadline of [`REQUEST_TIMEOUT`], and anything that looks like "etcd cannot be reached" maps
//! to [`StoreError::Unavailable`], with the cause in words (see `diagnose`). The channel
//! reconnects by itself when etcd is back.

mod diagnose;
mod proto;
mod tls;

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::{Channel, Endpoint, Uri};

use self::diagnose::{Cause, Target};
use self::proto::etcdserverpb as pb;
use self::proto::mvccpb;
use self::tls::Tls;
pub use self::tls::{ClientCert, TlsFiles};
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

/// What a request was for, as it reads in "cannot VERB etcd at ...".
#[derive(Debug, Clone, Copy)]
enum Verb {
    Connect,
    Read,
    List,
    Commit,
    Watch,
    Grant,
    Renew,
    Revoke,
    ReadLease,
    Compact,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Connect => "connect to",
            Verb::Read => "read from",
            Verb::List => "list keys in",
            Verb::Commit => "commit a transaction in",
            Verb::Watch => "watch",
            Verb::Grant => "grant a lease in",
            Verb::Renew => "renew a lease in",
            Verb::Revoke => "revoke a lease in",
            Verb::ReadLease => "read a lease in",
            Verb::Compact => "compact",
        })
    }
}

pub struct EtcdStore {
    channel: Channel,
    prefix: String,
    targets: Vec<Target>,
    tls: Option<Arc<Tls>>,
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

fn key_value(prefix: &str, kv: &mvccpb::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: strip(prefix, &kv.key)?,
        value: kv.value.clone(),
        create_revision: rev(kv.create_revision),
        mod_revision: rev(kv.mod_revision),
        lease: (kv.lease != 0).then_some(kv.lease),
    })
}

/// The end of etcd's key range that holds exactly the keys starting with `prefix`: the prefix
/// with its last byte below 0xff incremented (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty, or all 0xff: every key from `prefix` on.
    vec![0]
}

fn lease_not_found(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::NotFound && s.message().contains("lease not found")
}

/// etcd's gRPC codes that mean "try again later" rather than "refused".
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(
        code,
        C::Cancelled | C::Unknown | C::DeadlineExceeded | C::Unavailable
    )
}

/// One endpoint as given (`http://h:p`, `https://h:p` or `h:p`, which takes the scheme from
/// whether TLS is configured), for the channel and for diagnosis.
fn target(url: &str, tls: Option<&Tls>) -> Result<(Target, Endpoint), StoreError> {
    let bad = |why: String| StoreError::Backend(format!("etcd endpoint {url:?}: {why}"));
    let full = match (url.split_once("://"), tls) {
        (Some(("http", _)), Some(_)) => {
            return Err(bad("http:// endpoints take no TLS files".into()));
        }
        (Some(("https", _)), None) => {
            return Err(bad("https:// needs the CA of etcd's certificate".into()));
        }
        (Some(("http" | "https", _)), _) => url.to_string(),
        (Some((scheme, _)), _) => {
            return Err(bad(format!("{scheme}:// is not http:// or https://")));
        }
        (None, Some(_)) => format!("https://{url}"),
        (None, None) => format!("http://{url}"),
    };
    let uri: Uri = full.parse().map_err(|e| bad(format!("{e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| bad("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let mut endpoint = Endpoint::from(uri)
        .connect_timeout(REQUEST_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.tonic.clone())
            .map_err(|e| bad(format!("TLS: {}", diagnose::transport_words(&e))))?;
    }
    Ok((
        Target {
            url: full,
            host,
            port,
        },
        endpoint,
    ))
}

/// One request, a stream in gRPC terms, that stays open for more: etcd ends a watch whose
/// client has half-closed its side.
fn open_stream<T: Send + 'static>(first: T) -> impl tokio_stream::Stream<Item = T> + Send {
    use tokio_stream::StreamExt;
    tokio_stream::once(first).chain(tokio_stream::pending())
}

impl EtcdStore {
    /// Connects and checks that etcd answers, within [`REQUEST_TIMEOUT`] (twice that to say
    /// why it does not): a store that cannot be reached fails here with
    /// [`StoreError::Unavailable`] instead of at first use, and says why (connection refused,
    /// TLS handshake failed because ...).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<TlsFiles>,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints given".into()));
        }
        let tls = tls.map(Tls::load).transpose()?.map(Arc::new);
        let (targets, channels): (Vec<_>, Vec<_>) = endpoints
            .iter()
            .map(|e| target(e, tls.as_deref()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let store = EtcdStore {
            // Balanced also with one endpoint: one way of failing and reconnecting.
            channel: Channel::balance_list(channels.into_iter()),
            prefix: prefix.to_string(),
            endpoints: targets
                .iter()
                .map(|t| t.url.as_str())
                .collect::<Vec<_>>()
                .join(","),
            targets,
            tls,
        };
        // The channel connects lazily: ask something to know it works.
        let probe = pb::RangeRequest {
            key: store.prefix.clone().into_bytes(),
            count_only: true,
            ..Default::default()
        };
        let mut kv = store.kv();
        store.call(Verb::Connect, kv.range(probe)).await?;
        Ok(store)
    }

    /// Test hook: compacts etcd's history up to `revision`.
    #[doc(hidden)]
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let revision = i64::try_from(revision).map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut kv = self.kv();
        let request = pb::CompactionRequest {
            revision,
            physical: true,
        };
        self.call(Verb::Compact, kv.compact(request))
            .await
            .map(drop)
    }

    fn kv(&self) -> pb::kv_client::KvClient<Channel> {
        pb::kv_client::KvClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    fn lease(&self) -> pb::lease_client::LeaseClient<Channel> {
        pb::lease_client::LeaseClient::new(self.channel.clone())
    }

    fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    /// Runs one request under the deadline and maps its failure.
    async fn call<T>(
        &self,
        verb: Verb,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, StoreError> {
        self.call_leased(verb, request, None).await
    }

    /// [`Self::call`], mapping etcd's "lease not found" to [`StoreError::LeaseNotFound`].
    async fn call_leased<T>(
        &self,
        verb: Verb,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        lease: Option<LeaseId>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(v)) => Ok(v.into_inner()),
            Ok(Err(s)) => match lease {
                Some(id) if lease_not_found(&s) => Err(StoreError::LeaseNotFound(id)),
                _ => Err(self.failure(verb, &s).await),
            },
            Err(_) => Err(StoreError::Unavailable(
                self.sentence(verb, &[(None, Cause::NoAnswer(REQUEST_TIMEOUT))]),
            )),
        }
    }

    /// A failed request as one sentence: etcd's own refusal, or, for a failure below gRPC,
    /// what a probe of every endpoint finds, within [`REQUEST_TIMEOUT`] more (such failures
    /// come fast: a refused or reset connection, a failed handshake).
    async fn failure(&self, verb: Verb, status: &tonic::Status) -> StoreError {
        use std::error::Error as _;
        // Taken before any await: the error behind a status is not Sync.
        let Some(fallback) = status.source().map(diagnose::transport_cause) else {
            let said = diagnose::status_words(status);
            let msg = self.sentence(verb, &[(None, Cause::Status(said))]);
            return if retryable(status.code()) {
                StoreError::Unavailable(msg)
            } else {
                StoreError::Backend(msg)
            };
        };
        let each = REQUEST_TIMEOUT / u32::try_from(self.targets.len()).unwrap_or(u32::MAX);
        let mut found = Vec::new();
        for t in &self.targets {
            match tokio::time::timeout(each, diagnose::probe(t, self.tls.as_deref())).await {
                Ok(Some(cause)) => found.push((Some(t), cause)),
                Ok(None) => {}
                Err(_) => found.push((Some(t), Cause::NoAnswer(each))),
            }
        }
        if found.is_empty() {
            // Every endpoint works now: the failure passed, or lies beyond a probe.
            found.push((None, fallback));
        }
        StoreError::Unavailable(self.sentence(verb, &found))
    }

    /// "cannot VERB etcd at URL: CAUSE; CHECK", for one endpoint (`None`: all of them) or
    /// several.
    fn sentence(&self, verb: Verb, found: &[(Option<&Target>, Cause)]) -> String {
        let at = |t: Option<&Target>| match t {
            Some(t) => (t.url.clone(), format!("{}:{}", t.host, t.port)),
            None => (
                self.endpoints.clone(),
                self.targets
                    .iter()
                    .map(|t| format!("{}:{}", t.host, t.port))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        };
        match found {
            [(t, cause)] => {
                let (url, hostport) = at(*t);
                format!("cannot {verb} etcd at {url}: {}", cause.explain(&hostport))
            }
            _ => {
                let parts: Vec<_> = found
                    .iter()
                    .map(|(t, cause)| {
                        let (url, hostport) = at(*t);
                        format!("at {url}, {}", cause.explain(&hostport))
                    })
                    .collect();
                format!("cannot {verb} etcd: {}", parts.join("; "))
            }
        }
    }

    fn compare(&self, c: &Compare) -> pb::Compare {
        use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
        let (result, target, union) = match c {
            Compare::Absent(_) => (R::Equal, T::Create, U::CreateRevision(0)),
            // etcd compares a missing key's mod revision as 0; ours requires the key.
            Compare::ModRevision(_, 0) => (R::Less, T::Mod, U::ModRevision(0)),
            Compare::ModRevision(_, r) => (
                R::Equal,
                T::Mod,
                U::ModRevision(i64::try_from(*r).unwrap_or(i64::MAX)),
            ),
            // etcd fails a value compare on a missing key, as ours does.
            Compare::Value(_, v) => (R::Equal, T::Value, U::Value(v.clone())),
        };
        pb::Compare {
            result: result.into(),
            target: target.into(),
            key: self.full(c.key()),
            target_union: Some(union),
            ..Default::default()
        }
    }

    fn op(&self, op: &Op) -> pb::RequestOp {
        use pb::request_op::Request;
        let put = |k: &str, v: &[u8], lease: LeaseId| {
            Request::RequestPut(pb::PutRequest {
                key: self.full(k),
                value: v.to_vec(),
                lease,
                ..Default::default()
            })
        };
        let request = match op {
            Op::Put(k, v) => put(k, v, 0),
            Op::PutLeased(k, v, l) => put(k, v, *l),
            Op::Delete(k) => Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: self.full(k),
                ..Default::default()
            }),
            Op::DeletePrefix(p) => {
                let key = self.full(p);
                Request::RequestDeleteRange(pb::DeleteRangeRequest {
                    range_end: prefix_end(&key),
                    key,
                    ..Default::default()
                })
            }
        };
        pb::RequestOp {
            request: Some(request),
        }
    }

    fn get_op(&self, key: &str) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key: self.full(key),
                ..Default::default()
            })),
        }
    }

    fn header_revision(&self, header: Option<&pb::ResponseHeader>) -> Result<u64, StoreError> {
        header.map(|h| rev(h.revision)).ok_or_else(|| {
            StoreError::Backend(format!("etcd at {} sent no header", self.endpoints))
        })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.kv();
        let request = pb::RangeRequest {
            key: self.full(key),
            ..Default::default()
        };
        let resp = self.call(Verb::Read, kv.range(request)).await?;
        resp.kvs
            .first()
            .map(|kv| key_value(&self.prefix, kv))
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let mut kv = self.kv();
        let key = self.full(prefix);
        let request = pb::RangeRequest {
            range_end: prefix_end(&key),
            key,
            ..Default::default()
        };
        let resp = self.call(Verb::List, kv.range(request)).await?;
        Ok(Listing {
            revision: self.header_revision(resp.header.as_ref())?,
            items: resp
                .kvs
                .iter()
                .map(|kv| key_value(&self.prefix, kv))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The else branch first reads every compared key, then applies `otherwise`: the reads
    /// see the state the compares saw, so the first failing compare can be named.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let request = pb::TxnRequest {
            compare: txn.compares.iter().map(|c| self.compare(c)).collect(),
            success: txn.ops.iter().map(|o| self.op(o)).collect(),
            failure: txn
                .compares
                .iter()
                .map(|c| self.get_op(c.key()))
                .chain(txn.otherwise.iter().map(|o| self.op(o)))
                .collect(),
        };
        // etcd names no lease when one is missing: blame the first one the txn uses.
        let lease = txn.ops.iter().chain(&txn.otherwise).find_map(|o| match o {
            Op::PutLeased(_, _, l) => Some(*l),
            _ => None,
        });
        let mut kv = self.kv();
        let resp = self
            .call_leased(Verb::Commit, kv.txn(request), lease)
            .await?;
        let revision = self.header_revision(resp.header.as_ref())?;
        if resp.succeeded {
            return Ok(TxnOutcome::Committed { revision });
        }
        for (i, c) in txn.compares.iter().enumerate() {
            let current = match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
                Some(pb::response_op::Response::ResponseRange(r)) => r
                    .kvs
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
        let key = self.full(prefix);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    range_end: prefix_end(&key),
                    key,
                    start_revision: i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX),
                    prev_kv: true,
                    ..Default::default()
                },
            )),
        };
        let mut client = pb::watch_client::WatchClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE);
        // Wait for etcd to confirm the watch, so a watch that returned is in place; one
        // deadline for both steps.
        let (stream, first) = self
            .call(Verb::Watch, async {
                let mut stream = client.watch(open_stream(create)).await?.into_inner();
                let first = stream.message().await?;
                Ok(tonic::Response::new((stream, first)))
            })
            .await?;
        let first = match first {
            Some(r) if r.created && !r.canceled && r.events.is_empty() => None,
            Some(r) => Some(r),
            None => {
                return Err(StoreError::Unavailable(format!(
                    "etcd at {} closed the watch at once; check etcd's log",
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
        let mut lease = self.lease();
        let request = pb::LeaseGrantRequest { ttl: secs, id: 0 };
        let resp = self.call(Verb::Grant, lease.lease_grant(request)).await?;
        if !resp.error.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd at {} refused a lease: {}",
                self.endpoints, resp.error
            )));
        }
        Ok(resp.id)
    }

    /// One keep-alive round trip on a fresh stream: nothing to cache or to go stale across
    /// reconnects.
    async fn keep_alive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.lease();
        let request = pb::LeaseKeepAliveRequest { id };
        let answer = self
            .call_leased(
                Verb::Renew,
                async {
                    let mut stream = lease
                        .lease_keep_alive(tokio_stream::once(request))
                        .await?
                        .into_inner();
                    stream.message().await.map(tonic::Response::new)
                },
                Some(id),
            )
            .await?;
        match answer {
            // etcd answers a lease it does not know with a TTL of 0.
            Some(r) if r.ttl > 0 => Ok(()),
            Some(_) => Err(StoreError::LeaseNotFound(id)),
            None => Err(StoreError::Unavailable(format!(
                "cannot {} etcd at {}: etcd closed the keep-alive stream without an answer; \
                 check etcd's log",
                Verb::Renew,
                self.endpoints
            ))),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.lease();
        let request = pb::LeaseRevokeRequest { id };
        self.call_leased(Verb::Revoke, lease.lease_revoke(request), Some(id))
            .await
            .map(drop)
    }

    async fn lease_ttl(&self, id: LeaseId) -> Result<Option<LeaseTtl>, StoreError> {
        let mut lease = self.lease();
        let request = pb::LeaseTimeToLiveRequest { id, keys: false };
        let resp = match self
            .call_leased(Verb::ReadLease, lease.lease_time_to_live(request), Some(id))
            .await
        {
            Ok(r) => r,
            Err(StoreError::LeaseNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        // etcd answers "not found" or a TTL of -1 for a lease it does not have any more.
        let secs = |s: i64| Duration::from_secs(u64::try_from(s).unwrap_or(0));
        Ok((resp.ttl >= 0).then(|| LeaseTtl {
            granted: secs(resp.granted_ttl),
            remaining: secs(resp.ttl),
        }))
    }

    fn describe(&self) -> String {
        format!("etcd {} under {:?}", self.endpoints, self.prefix)
    }
}

/// One etcd watch stream; dropping it cancels the watch.
pub(crate) struct EtcdWatch {
    stream: tonic::Streaming<pb::WatchResponse>,
    prefix: String,
    /// A response read while waiting for the watch to be created.
    first: Option<pb::WatchResponse>,
}

impl EtcdWatch {
    fn strip(&self, raw: &[u8]) -> Result<String, WatchError> {
        strip(&self.prefix, raw).map_err(|e| WatchError::Backend(format!("etcd sent {e}")))
    }

    fn key_value(&self, kv: &mvccpb::KeyValue) -> Result<KeyValue, WatchError> {
        key_value(&self.prefix, kv).map_err(|e| WatchError::Backend(format!("etcd sent {e}")))
    }

    fn take(&self, resp: pb::WatchResponse, out: &mut VecDeque<Event>) -> Result<(), WatchError> {
        if resp.compact_revision > 0 {
            return Err(WatchError::Compacted {
                compact_revision: rev(resp.compact_revision),
            });
        }
        if resp.canceled {
            return Err(WatchError::Backend(format!(
                "etcd canceled the watch: {}",
                resp.cancel_reason
            )));
        }
        for e in &resp.events {
            let Some(kv) = &e.kv else {
                return Err(WatchError::Backend(
                    "etcd sent an event without a key".into(),
                ));
            };
            out.push_back(match mvccpb::event::EventType::try_from(e.r#type) {
                Ok(mvccpb::event::EventType::Put) => Event::Put(self.key_value(kv)?),
                Ok(mvccpb::event::EventType::Delete) => Event::Delete {
                    key: self.strip(&kv.key)?,
                    revision: rev(kv.mod_revision),
                    prev: e.prev_kv.as_ref().map(|p| self.key_value(p)).transpose()?,
                },
                Err(_) => {
                    return Err(WatchError::Backend(format!(
                        "etcd sent an event of unknown type {}",
                        e.r#type
                    )));
                }
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
                    Err(s) => {
                        return Err(WatchError::Backend(format!(
                            "the etcd watch broke: {}",
                            diagnose::status_words(&s)
                        )));
                    }
                },
            };
            self.take(resp, out)?;
            if !out.is_empty() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/berth/"), b"/berth0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }
}
